"""Attention's products with a spiking operand: masked sums against AVX512-BF16 dot products.

Both of attention's products have one real and one binary operand (DESIGN section 1):

    scores  Y[i, j] = sum_c Q[i, c] K[j, c]     real Q [S, d], spikes K [S, d]
    P.V     Y[i, c] = sum_j P[i, j] V[j, c]     real P [S, S], spikes V [S, d]

that is Y = X B with X real [S, M] and B binary [M, N]. The cpu backend
(csrc/kernels_avx512.cpp, `attend_chunk`) computes them as masked sums, queries in the vector
lanes: for each output column n, the rows of X^T at the set bits of B[:, n] are added (one
VADDPS per set bit and 16 queries). Issue 6 asks whether VNNI or bf16 is faster. VDPBF16PS
multiplies pairs of bf16 values and adds both products to a float32 lane; with the columns n in
the lanes, each instruction covers 16 outputs and two of the M terms. A bf16 holds 8 of a
float's 24 significant bits, so X is split into three bf16 parts (X = hi + mid + lo exactly)
to keep the sums within float rounding of the reference, which DESIGN section 10's spike
agreement needs; one part alone is timed as the best case bf16 could offer, at the precision it
would cost. VNNI (int8) would quantize Q and P outright and is not timed.

This script compiles the three loops for one head and one step (data in L1, d = 32, the
binary operand 45 % ones as a trained model's K and V), times them on one thread at S = 27 (a
typical SST-2 batch after length bucketing) and S = 64, and reports nanoseconds per product and
the largest error against a float64 sum. Needs g++ and an AVX-512 BF16 CPU.

    python bench/attention_bf16.py      # JSON in bench/results/attention_bf16_<date>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch
from popcount_ceiling import build, parse
from provenance import save_result

from spikeinfer.engine import device_name

SOURCE = r"""
#include <immintrin.h>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

constexpr int kD = 32;

// Y = X B for X real [S, M] and B binary [M, N], S <= 64, M <= 64, N <= 64.
template <int S, int M, int N>
struct Product {
  static constexpr int Sp = (S + 15) / 16 * 16, Np = (N + 15) / 16 * 16;
  alignas(64) float x[S][M];
  alignas(64) float xT[M][Sp];           // masked sums: X transposed, queries in lanes
  uint64_t b_col[N];                     // masked sums: column n's bits over m
  alignas(64) float y_sums[N][Sp];
  static constexpr int kPairs = (M + 1) / 2;  // an odd M pads the last pair with a zero term
  alignas(64) uint32_t b_pairs[kPairs][Np];    // bf16: (B[2p, n], B[2p+1, n]) in lane n
  alignas(64) uint32_t x_parts[3][S][kPairs];
  alignas(64) float y_bf16[S][Np];

  static uint16_t bf16_bits(float f) {  // truncation: f - bf16(f) is exact, so the parts sum to f
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>(u >> 16);
  }
  static float from_bf16(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }

  explicit Product(unsigned seed) {
    std::srand(seed);
    for (int i = 0; i < S; ++i)
      for (int m = 0; m < M; ++m) x[i][m] = (std::rand() / float(RAND_MAX) - 0.5f) * 6.0f;
    bool bit[2 * kPairs][N] = {};
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) bit[m][n] = std::rand() % 100 < 45;
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < Sp; ++i) xT[m][i] = i < S ? x[i][m] : 0.0f;
    for (int n = 0; n < N; ++n) {
      b_col[n] = 0;
      for (int m = 0; m < M; ++m) b_col[n] |= uint64_t(bit[m][n]) << m;
    }
    const uint32_t one = bf16_bits(1.0f);
    for (int p = 0; p < kPairs; ++p)
      for (int n = 0; n < Np; ++n)
        b_pairs[p][n] = n < N ? (bit[2 * p][n] ? one : 0) | (bit[2 * p + 1][n] ? one : 0) << 16 : 0;
    std::memset(x_parts, 0, sizeof x_parts);
    for (int i = 0; i < S; ++i)
      for (int m = 0; m < M; ++m) {
        float rest = x[i][m];
        for (int part = 0; part < 3; ++part) {
          const uint16_t h = bf16_bits(rest);
          rest -= from_bf16(h);
          uint32_t& w = x_parts[part][i][m / 2];
          w |= m % 2 == 0 ? uint32_t(h) : uint32_t(h) << 16;
        }
      }
  }

  __attribute__((noinline)) void masked_sums() {
    for (int n = 0; n < N; ++n) {
      __m512 acc[Sp / 16];
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (uint64_t bits = b_col[n]; bits != 0; bits = _blsr_u64(bits)) {
        const float* row = xT[_tzcnt_u64(bits)];
        for (int q = 0; q < Sp / 16; ++q)
          acc[q] = _mm512_add_ps(acc[q], _mm512_load_ps(row + q * 16));
      }
      for (int q = 0; q < Sp / 16; ++q) _mm512_store_ps(y_sums[n] + q * 16, acc[q]);
    }
  }

  template <int kParts>
  __attribute__((noinline)) void bf16_dots() {
    for (int i = 0; i < S; ++i) {
      __m512 acc[Np / 16];
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (int part = 0; part < kParts; ++part)
        for (int p = 0; p < kPairs; ++p) {
          const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x_parts[part][i][p]));
          for (int q = 0; q < Np / 16; ++q)
            acc[q] = _mm512_dpbf16_ps(acc[q], (__m512bh)_mm512_load_si512(b_pairs[p] + q * 16), xv);
        }
      for (int q = 0; q < Np / 16; ++q) _mm512_store_ps(y_bf16[i] + q * 16, acc[q]);
    }
  }

  double max_error(bool bf16) const {  // against float64 sums, and the largest |Y|
    double err = 0.0;
    for (int i = 0; i < S; ++i)
      for (int n = 0; n < N; ++n) {
        double exact = 0.0;
        for (int m = 0; m < M; ++m) exact += (b_col[n] >> m & 1) ? x[i][m] : 0.0;
        const double got = bf16 ? y_bf16[i][n] : y_sums[n][i];
        err = std::fmax(err, std::fabs(got - exact));
      }
    return err;
  }

  template <class F>
  static double ns_per_call(F&& f, long calls) {
    f();
    const auto t0 = std::chrono::steady_clock::now();
    for (long c = 0; c < calls; ++c) {
      f();
      asm volatile("" ::: "memory");
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e9 /
           calls;
  }

  void report(const char* product, long calls) {
    const double sums = ns_per_call([&] { masked_sums(); }, calls);
    const double err_sums = max_error(false);
    const double bf16_3 = ns_per_call([&] { bf16_dots<3>(); }, calls);
    const double err_3 = max_error(true);
    const double bf16_1 = ns_per_call([&] { bf16_dots<1>(); }, calls);
    const double err_1 = max_error(true);
    std::printf(
        "{\"product\": \"%s\", \"S\": %d, \"M\": %d, \"N\": %d, \"masked_sums_ns\": %.1f, "
        "\"bf16_3_parts_ns\": %.1f, \"bf16_1_part_ns\": %.1f, \"masked_sums_max_error\": %.3g, "
        "\"bf16_3_parts_max_error\": %.3g, \"bf16_1_part_max_error\": %.3g}\n",
        product, S, M, N, sums, bf16_3, bf16_1, err_sums, err_3, err_1);
  }
};

template <int S>
void run(long calls) {
  static Product<S, kD, S> scores(1);  // X = Q [S, d], B = K^T [d, S]
  scores.report("scores", calls);
  static Product<S, S, kD> pv(2);  // X = P [S, S], B = V [S, d]
  pv.report("P.V", calls);
}

int main() {
  run<27>(100000);
  run<64>(30000);
  return 0;
}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each measurement (default 5)")
    ap.add_argument("--out", help="JSON file (default bench/results/attention_bf16_<date>.json)")
    args = ap.parse_args()
    rounds: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(
            Path(tmp),
            SOURCE,
            ("-mavx512f", "-mavx512bw", "-mavx512bf16", "-mbmi", "-mbmi2"),
            needed=("avx512f", "avx512bw", "avx512_bf16", "bmi2"),
            who="attention_bf16",
        )
        for _ in range(args.rounds):
            run = subprocess.run([str(exe)], check=True, capture_output=True, text=True)
            for row in parse(run.stdout):
                rounds.setdefault((row["product"], row["S"]), []).append(row)
    products = []
    for rows in rounds.values():
        entry = {k: rows[0][k] for k in ("product", "S", "M", "N")}
        for k in ("masked_sums_ns", "bf16_3_parts_ns", "bf16_1_part_ns"):
            entry[k] = round(statistics.median(r[k] for r in rows), 1)
        for k in ("masked_sums_max_error", "bf16_3_parts_max_error", "bf16_1_part_max_error"):
            entry[k] = max(r[k] for r in rows)
        entry["bf16_3_parts_over_masked_sums"] = round(
            entry["bf16_3_parts_ns"] / entry["masked_sums_ns"], 2
        )
        entry["bf16_1_part_over_masked_sums"] = round(
            entry["bf16_1_part_ns"] / entry["masked_sums_ns"], 2
        )
        products.append(entry)
    record = {
        "device": device_name(torch.device("cpu")),
        "units": "nanoseconds per product of one head and one step (median of rounds), one thread",
        "rounds": args.rounds,
        "products": products,
    }
    print(json.dumps(record, indent=1))
    save_result(record, args.out, "attention_bf16")


if __name__ == "__main__":
    main()
