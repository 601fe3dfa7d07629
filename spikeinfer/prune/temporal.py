"""Temporal pruning: timesteps per sublayer from the principal components of ASR traces.

For sublayer l, the running ASR over T_conv steps forms a T x features matrix; c_l is the number of
principal components that explain the variance fraction `variance` (default 0.99999). Eq. 10 of
the paper then allocates

    t_l = ceil( b^(c_l) / max_j b^(c_j) * T_conv )          (b > 1, default 1.02)

so the sublayer whose activity is most complex in time keeps T_conv steps and simpler ones fewer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


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
