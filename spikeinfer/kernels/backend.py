"""The `triton` backend: whole-model spiking simulation on the fused kernels (DESIGN section 10).

Same semantics as the reference `spikeinfer.model.SpikingBert.forward` (`_simulate_unrolled`,
`_simulate_sequential`): embedding neurons on the constant current E, then per block the six
sublayers K, V, A, O1, F, O2 with thresholds `model.threshold(i)`, head and neuron gates, compacted
weights, and per-sublayer timesteps in sequential mode. Spikes live in token-row layout
[T, B*N, features] (int8) between kernels; only rates (int32 counts / steps) leave the backend.

Kernels per block (unrolled; sequential draws each input in-kernel from its rate instead):

    K, V   spike_linear(x, plain)             Q  spike_linear(x, none) -> float32 current
    A      spiking_attention(Q, S_K, S_V)     O1 spike_linear(S_A, ln, residual x)
    F      spike_linear(S_O1, gelu, gate)     O2 spike_linear(S_F, ln, residual S_O1)

A layer whose heads (or FFN neurons) are all pruned has zero-width K, V, A (or F) sublayers: their
kernels launch nothing and the O1 (O2) projection reduces to bias + residual, as in the reference.
"""

from __future__ import annotations

import weakref

import torch

from spikeinfer import ops, rng
from spikeinfer.config import SUBLAYERS
from spikeinfer.model import MODES, BackendUnavailableError, SpikingOutput, mean_asr

from ._common import interpreting, is_available

_IN = {name: i for i, name in enumerate(rng.INPUTS)}
_SUB = {name: i for i, name in enumerate(SUBLAYERS)}

# model -> {id(projection): (weakref to the signs it was built from, signs._version, int8 signs)}
_WEIGHT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _int8_signs(model, proj) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 signs [out, in], float32 alpha [out]) of a 1-bit projection, converted once.

    The cache entry is keyed on the signs tensor object itself (a weak reference) and its
    version counter, so retraining, `freeze()` or `select()` invalidates it.
    """
    signs, alpha = proj.binary_weights()
    per_model = _WEIGHT_CACHE.setdefault(model, {})
    entry = per_model.get(id(proj))
    # Inference tensors (made under torch.inference_mode) carry no version counter.
    version = -1 if signs.is_inference() else signs._version
    if entry is None or entry[0]() is not signs or entry[1] != version:
        entry = (weakref.ref(signs), version, signs.detach().to(torch.int8).contiguous())
        per_model[id(proj)] = entry
    return entry[2], alpha.detach().float().contiguous()


def _vec(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


class _Record:
    """Per-sublayer spike counts and (on request) traces, in the reference `_Recorder` format."""

    def __init__(self, valid: torch.Tensor, traces: bool):
        self.valid = valid  # [B, N] float
        self.n_valid = valid.sum()
        self.counts: dict[str, torch.Tensor] = {}
        self.steps: dict[str, int] = {}
        self.traces = {} if traces else None

    def add(self, name: str, counts: torch.Tensor, steps: int, spikes: torch.Tensor | None):
        self.counts[name], self.steps[name] = counts, steps
        if self.traces is None:
            return
        B, N = self.valid.shape
        per_step = []
        # Chunks over time bound the float32 copy of the spike train.
        for chunk in spikes.split(max(1, (1 << 24) // max(1, spikes[0].numel())), dim=0):
            s = chunk.float().view(chunk.shape[0], B, N, -1)
            per_step.append((s * self.valid[None, :, :, None]).sum((1, 2)) / self.n_valid)
        inst = torch.cat(per_step)  # [T, F]
        steps_so_far = torch.arange(1, inst.shape[0] + 1, dtype=inst.dtype, device=inst.device)
        self.traces[name] = inst.cumsum(0) / steps_so_far[:, None]

    def rate(self, name: str) -> torch.Tensor:
        """[B*N, F] float32 rate, computed as the reference computes it (sum / steps)."""
        return self.counts[name].float() / self.steps[name]


def _check_usable(model, device: torch.device):
    ok, reason = is_available()
    if not ok:
        raise BackendUnavailableError(f"the triton backend cannot run here: {reason}")
    if device.type != "cuda" and not interpreting():
        raise BackendUnavailableError(
            f"the triton backend needs the model on a CUDA device (it is on {device}); "
            f"call model.to('cuda') or set TRITON_INTERPRET=1 to run the kernels on CPU"
        )
    if not model.config.binary:
        raise BackendUnavailableError(
            "the triton backend runs 1-bit models only (config.binary=True); use the 'torch' "
            "backend for full-precision students"
        )


def simulate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    *,
    mode: str = "unrolled",
    timesteps=None,
    seed: int = 0,
    record_traces: bool = False,
    head_mask=None,
    neuron_mask=None,
) -> SpikingOutput:
    """Simulate `model` (a `spikeinfer.model.SpikingBert`) with the Triton kernels.

    Arguments and result as `SpikingBert.forward`: `timesteps` is an int T in unrolled mode
    (default `model.unrolled_timesteps`) and a per-sublayer list in sequential mode (default the
    model's; like the reference, a given list is stored on the model).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    device = model.v_th.device
    _check_usable(model, device)
    input_ids, attention_mask, token_type_ids = model._check_inputs(
        input_ids, attention_mask, token_type_ids
    )
    with torch.no_grad():
        E = model.embeddings(input_ids, token_type_ids).float()
        B, N, D = E.shape
        valid = attention_mask.to(torch.float32)
        mask_add = ops.attention_mask_additive(attention_mask, torch.float32).reshape(B, N)
        rec = _Record(valid, record_traces)
        gates = [(_vec(hg), _vec(ng)) for hg, ng in model.gates(head_mask, neuron_mask)]
        if mode == "unrolled":
            T = model.unrolled_timesteps if timesteps is None else int(timesteps)
            if T < 1:
                raise ValueError(f"timesteps must be >= 1, got {T}")
            _unrolled(model, E.reshape(B * N, D).contiguous(), mask_add, gates, rec, T, B)
        else:
            if timesteps is not None:
                model.set_timesteps(timesteps)
            _sequential(
                model,
                E.reshape(B * N, D).contiguous(),
                mask_add,
                gates,
                rec,
                seed,
                B,
                record_traces,
            )
        rates = {name: rec.rate(name).view(B, N, -1) for name in rec.counts}
        asr = {name: mean_asr(r, valid) for name, r in rates.items()}
    logits = model.classifier(rates[f"{model.config.num_layers - 1}.O2"][:, 0])
    return SpikingOutput(logits, rates, asr, rec.traces, dict(rec.steps))


def _layer_params(model, block):
    """Kernel arguments of one block: int8 signs, scales, biases, LayerNorm parameters."""

    def proj(p):
        signs, alpha = _int8_signs(model, p)
        return {"signs": signs, "alpha": alpha, "bias": _vec(p.bias)}

    def ln(norm):
        return {"ln_weight": _vec(norm.weight), "ln_bias": _vec(norm.bias), "ln_eps": norm.eps}

    return (
        proj(block.q_proj),
        proj(block.k_proj),
        proj(block.v_proj),
        proj(block.o_proj),
        proj(block.ffn1),
        proj(block.ffn2),
        ln(block.ln_o1),
        ln(block.ln_o2),
    )


def _neuron_params(model):
    """index -> kernel neuron arguments; thresholds `model.threshold(i)` fetched in one transfer
    rather than one device sync per sublayer."""
    neuron = model.config.neuron
    thresholds = torch.stack(
        [model.threshold(i).detach().float() for i in range(model.config.num_sublayers)]
    ).tolist()

    def kwargs(index: int) -> dict:
        return {"v_th": thresholds[index], "leak": neuron.leak, "fire_on_ge": neuron.fire_on_ge}

    return kwargs


def _unrolled(model, E, mask_add, gates, rec, T, B):
    from .attention import spiking_attention
    from .neuron_scan import if_scan
    from .spike_linear import spike_linear

    neuron = _neuron_params(model)
    x, counts = if_scan(E, timesteps=T, **neuron(0))
    rec.add("emb", counts, T, x)
    for l, (block, (head_gate, neuron_gate)) in enumerate(zip(model.layers, gates, strict=True)):
        i = 1 + len(SUBLAYERS) * l
        q_p, k_p, v_p, o_p, f1_p, f2_p, ln1, ln2 = _layer_params(model, block)
        s_k, counts = spike_linear(x, **k_p, epilogue="plain", **neuron(i))
        rec.add(f"{l}.K", counts, T, s_k)
        s_v, counts = spike_linear(x, **v_p, epilogue="plain", **neuron(i + 1))
        rec.add(f"{l}.V", counts, T, s_v)
        q, _ = spike_linear(x, **q_p, epilogue="none")
        s_a, counts = spiking_attention(
            q, s_k, s_v, mask_add, batch=B, head_dim=block.head_dim, gate=head_gate, **neuron(i + 2)
        )
        rec.add(f"{l}.A", counts, T, s_a)
        del q, s_k, s_v
        s_o1, counts = spike_linear(s_a, **o_p, epilogue="ln", residual=x, **ln1, **neuron(i + 3))
        rec.add(f"{l}.O1", counts, T, s_o1)
        del s_a
        s_f, counts = spike_linear(s_o1, **f1_p, epilogue="gelu", gate=neuron_gate, **neuron(i + 4))
        rec.add(f"{l}.F", counts, T, s_f)
        x, counts = spike_linear(s_f, **f2_p, epilogue="ln", residual=s_o1, **ln2, **neuron(i + 5))
        rec.add(f"{l}.O2", counts, T, x)


def _sequential(model, E, mask_add, gates, rec, seed, B, traces):
    from .attention import spiking_attention
    from .neuron_scan import if_scan
    from .spike_linear import DrawnSpikes, spike_linear

    cfg = model.config
    neuron = _neuron_params(model)
    full_attention = cfg.num_heads * cfg.head_dim
    spikes, counts = if_scan(E, timesteps=model.t_emb, write_spikes=traces, **neuron(0))
    rec.add("emb", counts, model.t_emb, spikes)
    a_x = rec.rate("emb")
    for l, (block, (head_gate, neuron_gate)) in enumerate(zip(model.layers, gates, strict=True)):
        i = 1 + len(SUBLAYERS) * l
        t_k, t_v, t_a, t_o1, t_f, t_o2 = model.timesteps[l]
        q_p, k_p, v_p, o_p, f1_p, f2_p, ln1, ln2 = _layer_params(model, block)
        attn_cols = block.attention_columns()
        ffn_cols = block.kept_neurons

        def draw(rates, sub, inp, cols=None, full_width=None, l=l):
            return DrawnSpikes(rates, seed, rng.stream_id(l, _SUB[sub], _IN[inp]), cols, full_width)

        def linear(name, index, steps, x, params, **kwargs):
            spikes, counts = spike_linear(
                x, **params, timesteps=steps, write_spikes=traces, **kwargs, **neuron(index)
            )
            rec.add(name, counts, steps, spikes)
            return rec.rate(name)

        a_k = linear(f"{l}.K", i, t_k, draw(a_x, "K", "x"), k_p, epilogue="plain")
        a_v = linear(f"{l}.V", i + 1, t_v, draw(a_x, "V", "x"), v_p, epilogue="plain")
        q, _ = spike_linear(draw(a_x, "A", "x"), **q_p, timesteps=t_a, epilogue="none")
        spikes, counts = spiking_attention(
            q,
            a_k,
            a_v,
            mask_add,
            batch=B,
            head_dim=block.head_dim,
            gate=head_gate,
            seed=seed,
            k_stream=rng.stream_id(l, _SUB["A"], _IN["K"]),
            v_stream=rng.stream_id(l, _SUB["A"], _IN["V"]),
            cols=attn_cols,
            full_width=full_attention,
            write_spikes=traces,
            **neuron(i + 2),
        )
        rec.add(f"{l}.A", counts, t_a, spikes)
        del q
        a_a = rec.rate(f"{l}.A")
        a_o1 = linear(
            f"{l}.O1",
            i + 3,
            t_o1,
            draw(a_a, "O1", "A", attn_cols, full_attention),
            o_p,
            epilogue="ln",
            residual=draw(a_x, "O1", "x"),
            **ln1,
        )
        a_f = linear(
            f"{l}.F", i + 4, t_f, draw(a_o1, "F", "O1"), f1_p, epilogue="gelu", gate=neuron_gate
        )
        a_x = linear(
            f"{l}.O2",
            i + 5,
            t_o2,
            draw(a_f, "O2", "F", ffn_cols, cfg.intermediate_size),
            f2_p,
            epilogue="ln",
            residual=draw(a_o1, "O2", "O1"),
            **ln2,
        )
