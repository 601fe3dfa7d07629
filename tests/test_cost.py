import pytest
import torch

from spikeinfer import cost
from spikeinfer.config import ModelConfig

TINY = ModelConfig.from_name("tiny")  # D=32, H=4, d=8, d_ff=64, L=2


def test_dense_ac_count_by_hand():
    # N=5, T=2: a head costs 5*32*8*(2+2+2) + 2*25*8*2 + 5*32*8*2 = 7680 + 800 + 2560 = 11040,
    # a neuron 5*32*(2+2) = 640; two layers of 4 heads and 64 neurons.
    assert cost.ac_count(TINY, None, None, 2, 5) == 2 * (4 * 11040 + 64 * 640) == 170240


def test_pruned_uneven_ac_count_by_hand():
    timesteps = [[1, 2, 3, 4, 5, 6], [2, 2, 2, 2, 2, 2]]  # K V A O1 F O2
    head_mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]])
    neuron_mask = torch.ones(2, 64)
    neuron_mask[1, :32] = 0
    # layer 0 head: 1280*(t_Q=3 + 1 + 2) + 2*25*8*3 + 1280*4 = 7680 + 1200 + 5120 = 14000
    # layer 0 neuron: 160*(5 + 6) = 1760; layer 1 head 11040, neuron 640
    expected = 2 * 14000 + 64 * 1760 + 4 * 11040 + 32 * 640
    assert cost.ac_count(TINY, head_mask, neuron_mask, timesteps, 5) == expected
    pct = cost.acs_percent(TINY, head_mask, neuron_mask, timesteps, 5)
    # relative to the dense model at T_conv = 8: head 1280*24 + 2*25*8*8 + 1280*8, neuron 160*16
    assert pct == pytest.approx(100 * expected / (2 * (4 * 44160 + 64 * 2560)))
    # the differentiable form gives the same number and gradients per unit
    h = head_mask.float().requires_grad_()
    m = cost.ac_cost(TINY, h, neuron_mask, timesteps, 5)
    assert m.item() == expected
    m.backward()
    assert h.grad[0, 0].item() == 14000 and h.grad[1, 0].item() == 11040


def test_ac_count_validates():
    with pytest.raises(ValueError, match="head_mask must have shape"):
        cost.ac_count(TINY, torch.ones(3, 4), None, 2, 5)
    with pytest.raises(ValueError, match="binary masks"):
        cost.ac_count(TINY, torch.full((2, 4), 0.5), None, 2, 5)


def test_normalized_c_by_hand():
    # all rates 1 at T_conv: exactly 1; halving every rate halves it
    ones = [[1.0] * 6] * 2
    assert cost.normalized_c(TINY, None, None, ones, 5) == pytest.approx(1.0)
    assert cost.normalized_c(TINY, None, None, [[0.5] * 6] * 2, 5) == pytest.approx(0.5)
    # only a_F nonzero: the W_2 accumulates of every neuron, N*D*t_O2 each, at T_conv=8
    rates = [[0, 0, 0, 0, 0, 0.25], [0, 0, 0, 0, 0, 0]]
    dense = cost.ac_count(TINY, None, None, 8, 5)
    assert cost.normalized_c(TINY, None, None, rates, 5) == pytest.approx(
        64 * 5 * 32 * 8 * 0.25 / dense
    )
    # a_K drives Q.K^T only: N^2*d*t_A per head
    rates = [[0, 0.5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert cost.normalized_c(TINY, None, None, rates, 5, timesteps=4) == pytest.approx(
        4 * 25 * 8 * 4 * 0.5 / dense
    )


def test_normalized_c_from_sublayer_asr_mapping():
    names = ["emb"] + [f"{l}.{s}" for l in range(2) for s in ("K", "V", "A", "O1", "F", "O2")]
    asr = {n: 0.2 for n in names}
    asr["0.O2"] = 0.6  # feeds layer 1 as its x
    table = cost.rates_table(TINY, asr)
    assert table[0] == [0.2] * 6 and table[1][0] == 0.6
    assert cost.normalized_c(TINY, None, None, asr, 5) == pytest.approx(
        cost.normalized_c(TINY, None, None, table, 5)
    )


def test_latency_and_energy():
    assert cost.latency(85) == 85.0
    assert cost.latency([[1, 2, 3, 4, 5, 6]]) == 3.5
    assert cost.latency([[1, 2, 3, 4, 5, 6]], t_emb=7) == 4.0
    rates = [[1.0] * 6] * 2
    acs = cost.ac_count(TINY, None, None, 8, 5)
    expected = (acs * 0.9 + 32 * 2 * 4.6) * 1e-9
    assert cost.energy_mj(TINY, None, None, rates, 5) == pytest.approx(expected)
