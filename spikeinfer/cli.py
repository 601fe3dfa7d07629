"""The `spikeinfer` command line (also `python -m spikeinfer`)."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__


def _add_eval(sub):
    p = sub.add_parser(
        "eval",
        help="evaluate a spiking model on a GLUE dev set",
        description="Batched GLUE evaluation of a spiking checkpoint.",
    )
    p.add_argument("--task", required=True, help="GLUE task (sst2, mrpc, cola, ...)")
    p.add_argument(
        "--model", required=True, help="checkpoint folder or bundled model name (see models/)"
    )
    p.add_argument(
        "--glue-dir",
        default=None,
        help="local GLUE folder (<dir>/<TASK>/dev.tsv); default $SPIKEINFER_GLUE_DIR, "
        "else the datasets hub",
    )
    p.add_argument("--split", default=None, help="default: the task's dev split")
    p.add_argument(
        "--backend",
        default="auto",
        help="auto (triton on CUDA, else cpu), triton, cpu, torch, torch-step",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    p.add_argument("--mode", choices=("unrolled", "sequential"), default="unrolled")
    p.add_argument(
        "--timesteps",
        type=int,
        default=None,
        help="T for unrolled mode (default: the model's T_conv)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    p.add_argument("--seed", type=int, default=0, help="seed of sequential-mode spike draws")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


def _positive(name, value):
    if value is not None and value < 1:
        raise SystemExit(f"spikeinfer: error: --{name} must be >= 1, got {value}")


def cmd_eval(args) -> int:
    from .engine import evaluate, load

    _positive("limit", args.limit)
    _positive("batch-size", args.batch_size)
    _positive("timesteps", args.timesteps)
    model = load(args.model, device=args.device)
    result = evaluate(
        model,
        args.task,
        split=args.split,
        glue_dir=args.glue_dir,
        batch_size=args.batch_size,
        mode=args.mode,
        timesteps=args.timesteps,
        seed=args.seed,
        limit=args.limit,
        backend=args.backend,
        progress=not args.json,
    )
    result.pop("predictions", None)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_result(result))
    return 0


def format_result(result: dict) -> str:
    rows = [("task", result["task"]), ("examples", result["n_examples"])]
    for key in ("accuracy", "f1", "mcc", "pearson", "spearman"):
        if key in result:
            rows.append((key, f"{result[key]:.2f}"))
    rows += [
        ("ACs %", f"{result['acs_percent']:.2f}"),
        ("Normalized #C", f"{result['normalized_c']:.4f}"),
        ("latency (timesteps)", f"{result['latency']:.2f}"),
        ("energy (mJ, 45 nm est.)", f"{result['energy_mj']:.4f}"),
        ("sentences/s", f"{result['sentences_per_s']:.1f}"),
        ("wall time (s)", f"{result['wall_s']:.1f}"),
        ("backend", result["backend"]),
        ("mode", result["mode"]),
        ("device", result["device"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikeinfer",
        description="Compress and serve 1-bit spiking BERT models: distillation, "
        "spatio-temporal pruning, fast kernels, GLUE evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"spikeinfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_eval(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .checkpoint import CheckpointError
    from .model import BackendUnavailableError

    try:
        return args.func(args)
    except (CheckpointError, BackendUnavailableError, FileNotFoundError, ValueError) as e:
        print(f"spikeinfer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
