"""Counter-based Bernoulli spike generator for `sequential` mode (DESIGN section 1).

Every random draw is a pure function of (seed, stream, step, element), so a run is reproducible
from its seed, needs no stored state, and can be regenerated inside a kernel. All arithmetic is on
uint32 with wrap-around, which Triton (`tl.uint32`), C++ (`uint32_t`) and torch (int64 masked to 32
bits, below) compute identically:

    mix(x)    = x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
    base      = mix(step ^ mix(stream ^ mix(seed)))
    bits      = mix(mix(element) ^ base)
    u         = (bits >> 8) * 2**-24              # uniform in [0, 1), exact in float32
    spike     = u < rate

`element` is the flat index of the drawn input inside its (uncompacted) [B, N, features] rate
tensor, so a pruned-and-compacted model draws exactly the spikes its masked original draws.
`stream` names the consumer sublayer and which of its inputs is drawn (see `stream_id`).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x846CA68B

# Inputs a sublayer may draw (DESIGN section 1 table): the block input x, and the spikes of K, V,
# A, O1 and F. Each (layer, consumer sublayer, input) is its own stream.
INPUTS = ("x", "K", "V", "A", "O1", "F")


def stream_id(layer: int, sublayer: int, input_index: int) -> int:
    """Stream for `input_index` (into INPUTS) drawn by `sublayer` (into SUBLAYERS) of `layer`."""
    return (layer * 8 + sublayer) * 8 + input_index


def mix32_int(x: int) -> int:
    """Scalar version of `mix32` for host-side keys."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Elementwise uint32 hash on an int64 tensor holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 16)


def step_key(seed: int, stream: int, step: int) -> int:
    """The per-(seed, stream, step) key `base`."""
    return mix32_int((step & MASK32) ^ mix32_int((stream & MASK32) ^ mix32_int(seed)))


def uniform(seed: int, stream: int, steps, elements: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 draws of shape [len(steps), *elements.shape].

    `elements` is an int64 tensor of flat element indices (< 2**32).
    """
    mixed = mix32(elements.to(torch.int64) & MASK32)
    keys = torch.tensor(
        [step_key(seed, stream, s) for s in steps], dtype=torch.int64, device=elements.device
    )
    keys = keys.view(-1, *([1] * elements.dim()))
    bits = mix32(mixed.unsqueeze(0) ^ keys)
    return (bits >> 8).to(torch.float32) * (2.0**-24)


def bernoulli_spikes(
    rates: torch.Tensor, seed: int, stream: int, steps, elements: torch.Tensor | None = None
) -> torch.Tensor:
    """Spike trains [len(steps), *rates.shape] with P(spike) = rate, drawn by the counter scheme.

    `elements` defaults to the flat index of each entry of `rates`.
    """
    if elements is None:
        elements = torch.arange(rates.numel(), device=rates.device).view(rates.shape)
    u = uniform(seed, stream, steps, elements)
    return (u < rates.to(torch.float32).unsqueeze(0)).to(rates.dtype)
