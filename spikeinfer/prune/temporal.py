"""Temporal pruning: timesteps per sublayer from the principal components of ASR traces.

For sublayer l, the running ASR over T_conv steps forms a T x features matrix; c_l is the number of
principal components that explain the variance fraction `variance` (default 0.99999). Eq. 10 of
the paper then allocates

    t_l = ceil( b^(c_l) / max_j b^(c_j) * T_conv )          (b > 1, default 1.02)

so the sublayer whose activity is most complex in time keeps T_conv steps and simpler ones fewer.
For a whole model the traces are token means over a calibration set (`collect_traces`), Eq. 10 runs
over all 1 + 6 L sublayers at once (embedding neurons included), and `scale_timesteps` shrinks the
list by one factor for the adaptive-threshold stage (mean latency at most a target).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from ..config import SUBLAYERS, sublayer_names


def allocate_timesteps(
    importance: Sequence[float], base: float = 1.02, t_conv: int = 85
) -> list[int]:
    """Eq. 10: timesteps per sublayer from importances c_l (e.g. PCA component counts)."""
    if base <= 1.0:
        raise ValueError(f"base must be > 1, got {base}")
    if t_conv < 1:
        raise ValueError(f"t_conv must be >= 1, got {t_conv}")
    values = [float(c) for c in importance]
    if not values:
        return []
    top = max(values)
    # b^(c - max) instead of b^c / b^max: the same ratio without overflow for large counts.
    return [max(1, math.ceil(base ** (c - top) * t_conv - 1e-9)) for c in values]


def pca_components(trace: torch.Tensor, variance: float = 0.99999) -> int:
    """Principal components of a [T, features] trace needed to explain `variance` of it."""
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    if trace.dim() != 2:
        raise ValueError(f"trace must be [T, features], got {tuple(trace.shape)}")
    x = trace.double() - trace.double().mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    energy = s**2
    total = energy.sum()
    if total <= 0:
        return 1  # a constant trace is described by its mean alone
    explained = torch.cumsum(energy, 0) / total
    return (
        int(
            torch.searchsorted(
                explained, torch.tensor(variance, dtype=explained.dtype) - 1e-12
            ).item()
        )
        + 1
    )


# -- the whole model ----------------------------------------------------------------------------


def collect_traces(model, batches: Iterable[dict], t_conv: int) -> dict[str, torch.Tensor]:
    """Per sublayer, the running-ASR trace [t_conv, features] over a calibration set.

    Each batch's unrolled simulation gives traces averaged over its real tokens; batches are
    combined weighted by their real-token counts, so the result is the token mean over the set.
    """
    sums: dict[str, torch.Tensor] = {}
    tokens = 0.0
    with torch.no_grad():
        for b in batches:
            out = model(
                b["input_ids"],
                b["attention_mask"],
                b["token_type_ids"],
                timesteps=t_conv,
                record_traces=True,
            )
            n = float(b["attention_mask"].sum())
            for name, trace in out.traces.items():
                t = trace.double().cpu() * n
                sums[name] = sums[name] + t if name in sums else t
            tokens += n
    if not sums:
        raise ValueError("collect_traces got no batches; pass at least one calibration batch")
    return {name: (s / tokens).float() for name, s in sums.items()}


def pca_counts(traces: Mapping[str, torch.Tensor], variance: float = 0.99999) -> dict[str, int]:
    """c_l per sublayer; a sublayer with no units left (all pruned) counts 0 components."""
    return {
        name: (0 if trace.shape[-1] == 0 else pca_components(trace, variance))
        for name, trace in traces.items()
    }


def flatten_timesteps(timesteps, t_emb: int) -> list[int]:
    return [int(t_emb)] + [int(t) for row in timesteps for t in row]


def unflatten_timesteps(flat: Sequence[int]) -> tuple[list[list[int]], int]:
    k = len(SUBLAYERS)
    rows = [flat[1 + k * l : 1 + k * (l + 1)] for l in range((len(flat) - 1) // k)]
    return [[int(t) for t in row] for row in rows], int(flat[0])


def allocate_model_timesteps(
    counts: Mapping[str, int], num_layers: int, base: float = 1.02, t_conv: int = 85
) -> tuple[list[list[int]], int]:
    """Eq. 10 over every sublayer of the model at once (embedding neurons included), so only the
    most complex sublayer anywhere keeps T_conv. Returns (timesteps [L][6], t_emb)."""
    names = sublayer_names(num_layers)
    missing = [n for n in names if n not in counts]
    if missing:
        raise ValueError(f"no PCA count for sublayers {missing[:6]}")
    return unflatten_timesteps(allocate_timesteps([counts[n] for n in names], base, t_conv))


def temporal_prune(
    model,
    batches: Iterable[dict],
    *,
    variance: float = 0.99999,
    base: float = 1.02,
    t_conv: int | None = None,
) -> dict:
    """Temporal post-training: traces at T_conv (unrolled) -> PCA counts -> Eq. 10; installs the
    timesteps on `model` and returns {pca_components, timesteps, t_emb}."""
    t_conv = model.config.t_conv if t_conv is None else int(t_conv)
    counts = pca_counts(collect_traces(model, batches, t_conv), variance)
    timesteps, t_emb = allocate_model_timesteps(counts, model.config.num_layers, base, t_conv)
    model.set_timesteps(timesteps, t_emb)
    return {"pca_components": counts, "timesteps": timesteps, "t_emb": t_emb}


def scale_timesteps(timesteps, t_emb: int, target_latency: float) -> tuple[list[list[int]], int]:
    """Shrink every count by one factor so the mean over sublayers (embedding included) is at
    most `target_latency` (floors, never below 1 step; already-short lists are kept)."""
    values = flatten_timesteps(timesteps, t_emb)
    mean = sum(values) / len(values)
    if mean <= target_latency:
        return unflatten_timesteps(values)
    factor = target_latency / mean
    return unflatten_timesteps([max(1, math.floor(v * factor)) for v in values])
