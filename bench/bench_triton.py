"""Benchmark the Triton backend against the torch references, per kernel and for the whole model.

Measured side by side in one run (DESIGN section 13), for the `minilm-4l` and `spikingbert-base`
shapes (seq 128, T = 85, batch 32 by default):

    kernels   spike_linear per epilogue (K/V plain, Q none, O1/O2 residual+LN, F GELU):
              triton (fused GEMM + scan)  vs  torch-step fp32 (per-step reference ops + if_step)
              vs  torch bf16 multi-step (T folded into the matmul)  vs  torch._int_mm + the
              separate Triton neuron scan (what fusion saves); spiking attention likewise.
    model     triton vs torch-step fp32 vs torch fp32 vs torch bf16 multi-step, dense and pruned
              (half the heads and FFN neurons, compacted).

Reports the median ms after warm-up, speed ratios, achieved int8 TOPS (2 ops per MAC) and the
percentage of the GPU's dense int8 tensor peak, and writes the rows to
bench/results/triton_<date>.json (appending to an existing file of that day).

Needs a CUDA GPU: without one it refuses to run. `--smoke` runs the same code paths on the
`tiny` preset in Triton's CPU interpreter to check the script itself; its timings mean nothing
and it writes no results unless --out is given.

    python bench/bench_triton.py                       # both presets, batch 32
    python bench/bench_triton.py --batch 32 128 --presets minilm-4l
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

# Dense int8 tensor-core peak, TOPS (no sparsity): H100 SXM and H200 1979, H100 PCIe 1513.
PEAK_INT8_TOPS = {
    "H200": 1979.0,
    "H100 80GB HBM3": 1979.0,
    "H100 PCIe": 1513.0,
    "H100": 1979.0,
    "A100": 624.0,
    "L40S": 733.0,
    "L4": 242.0,
}
PROJECTIONS = ("K", "Q", "O1", "F", "O2")  # V has K's shape and epilogue


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Triton backend vs torch references: per-kernel and whole-model timings "
        "(needs a CUDA GPU)."
    )
    p.add_argument(
        "--presets",
        nargs="+",
        default=["minilm-4l", "spikingbert-base"],
        help="model presets to benchmark (default: minilm-4l spikingbert-base)",
    )
    p.add_argument("--batch", nargs="+", type=int, default=[32], help="batch sizes (default 32)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sentence (default 128)")
    p.add_argument("--timesteps", type=int, default=85, help="unrolled T (default 85)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; median kept (default 5)")
    p.add_argument(
        "--keep-fraction",
        type=float,
        default=0.5,
        help="heads and FFN neurons kept in the pruned model (default 0.5)",
    )
    p.add_argument(
        "--only",
        choices=["kernels", "model"],
        default=None,
        help="run only the kernel or only the whole-model benchmarks",
    )
    p.add_argument(
        "--skip-torch-step", action="store_true", help="skip the (slow) per-step fp32 reference"
    )
    p.add_argument(
        "--peak-tops",
        type=float,
        default=None,
        help="dense int8 peak of this GPU in TOPS (default: looked up by name)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results file (default bench/results/triton_<date>.json)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="check the script on CPU: tiny preset, Triton interpreter, no results file",
    )
    return p.parse_args(argv)


def import_kernels():
    import spikeinfer.kernels as kernels

    return kernels


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            text=True,
            capture_output=True,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def peak_tops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, tops in PEAK_INT8_TOPS.items():
        if key in device_name:
            return tops
    return None


class Timer:
    """Median wall time of a callable in ms: CUDA events on GPU, perf_counter otherwise."""

    def __init__(self, torch, warmup: int, repeats: int, cuda: bool):
        self.torch, self.warmup, self.repeats, self.cuda = torch, warmup, repeats, cuda

    def __call__(self, fn) -> float:
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.repeats):
            if self.cuda:
                torch.cuda.synchronize()
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)


def attempt(timer, fn):
    """(ms, None) or (None, reason): a reference that does not fit or is unsupported is recorded
    as such instead of ending the run."""
    torch = timer.torch
    try:
        return timer(fn), None
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return None, f"out of memory: {str(exc).splitlines()[0]}"
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


# -- per-kernel benchmarks ------------------------------------------------------------------------
def projection_shapes(cfg) -> dict[str, tuple[int, int, str]]:
    """sublayer -> (K in, N out, epilogue)."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    return {
        "K": (D, D, "plain"),
        "Q": (D, D, "none"),
        "O1": (D, D, "ln"),
        "F": (D, I, "gelu"),
        "O2": (I, D, "ln"),
    }


def bench_projection(ctx, cfg, name: str, B: int) -> list[dict]:
    torch, F = ctx["torch"], ctx["F"]
    from spikeinfer.neuron import if_multistep, if_step
    from spikeinfer.ops import spike_linear as ref_linear

    spike_linear, if_scan = ctx["spike_linear"], ctx["if_scan"]
    dev, T, N_seq = ctx["device"], ctx["T"], ctx["seq_len"]
    K, N, epilogue = projection_shapes(cfg)[name]
    M = B * N_seq
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.rand(T, M, K, generator=g) < 0.3).to(torch.int8).to(dev)
    signs = torch.where(torch.rand(N, K, generator=g) < 0.5, 1, -1).to(torch.int8).to(dev)
    alpha = torch.full((N,), 1.0 / math.sqrt(0.3 * K), device=dev)
    bias = (torch.randn(N, generator=g) * 0.3 + 0.3).to(dev)
    extra = {}
    if epilogue == "ln":
        extra = {
            "residual": (torch.rand(T, M, N, generator=g) < 0.3).to(torch.int8).to(dev),
            "ln_weight": torch.ones(N, device=dev),
            "ln_bias": torch.full((N,), 0.3, device=dev),
        }
    v_th = 1.0

    def epi(cur, t=None, dtype=torch.float32):
        if epilogue == "gelu":
            return F.gelu(cur)
        if epilogue == "ln":
            r = extra["residual"] if t is None else extra["residual"][t]
            return F.layer_norm(
                cur + r.to(dtype),
                (N,),
                extra["ln_weight"].to(dtype),
                extra["ln_bias"].to(dtype),
                1e-12,
            )
        return cur

    def triton_fused():
        spike_linear(x, signs, alpha, bias, epilogue=epilogue, v_th=v_th, **extra)

    signs_f = signs.float()

    def torch_step():
        v = None
        for t in range(T):
            cur = epi(ref_linear(x[t].float(), signs_f, alpha, bias), t)
            if epilogue != "none":
                v = torch.zeros_like(cur) if v is None else v
                _, v = if_step(cur, v, v_th)

    signs_bf = signs.to(torch.bfloat16)
    alpha_bf, bias_bf = alpha.to(torch.bfloat16), bias.to(torch.bfloat16)

    def torch_bf16():
        cur = epi(
            ref_linear(x.to(torch.bfloat16), signs_bf, alpha_bf, bias_bf), dtype=torch.bfloat16
        )
        if epilogue != "none":
            if_multistep(cur, v_th)

    signs_t = signs.t()  # [K, N] column-major view, the layout _int_mm wants for its B

    def int_mm_scan():
        counts = torch._int_mm(x.view(T * M, K), signs_t)
        cur = epi((counts.float() * alpha + bias).view(T, M, N))
        if epilogue != "none":
            if_scan(cur, v_th)

    variants = {"triton": triton_fused, "torch-bf16": torch_bf16, "int_mm+scan": int_mm_scan}
    if not ctx["skip_step"]:
        variants["torch-step-fp32"] = torch_step
    ops = 2.0 * T * M * N * K
    rows, times = [], {}
    for backend, fn in variants.items():
        ms, error = attempt(ctx["timer"], fn)
        times[backend] = ms
        rows.append(
            ctx["row"](
                "kernel/spike_linear",
                backend,
                preset=ctx["preset"],
                sublayer=name,
                epilogue=epilogue,
                batch=B,
                seq_len=N_seq,
                timesteps=T,
                M=M,
                N=N,
                K=K,
                ms=ms,
                error=error,
                **ctx["throughput"](ops, ms),
            )
        )
    add_ratios(rows, times)
    return rows


def bench_attention(ctx, cfg, B: int) -> list[dict]:
    torch = ctx["torch"]
    from spikeinfer.neuron import if_multistep, if_step
    from spikeinfer.ops import spiking_attention as ref_attention

    dev, T, N = ctx["device"], ctx["T"], ctx["seq_len"]
    h, d = cfg.num_heads, cfg.head_dim
    W, M = h * d, B * N
    g = torch.Generator(device="cpu").manual_seed(1)
    q = torch.randn(T, M, W, generator=g).to(dev)
    s_k = (torch.rand(T, M, W, generator=g) < 0.3).to(torch.int8).to(dev)
    s_v = (torch.rand(T, M, W, generator=g) < 0.3).to(torch.int8).to(dev)
    mask = torch.zeros(B, N, device=dev)

    def heads(t, dtype=torch.float32):
        return t.to(dtype).view(-1, B, N, h, d).transpose(2, 3)

    def triton_fused():
        ctx["spiking_attention"](q, s_k, s_v, mask, batch=B, head_dim=d, v_th=1.0)

    def torch_step():
        v = None
        for t in range(T):
            cur = ref_attention(
                heads(q[t : t + 1]),
                heads(s_k[t : t + 1]),
                heads(s_v[t : t + 1]),
                mask[:, None, None, :],
            )
            v = torch.zeros_like(cur) if v is None else v
            _, v = if_step(cur, v, 1.0)

    def torch_bf16():
        bf = torch.bfloat16
        cur = ref_attention(
            heads(q, bf), heads(s_k, bf), heads(s_v, bf), mask[:, None, None, :].to(bf)
        )
        if_multistep(cur, 1.0)

    variants = {"triton": triton_fused, "torch-bf16": torch_bf16}
    if not ctx["skip_step"]:
        variants["torch-step-fp32"] = torch_step
    flops = 4.0 * T * B * h * N * N * d
    rows, times = [], {}
    for backend, fn in variants.items():
        ms, error = attempt(ctx["timer"], fn)
        times[backend] = ms
        rows.append(
            ctx["row"](
                "kernel/attention",
                backend,
                preset=ctx["preset"],
                batch=B,
                seq_len=N,
                timesteps=T,
                heads=h,
                head_dim=d,
                ms=ms,
                error=error,
                tflops=None if ms is None else flops / ms / 1e9,
            )
        )
    add_ratios(rows, times)
    return rows


def add_ratios(rows: list[dict], times: dict):
    """Speed of triton relative to each other backend of the same benchmark (> 1: triton wins)."""
    ours = times.get("triton")
    for row in rows:
        other = times.get(row["backend"])
        row["triton_speedup"] = (other / ours) if ours and other else None


# -- whole model ----------------------------------------------------------------------------------
def build_model(ctx, preset: str, keep: float | None):
    """A 1-bit model with firing weights (normal(0, 1) weights, normal(0.3, 0.3) biases),
    optionally pruned to `keep` of its heads and FFN neurons per layer and compacted."""
    torch = ctx["torch"]
    from spikeinfer.model import SpikingBert, compact

    cfg = ctx["config"](preset)
    torch.manual_seed(0)
    model = SpikingBert(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "LayerNorm" not in name:
                p.normal_(0.3, 0.3)
            elif p.dim() == 2 and "embeddings" not in name:
                p.normal_(0.0, 1.0)
    model = model.eval().to(ctx["device"]).freeze_binary()
    if keep is not None:
        g = torch.Generator(device="cpu").manual_seed(1)
        L, H, I = cfg.num_layers, cfg.num_heads, cfg.intermediate_size
        for l in range(L):
            heads = torch.randperm(H, generator=g)[: max(1, round(keep * H))]
            neurons = torch.randperm(I, generator=g)[: max(1, round(keep * I))]
            model.head_mask[l] = 0
            model.head_mask[l, heads.to(model.head_mask.device)] = 1
            model.neuron_mask[l] = 0
            model.neuron_mask[l, neurons.to(model.neuron_mask.device)] = 1
        model = compact(model)
    return model


def bench_model(ctx, preset: str, B: int) -> list[dict]:
    torch = ctx["torch"]
    from spikeinfer import cost

    T, N, dev = ctx["T"], ctx["seq_len"], ctx["device"]
    cfg = ctx["config"](preset)
    g = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (B, N), generator=g).to(dev)
    mask = torch.ones(B, N, dtype=torch.long, device=dev)
    types = torch.zeros(B, N, dtype=torch.long, device=dev)
    simulate = ctx["simulate"]
    rows = []
    triton_ms, acs_of = {}, {}
    for variant, keep in (("dense", None), ("pruned", ctx["keep"])):
        model = build_model(ctx, preset, keep)
        head_mask = torch.zeros(cfg.num_layers, cfg.num_heads)
        neuron_mask = torch.zeros(cfg.num_layers, cfg.intermediate_size)
        for l, block in enumerate(model.layers):
            head_mask[l, block.kept_heads.cpu()] = 1
            neuron_mask[l, block.kept_neurons.cpu()] = 1
        acs = cost.ac_count(cfg, head_mask, neuron_mask, T, N)
        outputs = {}

        def run_triton(model=model, outputs=outputs):
            outputs["triton"] = simulate(model, ids, mask, types, mode="unrolled", timesteps=T)

        def run_reference(m, name, outputs=outputs):
            def call():
                with torch.inference_mode():
                    outputs[name] = m(ids, mask, types, mode="unrolled", timesteps=T)

            return call

        variants = {
            "triton": run_triton,
            "torch": run_reference(copy.deepcopy(model).to_backend("torch"), "torch"),
        }
        bf16 = copy.deepcopy(model).to(torch.bfloat16).to_backend("torch")
        variants["torch-bf16"] = run_reference(bf16, "torch-bf16")
        if not ctx["skip_step"]:
            variants["torch-step-fp32"] = run_reference(
                copy.deepcopy(model).to_backend("torch-step"), "torch-step-fp32"
            )
        times = {}
        for backend, fn in variants.items():
            timer = ctx["timer"] if backend == "triton" else ctx["slow_timer"]
            times[backend], error = attempt(timer, fn)
            rows.append(
                ctx["row"](
                    "model/unrolled",
                    backend,
                    preset=preset,
                    variant=variant,
                    batch=B,
                    seq_len=N,
                    timesteps=T,
                    ms=times[backend],
                    error=error,
                    acs=acs,
                    sentences_per_s=None if times[backend] is None else B / times[backend] * 1e3,
                )
            )
        ours = triton_ms[variant] = times["triton"]
        acs_of[variant] = acs
        agreement = agreement_stats(torch, outputs)
        for row in rows[-len(variants) :]:
            row["speedup_vs_torch_step_fp32"] = ratio(times.get("torch-step-fp32"), ours)
            row["speedup_vs_torch_bf16"] = ratio(times.get("torch-bf16"), ours)
            row["speedup_vs_torch_fp32"] = ratio(times.get("torch"), ours)
            row.update(agreement)
        del model, bf16, variants, outputs
        if ctx["cuda"]:
            torch.cuda.empty_cache()
    # Pruning pays in time when dense/pruned wall time tracks dense/pruned ACs (DESIGN 13).
    for row in rows:
        row["dense_over_pruned_time"] = ratio(triton_ms["dense"], triton_ms["pruned"])
        row["dense_over_pruned_acs"] = acs_of["dense"] / acs_of["pruned"]
    return rows


def ratio(a, b):
    return a / b if a and b else None


def agreement_stats(torch, outputs: dict) -> dict:
    """Triton vs the fp32 references: fraction of neuron rates that differ (flips propagate in
    unrolled mode, so this is an upper bound on per-sublayer flips) and prediction agreement."""
    ours = outputs.get("triton")
    ref = outputs.get("torch-step-fp32") or outputs.get("torch")
    if ours is None or ref is None:
        return {}
    differing = [
        float((ours.rates[n] != ref.rates[n]).float().mean())
        for n in ref.rates
        if ref.rates[n].numel()
    ]
    same = (ours.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean()
    return {
        "max_rate_mismatch_fraction": max(differing, default=0.0),
        "prediction_agreement": float(same),
    }


# -- driver ---------------------------------------------------------------------------------------
def print_rows(rows: list[dict]):
    for r in rows:
        what = " ".join(str(r[k]) for k in ("preset", "variant", "sublayer") if r.get(k))
        if r["ms"] is None:
            print(f"{r['benchmark']:22s} {what:28s} {r['backend']:16s} skipped: {r['error']}")
            continue
        extra = []
        if r.get("tops") is not None:
            extra.append(f"{r['tops']:.1f} TOPS")
        if r.get("pct_int8_peak") is not None:
            extra.append(f"{r['pct_int8_peak']:.1f}% of int8 peak")
        if r.get("triton_speedup") and r["backend"] != "triton":
            extra.append(f"triton {r['triton_speedup']:.1f}x faster")
        if r.get("sentences_per_s"):
            extra.append(f"{r['sentences_per_s']:.0f} sent/s")
        if r["backend"] == "triton" and r.get("speedup_vs_torch_step_fp32"):
            extra.append(f"{r['speedup_vs_torch_step_fp32']:.1f}x vs torch-step fp32")
        if r["backend"] == "triton" and r.get("speedup_vs_torch_bf16"):
            extra.append(f"{r['speedup_vs_torch_bf16']:.1f}x vs torch bf16")
        if (
            r["backend"] == "triton"
            and r.get("variant") == "pruned"
            and r.get("dense_over_pruned_time")
        ):
            extra.append(
                f"dense/pruned time {r['dense_over_pruned_time']:.2f} "
                f"(ACs {r['dense_over_pruned_acs']:.2f})"
            )
        print(
            f"{r['benchmark']:22s} {what:28s} {r['backend']:16s} {r['ms']:10.2f} ms  "
            + ", ".join(extra)
        )


def write_rows(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else []
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(existing + rows, indent=1))
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "bench_triton.py needs a CUDA GPU: the Triton kernels are only timed on one "
            "(torch.cuda.is_available() is False). Use --smoke to check the script on CPU.",
            file=sys.stderr,
        )
        return 2
    kernels = import_kernels()
    ok, reason = kernels.is_available()
    if not ok:
        print(f"triton backend unavailable: {reason}", file=sys.stderr)
        return 2
    import torch.nn.functional as F

    from spikeinfer import ModelConfig
    from spikeinfer.kernels.attention import spiking_attention
    from spikeinfer.kernels.backend import simulate
    from spikeinfer.kernels.neuron_scan import if_scan
    from spikeinfer.kernels.spike_linear import spike_linear

    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET smoke test)"
    peak = peak_tops(device_name, args.peak_tops)
    commit, now = git_commit(), datetime.datetime.now(datetime.timezone.utc)
    date = now.strftime("%Y-%m-%d")

    def config(preset):
        if args.smoke:
            return ModelConfig.from_name("tiny")
        return ModelConfig.from_name(preset)

    def row(benchmark, backend, **fields):
        return {
            "benchmark": benchmark,
            "backend": backend,
            "device": device_name,
            "commit": commit,
            "date": now.isoformat(timespec="seconds"),
            **fields,
        }

    def throughput(ops, ms):
        if ms is None:
            return {"tops": None, "pct_int8_peak": None}
        tops = ops / ms / 1e9
        return {"tops": tops, "pct_int8_peak": None if peak is None else 100.0 * tops / peak}

    if args.smoke:
        presets, batches, T, seq_len = ["tiny"], [2], 3, 12
        warmup, repeats = 0, 1
    else:
        presets, batches, T, seq_len = args.presets, args.batch, args.timesteps, args.seq_len
        warmup, repeats = args.warmup, args.repeats
    ctx = {
        "torch": torch,
        "F": F,
        "device": device,
        "cuda": cuda,
        "T": T,
        "seq_len": seq_len,
        "timer": Timer(torch, warmup, repeats, cuda),
        # The per-step reference takes seconds per call: fewer repeats keep the run short.
        "slow_timer": Timer(torch, min(warmup, 1), min(repeats, 3), cuda),
        "row": row,
        "throughput": throughput,
        "config": config,
        "keep": args.keep_fraction,
        "skip_step": args.skip_torch_step,
        "spike_linear": spike_linear,
        "if_scan": if_scan,
        "spiking_attention": spiking_attention,
        "simulate": simulate,
    }
    print(
        f"device: {device_name}; int8 peak: {peak or 'unknown'} TOPS; commit {commit}; "
        f"T={T}, seq_len={seq_len}"
    )
    rows: list[dict] = []
    for preset in presets:
        ctx["preset"] = preset
        cfg = config(preset)
        for B in batches:
            new = []
            if args.only in (None, "kernels"):
                for name in PROJECTIONS:
                    new += bench_projection(ctx, cfg, name, B)
                new += bench_attention(ctx, cfg, B)
            if args.only in (None, "model"):
                new += bench_model(ctx, preset, B)
            print_rows(new)
            rows += new
    out = args.out or (None if args.smoke else RESULTS / f"triton_{date}.json")
    if out is not None:
        write_rows(out, rows)
        print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
