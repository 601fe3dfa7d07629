"""Command-line parsers for `spikeinfer prune` and `spikeinfer report`.

`spikeinfer/cli.py` hooks them in with `add_prune_parser(sub)` and `add_report_parser(sub)`.
"""

from __future__ import annotations

import json
from pathlib import Path


def _check_positive(parser, args, names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def add_prune_parser(subparsers):
    from .schedule import SCHEDULES, STAGES
    from .spatial import IMPORTANCE_MODES

    p = subparsers.add_parser(
        "prune",
        help="spatio-temporal pruning: spatial, temporal, adaptive stages or the two-stage run",
        description="Prune a spiking checkpoint in space (heads, FFN neurons) and time (timesteps "
        "per sublayer), retrain, and write every stage's checkpoint and metrics.json under --out. "
        f"Schedules: {', '.join(SCHEDULES)}; or stage names, comma-separated: "
        f"{', '.join(STAGES)}.",
    )
    p.add_argument("--task", required=True, help="GLUE task (sst2, mrpc, ...)")
    p.add_argument("--model", required=True, help="checkpoint folder or bundled model name")
    p.add_argument(
        "--schedule",
        default="two-stage",
        help="two-stage (default), spatial, temporal, adaptive, tables (everything Tables II-IV "
        "need), or comma-separated stage names",
    )
    p.add_argument("--out", required=True, help="output folder, one subfolder per stage")
    p.add_argument("--glue-dir", default=None, help="local GLUE folder (else the hub)")
    p.add_argument("--teacher", default=None, help="fine-tuned teacher folder: prediction KD")
    train = p.add_argument_group("training (retraining stages)")
    train.add_argument("--epochs", type=float, default=1.0, help="epochs per retraining stage")
    train.add_argument("--max-steps", type=int, default=None, help="steps per retraining stage")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=2e-5)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--timesteps",
        type=int,
        default=32,
        help="T of the unrolled no-grad simulation (Fisher, spatial retraining)",
    )
    train.add_argument("--backend", default="auto", help="backend of the spiking simulation")
    train.add_argument("--device", default=None)
    train.add_argument("--max-length", type=int, default=64, help="truncate training sentences")
    train.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    train.add_argument("--resume", action="store_true", help="skip finished stages, resume others")
    train.add_argument("--train-limit", type=int, default=None, help="use N training examples")
    sp = p.add_argument_group("spatial pruning")
    sp.add_argument("--budget", type=float, default=0.6, help="ACs kept, fraction of dense")
    sp.add_argument("--fisher-samples", type=int, default=2048)
    sp.add_argument("--fisher-batch-size", type=int, default=32)
    sp.add_argument("--importance", choices=IMPORTANCE_MODES, default="fim+asr")
    sp.add_argument("--no-refine", dest="refine", action="store_false", help="skip the swaps")
    sp.add_argument("--ac-lambda", type=float, default=1.0, help="weight of the AC penalty")
    sp.add_argument(
        "--penalty-fraction",
        type=float,
        default=0.5,
        help="share of retraining steps with the AC penalty (then plain loss)",
    )
    sp.add_argument("--mask-lr", type=float, default=1e-2, help="learning rate of mask logits")
    tp = p.add_argument_group("temporal pruning")
    tp.add_argument("--variance", type=float, default=0.99999, help="PCA variance fraction")
    tp.add_argument("--base", type=float, default=1.02, help="b of Eq. 10")
    tp.add_argument("--calib-samples", type=int, default=256, help="PCA calibration examples")
    tp.add_argument(
        "--realloc-every",
        type=int,
        default=None,
        help="steps between PCA reallocations in temporal retraining (default: a quarter of "
        "the stage's steps; 0: never)",
    )
    tp.add_argument(
        "--activity-eta", type=float, default=1e-3, help="temporal retraining: activity loss weight"
    )
    tp.add_argument(
        "--target-latency",
        type=float,
        default=0.16,
        help="adaptive stages: mean timesteps at most this fraction of T_conv (adaptive-uniform: "
        "every sublayer at the largest whole T within it)",
    )
    tp.add_argument(
        "--vth-lr",
        type=float,
        default=1e-2,
        help="thresholds and adaptive stages: learning rate of thresholds",
    )
    tp.add_argument(
        "--adaptive-activity-eta",
        type=float,
        default=0.0,
        help="thresholds and adaptive stages: activity loss weight (the temporal retraining "
        "uses --activity-eta)",
    )
    na = p.add_argument_group("noise-aware allocation (noise-alloc, adaptive-alloc)")
    na.add_argument(
        "--acs-target",
        type=float,
        default=None,
        help="noise-alloc: ACs of the re-spread timesteps, fraction of dense at T_conv, at the "
        "calibration examples' mean length (default: the source model's ACs)",
    )
    na.add_argument(
        "--noise-samples", type=int, default=1024, help="training examples the sensitivities use"
    )
    na.add_argument(
        "--noise-floor",
        type=float,
        default=0.01,
        help="least sensitivity a sublayer counts with, fraction of the output error",
    )
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--eval-limit", type=int, default=None, help="evaluate N dev examples")
    ev.add_argument(
        "--eval-batch-size",
        type=int,
        default=32,
        help="as `spikeinfer eval`'s: sequential-mode draws depend on the batching",
    )
    p.add_argument("--json", action="store_true", help="print every stage's headline as JSON")
    p.set_defaults(func=cmd_prune, _parser=p)
    return p


def prune_args(args):
    from ..data import get_task
    from ..teacher import check_teacher_task
    from .schedule import PruneArgs, resolve_schedule

    parser = args._parser
    _check_positive(
        parser,
        args,
        (
            "max_steps",
            "batch_size",
            "timesteps",
            "max_length",
            "save_every",
            "fisher_samples",
            "fisher_batch_size",
            "calib_samples",
            "noise_samples",
            "train_limit",
            "eval_limit",
            "eval_batch_size",
        ),
    )
    if args.epochs <= 0:
        parser.error(f"--epochs must be > 0, got {args.epochs}")
    if not 0.0 < args.budget <= 1.0:
        parser.error(f"--budget must be in (0, 1], got {args.budget}")
    if not 0.0 < args.variance <= 1.0:
        parser.error(f"--variance must be in (0, 1], got {args.variance}")
    if args.base <= 1.0:
        parser.error(f"--base must be > 1, got {args.base}")
    if not 0.0 < args.target_latency <= 1.0:
        parser.error(f"--target-latency must be in (0, 1], got {args.target_latency}")
    if args.acs_target is not None and not 0.0 < args.acs_target <= 1.0:
        parser.error(f"--acs-target must be in (0, 1], got {args.acs_target}")
    if args.noise_floor < 0.0:
        parser.error(f"--noise-floor must be >= 0, got {args.noise_floor}")
    if not 0.0 <= args.penalty_fraction <= 1.0:
        parser.error(f"--penalty-fraction must be in [0, 1], got {args.penalty_fraction}")
    if args.realloc_every is not None and args.realloc_every < 0:
        parser.error(f"--realloc-every must be >= 0, got {args.realloc_every}")
    try:
        resolve_schedule(args.schedule)
        if args.teacher:
            check_teacher_task(args.teacher, get_task(args.task).name)
    except ValueError as e:
        parser.error(str(e))
    fields = PruneArgs.__dataclass_fields__
    return PruneArgs(**{k: v for k, v in vars(args).items() if k in fields})


def cmd_prune(args) -> int:
    from .schedule import run_schedule

    results = run_schedule(prune_args(args))
    rows = []
    for stage, m in results.items():
        if "value" in m:
            rows.append(
                {
                    "stage": stage,
                    m["metric"]: m["value"],
                    "acs_percent": m["acs_percent"],
                    "normalized_c": m["normalized_c"],
                    "latency": m["latency"],
                }
            )
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(
                "  ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                )
            )
    return 0


def add_report_parser(subparsers):
    p = subparsers.add_parser(
        "report",
        help="markdown tables (paper Tables II-IV) and plots from pruning runs",
        description="Collect every <stage>/metrics.json under --runs (one or more `prune --out` "
        "folders, any depth) into markdown tables in the layout of the paper's Tables II, III and "
        "IV, plus PNG plots (per-sublayer ASR, timesteps per sublayer, metric vs ACs %) beside "
        "the markdown file.",
    )
    p.add_argument("--runs", required=True, help="folder holding prune output folders")
    p.add_argument("--out", required=True, help="markdown file to write, e.g. docs/pruning.md")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args) -> int:
    from ..report import write_report

    runs = Path(args.runs)
    if not runs.is_dir():
        raise FileNotFoundError(f"--runs {runs} is not a folder")
    written = write_report(runs, Path(args.out), plots=args.plots)
    for path in written:
        print(path)
    return 0
