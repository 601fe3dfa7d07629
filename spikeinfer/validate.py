"""Check a kernel backend against the reference on real data (DESIGN section 10).

For every batch both the reference (`torch`, the multi-step form) and the backend simulate the
same inputs. Per sublayer we compare spike counts per neuron and token: the flip fraction is
sum |count_backend - count_reference| / (timesteps x real-token neurons), a lower bound on the
fraction of individual spikes that differ. The rules: in `unrolled` mode every sublayer's flip
fraction stays below 1e-3 and predicted labels agree on at least 99.5 % of examples; in
`sequential` mode, where the reference reproduces the kernels' generator, the same rules apply.
"""

from __future__ import annotations

import time

import torch

from .model import SpikingBert

MAX_FLIP_FRACTION = 1e-3
MIN_PREDICTION_AGREEMENT = 99.5


def compare_outputs(reference, other, valid: torch.Tensor) -> dict[str, dict]:
    """Per sublayer: spike-count differences summed, the number of spike slots and ASRs."""
    out = {}
    for name, ref_rate in reference.rates.items():
        steps = reference.timesteps[name]
        ref_counts = torch.round(ref_rate * steps)
        other_counts = torch.round(other.rates[name].to(ref_rate.dtype) * steps)
        diff = (ref_counts - other_counts).abs() * valid[..., None]
        slots = float(valid.sum()) * ref_rate.shape[-1] * steps
        out[name] = {
            "flips": float(diff.sum()),
            "slots": slots,
            "asr_reference": reference.asr[name],
            "asr_backend": other.asr[name],
        }
    return out


def validate(
    model: SpikingBert,
    task: str,
    backend: str,
    *,
    glue_dir=None,
    limit=None,
    batch_size: int = 32,
    mode: str | None = None,
    timesteps=None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run reference and backend side by side on a GLUE dev split; returns the comparison.
    `mode` defaults to the model's own (`engine.default_mode`)."""
    from tqdm import tqdm

    from .data import bucket_batches, collate, get_task, load_glue, load_tokenizer, tokenize
    from .engine import default_mode, resolve_backend

    backend = resolve_backend(backend)
    mode = mode or default_mode(model)
    spec = get_task(task)
    dataset = load_glue(spec.name, "dev", glue_dir)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    encoded = tokenize(
        dataset,
        spec.name,
        load_tokenizer(),
        max_length=min(128, model.config.max_position_embeddings),
    )
    device = next(model.parameters()).device
    T = model.unrolled_timesteps if timesteps is None else int(timesteps)
    totals: dict[str, dict] = {}
    agree = n = 0
    times = {"reference": 0.0, backend: 0.0}
    batches = bucket_batches(encoded.lengths, batch_size)
    with torch.inference_mode():
        for indices in tqdm(batches, disable=not progress, desc=f"validate {backend}"):
            b = {k: v.to(device) for k, v in collate(encoded, indices).items()}
            args = (b["input_ids"], b["attention_mask"], b["token_type_ids"])
            kwargs = {"mode": mode, "seed": seed, "timesteps": T if mode == "unrolled" else None}
            outputs = {}
            for name in ("torch", backend):
                model.to_backend(name)
                start = time.perf_counter()
                outputs[name] = model(*args, **kwargs)
                times["reference" if name == "torch" else backend] += time.perf_counter() - start
            model.to_backend("torch")
            ref, other = outputs["torch"], outputs[backend]
            for name, row in compare_outputs(ref, other, b["attention_mask"].float()).items():
                acc = totals.setdefault(
                    name, {"flips": 0.0, "slots": 0.0, "asr_reference": 0.0, "asr_backend": 0.0}
                )
                for key in ("flips", "slots"):
                    acc[key] += row[key]
                for key in ("asr_reference", "asr_backend"):
                    acc[key] += row[key] * len(indices)
            agree += int((ref.logits.argmax(-1) == other.logits.argmax(-1)).sum())
            n += len(indices)
    sublayers = {
        name: {
            "flip_fraction": acc["flips"] / acc["slots"] if acc["slots"] else 0.0,
            "asr_reference": acc["asr_reference"] / n,
            "asr_backend": acc["asr_backend"] / n,
        }
        for name, acc in totals.items()
    }
    agreement = 100.0 * agree / n
    worst = max(s["flip_fraction"] for s in sublayers.values())
    return {
        "task": spec.name,
        "backend": backend,
        "mode": mode,
        "n_examples": n,
        "prediction_agreement": agreement,
        "max_flip_fraction": worst,
        "passed": worst < MAX_FLIP_FRACTION and agreement >= MIN_PREDICTION_AGREEMENT,
        "sublayers": sublayers,
        "reference_s": times["reference"],
        "backend_s": times[backend],
    }


def format_validation(result: dict) -> str:
    lines = [f"{'sublayer':<8} {'flip fraction':>14} {'ASR ref':>9} {'ASR backend':>12}"]
    for name, row in result["sublayers"].items():
        lines.append(
            f"{name:<8} {row['flip_fraction']:>14.2e} {row['asr_reference']:>9.4f} "
            f"{row['asr_backend']:>12.4f}"
        )
    lines.append(
        f"predictions agree on {result['prediction_agreement']:.2f} % of "
        f"{result['n_examples']} examples; max flip fraction "
        f"{result['max_flip_fraction']:.2e} (limit {MAX_FLIP_FRACTION:g})"
    )
    lines.append(
        f"time: reference {result['reference_s']:.1f} s, {result['backend']} "
        f"{result['backend_s']:.1f} s"
    )
    lines.append("PASSED" if result["passed"] else "FAILED")
    return "\n".join(lines)
