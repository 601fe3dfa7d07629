"""In-kernel Bernoulli spike generation for `sequential` mode (DESIGN sections 1 and 10).

Maths (all uint32, wrapping), identical to the reference generator `spikeinfer.rng`:

    mix(x)  = x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
    base    = mix(step ^ mix(stream ^ mix(seed)))          # host side: `step_keys`
    bits    = mix(mix(element) ^ base)                     # in kernel: `bernoulli_draw`
    u       = (bits >> 8) * 2**-24
    spike   = u < rate

`element` is the flat index into the uncompacted [B, N, features] rate tensor,
row * full_width + original_column, so compacted models draw what their masked originals draw.

Reference: `spikeinfer.rng.bernoulli_spikes` (and `spikeinfer.rng.step_key` for `base`). The
`@triton.jit` helpers here are called by the spike-linear and attention kernels, which draw their
input spikes tile by tile instead of reading spike trains from memory; `bernoulli_spikes` is a
standalone op over the same helpers, used to test them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikeinfer import rng

from ._common import check_dtype, kernel_device, launch_options, nonempty


@triton.jit
def mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def bernoulli_draw(rate, element, base):
    """Boolean spikes for float32 `rate`, uint32 `element` indices and a uint32 step key."""
    bits = mix32(mix32(element) ^ base)
    # bits >> 8 < 2**24, so the conversion and the power-of-two scale are exact.
    u = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08
    return u < rate


@triton.jit
def load_step_key(keys_ptr, t):
    """The uint32 key of step t (stored as int32 bit patterns: torch has no full uint32 support)."""
    return tl.load(keys_ptr + t).to(tl.uint32, bitcast=True)


def step_keys(seed: int, stream: int, steps: int, device) -> torch.Tensor:
    """int32 tensor [steps] with the bit patterns of `rng.step_key(seed, stream, s)`, s < steps."""
    keys = [rng.step_key(seed, stream, s) for s in range(steps)]
    signed = [k - (1 << 32) if k >= (1 << 31) else k for k in keys]
    return torch.tensor(signed, dtype=torch.int32, device=device)


@triton.jit
def _bernoulli_kernel(
    rate_ptr,
    cols_ptr,
    keys_ptr,
    out_ptr,
    R,
    C,
    full_width,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    t = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows < R)[:, None] & (cols < C)[None, :]
    rate = tl.load(rate_ptr + rows[:, None] * C + cols[None, :], mask=inside, other=0.0)
    original = tl.load(cols_ptr + cols, mask=cols < C, other=0).to(tl.uint32)
    element = rows.to(tl.uint32)[:, None] * full_width + original[None, :]
    spikes = bernoulli_draw(rate, element, load_step_key(keys_ptr, t))
    offsets = t.to(tl.int64) * R * C + rows[:, None] * C + cols[None, :]
    tl.store(out_ptr + offsets, spikes.to(tl.int8), mask=inside)


def bernoulli_spikes(
    rates: torch.Tensor,
    seed: int,
    stream: int,
    steps: int,
    cols: torch.Tensor | None = None,
    full_width: int | None = None,
) -> torch.Tensor:
    """int8 spikes [steps, R, C] drawn from float32 `rates` [R, C] for steps 0 .. steps-1.

    Column c of row r draws element r * full_width + cols[c] (defaults: cols = arange(C),
    full_width = C), matching `rng.bernoulli_spikes(rates, seed, stream, range(steps), elements)`.
    """
    check_dtype("rates", rates, torch.float32)
    if rates.dim() != 2:
        raise ValueError(f"rates must be [rows, cols]; got {tuple(rates.shape)}")
    R, C = rates.shape
    device = kernel_device(rates, cols)
    cols = torch.arange(C, device=device) if cols is None else cols
    full_width = C if full_width is None else int(full_width)
    if cols.shape != (C,):
        raise ValueError(f"cols must be [{C}]; got {tuple(cols.shape)}")
    out = torch.empty(steps, R, C, dtype=torch.int8, device=device)
    if out.numel() == 0:
        return out
    rates = rates.contiguous()
    keys = step_keys(seed, stream, steps, device)
    block_r, block_c = 32, 32
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, block_c), steps)
    _bernoulli_kernel[grid](
        rates,
        nonempty(cols.to(torch.int32).contiguous()),
        keys,
        out,
        R,
        C,
        full_width,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        **launch_options(),
    )
    return out
