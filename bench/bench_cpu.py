"""Benchmark the `cpu` backend (C++ popcount kernels) against the torch references on this CPU.

Measured side by side in one run (DESIGN section 13):

    gemm    the binary GEMM in binary MACs/s: `spike_linear_neuron` (fused GEMM + IF scan, packed
            spikes out, the form the model runs) on all threads and on one, `binary_gemm` (float
            currents out, bound by writing them), the same unfused (`binary_gemm` then
            `neuron_scan`, to measure what fusion saves), against MKL fp32 `torch.matmul`, bf16
            `torch.matmul` and `torch._int_mm` (int8) at the same shapes: the default student's
            projections (hidden 384, FFN 1536) and spikingbert-base's (768 / 3072).
    attn    the A sublayer: the cpu op's masked sums against fp32 and bf16 matmul attention.
    model   whole-model inference (unrolled) on `minilm-4l` with random weights scaled to fire, seq
            64: cpu vs torch-step fp32 (the per-step reference; the two in alternation, the
            speed-up the median of the rounds' ratios), torch fp32 (multi-step) and torch bf16
            (multi-step); dense vs pruned (half the heads and 40 % of the FFN neurons kept,
            compacted), with the time ratio set against the AC ratio (cost.ac_count).
    sst2    what `spikeinfer eval` does: every bundled SST-2 model (dense, two-stage pruned,
            adaptive threshold, each in its own mode) on the whole dev set with the cpu backend,
            their time ratios against their ACs % ratios, and the dense model on the first
            sentences of the dev set with cpu and the torch references (the speed-ups).

Every figure is the median of repeats after a warm-up; models whose times are compared with each
other (dense against pruned) run in alternation. The CPU may be shared with other work: each row
records the load average seen before it was measured. Rows go to
bench/results/cpu_<date>.json (appended to an existing file of that day).

    python bench/bench_cpu.py            # full run (several minutes: torch-step is slow)
    python bench/bench_cpu.py --quick    # small shapes, T = 8: a minute or two
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from provenance import cpu_host  # noqa: E402

from spikeinfer import cpu_backend as cb  # noqa: E402
from spikeinfer.config import ModelConfig  # noqa: E402
from spikeinfer.engine import device_name  # noqa: E402
from spikeinfer.model import SpikingBert, compact  # noqa: E402
from spikeinfer.quant import binarize  # noqa: E402


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return out.stdout.strip() or "uncommitted"
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# A call this long is its own warm-up and needs no repeats to be steady: the bf16 and int8
# references on CPUs without AVX512-BF16 / VNNI run emulated, a thousand times slower than the
# kernels (seconds to minutes a call), and repeating them would take the run hours.
SLOW_CALL_S = 1.0
# --skip-bf16: leave out every bf16 torch reference (set by main).
SKIP_BF16 = False


def warm_up(fn, calls: int = 3) -> float:
    """Call `fn` at least `calls` times and for 0.2 s: the first op of a process also starts the
    thread pool and faults in its buffers (one warm-up call left the first GEMM of a run a third
    slow). A first call of SLOW_CALL_S or more is the only one. Returns the first call's
    seconds."""
    done, start = 0, time.perf_counter()
    first = None
    while done < calls or time.perf_counter() - start < 0.2:
        fn()
        done += 1
        if first is None:
            first = time.perf_counter() - start
            if first >= SLOW_CALL_S:
                break
    return first


def times_ms(fn, repeats: int, warmup=None) -> list[float]:
    """Wall times (ms) of `repeats` calls after `warm_up` (of `warmup` if given); one timed call
    when the warm-up call took SLOW_CALL_S or more."""
    if warm_up(warmup or fn) >= SLOW_CALL_S:
        repeats = 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def median_ms(fn, repeats: int, warmup=None) -> float:
    return statistics.median(times_ms(fn, repeats, warmup))


def interleaved_ms(
    fns: dict, repeats: int, warmup_calls: int = 3, warmups: dict | None = None
) -> dict[str, list[float]]:
    """Wall times (ms) of `repeats` rounds in which every function runs once, the order rotated
    each round, after each function's `warm_up` (`warmup_calls` calls of its entry in `warmups`,
    by default of itself). A ratio of two models' times is only as good as their conditions are
    alike: this VM's speed drifts by tens of percent over minutes (two runs of
    bench/op_profile.py, a model at a time, minutes apart, put the same models' time-over-AC
    ratio at 1.31 and 1.12), so models compared with each other are timed in alternation."""
    for label, fn in fns.items():
        warm_up((warmups or {}).get(label, fn), warmup_calls)
    labels = list(fns)
    times = {label: [] for label in labels}
    for r in range(repeats):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            start = time.perf_counter()
            fns[label]()
            times[label].append(1e3 * (time.perf_counter() - start))
    return times


class Report:
    def __init__(self):
        self.rows: list[dict] = []
        self.base = {
            "device": device_name(torch.device("cpu")),
            "commit": commit(),
            "date": datetime.date.today().isoformat(),
            "threads": torch.get_num_threads(),
            "kernel_path": cb.isa(),
            "host": cpu_host(),
        }

    def add(self, **row):
        full = {**self.base, **row}
        self.rows.append(full)
        shown = {k: v for k, v in row.items() if k not in ("shapes",)}
        print(json.dumps(shown), flush=True)


# -- binary GEMM --------------------------------------------------------------------------------
def bench_gemm(
    report: Report, preset: str, T: int, B: int, S: int, repeats: int, slow_repeats: int
):
    cfg = ModelConfig.from_name(preset)
    for name, K, N in (
        ("hidden", cfg.hidden_size, cfg.hidden_size),
        ("ffn_up", cfg.hidden_size, cfg.intermediate_size),
        ("ffn_down", cfg.intermediate_size, cfg.hidden_size),
    ):
        shapes = {
            "preset": preset,
            "projection": name,
            "M": T * B * S,
            "K": K,
            "N": N,
            "T": T,
            "batch": B,
            "seq_len": S,
        }
        gemm_case(report, shapes, repeats, slow_repeats)


def gemm_case(report: Report, shapes: dict, repeats: int, slow_repeats: int):
    """The fused op (milliseconds) over `repeats`; the rest (ten times slower and more, so
    steadier) over `slow_repeats`."""
    T, M, K, N = shapes["T"], shapes["M"], shapes["K"], shapes["N"]
    macs = M * K * N
    gen = torch.Generator().manual_seed(0)
    spikes = (torch.rand(M, K, generator=gen) < 0.25).float()
    signs, alpha = binarize(torch.randn(N, K, generator=gen))
    bias = torch.randn(N, generator=gen)
    packed, packed_w = cb.pack_spikes(spikes), cb.pack_signs(signs)
    packed_t = packed.view(T, M // T, -1)

    def row(backend, ms, **extra):
        report.add(
            benchmark="binary_gemm",
            backend=backend,
            shapes=shapes,
            ms=round(ms, 3),
            binary_tmacs_per_s=round(macs / ms / 1e9, 4),
            load_avg=load_average(),
            **shapes,
            **extra,
        )

    def fused():
        return cb.spike_linear_neuron(packed_t, packed_w, K, alpha, bias)

    # The median is the figure; the fastest call rides along because this VM's speed drifts by
    # a fifth within minutes, and the fastest call shows the kernel when the host is quiet.
    fused_ms = times_ms(fused, repeats)
    row(
        "cpu spike_linear_neuron (fused GEMM + IF, packed out)",
        statistics.median(fused_ms),
        fastest_binary_tmacs_per_s=round(macs / min(fused_ms) / 1e9, 4),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ms1 = median_ms(fused, repeats)
    torch.set_num_threads(threads)
    row("cpu spike_linear_neuron, 1 thread", ms1, threads=1)
    row(
        "cpu binary_gemm (float32 out)",
        median_ms(lambda: cb.binary_gemm(packed, packed_w, K, alpha, bias), slow_repeats),
    )

    def unfused():  # what fusing the IF scan into the GEMM saves
        current = cb.binary_gemm(packed_t, packed_w, K, alpha, bias)
        return cb.neuron_scan(current, 1.0)

    row("cpu binary_gemm + neuron_scan (unfused)", median_ms(unfused, slow_repeats))
    # References at the same shapes: fp32 / bf16 matmul of spikes by +-1 weights, int8 matmul.
    w32 = signs.t().contiguous()
    row("torch fp32 matmul (MKL)", median_ms(lambda: torch.matmul(spikes, w32), slow_repeats))
    if not SKIP_BF16:
        s16, w16 = spikes.bfloat16(), w32.bfloat16()
        row("torch bf16 matmul", median_ms(lambda: torch.matmul(s16, w16), slow_repeats))
    s8, w8 = spikes.to(torch.int8), w32.to(torch.int8)
    try:
        row("torch._int_mm int8", median_ms(lambda: torch._int_mm(s8, w8), slow_repeats))
    except RuntimeError as err:
        print(f"torch._int_mm unavailable: {err}", file=sys.stderr)


# -- spiking attention --------------------------------------------------------------------------
def bench_attention(report: Report, preset: str, T: int, B: int, S: int, repeats: int):
    """The A sublayer of one block (Q projection, attention over spiking K and V, A neuron scan):
    the cpu op's masked sums over set bits against the same maths as dense fp32 and bf16 matmuls
    (oneDNN uses AVX512-BF16 here), the alternative the design leaves open."""
    from spikeinfer import ops
    from spikeinfer.neuron import if_multistep

    cfg = ModelConfig.from_name(preset)
    K, H = cfg.hidden_size, cfg.num_heads
    d = K // H
    shapes = {"preset": preset, "T": T, "batch": B, "seq_len": S, "heads": H, "head_dim": d}
    gen = torch.Generator().manual_seed(0)
    x, k, v = ((torch.rand(T, B, S, K, generator=gen) < 0.25).float() for _ in range(3))
    signs, alpha = binarize(torch.randn(K, K, generator=gen))
    bias = torch.randn(K, generator=gen) * 0.1
    mask_add = torch.zeros(B, S)
    px, pk, pv, pw = cb.pack_spikes(x), cb.pack_spikes(k), cb.pack_spikes(v), cb.pack_signs(signs)

    def fused():
        return cb.spiking_attention_neuron(px, pw, K, alpha, bias, pk, pv, mask_add, H)

    def dense(dtype):
        xs, ks, vs = x.to(dtype), k.to(dtype), v.to(dtype)
        w, a, b = signs.to(dtype), alpha.to(dtype), bias.to(dtype)
        m = ops.attention_mask_additive(torch.ones(B, S), dtype)[None]  # [1, B, 1, 1, S]

        def run():
            q = ops.spike_linear(xs, w, a, b)  # [T, B, S, K]
            heads = [t.view(T, B, S, H, d).transpose(2, 3) for t in (q, ks, vs)]  # [T, B, H, S, d]
            current = ops.spiking_attention(*heads, m).transpose(2, 3).reshape(T, B, S, K)
            return if_multistep(current.float())

        return run

    cases = [
        ("cpu spiking_attention_neuron (masked sums)", fused),
        ("torch fp32 matmuls + IF", dense(torch.float32)),
    ]
    if not SKIP_BF16:
        cases.append(("torch bf16 matmuls + IF", dense(torch.bfloat16)))
    for label, fn in cases:
        load = load_average()
        ms = median_ms(fn, repeats)
        report.add(
            benchmark="attention",
            backend=label,
            shapes=shapes,
            ms=round(ms, 3),
            load_avg=load,
            **shapes,
        )


# -- whole model --------------------------------------------------------------------------------
def firing_model(preset: str, seed: int = 0) -> SpikingBert:
    """Random 1-bit weights scaled so neurons fire: weights N(0, 1), biases N(0.3, 0.3)."""
    torch.manual_seed(seed)
    model = SpikingBert(ModelConfig.from_name(preset)).eval()
    with torch.no_grad():
        for block in model.layers:
            for p in block.projections():
                p.weight.normal_(0, 1.0)
                p.bias.normal_(0.3, 0.3)
    return model.freeze_binary()


def pruned(model: SpikingBert, heads_kept: float, neurons_kept: float, seed: int = 0):
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    m.head_mask.zero_()
    m.neuron_mask.zero_()
    for l in range(cfg.num_layers):
        h = torch.randperm(cfg.num_heads, generator=gen)[: round(heads_kept * cfg.num_heads)]
        n = torch.randperm(cfg.intermediate_size, generator=gen)[
            : round(neurons_kept * cfg.intermediate_size)
        ]
        m.head_mask[l, h] = 1
        m.neuron_mask[l, n] = 1
    return compact(m), m.head_mask.clone(), m.neuron_mask.clone()


def ac_count(cfg, head_mask, neuron_mask, T, seq_len):
    from spikeinfer import cost

    return cost.ac_count(cfg, head_mask, neuron_mask, T, seq_len)


def bench_model(
    report: Report,
    preset: str,
    B: int,
    S: int,
    T: int,
    repeats: int,
    reference_rounds: int,
    heads_kept: float,
    neurons_kept: float,
    references: bool = True,
):
    model = firing_model(preset)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    am = torch.ones(B, S, dtype=torch.long)
    shapes = {"preset": preset, "batch": B, "seq_len": S, "T": T, "mode": "unrolled"}

    outputs = {}

    def run(m, backend, steps=T, label=None):
        m.to_backend(backend)
        with torch.inference_mode():
            out = m(ids, am, timesteps=steps)
        if label is not None:
            outputs[label] = out
        return out

    results = {}
    step_rounds = None

    def measure(label, m, backend, reps, **extra):
        load = load_average()
        # The slow references warm up on one step; the timed runs keep their outputs.
        ms = median_ms(
            lambda: run(m, backend, label=label), reps, warmup=lambda: run(m, backend, steps=1)
        )
        results[label] = ms
        report.add(
            benchmark="model",
            backend=label,
            shapes=shapes,
            ms=round(ms, 1),
            sentences_per_s=round(B / ms * 1e3, 3),
            repeats=reps,
            load_avg=load,
            **shapes,
            **extra,
        )
        return ms

    measure("cpu", model, "cpu", repeats)
    if references:
        measure("torch fp32", model, "torch", max(1, repeats // 2))
        try:  # the multi-step reference with the whole model in bf16 (as bench_triton.py)
            if not SKIP_BF16:
                measure(
                    "torch bf16",
                    copy.deepcopy(model).to(torch.bfloat16),
                    "torch",
                    max(1, repeats // 2),
                )
        except RuntimeError as err:
            print(f"torch bf16 reference unavailable: {err}", file=sys.stderr)
        # The per-step reference is the speed-up target's denominator: it runs in alternation
        # with cpu (`reference_rounds` rounds, each call after the other's), and the speed-up is
        # the median of the rounds' ratios, so the VM's drift over the reference's seconds-long
        # calls does not enter it.
        load = load_average()
        times = interleaved_ms(
            {
                "cpu": lambda: run(model, "cpu"),
                "torch-step fp32": lambda: run(model, "torch-step", label="torch-step fp32"),
            },
            reference_rounds,
            warmup_calls=1,
            warmups={"torch-step fp32": lambda: run(model, "torch-step", steps=1)},
        )
        step_ms = statistics.median(times["torch-step fp32"])
        results["torch-step fp32"] = step_ms
        step_rounds = [
            round(s / c, 2) for s, c in zip(times["torch-step fp32"], times["cpu"], strict=True)
        ]
        report.add(
            benchmark="model",
            backend="torch-step fp32",
            shapes=shapes,
            ms=round(step_ms, 1),
            sentences_per_s=round(B / step_ms * 1e3, 3),
            repeats=reference_rounds,
            load_avg=load,
            interleaved=True,
            cpu_ms_interleaved=[round(c, 1) for c in times["cpu"]],
            **shapes,
        )
    cpu_out = outputs["cpu"]
    ref_out = outputs.get("torch fp32")
    agree = rates_equal = None
    if ref_out is not None:
        agree = float((ref_out.logits.argmax(-1) == cpu_out.logits.argmax(-1)).float().mean())
        rates_equal = sum(torch.equal(ref_out.rates[k], cpu_out.rates[k]) for k in ref_out.rates)
        rates_equal = f"{rates_equal}/{len(ref_out.rates)}"
    asr = round(sum(cpu_out.asr.values()) / len(cpu_out.asr), 4)

    small, hm, nm = pruned(model, heads_kept, neurons_kept)
    acs_dense = ac_count(cfg, None, None, T, S)
    acs_pruned = ac_count(cfg, hm, nm, T, S)
    dense_over_pruned_acs = acs_dense / acs_pruned
    # Dense and pruned in alternation, on all threads and on one: with other work on the
    # machine, a preempted worker stalls every parallel op for a fixed time, which distorts the
    # ratio of a smaller model more.
    threads = torch.get_num_threads()
    pairs = {}
    for n_threads, dense_label, pruned_label in (
        (threads, "cpu, interleaved with pruned", "cpu pruned"),
        (1, "cpu, 1 thread", "cpu pruned, 1 thread"),
    ):
        torch.set_num_threads(n_threads)
        load = load_average()
        times = interleaved_ms(
            {dense_label: lambda: run(model, "cpu"), pruned_label: lambda: run(small, "cpu")},
            repeats,
        )
        dense_ms, pruned_ms = (statistics.median(t) for t in times.values())
        pairs[n_threads] = dense_ms / pruned_ms
        for label, ms in zip(times, (dense_ms, pruned_ms), strict=True):
            extra = (
                {"heads_kept": heads_kept, "neurons_kept": neurons_kept}
                if label == pruned_label
                else {}
            )
            report.add(
                benchmark="model",
                backend=label,
                shapes={**shapes, **extra},
                ms=round(ms, 1),
                sentences_per_s=round(B / ms * 1e3, 3),
                repeats=repeats,
                load_avg=load,
                threads=n_threads,
                interleaved=True,
                **shapes,
                **extra,
            )
    torch.set_num_threads(threads)

    def speedup(label):
        return round(results[label] / results["cpu"], 2) if label in results else None

    summary = {
        "sentences_per_s": round(B / results["cpu"] * 1e3, 3),
        "speedup_vs_torch_step_fp32": statistics.median(step_rounds) if step_rounds else None,
        "speedup_vs_torch_step_fp32_rounds": step_rounds,
        "speedup_vs_torch_fp32": speedup("torch fp32"),
        "speedup_vs_torch_bf16": speedup("torch bf16"),
        "dense_over_pruned_time": round(pairs[threads], 3),
        "dense_over_pruned_acs": round(dense_over_pruned_acs, 3),
        "pruned_time_over_ac_ratio": round(dense_over_pruned_acs / pairs[threads], 3),
        "dense_over_pruned_time_1thread": round(pairs[1], 3),
        "pruned_time_over_ac_ratio_1thread": round(dense_over_pruned_acs / pairs[1], 3),
        "prediction_agreement_vs_torch": agree,
        "sublayers_with_identical_rates": rates_equal,
        "mean_asr": asr,
    }
    report.add(
        benchmark="model_summary",
        backend="cpu",
        shapes=shapes,
        ms=round(results["cpu"], 1),
        **shapes,
        **summary,
    )


# -- SST-2 dev with the bundled models ----------------------------------------------------------
def bench_sst2(report: Report, glue_dir: Path, ref_limit: int, references: bool = True):
    """What `spikeinfer eval` does, timed: every bundled SST-2 model on the whole dev set with the
    cpu backend (each in its own mode), and the dense model on the first `ref_limit` dev
    sentences with cpu and the torch references (the references take minutes per hundred).

    A cpu evaluation takes seconds: it is timed as the median of 3 runs after a warm-up run on
    the same sentences (the first run of a batch shape faults in its buffers). A reference run
    takes minutes: the torch fp32 and bf16 references one run after a one-sentence warm-up; the
    per-step reference, the speed-up target's denominator, 3 runs in alternation with cpu's, the
    speed-up the median of the three pairs' ratios."""
    from spikeinfer.engine import bundled_models, evaluate, load, models_dir

    def reference_run(model, backend):
        """One run on the subset after a one-sentence warm-up, and the load before it."""
        kw = dict(glue_dir=glue_dir, backend=backend, progress=False)
        evaluate(model, "sst2", limit=1, **kw)
        load_before = load_average()
        return evaluate(model, "sst2", limit=ref_limit, **kw), load_before

    names = [
        n
        for n in ("sst2-1bit", "sst2-1bit-pruned", "sst2-1bit-adaptive")
        if (models_dir() / n / "config.json").exists()
    ]
    if "sst2-1bit" not in names:
        print("no bundled sst2-1bit model: skipping the SST-2 dev benchmark", file=sys.stderr)
        return
    # The dense model also runs in the pruned models' mode: sequential mode draws every
    # sublayer's input spikes (Bernoulli, not counted in ACs), so pruned-vs-dense within one
    # mode separates the kernels' scaling from the cost of the mode. The models are compared
    # with each other, so they run in alternation (`interleaved_ms`): a warm-up pass each, then
    # `rounds` rounds of every model, the median run of each kept.
    rounds = 3
    runs = {name: (load(name), None) for name in names}
    runs["sst2-1bit sequential"] = (runs["sst2-1bit"][0], "sequential")
    results = {label: [] for label in runs}

    def evaluation(label):
        model, mode = runs[label]
        kw = dict(glue_dir=glue_dir, backend="cpu", mode=mode, progress=False)
        return lambda: results[label].append(evaluate(model, "sst2", **kw))

    load_before = load_average()
    interleaved_ms({label: evaluation(label) for label in runs}, repeats=rounds, warmup_calls=1)
    results = {label: timed[-rounds:] for label, timed in results.items()}  # without the warm-up
    full = {}
    for label, (_, mode) in runs.items():
        timed_runs = results[label]
        r = full[label] = sorted(timed_runs, key=lambda run: run["wall_s"])[rounds // 2]
        report.add(
            benchmark="sst2_dev",
            backend="cpu",
            model=label.split()[0],
            mode=r["mode"],
            n_examples=r["n_examples"],
            ms=round(1e3 * r["wall_s"], 1),
            ms_runs=[round(1e3 * t["wall_s"], 1) for t in timed_runs],
            sentences_per_s=round(r["sentences_per_s"], 2),
            accuracy=round(r["accuracy"], 2),
            acs_percent=round(r["acs_percent"], 2),
            latency=round(r["latency"], 2),
            load_avg=load_before,
            interleaved=True,
            default_for_eval=mode is None and bundled_models().get("sst2") == label,
        )
    dense, dense_seq = full["sst2-1bit"], full["sst2-1bit sequential"]
    subset = {}
    step_rounds = None
    if references:
        model = load("sst2-1bit")

        def add_subset_row(label, r, load_before, **extra):
            subset[label] = r
            report.add(
                benchmark="sst2_dev_subset",
                backend=label,
                model="sst2-1bit",
                mode=r["mode"],
                n_examples=r["n_examples"],
                ms=round(1e3 * r["wall_s"], 1),
                sentences_per_s=round(r["sentences_per_s"], 3),
                accuracy=round(r["accuracy"], 2),
                load_avg=load_before,
                **extra,
            )

        references_run = [("torch fp32", model, "torch")]
        if not SKIP_BF16:
            references_run.append(("torch bf16", copy.deepcopy(model).to(torch.bfloat16), "torch"))
        for label, m, backend in references_run:
            add_subset_row(label, *reference_run(m, backend))
        # cpu and the per-step reference (the speed-up target's denominator) in alternation,
        # `rounds` rounds, the speed-up the median of the rounds' ratios (see bench_model).
        paired = {"cpu": [], "torch-step fp32": []}

        def subset_run(label, backend, limit=ref_limit):
            kw = dict(glue_dir=glue_dir, backend=backend, limit=limit, progress=False)
            return lambda: paired[label].append(evaluate(model, "sst2", **kw))

        load_before = load_average()
        interleaved_ms(
            {
                "cpu": subset_run("cpu", "cpu"),
                "torch-step fp32": subset_run("torch-step fp32", "torch-step"),
            },
            repeats=rounds,
            warmup_calls=1,
            warmups={"torch-step fp32": subset_run("torch-step fp32", "torch-step", limit=1)},
        )
        # Both warm-ups appended a run first: keep the timed rounds.
        paired = {label: timed_runs[-rounds:] for label, timed_runs in paired.items()}
        step_rounds = [
            round(s["wall_s"] / c["wall_s"], 2)
            for s, c in zip(paired["torch-step fp32"], paired["cpu"], strict=True)
        ]
        for label, runs_of in paired.items():
            median_run = sorted(runs_of, key=lambda run: run["wall_s"])[rounds // 2]
            add_subset_row(
                label,
                median_run,
                load_before,
                ms_runs=[round(1e3 * r["wall_s"], 1) for r in runs_of],
                interleaved=True,
            )

    def speedup(label):
        if label not in subset:
            return None
        return round(subset["cpu"]["sentences_per_s"] / subset[label]["sentences_per_s"], 2)

    summary = {
        "sentences_per_s": round(dense["sentences_per_s"], 2),
        "speedup_vs_torch_step_fp32": statistics.median(step_rounds) if step_rounds else None,
        "speedup_vs_torch_step_fp32_rounds": step_rounds,
        "speedup_vs_torch_fp32": speedup("torch fp32"),
        "speedup_vs_torch_bf16": speedup("torch bf16"),
        "reference_subset": ref_limit if references else None,
    }
    for name in names[1:]:  # a pruned model against the dense one, both on the whole dev set
        key = name.removeprefix("sst2-1bit-")
        acs_ratio = dense["acs_percent"] / full[name]["acs_percent"]
        summary[f"dense_over_{key}_acs"] = round(acs_ratio, 3)
        for suffix, base in (("", dense), ("_same_mode", dense_seq)):
            time_ratio = full[name]["sentences_per_s"] / base["sentences_per_s"]
            summary[f"dense_over_{key}_time{suffix}"] = round(time_ratio, 3)
            summary[f"{key}_time_over_ac_ratio{suffix}"] = round(acs_ratio / time_ratio, 3)
        # The same-mode ratio of each round alone (the two runs of a round ran back to back).
        summary[f"{key}_time_over_ac_ratio_same_mode_rounds"] = [
            round(acs_ratio * p["wall_s"] / d["wall_s"], 3)
            for d, p in zip(results["sst2-1bit sequential"], results[name], strict=True)
        ]
    report.add(
        benchmark="sst2_dev_summary",
        backend="cpu",
        model="sst2-1bit",
        ms=round(1e3 * dense["wall_s"], 1),
        **summary,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and T, few repeats")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file (default: bench/results/cpu_<date>.json, appended)",
    )
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument(
        "--skip-bf16",
        action="store_true",
        help="leave out the bf16 torch references: on CPUs without AVX512-BF16 torch emulates "
        "bf16 matmuls (its GEMM row, timed without this flag, shows the rate) and the whole-model "
        "bf16 references would take hours",
    )
    parser.add_argument(
        "--gemm-presets",
        nargs="+",
        default=["minilm-4l", "spikingbert-base"],
        help="model presets whose projection shapes the GEMM rows time",
    )
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument(
        "--skip-references",
        action="store_true",
        help="whole model: time only the cpu backend (dense and pruned)",
    )
    parser.add_argument(
        "--timesteps",
        type=int,
        nargs="+",
        default=None,
        help="whole-model T values (default 32; --quick: 8)",
    )
    parser.add_argument(
        "--skip-sst2", action="store_true", help="skip the bundled models on the SST-2 dev set"
    )
    parser.add_argument(
        "--glue-dir",
        type=Path,
        default=Path(
            os.environ.get("SPIKEINFER_GLUE_DIR") or ROOT.parent / "shared" / "data" / "glue"
        ),
    )
    parser.add_argument(
        "--reference-limit",
        type=int,
        default=None,
        help="SST-2 dev sentences the torch references run on (default 256; --quick: 16)",
    )
    args = parser.parse_args(argv)

    global SKIP_BF16
    SKIP_BF16 = args.skip_bf16
    ok, why = cb.is_available()
    if not ok:
        raise SystemExit(why)
    report = Report()
    print(
        f"# {report.base['device']}, {report.base['threads']} threads, kernels "
        f"{report.base['kernel_path']}, load average {load_average():.2f}",
        flush=True,
    )
    if args.quick:
        gemm_shapes, repeats, model_b, reference_rounds = (8, 8, 64), 3, 8, 3
        timesteps = args.timesteps or [8]
    else:
        gemm_shapes, repeats, model_b, reference_rounds = (32, 16, 64), 5, 32, 3
        timesteps = args.timesteps or [32]
    if not args.skip_gemm:
        # Each GEMM call takes milliseconds: many repeats make its median robust to the moments
        # when another process holds one of the two cores.
        for preset in args.gemm_presets:
            bench_gemm(report, preset, *gemm_shapes, repeats=8 * repeats, slow_repeats=repeats)
        bench_attention(report, "minilm-4l", *gemm_shapes, repeats=2 * repeats)
    if not args.skip_model:
        for T in timesteps:
            bench_model(
                report,
                "minilm-4l",
                model_b,
                64,
                T,
                repeats,
                reference_rounds,
                heads_kept=0.5,
                neurons_kept=0.4,
                references=not args.skip_references,
            )

    if not args.skip_sst2:
        ref_limit = args.reference_limit or (16 if args.quick else 256)
        bench_sst2(report, args.glue_dir, ref_limit, references=not args.skip_references)

    out = args.out or ROOT / "bench" / "results" / f"cpu_{report.base['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(rows + report.rows, indent=1) + "\n")
    print(f"# wrote {len(report.rows)} rows to {out}")


if __name__ == "__main__":
    main()
