"""Backend selection and batched GLUE evaluation (DESIGN section 10).

`--backend auto` means triton where CUDA is present, cpu otherwise. A backend that was asked for
and cannot run raises `BackendUnavailableError` with the reason; nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import cost
from .config import uniform_timesteps
from .model import BACKENDS, BackendUnavailableError, SpikingBert, mean_asr


def select_device(name: str | None = None) -> torch.device:
    """The one place a device is chosen: `name` if given, else CUDA when present, else CPU."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"device {name!r} was asked for but CUDA is not available"
            )
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backend_module(name: str):
    if name == "triton":
        from .kernels import backend as module
    elif name == "cpu":
        from . import cpu_backend as module
    else:
        raise ValueError(f"{name!r} is not a kernel backend")
    return module


def require_backend(name: str) -> None:
    """Raise BackendUnavailableError unless backend `name` can run on this machine."""
    try:
        module = _backend_module(name)
    except ImportError as e:
        raise BackendUnavailableError(f"backend {name!r} cannot be imported: {e}") from e
    ok, reason = module.is_available()
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")


def resolve_backend(name: str) -> str:
    """Map "auto" to the backend for this machine; validate explicit names."""
    if name == "auto":
        name = "triton" if torch.cuda.is_available() else "cpu"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name in ("triton", "cpu"):
        require_backend(name)
    return name


def run_backend(model: SpikingBert, input_ids, attention_mask, token_type_ids, **kwargs):
    """Dispatch a forward pass to a kernel backend's whole-model simulation."""
    return _backend_module(model.backend).simulate(
        model, input_ids, attention_mask, token_type_ids, **kwargs
    )


def models_dir() -> Path:
    """Folder of bundled models: $SPIKEINFER_MODELS, else the repository's models/."""
    env = os.environ.get("SPIKEINFER_MODELS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "models"


def resolve_model_path(path_or_name) -> Path:
    path = Path(path_or_name)
    if path.exists():
        return path
    bundled = models_dir() / str(path_or_name)
    if bundled.exists():
        return bundled
    available = sorted(p.name for p in models_dir().glob("*") if (p / "config.json").exists())
    raise FileNotFoundError(
        f"no checkpoint folder {str(path_or_name)!r} and no bundled model of that name in "
        f"{models_dir()} (bundled: {', '.join(available) or 'none'})"
    )


# Preference when a task has several bundled models: the pruned model serves by default.
_BUNDLE_PREFERENCE = ("{task}-1bit-pruned", "{task}-1bit", "{task}-1bit-adaptive")


def bundled_models() -> dict[str, str]:
    """task -> name of the bundled model `spikeinfer eval --task` uses by default."""
    import json

    by_task: dict[str, list[str]] = {}
    for config in sorted(models_dir().glob("*/config.json")):
        task = json.loads(config.read_text()).get("task")
        if task:
            by_task.setdefault(task, []).append(config.parent.name)
    chosen = {}
    for task, names in by_task.items():
        preferred = [p.format(task=task) for p in _BUNDLE_PREFERENCE]
        chosen[task] = next((n for n in preferred if n in names), names[0])
    return chosen


def default_mode(model: SpikingBert) -> str:
    """The mode a checkpoint is meant to run in: what its pruning stage recorded (`sequential`
    after temporal pruning), else `unrolled`."""
    return getattr(model, "checkpoint_meta", {}).get("mode") or "unrolled"


def load(path_or_name, device=None) -> SpikingBert:
    """Load a checkpoint folder or a bundled model by name (e.g. "sst2-1bit")."""
    from .checkpoint import load_checkpoint

    return load_checkpoint(resolve_model_path(path_or_name), device=select_device(device))


def kept_columns(model: SpikingBert) -> dict[str, torch.Tensor]:
    """Per masked sublayer, which of its (current) units are kept: columns of heads whose mask is
    nonzero for K, V and A, nonzero neurons for F. Rates of masked units are zero by
    construction, so costs average over the kept units only, as for a compacted model."""
    d = model.config.head_dim
    out = {}
    for l, block in enumerate(model.layers):
        heads = model.head_mask[l, block.kept_heads] != 0
        cols = heads.repeat_interleave(d)
        for sub in ("K", "V", "A"):
            out[f"{l}.{sub}"] = cols
        out[f"{l}.F"] = model.neuron_mask[l, block.kept_neurons] != 0
    return out


def _example_asr(
    rates: dict[str, torch.Tensor], valid: torch.Tensor, kept: dict[str, torch.Tensor]
) -> list[dict[str, float]]:
    """Per example, the mean ASR of every sublayer over its real tokens and kept units."""
    per_sublayer = {}
    for name, r in rates.items():
        keep = kept.get(name)
        if keep is not None and not bool(keep.all()):
            r = r[..., keep.to(r.device)]  # a copy: only for models pruned by masks
        if r.shape[-1] == 0:
            per_sublayer[name] = torch.zeros(r.shape[0])
        else:
            # Features first, then tokens: no full-size product with the token mask.
            token_sums = r.sum(-1)  # [B, N]
            per_sublayer[name] = ((token_sums * valid).sum(1) / (valid.sum(1) * r.shape[-1])).cpu()
    B = valid.shape[0]
    return [{name: float(v[b]) for name, v in per_sublayer.items()} for b in range(B)]


def evaluate(
    model: SpikingBert,
    task: str,
    *,
    split: str | None = None,
    glue_dir=None,
    batch_size: int = 32,
    mode: str | None = None,
    timesteps=None,
    seed: int = 0,
    limit: int | None = None,
    max_length: int = 128,
    backend: str | None = None,
    tokenizer=None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    return_predictions: bool = False,
) -> dict:
    """Evaluate `model` on a GLUE split; returns the DESIGN section 10 result object.

    `mode` defaults to the model's own (`default_mode`). `timesteps` is T for unrolled mode; for
    sequential mode a per-sublayer list or one T for every sublayer (default the model's own),
    used for this evaluation only. Percentages are 0-100. Under
    torchrun (torch.distributed initialised, world > 1) every process evaluates every world-th
    length bucket and the results are gathered, so each process returns the metrics of the whole
    split; `shard=(rank, world)` selects buckets by hand and returns that shard's result alone.
    """
    from tqdm import tqdm

    from .data import bucket_batches, collate, get_task, load_glue, load_tokenizer, tokenize
    from .metrics import compute_metrics

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    spec = get_task(task)
    if model.config.num_labels != spec.num_labels:
        raise ValueError(
            f"the model has {model.config.num_labels} outputs but {spec.name} needs "
            f"{spec.num_labels}: it was trained for another task"
        )
    split = spec.resolve_split(split or "dev")
    mode = mode or default_mode(model)
    if backend is not None:
        model.to_backend(resolve_backend(backend))
    dataset = load_glue(spec.name, split, glue_dir)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    tokenizer = tokenizer or load_tokenizer()
    max_length = min(max_length, model.config.max_position_embeddings)
    encoded = tokenize(dataset, spec.name, tokenizer, max_length=max_length)
    lengths = [len(ids) for ids in encoded.input_ids]
    batches = bucket_batches(lengths, batch_size)
    gather = shard is None and _world_size() > 1
    if gather:
        shard = (torch.distributed.get_rank(), _world_size())
    if shard is not None:
        rank, world = shard
        batches = batches[rank::world]
    device = next(model.parameters()).device

    preds, labels, indices = [], [], []
    kept = kept_columns(model)
    dense = pruned = driven = energy = 0.0
    ac_counts: dict[int, tuple[int, int]] = {}  # by example length: (dense, this model's) ACs
    n_done = 0
    start = time.perf_counter()
    bar = tqdm(
        total=sum(len(b) for b in batches),
        disable=not progress,
        unit="sent",
        desc=f"{spec.name} {mode}",
        dynamic_ncols=True,
    )
    model.eval()
    with torch.inference_mode(), _timesteps_for(model, mode, timesteps) as (table, t_emb):
        for batch_indices in batches:
            batch = collate(encoded, batch_indices)
            ids = batch["input_ids"].to(device)
            am = batch["attention_mask"].to(device)
            tt = batch["token_type_ids"].to(device)
            out = model(
                ids, am, tt, mode=mode, timesteps=table if mode == "unrolled" else None, seed=seed
            )
            logits = out.logits.float().cpu()
            preds.append(logits[:, 0] if spec.is_regression else logits.argmax(-1))
            labels.append(batch["labels"])
            indices.extend(batch_indices)
            valid = am.to(torch.float32)
            for n_tokens, asr in zip(
                am.sum(1).tolist(), _example_asr(out.rates, valid, kept), strict=True
            ):
                if n_tokens not in ac_counts:  # the same for every example of this length
                    ac_counts[n_tokens] = (
                        cost.dense_ac_count(model.config, n_tokens),
                        cost.ac_count(
                            model.config, model.head_mask, model.neuron_mask, table, n_tokens
                        ),
                    )
                dense_acs, model_acs = ac_counts[n_tokens]
                dense += dense_acs
                pruned += model_acs
                example_driven = cost.rate_weighted_acs(
                    model.config, model.head_mask, model.neuron_mask, asr, n_tokens, table
                )
                driven += example_driven
                energy += cost.energy_mj_of_acs(model.config, example_driven)
            n_done += len(batch_indices)
            bar.update(len(batch_indices))
            bar.set_postfix(sent_s=f"{n_done / (time.perf_counter() - start):.1f}")
    bar.close()
    wall = time.perf_counter() - start
    part = {
        "indices": indices,
        "preds": torch.cat(preds) if preds else torch.zeros(0),
        "labels": torch.cat(labels) if labels else torch.zeros(0),
        "n": n_done,
        "sums": (dense, pruned, driven, energy),
        "wall": wall,
    }
    if gather:
        parts = [None] * _world_size()
        torch.distributed.all_gather_object(parts, part)
        indices = [i for q in parts for i in q["indices"]]
        part = {
            "preds": torch.cat([q["preds"] for q in parts]),
            "labels": torch.cat([q["labels"] for q in parts]),
            "n": sum(q["n"] for q in parts),
            "sums": tuple(map(sum, zip(*(q["sums"] for q in parts), strict=True))),
            "wall": max(q["wall"] for q in parts),
        }
    n_done, (dense, pruned, driven, energy), wall = part["n"], part["sums"], part["wall"]
    if n_done == 0:
        raise ValueError(f"no examples to evaluate in {spec.name} {split}")
    preds_np, labels_np = part["preds"].numpy(), part["labels"].numpy()
    result = {"task": spec.name, "split": split, "n_examples": n_done}
    result.update(compute_metrics(spec.name, preds_np, labels_np))
    result.update(
        {
            "acs_percent": 100.0 * pruned / dense,
            "normalized_c": driven / dense,
            "latency": cost.latency(table, t_emb),
            "energy_mj": energy / max(n_done, 1),
            "sentences_per_s": n_done / wall,
            "wall_s": wall,
            "backend": model.backend,
            "mode": mode,
            "device": device_name(device),
            "num_truncated": encoded.num_truncated,
        }
    )
    if model.backend == "cpu":  # which kernels ran: their speed differs by CPU several fold
        from . import cpu_backend

        result["kernel_path"] = cpu_backend.isa()
    if return_predictions:
        result["predictions"] = {"index": np.asarray(indices), "pred": preds_np, "label": labels_np}
    return result


@contextlib.contextmanager
def _timesteps_for(model: SpikingBert, mode: str, timesteps):
    """Yield the timesteps a run in `mode` uses, (table, t_emb): T and None for unrolled (default
    the model's `unrolled_timesteps`); for sequential the model's per-sublayer lists, or
    `timesteps` in their place while the run lasts (a list per sublayer, or an int for every
    sublayer and the embedding neurons), so that an evaluation leaves the caller's model as it
    found it."""
    if mode == "unrolled":
        yield (model.unrolled_timesteps if timesteps is None else int(timesteps)), None
        return
    if timesteps is None:
        yield model.timesteps, model.t_emb
        return
    own = (model.timesteps, model.t_emb)
    if isinstance(timesteps, int):
        model.set_timesteps(uniform_timesteps(model.config.num_layers, timesteps), t_emb=timesteps)
    else:
        model.set_timesteps(timesteps)
    try:
        yield model.timesteps, model.t_emb
    finally:
        model.timesteps, model.t_emb = own


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


__all__ = ["evaluate", "load", "mean_asr", "resolve_backend", "select_device"]
