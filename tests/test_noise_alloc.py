"""Noise-aware timestep allocation: the sqrt rule on hand-made cases, budgets, the tiny model."""

import itertools
import math

import pytest
import torch
from helpers import batch, firing_model

from spikeinfer import cost
from spikeinfer.prune import noise_alloc as na
from spikeinfer.prune.temporal import flatten_timesteps, sublayer_names, unflatten_timesteps


def _sens(drops, timesteps, error=1.0):
    names = [f"s{i}" for i in range(len(drops))]
    return {"error": error, "drop": dict(zip(names, drops, strict=True)), "timesteps": timesteps}


def _linear(costs):
    return lambda flat: sum(c * t for c, t in zip(costs, flat, strict=True))


def test_sqrt_rule_on_a_hand_computed_case():
    # s_l = 2 t_l drop_l = 8, 32, 8 and c_l = 1, 2, 8: sqrt(s/c) = 2.83, 4, 1, ratio 2.83 : 4 : 1.
    sens = _sens([0.4, 1.6, 0.4], [10, 10, 10])
    costs = [1.0, 2.0, 8.0]
    flat = na.allocate_by_noise(sens, _linear(costs), budget=100.0, t_conv=1000, floor=0)
    assert _linear(costs)(flat) <= 100.0
    lam = 100.0 / (math.sqrt(8) * 1 + 4 * 2 + 1 * 8)
    expected = [lam * math.sqrt(8), lam * 4, lam * 1]
    assert flat == pytest.approx(expected, abs=1.0)
    # Latency budget (every step costs 1): t proportional to sqrt(s).
    flat = na.allocate_by_noise(sens, na.latency_fn, budget=20.0, t_conv=1000, floor=0)
    assert sum(flat) / 3 <= 20.0
    assert flat[1] / flat[0] == pytest.approx(2.0, rel=0.1) and flat[0] == flat[2]


def test_budget_caps_floor_and_free_sublayers():
    sens = _sens([1.0, 0.0, -0.5, 0.2], [20, 20, 20, 20], error=10.0)
    costs = [1.0, 1.0, 1.0, 0.0]  # the last costs nothing, as the embedding under an ACs budget
    flat = na.allocate_by_noise(sens, _linear(costs), budget=60.0, t_conv=40, floor=0.01)
    assert flat[3] == 40 and _linear(costs)(flat) <= 60.0
    assert max(flat) <= 40 and min(flat) >= 1
    # Zero and negative drops count as the floor (1 % of the error), equally.
    assert flat[1] == flat[2] and 1 <= flat[1] < flat[0]
    # Without a floor they would get the least count.
    bare = na.allocate_by_noise(sens, _linear(costs), budget=60.0, t_conv=40, floor=0.0)
    assert bare[1] == 1
    with pytest.raises(ValueError, match="below the cost of one step"):
        na.allocate_by_noise(sens, _linear(costs), budget=2.0, t_conv=40)
    with pytest.raises(ValueError, match="must agree"):
        na.allocate_by_noise(
            {**sens, "timesteps": [20, 20, 20]}, _linear(costs[:3]), budget=60.0, t_conv=40
        )


def test_allocation_is_near_the_integer_optimum():
    """On brute-forceable cases the rounded continuous optimum is within a few per cent of the
    best integer allocation of sum s_l / t_l under the budget, and beats uniform scaling."""
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        drops = (torch.rand(3, generator=g) + 0.05).tolist()
        costs = (torch.rand(3, generator=g) * 3 + 0.5).tolist()
        base = [8, 8, 8]
        sens = _sens(drops, base, error=1.0)
        budget = 30.0
        flat = na.allocate_by_noise(sens, _linear(costs), budget, t_conv=24, floor=0)
        s = [2 * t * d for t, d in zip(base, drops, strict=True)]

        def objective(ts, s=s):
            return sum(si / t for si, t in zip(s, ts, strict=True))

        feasible = [
            ts for ts in itertools.product(range(1, 25), repeat=3) if _linear(costs)(ts) <= budget
        ]
        best = min(objective(ts) for ts in feasible)
        assert _linear(costs)(flat) <= budget
        assert objective(flat) <= 1.05 * best
        uniform = max(t for t in range(1, 25) if _linear(costs)([t] * 3) <= budget)
        assert objective(flat) <= objective([uniform] * 3) + 1e-12


def test_step_costs_of_the_ac_model():
    model = firing_model(0)
    flat = flatten_timesteps(model.timesteps, model.t_emb)
    acs = na.acs_fraction_fn(model, seq_len=7)
    costs = na.step_costs(acs, flat)
    assert costs[0] == 0.0 and all(c > 0 for c in costs[1:])
    # At T_conv everywhere the model is the dense one.
    assert acs(flat) == pytest.approx(1.0)
    timesteps, t_emb = unflatten_timesteps(flat)
    assert (timesteps, t_emb) == (model.timesteps, model.t_emb)
    dense = cost.dense_ac_count(model.config, 7)
    more = list(flat)
    more[4] += 1  # layer 0's O1 (flat order: emb, K, V, A, O1, ...)
    # One more W_O step per kept head: N D d accumulates (cost.py's head term).
    cfg = model.config
    per_step = cfg.num_heads * 7 * cfg.hidden_size * cfg.head_dim
    assert acs(more) - acs(flat) == pytest.approx(per_step / dense)


def test_sensitivities_on_the_tiny_model_restore_its_timesteps():
    model = firing_model(0)
    model.set_timesteps([[3, 4, 5, 3, 4, 2], [2, 3, 4, 5, 3, 3]], 4)
    ids, mask, types = batch(0)
    batches = [{"input_ids": ids, "attention_mask": mask, "token_type_ids": types}]
    before = (model.timesteps, model.t_emb)
    seen = []
    sens = na.noise_sensitivities(model, batches, seeds=(0, 1), report=lambda *r: seen.append(r))
    assert (model.timesteps, model.t_emb) == before
    assert seen == list(sens["drop"].items())
    assert list(sens["drop"]) == sublayer_names(2)
    assert sens["timesteps"] == flatten_timesteps(*before) and sens["error"] > 0
    # Counter-based draws: the measurement is reproducible from its seeds.
    assert na.noise_sensitivities(model, batches, seeds=(0, 1)) == sens
    with pytest.raises(ValueError, match="at least one calibration batch"):
        na.noise_sensitivities(model, [])
