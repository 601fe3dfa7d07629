"""Retraining after pruning (DESIGN sections 7-8): relaxed masks with an AC penalty, sequential-mode
training with PCA reallocation and an activity loss, learnable thresholds.

Every step runs the spiking network without gradients and the rate surrogate with the SNN's ASRs
swapped in (values from the SNN, gradients from a = clamp(I / V_th, 0, 1)), as distillation does.

Relaxed masks (spatial retraining): each head / neuron has a logit z and the mask used is

    m = 1[z > 0] + sigmoid(z) - stopgrad(sigmoid(z))

(binary value, sigmoid gradient), so the network always runs pruned while the logits learn. The
loss, for the first `penalty_fraction` of the steps, is

    L = L_pred + lambda * M(m, t) / M(dense)          (cost.ac_cost, differentiable in m)

and plain L_pred afterwards (staged), letting the weights recover under the final masks. Units
may come back during training; if the final masks cost more than the budget, the most confident
units (largest logits) that fit are kept, by the same search as post-training.

Temporal retraining runs the simulation in `sequential` mode at the model's per-sublayer
timesteps, re-running PCA (Eq. 10) on calibration traces every `realloc_every` steps, with

    L = L_pred + eta * sum_l mean_b || a_l ||_2        a_l: block l's O2 rates over real tokens

Adaptive thresholds make V_th (one per sublayer) a trained parameter: dA/dV_th = -I / V_th^2
inside the firing range, so thresholds move to keep the shortened simulation informative.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import cost
from ..model import PROJECTIONS, SpikingBert
from ..quant import latent_from_binary
from . import temporal
from .spatial import budget_acs, present_units, search_masks, task_loss, unit_costs

HISTORY_NAME = "timesteps_history.json"


# -- making a loaded model trainable ------------------------------------------------------------


def make_trainable(model: SpikingBert) -> SpikingBert:
    """Give frozen 1-bit projections (loaded checkpoints, compacted models) latent weights again,
    in place, so they can be trained with the straight-through estimator."""
    for block in model.layers:
        for name in PROJECTIONS:
            proj = getattr(block, name)
            if proj.frozen:
                weight = latent_from_binary(proj.signs, proj.alpha, proj.per_row)
                proj.signs = None
                proj.alpha = None
                proj.weight = nn.Parameter(weight.detach().clone())
                proj._cache = None
    return model


# -- relaxed masks ------------------------------------------------------------------------------


def _straight_through(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    soft = torch.sigmoid(logits)
    hard = (logits > 0).to(soft.dtype)
    return (hard + soft - soft.detach()) * allowed


class RelaxedMasks(nn.Module):
    """Learnable head / neuron logits (+init for kept units, -init for masked ones, which may come
    back); units compacted away (`allowed` False) stay 0 with no gradient."""

    def __init__(self, model: SpikingBert, init: float = 2.0):
        super().__init__()
        h_allowed, n_allowed = present_units(model)
        device = model.head_mask.device
        kept_h, kept_n = model.head_mask != 0, model.neuron_mask != 0
        self.head_logits = nn.Parameter(torch.where(kept_h, init, -init).float())
        self.neuron_logits = nn.Parameter(torch.where(kept_n, init, -init).float())
        self.register_buffer("head_allowed", h_allowed.float().to(device))
        self.register_buffer("neuron_allowed", n_allowed.float().to(device))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            _straight_through(self.head_logits, self.head_allowed),
            _straight_through(self.neuron_logits, self.neuron_allowed),
        )

    @torch.no_grad()
    def hard(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            (self.head_logits > 0).float() * self.head_allowed,
            (self.neuron_logits > 0).float() * self.neuron_allowed,
        )


def project_to_budget(
    model: SpikingBert, masks: RelaxedMasks, fraction: float, seq_len: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hard masks, or, if their ACs exceed fraction x dense, the most confident kept units
    (largest logits, traded heads against neurons as in the search) that fit."""
    hm, nm = (m.cpu() for m in masks.hard())
    h_cost, n_cost = unit_costs(model, seq_len)
    allowed = budget_acs(model, seq_len, fraction)
    acs = sum(
        int(hm[l].sum()) * h_cost[l] + int(nm[l].sum()) * n_cost[l] for l in range(len(h_cost))
    )
    if acs <= allowed:
        return hm, nm
    h_imp = torch.sigmoid(masks.head_logits.detach().double().cpu())
    n_imp = torch.sigmoid(masks.neuron_logits.detach().double().cpu())
    return search_masks(h_imp, n_imp, h_cost, n_cost, allowed, hm.bool(), nm.bool())


# -- losses -------------------------------------------------------------------------------------


def activity_loss(rates: dict, attention_mask: torch.Tensor, num_layers: int) -> torch.Tensor:
    """sum_l mean_b || a_l[b] ||_2 over block-output (O2) rates at real tokens."""
    valid = attention_mask.to(rates["emb"].dtype)[..., None]
    total = rates["emb"].new_zeros(())
    for l in range(num_layers):
        a = rates[f"{l}.O2"] * valid
        # +eps: the norm's gradient is undefined at an all-silent example.
        total = total + (a.pow(2).sum((1, 2)) + 1e-12).sqrt().mean()
    return total


def ac_penalty(model: SpikingBert, head_mask, neuron_mask, seq_len: float) -> torch.Tensor:
    """M(h, n, t) / M(dense): relaxed-mask ACs at the model's timesteps over dense at T_conv."""
    n = max(1, round(seq_len))
    m = cost.ac_cost(model.config, head_mask, neuron_mask, model.timesteps, n)
    return (m / cost.dense_ac_count(model.config, n)).float()


# -- the retraining loop ------------------------------------------------------------------------


@dataclass
class RetrainConfig:
    """What a retraining stage trains and how.

    mode: simulation mode of the no-grad SNN run ("unrolled" at `sim_timesteps`, or
    "sequential" at the model's per-sublayer timesteps). relax_masks: learn the masks (spatial).
    ac_lambda / penalty_fraction: AC penalty weight and the share of steps it is on.
    budget: final relaxed masks are cut back to this ACs fraction when they grew past it.
    activity_eta: weight of the activity loss. realloc_every: steps between PCA reallocations
    (0: never), with `variance`, `base` and the calibration batches. train_thresholds: adaptive
    V_th with its own learning rate `vth_lr`.
    """

    mode: str = "unrolled"
    sim_timesteps: int = 32
    relax_masks: bool = False
    mask_init: float = 2.0
    mask_lr: float = 1e-2
    ac_lambda: float = 1.0
    penalty_fraction: float = 0.5
    activity_eta: float = 0.0
    realloc_every: int = 0
    variance: float = 0.99999
    base: float = 1.02
    budget: float | None = None  # relaxed masks: project the final masks into this ACs budget
    train_thresholds: bool = False
    vth_lr: float = 1e-3
    seq_len: float = 32.0


class RetrainModule(nn.Module):
    """The trainable part: the student and (spatial retraining) its relaxed masks."""

    def __init__(self, model: SpikingBert, masks: RelaxedMasks | None):
        super().__init__()
        self.model = model
        self.masks = masks

    def current_masks(self):
        if self.masks is None:
            return self.model.head_mask, self.model.neuron_mask
        return self.masks()

    def forward(self, batch, snn_rates):
        hm, nm = self.current_masks()
        out = self.model.surrogate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            snn_rates=snn_rates,
            head_mask=hm,
            neuron_mask=nm,
        )
        return out.logits, out.rates, hm, nm


def _param_groups(module: RetrainModule, lr: float, cfg: RetrainConfig) -> list[dict]:
    model = module.model
    weights = [p for n, p in model.named_parameters() if n != "v_th" and p.requires_grad]
    groups = [{"params": weights, "lr": lr, "weight_decay": 0.01}]
    if module.masks is not None:
        groups.append(
            {"params": list(module.masks.parameters()), "lr": cfg.mask_lr, "weight_decay": 0.0}
        )
    if cfg.train_thresholds:
        groups.append({"params": [model.v_th], "lr": cfg.vth_lr, "weight_decay": 0.0})
    return groups


class _TimestepHistory:
    """Reallocations as [{"step", "timesteps", "t_emb"}] in the stage folder, so a resumed run
    continues with the timesteps that were in force at its restart step."""

    def __init__(self, folder: Path, enabled: bool, resume: bool):
        self.path, self.enabled = folder / HISTORY_NAME, enabled
        keep = resume and self.path.exists()
        self.entries = json.loads(self.path.read_text()) if keep else []

    def record(self, step: int, timesteps, t_emb: int):
        self.entries = [e for e in self.entries if e["step"] < step]
        self.entries.append({"step": step, "timesteps": timesteps, "t_emb": t_emb})
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries))
            tmp.replace(self.path)

    def restore(self, model: SpikingBert, before_step: int) -> bool:
        past = [e for e in self.entries if e["step"] < before_step]
        if past:
            model.set_timesteps(past[-1]["timesteps"], past[-1]["t_emb"])
        return bool(past)


def retrain(
    model: SpikingBert,
    cfg: RetrainConfig,
    *,
    train,
    collate_fn: Callable[[list[int]], dict],
    out: Path,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    resume: bool,
    info,
    regression: bool,
    teacher_logits: Callable[[dict], torch.Tensor] | None = None,
    calib: list[dict] | None = None,
    save_every: int = 200,
    log=None,
    desc: str = "retrain",
) -> dict:
    """Retrain `model` in place (through `train.run_loop`, so resumable from `out`); installs
    the final binary masks and returns a summary (steps, final timesteps, masks kept).

    `train`: the tokenized training set (`data.Encoded`); `collate_fn(indices)` gives a device
    batch; `teacher_logits(batch)` switches L_pred to prediction KD; `calib` are the batches
    PCA reallocation runs on.
    """
    from ..distill import prediction_kd_loss
    from ..train import linear_warmup_schedule, run_loop

    if cfg.realloc_every and not calib:
        raise ValueError("PCA reallocation needs calibration batches")
    make_trainable(model)
    # Frozen in every training stage, as in distillation: checkpoints then reference the teacher
    # package's table by hash instead of storing 47 MB of it.
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    model.v_th.requires_grad_(cfg.train_thresholds)
    masks = RelaxedMasks(model, cfg.mask_init) if cfg.relax_masks else None
    if masks is not None:
        masks.to(model.head_mask.device)
    module = RetrainModule(model, masks)
    ddp = module
    if info.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(module)
    optimizer = torch.optim.AdamW(_param_groups(module, lr, cfg), lr=lr)
    scheduler = linear_warmup_schedule(optimizer, steps, 0.06)
    penalty_steps = int(cfg.penalty_fraction * steps) if cfg.relax_masks else 0
    history = _TimestepHistory(out, info.main, resume)
    first_call = [True]

    def reallocate(step):
        was, saved = model.training, (model.head_mask, model.neuron_mask)
        if masks is not None:  # PCA of the network as it is now pruned
            model.head_mask, model.neuron_mask = masks.hard()
        model.eval()
        alloc = temporal.temporal_prune(model, calib, variance=cfg.variance, base=cfg.base)
        model.train(was)
        model.head_mask, model.neuron_mask = saved
        history.record(step, alloc["timesteps"], alloc["t_emb"])
        if log:
            log(
                event="realloc",
                stage=desc,
                step=step,
                latency=cost.latency(alloc["timesteps"], alloc["t_emb"]),
                timesteps=alloc["timesteps"],
            )

    def step_fn(indices, step):
        if first_call[0]:
            first_call[0] = False
            history.restore(model, step)
        if cfg.realloc_every and step > 0 and step % cfg.realloc_every == 0:
            reallocate(step)
        b = collate_fn(indices)
        hard_h, hard_n = masks.hard() if masks is not None else (None, None)
        with torch.no_grad():
            snn = model(
                b["input_ids"],
                b["attention_mask"],
                b["token_type_ids"],
                mode=cfg.mode,
                timesteps=cfg.sim_timesteps if cfg.mode == "unrolled" else None,
                seed=seed * 1_000_003 + step,
                head_mask=hard_h,
                neuron_mask=hard_n,
            )
        logits, rates, hm, nm = ddp(b, snn.rates)
        if teacher_logits is not None:
            loss = prediction_kd_loss(logits, teacher_logits(b), b["labels"], regression)
        else:
            loss = task_loss(logits, b["labels"], regression)
        parts = {"pred": loss.item()}
        if step < penalty_steps:
            penalty = ac_penalty(model, hm, nm, cfg.seq_len)
            loss = loss + cfg.ac_lambda * penalty
            parts["acs"] = penalty.item()
        if cfg.activity_eta:
            act = activity_loss(rates, b["attention_mask"], model.config.num_layers)
            loss = loss + cfg.activity_eta * act
            parts["activity"] = act.item()
        loss.backward()
        return {"loss": loss.item(), **parts}

    run_loop(
        out=out,
        module=module,
        optimizer=optimizer,
        scheduler=scheduler,
        step_fn=step_fn,
        lengths=train.lengths,
        batch_size=batch_size,
        total_steps=steps,
        seed=seed,
        info=info,
        resume=resume,
        save_every=save_every,
        desc=desc,
        log=log,
    )
    history.restore(model, steps)  # a run resumed after its end never called step_fn
    if masks is not None:
        if cfg.budget is not None:
            hard_h, hard_n = project_to_budget(model, masks, cfg.budget, cfg.seq_len)
        else:
            hard_h, hard_n = masks.hard()
        device = model.head_mask.device
        model.head_mask, model.neuron_mask = hard_h.to(device), hard_n.to(device)
    model.v_th.requires_grad_(False)
    model.eval()
    return {
        "steps": steps,
        "timesteps": model.timesteps,
        "t_emb": model.t_emb,
        "thresholds": [round(float(v), 6) for v in model.v_th],
        "heads_per_layer": [int(x) for x in (model.head_mask != 0).sum(1)],
        "neurons_per_layer": [int(x) for x in (model.neuron_mask != 0).sum(1)],
        "reallocations": len(history.entries),
    }
