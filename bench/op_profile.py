"""Where the CPU backend's time goes, per op, against the accumulates (ACs) each op performs.

Pruning pays in time only if every op's time shrinks with its own ACs and the ops' time per AC is
alike (DESIGN section 13: pruned/dense time within 1.15x of pruned/dense ACs). This script times
every `spikeinfer.cpu_backend` op call of a GLUE dev evaluation and counts its ACs from the
shapes it was given, the way `spikeinfer.cost` counts them (padded tokens included):

    projection  T * rows * in_features * out_features
    attention   T * B * S * in_features * H*d  (Q)  +  2 * T * B * S^2 * H*d  (scores, P.V)

and reports, per op kind and model, the time, the ACs, ACs per nanosecond, and for the second
and later models the dense/pruned ratios of time and ACs against the first. Times are medians of
`--rounds` evaluations per model, the models run in alternation; the whole-model time is the
evaluation's batch loop (`wall_s`: loading and tokenising the data are not counted).

    G=../shared/data/glue
    python bench/op_profile.py --task sst2 --glue-dir $G --limit 256 --threads 1 \\
        --mode sequential --models models/sst2-1bit,models/sst2-1bit-pruned
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from bench_cpu import interleaved_ms
from provenance import save_result

import spikeinfer.cpu_backend as cb
from spikeinfer.checkpoint import load_checkpoint
from spikeinfer.engine import device_name, evaluate

# Kinds of `spike_linear_neuron` calls, by epilogue (the F sublayer runs the reference's GELU).
_LINEAR_KIND = {
    cb.EPILOGUE_PLAIN: "projection (K, V)",
    cb.EPILOGUE_LAYERNORM: "projection + LayerNorm (O1, O2)",
    cb.EPILOGUE_GELU: "projection + GELU (F)",
}


class OpTimer:
    """Wraps the cpu_backend ops the model calls; accumulates seconds, calls and ACs per kind."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.acs = defaultdict(int)
        self.calls = defaultdict(int)
        self._originals = {}

    def _wrap(self, name, kind_and_acs):
        original = getattr(cb, name)
        self._originals[name] = original

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            kind, acs = kind_and_acs(*args, **kwargs)
            self.seconds[kind] += time.perf_counter() - start
            self.acs[kind] += acs
            self.calls[kind] += 1
            return out

        setattr(cb, name, timed)

    def __enter__(self):
        def linear(spikes, signs, in_features, *args, epilogue=cb.EPILOGUE_PLAIN, **kwargs):
            T, rows = spikes.shape[0], spikes.shape[1]
            return _LINEAR_KIND[epilogue], T * rows * in_features * signs.shape[0]

        def attention(spikes, q_signs, in_features, *args, **kwargs):
            T, B, S = spikes.shape[:3]
            width = q_signs.shape[0]
            return "attention (Q, scores, softmax, P.V)", T * B * S * width * (in_features + 2 * S)

        self._wrap("spike_linear_neuron", linear)
        self._wrap("spiking_attention_neuron", attention)
        self._wrap("bernoulli_pack", lambda *a, **k: ("Bernoulli draws (sequential)", 0))
        self._wrap("neuron_scan", lambda *a, **k: ("embedding neurons", 0))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(cb, name, original)


def profile_once(model, args) -> dict:
    """One timed dev evaluation: seconds, ACs and calls per op kind, and the evaluation's own
    wall time (batches only: loading and tokenising the data are not counted)."""
    kwargs = dict(
        glue_dir=args.glue_dir, limit=args.limit, backend="cpu", progress=False, mode=args.mode
    )
    with OpTimer() as timer:
        result = evaluate(model, args.task, **kwargs)
    return {"result": result, "timer": timer}


def summarize(runs: list[dict]) -> dict:
    """Per op kind, the median over runs of its time, beside its ACs (the same in every run)."""
    timers = [run["timer"] for run in runs]
    total = statistics.median(run["result"]["wall_s"] for run in runs)
    seconds = {
        kind: statistics.median(t.seconds[kind] for t in timers) for kind in timers[0].seconds
    }
    first = timers[0]
    ops = {
        kind: {
            "calls": first.calls[kind],
            "ms": round(seconds[kind] * 1e3, 1),
            "share": round(seconds[kind] / total, 3),
            "gacs": round(first.acs[kind] / 1e9, 3),
            "acs_per_ns": round(first.acs[kind] / seconds[kind] / 1e9, 3)
            if first.acs[kind]
            else None,
        }
        for kind in sorted(seconds)
    }
    rest = total - sum(seconds.values())
    ops["outside the ops (Python, packing, rates)"] = {
        "ms": round(rest * 1e3, 1),
        "share": round(rest / total, 3),
    }
    result = runs[0]["result"]
    return {
        "metric": {k: v for k, v in result.items() if k in ("accuracy", "f1")},
        "ms": round(total * 1e3, 1),
        "ms_runs": [round(run["result"]["wall_s"] * 1e3, 1) for run in runs],
        "gacs": round(sum(first.acs.values()) / 1e9, 3),
        "ops": ops,
    }


def ratios(base: dict, other: dict) -> dict:
    """Dense/pruned time and ACs, per op kind with ACs and overall."""
    out = {}
    for kind, b in base["ops"].items():
        o = other["ops"].get(kind)
        if o is None or not o.get("ms"):
            continue
        entry = {"time": round(b["ms"] / o["ms"], 3)}
        if b.get("gacs") and o.get("gacs"):
            entry["acs"] = round(b["gacs"] / o["gacs"], 3)
        out[kind] = entry
    time_ratio, ac_ratio = base["ms"] / other["ms"], base["gacs"] / other["gacs"]
    out["whole model"] = {
        "time": round(time_ratio, 3),
        "acs": round(ac_ratio, 3),
        "time_over_ac_ratio": round(ac_ratio / time_ratio, 3),
    }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--glue-dir", required=True)
    p.add_argument(
        "--models", required=True, help="comma-separated checkpoint folders, dense first"
    )
    p.add_argument(
        "--mode", default=None, help="unrolled or sequential (default: each model's own)"
    )
    p.add_argument("--limit", type=int, default=256, help="dev examples (default 256)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--rounds", type=int, default=3, help="timed evaluations of each model (default 3)"
    )
    p.add_argument("--out", default=None, help="result file (default bench/results/...)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models.split(",")
    loaded = {path: load_checkpoint(path).eval() for path in models}
    # The models run in alternation, round after round (bench_cpu.interleaved_ms): this VM's
    # speed drifts over minutes, and a model timed while it is slow skews every ratio against it.
    # The first evaluation of each is the warm-up (extension load, packed weights, allocator).
    runs = {path: [] for path in models}
    interleaved_ms(
        {
            path: lambda path=path: runs[path].append(profile_once(loaded[path], args))
            for path in models
        },
        repeats=args.rounds,
        warmup_calls=1,
    )
    runs = {path: timed[-args.rounds :] for path, timed in runs.items()}
    results = {}
    for path in models:
        results[path] = summarize(runs[path])
        print(f"{path}: {results[path]['ms']} ms, {results[path]['gacs']} G ACs")
        for kind, row in results[path]["ops"].items():
            print(f"  {kind:42s} {row}")
    comparisons = {m: ratios(results[models[0]], results[m]) for m in models[1:]}
    for m, r in comparisons.items():
        print(f"{models[0]} over {m}:")
        for kind, row in r.items():
            print(f"  {kind:42s} {row}")
    save_result(
        {
            "device": device_name(torch.device("cpu")),
            "task": args.task,
            "mode": args.mode,
            "limit": args.limit,
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "kernel_path": cb.isa(),
            "models": results,
            "dense_over": comparisons,
        },
        args.out,
        f"op_profile_{args.task}",
    )


if __name__ == "__main__":
    main()
