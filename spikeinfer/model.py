"""The reference spiking BERT (DESIGN sections 1-3) and its rate surrogate (section 6).

Every block has six neuron sublayers fed by these currents (x: the block's input spikes):

    K  = W_K x + b_K                         V  = W_V x + b_V
    A  = softmax(Q S_K^T / sqrt(d) + mask) S_V   with Q = W_Q x + b_Q real-valued
    O1 = LN(W_O S_A + b_O + x)               F  = GELU(W_1 S_O1 + b_1)
    O2 = LN(W_2 S_F + b_2 + S_O1)

The current functions of `Block` are time-major ([T, B, N, ...]) and are shared by both reference
flavours and by the surrogate: `torch` folds all timesteps into one call (T in the GEMM M
dimension), `torch-step` calls them once per step with T = 1 and carries membranes between calls.
The neuron update is `neuron.if_step` in both, so the two flavours agree bit for bit.

Modes: `unrolled` runs every sublayer for the same T, spikes flowing through the network at each
step; `sequential` runs sublayer l for its own t_l steps on input spikes drawn fresh from the rates
of the sublayers feeding it (`rng.bernoulli_spikes`), passing only rate vectors between sublayers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, rng
from .config import (
    SUBLAYERS,
    ModelConfig,
    check_timesteps,
    sublayer_names,
    uniform_timesteps,
)
from .neuron import if_multistep, if_step
from .quant import binarize, binarize_ste

BACKENDS = ("torch", "torch-step", "triton", "cpu")
MODES = ("unrolled", "sequential")
# The six 1-bit projections of a block, in the order checkpoints and kernels list them.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "ffn1", "ffn2")

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# Index of each sublayer's input stream in rng.INPUTS, for sequential-mode draws.
_IN = {name: i for i, name in enumerate(rng.INPUTS)}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here (never silently replaced by another)."""


class Projection(nn.Module):
    """A linear map from spikes: 1-bit (alpha (.) sign, straight-through) or full precision.

    Holds either a trainable latent `weight` or, once frozen (loaded 1-bit checkpoints, compacted
    models), the exact `signs` and `alpha` buffers, so inference reproduces the saved model bit for
    bit instead of re-deriving alpha from a reconstructed latent weight.
    """

    def __init__(self, in_features: int, out_features: int, binary: bool, per_row: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.binary, self.per_row = binary, per_row
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.register_buffer("signs", None)
        self.register_buffer("alpha", None)
        nn.init.normal_(self.weight, std=0.02)
        self._cache = None

    @property
    def frozen(self) -> bool:
        return self.signs is not None

    def freeze(self):
        """Replace the latent weight by its exact binarisation (no-op for full precision)."""
        if self.binary and not self.frozen:
            signs, alpha = self.binary_weights()
            self.weight = None
            self.signs, self.alpha = signs.detach().clone(), alpha.detach().clone()
        return self

    def binary_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(signs [out, in] +-1, alpha [out]) without gradient."""
        if self.frozen:
            return self.signs, self.alpha
        if self.in_features == 0:
            return self.weight.detach(), torch.zeros(self.out_features, device=self.bias.device)
        key = (self.weight._version, self.weight.data_ptr())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, binarize(self.weight.detach(), self.per_row))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.binary:
            return ops.dense_linear(x, self.weight, self.bias)
        if self.frozen or not torch.is_grad_enabled() or not self.weight.requires_grad:
            signs, alpha = self.binary_weights()
        else:
            signs, alpha = binarize_ste(self.weight, self.per_row)
        return ops.spike_linear(x, signs, alpha, self.bias)

    def variance(self, var_in: torch.Tensor) -> torch.Tensor:
        """Variance of one step's output for independent inputs of variance `var_in` [..., in]:
        sum_i W_ni^2 var_i (the bias adds none). A 1-bit row is alpha_n (.) signs, signs^2 = 1."""
        if not self.binary:
            return ops.dense_linear(var_in, self.weight.square(), None)
        if self.frozen or not torch.is_grad_enabled() or not self.weight.requires_grad:
            _, alpha = self.binary_weights()
        else:
            _, alpha = binarize_ste(self.weight, self.per_row)
        return var_in.sum(-1, keepdim=True) * alpha.square()

    def select(self, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
        """Keep only `rows` (output units) and `cols` (input units), in place; freezes 1-bit first
        so scales stay those of the full matrix."""
        self.freeze()
        names = ("signs", "alpha") if self.binary else ("weight",)
        for name in names:
            t = getattr(self, name)
            if rows is not None:
                t = t[rows]
            if cols is not None and t.dim() == 2:
                t = t[:, cols]
            t = t.detach().clone()
            setattr(self, name, nn.Parameter(t) if name == "weight" else t)
        if rows is not None:
            self.bias = nn.Parameter(self.bias.detach()[rows].clone())
            self.out_features = len(rows)
        if cols is not None:
            self.in_features = len(cols)
        self._cache = None


class Embeddings(nn.Module):
    """E = LayerNorm(word + position + token-type): computed once, injected as constant current."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        for emb in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        e = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings(token_type_ids)
        )
        return self.LayerNorm(e)


class Block(nn.Module):
    """One encoder block with `heads` kept heads and `neurons` kept FFN neurons."""

    def __init__(self, cfg: ModelConfig, heads: int | None = None, neurons: int | None = None):
        super().__init__()
        heads = cfg.num_heads if heads is None else heads
        neurons = cfg.intermediate_size if neurons is None else neurons
        D, d, per_row = cfg.hidden_size, cfg.head_dim, cfg.weight_scale == "row"
        self.head_dim = d
        self.q_proj = Projection(D, heads * d, cfg.binary, per_row)
        self.k_proj = Projection(D, heads * d, cfg.binary, per_row)
        self.v_proj = Projection(D, heads * d, cfg.binary, per_row)
        self.o_proj = Projection(heads * d, D, cfg.binary, per_row)
        self.ffn1 = Projection(D, neurons, cfg.binary, per_row)
        self.ffn2 = Projection(neurons, D, cfg.binary, per_row)
        self.ln_o1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.ln_o2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        # Original (uncompacted) indices of the kept heads and FFN neurons.
        self.register_buffer("kept_heads", torch.arange(heads))
        self.register_buffer("kept_neurons", torch.arange(neurons))

    def projections(self) -> list[Projection]:
        return [getattr(self, name) for name in PROJECTIONS]

    @property
    def num_heads(self) -> int:
        return len(self.kept_heads)

    @property
    def num_neurons(self) -> int:
        return len(self.kept_neurons)

    def attention_columns(self) -> torch.Tensor:
        """Original feature index of every K/V/A unit: kept head h, dim j -> h * d + j."""
        d = self.head_dim
        offsets = torch.arange(d, device=self.kept_heads.device)
        return (self.kept_heads[:, None] * d + offsets[None, :]).reshape(-1)

    # -- currents; every input and output is time-major [T, B, N, features] --------------------
    def current_k(self, x):
        return self.k_proj(x)

    def current_v(self, x):
        return self.v_proj(x)

    def current_a(self, x, s_k, s_v, mask_add, head_gate=None, return_scores=False):
        T, B, N, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(x).view(T, B, N, h, d).transpose(2, 3)  # [T, B, h, N, d]
        k = s_k.view(T, B, N, h, d).transpose(2, 3)  # [T, B, h, N, d]
        v = s_v.view(T, B, N, h, d).transpose(2, 3)  # [T, B, h, N, d]
        out, scores = ops.spiking_attention(q, k, v, mask_add, return_scores=True)
        if head_gate is not None:
            out = out * head_gate.view(1, 1, h, 1, 1)
        out = out.transpose(2, 3).reshape(T, B, N, h * d)  # [T, B, N, h*d]
        return (out, scores) if return_scores else out

    def current_o1(self, s_a, x):
        return self.ln_o1(self.o_proj(s_a) + x)

    def current_f(self, s_o1, neuron_gate=None):
        out = F.gelu(self.ffn1(s_o1))
        return out if neuron_gate is None else out * neuron_gate

    def current_o2(self, s_f, s_o1):
        return self.ln_o2(self.ffn2(s_f) + s_o1)

    # -- moment currents of the noise-aware surrogate (SpikingBert.surrogate, moments=True) -----
    # Inputs are rates a; a 0/1 spike train of rate a has per-step variance a (1 - a), times
    # `noise` (1: the spiking model's; below 1 towards the rate surrogate, for a curriculum).
    def moment_a(self, x, a_k, a_v, mask_add, head_gate=None, noise=1.0):
        """Expected attention current and the scores it came from, shifted by half their
        per-step variance (time-major like `current_a`)."""
        T, B, N, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(x).view(T, B, N, h, d).transpose(2, 3)  # [T, B, h, N, d]
        q_var = self.q_proj.variance(noise * spike_variance(x))
        q_var = q_var.view(T, B, N, h, d).transpose(2, 3)  # [T, B, h, N, d]
        k = a_k.view(T, B, N, h, d).transpose(2, 3)  # [T, B, h, N, d]
        v = a_v.view(T, B, N, h, d).transpose(2, 3)  # [T, B, h, N, d]
        # Var(q . k) for independent q and 0/1 k: E[q]^2 Var(k) + Var(q) E[k^2], E[k^2] = a_k.
        k_t, k_var_t = k.transpose(-1, -2), (noise * spike_variance(k)).transpose(-1, -2)
        score_var = ((q * q) @ k_var_t + q_var @ k_t) / d  # [T, B, h, N, N]
        out, scores = ops.spiking_attention(q, k, v, mask_add + score_var / 2, return_scores=True)
        if head_gate is not None:
            out = out * head_gate.view(1, 1, h, 1, 1)
        return out.transpose(2, 3).reshape(T, B, N, h * d), scores  # [T, B, N, h*d]

    def moment_o1(self, a_a, x, noise=1.0, record=None):
        m = self.o_proj(a_a) + x
        var = self.o_proj.variance(noise * spike_variance(a_a)) + noise * spike_variance(x)
        if record is not None:
            record.append((m, var))
        return layer_norm_with_noise(self.ln_o1, m, var)

    def moment_f(self, a_o1, neuron_gate=None, noise=1.0):
        var = self.ffn1.variance(noise * spike_variance(a_o1))
        out = gelu_expectation(self.ffn1(a_o1), var)
        return out if neuron_gate is None else out * neuron_gate

    def moment_o2(self, a_f, a_o1, noise=1.0, record=None):
        m = self.ffn2(a_f) + a_o1
        var = self.ffn2.variance(noise * spike_variance(a_f)) + noise * spike_variance(a_o1)
        if record is not None:
            record.append((m, var))
        return layer_norm_with_noise(self.ln_o2, m, var)


def spike_variance(a: torch.Tensor) -> torch.Tensor:
    """Per-step variance of a 0/1 spike train with rate a."""
    return a * (1.0 - a)


def layer_norm_with_noise(ln: nn.LayerNorm, mean: torch.Tensor, noise: torch.Tensor):
    """Time average of a per-step LayerNorm whose input is `mean` plus per-feature noise of
    variance `noise`: every step divides by a deviation over the features that includes the
    noise, var(mean) + avg(noise), which the rate surrogate's LayerNorm leaves out."""
    mu = mean.mean(-1, keepdim=True)
    var = (mean - mu).square().mean(-1, keepdim=True) + noise.mean(-1, keepdim=True)
    return (mean - mu) * torch.rsqrt(var + ln.eps) * ln.weight + ln.bias


def gelu_expectation(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """E[GELU(z)] for z ~ N(mean, var), GELU(z) = z Phi(z): by Stein's lemma
    mean Phi(mean / s) + var phi(mean / s) / s with s = sqrt(1 + var)."""
    s = torch.sqrt(1.0 + var)
    u = mean / s
    cdf = 0.5 * (1.0 + torch.erf(u * _SQRT_HALF))
    pdf = torch.exp(-0.5 * u.square()) * _INV_SQRT_2PI
    return mean * cdf + var * pdf / s


@dataclass
class SpikingOutput:
    """Result of a spiking simulation.

    rates: per sublayer ("emb", "0.K", ..., "{L-1}.O2") the ASR of every neuron [B, N, features];
    asr: per sublayer the mean ASR over real tokens and features;
    traces (on request): per sublayer the running ASR at every timestep, averaged over real
    tokens, [T_l, features] (the matrices temporal PCA works on).
    """

    logits: torch.Tensor
    rates: dict[str, torch.Tensor]
    asr: dict[str, float]
    traces: dict[str, torch.Tensor] | None = None
    timesteps: dict[str, int] = field(default_factory=dict)


@dataclass
class SurrogateOutput:
    logits: torch.Tensor
    rates: dict[str, torch.Tensor]
    attention_scores: list[torch.Tensor] | None = None  # per block [B, h, N, N], pre-softmax
    hidden_states: list[torch.Tensor] | None = None  # embedding + every block's O2 rate [B, N, D]
    # moments=True: (mean input, per-feature noise variance) of every per-step LayerNorm, O1 and
    # O2 of each block, [1, B, N, D] each
    layer_norm_inputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class _Recorder:
    """Collects per-sublayer spike counts (and per-step token-mean spikes for traces)."""

    def __init__(self, valid: torch.Tensor, traces: bool):
        self.valid = valid  # [B, N] float, 1 for real tokens
        self.n_valid = valid.sum()
        self.sums: dict[str, torch.Tensor] = {}
        self.steps: dict[str, int] = {}
        self.instant: dict[str, list[torch.Tensor]] | None = {} if traces else None

    def add(self, name: str, spikes: torch.Tensor):  # spikes [T', B, N, F]
        total = spikes.sum(0)
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.steps[name] = self.steps.get(name, 0) + spikes.shape[0]
        if self.instant is not None:
            per_step = (spikes * self.valid[None, :, :, None]).sum((1, 2)) / self.n_valid
            self.instant.setdefault(name, []).append(per_step)  # [T', F]

    def rates(self) -> dict[str, torch.Tensor]:
        return {name: s / self.steps[name] for name, s in self.sums.items()}

    def traces(self) -> dict[str, torch.Tensor] | None:
        if self.instant is None:
            return None
        out = {}
        for name, chunks in self.instant.items():
            inst = torch.cat(chunks)  # [T, F]
            steps = torch.arange(1, inst.shape[0] + 1, dtype=inst.dtype, device=inst.device)
            out[name] = inst.cumsum(0) / steps[:, None]
        return out


def mean_asr(rate: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean of a [B, N, F] rate tensor over real tokens and all features (0 when F = 0).

    Features are summed first, so the token mask multiplies [B, N] sums instead of a full-size
    copy of the rates (this runs for every sublayer of every batch)."""
    if rate.shape[-1] == 0:
        return 0.0
    return float((rate.sum(-1) * valid).sum() / (valid.sum() * rate.shape[-1]))


class SpikingBert(nn.Module):
    def __init__(self, config: ModelConfig, heads_per_layer=None, neurons_per_layer=None):
        super().__init__()
        cfg = self.config = config
        L = cfg.num_layers
        heads_per_layer = heads_per_layer or [cfg.num_heads] * L
        neurons_per_layer = neurons_per_layer or [cfg.intermediate_size] * L
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(
            Block(cfg, h, n) for h, n in zip(heads_per_layer, neurons_per_layer, strict=True)
        )
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        # One threshold per neuron sublayer: index 0 the embedding neurons, 1 + 6 l + j sublayer
        # j of block l. Learnable only when adaptive thresholds are trained.
        self.v_th = nn.Parameter(
            torch.full((cfg.num_sublayers,), float(cfg.neuron.v_th)), requires_grad=False
        )
        self.register_buffer("head_mask", torch.ones(L, cfg.num_heads))
        self.register_buffer("neuron_mask", torch.ones(L, cfg.intermediate_size))
        self.timesteps = uniform_timesteps(L, cfg.t_conv)
        self.t_emb = cfg.t_conv
        self.backend = "torch"
        self._elements_cache: dict = {}

    # -- configuration ------------------------------------------------------------------------
    def set_timesteps(self, timesteps, t_emb: int | None = None):
        self.timesteps = check_timesteps(timesteps, self.config.num_layers)
        if t_emb is not None:
            if int(t_emb) < 1:
                raise ValueError(f"t_emb must be >= 1, got {t_emb}")
            self.t_emb = int(t_emb)
        return self

    @property
    def unrolled_timesteps(self) -> int:
        """T of an `unrolled` run when none is given: the count every sublayer shares (the
        embedding neurons included) where they all share one, which is T_conv unless a uniform
        adaptive stage shortened them all; T_conv for per-sublayer counts."""
        counts = {self.t_emb, *(t for layer in self.timesteps for t in layer)}
        return counts.pop() if len(counts) == 1 else self.config.t_conv

    def to_backend(self, name: str):
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
        if name in ("triton", "cpu"):
            from .engine import require_backend

            require_backend(name)
        self.backend = name
        return self

    def threshold(self, index: int) -> torch.Tensor:
        return self.v_th[index].clamp_min(1e-3)

    def sublayer_names(self) -> list[str]:
        return sublayer_names(self.config.num_layers)

    def gates(self, head_mask=None, neuron_mask=None):
        """Per-block multipliers for the kept heads and neurons (None where all are 1)."""
        head_mask = self.head_mask if head_mask is None else head_mask
        neuron_mask = self.neuron_mask if neuron_mask is None else neuron_mask
        out = []
        for l, block in enumerate(self.layers):
            hg = head_mask[l, block.kept_heads]
            ng = neuron_mask[l, block.kept_neurons]
            out.append(
                (
                    None if (not hg.requires_grad and bool((hg == 1).all())) else hg,
                    None if (not ng.requires_grad and bool((ng == 1).all())) else ng,
                )
            )
        return out

    # -- spiking simulation ---------------------------------------------------------------------
    def forward(
        self,
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
    ) -> SpikingOutput:
        """Simulate the network and classify from the last block's [CLS] O2 rate.

        `timesteps`: in unrolled mode an int T (default `unrolled_timesteps`); in sequential mode a
        per-sublayer list (default the model's `timesteps`).
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if self.backend in ("triton", "cpu"):
            from .engine import run_backend

            return run_backend(
                self,
                input_ids,
                attention_mask,
                token_type_ids,
                mode=mode,
                timesteps=timesteps,
                seed=seed,
                record_traces=record_traces,
                head_mask=head_mask,
                neuron_mask=neuron_mask,
            )
        input_ids, attention_mask, token_type_ids = self._check_inputs(
            input_ids, attention_mask, token_type_ids
        )
        stepwise = self.backend == "torch-step"
        E = self.embeddings(input_ids, token_type_ids)  # [B, N, D]
        mask_add = ops.attention_mask_additive(attention_mask, E.dtype)
        valid = attention_mask.to(E.dtype)
        rec = _Recorder(valid, record_traces)
        gates = self.gates(head_mask, neuron_mask)
        if mode == "unrolled":
            T = self.unrolled_timesteps if timesteps is None else int(timesteps)
            if T < 1:
                raise ValueError(f"timesteps must be >= 1, got {T}")
            self._simulate_unrolled(E, mask_add, gates, rec, T, stepwise)
        else:
            if timesteps is not None:
                self.set_timesteps(timesteps)
            self._simulate_sequential(E, mask_add, gates, rec, seed, stepwise)
        rates = rec.rates()
        last = rates[f"{self.config.num_layers - 1}.O2"]
        logits = self.classifier(last[:, 0])
        asr = {name: mean_asr(r, valid) for name, r in rates.items()}
        return SpikingOutput(logits, rates, asr, rec.traces(), dict(rec.steps))

    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}; truncate the inputs"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return input_ids, attention_mask, token_type_ids

    def _neuron_runner(self, rec: _Recorder, stepwise: bool):
        """run(index, name, current [T', B, N, F]) -> spikes, carrying membranes when stepwise."""
        leak, ge = self.config.neuron.leak, self.config.neuron.fire_on_ge
        membranes: dict[str, torch.Tensor] = {}

        def run(index, name, current):
            v_th = self.threshold(index)
            if stepwise:
                v = membranes.get(name)
                v = torch.zeros_like(current[0]) if v is None else v
                s, membranes[name] = if_step(current[0], v, v_th, leak, ge)
                spikes = s[None]
            else:
                spikes = if_multistep(current, v_th, leak, fire_on_ge=ge)
            rec.add(name, spikes)
            return spikes

        return run

    def _simulate_unrolled(self, E, mask_add, gates, rec, T, stepwise):
        run = self._neuron_runner(rec, stepwise)

        def network_pass(e_current):  # e_current [T', B, N, D]
            x = run(0, "emb", e_current)
            for l, (block, (hg, ng)) in enumerate(zip(self.layers, gates, strict=True)):
                i = 1 + len(SUBLAYERS) * l
                s_k = run(i, f"{l}.K", block.current_k(x))
                s_v = run(i + 1, f"{l}.V", block.current_v(x))
                s_a = run(i + 2, f"{l}.A", block.current_a(x, s_k, s_v, mask_add, hg))
                s_o1 = run(i + 3, f"{l}.O1", block.current_o1(s_a, x))
                s_f = run(i + 4, f"{l}.F", block.current_f(s_o1, ng))
                x = run(i + 5, f"{l}.O2", block.current_o2(s_f, s_o1))

        if stepwise:
            for _ in range(T):
                network_pass(E[None])
        else:
            network_pass(E.expand(T, *E.shape))

    def _elements(self, shape, cols: torch.Tensor | None, full_width: int, device):
        """Flat element indices [B, N, F] into the uncompacted rate tensor, for the RNG."""
        B, N, width = shape
        key = (B, N, width, full_width, None if cols is None else tuple(cols.tolist()), device)
        if key not in self._elements_cache:
            if len(self._elements_cache) > 64:  # shapes change with every length bucket
                self._elements_cache.clear()
            cols = torch.arange(width, device=device) if cols is None else cols
            rows = torch.arange(B * N, device=device).view(B, N, 1)
            self._elements_cache[key] = rows * full_width + cols.view(1, 1, -1)
        return self._elements_cache[key]

    def _simulate_sequential(self, E, mask_add, gates, rec, seed, stepwise):
        """Each sublayer runs its own t_l steps on spikes drawn from the rates that feed it."""
        run = self._neuron_runner(rec, stepwise)
        B, N, D = E.shape
        if stepwise:
            a_emb = sum(run(0, "emb", E[None])[0] for _ in range(self.t_emb)) / self.t_emb
        else:
            a_emb = run(0, "emb", E.expand(self.t_emb, B, N, D)).mean(0)
        rates = {"x": a_emb}
        for l, (block, (hg, ng)) in enumerate(zip(self.layers, gates, strict=True)):
            cfg = self.config
            x_el = self._elements((B, N, D), None, D, E.device)
            attn_el = self._elements(
                (B, N, block.num_heads * cfg.head_dim),
                block.attention_columns(),
                cfg.hidden_size,
                E.device,
            )
            ffn_el = self._elements(
                (B, N, block.num_neurons), block.kept_neurons, cfg.intermediate_size, E.device
            )
            elements = {
                "x": x_el,
                "K": attn_el,
                "V": attn_el,
                "A": attn_el,
                "O1": x_el,
                "F": ffn_el,
            }
            # sublayer -> (current function, the rates it draws its input spikes from)
            wiring = {
                "K": (block.current_k, ("x",)),
                "V": (block.current_v, ("x",)),
                "A": (partial(block.current_a, mask_add=mask_add, head_gate=hg), ("x", "K", "V")),
                "O1": (block.current_o1, ("A", "x")),
                "F": (partial(block.current_f, neuron_gate=ng), ("O1",)),
                "O2": (block.current_o2, ("F", "O1")),
            }
            for j, (sub, t) in enumerate(zip(SUBLAYERS, self.timesteps[l], strict=True)):
                current_fn, sources = wiring[sub]
                draws = [
                    (rates[src], rng.stream_id(l, j, _IN[src]), elements[src]) for src in sources
                ]

                def current_at(steps, current_fn=current_fn, draws=draws):
                    spikes = [
                        rng.bernoulli_spikes(r, seed, stream, steps, el) for r, stream, el in draws
                    ]
                    return current_fn(*spikes)

                index, name = 1 + len(SUBLAYERS) * l + j, f"{l}.{sub}"
                if stepwise:
                    total = sum(run(index, name, current_at([s]))[0] for s in range(t))
                    rates[sub] = total / t
                else:
                    rates[sub] = run(index, name, current_at(range(t))).mean(0)
            rates = {"x": rates["O2"]}

    # -- rate surrogate (DESIGN section 6) -------------------------------------------------------
    def surrogate(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        *,
        snn_rates=None,
        head_mask=None,
        neuron_mask=None,
        output_attention_scores=False,
        output_hidden_states=False,
        moments=False,
        noise=1.0,
        clamp_leak=0.0,
    ) -> SurrogateOutput:
        """The same graph with every spike tensor replaced by a = clamp(I / Vth, 0, 1).

        With `snn_rates` (the `rates` of a no-grad spiking run) each sublayer's output is swapped
        straight-through: its value is the SNN's ASR, its gradient the surrogate's.

        `moments=True` is the noise-aware surrogate: softmax, LayerNorm and GELU act on each
        step's currents, which carry the spikes' per-step variance a (1 - a) through the
        projections, so their time averages differ from the same functions of the rates. It
        adds that variance to LayerNorm's deviation, half the scores' variance to the scores
        (the mean of exp under Gaussian noise) and takes GELU's expectation under it
        (`Block.moment_*`; docs/recipes.md measures how closely it tracks the spiking model).
        `noise` scales that variance: 1 is the spiking model's, 0 gives the rate surrogate's
        function, values between interpolate (a curriculum from one to the other).

        `clamp_leak` > 0 gives the clamp that gradient outside [0, 1] instead of none (values
        unchanged): a neuron whose current sits outside the firing range for a token then still
        tells the weights before it which way would bring it back.
        """
        if not noise >= 0.0 or (noise != 1.0 and not moments):
            raise ValueError(
                f"noise scales the moments surrogate's variance: a number >= 0 with "
                f"moments=True, got noise={noise} with moments={moments}"
            )
        if not 0.0 <= clamp_leak <= 1.0:
            raise ValueError(f"clamp_leak (a gradient slope) must be in [0, 1], got {clamp_leak}")
        input_ids, attention_mask, token_type_ids = self._check_inputs(
            input_ids, attention_mask, token_type_ids
        )
        E = self.embeddings(input_ids, token_type_ids)
        mask_add = ops.attention_mask_additive(attention_mask, E.dtype)
        rates: dict[str, torch.Tensor] = {}

        def rate(index, name, current):  # current [1, B, N, F] -> rate [1, B, N, F]
            u = current / self.threshold(index)
            a = torch.clamp(u, 0.0, 1.0)
            if clamp_leak:
                outside = u - a  # zero inside the range; its gradient is 1 only outside
                a = a + clamp_leak * (outside - outside.detach())
            if snn_rates is not None:
                a = a + (snn_rates[name][None].to(a.dtype) - a).detach()
            rates[name] = a[0]
            return a

        x = rate(0, "emb", E[None])
        hidden = [x[0]] if output_hidden_states else None
        ln_inputs = [] if moments else None
        scores_out = [] if output_attention_scores else None
        for l, (block, (hg, ng)) in enumerate(
            zip(self.layers, self.gates(head_mask, neuron_mask), strict=True)
        ):
            i = 1 + len(SUBLAYERS) * l
            a_k = rate(i, f"{l}.K", block.current_k(x))
            a_v = rate(i + 1, f"{l}.V", block.current_v(x))
            if moments:
                current, scores = block.moment_a(x, a_k, a_v, mask_add, hg, noise)
                a_a = rate(i + 2, f"{l}.A", current)
                a_o1 = rate(i + 3, f"{l}.O1", block.moment_o1(a_a, x, noise, ln_inputs))
                a_f = rate(i + 4, f"{l}.F", block.moment_f(a_o1, ng, noise))
                x = rate(i + 5, f"{l}.O2", block.moment_o2(a_f, a_o1, noise, ln_inputs))
            else:
                current, scores = block.current_a(x, a_k, a_v, mask_add, hg, return_scores=True)
                a_a = rate(i + 2, f"{l}.A", current)
                a_o1 = rate(i + 3, f"{l}.O1", block.current_o1(a_a, x))
                a_f = rate(i + 4, f"{l}.F", block.current_f(a_o1, ng))
                x = rate(i + 5, f"{l}.O2", block.current_o2(a_f, a_o1))
            if scores_out is not None:
                scores_out.append(scores[0])
            if hidden is not None:
                hidden.append(x[0])
        logits = self.classifier(x[0, :, 0])
        return SurrogateOutput(logits, rates, scores_out, hidden, ln_inputs)

    # -- pruning support (DESIGN section 3) ------------------------------------------------------
    def freeze_binary(self):
        """Replace every 1-bit latent weight by its exact signs and scales (inference form)."""
        for block in self.layers:
            for proj in block.projections():
                proj.freeze()
        return self


def compact(model: SpikingBert) -> SpikingBert:
    """A copy of `model` with masked heads and FFN neurons physically removed (DESIGN section 3).

    Masks must be binary. 1-bit projections are frozen first, so every kept row keeps the scale
    of its full matrix and the compacted model computes exactly what the masked one does.
    """
    import copy

    for name in ("head_mask", "neuron_mask"):
        m = getattr(model, name)
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"compact() needs a binary {name}; threshold relaxed masks first")
    out = copy.deepcopy(model).freeze_binary()
    d = model.config.head_dim
    for l, block in enumerate(out.layers):
        head_keep = (out.head_mask[l, block.kept_heads] != 0).nonzero().flatten()
        neuron_keep = (out.neuron_mask[l, block.kept_neurons] != 0).nonzero().flatten()
        # Columns of the kept heads within this block's current (compacted) attention width.
        cols = (head_keep[:, None] * d + torch.arange(d, device=head_keep.device)).reshape(-1)
        for proj in (block.q_proj, block.k_proj, block.v_proj):
            proj.select(rows=cols)
        block.o_proj.select(cols=cols)
        block.ffn1.select(rows=neuron_keep)
        block.ffn2.select(cols=neuron_keep)
        block.kept_heads = block.kept_heads[head_keep].clone()
        block.kept_neurons = block.kept_neurons[neuron_keep].clone()
    out._elements_cache = {}
    return out


def count_parameters_by_kind(model: SpikingBert) -> dict[str, int]:
    """Binary weights vs full-precision parameters (for reporting model size)."""
    binary = sum(
        p.signs.numel() if p.frozen else p.weight.numel()
        for b in model.layers
        for p in (b.q_proj, b.k_proj, b.v_proj, b.o_proj, b.ffn1, b.ffn2)
        if p.binary
    )
    total = sum(p.numel() for p in model.parameters() if p is not None)
    return {"binary_weights": binary, "total_parameters": total}
