"""Spatial pruning (DESIGN section 7): Fisher information of the masks, importance, budgeted
search and per-layer refinement.

Head and neuron masks m are multipliers, all 1 in the trained model. Removing a set P of units
changes the loss, to second order around m = 1, by

    dL(P) ~ 1/2 (1 - m)^T F (1 - m),    F ~ (1/B) sum_b g_b g_b^T,    g_b = dL_b / dm

with g_b the mask gradient of batch b (empirical Fisher; the first-order term vanishes at a
trained optimum). Its diagonal F_ii = (1/B) sum_b g_{b,i}^2 scores unit i alone; Eq. 7-8 weight it
by the unit's average spiking rate (ASR), because a unit that rarely fires also costs few ACs:

    I(head i) = F_ii * ASR of head i's attention output,    I(neuron j) = F_jj * ASR of neuron j

The search keeps the units of largest total importance whose cost fits the budget,

    max  sum_{kept} I    s.t.    sum_l c_h(l) #heads(l) + c_n(l) #neurons(l) <= c * M(dense)

where c_h(l), c_n(l) are the ACs of one head / one FFN neuron of layer l (cost.layer_unit_costs).
Heads are traded against neurons globally: for each k, the k best heads and then the best neurons
that still fit; the best k wins. Refinement then keeps each layer's counts (so the cost) fixed and
swaps pruned against kept units to minimise the block-diagonal Fisher loss of the pruned set,

    || sum_{i in pruned} g_i ||^2,    g_i = (g_{1,i}, ..., g_{B,i})  (unit i's per-batch gradients)

which is the full (1 - m)^T F (1 - m) restricted to one layer's heads or one layer's neurons.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import cost
from ..model import SpikingBert

IMPORTANCE_MODES = ("fim", "fim+asr-neurons", "fim+asr-attention", "fim+asr")


# -- Fisher information -------------------------------------------------------------------------


@dataclass
class FisherInfo:
    """Per-batch mask gradients and per-unit ASRs gathered on a sample of training examples.

    Units are indexed in the uncompacted layout ([L, H] heads, [L, d_ff] neurons); units a
    compacted model no longer has get zero gradient and zero ASR.
    """

    head_grads: torch.Tensor  # [batches, L, H]
    neuron_grads: torch.Tensor  # [batches, L, d_ff]
    head_asr: torch.Tensor  # [L, H]
    neuron_asr: torch.Tensor  # [L, d_ff]
    seq_len: float  # mean real tokens per example
    n_examples: int

    @property
    def head_fisher(self) -> torch.Tensor:
        return self.head_grads.pow(2).mean(0)

    @property
    def neuron_fisher(self) -> torch.Tensor:
        return self.neuron_grads.pow(2).mean(0)

    def save(self, path) -> None:
        torch.save(self.__dict__, Path(path))

    @classmethod
    def load(cls, path) -> FisherInfo:
        return cls(**torch.load(Path(path), map_location="cpu", weights_only=True))


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Cross-entropy with the gold labels (MSE to the gold score for regression)."""
    if regression:
        return F.mse_loss(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels)


def _unit_rate_sums(model: SpikingBert, rates: dict, valid: torch.Tensor):
    """Rates summed over real tokens, per head (summed over its d features) and per neuron,
    scattered into the uncompacted [L, H] and [L, d_ff] layouts."""
    cfg = model.config
    heads = torch.zeros(cfg.num_layers, cfg.num_heads, dtype=torch.float64)
    neurons = torch.zeros(cfg.num_layers, cfg.intermediate_size, dtype=torch.float64)
    w = valid[..., None].to(torch.float64)
    for l, block in enumerate(model.layers):
        a = (rates[f"{l}.A"].double() * w).sum((0, 1)).cpu()  # [h_kept * d]
        heads[l, block.kept_heads.cpu()] = a.view(block.num_heads, cfg.head_dim).sum(1)
        f = (rates[f"{l}.F"].double() * w).sum((0, 1)).cpu()  # [n_kept]
        neurons[l, block.kept_neurons.cpu()] = f
    return heads, neurons


def compute_fisher(
    model: SpikingBert,
    batches: Iterable[dict],
    *,
    timesteps: int,
    regression: bool = False,
) -> FisherInfo:
    """Mask gradients of the task loss, batch by batch, through the surrogate with the SNN's ASRs
    swapped in (so the loss sees the spiking network's values), plus every unit's ASR.

    `batches`: dicts with input_ids, attention_mask, token_type_ids, labels on the model's device.
    The spiking simulation runs unrolled for `timesteps` steps without gradients.
    """
    cfg = model.config
    head_grads, neuron_grads = [], []
    head_sum = torch.zeros(cfg.num_layers, cfg.num_heads, dtype=torch.float64)
    neuron_sum = torch.zeros(cfg.num_layers, cfg.intermediate_size, dtype=torch.float64)
    tokens, examples = 0.0, 0
    was_training = model.training
    model.eval()
    for b in batches:
        ids, am, tt = b["input_ids"], b["attention_mask"], b["token_type_ids"]
        with torch.no_grad():
            snn = model(ids, am, tt, timesteps=timesteps)
        hm = model.head_mask.detach().clone().requires_grad_(True)
        nm = model.neuron_mask.detach().clone().requires_grad_(True)
        out = model.surrogate(ids, am, tt, snn_rates=snn.rates, head_mask=hm, neuron_mask=nm)
        loss = task_loss(out.logits, b["labels"], regression)
        gh, gn = torch.autograd.grad(loss, (hm, nm), allow_unused=True)
        head_grads.append(torch.zeros_like(hm) if gh is None else gh.detach())
        neuron_grads.append(torch.zeros_like(nm) if gn is None else gn.detach())
        valid = am.to(torch.float32)
        h, n = _unit_rate_sums(model, snn.rates, valid)
        head_sum += h
        neuron_sum += n
        tokens += float(valid.sum())
        examples += ids.shape[0]
    model.train(was_training)
    if not head_grads:
        raise ValueError("compute_fisher got no batches; pass at least one training batch")
    return FisherInfo(
        head_grads=torch.stack(head_grads).float().cpu(),
        neuron_grads=torch.stack(neuron_grads).float().cpu(),
        head_asr=(head_sum / (tokens * cfg.head_dim)).float(),
        neuron_asr=(neuron_sum / tokens).float(),
        seq_len=tokens / examples,
        n_examples=examples,
    )


# -- importance ---------------------------------------------------------------------------------


def importance(fisher: FisherInfo, mode: str = "fim+asr") -> tuple[torch.Tensor, torch.Tensor]:
    """(head importance [L, H], neuron importance [L, d_ff]) for an ablation `mode`:
    fim (F_ii alone), fim+asr-neurons (ASR weights neurons only), fim+asr-attention (heads only),
    fim+asr (both, Eq. 7-8)."""
    if mode not in IMPORTANCE_MODES:
        choices = ", ".join(IMPORTANCE_MODES)
        raise ValueError(f"unknown importance {mode!r}; choose one of {choices}")
    heads, neurons = fisher.head_fisher.double(), fisher.neuron_fisher.double()
    if mode in ("fim+asr", "fim+asr-attention"):
        heads = heads * fisher.head_asr.double()
    if mode in ("fim+asr", "fim+asr-neurons"):
        neurons = neurons * fisher.neuron_asr.double()
    return heads, neurons


# -- budgeted search ----------------------------------------------------------------------------


def unit_costs(model: SpikingBert, seq_len: float) -> tuple[list[int], list[int]]:
    """(ACs of one head, ACs of one FFN neuron) per layer at the model's timesteps."""
    pairs = cost.layer_unit_costs(model.config, model.timesteps, max(1, round(seq_len)))
    return [h for h, _ in pairs], [n for _, n in pairs]


def budget_acs(model: SpikingBert, seq_len: float, fraction: float) -> int:
    """c * M(dense): the ACs allowed, relative to the dense model at T_conv."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {fraction}")
    return int(fraction * cost.dense_ac_count(model.config, max(1, round(seq_len))))


def _ranked(importance_: torch.Tensor, per_layer_cost, allowed: torch.Tensor):
    """Allowed units, best first (ties: lower index first): flat indices, cumulative importance
    and cumulative cost, both with a leading 0 for 'none kept'."""
    L, width = importance_.shape
    flat_imp = importance_.reshape(-1).double()
    flat_cost = torch.tensor(per_layer_cost, dtype=torch.int64).repeat_interleave(width)
    idx = allowed.reshape(-1).nonzero().flatten()
    order = idx[torch.sort(-flat_imp[idx], stable=True).indices]
    zero_d, zero_i = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int64)
    cum_imp = torch.cat([zero_d, flat_imp[order].cumsum(0)])
    cum_cost = torch.cat([zero_i, flat_cost[order].cumsum(0)])
    return order, cum_imp, cum_cost


def search_masks(
    head_importance: torch.Tensor,
    neuron_importance: torch.Tensor,
    head_costs,
    neuron_costs,
    budget: int,
    head_allowed: torch.Tensor | None = None,
    neuron_allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary (head_mask [L, H], neuron_mask [L, d_ff]) of largest total importance within
    `budget` ACs: for each k, the k best heads plus the longest run of best neurons that fits.

    Importances must be >= 0 (more kept units never lowers the total). Units outside
    `*_allowed` (already pruned) are never kept. Raises if not even the empty set fits.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0 ACs, got {budget}")
    if bool((head_importance < 0).any()) or bool((neuron_importance < 0).any()):
        raise ValueError("importances must be non-negative")
    h_allowed = (
        torch.ones_like(head_importance, dtype=torch.bool)
        if head_allowed is None
        else (head_allowed.bool().cpu())
    )
    n_allowed = (
        torch.ones_like(neuron_importance, dtype=torch.bool)
        if neuron_allowed is None
        else neuron_allowed.bool().cpu()
    )
    h_order, h_imp, h_cost = _ranked(head_importance.cpu(), head_costs, h_allowed)
    n_order, n_imp, n_cost = _ranked(neuron_importance.cpu(), neuron_costs, n_allowed)
    remaining = budget - h_cost  # [k + 1]: budget left after the k best heads
    fits = remaining >= 0
    # Longest neuron prefix whose cumulative cost fits what the heads leave (prefix 0 costs 0).
    m = torch.searchsorted(n_cost, remaining.clamp_min(0), right=True) - 1
    total = torch.where(fits, h_imp + n_imp[m], torch.tensor(-1.0, dtype=torch.float64))
    k = int(torch.argmax(total))  # first maximum: fewer heads on ties
    head_mask = torch.zeros(head_importance.numel())
    neuron_mask = torch.zeros(neuron_importance.numel())
    head_mask[h_order[:k]] = 1.0
    neuron_mask[n_order[: int(m[k])]] = 1.0
    return head_mask.view_as(head_importance), neuron_mask.view_as(neuron_importance)


# -- refinement ---------------------------------------------------------------------------------


def pruned_fisher_loss(grads: torch.Tensor, keep: torch.Tensor, allowed=None) -> float:
    """|| sum_{pruned i} g_i ||^2 over the per-batch gradient vectors (grads [batches, units])."""
    pruned = ~keep.bool()
    if allowed is not None:
        pruned &= allowed.bool()
    return float(grads.double()[:, pruned].sum(1).pow(2).sum())


def refine_layer(
    grads: torch.Tensor,
    keep: torch.Tensor,
    allowed: torch.Tensor | None = None,
    max_swaps: int | None = None,
) -> torch.Tensor:
    """Greedy best-improvement swaps of one pruned and one kept unit (counts fixed) that lower
    || s ||^2, s = sum_{pruned} g_i, until none does. Never raises the objective.

    Swapping pruned p for kept k gives s' = s - g_p + g_k, so with the Gram matrix G = g^T g
    and u = g^T s:  ||s'||^2 - ||s||^2 = G_kk + G_pp - 2 G_pk + 2 u_k - 2 u_p.
    """
    g = grads.double().cpu()  # [batches, units]
    keep = keep.bool().cpu().clone()
    allowed = torch.ones_like(keep) if allowed is None else allowed.bool().cpu()
    gram = g.t() @ g
    diag = gram.diagonal()
    pruned = ~keep & allowed
    u = gram[:, pruned].sum(1)  # g^T s
    objective = float(u[pruned].sum())  # s^T s
    max_swaps = keep.numel() if max_swaps is None else max_swaps
    for _ in range(max_swaps):
        P, K = pruned.nonzero().flatten(), (keep & allowed).nonzero().flatten()
        if len(P) == 0 or len(K) == 0:
            break
        delta = (
            diag[K][None, :]
            + diag[P][:, None]
            - 2 * gram[P][:, K]
            + 2 * u[K][None, :]
            - 2 * u[P][:, None]
        )
        best = int(torch.argmin(delta))
        gain = float(delta.view(-1)[best])
        # Relative tolerance: a 'gain' at rounding level could cycle between equal sets.
        if gain >= -1e-12 * max(objective, 1e-30):
            break
        p, k = int(P[best // len(K)]), int(K[best % len(K)])
        keep[p], keep[k] = True, False
        pruned[p], pruned[k] = False, True
        u += gram[:, k] - gram[:, p]
        objective += gain
    return keep


def refine_masks(
    head_mask: torch.Tensor,
    neuron_mask: torch.Tensor,
    fisher: FisherInfo,
    head_allowed: torch.Tensor | None = None,
    neuron_allowed: torch.Tensor | None = None,
    max_swaps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine each layer's heads and each layer's neurons separately (block-diagonal Fisher)."""
    out = []
    for mask, grads, allowed in (
        (head_mask, fisher.head_grads, head_allowed),
        (neuron_mask, fisher.neuron_grads, neuron_allowed),
    ):
        refined = mask.clone().cpu()
        for l in range(mask.shape[0]):
            layer_allowed = None if allowed is None else allowed[l]
            keep = refine_layer(grads[:, l], mask[l] != 0, layer_allowed, max_swaps)
            refined[l] = keep.to(refined.dtype)
        out.append(refined)
    return out[0], out[1]


# -- the post-training pipeline -----------------------------------------------------------------


def present_units(model: SpikingBert) -> tuple[torch.Tensor, torch.Tensor]:
    """Units whose weights the model still has (not removed by an earlier compaction), as
    boolean [L, H] and [L, d_ff] in the uncompacted layout."""
    cfg = model.config
    heads = torch.zeros(cfg.num_layers, cfg.num_heads, dtype=torch.bool)
    neurons = torch.zeros(cfg.num_layers, cfg.intermediate_size, dtype=torch.bool)
    for l, block in enumerate(model.layers):
        heads[l, block.kept_heads.cpu()] = True
        neurons[l, block.kept_neurons.cpu()] = True
    return heads, neurons


def allowed_units(model: SpikingBert) -> tuple[torch.Tensor, torch.Tensor]:
    """Units post-training pruning may keep: present and not masked by an earlier stage."""
    heads, neurons = present_units(model)
    return heads & (model.head_mask.cpu() != 0), neurons & (model.neuron_mask.cpu() != 0)


def spatial_masks(
    model: SpikingBert,
    fisher: FisherInfo,
    *,
    budget: float = 0.6,
    mode: str = "fim+asr",
    refine: bool = True,
    seq_len: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Importance -> search -> refinement: binary masks within `budget` x dense ACs and a summary
    (ACs at the representative length, kept units per layer, refinement's objective)."""
    seq_len = fisher.seq_len if seq_len is None else seq_len
    h_allowed, n_allowed = allowed_units(model)
    h_imp, n_imp = importance(fisher, mode)
    h_cost, n_cost = unit_costs(model, seq_len)
    allowed_acs = budget_acs(model, seq_len, budget)
    head_mask, neuron_mask = search_masks(
        h_imp, n_imp, h_cost, n_cost, allowed_acs, h_allowed, n_allowed
    )
    before = _total_pruned_loss(fisher, head_mask, neuron_mask, h_allowed, n_allowed)
    if refine:
        head_mask, neuron_mask = refine_masks(head_mask, neuron_mask, fisher, h_allowed, n_allowed)
    n_tokens = max(1, round(seq_len))
    acs = cost.ac_count(model.config, head_mask, neuron_mask, model.timesteps, n_tokens)
    summary = {
        "importance": mode,
        "budget": budget,
        "budget_acs": allowed_acs,
        "seq_len": seq_len,
        "acs": acs,
        "acs_percent_at_seq_len": 100.0 * acs / cost.dense_ac_count(model.config, n_tokens),
        "heads_per_layer": [int(x) for x in head_mask.sum(1)],
        "neurons_per_layer": [int(x) for x in neuron_mask.sum(1)],
        "fisher_loss_before_refinement": before,
        "fisher_loss": _total_pruned_loss(fisher, head_mask, neuron_mask, h_allowed, n_allowed),
        "refined": refine,
    }
    return head_mask, neuron_mask, summary


def _total_pruned_loss(fisher, head_mask, neuron_mask, h_allowed, n_allowed) -> float:
    """Sum over layers of the block-diagonal objective, heads and neurons."""
    total = 0.0
    for mask, grads, allowed in (
        (head_mask, fisher.head_grads, h_allowed),
        (neuron_mask, fisher.neuron_grads, n_allowed),
    ):
        for l in range(mask.shape[0]):
            total += pruned_fisher_loss(grads[:, l], mask[l] != 0, allowed[l])
    return total


def apply_masks(model: SpikingBert, head_mask: torch.Tensor, neuron_mask: torch.Tensor):
    """Install binary masks on `model` (in place; units removed earlier stay removed)."""
    device = model.head_mask.device
    model.head_mask = head_mask.to(device=device, dtype=torch.float32).clone()
    model.neuron_mask = neuron_mask.to(device=device, dtype=torch.float32).clone()
    return model
