"""How well each rate surrogate predicts the spiking model it trains: dev metric of the rate
surrogate, the moments (noise-aware) surrogate and the spiking simulation (unrolled, T steps), and
the mean absolute error of each surrogate's rates against the simulation's, per sublayer kind.

    G=../shared/data/glue
    python bench/surrogate_fidelity.py --task sst2 --glue-dir $G --timesteps 32 \\
        --models runs/sst2/student6/fp-pred,runs/sst2/student8/fp-pred,models/sst2-1bit
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from provenance import save_result

from spikeinfer.checkpoint import load_checkpoint
from spikeinfer.config import SUBLAYERS
from spikeinfer.data import bucket_batches, get_task, load_tokenizer
from spikeinfer.distill import TrainArgs, _device_batch, load_split
from spikeinfer.engine import device_name
from spikeinfer.metrics import compute_metrics


@torch.no_grad()
def fidelity(model, task: str, encoded, timesteps: int, backend: str) -> dict:
    model.eval().to_backend(backend)
    logits = {"rate": [], "moments": [], "snn": []}
    errors = {kind: {name: [] for name in ("emb", *SUBLAYERS)} for kind in ("rate", "moments")}
    labels = []
    for idx in bucket_batches(encoded.lengths, 64):
        b = _device_batch(encoded, idx, "cpu")
        ids, mask, types = b["input_ids"], b["attention_mask"], b["token_type_ids"]
        snn = model(ids, mask, types, timesteps=timesteps)
        valid = mask.bool()
        for kind in ("rate", "moments"):
            out = model.surrogate(ids, mask, types, moments=kind == "moments")
            logits[kind].append(out.logits)
            for name, r in out.rates.items():
                err = (r - snn.rates[name]).abs()[valid].mean().item()
                errors[kind][name.split(".")[-1]].append(err)
        logits["snn"].append(snn.logits)
        labels.append(b["labels"])
    y = torch.cat(labels).numpy()
    result = {
        kind: compute_metrics(task, torch.cat(v).argmax(-1).numpy(), y)
        for kind, v in logits.items()
    }
    result["rate_error"] = {
        kind: {name: round(sum(e) / len(e), 4) for name, e in per.items() if e}
        for kind, per in errors.items()
    }
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--models", required=True, help="comma-separated checkpoint folders")
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--timesteps", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="first N dev examples")
    p.add_argument("--teacher", default=None, help="tokenizer folder (default runs/<task>/teacher)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    spec = get_task(a.task)
    tokenizer = load_tokenizer(a.teacher or f"runs/{spec.name}/teacher")
    args = TrainArgs(task=spec.name, out=Path("/dev/null"), glue_dir=a.glue_dir)
    dev = load_split(spec, "dev", args, tokenizer, 128, a.limit)
    rows = []
    for path in a.models.split(","):
        model = load_checkpoint(path)
        binary = model.config.binary
        # the kernel backend runs 1-bit models only; full-precision ones run on the reference
        backend = "cpu" if binary else "torch"
        r = fidelity(model, spec.name, dev, a.timesteps, backend)
        rows.append({"model": path, "binary": binary, "backend": backend, **r})
        print(json.dumps(rows[-1]), flush=True)
    save_result(
        {
            "benchmark": "surrogate_fidelity",
            "task": spec.name,
            "timesteps": a.timesteps,
            "n_examples": len(dev),
            "device": device_name(torch.device("cpu")),
            "rows": rows,
        },
        a.out,
        f"surrogate_fidelity_{spec.name}",
    )


if __name__ == "__main__":
    main()
