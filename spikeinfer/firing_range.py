"""Firing-range initialisation: move a teacher-initialised student's currents into [0, Vth].

A rate neuron passes a = clamp(I / Vth, 0, 1). Copied unchanged from the teacher, LayerNorm, key
and value outputs are centred on zero, so the clamp throws away about half of every one of them
before the next layer sees it (DESIGN section 9). This rewrites the student's parameters so that
each sublayer's rate becomes an affine image of the teacher's value v,

    a = s * v + c        (s, c from calibration: the [tail, 1 - tail] quantiles land on [0, 1])

and every consumer undoes the map, so up to the clamps the student computes the teacher's
function (the layers it kept):

    emb, O1, O2  LayerNorm gamma, beta -> s gamma, s beta + c, with one s per
                 sublayer (its rates enter residual sums, where every term must scale alike;
                 the next LayerNorm removes the common factor) and c per feature
    K, V         each output row: s_k (w_k . x + b_k) + c_k, s and c per feature
    Q            divided by s_K, so q . (s_K k + c_K) = q . k + (q . c_K): a constant per query,
                 which softmax ignores (attention-score KD should compare row-centred scores)
    A            probabilities sum to 1 over the keys, so A's current is s_V A_teacher + c_V
                 already (W_O takes the division)
    F            GELU's output cannot be scaled from inside; Vth_F becomes a quantile of it
                 (`ffn_threshold`): "all", the 1 - tail quantile of every output, which most
                 GELU outputs being negative puts at or under 0 for tails from about 0.2, so
                 Vth_F falls to its floor 1e-3, F fires for every positive value and W_2 (scaled
                 by Vth_F) silences the FFN at init; "positive", the 1 - tail quantile of the
                 positive outputs, the only ones that can fire
    consumers    of a = s v + c take W / s and b - W c / s; the O1 and O2 sums are multiplied
                 by the residual's s; the classifier reads a = s v + c of the last O2

For a 1-bit student the rewrite is exact for its latent weights; binarising a matrix whose
columns were scaled unevenly picks signs and scales of its own, so the 1-bit forward only
approximates it (the usual order, fp stages first, rewrites the full-precision student).

The tail trades the rate surrogate against the spiking simulation. Fitting the range compresses
each signal by s, while every step's spikes keep Bernoulli noise of about 0.5 and softmax,
LayerNorm and GELU act on each step's values: a narrow tail (0.02, s about 1/4) keeps the most in
the surrogate and nothing in a T = 32 simulation, a wide one (0.25) less in the surrogate and more
than a plain copy in the simulation (measurements: docs/recipes.md, "Firing-range
initialisation"). Training through the moments surrogate (`SpikingBert.surrogate(moments=True)`,
which models that noise) lets a narrow tail's spiking simulation follow its surrogate.

The calibration values are the student's rates without the clamp (`unclamped_rates`): with every
threshold at 1, the teacher's values.
"""

from __future__ import annotations

import torch

from . import ops
from .config import SUBLAYERS
from .model import SpikingBert

# Calibration tokens kept per sublayer (quantiles of [tokens, features] tensors).
MAX_TOKENS = 8192
# Elements sampled for a quantile over a whole sublayer (torch.quantile's input limit is 2^24).
MAX_SAMPLES = 1 << 20
# Rules for F's threshold (module docstring).
FFN_THRESHOLDS = ("all", "positive")
# Vth_F's floor: a threshold at or under 0 would fire on every step.
MIN_FFN_THRESHOLD = 1e-3


@torch.no_grad()
def unclamped_rates(student: SpikingBert, batch: dict) -> dict[str, torch.Tensor]:
    """Every sublayer's rate I / Vth without the clamp, [B, N, F] per name. For a student straight
    from the teacher (every Vth = 1) these are the teacher's values on the layers it kept."""
    E = student.embeddings(batch["input_ids"], batch["token_type_ids"])  # [B, N, D]
    mask_add = ops.attention_mask_additive(batch["attention_mask"], E.dtype)
    out = {"emb": E / student.threshold(0)}
    x = out["emb"][None]  # [1, B, N, D]: time-major with one step
    for l, block in enumerate(student.layers):
        base = 1 + len(SUBLAYERS) * l
        k = block.current_k(x) / student.threshold(base)
        v = block.current_v(x) / student.threshold(base + 1)
        a = block.current_a(x, k, v, mask_add) / student.threshold(base + 2)
        o1 = block.current_o1(a, x) / student.threshold(base + 3)
        f = block.current_f(o1) / student.threshold(base + 4)
        x = block.current_o2(f, o1) / student.threshold(base + 5)
        for name, t in zip(SUBLAYERS, (k, v, a, o1, f, x), strict=True):
            out[f"{l}.{name}"] = t[0]
    return out


def _sample(values: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    flat = values.reshape(-1)
    if flat.numel() <= n:
        return flat
    return flat[torch.randint(flat.numel(), (n,), generator=gen, device=flat.device)]


def _shared_scale(values, tail, gen):
    """One s for all features, c per feature centring each feature's median on 0.5."""
    median = values.median(0).values
    spread = _sample(values - median, MAX_SAMPLES, gen)
    lo, hi = spread.quantile(tail), spread.quantile(1 - tail)
    s = 1.0 / (hi - lo).clamp_min(1e-6)
    return s, 0.5 - s * median


def _feature_scale(values, tail):
    """s and c per feature mapping its [tail, 1 - tail] quantiles onto [0, 1]."""
    lo, hi = values.quantile(tail, dim=0), values.quantile(1 - tail, dim=0)
    s = 1.0 / (hi - lo).clamp_min(1e-6)
    return s, -lo * s


@torch.no_grad()
def fit_firing_range(
    student: SpikingBert, batches, tail: float = 0.02, seed: int = 0, ffn_threshold: str = "all"
) -> dict:
    """Rewrite a teacher-initialised `student` in place (see the module docstring) from the
    currents of `batches` (dicts with input_ids, attention_mask, token_type_ids). Returns, per
    sublayer, the fraction of calibration values that now fall strictly inside the firing range.

    Apply before training and before any pruning: masked or compacted students are refused."""
    if not 0.0 < tail < 0.5:
        raise ValueError(f"tail must be in (0, 0.5), got {tail}")
    if ffn_threshold not in FFN_THRESHOLDS:
        raise ValueError(f"ffn_threshold must be one of {FFN_THRESHOLDS}, got {ffn_threshold!r}")
    for block in student.layers:
        if any(p.frozen for p in block.projections()):
            raise ValueError("fit_firing_range needs latent weights; this student is frozen")
        if block.num_heads != student.config.num_heads or (
            block.num_neurons != student.config.intermediate_size
        ):
            raise ValueError("fit_firing_range needs the dense student, not a compacted one")
    if not (bool((student.head_mask == 1).all()) and bool((student.neuron_mask == 1).all())):
        raise ValueError("fit_firing_range needs unmasked heads and neurons")
    if not bool((student.v_th == 1).all()):
        raise ValueError(
            "fit_firing_range needs every threshold at 1 (a student straight from the teacher); "
            f"got {student.v_th.tolist()}"
        )
    gen = torch.Generator().manual_seed(seed)
    collected: dict[str, list[torch.Tensor]] = {}
    tokens = 0
    # A 1-bit student's latent weights are the teacher's: calibrate on them, not on their signs.
    projections = [p for block in student.layers for p in block.projections()]
    binary = [p.binary for p in projections]
    for p in projections:
        p.binary = False
    try:
        for batch in batches:
            valid = batch["attention_mask"].bool()
            for name, t in unclamped_rates(student, batch).items():
                collected.setdefault(name, []).append(t[valid].float().cpu())
            tokens += int(batch["attention_mask"].sum())
            if tokens >= MAX_TOKENS:
                break
    finally:
        for p, flag in zip(projections, binary, strict=True):
            p.binary = flag
    if not collected:
        raise ValueError("fit_firing_range needs at least one calibration batch")
    values = {name: torch.cat(parts)[:MAX_TOKENS] for name, parts in collected.items()}
    device = student.v_th.device
    maps = {}  # name -> (s, c) of rate = s * value + c, on `device`

    def affine(name, shared):
        s, c = (
            _shared_scale(values[name], tail, gen) if shared else _feature_scale(values[name], tail)
        )
        maps[name] = (s.to(device), c.to(device))
        return maps[name]

    def scale_layer_norm(ln, s, c):
        ln.weight.mul_(s)
        ln.bias.mul_(s).add_(c)

    s_in, c_in = affine("emb", shared=True)
    scale_layer_norm(student.embeddings.LayerNorm, s_in, c_in)
    for l, block in enumerate(student.layers):
        base = 1 + len(SUBLAYERS) * l
        s_k, c_k = affine(f"{l}.K", shared=False)
        s_v, c_v = affine(f"{l}.V", shared=False)
        # Projections from x = (a - c_in) / s_in: W x + b = (W / s_in) a + (b - W c_in / s_in).
        w_q, b_q = block.q_proj.weight.clone(), block.q_proj.bias.clone()
        for proj, s, c in ((block.k_proj, s_k, c_k), (block.v_proj, s_v, c_v)):
            w, b = proj.weight.clone(), proj.bias.clone()
            proj.weight.copy_(s[:, None] * w / s_in)
            proj.bias.copy_(s * (b - w @ c_in / s_in) + c)
        # The scores see rates a_K = s_K k + c_K, so q / s_K keeps q . k.
        block.q_proj.weight.copy_(w_q / s_in / s_k[:, None])
        block.q_proj.bias.copy_((b_q - w_q @ c_in / s_in) / s_k)
        # A's current is P . a_V = s_V A + c_V: probabilities sum to 1 over the keys.
        maps[f"{l}.A"] = maps[f"{l}.V"]
        # O1 = LN(W_O A + b_O + x), A = (a_A - c_V) / s_V, x = (a_in - c_in) / s_in, times s_in.
        w_o, b_o = block.o_proj.weight.clone(), block.o_proj.bias.clone()
        block.o_proj.weight.copy_(s_in * w_o / s_v[None, :])
        block.o_proj.bias.copy_(s_in * (b_o - w_o @ (c_v / s_v)) - c_in)
        s_1, c_1 = affine(f"{l}.O1", shared=True)
        scale_layer_norm(block.ln_o1, s_1, c_1)
        w_1, b_1 = block.ffn1.weight.clone(), block.ffn1.bias.clone()
        block.ffn1.weight.copy_(w_1 / s_1)
        block.ffn1.bias.copy_(b_1 - w_1 @ (c_1 / s_1))
        # F's rate is GELU(.) / Vth_F: the threshold takes the 1 - tail quantile.
        gelu = values[f"{l}.F"]
        if ffn_threshold == "positive":
            gelu = gelu[gelu > 0]
            if gelu.numel() == 0:
                raise ValueError(f"block {l}: no positive GELU output in the calibration batches")
        theta_f = _sample(gelu, MAX_SAMPLES, gen).quantile(1 - tail).clamp_min(MIN_FFN_THRESHOLD)
        theta_f = theta_f.to(device)
        student.v_th[base + SUBLAYERS.index("F")] = theta_f
        maps[f"{l}.F"] = (1.0 / theta_f, torch.zeros((), device=device))
        # O2 = LN(W_2 F + b_2 + O1) with F = Vth_F a_F and O1 = (a_O1 - c_1) / s_1, times s_1.
        w_2, b_2 = block.ffn2.weight.clone(), block.ffn2.bias.clone()
        block.ffn2.weight.copy_(s_1 * w_2 * theta_f)
        block.ffn2.bias.copy_(s_1 * b_2 - c_1)
        s_2, c_2 = affine(f"{l}.O2", shared=True)
        scale_layer_norm(block.ln_o2, s_2, c_2)
        s_in, c_in = s_2, c_2
    w_c, b_c = student.classifier.weight.clone(), student.classifier.bias.clone()
    student.classifier.weight.copy_(w_c / s_in)
    student.classifier.bias.copy_(b_c - w_c @ (c_in / s_in))
    inside = {}
    for name, v in values.items():
        s, c = maps[name]
        a = s.cpu() * v + c.cpu()
        inside[name] = round(float(((a > 0) & (a < 1)).float().mean()), 4)
    return inside
