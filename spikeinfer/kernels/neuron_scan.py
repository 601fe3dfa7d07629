"""Integrate-and-fire scan over timesteps for a precomputed current (DESIGN section 1).

Maths, per neuron, membrane V starting at 0, for t = 0 .. T-1:

    H[t] = leak * V[t-1] + I[t]          (leak = 1: V[t-1] + I[t], as the reference computes it)
    S[t] = H[t] >= v_th                  (> v_th when fire_on_ge is False)
    V[t] = H[t] - v_th * S[t]

Reference: `spikeinfer.neuron.if_multistep`. The backend uses this kernel for the embedding
neurons, whose current E is constant over time (`current` [M, N] with `timesteps=T`: read once,
held in registers); the projections fuse the same scan into their GEMM epilogue
(`spike_linear`). The `neuron_update` helper below is the one place the kernels do this arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, kernel_device, launch_options, placeholder


@triton.jit
def neuron_update(v, current, v_th, leak, LEAKY: tl.constexpr, FIRE_ON_GE: tl.constexpr):
    """One step for a tile: returns (float32 spikes 0/1, new membrane)."""
    if LEAKY:
        h = leak * v + current
    else:
        h = v + current
    if FIRE_ON_GE:
        fired = h >= v_th
    else:
        fired = h > v_th
    s = fired.to(tl.float32)
    return s, h - v_th * s


@triton.jit
def _if_scan_kernel(
    cur_ptr,
    out_ptr,
    count_ptr,
    T,
    M,
    N,
    stride_ct,
    stride_ot,
    v_th,
    leak,
    CONSTANT: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    LEAKY: tl.constexpr,
    FIRE_ON_GE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows[:, None] * N + cols[None, :]
    v = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    count = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    current = tl.load(cur_ptr + offsets, mask=inside, other=0.0)
    # Step pointers advance by the step stride: 64-bit pointer arithmetic, so T * M * N may
    # pass 2**31 while each step's offsets stay in int32.
    cur_step_ptr = cur_ptr
    out_step_ptr = out_ptr
    for _ in range(T):
        if not CONSTANT:
            current = tl.load(cur_step_ptr + offsets, mask=inside, other=0.0)
            cur_step_ptr += stride_ct
        s, v = neuron_update(v, current, v_th, leak, LEAKY, FIRE_ON_GE)
        count += s.to(tl.int32)
        if WRITE_OUT:
            tl.store(out_step_ptr + offsets, s.to(out_ptr.dtype.element_ty), mask=inside)
            out_step_ptr += stride_ot
    tl.store(count_ptr + offsets, count, mask=inside)


def if_scan(
    current: torch.Tensor,
    v_th: float = 1.0,
    leak: float = 1.0,
    *,
    timesteps: int | None = None,
    fire_on_ge: bool = True,
    write_spikes: bool = True,
    out_dtype: torch.dtype = torch.int8,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Run the neuron over a float32 current; returns (spikes [T, M, N] or None, counts [M, N]).

    `current` is [T, M, N], or [M, N] held constant for `timesteps` steps (the embedding neurons).
    Counts are int32 spike totals per neuron (rate = count / T).
    """
    check_dtype("current", current, torch.float32)
    device = kernel_device(current)
    if timesteps is None:
        if current.dim() != 3:
            raise ValueError(
                f"current must be [T, M, N] (or [M, N] with timesteps=); got {tuple(current.shape)}"
            )
        T, M, N = current.shape
        constant = False
    else:
        if current.dim() != 2:
            raise ValueError(f"a constant current must be [M, N]; got {tuple(current.shape)}")
        (M, N), T, constant = current.shape, int(timesteps), True
    if T < 1:
        raise ValueError(f"timesteps must be >= 1, got {T}")
    counts = torch.zeros(M, N, dtype=torch.int32, device=device)
    spikes = torch.empty(T, M, N, dtype=out_dtype, device=device) if write_spikes else None
    if M * N == 0:
        return spikes, counts
    current = current.contiguous()
    block_m, block_n = 32, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _if_scan_kernel[grid](
        current,
        spikes if write_spikes else placeholder(device, out_dtype),
        counts,
        T,
        M,
        N,
        0 if constant else current.stride(0),
        M * N,
        float(v_th),
        float(leak),
        CONSTANT=constant,
        WRITE_OUT=write_spikes,
        LEAKY=float(leak) != 1.0,
        FIRE_ON_GE=fire_on_ge,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **launch_options(),
    )
    return spikes, counts
