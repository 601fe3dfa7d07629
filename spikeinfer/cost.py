"""Cost metrics (DESIGN section 4; the paper's Appendix B and Eq. 14).

For encoder layer l with N tokens, hidden size D, head dim d and per-sublayer timesteps:

    ACs_heads(l)   = sum over kept heads   [ N D d (t_Q + t_K + t_V) + 2 N^2 d t_A + N D d t_O1 ]
    ACs_neurons(l) = sum over kept neurons [ N D (t_F + t_O2) ]
    M(h, n, t)     = sum_l ACs_heads(l) + ACs_neurons(l)          (t_Q = t_A)

Normalized #C weights every accumulate by the rate of the spikes that drive it (Q/K/V by a_x,
Q.K^T by a_K, attention.V by a_V, W_O by a_A, W_1 by a_O1, W_2 by a_F) and divides by the dense
model's ACs at T_conv with every rate 1. Latency is the mean timestep count over sublayers.
Energy uses 0.9 pJ per AC and 4.6 pJ per MAC (45 nm CMOS, Horowitz 2014), as the paper does.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import (
    ModelConfig,
    check_timesteps,
    sublayer_names,
    uniform_timesteps,
)

PJ_PER_AC = 0.9
PJ_PER_MAC = 4.6
# Order of the driving rates per layer in `normalized_c`'s array form.
RATE_ORDER = ("x", "K", "V", "A", "O1", "F")


def _timestep_table(config: ModelConfig, timesteps) -> list[list[int]]:
    if timesteps is None:
        return uniform_timesteps(config.num_layers, config.t_conv)
    if isinstance(timesteps, int):
        return uniform_timesteps(config.num_layers, timesteps)
    return check_timesteps(timesteps, config.num_layers)


def _mask(mask, shape, name) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape)
    mask = torch.as_tensor(mask, dtype=torch.float32)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}")
    return mask


def layer_unit_costs(config: ModelConfig, timesteps, seq_len: int) -> list[tuple[int, int]]:
    """Per layer, (ACs of one kept head, ACs of one kept FFN neuron)."""
    N, D, d = int(seq_len), config.hidden_size, config.head_dim
    out = []
    for tK, tV, tA, tO1, tF, tO2 in _timestep_table(config, timesteps):
        tQ = tA
        head = N * D * d * (tQ + tK + tV) + 2 * N * N * d * tA + N * D * d * tO1
        neuron = N * D * (tF + tO2)
        out.append((head, neuron))
    return out


def ac_cost(config: ModelConfig, head_mask, neuron_mask, timesteps, seq_len) -> torch.Tensor:
    """M(h, n, t) as a differentiable float tensor of the (possibly relaxed) masks."""
    L = config.num_layers
    h = _mask(head_mask, (L, config.num_heads), "head_mask")
    n = _mask(neuron_mask, (L, config.intermediate_size), "neuron_mask")
    costs = torch.tensor(
        layer_unit_costs(config, timesteps, seq_len), dtype=torch.float64, device=h.device
    )
    return (h.sum(1).double() * costs[:, 0] + n.sum(1).double() * costs[:, 1]).sum()


def ac_count(config: ModelConfig, head_mask, neuron_mask, timesteps, seq_len: int) -> int:
    """M(h, n, t): accumulate operations of the encoder for one example of `seq_len` tokens.

    `head_mask` [L, H] and `neuron_mask` [L, d_ff] are binary (None = all kept); `timesteps` is an
    int (every sublayer) or L lists of six (K V A O1 F O2), None = config.t_conv.
    """
    L = config.num_layers
    h = _mask(head_mask, (L, config.num_heads), "head_mask")
    n = _mask(neuron_mask, (L, config.intermediate_size), "neuron_mask")
    if not bool(((h == 0) | (h == 1)).all() and ((n == 0) | (n == 1)).all()):
        raise ValueError("ac_count needs binary masks; use ac_cost for relaxed masks")
    total = 0
    for l, (head, neuron) in enumerate(layer_unit_costs(config, timesteps, seq_len)):
        total += int(h[l].sum()) * head + int(n[l].sum()) * neuron
    return total


def dense_ac_count(config: ModelConfig, seq_len: int) -> int:
    """ACs of the unpruned model with every sublayer at T_conv."""
    return ac_count(config, None, None, config.t_conv, seq_len)


def acs_percent(config: ModelConfig, head_mask, neuron_mask, timesteps, seq_len: int) -> float:
    """ACs % of a pruned model relative to the dense model at T_conv."""
    return (
        100.0
        * ac_count(config, head_mask, neuron_mask, timesteps, seq_len)
        / dense_ac_count(config, seq_len)
    )


def rates_table(config: ModelConfig, rates) -> list[list[float]]:
    """Driving rates per layer in RATE_ORDER from either an [L, 6] array or a sublayer-ASR mapping
    such as `SpikingOutput.asr` ({"emb": ..., "0.K": ..., ..., "3.O2": ...})."""
    L = config.num_layers
    if isinstance(rates, Mapping):
        missing = [k for k in sublayer_names(L) if k not in rates]
        if missing:
            raise ValueError(f"rates mapping lacks sublayers {missing[:6]}...")
        table = []
        for l in range(L):
            x = rates["emb"] if l == 0 else rates[f"{l - 1}.O2"]
            table.append([float(x)] + [float(rates[f"{l}.{s}"]) for s in RATE_ORDER[1:]])
        return table
    table = torch.as_tensor(rates, dtype=torch.float64)
    if tuple(table.shape) != (L, len(RATE_ORDER)):
        raise ValueError(
            f"rates must be [{L}, {len(RATE_ORDER)}] in order {RATE_ORDER}, "
            f"got {tuple(table.shape)}"
        )
    return table.tolist()


def rate_weighted_acs(
    config: ModelConfig, head_mask, neuron_mask, rates, seq_len: int, timesteps=None
) -> float:
    """Accumulates actually driven by spikes: every AC weighted by the rate of its input."""
    L, N, D, d = config.num_layers, int(seq_len), config.hidden_size, config.head_dim
    h = _mask(head_mask, (L, config.num_heads), "head_mask").sum(1).tolist()
    n = _mask(neuron_mask, (L, config.intermediate_size), "neuron_mask").sum(1).tolist()
    total = 0.0
    for l, ((tK, tV, tA, tO1, tF, tO2), (a_x, a_k, a_v, a_a, a_o1, a_f)) in enumerate(
        zip(_timestep_table(config, timesteps), rates_table(config, rates), strict=True)
    ):
        tQ = tA
        head = (
            N * D * d * (tQ + tK + tV) * a_x + N * N * d * tA * (a_k + a_v) + N * D * d * tO1 * a_a
        )
        neuron = N * D * (tF * a_o1 + tO2 * a_f)
        total += h[l] * head + n[l] * neuron
    return total


def normalized_c(
    config: ModelConfig, head_mask, neuron_mask, rates, seq_len: int, timesteps=None
) -> float:
    """Normalized #C (Eq. 14): rate-weighted ACs over dense ACs at T_conv with all rates 1.

    `rates`: [L, 6] driving rates in RATE_ORDER (x K V A O1 F) or a sublayer-ASR mapping;
    `timesteps`: the pruned model's timesteps (None = T_conv everywhere).
    """
    return rate_weighted_acs(config, head_mask, neuron_mask, rates, seq_len, timesteps) / (
        dense_ac_count(config, seq_len)
    )


def latency(timesteps, t_emb: int | None = None) -> float:
    """Mean timesteps over neuron sublayers (the embedding neurons included when t_emb is given);
    an int means every sublayer runs that many steps."""
    if isinstance(timesteps, int):
        return float(timesteps)
    values = [int(t) for row in timesteps for t in row]
    if t_emb is not None:
        values.append(int(t_emb))
    return sum(values) / len(values)


def energy_mj(
    config: ModelConfig, head_mask, neuron_mask, rates, seq_len: int, timesteps=None
) -> float:
    """Estimated energy per example in millijoules: spike-driven ACs at 0.9 pJ plus the
    classifier's MACs at 4.6 pJ (45 nm figures; embedding, LayerNorm and softmax arithmetic are
    not counted, as in the paper)."""
    return energy_mj_of_acs(
        config, rate_weighted_acs(config, head_mask, neuron_mask, rates, seq_len, timesteps)
    )


def energy_mj_of_acs(config: ModelConfig, rate_weighted: float) -> float:
    """`energy_mj` from an example's `rate_weighted_acs`."""
    macs = config.hidden_size * config.num_labels
    return (rate_weighted * PJ_PER_AC + macs * PJ_PER_MAC) * 1e-9
