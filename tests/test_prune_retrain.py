"""Retraining pieces: trainable copies of frozen models, relaxed masks, losses, the loop."""

import json

import numpy as np
import pytest
import torch
from helpers import batch, firing_model

from spikeinfer import cost
from spikeinfer.data import Encoded, collate
from spikeinfer.model import compact
from spikeinfer.prune import retrain as rt
from spikeinfer.prune.temporal import scale_timesteps
from spikeinfer.train import DistInfo


def test_make_trainable_reproduces_frozen_binary_weights():
    model = firing_model(2)
    model.head_mask[0, 1] = 0
    model.neuron_mask[1, ::2] = 0
    small = compact(model)  # frozen signs and scales, some rows and columns removed
    frozen = {
        (l, n): tuple(t.clone() for t in getattr(b, n).binary_weights())
        for l, b in enumerate(small.layers)
        for n in rt.PROJECTIONS
    }
    ids, mask, types = batch(2)
    # The rate surrogate is continuous, so scales equal to float rounding give equal outputs (a
    # spiking run may flip a spike sitting exactly on the threshold).
    with torch.no_grad():
        before = small.surrogate(ids, mask, types)
    rt.make_trainable(small)
    for (l, n), (signs, alpha) in frozen.items():
        proj = getattr(small.layers[l], n)
        assert not proj.frozen and proj.weight.requires_grad
        s, a = proj.binary_weights()
        assert torch.equal(s, signs)
        assert torch.allclose(a, alpha, rtol=1e-6, atol=0)
    with torch.no_grad():
        after = small.surrogate(ids, mask, types)
    assert torch.allclose(before.logits, after.logits, atol=1e-5)


def test_relaxed_masks_are_binary_with_sigmoid_gradients():
    model = firing_model(0)
    model.head_mask[0, 2] = 0
    model.neuron_mask[1, :5] = 0
    small = compact(model)
    small.neuron_mask[0, 3] = 0  # pruned but still present: may come back
    masks = rt.RelaxedMasks(small, init=1.5)
    hm, nm = masks()
    assert set(hm.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hm, small.head_mask) and torch.equal(nm, small.neuron_mask)
    (hm.sum() + 2 * nm.sum()).backward()
    sig = torch.sigmoid(torch.tensor(1.5))
    slope = float(sig * (1 - sig))
    assert masks.head_logits.grad[0, 2] == 0  # compacted away: no gradient
    assert masks.head_logits.grad[0, 0] == pytest.approx(slope)
    assert masks.neuron_logits.grad[0, 3] == pytest.approx(2 * slope)
    assert masks.neuron_logits.grad[1, 0] == 0


def test_activity_loss_value_and_gradient_at_silence():
    rates = {"emb": torch.zeros(2, 3, 4, requires_grad=True)}
    rates["0.O2"] = torch.zeros(2, 3, 4, requires_grad=True)
    rates["1.O2"] = torch.full((2, 3, 4), 0.5, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = rt.activity_loss(rates, mask, 2)
    expected = (0.5 * (8**0.5) + 0.5 * 2.0) / 2  # per example ||a||: sqrt(8 * .25), sqrt(4 * .25)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(rates["0.O2"].grad).all()
    assert rates["1.O2"].grad[0, 2].abs().sum() == 0  # padding carries no activity


def test_scale_timesteps_meets_the_latency_target():
    steps = [[85, 60, 85, 70, 40, 85], [30, 30, 85, 85, 85, 12]]
    scaled, t_emb = scale_timesteps(steps, 85, 0.16 * 85)
    assert cost.latency(scaled, t_emb) <= 0.16 * 85
    assert min(min(r) for r in scaled) >= 1
    assert scale_timesteps(steps, 85, 100) == (steps, 85)
    tiny, _ = scale_timesteps([[2] * 6], 2, 0.1)
    assert tiny == [[1] * 6]


def _toy_train(n=24, vocab=100, seed=0):
    g = np.random.default_rng(seed)
    lengths = g.integers(3, 9, n)
    ids = [[1] + g.integers(1, vocab, k - 1).tolist() for k in lengths]
    return Encoded(
        input_ids=ids,
        token_type_ids=[[0] * len(x) for x in ids],
        attention_mask=[[1] * len(x) for x in ids],
        labels=g.integers(0, 2, n),
    )


def _retrain(model, cfg, out, steps=3, resume=False, lr=1e-3):
    train = _toy_train()
    calib = [collate(train, list(range(8)))]
    return rt.retrain(
        model,
        cfg,
        train=train,
        collate_fn=lambda idx: collate(train, idx),
        out=out,
        steps=steps,
        lr=lr,
        batch_size=8,
        seed=0,
        resume=resume,
        info=DistInfo(),
        regression=False,
        calib=calib,
        save_every=1,
    )


def test_ac_penalty_prunes_and_masks_are_installed(tmp_path):
    model = firing_model(1)
    cfg = rt.RetrainConfig(
        mode="unrolled",
        sim_timesteps=4,
        relax_masks=True,
        mask_init=1.0,
        mask_lr=0.6,
        ac_lambda=1e3,
        penalty_fraction=1.0,
        seq_len=6,
    )
    summary = _retrain(model, cfg, tmp_path / "spatial")
    kept = sum(summary["heads_per_layer"]) + sum(summary["neurons_per_layer"])
    assert kept < model.config.num_layers * (model.config.num_heads + 64)
    assert set(model.head_mask.unique().tolist()) <= {0.0, 1.0}
    assert summary["heads_per_layer"] == [int(x) for x in model.head_mask.sum(1)]


def test_sequential_retraining_reallocates_and_resumes(tmp_path):
    model = firing_model(4, t_conv=10)
    cfg = rt.RetrainConfig(
        mode="sequential", activity_eta=1e-3, realloc_every=1, variance=0.99, base=1.3
    )
    out = tmp_path / "temporal"
    summary = _retrain(model, cfg, out)
    history = json.loads((out / rt.HISTORY_NAME).read_text())
    assert [e["step"] for e in history] == [1, 2] and summary["reallocations"] == 2
    assert model.timesteps == history[-1]["timesteps"] and model.t_emb == history[-1]["t_emb"]
    # A fresh model resumed from the saved state at its end gets the same timesteps back.
    again = firing_model(4, t_conv=10)
    _retrain(again, cfg, out, resume=True)
    assert again.timesteps == model.timesteps
    for a, b in zip(again.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_adaptive_thresholds_learn(tmp_path):
    model = firing_model(5).set_timesteps([[2] * 6] * 2, t_emb=2)
    cfg = rt.RetrainConfig(mode="sequential", train_thresholds=True, vth_lr=0.05)
    _retrain(model, cfg, tmp_path / "adaptive", lr=0.0)
    assert not torch.allclose(model.v_th, torch.ones_like(model.v_th))
    assert not model.v_th.requires_grad


def test_final_masks_are_projected_into_the_budget():
    model = firing_model(1)
    masks = rt.RelaxedMasks(model, init=1.0)
    with torch.no_grad():
        masks.head_logits.copy_(torch.linspace(0.1, 3.0, 8).view(2, 4))
        masks.neuron_logits.copy_(torch.linspace(-1.0, 2.0, 128).view(2, 64))
    hard_h, hard_n = masks.hard()
    cfg, n = model.config, 6
    hm, nm = rt.project_to_budget(model, masks, 0.4, n)
    assert cost.ac_count(cfg, hm, nm, model.timesteps, n) <= 0.4 * cost.dense_ac_count(cfg, n)
    assert not bool((hm.bool() & ~hard_h.bool()).any()) and not bool(
        (nm.bool() & ~hard_n.bool()).any()
    )
    # the kept heads are the most confident ones
    kept, dropped = masks.head_logits[hm.bool()], masks.head_logits[~hm.bool()]
    assert len(dropped) == 0 or kept.min() >= dropped.max()
    same_h, same_n = rt.project_to_budget(model, masks, 1.0, n)
    assert torch.equal(same_h, hard_h) and torch.equal(same_n, hard_n)


def test_retraining_keeps_the_word_embedding_table_frozen(tmp_path):
    # Distilled students keep the teacher package's table, referenced by hash in checkpoints;
    # retraining it would make every pruned checkpoint store 47 MB of embeddings.
    model = firing_model(3)
    table = model.embeddings.word_embeddings.weight.detach().clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _retrain(model, rt.RetrainConfig(mode="unrolled", sim_timesteps=4), tmp_path / "r")
    assert torch.equal(model.embeddings.word_embeddings.weight, table)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before.get(n, p))]
    assert any("layers." in n for n in changed)  # the rest did train
