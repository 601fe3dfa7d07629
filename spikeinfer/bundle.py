"""Package a distillation or pruning run as a servable model folder with its `results.json`.

A distillation bundle is the final stage's checkpoint (re-saved, so its word-embedding table is
referenced, not stored) plus `results.json`: the teacher's dev metric, the full-precision spiking
student's (as its stage measured it), and the 1-bit student's metric at every requested T,
measured here. A pruning bundle is one stage's compacted checkpoint, measured here in the mode the
stage is evaluated in (`sequential` at its per-sublayer timesteps after temporal pruning), next to
the baseline the run started from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .engine import evaluate
from .teacher import check_teacher_task

DEFAULT_TIMESTEPS = (1, 2, 4, 8, 16, 32, 64)
METRIC_KEYS = ("accuracy", "f1", "mcc", "pearson", "spearman")
# What results.json keeps of an evaluation.
RESULT_KEYS = (
    *METRIC_KEYS,
    "acs_percent",
    "normalized_c",
    "latency",
    "energy_mj",
    "sentences_per_s",
)


def _last_eval(log_path: Path, stage: str) -> dict | None:
    if not log_path.exists():
        return None
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("event") == "eval" and r.get("stage", "").endswith(stage)]
    return evals[-1] if evals else None


def bundle(
    run_dir,
    teacher_dir,
    out,
    *,
    stage: str = "1bit-pred",
    glue_dir=None,
    backend: str = "auto",
    timesteps=DEFAULT_TIMESTEPS,
    batch_size: int = 64,
    limit: int | None = None,
    fp_run=None,
) -> dict:
    """Write `out` (checkpoint + results.json) from `run_dir/<stage>` and return the results.

    The full-precision student reported is the last evaluation of the fp-pred stage in
    `fp_run`'s log (default `run_dir`): a recipe whose 1-bit student starts from the teacher
    trains its full-precision counterpart in a run of its own.
    `limit` evaluates only the first examples of the dev set (smoke tests); results.json says so.
    """
    run_dir, out = Path(run_dir), Path(out)
    model = load_checkpoint(run_dir / stage)
    meta = model.checkpoint_meta
    task = meta["task"]
    t_conv = model.config.t_conv
    check_teacher_task(teacher_dir, task)
    teacher = json.loads((Path(teacher_dir) / "teacher_results.json").read_text())
    results = {"task": task, "model": out.name, "t_conv": t_conv, "dev_limit": limit}
    results.update({k: v for k, v in teacher.items() if k.startswith("teacher_")})
    fp_dir = Path(fp_run) if fp_run is not None else run_dir
    fp = _last_eval(fp_dir / "log.jsonl", "fp-pred")
    if fp is None and fp_run is not None:
        raise FileNotFoundError(
            f"--fp-run {fp_dir}: its log.jsonl has no evaluation of an fp-pred stage; "
            "run `spikeinfer distill --stages fp-pred` there first"
        )
    if fp:
        results["fp_student"] = {
            "run": str(fp_dir),
            "step": fp["step"],
            "timesteps": fp["timesteps"],
            "snn": fp["snn"],
            "surrogate": fp["surrogate"],
        }
    sweep = {}
    for T in sorted({*timesteps, t_conv}):
        r = evaluate(
            model,
            task,
            glue_dir=glue_dir,
            timesteps=T,
            backend=backend,
            batch_size=batch_size,
            progress=False,
            limit=limit,
        )
        sweep[str(T)] = {k: r[k] for k in RESULT_KEYS if k in r}
        print(json.dumps({"T": T, **sweep[str(T)]}), flush=True)
    results["student_1bit"] = sweep[str(t_conv)]
    results["student_1bit_by_timesteps"] = sweep
    results["backend"] = r["backend"]
    results["provenance"] = meta.get("provenance", {})
    save_checkpoint(
        model,
        out,
        task=task,
        label_names=meta.get("label_names"),
        provenance=meta.get("provenance"),
        metrics=results["student_1bit"],
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def bundle_pruned(
    prune_dir,
    out,
    *,
    stage: str | None = None,
    glue_dir=None,
    backend: str = "auto",
    batch_size: int = 32,
    limit: int | None = None,
    seeds: int = 5,
) -> dict:
    """Write `out` from the compacted model of `prune_dir/<stage>` and return its results.

    The default stage is the two-stage schedule's pruned model: the first of `noise-alloc`,
    `thresholds` and `temporal-retrain` the run has (runs made before the later stages existed
    end at the earlier ones); results.json names it.

    Sequential-mode draws are keyed by position in the batch, so the measurement is reproduced
    by the same seed and batch size: the default is `spikeinfer eval`'s, and results.json records
    both. A sequential model is a stochastic one, so it is also measured over `seeds` seeds
    (mean and standard deviation of each metric)."""
    from .report import PRUNED_STAGES, collect_runs, prune_commands

    prune_dir, out = Path(prune_dir), Path(out)
    if stage is None:
        finished = (s for s in PRUNED_STAGES if (prune_dir / s / "metrics.json").is_file())
        stage = next(finished, PRUNED_STAGES[-1])
    stage_dir = prune_dir / stage
    if not (stage_dir / "metrics.json").is_file():
        raise FileNotFoundError(
            f"{stage_dir} has no metrics.json: run `spikeinfer prune --out {prune_dir}` with a "
            f"schedule that includes {stage!r} first"
        )
    stage_metrics = json.loads((stage_dir / "metrics.json").read_text())
    model = load_checkpoint(stage_dir / "compact")
    meta = model.checkpoint_meta
    task = meta["task"]
    mode = stage_metrics["mode"]
    seed = stage_metrics["args"]["seed"]
    # A sequential model is stochastic: measure it over several seeds, the first being the one
    # `spikeinfer eval` reproduces.
    seed_list = [seed + s for s in range(seeds if mode == "sequential" else 1)]
    runs = [
        evaluate(
            model,
            task,
            glue_dir=glue_dir,
            mode=mode,
            seed=s,
            backend=backend,
            batch_size=batch_size,
            progress=False,
            limit=limit,
        )
        for s in seed_list
    ]
    r = runs[0]
    results = {
        "task": task,
        "model": out.name,
        "stage": stage,
        "t_conv": model.config.t_conv,
        "mode": mode,
        "seed": seed,
        "batch_size": batch_size,
        "dev_limit": limit,
        "student_1bit": {k: r[k] for k in RESULT_KEYS if k in r},
        "stage_measured": {k: stage_metrics[k] for k in RESULT_KEYS if k in stage_metrics},
        "timesteps": model.timesteps,
        "t_emb": model.t_emb,
        "heads_per_layer": [b.num_heads for b in model.layers],
        "neurons_per_layer": [b.num_neurons for b in model.layers],
        "backend": r["backend"],
    }
    baseline_path = prune_dir / "baseline" / "metrics.json"
    if baseline_path.is_file():
        base = json.loads(baseline_path.read_text())
        results["baseline"] = {k: base[k] for k in RESULT_KEYS if k in base}
        results["baseline"]["source"] = base.get("source")
        source_results = Path(base.get("source", "")) / "results.json"
        if source_results.is_file():
            teacher = json.loads(source_results.read_text())
            results.update({k: v for k, v in teacher.items() if k.startswith("teacher_")})
    results["commands"] = [c for run in collect_runs(prune_dir) for c in prune_commands(run)]
    if len(runs) > 1:
        spread = {"seeds": seed_list}
        for key in METRIC_KEYS:
            if key in r:
                values = torch.tensor([x[key] for x in runs], dtype=torch.float64)
                spread[f"{key}_mean"] = float(values.mean())
                spread[f"{key}_std"] = float(values.std())
        results["student_1bit_over_seeds"] = spread
    print(json.dumps({"stage": stage, "mode": mode, **results["student_1bit"]}), flush=True)
    save_checkpoint(
        model,
        out,
        task=task,
        label_names=meta.get("label_names"),
        provenance=meta.get("provenance"),
        metrics=results["student_1bit"],
        extra={"mode": mode},
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
