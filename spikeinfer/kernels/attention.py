"""Spiking attention fused with the A-sublayer neuron scan (DESIGN sections 1, 10).

Maths, per batch b, kept head h, timestep t (d = head dim, N = sequence length):

    scores = Q[t, b, h] . S_K[t, b, h]^T * d^-1/2 + mask[b]     (mask: 0 or MASK_VALUE per key)
    I[t]   = softmax(scores) . S_V[t, b, h] * gate[h]
    neuron H = leak * V + I; S_A = H >= v_th; V = H - v_th * S_A

Q is real (the "none" epilogue of `spike_linear`); S_K and S_V are 0/1 spikes read from memory
(unrolled) or drawn in-kernel from the K and V rates (sequential; `bernoulli.bernoulli_draw`).

References: `spikeinfer.ops.spiking_attention` / `attention_scores` with
`spikeinfer.ops.attention_mask_additive`, `spikeinfer.model.Block.current_a` (head gate), and
`spikeinfer.neuron.if_multistep`.

Kernel layout: one program per (query block, head, batch) loops over t, holding the membrane of
its BLOCK_Q x d outputs in registers; every key of the sequence is in one block (N <= 512), so
softmax is a register reduction with no online rescaling. Both products run in full float32
(`input_precision="ieee"`): TF32 would round Q and the probabilities to 10 mantissa bits and move
far more neurons across the threshold than the agreement rule allows.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    check_dtype,
    check_shape,
    interpreting,
    kernel_device,
    launch_options,
    next_pow2,
    nonempty,
    placeholder,
)
from .bernoulli import bernoulli_draw, load_step_key, step_keys
from .neuron_scan import neuron_update

MAX_SEQ_LEN = 512


@triton.jit
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_keys_ptr,
    v_keys_ptr,
    cols_ptr,
    full_width,
    mask_ptr,
    gate_ptr,
    out_ptr,
    count_ptr,
    scale,
    v_th,
    leak,
    T,
    N,
    W,
    d,
    stride_qt,
    stride_kt,
    stride_vt,
    stride_ot,
    KV_DRAWN: tl.constexpr,
    HAS_GATE: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    LEAKY: tl.constexpr,
    FIRE_ON_GE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_KEYS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1)
    batch = tl.program_id(2)
    queries = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    keys = tl.arange(0, BLOCK_KEYS)
    dims = tl.arange(0, BLOCK_D)
    q_in = queries < N
    key_in = keys < N
    dim_in = dims < d
    cols = head * d + dims  # this head's columns in the compacted [.., W] layout
    q_rows = (batch * N + queries).to(tl.int64)
    key_rows = (batch * N + keys).to(tl.int64)
    q_offsets = q_rows[:, None] * W + cols[None, :]
    kv_offsets = key_rows[:, None] * W + cols[None, :]
    q_mask = q_in[:, None] & dim_in[None, :]
    kv_mask = key_in[:, None] & dim_in[None, :]

    # Keys past the sequence end get -inf (weight exactly 0); padding keys inside it get the
    # reference's finite MASK_VALUE from `mask_ptr`.
    mask_add = tl.load(mask_ptr + batch * N + keys, mask=key_in, other=float("-inf"))
    if HAS_GATE:
        gate = tl.load(gate_ptr + head)
    if KV_DRAWN:
        original = tl.load(cols_ptr + cols, mask=dim_in, other=0).to(tl.uint32)
        kv_elements = key_rows.to(tl.uint32)[:, None] * full_width + original[None, :]

    v_mem = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    count = tl.zeros((BLOCK_Q, BLOCK_D), tl.int32)
    q_step_ptr = q_ptr
    k_step_ptr = k_ptr
    v_step_ptr = v_ptr
    out_step_ptr = out_ptr
    for t in range(T):
        q = tl.load(q_step_ptr + q_offsets, mask=q_mask, other=0.0)
        if KV_DRAWN:
            k_rate = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
            v_rate = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
            s_k = bernoulli_draw(k_rate, kv_elements, load_step_key(k_keys_ptr, t)).to(tl.float32)
            s_v = bernoulli_draw(v_rate, kv_elements, load_step_key(v_keys_ptr, t)).to(tl.float32)
        else:
            s_k = tl.load(k_step_ptr + kv_offsets, mask=kv_mask, other=0).to(tl.float32)
            s_v = tl.load(v_step_ptr + kv_offsets, mask=kv_mask, other=0).to(tl.float32)
        scores = tl.dot(q, tl.trans(s_k), input_precision="ieee") * scale + mask_add[None, :]
        row_max = tl.max(scores, axis=1)
        p = tl.exp(scores - row_max[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        current = tl.dot(p, s_v, input_precision="ieee")
        if HAS_GATE:
            current = current * gate
        s, v_mem = neuron_update(v_mem, current, v_th, leak, LEAKY, FIRE_ON_GE)
        count += s.to(tl.int32)
        if WRITE_OUT:
            tl.store(out_step_ptr + q_offsets, s.to(out_ptr.dtype.element_ty), mask=q_mask)
        q_step_ptr += stride_qt
        k_step_ptr += stride_kt
        v_step_ptr += stride_vt
        out_step_ptr += stride_ot
    tl.store(count_ptr + q_offsets, count, mask=q_mask)


def _as_rows(name: str, t: torch.Tensor, T: int, M: int, W: int) -> torch.Tensor:
    check_shape(name, t, (T, M, W))
    return t if t.stride(2) == 1 and t.stride(1) == W else t.contiguous()


def spiking_attention(
    q: torch.Tensor,
    s_k,
    s_v,
    mask_add: torch.Tensor,
    *,
    batch: int,
    head_dim: int,
    v_th: float = 1.0,
    leak: float = 1.0,
    fire_on_ge: bool = True,
    gate: torch.Tensor | None = None,
    seed: int | None = None,
    k_stream: int | None = None,
    v_stream: int | None = None,
    cols: torch.Tensor | None = None,
    full_width: int | None = None,
    write_spikes: bool = True,
    out_dtype: torch.dtype = torch.int8,
    block_q: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A-sublayer spikes from real Q and spiking K, V in token-row layout.

    q: float32 [T, B*N, W] with W = heads * head_dim (head h in columns h*d .. h*d+d-1);
    s_k, s_v: int8 0/1 spikes [T, B*N, W] (unrolled), or float32 rates [B*N, W] (sequential:
    spikes drawn in-kernel with streams `k_stream`, `v_stream` and `seed`; column c of row m draws
    element m * full_width + cols[c]); mask_add: float32 additive key mask [B, N];
    gate: float32 per-head multipliers [heads].

    Returns (spikes [T, B*N, W] of `out_dtype` or None, int32 counts [B*N, W]).
    """
    device = kernel_device(q, s_k, s_v, mask_add, gate, cols)
    check_dtype("q", q, torch.float32)
    check_dtype("mask_add", mask_add, torch.float32)
    if q.dim() != 3:
        raise ValueError(f"q must be [T, B*N, W]; got {tuple(q.shape)}")
    T, M, W = q.shape
    d = int(head_dim)
    if batch < 1 or M % batch:
        raise ValueError(f"{M} token rows do not split into batch={batch}")
    N = M // batch
    if d < 1 or W % d:
        raise ValueError(f"width {W} is not a whole number of heads of dim {d}")
    heads = W // d
    check_shape("mask_add", mask_add, (batch, N))
    if N > MAX_SEQ_LEN:
        raise ValueError(f"sequence length {N} > {MAX_SEQ_LEN}: all keys must fit one block")
    if gate is not None:
        check_dtype("gate", gate, torch.float32)
        check_shape("gate", gate, (heads,))
    drawn = s_k.dtype == torch.float32
    if drawn:
        if seed is None or k_stream is None or v_stream is None:
            raise ValueError("drawn K/V spikes (float32 rates) need seed, k_stream and v_stream")
        check_shape("s_k rates", s_k, (M, W))
        check_shape("s_v rates", s_v, (M, W))
        check_dtype("s_v rates", s_v, torch.float32)
    else:
        check_dtype("s_k", s_k, torch.int8)
        check_dtype("s_v", s_v, torch.int8)
    if T < 1:
        raise ValueError(f"timesteps must be >= 1, got {T}")

    counts = torch.zeros(M, W, dtype=torch.int32, device=device)
    out = torch.empty(T, M, W, dtype=out_dtype, device=device) if write_spikes else None
    if M * W == 0:
        return out, counts
    q = _as_rows("q", q, T, M, W)
    if drawn:
        s_k, s_v = s_k.contiguous(), s_v.contiguous()
        cols = torch.arange(W, device=device) if cols is None else cols
        check_shape("cols", cols, (W,))
        cols_arg = cols.to(torch.int32).contiguous()
        k_keys = step_keys(seed, k_stream, T, device)
        v_keys = step_keys(seed, v_stream, T, device)
        full_width = W if full_width is None else int(full_width)
        stride_kt = stride_vt = 0
    else:
        s_k, s_v = _as_rows("s_k", s_k, T, M, W), _as_rows("s_v", s_v, T, M, W)
        cols_arg = k_keys = v_keys = placeholder(device, torch.int32)
        full_width, stride_kt, stride_vt = W, s_k.stride(0), s_v.stride(0)

    block_keys = next_pow2(N)
    block_d = next_pow2(d)
    if block_q is None:
        block_q = min(block_keys, 32 if interpreting() or block_keys > 128 else 64)
    num_warps = 4 if block_keys * block_d <= 64 * 64 else 8
    grid = (triton.cdiv(N, block_q), heads, batch)
    fallback = placeholder(device)
    _attention_kernel[grid](
        q,
        s_k,
        s_v,
        k_keys,
        v_keys,
        nonempty(cols_arg),
        full_width,
        mask_add.contiguous(),
        fallback if gate is None else gate.contiguous(),
        fallback if out is None else out,
        counts,
        1.0 / math.sqrt(d),
        float(v_th),
        float(leak),
        T,
        N,
        W,
        d,
        q.stride(0),
        stride_kt,
        stride_vt,
        M * W,
        KV_DRAWN=drawn,
        HAS_GATE=gate is not None,
        WRITE_OUT=out is not None,
        LEAKY=float(leak) != 1.0,
        FIRE_ON_GE=fire_on_ge,
        BLOCK_Q=block_q,
        BLOCK_KEYS=block_keys,
        BLOCK_D=block_d,
        **launch_options(num_warps),
    )
    return out, counts


def reference_attention_current(
    q: torch.Tensor,
    s_k: torch.Tensor,
    s_v: torch.Tensor,
    mask_add: torch.Tensor,
    batch: int,
    head_dim: int,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The A current [T, B*N, W] from the reference ops, for tests (float spikes in)."""
    from spikeinfer.ops import spiking_attention as ref_attention

    T, M, W = q.shape
    N, d = M // batch, head_dim
    h = W // d

    def heads(t):
        return t.float().view(T, batch, N, h, d).transpose(2, 3)

    out = ref_attention(heads(q), heads(s_k), heads(s_v), mask_add.view(batch, 1, 1, N))
    if gate is not None:
        out = out * gate.view(1, 1, h, 1, 1)
    return out.transpose(2, 3).reshape(T, M, W)
