"""Triton kernels (spikeinfer.kernels) against the pure-torch reference.

Without CUDA the kernels run in Triton's numpy interpreter (TRITON_INTERPRET=1, set below before
anything imports Triton), so shapes are tiny; odd, prime and non-power-of-two sizes exercise every
masked edge of the tiles. Where the kernel does the reference's arithmetic in the reference's
order (spike counts, scale, bias, IF scan, Bernoulli draws) spikes must be equal; elsewhere (GELU,
LayerNorm, softmax) they may differ only where the reference membrane sits within rounding of the
threshold, and mismatches are reported with their place and |H - Vth|.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402

import pytest  # noqa: E402

import spikeinfer.kernels as kernels  # noqa: E402
from spikeinfer import ModelConfig, rng  # noqa: E402
from spikeinfer.model import SpikingBert, _Recorder, compact  # noqa: E402
from spikeinfer.neuron import if_multistep  # noqa: E402
from spikeinfer.ops import attention_mask_additive  # noqa: E402

AVAILABLE, WHY = kernels.is_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"triton backend unavailable: {WHY}")

from spikeinfer.kernels.attention import (  # noqa: E402
    reference_attention_current,
    spiking_attention,
)
from spikeinfer.kernels.backend import simulate  # noqa: E402
from spikeinfer.kernels.bernoulli import bernoulli_spikes  # noqa: E402
from spikeinfer.kernels.neuron_scan import if_scan  # noqa: E402
from spikeinfer.kernels.spike_linear import (  # noqa: E402
    DrawnSpikes,
    reference_spike_linear,
    spike_linear,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -- helpers ------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spikes(shape, rate, seed) -> torch.Tensor:
    return (torch.rand(shape, generator=_gen(seed)) < rate).to(torch.int8).to(DEVICE)


def _signs(n, k, seed) -> torch.Tensor:
    signs = torch.where(torch.rand(n, k, generator=_gen(seed)) < 0.5, 1, -1)
    return signs.to(torch.int8).to(DEVICE)


def _vec(n, seed, mean=0.0, std=1.0) -> torch.Tensor:
    return (torch.randn(n, generator=_gen(seed)) * std + mean).to(DEVICE)


def _scale(k: int) -> float:
    """alpha that keeps count * alpha in the firing range: counts of K inputs spread ~sqrt(K)."""
    return 1.0 / max(1.0, (0.4 * k) ** 0.5)


def compare_spikes(
    name: str,
    got: torch.Tensor,
    current: torch.Tensor,
    v_th: float,
    leak: float = 1.0,
    fire_on_ge: bool = True,
    exact: bool = False,
    tol: float | None = None,
) -> float:
    """Check kernel spikes [T, ...] against the reference scan of the reference `current`.

    A neuron's first mismatch must sit at a near-threshold tie (|H - Vth| <= tol); later steps of
    that neuron follow from its shifted membrane and are not held against it. Returns the flip
    fraction (mismatched spikes / all spikes); `exact` demands zero mismatches.
    """
    ref, membrane = if_multistep(
        current.float(),
        torch.tensor(v_th, dtype=torch.float32, device=current.device),
        leak,
        fire_on_ge=fire_on_ge,
        return_membrane=True,
    )
    charge = membrane + v_th * ref  # H[t] = V[t] + Vth * S[t]
    got = got.to(ref.dtype)
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    bad = got != ref
    n_bad = int(bad.sum())
    fraction = n_bad / max(1, bad.numel())
    if n_bad == 0:
        return 0.0
    tol = 1e-4 * (1.0 + abs(v_th)) if tol is None else tol
    flat_bad = bad.reshape(bad.shape[0], -1)
    first_t = flat_bad.float().argmax(0)  # first mismatching step of each neuron
    neurons = flat_bad.any(0).nonzero().flatten()
    gaps = (charge.reshape(charge.shape[0], -1)[first_t[neurons], neurons] - v_th).abs()
    where = [(int(first_t[n]), *torch.unravel_index(n, bad.shape[1:])) for n in neurons[:8]]
    report = (
        f"{name}: {n_bad} of {bad.numel()} spikes differ ({fraction:.2e}) in "
        f"{len(neurons)} neurons; first (t, index...) {[tuple(map(int, w)) for w in where]}; "
        f"|H - Vth| at first mismatch: max {float(gaps.max()):.3e}, "
        f"values {[f'{float(g):.2e}' for g in gaps[:8]]}"
    )
    print(report)
    assert not exact, report
    assert float(gaps.max()) <= tol, "not a near-threshold tie: " + report
    return fraction


# -- Bernoulli generator ------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols,steps,offset", [(1, 1, 1, 0), (7, 13, 3, 5), (33, 70, 2, 1)])
def test_bernoulli_matches_rng(rows, cols, steps, offset):
    rates = torch.rand(rows, cols, generator=_gen(rows)).to(DEVICE)
    original = torch.arange(cols, device=DEVICE) * 2 + offset  # a compacted column subset
    width = 2 * cols + offset
    got = bernoulli_spikes(
        rates, seed=11, stream=rng.stream_id(1, 2, 3), steps=steps, cols=original, full_width=width
    )
    elements = torch.arange(rows, device=DEVICE)[:, None] * width + original[None, :]
    want = rng.bernoulli_spikes(rates, 11, rng.stream_id(1, 2, 3), range(steps), elements)
    assert torch.equal(got.float(), want)


def test_bernoulli_large_elements_wrap_like_reference():
    rates = torch.full((3, 5), 0.5, device=DEVICE)
    width = 3_000_000_000 // 3  # row * width passes 2**31 and wraps at 2**32 in both
    cols = torch.arange(5, device=DEVICE)
    got = bernoulli_spikes(rates, 2, 9, 4, cols, width)
    elements = torch.arange(3, device=DEVICE)[:, None] * width + cols[None, :]
    assert torch.equal(got.float(), rng.bernoulli_spikes(rates, 2, 9, range(4), elements))


# -- neuron scan --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "T,M,N,leak,ge",
    [(1, 1, 1, 1.0, True), (5, 37, 19, 1.0, True), (4, 3, 70, 0.9, True), (3, 17, 5, 1.0, False)],
)
@pytest.mark.parametrize("constant", [False, True])
def test_if_scan_exact(T, M, N, leak, ge, constant):
    current = (
        torch.randn(M, N, generator=_gen(T))
        if constant
        else torch.randn(T, M, N, generator=_gen(T))
    ).to(DEVICE) * 0.7 + 0.4
    spikes, counts = if_scan(current, 0.83, leak, timesteps=T if constant else None, fire_on_ge=ge)
    full = current.expand(T, M, N) if constant else current
    ref = if_multistep(full, 0.83, leak, fire_on_ge=ge)
    compare_spikes("if_scan", spikes, full, 0.83, leak, ge, exact=True)
    assert torch.equal(counts, ref.sum(0).to(torch.int32))


def test_if_scan_integer_ties_fire():
    # H == Vth exactly must fire (ties fire on >=).
    current = torch.full((3, 2, 2), 0.5, device=DEVICE)
    spikes, counts = if_scan(current, 1.0)
    assert spikes[:, 0, 0].tolist() == [0, 1, 0]
    assert torch.equal(counts, torch.ones(2, 2, dtype=torch.int32, device=DEVICE))


# -- spike linear -------------------------------------------------------------------------------
SHAPES = [(1, 1, 1, 1), (1, 17, 23, 37), (3, 37, 64, 29), (4, 5, 97, 130), (2, 13, 11, 0)]


def _linear_case(T, M, N, K, seed=0):
    x = _spikes((T, M, K), 0.45, seed)
    signs = _signs(N, K, seed + 1)
    alpha = _vec(N, seed + 2, _scale(K), 0.1 * _scale(K)).abs()
    bias = _vec(N, seed + 3, 0.3, 0.3)
    return x, signs, alpha, bias


@pytest.mark.parametrize("T,M,N,K", SHAPES)
def test_spike_linear_none_is_exact(T, M, N, K):
    x, signs, alpha, bias = _linear_case(T, M, N, K)
    out, counts = spike_linear(x, signs, alpha, bias, epilogue="none")
    assert counts is None
    want = reference_spike_linear(x, signs, alpha, bias, epilogue="none")
    assert torch.equal(out, want), "count * alpha + bias must round as the reference does"


@pytest.mark.parametrize("T,M,N,K", SHAPES)
@pytest.mark.parametrize("v_th,leak,ge", [(1.0, 1.0, True), (0.61, 0.9, True), (0.8, 1.0, False)])
def test_spike_linear_plain_is_exact(T, M, N, K, v_th, leak, ge):
    x, signs, alpha, bias = _linear_case(T, M, N, K, seed=T + M)
    spikes, counts = spike_linear(
        x, signs, alpha, bias, epilogue="plain", v_th=v_th, leak=leak, fire_on_ge=ge
    )
    _, current = reference_spike_linear(x, signs, alpha, bias, return_current=True)
    compare_spikes("plain", spikes, current, v_th, leak, ge, exact=True)
    ref = if_multistep(current, v_th, leak, fire_on_ge=ge)
    assert torch.equal(counts, ref.sum(0).to(torch.int32))


def test_spike_linear_small_blocks_and_options():
    # Blocks smaller than the problem: several programs along M, N and K iterations.
    T, M, N, K = 2, 41, 45, 67
    x, signs, alpha, bias = _linear_case(T, M, N, K, seed=5)
    spikes, counts = spike_linear(
        x, signs, alpha, None, blocks=(16, 16, 32), out_dtype=torch.float32
    )
    assert spikes.dtype == torch.float32
    _, current = reference_spike_linear(x, signs, alpha, None, return_current=True)
    compare_spikes("plain/no bias", spikes, current, 1.0, exact=True)
    none_spikes, counts2 = spike_linear(x, signs, alpha, None, write_spikes=False)
    assert none_spikes is None and torch.equal(counts, counts2)


def test_spike_linear_rejects_bad_inputs():
    x, signs, alpha, bias = _linear_case(2, 5, 7, 9)
    with pytest.raises(TypeError):
        spike_linear(x.float(), signs, alpha, bias)
    with pytest.raises(ValueError):
        spike_linear(x, signs[:, :4], alpha, bias)
    with pytest.raises(ValueError):
        spike_linear(x, signs, alpha, bias, epilogue="ln")  # no residual / LayerNorm
    with pytest.raises(ValueError):
        spike_linear(x, signs, alpha, bias, epilogue="relu")


@pytest.mark.parametrize("T,M,N,K", [(1, 1, 1, 1), (3, 19, 70, 23), (2, 6, 33, 0)])
def test_spike_linear_gelu(T, M, N, K):
    x, signs, alpha, bias = _linear_case(T, M, N, K, seed=7)
    gate = (torch.rand(N, generator=_gen(3)) < 0.7).float().to(DEVICE)
    spikes, counts = spike_linear(x, signs, alpha, bias, epilogue="gelu", gate=gate, v_th=0.4)
    _, current = reference_spike_linear(
        x, signs, alpha, bias, epilogue="gelu", gate=gate, return_current=True
    )
    assert compare_spikes("gelu", spikes, current, 0.4) < 1e-3
    assert int(counts[:, gate == 0].sum()) == 0, "gated neurons get no current and never fire"


@pytest.mark.parametrize("T,M,N,K", [(1, 1, 1, 1), (3, 21, 37, 29), (2, 9, 96, 0), (4, 3, 130, 47)])
def test_spike_linear_residual_layernorm(T, M, N, K):
    x, signs, alpha, bias = _linear_case(T, M, N, K, seed=9)
    residual = _spikes((T, M, N), 0.5, 10)
    ln_w, ln_b = _vec(N, 11, 1.0, 0.2), _vec(N, 12, 0.4, 0.3)
    spikes, counts = spike_linear(
        x,
        signs,
        alpha,
        bias,
        epilogue="ln",
        residual=residual,
        ln_weight=ln_w,
        ln_bias=ln_b,
        ln_eps=1e-12,
        v_th=0.9,
    )
    _, current = reference_spike_linear(
        x,
        signs,
        alpha,
        bias,
        epilogue="ln",
        residual=residual,
        ln_weight=ln_w,
        ln_bias=ln_b,
        ln_eps=1e-12,
        return_current=True,
    )
    assert compare_spikes("ln", spikes, current, 0.9) < 1e-3
    ref = if_multistep(current, 0.9)
    assert (counts - ref.sum(0).to(torch.int32)).abs().sum() <= (spikes.float() != ref).sum()


@pytest.mark.parametrize("epilogue", ["none", "plain", "ln"])
@pytest.mark.parametrize("T,M,N,K", [(1, 3, 5, 7), (3, 23, 31, 41)])
def test_spike_linear_drawn_inputs_match_rng(epilogue, T, M, N, K):
    """Sequential mode: inputs drawn in-kernel equal the reference generator's draws."""
    _, signs, alpha, bias = _linear_case(T, M, N, K, seed=13)
    full_k = K + 6
    cols = torch.randperm(full_k, generator=_gen(1))[:K].sort().values.to(DEVICE)
    rates = torch.rand(M, K, generator=_gen(2)).to(DEVICE)
    kwargs = {}
    if epilogue == "ln":
        r_rates = torch.rand(M, N, generator=_gen(3)).to(DEVICE)
        kwargs = {
            "residual": DrawnSpikes(r_rates, 4, 77),
            "ln_weight": _vec(N, 5, 1.0, 0.1),
            "ln_bias": _vec(N, 6, 0.3, 0.2),
        }
    out, _ = spike_linear(
        DrawnSpikes(rates, 4, 21, cols, full_k),
        signs,
        alpha,
        bias,
        epilogue=epilogue,
        timesteps=T,
        v_th=0.7,
        **kwargs,
    )
    elements = torch.arange(M, device=DEVICE)[:, None] * full_k + cols[None, :]
    x = rng.bernoulli_spikes(rates, 4, 21, range(T), elements)
    ref_kwargs = dict(kwargs)
    if epilogue == "ln":
        ref_kwargs["residual"] = rng.bernoulli_spikes(r_rates, 4, 77, range(T))
    want, current = reference_spike_linear(
        x, signs, alpha, bias, epilogue=epilogue, v_th=0.7, return_current=True, **ref_kwargs
    )
    if epilogue == "none":
        assert torch.equal(out, want)
    else:
        compare_spikes(f"drawn/{epilogue}", out, current, 0.7, exact=epilogue == "plain")


# -- spiking attention --------------------------------------------------------------------------
ATTENTION = [  # batch, seq, head dim, heads, T
    (1, 1, 8, 1, 1),
    (2, 13, 8, 3, 3),
    (3, 31, 32, 2, 2),
    (1, 67, 64, 1, 2),
    (2, 5, 17, 2, 1),
]


def _attention_case(B, N, d, h, T, seed=0):
    M, W = B * N, h * d
    q = (torch.randn(T, M, W, generator=_gen(seed)) * 1.5).to(DEVICE)
    s_k, s_v = _spikes((T, M, W), 0.5, seed + 1), _spikes((T, M, W), 0.4, seed + 2)
    tokens = torch.ones(B, N)
    for b in range(1, B):  # padding: later sequences shorter
        tokens[b, max(1, N - 4 * b) :] = 0
    mask = attention_mask_additive(tokens.to(DEVICE)).reshape(B, N).contiguous()
    return q, s_k, s_v, mask


@pytest.mark.parametrize("B,N,d,h,T", ATTENTION)
def test_spiking_attention(B, N, d, h, T):
    q, s_k, s_v, mask = _attention_case(B, N, d, h, T)
    gate = torch.linspace(1.0, 0.0, h).to(DEVICE) if h > 1 else None
    v_th = 0.37  # generic: away from the sum-of-probabilities ties at 1.0 (see the model test)
    spikes, counts = spiking_attention(q, s_k, s_v, mask, batch=B, head_dim=d, gate=gate, v_th=v_th)
    current = reference_attention_current(q, s_k, s_v, mask, B, d, gate)
    assert compare_spikes("attention", spikes, current, v_th) < 1e-3
    if gate is not None:
        assert int(counts[:, (h - 1) * d :].sum()) == 0, "a head gated to 0 never fires"


def test_spiking_attention_unit_threshold_ties_are_only_ties():
    """Vth = 1 with short, fully spiking sequences: the current is sum(p) = 1 up to rounding in
    many places, so kernel and reference may split those exact ties differently. Every mismatch
    must be such a tie; the flip fraction is reported, not bounded."""
    B, N, d, h, T = 4, 6, 8, 2, 3
    q, _, _, mask = _attention_case(B, N, d, h, T, seed=6)
    s_k = _spikes((T, B * N, h * d), 0.5, 7)
    s_v = _spikes((T, B * N, h * d), 0.9, 8)
    spikes, _ = spiking_attention(q, s_k, s_v, mask, batch=B, head_dim=d, v_th=1.0)
    current = reference_attention_current(q, s_k, s_v, mask, B, d)
    compare_spikes("attention ties at Vth=1", spikes, current, 1.0, tol=1e-6)


@pytest.mark.parametrize("B,N,d,h,T", [(2, 11, 8, 2, 3), (1, 20, 16, 3, 2)])
def test_spiking_attention_drawn_kv(B, N, d, h, T):
    q, _, _, mask = _attention_case(B, N, d, h, T, seed=3)
    M, W = B * N, h * d
    kept = torch.tensor([0, 2, 3][:h], device=DEVICE)  # compacted heads of a 4-head layer
    cols = (kept[:, None] * d + torch.arange(d, device=DEVICE)).reshape(-1)
    a_k = torch.rand(M, W, generator=_gen(4)).to(DEVICE)
    a_v = torch.rand(M, W, generator=_gen(5)).to(DEVICE)
    spikes, _ = spiking_attention(
        q,
        a_k,
        a_v,
        mask,
        batch=B,
        head_dim=d,
        v_th=0.37,
        seed=8,
        k_stream=30,
        v_stream=31,
        cols=cols,
        full_width=4 * d,
    )
    elements = torch.arange(M, device=DEVICE)[:, None] * (4 * d) + cols[None, :]
    s_k = rng.bernoulli_spikes(a_k, 8, 30, range(T), elements)
    s_v = rng.bernoulli_spikes(a_v, 8, 31, range(T), elements)
    current = reference_attention_current(q, s_k, s_v, mask, B, d)
    assert compare_spikes("attention/drawn", spikes, current, 0.37) < 1e-3


# -- whole model --------------------------------------------------------------------------------
def _tiny_model(seed=0, thresholds=None) -> SpikingBert:
    """The `tiny` preset with weights scaled so that neurons fire: weights normal(0, 1), biases
    normal(0.3, 0.3)."""
    torch.manual_seed(seed)
    model = SpikingBert(ModelConfig.from_name("tiny"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "LayerNorm" not in name:
                p.normal_(0.3, 0.3)
            elif p.dim() == 2 and "embeddings" not in name:
                p.normal_(0.0, 1.0)
        if thresholds is not None:
            model.v_th.copy_(thresholds)
    return model.eval().to(DEVICE)


def _generic_thresholds(model_seed=0) -> torch.Tensor:
    """Per-sublayer thresholds away from 1.0. With Vth = 1 the attention sublayer has exact ties
    by construction: when every attended key spikes in V the current is sum(p) = 1 up to
    rounding, which the kernel and the reference round differently."""
    cfg = ModelConfig.from_name("tiny")
    return torch.rand(cfg.num_sublayers, generator=_gen(100 + model_seed)) * 0.6 + 0.7


def _inputs(B=3, N=13, seed=0):
    g = _gen(seed)
    ids = torch.randint(0, 100, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    for b in range(1, B):
        mask[b, N - 3 * b :] = 0
    types = torch.zeros(B, N, dtype=torch.long)
    types[:, N // 2 :] = 1
    return ids.to(DEVICE), mask.to(DEVICE), types.to(DEVICE)


def _rate_flips(got: dict, want: dict) -> dict[str, float]:
    assert set(got) == set(want)
    out = {}
    for name in want:
        assert got[name].shape == want[name].shape, name
        out[name] = float((got[name] != want[name]).float().mean()) if want[name].numel() else 0.0
    return out


def _assert_agree(got, want, *, exact: bool):
    flips = _rate_flips(got.rates, want.rates)
    print({k: f"{v:.1e}" for k, v in flips.items() if v})
    assert got.timesteps == want.timesteps
    for name in want.asr:
        assert got.asr[name] == pytest.approx(want.asr[name], abs=1e-3), name
    assert torch.equal(got.logits.argmax(-1), want.logits.argmax(-1))
    if exact:
        assert all(v == 0 for v in flips.values()), flips
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    else:
        assert all(v < 1e-3 for v in flips.values()), flips


# Where the kernels' arithmetic matches the reference and thresholds are generic, the interpreter
# reproduces the reference exactly; on a GPU exp/erf differ in the last bits, so the flip bound
# applies instead.
EXACT = DEVICE.type == "cpu"


@pytest.mark.parametrize("T", [1, 6])
def test_model_unrolled_matches_reference(T):
    model = _tiny_model(thresholds=_generic_thresholds())
    ids, mask, types = _inputs()
    want = model(ids, mask, types, mode="unrolled", timesteps=T, record_traces=True)
    got = simulate(model, ids, mask, types, mode="unrolled", timesteps=T, record_traces=True)
    _assert_agree(got, want, exact=EXACT)
    for name in want.traces:
        torch.testing.assert_close(got.traces[name], want.traces[name])


def test_model_sequential_rates_equal_reference():
    model = _tiny_model(seed=1, thresholds=_generic_thresholds(1))
    model.set_timesteps([[3, 5, 4, 7, 2, 6], [1, 4, 5, 3, 6, 2]], t_emb=5)
    ids, mask, types = _inputs(seed=1)
    want = model(ids, mask, types, mode="sequential", seed=17, record_traces=True)
    got = simulate(model, ids, mask, types, mode="sequential", seed=17, record_traces=True)
    _assert_agree(got, want, exact=EXACT)
    for name in want.traces:
        torch.testing.assert_close(got.traces[name], want.traces[name])
    other_seed = simulate(model, ids, mask, types, mode="sequential", seed=18)
    assert any(not torch.equal(other_seed.rates[n], got.rates[n]) for n in got.rates)


def _masked(model: SpikingBert) -> SpikingBert:
    """Prune some heads and neurons; layer 1 loses every head, layer 0 every FFN neuron."""
    cfg = model.config
    with torch.no_grad():
        model.head_mask[0, 1] = 0
        model.head_mask[0, 3] = 0
        model.head_mask[1] = 0
        model.neuron_mask[0] = 0
        model.neuron_mask[1, ::3] = 0
        model.neuron_mask[1, cfg.intermediate_size - 1] = 0
    return model


@pytest.mark.parametrize("mode", ["unrolled", "sequential"])
def test_model_compacted_and_masked(mode):
    model = _masked(_tiny_model(seed=2, thresholds=_generic_thresholds(2)))
    small = compact(model)
    assert small.layers[1].num_heads == 0
    timesteps = [[2, 3, 4, 3, 5, 2], [4, 1, 2, 5, 3, 3]]
    for m in (model, small):
        m.set_timesteps(timesteps, t_emb=4)
    ids, mask, types = _inputs(B=2, N=11, seed=2)
    kwargs = {"mode": mode, "timesteps": 5 if mode == "unrolled" else None, "seed": 3}
    want = model(ids, mask, types, **kwargs)  # the masked, uncompacted reference
    got_small = simulate(small, ids, mask, types, **kwargs)
    got_masked = simulate(model, ids, mask, types, **kwargs)  # gates instead of compaction
    assert got_small.rates["1.A"].shape[-1] == 0 and got_small.asr["1.A"] == 0.0
    assert got_small.rates["0.F"].shape[-1] == 0 and got_small.rates["1.F"].shape[-1] == 42
    ref_small = small(ids, mask, types, **kwargs)
    _assert_agree(got_small, ref_small, exact=EXACT)
    _assert_agree(got_masked, want, exact=EXACT)
    # The compacted rates are the kept columns of the masked ones.
    torch.testing.assert_close(got_small.logits, got_masked.logits)


def test_model_sublayers_in_isolation_default_threshold(monkeypatch):
    """Vth = 1.0 (the released models' value): feed every kernel the reference's own input
    spikes and check its output sublayer by sublayer, so a flip is counted once, where it
    happens, instead of spreading through the network."""
    model = _tiny_model(seed=3)
    ids, mask, types = _inputs(B=3, N=16, seed=3)
    captured: dict[str, torch.Tensor] = {}
    original_add = _Recorder.add

    def capture(self, name, spikes):
        captured[name] = spikes
        return original_add(self, name, spikes)

    monkeypatch.setattr(_Recorder, "add", capture)
    T = 6
    model(ids, mask, types, mode="unrolled", timesteps=T)
    monkeypatch.undo()

    B, N = ids.shape
    M = B * N
    mask_add4 = attention_mask_additive(mask)
    mask_add = mask_add4.reshape(B, N).contiguous()
    flips = {}

    def rows(s):  # [T, B, N, F] float spikes -> [T, B*N, F] int8
        return s.reshape(T, M, -1).to(torch.int8)

    def check(name, got, current):
        flips[name] = compare_spikes(
            name, got, current.reshape(T, M, -1), float(model.threshold(index[name]))
        )

    index = {name: i for i, name in enumerate(model.sublayer_names())}
    with torch.no_grad():
        E = model.embeddings(ids, types)
        got, _ = if_scan(E.reshape(M, -1).contiguous(), timesteps=T)
        check("emb", got, E.expand(T, *E.shape))
        for l, block in enumerate(model.layers):
            S = {s: captured[f"{l}.{s}"] for s in ("K", "V", "A", "O1", "F", "O2")}
            x = captured["emb"] if l == 0 else captured[f"{l - 1}.O2"]

            def params(p):
                signs, alpha = p.binary_weights()
                return {"signs": signs.to(torch.int8), "alpha": alpha, "bias": p.bias.detach()}

            def th(s, l=l):
                return float(model.threshold(index[f"{l}.{s}"]))

            got, _ = spike_linear(rows(x), **params(block.k_proj), v_th=th("K"))
            check(f"{l}.K", got, block.current_k(x))
            got, _ = spike_linear(rows(x), **params(block.v_proj), v_th=th("V"))
            check(f"{l}.V", got, block.current_v(x))
            q, _ = spike_linear(rows(x), **params(block.q_proj), epilogue="none")
            got, _ = spiking_attention(
                q,
                rows(S["K"]),
                rows(S["V"]),
                mask_add,
                batch=B,
                head_dim=block.head_dim,
                v_th=th("A"),
            )
            check(f"{l}.A", got, block.current_a(x, S["K"], S["V"], mask_add4))
            ln1 = {
                "ln_weight": block.ln_o1.weight.detach(),
                "ln_bias": block.ln_o1.bias.detach(),
                "ln_eps": block.ln_o1.eps,
            }
            got, _ = spike_linear(
                rows(S["A"]),
                **params(block.o_proj),
                epilogue="ln",
                residual=rows(x),
                v_th=th("O1"),
                **ln1,
            )
            check(f"{l}.O1", got, block.current_o1(S["A"], x))
            got, _ = spike_linear(
                rows(S["O1"]), **params(block.ffn1), epilogue="gelu", v_th=th("F")
            )
            check(f"{l}.F", got, block.current_f(S["O1"]))
            ln2 = {
                "ln_weight": block.ln_o2.weight.detach(),
                "ln_bias": block.ln_o2.bias.detach(),
                "ln_eps": block.ln_o2.eps,
            }
            got, _ = spike_linear(
                rows(S["F"]),
                **params(block.ffn2),
                epilogue="ln",
                residual=rows(S["O1"]),
                v_th=th("O2"),
                **ln2,
            )
            check(f"{l}.O2", got, block.current_o2(S["F"], S["O1"]))
    print("isolated flip fractions:", {k: f"{v:.1e}" for k, v in flips.items()})
    # Exact arithmetic: no flips at all.
    assert all(flips[n] == 0 for n in flips if n == "emb" or n[-1] in "KV"), flips
    assert all(v < 1e-3 for v in flips.values()), flips


def test_model_forward_through_engine():
    """`model.to_backend("triton")` routes `SpikingBert.forward` to `simulate`."""
    model = _tiny_model(seed=5, thresholds=_generic_thresholds(5))
    ids, mask, types = _inputs(B=2, N=9, seed=5)
    want = model(ids, mask, types, timesteps=3)
    got = model.to_backend("triton")(ids, mask, types, timesteps=3)
    _assert_agree(got, want, exact=EXACT)


def test_package_imports_without_triton():
    import subprocess

    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # any import of triton now fails\n"
        "import spikeinfer.kernels as m\n"
        "import spikeinfer.kernels.backend\n"
        "ok, why = m.is_available()\n"
        "assert not ok and 'triton' in why, why\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)


def test_backend_refuses_full_precision_model():
    from spikeinfer.model import BackendUnavailableError

    model = SpikingBert(ModelConfig.from_name("tiny", binary=False)).to(DEVICE)
    ids, mask, types = _inputs(B=1, N=4)
    with pytest.raises(BackendUnavailableError, match="1-bit"):
        simulate(model, ids, mask, types, timesteps=2)


def test_weights_converted_once_and_refreshed_after_change():
    from spikeinfer.kernels import backend

    model = _tiny_model(seed=4).freeze_binary()
    block = model.layers[0]
    first = backend._int8_signs(model, block.k_proj)[0]
    assert backend._int8_signs(model, block.k_proj)[0] is first
    with torch.no_grad():
        block.k_proj.signs.neg_()
    again = backend._int8_signs(model, block.k_proj)[0]
    assert again is not first and torch.equal(again, -first)


# -- GPU only -----------------------------------------------------------------------------------
@GPU
def test_gpu_large_spike_linear_exact():
    T, M, N, K = 4, 4096 + 3, 1536, 384
    x, signs, alpha, bias = _linear_case(T, M, N, K, seed=21)
    spikes, _ = spike_linear(x, signs, alpha, bias, v_th=0.9)
    _, current = reference_spike_linear(x, signs, alpha, bias, return_current=True)
    compare_spikes("gpu plain", spikes, current, 0.9, exact=True)


@GPU
def test_gpu_large_layernorm_and_attention():
    T, M, N, K = 3, 2048 + 5, 768, 3072
    x, signs, alpha, bias = _linear_case(T, M, N, K, seed=22)
    residual = _spikes((T, M, N), 0.5, 23)
    ln_w, ln_b = _vec(N, 24, 1.0, 0.2), _vec(N, 25, 0.4, 0.3)
    spikes, _ = spike_linear(
        x,
        signs,
        alpha,
        bias,
        epilogue="ln",
        residual=residual,
        ln_weight=ln_w,
        ln_bias=ln_b,
        v_th=0.9,
    )
    _, current = reference_spike_linear(
        x,
        signs,
        alpha,
        bias,
        epilogue="ln",
        residual=residual,
        ln_weight=ln_w,
        ln_bias=ln_b,
        return_current=True,
    )
    assert compare_spikes("gpu ln", spikes, current, 0.9) < 1e-3
    q, s_k, s_v, mask = _attention_case(8, 128, 64, 12, 3, seed=26)
    spikes, _ = spiking_attention(q, s_k, s_v, mask, batch=8, head_dim=64, v_th=0.37)
    current = reference_attention_current(q, s_k, s_v, mask, 8, 64)
    assert compare_spikes("gpu attention", spikes, current, 0.37) < 1e-3
