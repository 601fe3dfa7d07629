"""Triton kernels for the spikeinfer `triton` backend (DESIGN section 10), shipped as
`spikeinfer.kernels`.

One module per op, each opening with the maths it implements and the pure-torch reference it is
tested against:

    neuron_scan   IF/LIF scan of a precomputed (or constant) current     spikeinfer.neuron
    bernoulli     counter-based input spikes for sequential mode          spikeinfer.rng
    spike_linear  1-bit spike GEMM + epilogue (GELU, residual+LN) + scan  spikeinfer.ops
    attention     spiking attention + A-sublayer scan                     spikeinfer.ops
    backend       whole-model simulation (`simulate`)                     spikeinfer.model

Importing this package does not import Triton; the op modules do, when first used. Set
TRITON_INTERPRET=1 before they are imported to run the kernels on CPU tensors (tests).
"""

from __future__ import annotations

from importlib import import_module

from ._common import is_available

_OPS = {
    "if_scan": "neuron_scan",
    "bernoulli_spikes": "bernoulli",
    "spike_linear": "spike_linear",
    "DrawnSpikes": "spike_linear",
    "spiking_attention": "attention",
    "simulate": "backend",
}

__all__ = ["is_available", *_OPS]


def __getattr__(name: str):
    if name in _OPS:
        return getattr(import_module(f".{_OPS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
