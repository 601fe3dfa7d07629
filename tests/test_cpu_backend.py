"""The `cpu` backend (C++ popcount kernels, spikeinfer.cpu_backend) against the torch reference.

Projections and neuron scans must match the reference bit for bit; GELU, LayerNorm and attention
are checked with the DESIGN section 10 tolerance (spike flips only where |H - Vth| is within
rounding, fraction < 1e-3). LayerNorm and softmax replicate torch's rounding, so on a machine
like the reference's they match exactly; GELU is the kernels' own polynomial (csrc/gelu.h, within
3 ulp of the exact function), so F's currents differ from torch's by an ulp or so. The AVX-512
and portable kernel paths must agree exactly with each other.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import firing_model

from spikeinfer import ops, rng
from spikeinfer.config import ModelConfig
from spikeinfer.model import BackendUnavailableError, SpikingBert, compact
from spikeinfer.neuron import if_multistep
from spikeinfer.quant import binarize
from spikeinfer.quant import pack_signs as pack_signs_uint8

cb = pytest.importorskip("spikeinfer.cpu_backend")
_ok, _why = cb.is_available()
pytestmark = pytest.mark.skipif(not _ok, reason=_why)

# Kernel paths by SPIKEINFER_CPU_ISA name, fastest first, and the name cb.isa() reports for each.
PATHS = ("avx512", "avx2", "portable")
_REPORTED = {"avx512": "avx512-vpopcntdq", "avx2": "avx2", "portable": "portable"}


def runnable_paths(monkeypatch):
    """The paths this CPU can run, fastest first (the best one is what isa() reports unforced)."""
    monkeypatch.delenv("SPIKEINFER_CPU_ISA", raising=False)
    monkeypatch.delenv("SPIKEINFER_CPU_PORTABLE", raising=False)
    best = PATHS.index(next(p for p in PATHS if _REPORTED[p] == cb.isa()))
    return PATHS[best:]


@pytest.fixture(params=PATHS)
def kernel_path(request, monkeypatch):
    """Run a test on one kernel path; the env var is read by the kernels at every call."""
    if request.param not in runnable_paths(monkeypatch):
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    monkeypatch.setenv("SPIKEINFER_CPU_ISA", request.param)
    assert cb.isa() == _REPORTED[request.param]
    return request.param


def both_paths(fn, monkeypatch):
    """(fn() on the fastest path, fn() on the portable path); every other vector path this CPU
    has (AVX2 on an AVX-512 machine) must give the fastest path's result exactly."""
    results = {}
    for path in runnable_paths(monkeypatch):
        monkeypatch.setenv("SPIKEINFER_CPU_ISA", path)
        assert cb.isa() == _REPORTED[path]
        results[path] = fn()
    monkeypatch.delenv("SPIKEINFER_CPU_ISA")
    fast = results[next(iter(results))]
    for path, result in results.items():
        if path != "portable":
            assert_same(result, fast)
    return fast, results["portable"]


def assert_same(a, b):
    if hasattr(a, "logits"):  # a simulation's outputs
        assert_same(a.logits, b.logits)
        assert a.rates.keys() == b.rates.keys()
        for name in a.rates:
            assert_same(a.rates[name], b.rates[name])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def random_spikes(*shape, rate=0.3, gen=None):
    return (torch.rand(*shape, generator=gen) < rate).float()


def random_binary(n, k, gen=None):
    signs, alpha = binarize(torch.randn(n, k, generator=gen))
    bias = torch.randn(n, generator=gen) * 0.5
    return signs, alpha, bias


def flip_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """Differing spikes over the reference's spikes (DESIGN section 10)."""
    return float((a != b).sum()) / max(1.0, float(b.sum()))


# -- packing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 63, 64, 65, 127, 300, 391])
def test_pack_roundtrip_and_bit_order(K):
    gen = torch.Generator().manual_seed(K)
    x = random_spikes(3, 5, K, gen=gen)
    packed = cb.pack_spikes(x)
    assert packed.dtype == torch.int64 and packed.shape == (3, 5, (K + 63) // 64)
    assert torch.equal(cb.unpack_spikes(packed, K), x)
    signs = torch.where(torch.rand(7, K, generator=gen) < 0.5, 1.0, -1.0)
    words = cb.pack_signs(signs)
    # Little-endian words give the byte layout of spikeinfer.quant.pack_signs.
    as_bytes = words.view(torch.uint8)[:, : (K + 7) // 8]
    assert torch.equal(as_bytes, pack_signs_uint8(signs))


def _availability_in_fresh_process(env: dict) -> str:
    """What `cpu_backend.is_available()` prints in a new interpreter with this environment."""
    code = "from spikeinfer import cpu_backend as cb; print(cb.is_available())"
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout


def test_missing_compiler_is_reported(tmp_path):
    env = {**os.environ, "CXX": "/nonexistent/c++", "SPIKEINFER_CACHE_DIR": str(tmp_path)}
    out = _availability_in_fresh_process(env)
    assert "False" in out and "g++" in out and "ninja" in out


def _libasan() -> str | None:
    """gcc's AddressSanitizer runtime, when this machine has one."""
    try:
        out = subprocess.run(
            ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out if os.path.isabs(out) and os.path.exists(out) else None


def test_sanitized_build_without_the_runtime_is_refused(tmp_path):
    env = {**os.environ, "SPIKEINFER_CPU_SANITIZE": "1", "SPIKEINFER_CACHE_DIR": str(tmp_path)}
    env.pop("LD_PRELOAD", None)
    out = _availability_in_fresh_process(env)
    assert "False" in out and "LD_PRELOAD" in out, out
    assert not any(tmp_path.iterdir())  # refused before anything was built


@pytest.mark.skipif(sys.platform != "linux", reason="AddressSanitizer preload is Linux-only")
def test_kernels_under_address_sanitizer():
    """Every op on odd shapes and every kernel path with the kernels built under ASan (a build of
    their own, cached like the normal one): a buffer overrun aborts the run with ASan's report."""
    libasan = _libasan()
    if libasan is None:
        pytest.skip("gcc has no libasan.so here")
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "SPIKEINFER_CPU_SANITIZE": "1",
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0",  # the interpreter's own allocations are never freed
    }
    env.pop("SPIKEINFER_CPU_PORTABLE", None)
    env.pop("SPIKEINFER_CPU_ISA", None)
    out = subprocess.run(
        [sys.executable, str(root / "tests" / "asan_ops.py")],
        env=env,
        capture_output=True,
        text=True,
        cwd=root,
        timeout=900,
    )
    report = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0 and out.stdout.strip().endswith("clean"), report


def test_isa_and_availability():
    ok, why = cb.is_available()
    assert ok, why
    assert cb.isa() in ("avx512-vpopcntdq", "avx2", "portable")


def test_isa_can_be_forced_down_but_not_up(monkeypatch):
    paths = runnable_paths(monkeypatch)
    for path in paths:
        monkeypatch.setenv("SPIKEINFER_CPU_ISA", path)
        assert cb.isa() == _REPORTED[path]
    monkeypatch.setenv("SPIKEINFER_CPU_PORTABLE", "1")  # the older spelling wins
    assert cb.isa() == "portable"
    monkeypatch.delenv("SPIKEINFER_CPU_PORTABLE")
    monkeypatch.setenv("SPIKEINFER_CPU_ISA", "sse2")
    with pytest.raises(RuntimeError, match="must be portable, avx2 or avx512"):
        cb.isa()
    ok, why = cb.is_available()  # the backend reports it unavailable, with the reason
    assert not ok and "must be portable, avx2 or avx512" in why, why
    for path in set(PATHS) - set(paths):  # a path this CPU lacks is an error, not a fallback
        monkeypatch.setenv("SPIKEINFER_CPU_ISA", path)
        ok, why = cb.is_available()
        assert not ok and "cannot run" in why, why
        with pytest.raises(RuntimeError, match="cannot run"):
            cb.binary_gemm(
                cb.pack_spikes(torch.ones(2, 10)),
                cb.pack_signs(torch.ones(3, 10)),
                10,
                torch.ones(3),
                torch.zeros(3),
            )


# -- binary GEMM --------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 63, 64, 65, 127, 300, 384 + 7])
@pytest.mark.parametrize("M,N", [(1, 1), (3, 17), (31, 64), (97, 5), (256, 131), (1000, 48)])
def test_binary_gemm_exact(K, M, N, monkeypatch):
    gen = torch.Generator().manual_seed(1000 * K + 10 * M + N)
    x = random_spikes(M, K, rate=0.4, gen=gen)
    signs, alpha, bias = random_binary(N, K, gen)
    ref = ops.spike_linear(x, signs, alpha, bias)
    xp, wp = cb.pack_spikes(x), cb.pack_signs(signs)
    fast, portable = both_paths(lambda: cb.binary_gemm(xp, wp, K, alpha, bias), monkeypatch)
    assert torch.equal(fast, ref)
    assert torch.equal(portable, ref)


def test_binary_gemm_ignores_padding_bits_and_leading_dims():
    gen = torch.Generator().manual_seed(0)
    K, N = 70, 9
    x = random_spikes(2, 3, K, gen=gen)
    signs, alpha, bias = random_binary(N, K, gen)
    xp = cb.pack_spikes(x)
    xp[..., -1] |= 1 << 40  # a padding bit (feature 104 > K): must not count
    out = cb.binary_gemm(xp, cb.pack_signs(signs), K, alpha, bias)
    assert out.shape == (2, 3, N)
    assert torch.equal(out, ops.spike_linear(x, signs, alpha, bias))


def test_binary_gemm_empty_input_features():
    alpha, bias = torch.rand(4), torch.randn(4)
    out = cb.binary_gemm(
        torch.zeros(5, 0, dtype=torch.int64), torch.zeros(4, 0, dtype=torch.int64), 0, alpha, bias
    )
    ref = ops.spike_linear(torch.zeros(5, 0), torch.zeros(4, 0), alpha, bias)
    assert torch.equal(out, ref)


# -- neuron scans -------------------------------------------------------------------------------
@pytest.mark.parametrize("leak,fire_on_ge", [(1.0, True), (0.9, True), (1.0, False), (0.9, False)])
@pytest.mark.parametrize("T,M,N", [(1, 3, 5), (7, 4, 64), (13, 9, 77)])
def test_neuron_scan_exact(T, M, N, leak, fire_on_ge, kernel_path):
    gen = torch.Generator().manual_seed(T * M * N)
    current = torch.randn(T, M, N, generator=gen) * 0.7 + 0.3
    current[0, 0, :2] = 1.0  # exact ties fire only on >=
    ref = if_multistep(current, 0.8, leak, fire_on_ge=fire_on_ge)
    spikes, rates = cb.neuron_scan(current, 0.8, leak, fire_on_ge)
    assert torch.equal(cb.unpack_spikes(spikes, N), ref)
    assert torch.equal(rates, ref.sum(0) / T)


def test_neuron_scan_constant_current_broadcast(kernel_path):
    E = torch.randn(6, 40) + 0.5
    spikes, rates = cb.neuron_scan(E[None].expand(9, 6, 40), 1.0)
    ref = if_multistep(E.expand(9, 6, 40), 1.0)
    assert torch.equal(cb.unpack_spikes(spikes, 40), ref)
    assert torch.equal(rates, ref.mean(0))


def _linear_reference(x, signs, alpha, bias, epilogue, residual=None, ln=None, gate=None):
    cur = ops.spike_linear(x, signs, alpha, bias)
    if residual is not None:
        cur = cur + residual
    if epilogue == cb.EPILOGUE_LAYERNORM:
        cur = torch.nn.functional.layer_norm(cur, (cur.shape[-1],), ln[0], ln[1], ln[2])
    elif epilogue == cb.EPILOGUE_GELU:
        cur = torch.nn.functional.gelu(cur)
    if gate is not None:
        cur = cur * gate
    return cur


# Row lengths around the LayerNorm moments' chunks of 16 x 8 floats and their merge cascade: one
# short chunk, one whole, two, two and a short one, three, three and a short one, four and a short
# one, twelve, many and a scalar tail.
@pytest.mark.parametrize("N", [8, 130, 256, 264, 384, 392, 520, 1536, 2061])
def test_layer_norm_epilogue_is_torchs_bits(N, kernel_path):
    T, M, K = 2, 7, 70
    gen = torch.Generator().manual_seed(N)
    x = random_spikes(T, M, K, gen=gen)
    signs, alpha, bias = random_binary(N, K, gen)
    residual = random_spikes(T, M, N, rate=0.5, gen=gen)
    ln = (torch.randn(N, generator=gen) * 0.3 + 1, torch.randn(N, generator=gen) * 0.2, 1e-12)
    ref = _linear_reference(x, signs, alpha, bias, cb.EPILOGUE_LAYERNORM, residual, ln)
    _, _, current = cb.spike_linear_neuron(
        cb.pack_spikes(x),
        cb.pack_signs(signs),
        K,
        alpha,
        bias,
        epilogue=cb.EPILOGUE_LAYERNORM,
        residual=cb.pack_spikes(residual),
        ln_weight=ln[0],
        ln_bias=ln[1],
        eps=ln[2],
        return_current=True,
    )
    assert torch.equal(current, ref), f"N={N}: max |diff| {(current - ref).abs().max().item()}"


@pytest.mark.parametrize("leak,fire_on_ge", [(1.0, True), (0.9, False)])
@pytest.mark.parametrize("epilogue", [cb.EPILOGUE_PLAIN, cb.EPILOGUE_GELU, cb.EPILOGUE_LAYERNORM])
@pytest.mark.parametrize(
    "T,M,K,N",
    # the last shape's K leaves room for 4 column groups per chunk: three chunks of output
    [(1, 1, 1, 1), (5, 7, 65, 33), (4, 23, 300, 130), (2, 6, 2100, 150)],
)
def test_spike_linear_neuron(T, M, K, N, epilogue, leak, fire_on_ge, monkeypatch):
    gen = torch.Generator().manual_seed(T + M + K + N + epilogue)
    x = random_spikes(T, M, K, gen=gen)
    signs, alpha, bias = random_binary(N, K, gen)
    kw, residual, ln, gate = {}, None, None, None
    if epilogue == cb.EPILOGUE_LAYERNORM:
        residual = random_spikes(T, M, N, rate=0.5, gen=gen)
        ln = (torch.randn(N, generator=gen) * 0.3 + 1, torch.randn(N, generator=gen) * 0.2, 1e-12)
        kw = dict(residual=cb.pack_spikes(residual), ln_weight=ln[0], ln_bias=ln[1], eps=ln[2])
    else:  # the head / neuron gate of pruned models
        gate = (torch.rand(N, generator=gen) < 0.8).float()
        kw = dict(gate=gate)
    ref_current = _linear_reference(x, signs, alpha, bias, epilogue, residual, ln, gate)
    ref_spikes = if_multistep(ref_current, 0.6, leak, fire_on_ge=fire_on_ge)
    xp, wp = cb.pack_spikes(x), cb.pack_signs(signs)
    neuron = dict(v_th=0.6, leak=leak, fire_on_ge=fire_on_ge)

    def run():
        return cb.spike_linear_neuron(
            xp, wp, K, alpha, bias, epilogue=epilogue, return_current=True, **neuron, **kw
        )

    fast, portable = both_paths(run, monkeypatch)
    assert_same(fast, portable)
    spikes, rates, current = fast
    got = cb.unpack_spikes(spikes, N)
    assert torch.equal(rates, got.sum(0) / T)
    if epilogue == cb.EPILOGUE_PLAIN:
        assert torch.equal(current, ref_current)
        assert torch.equal(got, ref_spikes)
    else:  # GELU / LayerNorm replicate torch's rounding; allow near-tie flips elsewhere
        torch.testing.assert_close(current, ref_current, rtol=1e-6, atol=1e-6)
        assert flip_fraction(got, ref_spikes) < 1e-3


def test_gelu_against_the_exact_function(monkeypatch):
    """The GELU epilogue (csrc/gelu.h) within 3 ulp of x * Phi(x), or 1e-9 absolute in the
    negative tail (x < -3, where |gelu| < 0.004 and a fixed-degree polynomial loses relative
    accuracy), on both paths alike.

    With alpha = 0 the projection's current is the bias itself, so each output column evaluates
    GELU at one chosen point. torch's own CPU GELU is further from the exact function in that
    tail (up to 1e-6); the two differ by at most 1.5e-6 (one ulp at |x| ~ 10)."""
    xs = torch.cat(
        [
            torch.linspace(-12.0, 12.0, 48001),
            torch.tensor([0.0, -0.0, 1e-30, -1e-30, 7.99999, 8.0, 8.00001, -8.0, 0.5, -0.5]),
            torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 3,
        ]
    )
    N = xs.numel()
    x = torch.ones(1, 1, 1)
    signs, _, _ = random_binary(N, 1)

    def run():
        return cb.spike_linear_neuron(
            cb.pack_spikes(x),
            cb.pack_signs(signs),
            1,
            torch.zeros(N),
            xs,
            epilogue=cb.EPILOGUE_GELU,
            v_th=1e30,
            return_current=True,
        )

    fast, portable = both_paths(run, monkeypatch)
    assert_same(fast, portable)
    got = fast[2].reshape(N).double()
    exact = torch.tensor([0.5 * v * math.erfc(-v / math.sqrt(2.0)) for v in xs.double().tolist()])
    ulp = torch.from_numpy(np.spacing(exact.abs().float().numpy())).double()
    excess = (got - exact).abs() - torch.where(xs < -3, torch.full_like(ulp, 1e-9), 3 * ulp)
    worst = int(excess.argmax())
    assert excess[worst] <= 0, (
        f"gelu({xs[worst].item()!r}) = {got[worst].item()!r}, exact {exact[worst].item()!r}: "
        f"{((got - exact).abs() / ulp)[worst].item():.1f} ulp"
    )
    assert (got - torch.nn.functional.gelu(xs).double()).abs().max() <= 1.5e-6


# -- attention ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "T,B,S,D,H",
    [
        (1, 1, 1, 16, 2),
        (3, 2, 7, 32, 4),
        (2, 3, 37, 96, 3),
        (2, 2, 20, 24, 3),
        (2, 2, 19, 72, 3),  # head 2 straddles a 64-bit word
        (2, 2, 70, 384, 12),
        (2, 8, 19, 384, 12),  # tasks of 8 heads (256 columns) and a last one of 4
    ],
)
@pytest.mark.parametrize("gated", [False, True])
def test_spiking_attention_neuron(T, B, S, D, H, gated, monkeypatch):
    gen = torch.Generator().manual_seed(T * B * S + D + H + gated)
    d = D // H
    x, k, v = (random_spikes(T, B, S, D, gen=gen) for _ in range(3))
    signs, alpha, bias = random_binary(D, D, gen)
    am = torch.ones(B, S, dtype=torch.long)
    if S > 2:
        am[0, S - 2 :] = 0
    mask_add = ops.attention_mask_additive(am)
    gate = (torch.arange(H) % 2 == 0).float() * 0.75 + 0.25 if gated else None
    q = ops.spike_linear(x, signs, alpha, bias).view(T, B, S, H, d).transpose(2, 3)
    out = ops.spiking_attention(
        q, k.view(T, B, S, H, d).transpose(2, 3), v.view(T, B, S, H, d).transpose(2, 3), mask_add
    )
    if gate is not None:
        out = out * gate.view(1, 1, H, 1, 1)
    ref_current = out.transpose(2, 3).reshape(T, B, S, D)
    ref_spikes = if_multistep(ref_current, 0.05)

    def run():
        return cb.spiking_attention_neuron(
            cb.pack_spikes(x),
            cb.pack_signs(signs),
            D,
            alpha,
            bias,
            cb.pack_spikes(k),
            cb.pack_spikes(v),
            mask_add[:, 0, 0, :].contiguous(),
            H,
            head_gate=gate,
            v_th=0.05,
            return_current=True,
        )

    fast, portable = both_paths(run, monkeypatch)
    assert_same(fast, portable)
    spikes, rates, current = fast
    got = cb.unpack_spikes(spikes, D)
    torch.testing.assert_close(current, ref_current, rtol=1e-6, atol=1e-6)
    assert flip_fraction(got, ref_spikes) < 1e-3
    assert torch.equal(rates, got.sum(0) / T)


# -- Bernoulli draws ----------------------------------------------------------------------------
@pytest.mark.parametrize("K,full", [(1, 1), (37, 37), (64, 200), (130, 130)])
def test_bernoulli_pack_matches_rng(K, full, kernel_path):
    gen = torch.Generator().manual_seed(K)
    B, N = 3, 5
    rates = torch.rand(B, N, K, generator=gen)
    rates[0, 0] = 0.0
    rates[0, 1] = 1.0
    cols = torch.randperm(full, generator=gen)[:K].sort().values
    elements = torch.arange(B * N).view(B, N, 1) * full + cols.view(1, 1, -1)
    for seed, stream, steps in [(0, 0, 1), (7, rng.stream_id(1, 2, 3), 6), (-3, 5, 3)]:
        ref = rng.bernoulli_spikes(rates, seed, stream, range(steps), elements)
        packed = cb.bernoulli_pack(rates, cols, full, seed, stream, steps)
        assert packed.shape == (steps, B, N, (K + 63) // 64)
        assert torch.equal(cb.unpack_spikes(packed, K), ref)


@pytest.mark.parametrize(
    "K,silent", [(15, 0.5), (37, 0.5), (64, 0.5), (65, 0.1), (200, 0.5), (200, 0.9), (1536, 0.5)]
)
def test_bernoulli_pack_with_silent_inputs(K, silent, kernel_path):
    """Trained models leave about half their inputs silent (rate 0) or saturated (rate 1):
    scattered zeros and ones, whole silent and whole saturated rows, and drawn elements
    straddling words give the reference's spikes. The kernel hashes only the undecided elements
    of a row, packed, unless over three quarters of them are (silent 0.1): both paths."""
    gen = torch.Generator().manual_seed(K)
    B, N, full, seed, stream, steps = 2, 9, K + 11, 4, 9, 5
    rates = torch.rand(B, N, K, generator=gen)
    rates[torch.rand(B, N, K, generator=gen) < silent] = 0.0
    rates[torch.rand(B, N, K, generator=gen) < 0.1] = 1.0
    rates[0, 2] = 0.0
    rates[1, 3] = 1.0
    cols = torch.randperm(full, generator=gen)[:K].sort().values
    elements = torch.arange(B * N).view(B, N, 1) * full + cols.view(1, 1, -1)
    ref = rng.bernoulli_spikes(rates, seed, stream, range(steps), elements)
    packed = cb.bernoulli_pack(rates, cols, full, seed, stream, steps)
    assert torch.equal(cb.unpack_spikes(packed, K), ref)
    assert not ref[:, 0, 2].any() and ref[:, 1, 3].all()


def test_bernoulli_pack_at_the_threshold(kernel_path):
    """Rates equal to a draw's own uniform (no spike: u < rate is strict), one float above and
    below it, and the 0 / 1 / out-of-range ends, all as the reference decides them."""
    K, full, seed, stream = 48, 48, 11, 3
    cols = torch.arange(K)
    elements = torch.arange(4 * K).view(4, 1, K)
    u = rng.uniform(seed, stream, range(1), elements)[0]  # [4, 1, K]
    rates = torch.stack(
        [u[0], torch.nextafter(u[1], torch.ones(())), torch.nextafter(u[2], torch.zeros(())), u[3]]
    )
    rates[3, 0, :4] = torch.tensor([0.0, 1.0, -0.5, 1.5])
    ref = rng.bernoulli_spikes(rates, seed, stream, range(1), elements)
    assert not ref[0, 0].any() and ref[0, 1].all()
    packed = cb.bernoulli_pack(rates, cols, full, seed, stream, 1)
    assert torch.equal(cb.unpack_spikes(packed, K), ref)


# -- opcheck ------------------------------------------------------------------------------------
def _opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    T, B, S, K, N, H = 2, 2, 5, 70, 24, 3
    x = cb.pack_spikes(random_spikes(T, B * S, K, gen=gen))
    signs, alpha, bias = random_binary(N, K, gen)
    wp = cb.pack_signs(signs)
    res = cb.pack_spikes(random_spikes(T, B * S, N, gen=gen))
    ops_ = torch.ops.spikeinfer_cpu
    kv = cb.pack_spikes(random_spikes(T, B, S, N, gen=gen))
    return [
        (ops_.pack_spikes, (random_spikes(3, 70, gen=gen),)),
        (ops_.pack_signs, (torch.where(torch.rand(4, 70, generator=gen) < 0.5, 1.0, -1.0),)),
        (ops_.unpack_spikes, (x, K)),
        (ops_.binary_gemm, (x[0], wp, K, alpha, bias)),
        (ops_.neuron_scan, (torch.randn(3, 4, 20, generator=gen), 0.5, 1.0, True)),
        (
            ops_.spike_linear_neuron,
            (x, wp, K, alpha, bias, 1, None, None, None, 1e-12, None, 0.5, 1.0, True, False),
        ),
        (
            ops_.spike_linear_neuron,
            (
                x,
                wp,
                K,
                alpha,
                bias,
                2,
                None,
                None,
                None,
                1e-12,
                torch.rand(N, generator=gen),
                0.5,
                0.9,
                True,
                True,
            ),
        ),
        (
            ops_.spike_linear_neuron,
            (
                x,
                wp,
                K,
                alpha,
                bias,
                3,
                res,
                torch.ones(N),
                torch.zeros(N),
                1e-12,
                None,
                0.5,
                1.0,
                False,
                False,
            ),
        ),
        (
            ops_.spiking_attention_neuron,
            (
                x.view(T, B, S, -1),
                cb.pack_signs(random_binary(N, K)[0]),
                K,
                torch.rand(N),
                torch.randn(N),
                kv,
                kv,
                torch.zeros(B, S),
                None,
                H,
                0.1,
                1.0,
                True,
                True,
            ),
        ),
        (ops_.bernoulli_pack, (torch.rand(B, S, 30, generator=gen), torch.arange(30), 30, 1, 2, 3)),
    ]


@pytest.mark.parametrize("case", range(10))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# -- whole model --------------------------------------------------------------------------------


def inputs(B=3, N=7, vocab=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, N), generator=g)
    am = torch.ones(B, N, dtype=torch.long)
    am[1 % B, N - 2 :] = 0
    am[2 % B, N - 3 :] = 0
    tt = torch.zeros(B, N, dtype=torch.long)
    tt[:, N // 2 :] = 1
    return ids, am, tt


def attention_exact_here(model, B, N) -> bool:
    """Whether the kernel reproduces the reference's attention currents bit for bit at these shapes.

    Projections, LayerNorm and softmax replicate torch's rounding; the two attention matmuls are
    summed in ascending order, which is what MKL does for most but not all shapes."""
    gen = torch.Generator().manual_seed(B * N)
    cfg = model.config
    D, H = cfg.hidden_size, cfg.num_heads
    d = D // H
    x, k, v = (random_spikes(2, B, N, D, gen=gen) for _ in range(3))
    signs, alpha, bias = random_binary(D, D, gen)
    q = ops.spike_linear(x, signs, alpha, bias).view(2, B, N, H, d).transpose(2, 3)
    mask_add = torch.zeros(B, 1, 1, N)
    ref = ops.spiking_attention(
        q, k.view(2, B, N, H, d).transpose(2, 3), v.view(2, B, N, H, d).transpose(2, 3), mask_add
    )
    ref = ref.transpose(2, 3).reshape(2, B, N, D)
    _, _, got = cb.spiking_attention_neuron(
        cb.pack_spikes(x),
        cb.pack_signs(signs),
        D,
        alpha,
        bias,
        cb.pack_spikes(k),
        cb.pack_spikes(v),
        mask_add[:, 0, 0].contiguous(),
        H,
        return_current=True,
    )
    return torch.equal(got, ref)


EXACT_BEFORE_ATTENTION = ("emb", "0.K", "0.V")  # pure binary projections and the counter hash


def assert_agree(ref, got, exact_rates: bool):
    """`exact_rates`: every sublayer before the first F (GELU) has the reference's rates."""
    assert ref.rates.keys() == got.rates.keys()
    assert ref.timesteps == got.timesteps
    past_gelu = False
    for name, r in ref.rates.items():
        g = got.rates[name]
        assert g.shape == r.shape, name
        past_gelu = past_gelu or name.endswith(".F")
        if (exact_rates and not past_gelu) or name in EXACT_BEFORE_ATTENTION:
            assert torch.equal(g, r), name
        else:  # rates differ only by near-tie flips: bound the flipped spikes per sublayer
            steps = ref.timesteps[name]
            assert flip_fraction((g * steps).round(), (r * steps).round()) < 1e-3, name
        assert got.asr[name] == pytest.approx(ref.asr[name], rel=1e-5, abs=1e-7), name
    assert torch.equal(ref.logits.argmax(-1), got.logits.argmax(-1))
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    if ref.traces is not None:
        assert got.traces is not None and ref.traces.keys() == got.traces.keys()
        for name, tr in ref.traces.items():
            torch.testing.assert_close(got.traces[name], tr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 8])
def test_model_unrolled(T):
    model = firing_model()
    ids, am, tt = inputs()
    with torch.no_grad():
        ref = model(ids, am, tt, timesteps=T, record_traces=True)
        got = cb.simulate(model, ids, am, tt, timesteps=T, record_traces=True)
    exact = attention_exact_here(model, *ids.shape)
    assert_agree(ref, got, exact_rates=exact)
    assert sum(a for a in got.asr.values()) > 0.5  # the model really fires
    if exact:  # without padding the ASRs before the first GELU are the reference's floats too
        with torch.no_grad():
            ref = model(ids, None, tt, timesteps=T)
            got = cb.simulate(model, ids, None, tt, timesteps=T)
        before_gelu = list(ref.asr)[: list(ref.asr).index("0.F")]
        assert [got.asr[n] for n in before_gelu] == [ref.asr[n] for n in before_gelu]


def test_model_unrolled_default_T_follows_the_model():
    model = firing_model(seed=4)
    model.set_timesteps([[3] * 6, [3] * 6], t_emb=3)  # a uniform adaptive stage's model
    ids, am, tt = inputs(B=2, N=7)
    with torch.no_grad():
        ref = model(ids, am, tt)
        got = cb.simulate(model, ids, am, tt)
    assert got.timesteps["0.O1"] == ref.timesteps["0.O1"] == 3 and got.timesteps["emb"] == 3
    assert_agree(ref, got, exact_rates=attention_exact_here(model, *ids.shape))


def test_model_sequential_uneven_timesteps():
    model = firing_model(seed=2)
    model.set_timesteps([[3, 5, 4, 7, 2, 6], [1, 2, 3, 4, 5, 6]], t_emb=5)
    ids, am, tt = inputs(B=2, N=7)
    with torch.no_grad():
        ref = model(ids, am, tt, mode="sequential", seed=3, record_traces=True)
        got = cb.simulate(model, ids, am, tt, mode="sequential", seed=3, record_traces=True)
    assert got.timesteps["0.O1"] == 7 and got.timesteps["emb"] == 5
    # Draws use the reference's counter hash on the same element indices, so wherever the
    # currents are exact the rates are exactly the reference's.
    assert_agree(ref, got, exact_rates=attention_exact_here(model, *ids.shape))


def test_model_masks_and_compaction():
    model = firing_model(seed=3)
    model.head_mask[0, 1] = 0
    model.head_mask[1] = 0  # a layer with no heads: only the bias/residual path remains
    model.neuron_mask[0, ::3] = 0
    ids, am, tt = inputs(seed=4)
    small = compact(model)
    assert small.layers[1].num_heads == 0
    with torch.no_grad():
        for m in (model, small):
            exact = attention_exact_here(m, *ids.shape)
            ref = m(ids, am, tt, timesteps=6)
            assert_agree(ref, cb.simulate(m, ids, am, tt, timesteps=6), exact)
            ref = m(ids, am, tt, mode="sequential", seed=5)
            assert_agree(ref, cb.simulate(m, ids, am, tt, mode="sequential", seed=5), exact)
        # Compaction drops no arithmetic: masked and compacted models agree on every kept unit.
        a = cb.simulate(model, ids, am, tt, timesteps=6)
        b = cb.simulate(small, ids, am, tt, timesteps=6)
        assert torch.equal(a.logits, b.logits)


def test_model_leaky_neurons_fire_on_greater():
    from spikeinfer.config import NeuronParams

    model = firing_model(seed=10, neuron=NeuronParams(v_th=1.0, leak=0.9, fire_on_ge=False))
    ids, am, tt = inputs(seed=11)
    with torch.no_grad():
        ref = model(ids, am, tt, timesteps=6)
        got = cb.simulate(model, ids, am, tt, timesteps=6)
        assert_agree(ref, got, attention_exact_here(model, *ids.shape))
        model.set_timesteps([[2, 3, 4, 5, 6, 7]] * 2, t_emb=3)
        ref = model(ids, am, tt, mode="sequential", seed=12)
        got = cb.simulate(model, ids, am, tt, mode="sequential", seed=12)
        assert_agree(ref, got, attention_exact_here(model, *ids.shape))


def test_model_no_ffn_neurons_and_odd_thresholds():
    model = firing_model(seed=6)
    model.neuron_mask[1] = 0
    with torch.no_grad():
        model.v_th.copy_(torch.linspace(0.5, 1.5, model.v_th.numel()))
    small = compact(model)
    ids, am, tt = inputs(seed=7)
    with torch.no_grad():
        ref = small(ids, am, tt, timesteps=5)
        got = cb.simulate(small, ids, am, tt, timesteps=5)
    assert got.rates["1.F"].shape == (3, 7, 0)
    assert_agree(ref, got, exact_rates=False)


def test_model_paths_identical_and_weight_cache(monkeypatch):
    model = firing_model(seed=8)
    ids, am, tt = inputs(seed=9)
    with torch.no_grad():
        fast, portable = both_paths(
            lambda: cb.simulate(model, ids, am, tt, timesteps=4), monkeypatch
        )
        for name in fast.rates:
            assert torch.equal(fast.rates[name], portable.rates[name]), name
        assert torch.equal(fast.logits, portable.logits)
        # Packed weights are cached per model and refreshed when a weight changes.
        cached = model._cpu_weight_cache[(0, "k_proj")][1]
        cb.simulate(model, ids, am, tt, timesteps=2)
        assert model._cpu_weight_cache[(0, "k_proj")][1] is cached
        model.layers[0].k_proj.weight.mul_(-1)
        ref = model(ids, am, tt, timesteps=4)
        got = cb.simulate(model, ids, am, tt, timesteps=4)
        assert model._cpu_weight_cache[(0, "k_proj")][1] is not cached
        assert_agree(ref, got, exact_rates=False)


def test_full_precision_model_is_refused():
    model = SpikingBert(ModelConfig.from_name("tiny", binary=False))
    ids, am, tt = inputs()
    with pytest.raises(BackendUnavailableError, match="1-bit"):
        cb.simulate(model, ids, am, tt, timesteps=2)


def test_bad_arguments_raise_clear_errors():
    x = cb.pack_spikes(torch.ones(2, 10))
    with pytest.raises(RuntimeError, match="words"):
        cb.binary_gemm(x, torch.zeros(3, 2, dtype=torch.int64), 10, torch.ones(3), torch.ones(3))
    with pytest.raises(RuntimeError, match="float32"):
        cb.binary_gemm(
            x, torch.zeros(3, 1, dtype=torch.int64), 10, torch.ones(3).double(), torch.ones(3)
        )
    with pytest.raises(ValueError, match="mode"):
        cb.simulate(firing_model(), *inputs(), mode="bogus")


def test_allocator_tuning_is_applied_once_and_can_be_turned_off():
    code = (
        "from spikeinfer import cpu_backend as cb; print(cb.tune_allocator(), cb.tune_allocator())"
    )
    env = {**os.environ, "SPIKEINFER_MALLOC_TUNING": "0"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert off.stdout.split() == ["False", "False"]
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        env["SPIKEINFER_MALLOC_TUNING"] = "1"
        on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert on.stdout.split() == ["True", "True"]


def test_build_lock_clears_a_killed_builds_baton(tmp_path):
    """A build killed midway leaves torch's `lock` file (and ninja's); the next build must not
    wait on them forever."""
    for stale in ("lock", ".ninja_lock"):
        (tmp_path / stale).write_text("")
    with cb._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists() and not (tmp_path / ".ninja_lock").exists()
        (tmp_path / "lock").write_text("")  # torch's baton of the build in progress
    assert (tmp_path / "spikeinfer.lock").exists()


def bench_module(name: str):
    """A script of bench/ imported as a module (they import each other by file name)."""
    import importlib

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


def test_bench_times_compared_models_in_alternation():
    """bench/bench_cpu.py times the models whose ratio it reports round by round, the order
    rotated, so a slow minute of the machine falls on all of them alike."""
    interleaved_ms = bench_module("bench_cpu").interleaved_ms

    calls = []
    fns = {label: (lambda label=label: calls.append(label)) for label in "abc"}
    times = interleaved_ms(fns, repeats=4, warmup_calls=1)
    assert calls[-12:] == list("abcbcacababc")
    assert {label: len(t) for label, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(ms >= 0 for t in times.values() for ms in t)


def test_bench_warms_a_slow_reference_up_on_a_stand_in():
    """The per-step reference takes seconds a call: interleaved_ms warms it up with a short
    stand-in call (`warmups`) and times only the real calls, in alternation with the others."""
    interleaved_ms = bench_module("bench_cpu").interleaved_ms

    calls = []
    fns = {label: (lambda label=label: calls.append(label)) for label in ("cpu", "step")}
    times = interleaved_ms(
        fns, repeats=3, warmup_calls=1, warmups={"step": lambda: calls.append("step warm-up")}
    )
    assert calls.count("step") == 3 and "step warm-up" in calls
    assert calls[-6:] == ["cpu", "step", "step", "cpu", "cpu", "step"]
    assert {label: len(t) for label, t in times.items()} == {"cpu": 3, "step": 3}


def test_bench_records_the_host():
    cpuinfo = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
        "flags\t\t: fpu avx512f avx512_vpopcntdq amx_int8 amx_tile\n\n"
        "processor\t: 1\nvendor_id\t: OtherVendor\nflags\t\t: amx_bf16\n"
    )
    host = bench_module("provenance").cpu_host(cpuinfo)
    assert host["vendor"] == "GenuineIntel" and (host["family"], host["model"]) == ("6", "143")
    assert host["features"] == ["avx512_vpopcntdq", "amx_int8"]
    assert host["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_op_profile_counts_the_acs_of_the_cost_model():
    """bench/op_profile.py counts each op call's ACs from its shapes; over a forward pass of a
    pruned model (heads, neurons, per-sublayer timesteps) they add up to spikeinfer.cost's M(h,n,t)
    for every example at the padded length."""
    from spikeinfer.cost import ac_count

    OpTimer = bench_module("op_profile").OpTimer

    model = firing_model(seed=13)
    model.head_mask[0, 1] = 0
    model.neuron_mask[1, ::2] = 0
    timesteps = [[3, 4, 5, 2, 6, 3], [2, 2, 3, 4, 5, 7]]
    model.set_timesteps(timesteps, t_emb=4)
    expected = ac_count(model.config, model.head_mask, model.neuron_mask, timesteps, 7) * 3
    small = compact(model)
    ids, am, tt = inputs(seed=14)
    with torch.no_grad(), OpTimer() as timer:
        cb.simulate(small, ids, am, tt, mode="sequential", seed=15)
    assert sum(timer.acs.values()) == expected
    assert timer.calls["attention (Q, scores, softmax, P.V)"] == 2
    assert timer.calls["Bernoulli draws (sequential)"] > 0
    # The wrappers are gone afterwards.
    assert cb.spike_linear_neuron.__module__ == "spikeinfer.cpu_backend"
