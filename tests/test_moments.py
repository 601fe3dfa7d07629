"""The noise-aware (moments) surrogate: its pieces against Monte-Carlo, and the whole surrogate
against the spiking model it approximates."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import batch, firing_model
from test_distill import needs_glue, tiny_run, tiny_teacher  # noqa: F401 (fixture)

from spikeinfer.distill import distill
from spikeinfer.model import Projection, gelu_expectation, layer_norm_with_noise, spike_variance
from spikeinfer.ops import attention_mask_additive


def test_gelu_expectation_is_gelu_without_noise_and_the_gaussian_mean_with_it():
    torch.manual_seed(0)
    mean = torch.linspace(-4, 4, 41, dtype=torch.float64)
    torch.testing.assert_close(gelu_expectation(mean, torch.zeros_like(mean)), F.gelu(mean))
    var = torch.full_like(mean, 0.7)
    z = mean[:, None] + var.sqrt()[:, None] * torch.randn(41, 400_000, dtype=torch.float64)
    torch.testing.assert_close(gelu_expectation(mean, var), F.gelu(z).mean(-1), rtol=0, atol=5e-3)


def test_layer_norm_with_noise_is_the_time_average_of_a_noisy_per_step_layer_norm():
    torch.manual_seed(0)
    D, steps = 256, 40_000
    ln = torch.nn.LayerNorm(D, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.2, 0.2)
    mean = 0.3 * torch.randn(D, dtype=torch.float64)
    torch.testing.assert_close(layer_norm_with_noise(ln, mean, torch.zeros(D)), ln(mean))
    noise = torch.rand(D, dtype=torch.float64) * 0.5
    steps_in = mean + noise.sqrt() * torch.randn(steps, D, dtype=torch.float64)
    expected = ln(steps_in).mean(0)
    got = layer_norm_with_noise(ln, mean, noise)
    torch.testing.assert_close(got, expected, rtol=0, atol=0.04)
    # the rate surrogate's LayerNorm overstates every deviation from beta by sqrt(1 + noise/var)
    assert (ln(mean) - ln.bias).abs().sum() > 1.5 * (got - ln.bias).abs().sum()


@pytest.mark.parametrize("binary", [False, True])
def test_projection_variance_matches_bernoulli_inputs(binary):
    torch.manual_seed(1)
    proj = Projection(37, 11, binary)
    with torch.no_grad():
        proj.weight.normal_(0, 0.5)
    rates = torch.rand(37)
    spikes = (torch.rand(200_000, 37) < rates).float()
    with torch.no_grad():
        empirical = proj(spikes).var(0)
        predicted = proj.variance(spike_variance(rates))
    torch.testing.assert_close(predicted.expand_as(empirical), empirical, rtol=0.03, atol=1e-3)


def test_moments_surrogate_tracks_the_sequential_spiking_model_closer():
    """In sequential mode every input spike is a fresh Bernoulli draw, the moments surrogate's
    own noise model: it lands nearer the spiking model's rates than the rate surrogate does,
    and it is the rate surrogate where no step carries variance."""
    model = firing_model(seed=3, binary=True)
    ids, mask, types = batch(seed=2, B=4, N=9, pad_from=(None, 6, None, 4))
    valid = mask.bool()
    model.set_timesteps([[512] * 6] * model.config.num_layers, t_emb=512)
    with torch.no_grad():
        snn = model(ids, mask, types, mode="sequential", seed=5)
        rate = model.surrogate(ids, mask, types)
        moments = model.surrogate(ids, mask, types, moments=True)
    deep = [n for n in snn.rates if n.startswith("1.")]
    err_rate = sum(float((rate.rates[n] - snn.rates[n])[valid].abs().mean()) for n in deep)
    err_moments = sum(float((moments.rates[n] - snn.rates[n])[valid].abs().mean()) for n in deep)
    assert err_moments < 0.8 * err_rate, (err_moments, err_rate)


def test_moment_currents_are_the_rate_currents_on_binary_inputs():
    """0/1 inputs carry no per-step variance, so every moment current is the plain current."""
    model = firing_model(seed=4, binary=True)
    block = model.layers[0]
    ids, mask, types = batch(seed=1, B=2, N=6, pad_from=(None, 4))
    mask_add = attention_mask_additive(mask)
    g = torch.Generator().manual_seed(0)
    D, H = model.config.hidden_size, block.num_heads * block.head_dim
    x, k, v = (torch.rand(2, 6, n, generator=g).round() for n in (D, H, H))
    a, o1, f = (torch.rand(2, 6, n, generator=g).round() for n in (H, D, block.num_neurons))
    with torch.no_grad():
        current, scores = block.current_a(x[None], k[None], v[None], mask_add, return_scores=True)
        m_current, m_scores = block.moment_a(x[None], k[None], v[None], mask_add)
        torch.testing.assert_close(m_current, current)
        torch.testing.assert_close(m_scores, scores)
        torch.testing.assert_close(block.moment_o1(a, x), block.current_o1(a, x))
        torch.testing.assert_close(block.moment_f(o1), block.current_f(o1))
        torch.testing.assert_close(block.moment_o2(f, o1), block.current_o2(f, o1))


def test_noise_scale_runs_from_the_rate_surrogate_to_the_moments_surrogate():
    """noise=0 takes every variance out (the rate surrogate's function), 1 is the default, and
    the noise in between moves the logits monotonically along the way on this model."""
    model = firing_model(seed=6, binary=True)
    ids, mask, types = batch(seed=3, B=3, N=8)
    with torch.no_grad():
        rate = model.surrogate(ids, mask, types).logits
        full = model.surrogate(ids, mask, types, moments=True).logits
        torch.testing.assert_close(
            model.surrogate(ids, mask, types, moments=True, noise=0.0).logits, rate
        )
        assert torch.equal(model.surrogate(ids, mask, types, moments=True, noise=1.0).logits, full)
        gaps = [
            float(
                (model.surrogate(ids, mask, types, moments=True, noise=n).logits - rate).abs().sum()
            )
            for n in (0.25, 0.5, 0.75)
        ]
    assert 0 < gaps[0] < gaps[1] < gaps[2] < float((full - rate).abs().sum()) * 1.5, gaps
    for bad in ({"moments": False, "noise": 0.5}, {"moments": True, "noise": -0.1}):
        with pytest.raises(ValueError, match="noise"):
            model.surrogate(ids, mask, types, **bad)


@needs_glue
def test_distill_noise_warmup_ramps_the_noise_scale(tiny_teacher, tmp_path, monkeypatch):  # noqa: F811
    from spikeinfer.model import SpikingBert

    seen = []
    original = SpikingBert.surrogate

    def spy(self, *args, **kwargs):
        if torch.is_grad_enabled():  # training steps, not the dev evaluation
            seen.append(kwargs.get("noise"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SpikingBert, "surrogate", spy)
    args = tiny_run(tmp_path / "run", max_steps=4)
    kwargs = {"layer_map": [0, 1], "t_conv": 8, "word_embeddings": "teacher"}
    distill(args, tiny_teacher, stages=["fp-pred"], surrogate="moments", noise_warmup=0.5, **kwargs)
    assert seen == [0.0, 0.5, 1.0, 1.0]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["noise_warmup"] == 0.5
    meta = json.loads((tmp_path / "run" / "fp-pred" / "config.json").read_text())
    assert meta["provenance"]["noise_warmup"] == 0.5
    with pytest.raises(ValueError, match="noise_warmup"):
        distill(args, tiny_teacher, noise_warmup=0.5, **kwargs)  # the rate surrogate has no noise


def test_layer_norm_noise_loss_counts_token_dependent_signal_only():
    """The loss is 0.5 log(1 + noise / signal) per real token; a static per-feature pattern
    added to every token changes nothing, a larger token-dependent part lowers it, and padded
    tokens do not count."""
    from spikeinfer.distill import layer_norm_noise_loss

    g = torch.Generator().manual_seed(0)
    B, N, D = 2, 5, 16
    mean = torch.randn(1, B, N, D, generator=g)
    noise = torch.rand(1, B, N, D, generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, 3:] = 0
    base = layer_norm_noise_loss([(mean, noise)], mask)
    static = 10 * torch.randn(D, generator=g)
    torch.testing.assert_close(layer_norm_noise_loss([(mean + static, noise)], mask), base)
    assert layer_norm_noise_loss([(3 * mean, noise)], mask) < base
    padded = mean.clone()
    padded[0, 1, 3:] = 1e3  # a padded token's input
    real = mask.bool()
    centred = mean[0] - mean[0][real].mean(0)
    signal = centred.var(-1, unbiased=False)[real]
    expected = (0.5 * torch.log1p(noise[0].mean(-1)[real] / (signal + 1e-6))).mean()
    torch.testing.assert_close(layer_norm_noise_loss([(padded, noise)], mask), expected)
    # The surrogate hands over every per-step LayerNorm's input: O1 and O2 of each block.
    model = firing_model(seed=7, binary=True)
    ids, m, types = batch(seed=4, B=2, N=6, pad_from=(None, 4))
    out = model.surrogate(ids, m, types, moments=True)
    assert len(out.layer_norm_inputs) == 2 * model.config.num_layers
    assert model.surrogate(ids, m, types).layer_norm_inputs is None
    layer_norm_noise_loss(out.layer_norm_inputs, m).backward()
    assert model.layers[0].o_proj.weight.grad is not None


@needs_glue
def test_distill_layer_norm_noise_adds_its_loss(tiny_teacher, tmp_path):  # noqa: F811
    args = tiny_run(tmp_path / "run")
    kwargs = {"layer_map": [0, 1], "t_conv": 8, "word_embeddings": "teacher"}
    distill(
        args, tiny_teacher, stages=["fp-pred"], surrogate="moments", layer_norm_noise=0.1, **kwargs
    )
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["layer_norm_noise"] == 0.1
    meta = json.loads((tmp_path / "run" / "fp-pred" / "config.json").read_text())
    assert meta["provenance"]["layer_norm_noise"] == 0.1
    with pytest.raises(ValueError, match="layer_norm_noise"):
        distill(args, tiny_teacher, layer_norm_noise=0.1, **kwargs)


@needs_glue
def test_distill_records_the_surrogate(tiny_teacher, tmp_path):  # noqa: F811
    args = tiny_run(tmp_path / "run")
    kwargs = {"layer_map": [0, 1], "t_conv": 8, "word_embeddings": "teacher"}
    distill(args, tiny_teacher, stages=["fp-pred"], surrogate="moments", **kwargs)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "distill_start" and log[0]["surrogate"] == "moments"
    meta = json.loads((tmp_path / "run" / "fp-pred" / "config.json").read_text())
    assert meta["provenance"]["surrogate"] == "moments"
    with pytest.raises(ValueError, match="surrogate"):
        distill(args, tiny_teacher, surrogate="mean-field", **kwargs)
