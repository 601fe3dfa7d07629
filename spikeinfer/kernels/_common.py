"""Shared launcher helpers for the Triton kernels (no Triton import here, so the package imports
without a usable Triton)."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (CPU tensors, no GPU needed)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def is_available() -> tuple[bool, str]:
    """(usable, reason): the Triton backend runs on CUDA, or anywhere under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton is a hard dependency
        return False, f"triton cannot be imported: {exc}"
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name()}"
    if interpreting():
        return True, "TRITON_INTERPRET=1 (numpy interpreter, CPU tensors; slow, for tests)"
    return False, "no CUDA device and TRITON_INTERPRET is not set to 1"


def kernel_device(*tensors: torch.Tensor | None) -> torch.device:
    """The one device all given tensors live on, checked to be one Triton can run on."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(
            f"all kernel operands must be on one device, got {sorted(map(str, devices))}"
        )
    device = devices.pop()
    if device.type == "cuda":
        return device
    if device.type == "cpu" and interpreting():
        return device
    raise RuntimeError(
        f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
        f"spikeinfer.kernels is imported); got tensors on {device}"
    )


def check_dtype(name: str, tensor: torch.Tensor, *dtypes: torch.dtype):
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {tensor.dtype}")


def check_shape(name: str, tensor: torch.Tensor, shape: tuple):
    """`shape` entries of None match any size."""
    ok = tensor.dim() == len(shape) and all(
        want is None or have == want for have, want in zip(tensor.shape, shape, strict=True)
    )
    if not ok:
        pretty = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {pretty}; got {tuple(tensor.shape)}")


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum); tl.dot needs every block dimension >= 16."""
    p = minimum
    while p < n:
        p *= 2
    return p


def placeholder(device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A one-element tensor passed for pointers a kernel variant never dereferences (Triton cannot
    take None for a pointer argument, and empty tensors may carry a null pointer)."""
    return torch.zeros(1, dtype=dtype, device=device)


def nonempty(t: torch.Tensor) -> torch.Tensor:
    return t if t.numel() > 0 else placeholder(t.device, t.dtype)


def launch_options(num_warps: int = 4, num_stages: int | None = None) -> dict:
    """Compile options for every launch. FMA contraction is off because the reference rounds the
    products (count * alpha, leak * v) before adding; a fused multiply-add would round once and
    move spikes that sit within one rounding of the threshold."""
    opts = {"num_warps": num_warps, "enable_fp_fusion": False}
    if num_stages is not None:
        opts["num_stages"] = num_stages
    return opts
