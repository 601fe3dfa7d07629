"""The ceiling of the binary GEMM's inner loop on this CPU, without memory traffic or epilogue.

The cpu backend's projection (csrc/kernels_avx512.cpp, `project_tile`) computes, for an R x C
tile of accumulators held in registers, 16 output columns per 512-bit vector:

    acc[r][c] += popcnt32(w+[c, k] & broadcast(s[r, k]))       512 binary MACs per AND/POPCNT/ADD

This script compiles that loop alone (weights and spikes in L1, K = 384 as in the default
student, no neuron scan, no stores), times it on one thread and in `--copies` processes at once
(the VM's cores may share a physical core's units), and times each instruction's throughput on
independent chains. The fused op's binary MACs/s in `bench_cpu.py` can be read against it: what
it does beyond this loop (the neuron scan, first touches of the spike rows, threading) costs the
difference. Needs g++ and an AVX-512 VPOPCNTDQ CPU.

    python bench/popcount_ceiling.py            # JSON in bench/results/popcount_ceiling_<date>.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch
from provenance import save_result

from spikeinfer.engine import device_name

SOURCE = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

// Throughput of one instruction on 12 independent chains (zmm operations per second).
template <int kOp>
__attribute__((noinline)) __m512i chains(long iters, __m512i a, __m512i b) {
#define DECL(i) __m512i x##i = _mm512_set1_epi32(i);
  R12(DECL)
  for (long it = 0; it < iters; ++it) {
#define OP(i)                                                         \
  if (kOp == 0) x##i = _mm512_popcnt_epi32(x##i);                     \
  if (kOp == 1) x##i = _mm512_and_si512(x##i, a);                     \
  if (kOp == 2) x##i = _mm512_add_epi32(x##i, a);                     \
  if (kOp == 3) x##i = _mm512_ternarylogic_epi32(x##i, a, b, 0x96);
    R12(OP)
#define KEEP(i) asm volatile("" : "+v"(x##i));
    R12(KEEP)
  }
  __m512i r = x0;
#define FOLD(i) r = _mm512_xor_si512(r, x##i);
  R12(FOLD)
  return r;
}

template <int R, int C>
__attribute__((noinline)) void tile(const uint32_t* w, const uint32_t* const* rows, int kw,
                                    __m512i* out) {
  __m512i acc[R][C];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int k = 0; k < kw; ++k) {
    __m512i wv[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_si512(w + (c * kw + k) * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i s = _mm512_set1_epi32(static_cast<int>(rows[r][k]));
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c)
        acc[r][c] = _mm512_add_epi32(acc[r][c], _mm512_popcnt_epi32(_mm512_and_si512(wv[c], s)));
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) out[r * C + c] = acc[r][c];
}

static double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <int R, int C>
static void run_tile(long iters) {
  const int kw = 12;  // K = 384
  static uint32_t w[16 * 12 * 16], x[16 * 16];
  for (int i = 0; i < 16 * 12 * 16; ++i) w[i] = i * 2654435761u;
  for (int i = 0; i < 16 * 16; ++i) x[i] = i * 40503u;
  const uint32_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = x + r * 16;
  __m512i out[R * C];
  for (long i = 0; i < iters / 10; ++i) tile<R, C>(w, rows, kw, out);  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
    tile<R, C>(w, rows, kw, out);
    asm volatile("" : : "r"(out) : "memory");
  }
  const double s = seconds_since(t0);
  printf("{\"kind\": \"tile\", \"R\": %d, \"C\": %d, \"binary_tmacs_per_s\": %.4f}\n", R, C,
         double(iters) * R * C * kw * 512 / s / 1e12);
}

template <int kOp>
static void run_chains(const char* name, long iters) {
  const __m512i a = _mm512_set1_epi32(0x5555), b = _mm512_set1_epi32(0x3333);
  chains<kOp>(iters / 10, a, b);
  const auto t0 = std::chrono::steady_clock::now();
  const __m512i r = chains<kOp>(iters, a, b);
  const double s = seconds_since(t0);
  printf("{\"kind\": \"instruction\", \"op\": \"%s\", \"g_zmm_ops_per_s\": %.3f, \"sink\": %d}\n",
         name, iters * 12.0 / s / 1e9, _mm512_reduce_add_epi32(r) & 1);
}

int main(int argc, char** argv) {
  const bool tiles_only = argc > 1;
  if (!tiles_only) {
    run_chains<0>("vpopcntd", 20000000);
    run_chains<1>("vpandd", 20000000);
    run_chains<2>("vpaddd", 20000000);
    run_chains<3>("vpternlogd", 20000000);
  }
  run_tile<4, 4>(2000000);  // the kernel's tile
  run_tile<2, 4>(4000000);
  run_tile<4, 2>(4000000);
  return 0;
}
"""


def require_cpu_flags(needed=("avx512f", "avx512bw", "avx512_vpopcntdq"), who="popcount_ceiling"):
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError as err:
        raise SystemExit(f"{who} reads the CPU's flags from /proc/cpuinfo (Linux only)") from err
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    missing = [f for f in needed if f not in flags]
    if missing:
        raise SystemExit(f"{who} times AVX-512 code; this CPU lacks {', '.join(missing)}")


def build(
    workdir: Path,
    source: str = SOURCE,
    isa_flags=("-mavx512f", "-mavx512bw", "-mavx512vpopcntdq"),
    needed=("avx512f", "avx512bw", "avx512_vpopcntdq"),
    who="popcount_ceiling",
) -> Path:
    """Compiles `source` (a C++ main) with g++ -O3 and the ISA flags, after checking that this
    CPU has the `needed` /proc/cpuinfo flags; returns the executable."""
    require_cpu_flags(needed, who)
    compiler = shutil.which("g++")
    if compiler is None:
        raise SystemExit(f"{who} needs g++ (Debian: apt install g++)")
    src, exe = workdir / f"{who}.cpp", workdir / who
    src.write_text(source)
    subprocess.run(
        [compiler, "-O3", *isa_flags, "-std=c++17", str(src), "-o", str(exe)], check=True
    )
    return exe


def parse(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def key(row: dict) -> str:
    return row["op"] if row["kind"] == "instruction" else f"tile {row['R']}x{row['C']}"


def value(row: dict) -> float:
    return row["g_zmm_ops_per_s"] if row["kind"] == "instruction" else row["binary_tmacs_per_s"]


def summary(rounds: list[dict[str, float]]) -> dict:
    """Best (the least disturbed round: a ceiling) and median per measurement over rounds."""
    return {
        k: {
            "best": round(max(r[k] for r in rounds), 4),
            "median": round(statistics.median(r[k] for r in rounds), 4),
        }
        for k in rounds[0]
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=2, help="processes timed at once (default 2)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each measurement (default 5)")
    ap.add_argument("--out", help="JSON file (default bench/results/popcount_ceiling_<date>.json)")
    args = ap.parse_args()
    alone, together = [], []
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        for _ in range(args.rounds):
            run = subprocess.run([str(exe)], check=True, capture_output=True, text=True)
            alone.append({key(r): value(r) for r in parse(run.stdout)})
            procs = [
                subprocess.Popen([str(exe), "tiles"], stdout=subprocess.PIPE, text=True)
                for _ in range(args.copies)
            ]
            summed: dict[str, float] = {}
            for p in procs:
                for r in parse(p.communicate()[0]):
                    summed[key(r)] = summed.get(key(r), 0.0) + value(r)
            together.append(summed)
    record = {
        "device": device_name(torch.device("cpu")),
        "units": "instructions: G zmm operations/s; tiles: T binary MACs/s",
        "one_process": summary(alone),
        "copies": args.copies,
        "copies_summed": summary(together),
    }
    print(json.dumps(record, indent=1))
    save_result(record, args.out, "popcount_ceiling")


if __name__ == "__main__":
    main()
