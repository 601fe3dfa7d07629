"""Package a distillation run as a servable model folder with its measured `results.json`.

The folder is the final stage's checkpoint (re-saved, so its word-embedding table is referenced,
not stored) plus `results.json`: the teacher's dev metric, the full-precision spiking student's
(as its stage measured it), and the 1-bit student's metric at every requested T, measured here.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import load_checkpoint, save_checkpoint
from .engine import evaluate

DEFAULT_TIMESTEPS = (1, 2, 4, 8, 16, 32, 64)


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
) -> dict:
    """Write `out` (checkpoint + results.json) from `run_dir/<stage>` and return the results.

    `limit` evaluates only the first examples of the dev set (smoke tests); results.json says so.
    """
    run_dir, out = Path(run_dir), Path(out)
    model = load_checkpoint(run_dir / stage)
    meta = model.checkpoint_meta
    task = meta["task"]
    t_conv = model.config.t_conv
    teacher = json.loads((Path(teacher_dir) / "teacher_results.json").read_text())
    results = {"task": task, "model": out.name, "t_conv": t_conv, "dev_limit": limit}
    results.update({k: v for k, v in teacher.items() if k.startswith("teacher_")})
    fp = _last_eval(run_dir / "log.jsonl", "fp-pred")
    if fp:
        results["fp_student"] = {
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
        sweep[str(T)] = {
            k: r[k]
            for k in (
                "accuracy",
                "f1",
                "mcc",
                "pearson",
                "spearman",
                "acs_percent",
                "normalized_c",
                "sentences_per_s",
            )
            if k in r
        }
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
