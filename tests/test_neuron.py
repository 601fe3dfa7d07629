import dataclasses

import pytest
import torch

from spikeinfer.config import NeuronParams
from spikeinfer.neuron import if_multistep, if_step


def trajectory(currents, v_th=1.0, leak=1.0, fire_on_ge=True):
    current = torch.tensor(currents, dtype=torch.float32)[:, None]
    s, v = if_multistep(current, v_th, leak, fire_on_ge=fire_on_ge, return_membrane=True)
    return s[:, 0].tolist(), v[:, 0].tolist()


def test_golden_if_trajectory_with_exact_tie():
    # H: 0.5, 1.0 (tie fires, V=0), 0.75, 1.5 (fires, V=0.5), 0.25
    spikes, membrane = trajectory([0.5, 0.5, 0.75, 0.75, -0.25])
    assert spikes == [0, 1, 0, 1, 0]
    assert membrane == [0.5, 0.0, 0.75, 0.5, 0.25]


def test_tie_does_not_fire_when_strict():
    spikes, membrane = trajectory([0.5, 0.5, 0.5], fire_on_ge=False)
    assert spikes == [0, 0, 1]
    assert membrane == [0.5, 1.0, 0.5]


def test_golden_lif_trajectory():
    # leak 0.5: H = 1.0 (fires, V=0); 0.75; 0.375 + 0.75 = 1.125 (fires, V=0.125); 0.0625 + 0.5
    spikes, membrane = trajectory([1.0, 0.75, 0.75, 0.5], leak=0.5)
    assert spikes == [1, 0, 1, 0]
    assert membrane == [0.0, 0.75, 0.125, 0.5625]


def test_threshold_other_than_one():
    spikes, membrane = trajectory([0.75, 0.75, 0.75], v_th=1.5)
    assert spikes == [0, 1, 0]
    assert membrane == [0.75, 0.0, 0.75]


def test_strong_input_fires_every_step_and_keeps_surplus():
    spikes, membrane = trajectory([2.5, 0.0, 0.0])
    assert spikes == [1, 1, 0]
    assert membrane == [1.5, 0.5, 0.5]


@pytest.mark.parametrize("T", [1, 7, 32, 101])
def test_if_rate_converges_to_clamped_ratio(T):
    torch.manual_seed(T)
    v_th = 0.8
    current = torch.rand(500) * 2.0 - 0.5  # below 0, inside and above the firing range
    spikes = if_multistep(current.expand(T, -1).contiguous(), v_th)
    rate = spikes.mean(0)
    target = torch.clamp(current / v_th, 0, 1)
    assert (rate - target).abs().max() <= 1.0 / T + 1e-6


def test_step_and_multistep_agree_bitwise():
    torch.manual_seed(0)
    current = torch.randn(13, 4, 5)
    multi = if_multistep(current, 0.7, 0.9)
    v = torch.zeros(4, 5)
    for t in range(13):
        s, v = if_step(current[t], v, 0.7, 0.9)
        assert torch.equal(s, multi[t])


def test_params_are_frozen_and_validated():
    p = NeuronParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.v_th = 2.0
    with pytest.raises(ValueError, match="leak"):
        NeuronParams(leak=1.5)
    with pytest.raises(ValueError, match="v_th"):
        NeuronParams(v_th=0.0)
