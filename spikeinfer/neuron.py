"""Integrate-and-fire neurons with soft reset (DESIGN section 1).

For each neuron, membrane V starts at 0 and for t = 0 .. T-1:

    H[t] = leak * V[t-1] + I[t]        # charge (leak = 1 is IF)
    S[t] = H[t] >= v_th                # fire on >= (ties fire); > when fire_on_ge is False
    V[t] = H[t] - v_th * S[t]          # soft reset by subtraction

Tensors are time-major: currents and spikes are [T, ...]. The per-step update `if_step` is the one
place this arithmetic lives; the multi-step scan calls it, so both reference flavours agree bit for
bit. This is the pure-torch reference the Triton and C++ neuron scans are checked against.
"""

from __future__ import annotations

import torch


def if_step(
    current: torch.Tensor, v: torch.Tensor, v_th=1.0, leak: float = 1.0, fire_on_ge: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One timestep: returns (spikes, new membrane). `v_th` may be a float or a 0-d tensor."""
    h = v + current if leak == 1.0 else leak * v + current
    fired = h >= v_th if fire_on_ge else h > v_th
    s = fired.to(current.dtype)
    return s, h - v_th * s


def if_multistep(
    current: torch.Tensor,
    v_th=1.0,
    leak: float = 1.0,
    *,
    fire_on_ge: bool = True,
    return_membrane: bool = False,
):
    """Run the neuron over all timesteps of `current` [T, ...]; returns spikes [T, ...].

    With `return_membrane=True` also returns the membrane after every step [T, ...] (for golden
    trajectory tests).
    """
    if current.dim() < 1 or current.shape[0] < 1:
        raise ValueError(
            f"current must be time-major [T, ...] with T >= 1, got {tuple(current.shape)}"
        )
    v = torch.zeros_like(current[0])
    spikes = torch.empty_like(current)
    membrane = torch.empty_like(current) if return_membrane else None
    for t in range(current.shape[0]):
        spikes[t], v = if_step(current[t], v, v_th, leak, fire_on_ge)
        if return_membrane:
            membrane[t] = v
    return (spikes, membrane) if return_membrane else spikes
