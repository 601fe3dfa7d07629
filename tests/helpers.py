"""Small shared builders for tests: tiny random spiking models that actually fire."""

from __future__ import annotations

import torch

from spikeinfer.config import ModelConfig
from spikeinfer.model import SpikingBert


def firing_model(seed: int = 0, binary: bool = True, **overrides) -> SpikingBert:
    """A `tiny` model with weights scaled so every sublayer fires at moderate rates."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", binary=binary, **overrides)
    model = SpikingBert(cfg).eval()
    with torch.no_grad():
        for block in model.layers:
            for proj in block.projections():
                proj.weight.normal_(0.0, 1.0 if binary else 0.3)
                proj.bias.normal_(0.3, 0.3)
    return model


def batch(seed: int = 0, B: int = 3, N: int = 7, vocab: int = 100, pad_from=(None, 5, 3)):
    """Random input ids with some padded rows; token types split each row in two segments."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    for b, start in enumerate(pad_from[:B]):
        if start is not None:
            mask[b, start:] = 0
            ids[b, start:] = 0
    types = torch.zeros(B, N, dtype=torch.long)
    types[:, N // 2 :] = 1
    return ids, mask, types


def assert_same_rates(a, b, context=""):
    assert a.rates.keys() == b.rates.keys()
    for name in a.rates:
        x, y = a.rates[name], b.rates[name]
        if not torch.equal(x, y):
            diff = (x != y).nonzero()
            raise AssertionError(
                f"{context}: sublayer {name} rates differ at {len(diff)} of {x.numel()} entries, "
                f"first at {diff[0].tolist()}: {x[tuple(diff[0])]} vs {y[tuple(diff[0])]}"
            )
