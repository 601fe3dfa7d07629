"""Spatial and temporal post-training pruning on tiny models (DESIGN sections 7-8)."""

import itertools

import pytest
import torch
from helpers import batch, firing_model

from spikeinfer import cost
from spikeinfer.config import SUBLAYERS
from spikeinfer.model import SpikingOutput, compact
from spikeinfer.prune import spatial, temporal


def _brute_force(h_imp, n_imp, h_cost, n_cost, budget):
    """Best total importance over every subset of units (costs per layer and unit type)."""
    units = [
        (float(h_imp[l, i]), h_cost[l])
        for l in range(h_imp.shape[0])
        for i in range(h_imp.shape[1])
    ]
    units += [
        (float(n_imp[l, j]), n_cost[l])
        for l in range(n_imp.shape[0])
        for j in range(n_imp.shape[1])
    ]
    best = 0.0
    for keep in itertools.product((0, 1), repeat=len(units)):
        c = sum(k * u[1] for k, u in zip(keep, units, strict=True))
        if c <= budget:
            best = max(best, sum(k * u[0] for k, u in zip(keep, units, strict=True)))
    return best


def _total(mask_h, mask_n, h_imp, n_imp):
    return float((mask_h.double() * h_imp).sum() + (mask_n.double() * n_imp).sum())


def _cost(mask_h, mask_n, h_cost, n_cost):
    return sum(
        int(mask_h[l].sum()) * h_cost[l] + int(mask_n[l].sum()) * n_cost[l]
        for l in range(mask_h.shape[0])
    )


@pytest.mark.parametrize("seed", range(12))
def test_search_is_optimal_on_brute_forceable_cases(seed):
    # With one cost per unit type, the best subset of any size is "top-k heads + top-m
    # neurons", so brute force over all 2^10 subsets checks the search exactly.
    g = torch.Generator().manual_seed(seed)
    h_imp = torch.rand(2, 2, generator=g, dtype=torch.float64)
    n_imp = torch.rand(2, 3, generator=g, dtype=torch.float64) * 0.6
    h_cost, n_cost = [7, 7], [2, 2]
    for budget in (0, 1, 5, 9, 13, 20, 40):
        mh, mn = spatial.search_masks(h_imp, n_imp, h_cost, n_cost, budget)
        assert _cost(mh, mn, h_cost, n_cost) <= budget
        assert _total(mh, mn, h_imp, n_imp) == pytest.approx(
            _brute_force(h_imp, n_imp, h_cost, n_cost, budget)
        )


@pytest.mark.parametrize("seed", range(8))
def test_search_never_exceeds_budget_and_is_best_of_its_family(seed):
    # Costs that differ by layer (per-sublayer timesteps): the search must stay within budget
    # and be the best "k best heads + longest prefix of best neurons" combination.
    g = torch.Generator().manual_seed(100 + seed)
    h_imp = torch.rand(3, 4, generator=g, dtype=torch.float64)
    n_imp = torch.rand(3, 6, generator=g, dtype=torch.float64)
    h_cost = torch.randint(5, 40, (3,), generator=g).tolist()
    n_cost = torch.randint(1, 9, (3,), generator=g).tolist()
    allowed_h = torch.rand(3, 4, generator=g) > 0.2
    full = _cost(torch.ones(3, 4), torch.ones(3, 6), h_cost, n_cost)
    h_rank = sorted(
        ((float(h_imp.view(-1)[i]), i) for i in allowed_h.view(-1).nonzero().flatten().tolist()),
        key=lambda t: -t[0],
    )
    n_rank = sorted(((float(n_imp.view(-1)[i]), i) for i in range(18)), key=lambda t: -t[0])
    for frac in (0.0, 0.1, 0.3, 0.6, 0.9, 1.0):
        budget = int(frac * full)
        mh, mn = spatial.search_masks(h_imp, n_imp, h_cost, n_cost, budget, allowed_h)
        assert _cost(mh, mn, h_cost, n_cost) <= budget
        assert not bool((mh.bool() & ~allowed_h).any())
        best = 0.0
        for k in range(len(h_rank) + 1):
            used = sum(h_cost[i // 4] for _, i in h_rank[:k])
            if used > budget:
                break
            total = sum(v for v, _ in h_rank[:k])
            for v, j in n_rank:
                if used + n_cost[j // 6] > budget:
                    break
                used += n_cost[j // 6]
                total += v
            best = max(best, total)
        assert _total(mh, mn, h_imp, n_imp) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(10))
def test_refinement_never_increases_objective_and_keeps_counts(seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(16, 20, generator=g)
    grads[:, :5] *= 3.0
    keep = torch.zeros(20, dtype=torch.bool)
    keep[torch.randperm(20, generator=g)[:9]] = True
    allowed = torch.ones(20, dtype=torch.bool)
    allowed[-2:] = False
    keep[-2:] = False
    before = spatial.pruned_fisher_loss(grads, keep, allowed)
    refined = spatial.refine_layer(grads, keep, allowed)
    assert int(refined.sum()) == int(keep.sum())
    assert not bool(refined[-2:].any())  # removed units never come back
    after = spatial.pruned_fisher_loss(grads, refined, allowed)
    assert after <= before + 1e-9
    # A local optimum: no single swap improves further.
    for p in (~refined & allowed).nonzero().flatten().tolist():
        for k in refined.nonzero().flatten().tolist():
            trial = refined.clone()
            trial[p], trial[k] = True, False
            assert spatial.pruned_fisher_loss(grads, trial, allowed) >= after - 1e-6


def _sst2_like_batches(vocab=30522, n=3):
    out = []
    for s in range(n):
        ids, mask, types = batch(seed=s, B=4, N=9, vocab=vocab, pad_from=(None, 6, 4, 8))
        out.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "token_type_ids": types,
                "labels": torch.tensor([0, 1, 1, 0]),
            }
        )
    return out


@pytest.fixture(scope="module")
def fisher_model():
    model = firing_model(3)
    fisher = spatial.compute_fisher(model, _sst2_like_batches(vocab=100), timesteps=6)
    return model, fisher


def test_fisher_shapes_and_asr(fisher_model):
    model, fisher = fisher_model
    cfg = model.config
    assert fisher.head_grads.shape == (3, cfg.num_layers, cfg.num_heads)
    assert fisher.neuron_grads.shape == (3, cfg.num_layers, cfg.intermediate_size)
    assert bool((fisher.head_grads != 0).any()) and bool((fisher.neuron_grads != 0).any())
    assert bool((fisher.head_asr >= 0).all()) and bool((fisher.head_asr <= 1).all())
    # Head ASRs average to the A sublayer's ASR on the same inputs.
    ids, mask, types = (
        _sst2_like_batches(vocab=100)[0][k]
        for k in ("input_ids", "attention_mask", "token_type_ids")
    )
    single = spatial.compute_fisher(model, _sst2_like_batches(vocab=100)[:1], timesteps=6)
    out = model(ids, mask, types, timesteps=6)
    assert float(single.head_asr[0].mean()) == pytest.approx(out.asr["0.A"], rel=1e-5)
    assert float(single.neuron_asr[1].mean()) == pytest.approx(out.asr["1.F"], rel=1e-5)
    with pytest.raises(ValueError, match="unknown importance"):
        spatial.importance(fisher, "asr")
    h, n = spatial.importance(fisher, "fim+asr-neurons")
    assert torch.allclose(h, fisher.head_fisher.double())
    assert torch.allclose(n, (fisher.neuron_fisher * fisher.neuron_asr).double())


@pytest.mark.parametrize("mode", ["unrolled", "sequential"])
def test_pruned_model_within_budget_and_compaction_matches_masks(fisher_model, mode):
    model, fisher = fisher_model
    hm, nm, summary = spatial.spatial_masks(model, fisher, budget=0.5)
    n = round(fisher.seq_len)
    assert cost.ac_count(model.config, hm, nm, model.timesteps, n) <= 0.5 * cost.dense_ac_count(
        model.config, n
    )
    assert summary["fisher_loss"] <= summary["fisher_loss_before_refinement"] + 1e-9
    masked = spatial.apply_masks(firing_model(3), hm, nm)
    small = compact(masked)
    assert [b.num_heads for b in small.layers] == summary["heads_per_layer"]
    ids, mask, types = batch(seed=9, B=3, N=8)
    kwargs = {"mode": mode, "seed": 4, "timesteps": 6 if mode == "unrolled" else None}
    with torch.no_grad():  # inference: latent and frozen 1-bit weights agree bit for bit
        a, b = masked(ids, mask, types, **kwargs), small(ids, mask, types, **kwargs)
    assert torch.equal(a.logits, b.logits)
    for l, block in enumerate(small.layers):
        assert torch.equal(a.rates[f"{l}.O2"], b.rates[f"{l}.O2"])
        assert torch.equal(a.rates[f"{l}.F"][..., block.kept_neurons], b.rates[f"{l}.F"])
        cols = block.attention_columns()
        assert torch.equal(a.rates[f"{l}.A"][..., cols], b.rates[f"{l}.A"])
    # Pruning a compacted model again only ever drops what it still has.
    f2 = spatial.compute_fisher(small, _sst2_like_batches(vocab=100)[:2], timesteps=4)
    hm2, nm2, _ = spatial.spatial_masks(small, f2, budget=0.3)
    assert not bool((hm2.bool() & ~hm.bool()).any()) and not bool((nm2.bool() & ~nm.bool()).any())


# -- temporal -----------------------------------------------------------------------------------


class _TraceStub:
    """Stands in for a model: every forward returns the given traces (and fixed valid counts)."""

    def __init__(self, traces_per_call):
        self.calls = iter(traces_per_call)

    def __call__(self, ids, mask, types, *, timesteps, record_traces):
        traces = next(self.calls)
        return SpikingOutput(ids.float(), {}, {}, traces)


def test_pca_counts_through_trace_collection():
    torch.manual_seed(0)
    T, names = 40, ["emb"] + [f"{l}.{s}" for l in range(2) for s in SUBLAYERS]
    ranks = {name: 1 + i % 5 for i, name in enumerate(names)}
    full = {name: torch.randn(T, r) @ torch.randn(r, 24) for name, r in ranks.items()}
    # Two batches whose token-weighted mean is exactly `full`: one with 1 real token of
    # 2 * full - x, one with 1 real token of x (x rank-1 inside the same span).
    x = {name: full[name] * 0.25 for name in names}
    first = {name: 2 * full[name] - x[name] for name in names}
    b1 = {
        "input_ids": torch.ones(1, 3, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 0, 0]]),
        "token_type_ids": torch.zeros(1, 3, dtype=torch.long),
    }
    stub = _TraceStub([first, x])
    traces = temporal.collect_traces(stub, [b1, b1], t_conv=T)
    for name in names:
        assert torch.allclose(traces[name], full[name], atol=1e-5)
    counts = temporal.pca_counts(traces, variance=0.99999)
    assert counts == ranks
    timesteps, t_emb = temporal.allocate_model_timesteps(counts, 2, base=2.0, t_conv=T)
    flat = [t_emb] + [t for row in timesteps for t in row]
    assert flat == temporal.allocate_timesteps([ranks[n] for n in names], 2.0, T)
    assert max(flat) == T


def test_temporal_post_training_on_a_model():
    model = firing_model(1, t_conv=12)
    info = temporal.temporal_prune(model, _sst2_like_batches(vocab=100), variance=0.999, base=1.1)
    assert set(info["pca_components"]) == set(model.sublayer_names())
    assert model.timesteps == info["timesteps"] and model.t_emb == info["t_emb"]
    flat = [model.t_emb] + [t for row in model.timesteps for t in row]
    assert max(flat) == 12 and min(flat) >= 1
    out = model(*batch(seed=1, B=2, N=5)[:3], mode="sequential", seed=1)
    assert out.timesteps["0.K"] == model.timesteps[0][0]
