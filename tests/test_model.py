import pytest
import torch
from helpers import assert_same_rates, batch, firing_model

from spikeinfer.model import SpikingBert, compact

UNEVEN = [[3, 5, 4, 7, 2, 6], [1, 2, 3, 4, 5, 6]]


def run(model, backend, *args, **kwargs):
    model.to_backend(backend)
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        model.to_backend("torch")


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("T", [1, 2, 9])
def test_step_and_multistep_agree_unrolled(binary, T):
    model = firing_model(seed=T, binary=binary)
    ids, mask, types = batch(T)
    a = run(model, "torch", ids, mask, types, timesteps=T)
    b = run(model, "torch-step", ids, mask, types, timesteps=T)
    assert_same_rates(a, b, f"unrolled T={T}")
    assert torch.equal(a.logits, b.logits)
    # the network does fire somewhere in every block
    assert all(a.asr[f"{l}.O2"] > 0 for l in range(2))


@pytest.mark.parametrize("seed", [0, 5])
def test_step_and_multistep_agree_sequential_uneven_timesteps(seed):
    model = firing_model(seed=seed).set_timesteps(UNEVEN, t_emb=5)
    ids, mask, types = batch(seed)
    a = run(model, "torch", ids, mask, types, mode="sequential", seed=seed)
    b = run(model, "torch-step", ids, mask, types, mode="sequential", seed=seed)
    assert_same_rates(a, b, "sequential")
    assert a.timesteps["0.O1"] == 7 and a.timesteps["emb"] == 5


@pytest.mark.parametrize("mode", ["unrolled", "sequential"])
def test_step_and_multistep_agree_with_masks(mode):
    model = firing_model(seed=3)
    model.head_mask[0, 2] = 0
    model.neuron_mask[1, ::2] = 0
    ids, mask, types = batch(3)
    a = run(
        model, "torch", ids, mask, types, mode=mode, timesteps=6 if mode == "unrolled" else None
    )
    b = run(
        model,
        "torch-step",
        ids,
        mask,
        types,
        mode=mode,
        timesteps=6 if mode == "unrolled" else None,
    )
    assert_same_rates(a, b, f"masked {mode}")


def test_unrolled_default_T_is_the_models_own_uniform_count():
    model = firing_model(seed=2)
    t_conv = model.config.t_conv
    assert model.unrolled_timesteps == t_conv
    model.set_timesteps(UNEVEN, t_emb=4)  # per-sublayer counts: unrolled runs at T_conv
    assert model.unrolled_timesteps == t_conv
    model.set_timesteps([[3] * 6, [3] * 6], t_emb=5)  # the embedding's differs
    assert model.unrolled_timesteps == t_conv
    model.set_timesteps([[3] * 6, [3] * 6], t_emb=3)  # what a uniform adaptive stage leaves
    assert model.unrolled_timesteps == 3
    ids, mask, types = batch(2)
    for backend in ("torch", "torch-step"):
        default = run(model, backend, ids, mask, types)
        explicit = run(model, backend, ids, mask, types, timesteps=3)
        assert_same_rates(default, explicit, f"{backend} default T")
        assert torch.equal(default.logits, explicit.logits)


def test_sequential_is_reproducible_from_seed():
    model = firing_model(seed=1)
    ids, mask, types = batch(1)
    with torch.no_grad():
        a = model(ids, mask, types, mode="sequential", timesteps=UNEVEN, seed=11)
        b = model(ids, mask, types, mode="sequential", timesteps=UNEVEN, seed=11)
        c = model(ids, mask, types, mode="sequential", timesteps=UNEVEN, seed=12)
    assert_same_rates(a, b, "same seed")
    assert not torch.equal(a.rates["1.O2"], c.rates["1.O2"])


def test_sequential_rates_match_unrolled_for_long_T():
    """Linear sublayers see the same mean input current in both modes, so their rates agree up
    to Bernoulli noise and the 1/T quantisation."""
    model = firing_model(seed=2)
    ids, mask, types = batch(2)
    T = 600
    model.set_timesteps([[T] * 6] * 2, t_emb=T)
    with torch.no_grad():
        unrolled = model(ids, mask, types, timesteps=T)
        sequential = model(ids, mask, types, mode="sequential", seed=0)
    valid = mask.bool()
    assert torch.equal(unrolled.rates["emb"], sequential.rates["emb"])  # deterministic layer
    for name in ("0.K", "0.V"):
        diff = (unrolled.rates[name] - sequential.rates[name])[valid].abs()
        assert diff.mean() < 0.02, (name, diff.mean())
    for name in unrolled.asr:  # every sublayer's mean ASR stays close
        assert abs(unrolled.asr[name] - sequential.asr[name]) < 0.15, name


@pytest.mark.parametrize("mode", ["unrolled", "sequential"])
def test_compaction_matches_masking_including_empty_layer(mode):
    model = firing_model(seed=4).set_timesteps(UNEVEN, t_emb=4)
    model.head_mask[0, 1] = 0
    model.head_mask[1] = 0  # every head of block 1 pruned: only the residual path is left
    model.neuron_mask[0, ::3] = 0
    model.neuron_mask[1, :10] = 0
    ids, mask, types = batch(4)
    kwargs = {"mode": mode, "seed": 9, "timesteps": 7 if mode == "unrolled" else None}
    small = compact(model)
    assert [b.num_heads for b in small.layers] == [3, 0]
    assert [b.num_neurons for b in small.layers] == [64 - 22, 54]
    with torch.no_grad():
        masked = model(ids, mask, types, **kwargs)
        compacted = small(ids, mask, types, **kwargs)
    assert torch.equal(masked.logits, compacted.logits)
    for name in ("0.O1", "0.O2", "1.O1", "1.O2"):
        assert torch.equal(masked.rates[name], compacted.rates[name]), name
    # the kept units of a compacted sublayer fire exactly like in the masked model
    kept = small.layers[0].kept_neurons
    assert torch.equal(masked.rates["0.F"][..., kept], compacted.rates["0.F"])


def test_compaction_of_compacted_model_and_relaxed_mask_rejected():
    model = firing_model(seed=5)
    model.head_mask[0, 0] = 0
    once = compact(model)
    once.head_mask[0, 3] = 0
    twice = compact(once)
    assert twice.layers[0].kept_heads.tolist() == [1, 2]
    model.head_mask[0, 1] = 0.5
    with pytest.raises(ValueError, match="binary head_mask"):
        compact(model)


def test_traces_are_running_rates():
    model = firing_model(seed=6)
    ids, mask, types = batch(6)
    with torch.no_grad():
        out = model(ids, mask, types, timesteps=8, record_traces=True)
        step = run(model, "torch-step", ids, mask, types, timesteps=8, record_traces=True)
    trace = out.traces["0.F"]
    assert trace.shape == (8, 64)
    valid = mask.float()
    final = (out.rates["0.F"] * valid[..., None]).sum((0, 1)) / valid.sum()
    assert torch.allclose(trace[-1], final, atol=1e-6)
    assert torch.allclose(step.traces["0.F"], trace)


def test_padding_does_not_change_real_tokens():
    # 5 tokens padded to 7: both rows stay under the 8 float lanes of torch's AVX2 softmax (and
    # the 16 of its AVX-512 one), which sums shorter rows left to right, so the padding adds exact
    # zeros at the end; a padded row of 8 or more is summed as lanes, in another order.
    model = firing_model(seed=7)
    ids, mask, types = batch(7, B=1, N=5, pad_from=(None,))
    padded_ids = torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], 1)
    padded_mask = torch.cat([mask, torch.zeros(1, 2, dtype=torch.long)], 1)
    padded_types = torch.cat([types, torch.ones(1, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(ids, mask, types, timesteps=6)
        b = model(padded_ids, padded_mask, padded_types, timesteps=6)
    for name in a.rates:
        assert torch.allclose(a.rates[name], b.rates[name][:, :5], atol=0), name


def test_surrogate_swap_values_and_gradients():
    model = firing_model(seed=8)
    model.train()
    ids, mask, types = batch(8)
    with torch.no_grad():
        snn = model(ids, mask, types, timesteps=16)
    out = model.surrogate(
        ids,
        mask,
        types,
        snn_rates=snn.rates,
        output_attention_scores=True,
        output_hidden_states=True,
    )
    for name, r in snn.rates.items():
        assert torch.allclose(out.rates[name], r, atol=1e-6), name
    assert torch.allclose(out.logits, snn.logits, atol=1e-5)
    assert len(out.attention_scores) == 2 and out.attention_scores[0].shape == (3, 4, 7, 7)
    assert len(out.hidden_states) == 3
    out.logits.sum().backward()
    grad = model.layers[0].ffn1.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # through the surrogate and the STE
    plain = model.surrogate(ids, mask, types)
    assert all(((r >= 0) & (r <= 1)).all() for r in plain.rates.values())


def test_clamp_leak_keeps_values_and_passes_gradient_outside_the_range():
    """With clamp_leak the rates (and so the logits) are the plain clamp's; the current of a
    neuron clamped at 0 or 1 gets clamp_leak / V_th of gradient where the plain clamp gives none,
    and one inside the range gets 1 / V_th either way."""
    model = firing_model(seed=8)
    ids, mask, types = batch(8)
    currents = {}

    def grab(module, inputs, output):
        output.retain_grad()
        currents["emb"] = output

    handle = model.embeddings.register_forward_hook(grab)
    grads, rates = {}, {}
    try:
        for leak in (0.0, 0.25):
            model.zero_grad()
            out = model.surrogate(ids, mask, types, clamp_leak=leak)
            out.rates["emb"].sum().backward(retain_graph=True)
            grads[leak], rates[leak] = currents["emb"].grad, out.rates["emb"].detach()
            assert torch.equal(out.logits, model.surrogate(ids, mask, types).logits), (
                "values changed"
            )
    finally:
        handle.remove()
    assert torch.equal(rates[0.0], rates[0.25])
    v_th = model.threshold(0).detach()
    u = currents["emb"].detach() / v_th
    inside, outside = (u > 0) & (u < 1), (u < 0) | (u > 1)
    assert inside.any() and outside.any()
    assert torch.allclose(grads[0.0][inside], (1 / v_th).expand_as(u)[inside])
    assert torch.equal(grads[0.0][outside], torch.zeros_like(grads[0.0][outside]))
    assert torch.allclose(grads[0.25][inside], (1 / v_th).expand_as(u)[inside])
    assert torch.allclose(grads[0.25][outside], (0.25 / v_th).expand_as(u)[outside])
    with pytest.raises(ValueError, match="clamp_leak"):
        model.surrogate(ids, mask, types, clamp_leak=-0.1)


def test_mask_gradients_for_fisher():
    model = firing_model(seed=9)
    ids, mask, types = batch(9)
    head_mask = torch.ones(2, 4, requires_grad=True)
    neuron_mask = torch.ones(2, 64, requires_grad=True)
    out = model.surrogate(ids, mask, types, head_mask=head_mask, neuron_mask=neuron_mask)
    out.logits.logsumexp(-1).sum().backward()
    assert head_mask.grad.abs().sum() > 0 and neuron_mask.grad.abs().sum() > 0


def test_bad_inputs_are_named():
    model = firing_model()
    ids, mask, types = batch()
    with pytest.raises(ValueError, match="unknown mode"):
        model(ids, mask, types, mode="async")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="timesteps must be 2 lists"):
        model.set_timesteps([[1] * 6])
    with pytest.raises(ValueError, match="unknown backend"):
        model.to_backend("fpga")
    assert isinstance(model, SpikingBert)
