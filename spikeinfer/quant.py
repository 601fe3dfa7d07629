"""1-bit weights (DESIGN section 2).

W ~ alpha (.) sign(W - mean) with one scale per output row, alpha_n = mean|W_n - mean_n| (or one
per tensor), and sign(0) = +1. Training keeps latent full-precision weights and a straight-through
estimator: the forward sees alpha * sign, the backward passes the gradient to the latent weight as
if the binarisation were the identity. Inference stores signs bit-packed (8 per byte, little-endian
bit order along the input dimension).
"""

from __future__ import annotations

import torch


def binarize(weight: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (signs in {-1, +1} with weight's dtype, alpha [out_features]) for weight [out, in]."""
    if per_row:
        centered = weight - weight.mean(dim=1, keepdim=True)
        alpha = centered.abs().mean(dim=1)
    else:
        centered = weight - weight.mean()
        alpha = centered.abs().mean().expand(weight.shape[0])
    signs = torch.where(centered >= 0, 1.0, -1.0).to(weight.dtype)
    return signs, alpha.contiguous()


class _StraightThroughSigns(torch.autograd.Function):
    """Forward: the exact signs (so spike counts stay exact integers); backward: identity."""

    @staticmethod
    def forward(ctx, weight, signs):
        return signs

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def binarize_ste(weight: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Binarize with a straight-through estimator: signs carry weight's gradient as identity.

    Returns (signs, alpha); the product alpha[:, None] * signs approximates weight, and gradients
    reaching `signs` flow to `weight` unchanged (alpha is treated as a constant).
    """
    signs, alpha = binarize(weight.detach(), per_row)
    return _StraightThroughSigns.apply(weight, signs), alpha


def latent_from_binary(signs: torch.Tensor, alpha: torch.Tensor, per_row: bool) -> torch.Tensor:
    """A latent weight whose binarisation is (signs, alpha) up to float rounding.

    binarize() centres by the mean before taking signs and scales, so alpha * signs would come
    back with a smaller scale when the signs are unbalanced. With m the mean of the signs,
    W = alpha (s - m) / (1 - m^2) has mean 0, sign s and mean |W| = alpha.
    """
    s = signs.double()
    m = s.mean(1, keepdim=True) if per_row else s.mean()
    denom = (1 - m * m).clamp_min(1e-6)  # a row of equal signs cannot be reproduced exactly
    return (alpha.double()[:, None] * (s - m) / denom).to(alpha.dtype)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a [out, in] tensor of +-1 into uint8 [out, ceil(in / 8)]: bit i of byte j is +1 at
    column 8j + i."""
    out_features, in_features = signs.shape
    nbytes = (in_features + 7) // 8
    bits = torch.zeros(out_features, nbytes * 8, dtype=torch.uint8, device=signs.device)
    bits[:, :in_features] = (signs > 0).to(torch.uint8)
    bits = bits.view(out_features, nbytes, 8)  # [out, bytes, bit]
    weights = (2 ** torch.arange(8, dtype=torch.int32, device=signs.device)).to(torch.uint8)
    return (bits * weights).sum(dim=2, dtype=torch.int32).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """Inverse of `pack_signs`: uint8 [out, bytes] -> +-1 [out, in_features] of `dtype`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed signs must be uint8, got {packed.dtype}")
    out_features, nbytes = packed.shape
    if nbytes != (in_features + 7) // 8:
        raise ValueError(f"{nbytes} packed bytes per row cannot hold {in_features} signs")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [out, bytes, bit]
    bits = bits.reshape(out_features, nbytes * 8)[:, :in_features]
    return bits.to(dtype) * 2 - 1
