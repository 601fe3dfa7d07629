"""Noise-aware timestep allocation: spend a cost budget where the sequential mode's Bernoulli
re-encoding moves the output most.

In `sequential` mode sublayer l draws its input spikes afresh for its t_l steps, so the rate it
passes on carries an error whose variance falls as 1/t_l. To first order the output error is

    E(t) = E_inf + sum_l s_l / t_l

with E the mean squared logit error against a reference run at `reference_factor` x every count.
Doubling t_l alone measures s_l: E(t) - E(t with t_l doubled) = s_l / (2 t_l), with common
random numbers for free, since the counter-based generator gives the doubled run the same first
t_l draws. Minimising sum_l s_l / t_l under a linear cost sum_l c_l t_l <= B (ACs: c_l the ACs of
one more step of sublayer l; mean latency: c_l = 1) gives

    t_l = lambda * sqrt(s_l / c_l),    rounded and clamped to [1, T_conv],

lambda the largest for which the counts fit the budget (bisection; the cost grows with lambda),
then single steps where each buys the most error per unit of cost until the budget is spent.
Under an ACs budget the embedding neurons (no ACs) keep T_conv. A measured drop under
`floor` x E counts as that floor: a near-zero or negative estimate is noise at the measurement's
resolution, and must not starve its sublayer of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .. import cost
from .temporal import flatten_timesteps, sublayer_names, unflatten_timesteps


def _logits(model, batches, flat: Sequence[int], seed: int) -> torch.Tensor:
    timesteps, t_emb = unflatten_timesteps(flat)
    model.set_timesteps(timesteps, t_emb)
    with torch.no_grad():
        return torch.cat(
            [
                model(
                    b["input_ids"],
                    b["attention_mask"],
                    b["token_type_ids"],
                    mode="sequential",
                    seed=seed,
                )
                .logits.float()
                .cpu()
                for b in batches
            ]
        )


def noise_sensitivities(
    model,
    batches: list[dict],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    reference_factor: int = 4,
    reference_seeds: Sequence[int] = (1000, 1001),
    report: Callable[[str, float], None] | None = None,
) -> dict:
    """Per sublayer, the output error removed by doubling its timesteps alone.

    Returns {"error": E at the model's timesteps, "drop": {name: E - E(t_l doubled)},
    "timesteps": the flat counts measured at}; `report(name, drop)` is called as each sublayer
    is measured. The model's timesteps are restored."""
    if not batches:
        raise ValueError("noise_sensitivities needs at least one calibration batch")
    if reference_factor < 2:
        raise ValueError(f"reference_factor must be >= 2, got {reference_factor}")
    saved = (model.timesteps, model.t_emb)
    base = flatten_timesteps(*saved)
    try:
        longer = [reference_factor * t for t in base]
        reference = torch.stack([_logits(model, batches, longer, s) for s in reference_seeds])
        reference = reference.mean(0)

        def error(flat) -> float:
            runs = [_logits(model, batches, flat, s) for s in seeds]
            return sum(float(((x - reference) ** 2).sum(-1).mean()) for x in runs) / len(runs)

        base_error = error(base)
        drop = {}
        for i, name in enumerate(sublayer_names(model.config.num_layers)):
            doubled = list(base)
            doubled[i] *= 2
            drop[name] = base_error - error(doubled)
            if report is not None:
                report(name, drop[name])
    finally:
        model.set_timesteps(*saved)
    return {"error": base_error, "drop": drop, "timesteps": base}


def allocate_by_noise(
    sensitivities: dict,
    total_cost: Callable[[list[int]], float],
    budget: float,
    t_conv: int,
    floor: float = 0.01,
) -> list[int]:
    """Flat counts t_l = lambda sqrt(s_l / c_l) (module docstring) with the largest lambda whose
    `total_cost(counts)` is at most `budget`; the c_l are what one more step of each sublayer
    adds to `total_cost` at the measured counts, and a sublayer with c_l = 0 gets t_conv."""
    base = sensitivities["timesteps"]
    names = list(sensitivities["drop"])
    if len(base) != len(names):
        raise ValueError(f"{len(names)} sensitivities and {len(base)} timesteps must agree")
    costs = step_costs(total_cost, base)
    least = floor * sensitivities["error"]
    weights = []
    for name, t, c in zip(names, base, costs, strict=True):
        s = 2.0 * t * max(sensitivities["drop"][name], least)
        weights.append(math.inf if c <= 0 else math.sqrt(s / c))

    def counts(lam: float) -> list[int]:
        return [t_conv if math.isinf(w) else min(t_conv, max(1, round(lam * w))) for w in weights]

    if total_cost(counts(0.0)) > budget:
        raise ValueError(
            f"budget {budget:.4g} is below the cost of one step per sublayer "
            f"({total_cost(counts(0.0)):.4g})"
        )
    lo, hi = 0.0, 1.0
    while total_cost(counts(hi)) <= budget and hi < 1e12:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if total_cost(counts(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    flat = counts(lo)
    # Rounding leaves part of the budget unspent: add single steps where each buys the most
    # error per unit of cost, while they fit.
    while True:
        best, best_gain = None, 0.0
        for i, (w, c) in enumerate(zip(weights, costs, strict=True)):
            if flat[i] >= t_conv or c <= 0:
                continue
            more = flat[:i] + [flat[i] + 1] + flat[i + 1 :]
            if total_cost(more) > budget:
                continue
            # s_l (1/t - 1/(t+1)) / c_l, with s_l / c_l = w^2
            gain = w * w / (flat[i] * (flat[i] + 1))
            if gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            return flat
        flat[best] += 1


def acs_fraction_fn(model, seq_len: float) -> Callable[[list[int]], float]:
    """ACs of flat counts as a fraction of the dense model at T_conv (masks of `model`)."""
    n = max(1, round(seq_len))
    dense = cost.dense_ac_count(model.config, n)

    def fraction(flat: list[int]) -> float:
        timesteps, _ = unflatten_timesteps(flat)
        return cost.ac_count(model.config, model.head_mask, model.neuron_mask, timesteps, n) / dense

    return fraction


def latency_fn(flat: list[int]) -> float:
    """Mean timesteps over the flat counts: `cost.latency` with the embedding included."""
    return sum(flat) / len(flat)


def step_costs(total_cost: Callable[[list[int]], float], flat: Sequence[int]) -> list[float]:
    """c_l: what one more step of sublayer l adds to `total_cost` (both costs are linear)."""
    here = total_cost(list(flat))
    out = []
    for i in range(len(flat)):
        more = list(flat)
        more[i] += 1
        out.append(total_cost(more) - here)
    return out
