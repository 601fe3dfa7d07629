"""Pure-torch reference ops: the definition of correct for every backend.

The reference model calls exactly these, and the Triton and C++ kernels are tested against them.

Spike linear (DESIGN section 2): I = alpha (.) (S . sign(W)^T) + b. With 0/1 spikes and +-1 signs
the product is an exact integer count in float32 (for K < 2**24), so any summation order gives the
same count, and the scale and bias are applied after it in this order: count * alpha, then + b.

Spiking attention (DESIGN section 1): per head, softmax(Q . S_K^T * d^-1/2 + mask) . S_V, with Q
real-valued.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Additive attention mask for padding keys: large enough that exp() underflows to 0 in fp32 and
# bf16, small enough to stay finite in both.
MASK_VALUE = -10000.0


def spike_linear(
    x: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Binary projection of spikes (or rates) x [..., K] with signs [N, K], alpha [N], bias [N]."""
    if signs.shape[1] == 0:  # every input unit pruned: only the bias is left
        out = torch.zeros(*x.shape[:-1], signs.shape[0], dtype=x.dtype, device=x.device)
        return out if bias is None else out + bias
    counts = torch.matmul(x, signs.t())
    out = counts * alpha
    return out if bias is None else out + bias


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Full-precision projection (the full-precision spiking student)."""
    if weight.shape[1] == 0:
        out = torch.zeros(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def attention_mask_additive(attention_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[B, N] 1/0 token mask -> [B, 1, 1, N] additive mask (0 tokens, MASK_VALUE padding)."""
    return ((1.0 - attention_mask.to(dtype)) * MASK_VALUE)[:, None, None, :]


def attention_scores(q: torch.Tensor, k: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
    """Pre-softmax scores [..., h, N, N] for q, k [..., h, N, d]."""
    return torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1])) + mask_add


def spiking_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_add: torch.Tensor,
    return_scores: bool = False,
):
    """Attention current [..., h, N, d] from real q and spiking (or rate) k, v [..., h, N, d]."""
    scores = attention_scores(q, k, mask_add)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return (out, scores) if return_scores else out
