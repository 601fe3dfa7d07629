"""The pruning schedule (DESIGN section 8): stages, their checkpoints and metrics.

The two-stage pipeline is a chain of stages, each starting from its source stage's model:

    baseline -> spatial-post -> spatial-retrain -> temporal-post -> temporal-retrain
    temporal-retrain -> thresholds   (learnable thresholds at the PCA timesteps)
    thresholds -> noise-alloc        (timesteps re-spread by Bernoulli-noise sensitivity under
                                      the ACs target: the pruned model)
    temporal-retrain -> adaptive     (learnable thresholds, timesteps scaled down)
    adaptive -> adaptive-alloc       (the same re-spreading at the adaptive mean latency)
    baseline -> adaptive-uniform     (learnable thresholds, every sublayer at one short T,
                                      unrolled: the latency target without Bernoulli noise)

and the tables' comparisons add side branches (Table II: importance ablations, PCA alone; Table
IV: spatial only, temporal only, joint retraining, sequential = the two-stage chain):

    spatial-post -> spatial-ablation        (FIM, FIM+ASR neurons / attention / both; eval only)
    baseline -> temporal-only-post -> temporal-only-retrain
    spatial-post -> joint-post -> joint-retrain     (spatial + temporal masks, one retraining)

Every stage writes `<out>/<stage>/`: `metrics.json` (the paper's columns: metric, ACs %,
Normalized #C, latency, plus per-sublayer ASR, timesteps and stage details), `model/` (the masked,
uncompacted checkpoint the next stage starts from) and `compact/` (pruned units physically
removed, for serving). A stage whose `metrics.json` exists is skipped under `--resume`; a stage
that trains resumes from its `train_state.pt`. A stage run alone starts from its source stage's
`model/` in `--out` when there is one, else from `--model`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..config import uniform_timesteps
from ..model import SpikingBert, compact
from . import noise_alloc, spatial, temporal
from .retrain import RetrainConfig, retrain

METRICS_NAME = "metrics.json"


@dataclass
class PruneArgs:
    """Everything a schedule needs (the `prune` command's flags)."""

    task: str
    model: str
    out: Path
    schedule: str = "two-stage"
    glue_dir: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 2e-5
    seed: int = 0
    timesteps: int = 32
    backend: str = "auto"
    device: str | None = None
    resume: bool = False
    max_length: int = 64
    save_every: int = 200
    teacher: str | None = None
    # spatial
    budget: float = 0.6
    fisher_samples: int = 2048
    fisher_batch_size: int = 32
    importance: str = "fim+asr"
    refine: bool = True
    ac_lambda: float = 1.0
    penalty_fraction: float = 0.5
    mask_lr: float = 1e-2
    # temporal
    variance: float = 0.99999
    base: float = 1.02
    calib_samples: int = 256
    realloc_every: int | None = None  # None: every quarter of the stage's steps; 0: never
    activity_eta: float = 1e-3
    # adaptive thresholds. Measured on SST-2 (docs/recipes.md), one run: without the activity
    # loss, thresholds at 1e-2 and 1,200 steps the stage ended 1.9 points higher (5-seed means)
    # than with the temporal stage's loss (1e-3), thresholds at 1e-3 and 600 steps, at the same
    # latency; which of the three changes carries the gain is not separated.
    target_latency: float = 0.16
    vth_lr: float = 1e-2
    adaptive_activity_eta: float = 0.0
    # noise-aware allocation
    acs_target: float | None = None  # None: the source model's ACs (a re-spreading at equal cost)
    noise_samples: int = 1024
    noise_floor: float = 0.01
    # data / evaluation limits
    train_limit: int | None = None
    eval_limit: int | None = None
    eval_batch_size: int = 32  # `spikeinfer eval`'s, so its sequential draws are the same


@dataclass(frozen=True)
class Stage:
    name: str
    source: str | None  # stage whose model/ this one starts from; None: --model
    run: Callable  # (ctx, model, stage_dir) -> dict of stage details; mutates model
    eval_mode: str  # "unrolled" at T_conv or "sequential" at the per-sublayer timesteps
    description: str
    saves_model: bool = True


# -- context: data, teacher, device, shared by the stages of one invocation -------------------


class Context:
    def __init__(self, args: PruneArgs):
        from ..data import get_task
        from ..distill import fastest_backend
        from ..engine import resolve_backend, select_device
        from ..train import JsonLog, init_distributed

        self.args = args
        self.out = Path(args.out)
        self.device = select_device(args.device)
        self.info = init_distributed(self.device)
        self.spec = get_task(args.task)
        self.log = JsonLog(self.out, self.info.main)
        if args.backend == "auto":
            self.backend = fastest_backend(self.device)
        else:
            self.backend = resolve_backend(args.backend)

    @cached_property
    def tokenizer(self):
        from ..data import load_tokenizer

        return load_tokenizer(self.args.teacher)

    @cached_property
    def train(self):
        from ..data import load_glue, tokenize

        data = load_glue(self.spec.name, "train", self.args.glue_dir)
        if self.args.train_limit is not None and self.args.train_limit < len(data):
            rng = np.random.default_rng(self.args.seed)
            keep = rng.permutation(len(data))[: self.args.train_limit]
            data = data.select(sorted(int(i) for i in keep))
        return tokenize(data, self.spec.name, self.tokenizer, self.args.max_length)

    def _sample(self, n: int, salt: int) -> list[int]:
        rng = np.random.default_rng(self.args.seed + salt)
        return rng.permutation(len(self.train))[: min(n, len(self.train))].tolist()

    def batches(self, indices: list[int], batch_size: int) -> list[dict]:
        from ..data import bucket_batches

        lengths = self.train.lengths[indices]
        return [
            self.collate([indices[i] for i in chunk])
            for chunk in bucket_batches(lengths, batch_size)
        ]

    def collate(self, indices) -> dict:
        from ..data import collate

        return {k: v.to(self.device) for k, v in collate(self.train, indices).items()}

    def fisher_batches(self) -> list[dict]:
        return self.batches(self._sample(self.args.fisher_samples, 1), self.args.fisher_batch_size)

    @cached_property
    def calib(self) -> list[dict]:
        """Calibration batches (training examples): PCA traces, ASRs, the representative N."""
        return self.batches(self._sample(self.args.calib_samples, 2), self.args.fisher_batch_size)

    @cached_property
    def noise_calib(self) -> list[dict]:
        """Training examples the noise sensitivities are measured on."""
        return self.batches(self._sample(self.args.noise_samples, 3), self.args.fisher_batch_size)

    @cached_property
    def seq_len(self) -> float:
        """Mean real tokens per calibration example: the N of the search's cost model."""
        tokens = sum(float(b["attention_mask"].sum()) for b in self.calib)
        return tokens / sum(b["attention_mask"].shape[0] for b in self.calib)

    @cached_property
    def teacher_logits(self):
        if not self.args.teacher:
            return None
        from ..teacher import load_teacher

        teacher = load_teacher(self.args.teacher, self.spec.num_labels, task=self.spec.name)
        teacher = teacher.to(self.device).eval()

        @torch.no_grad()
        def logits(b):
            return teacher(
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                token_type_ids=b["token_type_ids"],
            ).logits

        return logits

    def steps(self) -> int:
        a = self.args
        if a.max_steps is not None:
            return a.max_steps
        per_epoch = len(self.train) // (a.batch_size * self.info.world) or 1
        return max(1, round(a.epochs * per_epoch))

    def retrain(self, model: SpikingBert, stage_dir: Path, cfg: RetrainConfig, name: str):
        a = self.args
        steps = self.steps()
        if cfg.realloc_every is None:
            cfg.realloc_every = max(1, steps // 4)
        return retrain(
            model,
            cfg,
            train=self.train,
            collate_fn=self.collate,
            out=stage_dir,
            steps=steps,
            lr=a.lr,
            batch_size=a.batch_size,
            seed=a.seed,
            resume=a.resume,
            info=self.info,
            regression=self.spec.is_regression,
            teacher_logits=self.teacher_logits,
            calib=self.calib,
            save_every=a.save_every,
            log=self.log,
            desc=f"{self.spec.name} {name}",
        )

    def retrain_config(self, **kw) -> RetrainConfig:
        a = self.args
        base = dict(
            sim_timesteps=a.timesteps,
            mask_lr=a.mask_lr,
            ac_lambda=a.ac_lambda,
            penalty_fraction=a.penalty_fraction,
            variance=a.variance,
            base=a.base,
            vth_lr=a.vth_lr,
            seq_len=self.seq_len,
        )
        base.update(kw)
        return RetrainConfig(**base)


# -- stages -------------------------------------------------------------------------------------


def _fisher(ctx: Context, model: SpikingBert, stage_dir: Path) -> spatial.FisherInfo:
    fisher = spatial.compute_fisher(
        model,
        ctx.fisher_batches(),
        timesteps=ctx.args.timesteps,
        regression=ctx.spec.is_regression,
    )
    if ctx.info.main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        fisher.save(stage_dir / "fisher.pt")
    return fisher


def _spatial_post(ctx: Context, model: SpikingBert, stage_dir: Path) -> dict:
    fisher = _fisher(ctx, model, stage_dir)
    hm, nm, summary = spatial.spatial_masks(
        model,
        fisher,
        budget=ctx.args.budget,
        mode=ctx.args.importance,
        refine=ctx.args.refine,
        seq_len=ctx.seq_len,
    )
    spatial.apply_masks(model, hm, nm)
    return {"spatial": summary}


def _spatial_ablation(ctx: Context, model: SpikingBert, stage_dir: Path) -> dict:
    saved = ctx.out / "spatial-post" / "fisher.pt"
    fisher = spatial.FisherInfo.load(saved) if saved.exists() else _fisher(ctx, model, stage_dir)
    variants = {}
    for mode in spatial.IMPORTANCE_MODES:
        hm, nm, summary = spatial.spatial_masks(
            model,
            fisher,
            budget=ctx.args.budget,
            mode=mode,
            refine=ctx.args.refine,
            seq_len=ctx.seq_len,
        )
        variant = compact(spatial.apply_masks(copy.deepcopy(model), hm, nm))
        variants[mode] = {**evaluate_stage(ctx, variant, "unrolled"), "spatial": summary}
        ctx.log(event="ablation", importance=mode, **_headline(variants[mode]))
    return {"variants": variants}


def _spatial_retrain(ctx: Context, model: SpikingBert, stage_dir: Path) -> dict:
    cfg = ctx.retrain_config(mode="unrolled", relax_masks=True, budget=ctx.args.budget)
    return {"retrain": ctx.retrain(model, stage_dir, cfg, "spatial-retrain")}


def _temporal_post(ctx: Context, model: SpikingBert, stage_dir: Path) -> dict:
    model.eval()
    info = temporal.temporal_prune(model, ctx.calib, variance=ctx.args.variance, base=ctx.args.base)
    return {"temporal": info}


def _temporal_retrain(ctx: Context, model: SpikingBert, stage_dir: Path) -> dict:
    cfg = ctx.retrain_config(
        mode="sequential", activity_eta=ctx.args.activity_eta, realloc_every=ctx.args.realloc_every
    )
    return {"retrain": ctx.retrain(model, stage_dir, cfg, stage_dir.name)}


def _joint_retrain(ctx: Context, model: SpikingBert, stage_dir: Path) -> dict:
    cfg = ctx.retrain_config(
        mode="sequential",
        relax_masks=True,
        budget=ctx.args.budget,
        activity_eta=ctx.args.activity_eta,
        realloc_every=ctx.args.realloc_every,
    )
    return {"retrain": ctx.retrain(model, stage_dir, cfg, "joint-retrain")}


def _threshold_config(ctx: Context, **kw) -> RetrainConfig:
    """The thresholds and adaptive stages' retraining: sequential (unless `kw` says otherwise),
    V_th learning at --vth-lr, their own activity-loss weight, no PCA reallocation."""
    base = dict(
        mode="sequential",
        train_thresholds=True,
        activity_eta=ctx.args.adaptive_activity_eta,
        realloc_every=0,
    )
    return ctx.retrain_config(**{**base, **kw})


def _thresholds(ctx: Context, model: SpikingBert, stage_dir: Path) -> dict:
    # The adaptive stage's retraining without its scale-down: the thresholds learn at the PCA
    # timesteps. Measured on SST-2 (docs/recipes.md): 1,800 such steps after the temporal
    # retraining lift the budget-0.7 model from 76.40 % (5 seeds) to 79.31 % (10 seeds) at the
    # same ACs. Which of its differences from temporal retraining (learned thresholds, no
    # reallocation, more steps) carries the gain is not separated; the activity loss at 1e-3
    # changes nothing measurable (79.14 %).
    return {"retrain": ctx.retrain(model, stage_dir, _threshold_config(ctx), "thresholds")}


def _adaptive(ctx: Context, model: SpikingBert, stage_dir: Path) -> dict:
    target = ctx.args.target_latency * model.config.t_conv
    timesteps, t_emb = temporal.scale_timesteps(model.timesteps, model.t_emb, target)
    model.set_timesteps(timesteps, t_emb)
    summary = ctx.retrain(model, stage_dir, _threshold_config(ctx), "adaptive")
    return {"retrain": summary, "target_latency": target}


def _adaptive_uniform(ctx: Context, model: SpikingBert, stage_dir: Path) -> dict:
    # Every sublayer at one T, the largest within the latency target, simulated unrolled: no
    # Bernoulli re-encoding between sublayers, and thresholds learnt to carry the spikes through
    # the 25 sublayers in series within T steps. On SST-2 (docs/recipes.md) 1,500 steps at
    # T = 13 take v11b from 72.25 % untrained at T = 16 to 79.59 % (its T_conv: 80.16 %), where
    # the sequential adaptive models at latency 13.6 reach 78.51 +- 0.60 (10 seeds). The source
    # is the unpruned model: from the budget-0.7 spatial-retrain model (78.78 %) the same
    # training reached 77.29 %.
    target = ctx.args.target_latency * model.config.t_conv
    T = max(1, math.floor(target + 1e-9))  # 0.29 * 100 is 28.999999999999996 in floats
    model.set_timesteps(uniform_timesteps(model.config.num_layers, T), t_emb=T)
    cfg = _threshold_config(ctx, mode="unrolled", sim_timesteps=T)
    summary = ctx.retrain(model, stage_dir, cfg, "adaptive-uniform")
    return {"retrain": summary, "target_latency": target}


def _reallocate(ctx: Context, model: SpikingBert, total_cost, budget: float) -> dict:
    model.eval()
    before = temporal.flatten_timesteps(model.timesteps, model.t_emb)
    sens = noise_alloc.noise_sensitivities(
        model,
        ctx.noise_calib,
        report=lambda name, drop: ctx.log(event="noise_sensitivity", sublayer=name, drop=drop),
    )
    flat = noise_alloc.allocate_by_noise(
        sens, total_cost, budget, model.config.t_conv, ctx.args.noise_floor
    )
    model.set_timesteps(*temporal.unflatten_timesteps(flat))
    return {
        "noise_alloc": {
            "budget": budget,
            "cost_before": total_cost(before),
            "cost_after": total_cost(flat),
            "timesteps_before": before,
            "error": sens["error"],
            "drop": sens["drop"],
        }
    }


def _noise_alloc(ctx: Context, model: SpikingBert, stage_dir: Path) -> dict:
    # Measured on SST-2 (docs/recipes.md): the budget-0.7 thresholds model re-spread from 39.54
    # to 41.73 % ACs went from 79.31 to 79.69 % (10 seeds) with no retraining, where the same
    # ACs spent by scaling every count (x 1.06) gave 79.39.
    acs = noise_alloc.acs_fraction_fn(model, ctx.seq_len)
    flat = temporal.flatten_timesteps(model.timesteps, model.t_emb)
    target = ctx.args.acs_target if ctx.args.acs_target is not None else acs(flat)
    return _reallocate(ctx, model, acs, target)


def _adaptive_alloc(ctx: Context, model: SpikingBert, stage_dir: Path) -> dict:
    # The whole latency target is spent, also where the adaptive stage's floors left some. No
    # retraining: on SST-2 (docs/recipes.md) the re-spread adaptive model went from 77.52 (5
    # seeds) to 78.51 % (10 seeds), and 1,200 steps of threshold retraining after an ad-hoc
    # re-spreading took it from 78.69 back to 78.03 (5 seeds).
    target = ctx.args.target_latency * model.config.t_conv
    return _reallocate(ctx, model, noise_alloc.latency_fn, target)


def _nothing(ctx: Context, model: SpikingBert, stage_dir: Path) -> dict:
    return {}


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("baseline", None, _nothing, "unrolled", "the input model at T_conv", False),
        Stage(
            "spatial-post",
            None,
            _spatial_post,
            "unrolled",
            "Fisher -> importance -> budgeted search -> refinement",
        ),
        Stage(
            "spatial-ablation",
            None,
            _spatial_ablation,
            "unrolled",
            "every importance variant (Table II), evaluated without retraining",
            False,
        ),
        Stage(
            "spatial-retrain",
            "spatial-post",
            _spatial_retrain,
            "unrolled",
            "relaxed masks + staged AC penalty",
        ),
        Stage(
            "temporal-post",
            "spatial-retrain",
            _temporal_post,
            "sequential",
            "PCA timesteps (Eq. 10)",
        ),
        Stage(
            "temporal-retrain",
            "temporal-post",
            _temporal_retrain,
            "sequential",
            "sequential mode, PCA reallocation, activity loss",
        ),
        Stage(
            "thresholds",
            "temporal-retrain",
            _thresholds,
            "sequential",
            "learnable thresholds at the temporal stage's timesteps",
        ),
        Stage(
            "adaptive",
            "temporal-retrain",
            _adaptive,
            "sequential",
            "learnable thresholds, scaled-down timesteps",
        ),
        Stage(
            "noise-alloc",
            "thresholds",
            _noise_alloc,
            "sequential",
            "timesteps re-spread by Bernoulli-noise sensitivity under the ACs target",
        ),
        Stage(
            "adaptive-alloc",
            "adaptive",
            _adaptive_alloc,
            "sequential",
            "timesteps re-spread by Bernoulli-noise sensitivity at the target latency",
        ),
        Stage(
            "adaptive-uniform",
            None,
            _adaptive_uniform,
            "unrolled",
            "learnable thresholds, every sublayer at the target latency's T (unpruned model)",
        ),
        Stage(
            "temporal-only-post",
            None,
            _temporal_post,
            "sequential",
            "PCA timesteps on the unpruned model",
        ),
        Stage(
            "temporal-only-retrain",
            "temporal-only-post",
            _temporal_retrain,
            "sequential",
            "temporal retraining of the unpruned model",
        ),
        Stage(
            "joint-post",
            "spatial-post",
            _temporal_post,
            "sequential",
            "spatial masks and PCA timesteps, no retraining between",
        ),
        Stage(
            "joint-retrain",
            "joint-post",
            _joint_retrain,
            "sequential",
            "one retraining of masks and weights in sequential mode",
        ),
    )
}

TWO_STAGE = (
    "baseline",
    "spatial-post",
    "spatial-retrain",
    "temporal-post",
    "temporal-retrain",
    "thresholds",
    "noise-alloc",
    "adaptive",
    "adaptive-alloc",
    "adaptive-uniform",
)
SCHEDULES: dict[str, tuple[str, ...]] = {
    "two-stage": TWO_STAGE,
    "spatial": ("baseline", "spatial-post", "spatial-retrain"),
    "temporal": ("temporal-post", "temporal-retrain"),
    "adaptive": ("adaptive", "adaptive-alloc", "adaptive-uniform"),
    "tables": TWO_STAGE
    + (
        "spatial-ablation",
        "temporal-only-post",
        "temporal-only-retrain",
        "joint-post",
        "joint-retrain",
    ),
}


def resolve_schedule(name: str) -> tuple[str, ...]:
    """A schedule name, a stage name, or a comma-separated list of stage names."""
    if name in SCHEDULES:
        return SCHEDULES[name]
    stages = tuple(s.strip() for s in name.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(
            f"unknown schedule or stage {name!r}; schedules: {', '.join(SCHEDULES)}; "
            f"stages: {', '.join(STAGES)}"
        )
    return stages


# -- evaluation and bookkeeping -----------------------------------------------------------------


def sublayer_asr(model: SpikingBert, batches: list[dict], mode: str, seed: int = 0) -> dict:
    """Mean ASR per sublayer over the real tokens of `batches` (token-weighted)."""
    sums: dict[str, float] = {}
    tokens = 0.0
    with torch.no_grad():
        for b in batches:
            out = model(
                b["input_ids"],
                b["attention_mask"],
                b["token_type_ids"],
                mode=mode,
                timesteps=None,  # the model's own: sequential lists or unrolled_timesteps
                seed=seed,
            )
            n = float(b["attention_mask"].sum())
            for name, v in out.asr.items():
                sums[name] = sums.get(name, 0.0) + v * n
            tokens += n
    return {name: s / tokens for name, s in sums.items()}


def evaluate_stage(ctx: Context, model: SpikingBert, mode: str) -> dict:
    """The stage's results: dev metrics with ACs %, Normalized #C and latency from
    `spikeinfer.evaluate`, per-sublayer ASRs on the calibration set, timesteps and kept units."""
    from ..engine import evaluate

    model.eval()
    r = evaluate(
        model,
        ctx.spec.name,
        glue_dir=ctx.args.glue_dir,
        batch_size=ctx.args.eval_batch_size,
        mode=mode,
        seed=ctx.args.seed,
        limit=ctx.args.eval_limit,
        tokenizer=ctx.tokenizer,
        progress=False,
    )
    r.pop("predictions", None)
    spec = ctx.spec
    return {
        "task": spec.name,
        "metric": spec.main_metric,
        "value": r[spec.main_metric],
        **{k: r[k] for k in spec.metrics},
        "acs_percent": r["acs_percent"],
        "normalized_c": r["normalized_c"],
        "latency": r["latency"],
        "energy_mj": r["energy_mj"],
        "mode": mode,
        "n_examples": r["n_examples"],
        "t_conv": model.config.t_conv,
        "timesteps": model.timesteps if mode == "sequential" else model.unrolled_timesteps,
        "t_emb": model.t_emb if mode == "sequential" else model.unrolled_timesteps,
        "heads_per_layer": [int(x) for x in (model.head_mask != 0).sum(1)],
        "neurons_per_layer": [int(x) for x in (model.neuron_mask != 0).sum(1)],
        "asr": sublayer_asr(model, ctx.calib, mode, ctx.args.seed),
        "eval": r,
    }


def _headline(m: dict) -> dict:
    return {k: m[k] for k in ("metric", "value", "acs_percent", "normalized_c", "latency")}


def _write_json(path: Path, data: dict):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _load_source(ctx: Context, stage: Stage) -> tuple[SpikingBert, str]:
    from ..checkpoint import load_checkpoint
    from ..engine import resolve_model_path

    if stage.source is not None:
        path = ctx.out / stage.source / "model"
        if (path / "config.json").exists():
            return load_checkpoint(path, ctx.device), str(path)
        ctx.log(
            event="source_fallback",
            stage=stage.name,
            wanted=str(path),
            using=str(ctx.args.model),
        )
    path = resolve_model_path(ctx.args.model)
    model = load_checkpoint(path, ctx.device)
    task = getattr(model, "checkpoint_meta", {}).get("task")
    if task and task != ctx.spec.name:
        raise ValueError(f"--model {path} was trained on {task!r}, not {ctx.spec.name!r}")
    return model, str(path)


def _barrier(ctx: Context):
    if ctx.info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def run_stage(ctx: Context, stage: Stage) -> dict:
    """Run one stage (or skip it under --resume when finished); returns its metrics."""
    from ..checkpoint import save_checkpoint

    stage_dir = ctx.out / stage.name
    metrics_path = stage_dir / METRICS_NAME
    if ctx.args.resume and metrics_path.exists():
        ctx.log(event="stage_skipped", stage=stage.name, reason="finished earlier")
        return json.loads(metrics_path.read_text())
    torch.manual_seed(ctx.args.seed)
    model, source = _load_source(ctx, stage)
    model.to_backend(ctx.backend)
    ctx.log(event="stage_start", stage=stage.name, source=source, backend=ctx.backend)
    start = time.perf_counter()
    details = stage.run(ctx, model, stage_dir)
    # The stage's own work (Fisher, search, PCA, retraining), not its evaluation; a resumed
    # retraining stage counts only the steps run by this invocation.
    run_seconds = time.perf_counter() - start
    metrics = {}
    if ctx.info.main:
        metrics = {
            "stage": stage.name,
            "description": stage.description,
            "source": source,
            "run_seconds": round(run_seconds, 1),
        }
        # Measured on the compacted model: what serving runs, and rates averaged over the units
        # that exist (a masked model's silent pruned units would dilute Normalized #C).
        served = compact(model) if stage.name != "spatial-ablation" else None
        if served is not None:
            metrics.update(evaluate_stage(ctx, served, stage.eval_mode))
        metrics.update(details)
        metrics["args"] = dict(asdict(ctx.args))
        stage_dir.mkdir(parents=True, exist_ok=True)
        if stage.saves_model:
            meta = dict(
                task=ctx.spec.name,
                label_names=list(ctx.spec.label_names),
                metrics=_headline(metrics),
                provenance={"stage": stage.name, "source": source, "schedule": ctx.args.schedule},
            )
            # The mode the stage is judged in is the one its model serves in (`eval` default).
            extra = {"mode": stage.eval_mode}
            save_checkpoint(model, stage_dir / "model", **meta, extra=extra)
            save_checkpoint(served, stage_dir / "compact", **meta, extra=extra)
        _write_json(metrics_path, metrics)
        if "value" in metrics:
            ctx.log(event="stage_done", stage=stage.name, **_headline(metrics))
    _barrier(ctx)
    return metrics


def run_schedule(args: PruneArgs) -> dict[str, dict]:
    """Run the stages of `args.schedule` in order; returns {stage: metrics}."""
    stages = resolve_schedule(args.schedule)
    ctx = Context(args)
    ctx.log(event="prune_start", task=ctx.spec.name, schedule=list(stages), backend=ctx.backend)
    return {name: run_stage(ctx, STAGES[name]) for name in stages}
