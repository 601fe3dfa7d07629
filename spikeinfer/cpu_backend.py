"""The `cpu` backend: C++ popcount kernels for 1-bit spikes with fused IF/LIF (DESIGN section 10).

The sources in `csrc/` (shipped as `spikeinfer.csrc`) are compiled on first use with
`torch.utils.cpp_extension` + ninja into `~/.cache/spikeinfer/cpu-<hash>/` (keyed by the sources,
torch version and flags; `SPIKEINFER_CACHE_DIR` moves it, `SPIKEINFER_VERBOSE_BUILD=1` shows the
compiler) and registered as torch ops in the `spikeinfer_cpu` namespace.
`SPIKEINFER_CPU_SANITIZE=1` builds them with AddressSanitizer instead (a build of its own; the
process must preload libasan, as `tests/asan_ops.py` shows). The kernels pick the CPU's best
path at run time: AVX-512 VPOPCNTDQ, else AVX2 (with FMA, POPCNT, BMI1/2), else portable C++;
`SPIKEINFER_CPU_ISA=portable|avx2|avx512` forces a lower one and `SPIKEINFER_CPU_PORTABLE=1` the
portable one (read at every call; a path the CPU lacks is an error). Every path gives identical
results.

Packed spikes are int64 words [..., ceil(F / 64)]: bit f % 64 of word f / 64 is feature f, padding
bits zero. `simulate` runs a whole 1-bit `SpikingBert` with these ops and returns the same
`SpikingOutput` as the reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from . import ops
from .model import PROJECTIONS

_NAMESPACE = "spikeinfer_cpu"
# -fno-tree-loop-distribute-patterns: GCC otherwise turns the zeroing of small per-call arrays
# (the LayerNorm moments' merge stacks) into rep stos / rep movs, whose start-up cost was a
# third of the moments' time.
_CFLAGS = [
    "-O3",
    "-fopenmp",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-tree-loop-distribute-patterns",
]
_LDFLAGS = ["-fopenmp"]
_SANITIZE_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer"]


def _build_flags() -> tuple[list[str], list[str]]:
    """(cflags, ldflags) of this process's build: AddressSanitizer when SPIKEINFER_CPU_SANITIZE=1
    (the kernels' scratch and output buffers are hand-indexed; a checked build finds overruns
    that land in other allocations unnoticed)."""
    if os.environ.get("SPIKEINFER_CPU_SANITIZE") != "1":
        return _CFLAGS, _LDFLAGS
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        raise RuntimeError(
            "SPIKEINFER_CPU_SANITIZE=1 builds the kernels with AddressSanitizer, whose runtime "
            "must be loaded before Python's: run with LD_PRELOAD=$(gcc "
            "-print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0, or unset "
            "SPIKEINFER_CPU_SANITIZE"
        )
    return _CFLAGS + _SANITIZE_FLAGS, _LDFLAGS + _SANITIZE_FLAGS


_lock = threading.Lock()
_loaded = False
_load_error: str | None = None

# Epilogue codes of spike_linear_neuron (csrc/spikeinfer_cpu.h).
EPILOGUE_PLAIN, EPILOGUE_GELU, EPILOGUE_LAYERNORM = 1, 2, 3


# -- build and load -----------------------------------------------------------------------------
def _source_dir() -> Path:
    """The C++ sources: the installed `spikeinfer.csrc` package, else the repository's csrc/."""
    try:
        root = importlib.resources.files("spikeinfer.csrc")
        path = Path(str(root))
        if (path / "ops.cpp").is_file():
            return path
    except (ModuleNotFoundError, TypeError, ValueError):
        pass
    path = Path(__file__).resolve().parent.parent / "csrc"
    if (path / "ops.cpp").is_file():
        return path
    raise RuntimeError(
        "spikeinfer cpu backend: C++ sources not found (neither the spikeinfer.csrc package nor "
        f"{path}); reinstall spikeinfer"
    )


def _check_toolchain():
    cxx = os.environ.get("CXX", "c++")  # the compiler torch.utils.cpp_extension will run
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"spikeinfer cpu backend needs a C++ compiler to build its kernels, and {cxx!r} was "
            "not found: install g++ (e.g. `apt-get install g++`) and ninja (`pip install ninja`)"
        )
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except RuntimeError as err:
        raise RuntimeError(
            "spikeinfer cpu backend needs ninja to build its kernels: `pip install ninja` (and "
            "g++, e.g. `apt-get install g++`)"
        ) from err


def _build_dir(sources: list[Path], flags: list[str]) -> tuple[str, Path]:
    digest = hashlib.sha256()
    for src in sources:
        digest.update(src.name.encode())
        digest.update(src.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(flags).encode())
    key = digest.hexdigest()[:16]
    root = Path(os.environ.get("SPIKEINFER_CACHE_DIR", "~/.cache/spikeinfer")).expanduser()
    path = root / f"cpu-{key}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home: build in the temp folder instead
        import tempfile

        path = Path(tempfile.gettempdir()) / f"spikeinfer-{os.getuid()}" / f"cpu-{key}"
        path.mkdir(parents=True, exist_ok=True)
    return f"spikeinfer_cpu_{key}", path


# glibc's malloc hands freed blocks above M_MMAP_THRESHOLD, and a free heap top above
# M_TRIM_THRESHOLD, back to the OS at once, so the few-MB outputs of every op are page-faulted in
# again on the next call. Where page faults are expensive (virtual machines, sandboxes) that cost
# as much as the kernels: a hidden-size projection ran at 1.4 instead of 2.4 T binary MACs/s
# (bench/results/cpu_2026-11-21_session2.json). Keeping freed memory in the process, as jemalloc
# and tcmalloc do, removes it. SPIKEINFER_MALLOC_TUNING=0 leaves the allocator alone.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit
_allocator_tuned: bool | None = None


def tune_allocator() -> bool:
    """Apply the malloc settings above once per process (glibc only); returns whether they are
    in effect."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if os.environ.get("SPIKEINFER_MALLOC_TUNING", "1") == "0" or sys.platform != "linux":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    _allocator_tuned = (
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
        and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    )
    return _allocator_tuned


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Serialise builds of one build folder across processes with an OS file lock, which the
    kernel releases when its holder dies. torch's own lock is a plain `lock` file: a build killed
    midway leaves it behind and every later process waits on it forever. Holding this lock, any
    such file is a dead build's, so it is removed (with ninja's) before torch looks."""
    import fcntl

    with open(build_dir / "spikeinfer.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for stale in ("lock", ".ninja_lock"):
                (build_dir / stale).unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_library():
    """Compile (once, cached) and load the kernels; raises RuntimeError with the reason."""
    global _loaded, _load_error
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        if _load_error is not None:
            raise RuntimeError(_load_error)
        try:
            if not hasattr(torch.ops, _NAMESPACE) or not hasattr(
                getattr(torch.ops, _NAMESPACE), "binary_gemm"
            ):
                src = _source_dir()
                sources = sorted(src.glob("*.cpp")) + sorted(src.glob("*.h"))
                cflags, ldflags = _build_flags()
                name, build_dir = _build_dir(sources, cflags + ldflags)
                if not (build_dir / f"{name}.so").is_file():  # a cached build needs no compiler
                    _check_toolchain()
                from torch.utils.cpp_extension import load

                with _build_lock(build_dir):
                    load(
                        name=name,
                        sources=[str(s) for s in sources if s.suffix == ".cpp"],
                        extra_cflags=cflags,
                        extra_ldflags=ldflags,
                        extra_include_paths=[str(src)],
                        build_directory=str(build_dir),
                        is_python_module=False,
                        verbose=os.environ.get("SPIKEINFER_VERBOSE_BUILD") == "1",
                    )
            _register_fakes()
            tune_allocator()
            _loaded = True
        except Exception as err:  # keep the reason for is_available() and later calls
            detail = str(err)
            if len(detail) > 2000:  # a failed build carries the whole compiler log
                detail = "... " + detail[-2000:]
            _load_error = f"spikeinfer cpu backend unavailable: {detail}"
            raise RuntimeError(_load_error) from err


def is_available() -> tuple[bool, str]:
    """(True, kernel path) when the kernels build and load here, else (False, why not)."""
    try:
        load_library()
        path = isa()  # a SPIKEINFER_CPU_ISA this CPU cannot run is refused here
    except RuntimeError as err:
        return False, str(err)
    return True, f"cpu kernels loaded ({path})"


def _ops():
    load_library()
    return getattr(torch.ops, _NAMESPACE)


def isa() -> str:
    """The kernel path the next call will take: "avx512-vpopcntdq", "avx2" or "portable"."""
    return _ops().isa()


# -- fake (meta) implementations, so the ops trace and pass torch.library.opcheck ---------------
_fakes_registered = False


def _words(features):
    return (features + 63) // 64


def _register_fakes():
    global _fakes_registered
    if _fakes_registered:
        return
    ns = _NAMESPACE
    reg = torch.library.register_fake

    @reg(f"{ns}::pack_spikes")
    def _pack_spikes(spikes):
        return spikes.new_empty((*spikes.shape[:-1], _words(spikes.shape[-1])), dtype=torch.int64)

    @reg(f"{ns}::pack_signs")
    def _pack_signs(signs):
        return signs.new_empty((signs.shape[0], _words(signs.shape[1])), dtype=torch.int64)

    @reg(f"{ns}::unpack_spikes")
    def _unpack_spikes(packed, features):
        return packed.new_empty((*packed.shape[:-1], features), dtype=torch.float32)

    @reg(f"{ns}::binary_gemm")
    def _binary_gemm(spikes, signs, in_features, alpha, bias):
        return spikes.new_empty((*spikes.shape[:-1], signs.shape[0]), dtype=torch.float32)

    @reg(f"{ns}::neuron_scan")
    def _neuron_scan(current, v_th, leak, fire_on_ge):
        T, M, N = current.shape
        return (
            current.new_empty((T, M, _words(N)), dtype=torch.int64),
            current.new_empty((M, N), dtype=torch.float32),
        )

    @reg(f"{ns}::spike_linear_neuron")
    def _spike_linear_neuron(
        spikes,
        signs,
        in_features,
        alpha,
        bias,
        epilogue,
        residual,
        ln_weight,
        ln_bias,
        eps,
        gate,
        v_th,
        leak,
        fire_on_ge,
        return_current,
    ):
        T, M = spikes.shape[0], spikes.shape[1]
        N = signs.shape[0]
        current = (
            spikes.new_empty((T, M, N), dtype=torch.float32)
            if return_current
            else spikes.new_empty((0,), dtype=torch.float32)
        )
        return (
            spikes.new_empty((T, M, _words(N)), dtype=torch.int64),
            spikes.new_empty((M, N), dtype=torch.float32),
            current,
        )

    @reg(f"{ns}::spiking_attention_neuron")
    def _attention(
        spikes,
        q_signs,
        in_features,
        q_alpha,
        q_bias,
        k_spikes,
        v_spikes,
        mask_add,
        head_gate,
        heads,
        v_th,
        leak,
        fire_on_ge,
        return_current,
    ):
        T, B, S = spikes.shape[:3]
        HD = q_signs.shape[0]
        current = (
            spikes.new_empty((T, B, S, HD), dtype=torch.float32)
            if return_current
            else spikes.new_empty((0,), dtype=torch.float32)
        )
        return (
            spikes.new_empty((T, B, S, _words(HD)), dtype=torch.int64),
            spikes.new_empty((B, S, HD), dtype=torch.float32),
            current,
        )

    @reg(f"{ns}::bernoulli_pack")
    def _bernoulli_pack(rates, columns, full_width, seed, stream, steps):
        return rates.new_empty(
            (steps, *rates.shape[:-1], _words(rates.shape[-1])), dtype=torch.int64
        )

    _fakes_registered = True


# -- op wrappers --------------------------------------------------------------------------------
def pack_spikes(spikes: torch.Tensor) -> torch.Tensor:
    """0/1 spikes [..., K] (any dtype) -> packed int64 words [..., ceil(K / 64)]."""
    return _ops().pack_spikes(spikes)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """+-1 signs [N, K] -> packed words [N, ceil(K / 64)], bit = 1 for +1."""
    return _ops().pack_signs(signs)


def unpack_spikes(packed: torch.Tensor, features: int) -> torch.Tensor:
    """Packed words [..., ceil(F / 64)] -> float 0/1 [..., F]."""
    return _ops().unpack_spikes(packed, features)


def binary_gemm(
    spikes: torch.Tensor,
    signs: torch.Tensor,
    in_features: int,
    alpha: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """count * alpha + bias for packed spikes [..., Kw] and packed signs [N, Kw] -> float [..., N];
    equal to `spikeinfer.ops.spike_linear` on the unpacked tensors."""
    return _ops().binary_gemm(spikes, signs, in_features, alpha, bias)


def neuron_scan(
    current: torch.Tensor, v_th: float = 1.0, leak: float = 1.0, fire_on_ge: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """IF/LIF over current [T, M, N] (stride 0 over T allowed) -> (packed spikes [T, M, Nw],
    rates [M, N] = spike count / T)."""
    return _ops().neuron_scan(current, float(v_th), float(leak), bool(fire_on_ge))


def spike_linear_neuron(
    spikes,
    signs,
    in_features,
    alpha,
    bias,
    *,
    epilogue=EPILOGUE_PLAIN,
    residual=None,
    ln_weight=None,
    ln_bias=None,
    eps=1e-12,
    gate=None,
    v_th=1.0,
    leak=1.0,
    fire_on_ge=True,
    return_current=False,
):
    """Binary projection of packed spikes [T, M, Kw] for all T, epilogue, then the neuron scan.

    Returns (packed spikes [T, M, Nw], rates [M, N] = spike count / T, the neuron's input current
    [T, M, N] when `return_current`, else an empty tensor)."""
    return _ops().spike_linear_neuron(
        spikes,
        signs,
        in_features,
        alpha,
        bias,
        int(epilogue),
        residual,
        ln_weight,
        ln_bias,
        float(eps),
        gate,
        float(v_th),
        float(leak),
        bool(fire_on_ge),
        bool(return_current),
    )


def spiking_attention_neuron(
    spikes,
    q_signs,
    in_features,
    q_alpha,
    q_bias,
    k_spikes,
    v_spikes,
    mask_add,
    heads,
    *,
    head_gate=None,
    v_th=1.0,
    leak=1.0,
    fire_on_ge=True,
    return_current=False,
):
    """Q = binary projection of spikes [T, B, S, Kw]; per head softmax(Q S_K^T / sqrt(d) + mask)
    S_V (times the head gate); then the A neuron scan. Returns (packed A spikes [T, B, S, Nw],
    rates [B, S, H*d], A current [T, B, S, H*d] when `return_current`, else empty)."""
    return _ops().spiking_attention_neuron(
        spikes,
        q_signs,
        in_features,
        q_alpha,
        q_bias,
        k_spikes,
        v_spikes,
        mask_add,
        head_gate,
        int(heads),
        float(v_th),
        float(leak),
        bool(fire_on_ge),
        bool(return_current),
    )


def bernoulli_pack(rates, columns, full_width, seed, stream, steps) -> torch.Tensor:
    """Packed Bernoulli spikes [steps, ..., Kw] drawn from rates [..., K] with the counter hash of
    `spikeinfer.rng` (element = row * full_width + columns[k])."""
    return _ops().bernoulli_pack(
        rates, columns, int(full_width), int(seed), int(stream), int(steps)
    )


# -- whole-model simulation -------------------------------------------------------------------
def _projection_key(proj) -> tuple:
    """Changes whenever the projection's signs or scales can have changed."""
    if proj.frozen:
        return (
            "frozen",
            proj.signs.data_ptr(),
            proj.signs._version,
            proj.alpha.data_ptr(),
            proj.alpha._version,
            tuple(proj.signs.shape),
        )
    return ("latent", proj.weight.data_ptr(), proj.weight._version, tuple(proj.weight.shape))


def packed_weights(model) -> list[dict]:
    """Per block {projection name: (packed +1 signs [N, Kw], alpha [N], bias [N], in_features)},
    packed once and cached on the model, keyed by the weights' versions."""
    cache = model.__dict__.setdefault("_cpu_weight_cache", {})
    out = []
    for l, block in enumerate(model.layers):
        entry = {}
        for name in PROJECTIONS:
            proj = getattr(block, name)
            key = _projection_key(proj)
            hit = cache.get((l, name))
            if hit is None or hit[0] != key:
                signs, alpha = proj.binary_weights()
                packed = pack_signs(signs.detach().float().contiguous())
                hit = (key, packed, alpha.detach().float().contiguous())
                cache[(l, name)] = hit
            entry[name] = (
                hit[1],
                hit[2],
                proj.bias.detach().float().contiguous(),
                proj.in_features,
            )
        out.append(entry)
    return out


class _Record:
    """Counts (and, for traces, per-step token-mean spikes) per sublayer, in the reference's
    format (`spikeinfer.model._Recorder`)."""

    def __init__(self, valid: torch.Tensor, B: int, N: int, traces: bool):
        self.valid, self.B, self.N = valid, B, N
        self.n_valid = valid.sum()
        self.rates: dict[str, torch.Tensor] = {}
        self.steps: dict[str, int] = {}
        self.instant: dict[str, torch.Tensor] | None = {} if traces else None

    def add(
        self, name: str, packed: torch.Tensor, rates: torch.Tensor, features: int
    ) -> torch.Tensor:
        steps = packed.shape[0]
        rate = rates.reshape(self.B, self.N, features)
        self.rates[name] = rate
        self.steps[name] = steps
        if self.instant is not None:
            spikes = unpack_spikes(packed, features).view(steps, self.B, self.N, features)
            self.instant[name] = (spikes * self.valid[None, :, :, None]).sum((1, 2)) / self.n_valid
        return rate

    def traces(self):
        if self.instant is None:
            return None
        out = {}
        for name, inst in self.instant.items():
            steps = torch.arange(1, inst.shape[0] + 1, dtype=inst.dtype)
            out[name] = inst.cumsum(0) / steps[:, None]
        return out


def _empty_spikes(T: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(T, rows, 0, dtype=torch.int64), torch.zeros(rows, 0)


def simulate(
    model,
    input_ids,
    attention_mask=None,
    token_type_ids=None,
    *,
    mode="unrolled",
    timesteps=None,
    seed: int = 0,
    record_traces: bool = False,
    head_mask=None,
    neuron_mask=None,
):
    """Simulate a 1-bit `SpikingBert` with the C++ kernels; same semantics and output format as
    `SpikingBert.forward` with the reference backends (`_simulate_unrolled` /
    `_simulate_sequential`), returning a `spikeinfer.model.SpikingOutput`."""
    from .model import MODES, BackendUnavailableError, SpikingOutput, mean_asr

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if not model.config.binary:
        raise BackendUnavailableError(
            "the cpu backend runs 1-bit models only (config.binary=True); this model is full "
            "precision: use backend 'torch' or 'torch-step'"
        )
    try:
        load_library()
    except RuntimeError as err:
        raise BackendUnavailableError(str(err)) from err
    input_ids, attention_mask, token_type_ids = model._check_inputs(
        input_ids, attention_mask, token_type_ids
    )
    if input_ids.device.type != "cpu":
        raise BackendUnavailableError(
            f"the cpu backend needs CPU tensors, got inputs on {input_ids.device}"
        )
    with torch.no_grad():
        E = model.embeddings(input_ids, token_type_ids).float().contiguous()
        B, N, _ = E.shape
        valid = attention_mask.to(E.dtype)
        mask_add = ops.attention_mask_additive(attention_mask, E.dtype)[:, 0, 0, :].contiguous()
        gates = [
            (
                None if hg is None else hg.detach().float().contiguous(),
                None if ng is None else ng.detach().float().contiguous(),
            )
            for hg, ng in model.gates(head_mask, neuron_mask)
        ]
        weights = packed_weights(model)
        rec = _Record(valid, B, N, record_traces)
        if mode == "unrolled":
            T = model.unrolled_timesteps if timesteps is None else int(timesteps)
            if T < 1:
                raise ValueError(f"timesteps must be >= 1, got {T}")
            _unrolled(model, E, mask_add, gates, weights, rec, T)
        else:
            if timesteps is not None:
                model.set_timesteps(timesteps)
            _sequential(model, E, mask_add, gates, weights, rec, seed)
        last = rec.rates[f"{model.config.num_layers - 1}.O2"]
        logits = model.classifier(last[:, 0])
        asr = {name: mean_asr(r, valid) for name, r in rec.rates.items()}
    return SpikingOutput(logits, dict(rec.rates), asr, rec.traces(), dict(rec.steps))


def _neuron(model):
    n = model.config.neuron
    return {"leak": float(n.leak), "fire_on_ge": bool(n.fire_on_ge)}


def _threshold(model, index: int) -> float:
    return float(model.threshold(index))


def _linear(w, x, index, model, **kw):
    signs, alpha, bias, k = w
    spikes, rates, _ = spike_linear_neuron(
        x, signs, k, alpha, bias, v_th=_threshold(model, index), **_neuron(model), **kw
    )
    return spikes, rates


def _block_sublayers(model, l, block, w, gate, mask_add, rec, steps_of, x_in, draws):
    """Run the six sublayers of block l and return (O2 spikes, O2 rate).

    `steps_of(sublayer)` is the sublayer's timestep count, `x_in(sublayer)` the packed block input
    it reads ([T', B*N, Dw]), and `draws(sublayer, source, spikes, rate)` the packed input it reads
    from sublayer `source`: the spikes themselves (unrolled) or fresh Bernoulli draws from the
    rate (sequential)."""
    from .config import SUBLAYERS

    cfg = model.config
    D, d = cfg.hidden_size, cfg.head_dim
    B, N = rec.B, rec.N
    i = 1 + len(SUBLAYERS) * l
    hg, ng = gate
    nd, nf = block.num_heads * d, block.num_neurons
    ln1, ln2 = block.ln_o1, block.ln_o2
    if nd > 0:
        sK, cK = _linear(w["k_proj"], x_in("K"), i, model)
        a_k = rec.add(f"{l}.K", sK, cK, nd)
        sV, cV = _linear(w["v_proj"], x_in("V"), i + 1, model)
        a_v = rec.add(f"{l}.V", sV, cV, nd)
        xa = x_in("A")
        T_a = xa.shape[0]
        k_in = draws("A", "K", sK, a_k).view(T_a, B, N, -1)
        v_in = draws("A", "V", sV, a_v).view(T_a, B, N, -1)
        signs, alpha, bias, k = w["q_proj"]
        sA, cA, _ = spiking_attention_neuron(
            xa.view(T_a, B, N, -1),
            signs,
            k,
            alpha,
            bias,
            k_in,
            v_in,
            mask_add,
            block.num_heads,
            head_gate=hg,
            v_th=_threshold(model, i + 2),
            **_neuron(model),
        )
        sA = sA.view(T_a, B * N, -1)
        a_a = rec.add(f"{l}.A", sA, cA, nd)
    else:  # every head pruned: K, V, A are empty and O1 sees only its bias and residual
        for name in ("K", "V", "A"):
            sE, cE = _empty_spikes(steps_of(name), B * N)
            rec.add(f"{l}.{name}", sE, cE, 0)
        sA, a_a = None, torch.zeros(B, N, 0)
    a_in = draws("O1", "A", sA, a_a)
    sO1, cO1 = _linear(
        w["o_proj"],
        a_in,
        i + 3,
        model,
        epilogue=EPILOGUE_LAYERNORM,
        residual=x_in("O1"),
        ln_weight=ln1.weight.detach().float().contiguous(),
        ln_bias=ln1.bias.detach().float().contiguous(),
        eps=ln1.eps,
    )
    a_o1 = rec.add(f"{l}.O1", sO1, cO1, D)
    o1_in = draws("F", "O1", sO1, a_o1)
    if nf > 0:
        sF, cF = _linear(w["ffn1"], o1_in, i + 4, model, epilogue=EPILOGUE_GELU, gate=ng)
        a_f = rec.add(f"{l}.F", sF, cF, nf)
    else:
        sF, cF = _empty_spikes(steps_of("F"), B * N)
        a_f = rec.add(f"{l}.F", sF, cF, 0)
    f_in = draws("O2", "F", sF, a_f)
    sO2, cO2 = _linear(
        w["ffn2"],
        f_in,
        i + 5,
        model,
        epilogue=EPILOGUE_LAYERNORM,
        residual=draws("O2", "O1", sO1, a_o1),
        ln_weight=ln2.weight.detach().float().contiguous(),
        ln_bias=ln2.bias.detach().float().contiguous(),
        eps=ln2.eps,
    )
    a_o2 = rec.add(f"{l}.O2", sO2, cO2, D)
    return sO2, a_o2


def _unrolled(model, E, mask_add, gates, weights, rec, T):
    B, N, D = E.shape
    x, rates = neuron_scan(
        E.view(1, B * N, D).expand(T, B * N, D), _threshold(model, 0), **_neuron(model)
    )
    rec.add("emb", x, rates, D)
    for l, (block, w, gate) in enumerate(zip(model.layers, weights, gates, strict=True)):

        def x_in(sublayer, x=x):
            return x

        def draws(sublayer, source, spikes, rate):
            return spikes if spikes is not None else torch.zeros(T, B * N, 0, dtype=torch.int64)

        x, _ = _block_sublayers(
            model, l, block, w, gate, mask_add, rec, lambda sublayer: T, x_in, draws
        )


def _sequential(model, E, mask_add, gates, weights, rec, seed):
    from . import rng
    from .config import SUBLAYERS

    cfg = model.config
    B, N, D = E.shape
    H, d = cfg.num_heads, cfg.head_dim
    sub_index = {name: j for j, name in enumerate(SUBLAYERS)}
    in_index = {name: j for j, name in enumerate(rng.INPUTS)}
    t_emb = model.t_emb
    x, rates = neuron_scan(
        E.view(1, B * N, D).expand(t_emb, B * N, D), _threshold(model, 0), **_neuron(model)
    )
    a_x = rec.add("emb", x, rates, D)
    x_cols = torch.arange(D)
    for l, (block, w, gate) in enumerate(zip(model.layers, weights, gates, strict=True)):
        steps = dict(zip(SUBLAYERS, model.timesteps[l], strict=True))
        # Original column of every feature and the uncompacted width it lives in (rng.py).
        columns = {
            "x": (x_cols, D),
            "O1": (x_cols, D),
            "K": (block.attention_columns().cpu(), H * d),
            "V": (block.attention_columns().cpu(), H * d),
            "A": (block.attention_columns().cpu(), H * d),
            "F": (block.kept_neurons.cpu(), cfg.intermediate_size),
        }

        def draw(sublayer, source, rate, l=l, steps=steps, columns=columns):
            cols, width = columns[source]
            stream = rng.stream_id(l, sub_index[sublayer], in_index[source])
            packed = bernoulli_pack(
                rate.float().contiguous(), cols, width, seed, stream, steps[sublayer]
            )
            return packed.view(steps[sublayer], B * N, packed.shape[-1])

        def x_in(sublayer, a_x=a_x, draw=draw):
            return draw(sublayer, "x", a_x)

        def draws(sublayer, source, spikes, rate, draw=draw):
            return draw(sublayer, source, rate)

        _, a_x = _block_sublayers(
            model, l, block, w, gate, mask_add, rec, steps.__getitem__, x_in, draws
        )
