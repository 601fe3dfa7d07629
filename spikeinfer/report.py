"""Pruning reports: the paper's Tables II-IV as markdown, and plots, from `prune` outputs.

Inputs are the `<run>/<stage>/metrics.json` files the pruning schedule writes (any depth under the
runs folder; one column group per run, named by its task, or by task and folder when a task has
several runs). Rows map onto stages:

    Table II   Baseline                  baseline
               Post-training FIM         spatial-ablation, importance fim
               FIM + ASR of neurons      spatial-ablation, fim+asr-neurons
               FIM + ASR of attention    spatial-ablation, fim+asr-attention
               FIM + ASR                 spatial-ablation, fim+asr (else spatial-post if it used it)
               + Retraining              spatial-retrain
               PCA                       temporal-only-post
               PCA + retraining          temporal-only-retrain
               Two-stage                 temporal-retrain
               + Learned thresholds      thresholds
               + Noise-aware timesteps   noise-alloc
    Table III  Baseline / Pruned / Pruned, learned thresholds / Pruned, noise-aware timesteps /
               Adaptive threshold / Adaptive, noise-aware timesteps / Adaptive, one T unrolled
               = baseline / temporal-retrain / thresholds / noise-alloc / adaptive /
                 adaptive-alloc / adaptive-uniform
    Table IV   Spatial only / Temporal only / Joint retraining / Sequential
               = spatial-retrain / temporal-only-retrain / joint-retrain / temporal-retrain

Table II reports the task metric and ACs %, Table III the metric, Normalized #C (Eq. 14) and
latency (mean timesteps per sublayer), Table IV the metric, ACs % and latency. A missing stage is
shown as "-". Plots (matplotlib, PNG) per run: per-sublayer ASR, timesteps per sublayer, metric
vs ACs %.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

METRICS_NAME = "metrics.json"
METRIC_LABELS = {
    "accuracy": "Acc.",
    "f1": "F1",
    "mcc": "MCC",
    "pearson": "Pearson",
    "spearman": "Spearman",
}

TABLE_II = (
    ("Baseline", ("baseline", None)),
    ("Post-training FIM", ("spatial-ablation", "fim")),
    ("FIM + ASR of neurons", ("spatial-ablation", "fim+asr-neurons")),
    ("FIM + ASR of attention", ("spatial-ablation", "fim+asr-attention")),
    ("FIM + ASR", ("spatial-ablation", "fim+asr")),
    ("+ Retraining", ("spatial-retrain", None)),
    ("PCA", ("temporal-only-post", None)),
    ("PCA + retraining", ("temporal-only-retrain", None)),
    ("Two-stage", ("temporal-retrain", None)),
    ("+ Learned thresholds", ("thresholds", None)),
    ("+ Noise-aware timesteps", ("noise-alloc", None)),
)
TABLE_III = (
    ("Baseline", ("baseline", None)),
    ("Pruned", ("temporal-retrain", None)),
    ("Pruned, learned thresholds", ("thresholds", None)),
    ("Pruned, noise-aware timesteps", ("noise-alloc", None)),
    ("Adaptive threshold", ("adaptive", None)),
    ("Adaptive, noise-aware timesteps", ("adaptive-alloc", None)),
    ("Adaptive, one T unrolled", ("adaptive-uniform", None)),
)
TABLE_IV = (
    ("Spatial only", ("spatial-retrain", None)),
    ("Temporal only", ("temporal-only-retrain", None)),
    ("Joint retraining", ("joint-retrain", None)),
    ("Sequential", ("temporal-retrain", None)),
)
# The paper's 1-bit SpikingBERT (4 layers, hidden 768, BERT-base teacher), DESIGN section 9:
# (metric, T_conv), (metric, ACs %), (metric, latency). Accuracy for every task.
PAPER = {
    "mnli": ((75.54, 140), (75.13, 41.67), (73.71, 28.2)),
    "qqp": ((83.99, 80), (84.10, 41.82), (82.77, 15.2)),
    "qnli": ((80.85, 110), (82.28, 28.26), (79.97, 19.4)),
    "sst2": ((86.58, 85), (87.27, 41.53), (86.58, 13.04)),
    "mrpc": ((75.71, 110), (76.12, 18.19), (74.67, 17.48)),
}
# The stages holding a run's two-stage pruned and adaptive models, first found: runs made before
# the later stages existed end at the earlier ones. The one-T unrolled adaptive model comes first:
# on SST-2 it is the one within the target (docs/recipes.md, "Pruning (SST-2)").
PRUNED_STAGES = ("noise-alloc", "thresholds", "temporal-retrain")
ADAPTIVE_STAGES = ("adaptive-uniform", "adaptive-alloc", "adaptive")
# Stages drawn in the ASR and timestep plots, in pipeline order.
PLOT_STAGES = (
    "baseline",
    "spatial-retrain",
    "temporal-post",
    "temporal-retrain",
    "thresholds",
    "noise-alloc",
    "adaptive",
    "adaptive-alloc",
    "adaptive-uniform",
)


@dataclass
class Run:
    """One `prune --out` folder: its task and the metrics of every stage it finished."""

    name: str
    folder: Path
    task: str
    stages: dict[str, dict]

    def lookup(self, key: tuple[str, str | None]) -> dict | None:
        stage, variant = key
        m = self.stages.get(stage)
        if m is None and key == ("spatial-ablation", "fim+asr"):
            post = self.stages.get("spatial-post")  # the pipeline's own search, if it used FIM+ASR
            if post and post.get("spatial", {}).get("importance") == "fim+asr":
                return post
            return None
        if m is not None and variant is not None:
            return m.get("variants", {}).get(variant)
        return m


def collect_runs(root: Path) -> list[Run]:
    """Every folder under `root` with `<stage>/metrics.json` files, as a Run."""
    by_folder: dict[Path, dict[str, dict]] = {}
    # os.walk follows symlinks (Path.rglob does not before 3.13): a report folder may link runs
    # kept elsewhere.
    found = [
        Path(folder) / METRICS_NAME
        for folder, _, files in os.walk(root, followlinks=True)
        if METRICS_NAME in files
    ]
    for path in sorted(found):
        data = json.loads(path.read_text())
        stage = data.get("stage", path.parent.name)
        by_folder.setdefault(path.parent.parent, {})[stage] = data
    runs = []
    for folder, stages in sorted(by_folder.items()):
        task = next((m["task"] for m in stages.values() if "task" in m), None)
        if task is None:  # only an ablation: its variants carry the task
            variants = next(iter(stages.values())).get("variants", {})
            task = next((v.get("task") for v in variants.values()), folder.name)
        runs.append(Run(folder.name, folder, task, stages))
    tasks = [r.task for r in runs]
    for r in runs:
        r.name = r.task if tasks.count(r.task) == 1 else f"{r.task} ({r.folder.name})"
    return runs


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _metric_label(runs: list[Run], run: Run) -> str:
    for m in run.stages.values():
        if "metric" in m:
            return METRIC_LABELS.get(m["metric"], m["metric"])
    return "Metric"


def _table(runs: list[Run], rows, columns) -> str:
    """Markdown table: one row per (label, stage key), per run the given columns.

    `columns`: (header, field, digits) with field a metrics key; "metric" means "value"."""
    header = ["Method"]
    for run in runs:
        for title, field, _ in columns:
            title = _metric_label(runs, run) if field == "value" else title
            header.append(f"{run.name} {title}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, key in rows:
        cells = [label]
        for run in runs:
            m = run.lookup(key)
            for _, field, digits in columns:
                cells.append(_fmt(None if m is None else m.get(field), digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_ii(runs: list[Run]) -> str:
    return _table(runs, TABLE_II, (("", "value", 2), ("ACs %", "acs_percent", 2)))


def table_iii(runs: list[Run]) -> str:
    cols = (("", "value", 2), ("Normalized #C", "normalized_c", 4), ("Latency", "latency", 2))
    return _table(runs, TABLE_III, cols)


def table_iv(runs: list[Run]) -> str:
    cols = (("", "value", 2), ("ACs %", "acs_percent", 2), ("Latency", "latency", 2))
    return _table(runs, TABLE_IV, cols)


def table_paper(runs: list[Run]) -> str:
    """Ours next to the paper's, per task: baseline, two-stage pruned and adaptive threshold, in
    accuracy (the paper's metric) with the latency and ACs % each row is judged by. The pruned
    and adaptive models are the first stage of PRUNED_STAGES and ADAPTIVE_STAGES a run has."""
    header = (
        "| Task | | Baseline acc. | T_conv | Two-stage acc. | ACs % | Adaptive acc. | Latency |"
    )
    lines = [header, "|" + "---|" * 8]
    for run in runs:
        paper = PAPER.get(run.task)
        base = run.lookup(("baseline", None))
        pruned = next((m for m in (run.lookup((s, None)) for s in PRUNED_STAGES) if m), None)
        adaptive = next((m for m in (run.lookup((s, None)) for s in ADAPTIVE_STAGES) if m), None)

        def get(m, key):
            return None if m is None else m.get(key)

        def acc(m):
            return get(m, "accuracy") if get(m, "accuracy") is not None else get(m, "value")

        lines.append(
            f"| {run.name} | ours | {_fmt(acc(base))} | {_fmt(get(base, 't_conv'), 0)} "
            f"| {_fmt(acc(pruned))} | {_fmt(get(pruned, 'acs_percent'))} "
            f"| {_fmt(acc(adaptive))} | {_fmt(get(adaptive, 'latency'))} |"
        )
        if paper is not None:
            (b, t), (pa, pac), (aa, al) = paper
            lines.append(
                f"| {run.name} | paper | {b:.2f} | {t} | {pa:.2f} | {pac:.2f} | {aa:.2f} "
                f"| {al:.2f} |"
            )
    return "\n".join(lines)


def prune_commands(run: Run) -> list[str]:
    """The `spikeinfer prune` command lines that made a run's stages, one per distinct
    invocation (from the arguments every stage records; flags at their defaults left out)."""
    import argparse

    from .prune.commands import add_prune_parser

    parser = add_prune_parser(argparse.ArgumentParser().add_subparsers())
    defaults = vars(parser.parse_args(["--task", "t", "--model", "m", "--out", "o"]))
    flags = {a.dest: a for a in parser._actions if a.option_strings}
    commands: list[str] = []
    for m in run.stages.values():
        args = m.get("args")
        if not args:
            continue
        if "activity_eta" in args and "adaptive_activity_eta" not in args:
            # recorded before the adaptive stage had its own weight: it used the temporal one
            args = {**args, "adaptive_activity_eta": args["activity_eta"]}
        words = ["spikeinfer prune"]
        for dest, value in args.items():
            action = flags.get(dest)
            if action is None or dest in ("task", "model", "out"):
                if dest in ("task", "model", "out"):
                    words.append(f"--{dest} {value}")
                continue
            if value == defaults.get(dest) and dest != "schedule":
                continue
            flag = max(action.option_strings, key=len)
            if isinstance(action, argparse._StoreFalseAction | argparse._StoreTrueAction):
                words.append(flag)
            else:
                words.append(f"{flag} {value}")
        command = " ".join(words)
        if command not in commands:
            commands.append(command)
    return commands


# -- plots --------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "plots need matplotlib: pip install matplotlib (or pass --no-plots)"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _sublayer_order(names) -> list[str]:
    def key(name):
        if name == "emb":
            return (-1, 0)
        layer, sub = name.split(".")
        return (int(layer), ("K", "V", "A", "O1", "F", "O2").index(sub))

    return sorted(names, key=key)


def _timesteps_by_sublayer(m: dict) -> dict[str, int] | None:
    steps = m.get("timesteps")
    if not isinstance(steps, list):
        return None
    out = {"emb": m.get("t_emb", max(max(row) for row in steps))}
    for l, row in enumerate(steps):
        for sub, t in zip(("K", "V", "A", "O1", "F", "O2"), row, strict=True):
            out[f"{l}.{sub}"] = t
    return out


def plot_asr(run: Run, path: Path) -> Path | None:
    curves = {s: run.stages[s]["asr"] for s in PLOT_STAGES if "asr" in run.stages.get(s, {})}
    if not curves:
        return None
    plt = _pyplot()
    names = _sublayer_order(next(iter(curves.values())))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.5))
    for stage, asr in curves.items():
        ax.plot(range(len(names)), [asr.get(n, float("nan")) for n in names], "o-", label=stage)
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_ylabel("average spiking rate")
    ax.set_title(f"{run.name}: ASR per sublayer")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_timesteps(run: Run, path: Path) -> Path | None:
    curves = {}
    for s in PLOT_STAGES:
        m = run.stages.get(s, {})
        t = _timesteps_by_sublayer(m) if m.get("mode") == "sequential" else None
        if t:
            curves[s] = t
    if not curves:
        return None
    plt = _pyplot()
    names = _sublayer_order(next(iter(curves.values())))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.5))
    for stage, steps in curves.items():
        ax.step(range(len(names)), [steps[n] for n in names], where="mid", label=stage)
    t_conv = next((m.get("t_conv") for m in run.stages.values() if m.get("t_conv")), None)
    if t_conv:
        ax.axhline(t_conv, color="grey", ls="--", lw=1, label=f"T_conv = {t_conv}")
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_ylabel("timesteps")
    ax.set_title(f"{run.name}: timestep allocation per sublayer")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _points(run: Run) -> list[tuple[str, float, float]]:
    points = []
    for stage, m in run.stages.items():
        if "value" in m:
            points.append((stage, m["acs_percent"], m["value"]))
        for variant, v in m.get("variants", {}).items():
            points.append((f"post {variant}", v["acs_percent"], v["value"]))
    return points


def plot_metric_vs_acs(run: Run, path: Path) -> Path | None:
    points = _points(run)
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, acs, value in points:
        ax.scatter(acs, value)
        ax.annotate(
            label, (acs, value), fontsize="x-small", xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xlabel("ACs % of dense")
    ax.set_ylabel(_metric_label([run], run))
    ax.set_title(f"{run.name}: metric vs ACs %")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


# -- the report ---------------------------------------------------------------------------------


def render_markdown(runs: list[Run], plots: dict[str, list[Path]] | None = None) -> str:
    parts = [
        "# Spatio-temporal pruning results",
        "",
        "Generated by `spikeinfer report` from the stages' `metrics.json`. ACs % is relative to "
        "the dense model at T_conv; Normalized #C weights every accumulate by its input's firing "
        "rate (Eq. 14); latency is the mean timesteps per sublayer. '-' marks a stage not run. "
        "A sequential-mode row is one seed's Bernoulli draws (the run's `--seed` and "
        "`--eval-batch-size`); `spikeinfer bundle --seeds N` measures a stage over N seeds, and "
        "the bundled models' `results.json` record that mean and spread.",
        "",
        "## Table II: ablation of the pruning components",
        "",
        table_ii(runs),
        "",
        "## Table III: pruned and adaptive-threshold models",
        "",
        table_iii(runs),
        "",
        "## Table IV: pruning strategies",
        "",
        table_iv(runs),
        "",
        "## Next to the paper",
        "",
        "The paper's 1-bit SpikingBERT is 4 layers of hidden 768 distilled from BERT-base (DESIGN "
        "section 9); ours is the default 4 x 384 student of a MiniLM teacher, so the comparable "
        "claims are the deltas to each model's own baseline. Accuracy in every column.",
        "",
        table_paper(runs),
        "",
        "## Commands",
        "",
    ]
    for run in runs:
        parts += [f"{run.name}:", "", "```bash", *prune_commands(run), "```", ""]
    for run in runs:
        files = (plots or {}).get(run.name, [])
        if files:
            parts += [f"## Plots: {run.name}", ""]
            parts += [f"![{p.stem}]({p.name})" for p in files]
            parts.append("")
    return "\n".join(parts)


def write_report(runs_dir: Path, out: Path, plots: bool = True) -> list[Path]:
    """Write the markdown report (and PNG plots beside it); returns the files written."""
    runs = collect_runs(runs_dir)
    if not runs:
        raise FileNotFoundError(f"no {METRICS_NAME} files under {runs_dir}; run `prune` first")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    images: dict[str, list[Path]] = {}
    if plots:
        for run in runs:
            stem = f"{out.stem}_{_slug(run.name)}"
            for kind, fn in (
                ("asr", plot_asr),
                ("timesteps", plot_timesteps),
                ("metric_vs_acs", plot_metric_vs_acs),
            ):
                path = fn(run, out.parent / f"{stem}_{kind}.png")
                if path is not None:
                    images.setdefault(run.name, []).append(path)
                    written.append(path)
    out.write_text(render_markdown(runs, images))
    return [out, *written]
