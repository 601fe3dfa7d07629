// AVX2 (with FMA, POPCNT, BMI1/2) kernels, selected at run time on x86-64 CPUs without AVX-512
// VPOPCNTDQ (AMD Zen 1-3, Intel Haswell to Comet Lake): the AVX-512 unit's algorithms on 8-lane
// vectors. Every float is formed by the same operations in the same order as kernels_portable.cpp,
// lane-wise, so every path gives the same bits.
//
// Binary projection, vectorised across 8 output columns per 256-bit register. AVX2 has no vector
// popcount, so each byte's bits are counted by table lookup (VPSHUFB) on its two nibbles. The
// +1-sign words of 8 columns are stored interleaved and split into nibbles ahead of time,
//
//   w_lo[n, k] = w+[n, k] & 0x0f0f0f0f,   w_hi[n, k] = (w+[n, k] >> 4) & 0x0f0f0f0f,
//
// so that for a row of spikes s (its nibble words broadcast once per row and step)
//
//   bytes[n] += lut[w_lo[n, k] & s_lo[k]] + lut[w_hi[n, k] & s_hi[k]]     (32 bytes, 8 columns)
//   acc[n]    = sum of bytes[n]'s four bytes (VPMADDUBSW, VPMADDWD), every 31 words at most
//   I[n]      = float(2 * acc[n] - popc(s)) * alpha[n] + bias[n]
//
// A byte gains at most 8 per word, so 31 words fit before the bytes are summed into 32-bit lanes.
// The tile is register-blocked over R rows of spikes (each weight load feeds R rows) and C groups
// of 8 columns.
//
// Attention, per batch b, head h, step t, query i (Q real, K and V spikes):
//   Q[i, c] = float(2 * popc(x_i & w+_c) - popc(x_i)) * alpha[c] + bias[c]    (no FMA)
//   s[j]    = (sum over c with K[j, c] = 1, ascending c, of Q[i, c]) * scale + mask[b, j]
//   p[j]    = sleef_expf_u10(s[j] - max s) * (1 / softmax_sum(...))
//   A[i, c] = sum over j with V[j, c] = 1, ascending j, of p[j]  (* gate[h]), then IF/LIF.
// It runs transposed, queries in the 8 float lanes, which turns both products with spiking
// operands into sparse sums of whole vectors over the set bits of K and V (no horizontal sums, and
// each lane adds in exactly the scalar order):
//   sT[j][i] = sum_{c in K[j]} qT[c][i],  softmax down j per lane,  aT[c][i] = sum_{j : c in V[j]}.
// AVX2 has no vector popcount, so the Q counts use the nibble table (VPSHUFB) on tokens in lanes;
// the counts are exact integers, so how they are formed cannot change a bit. The float steps are
// the scalar ones: the exp keeps Sleef's two power-of-two products (AVX2 has no VSCALEFPS), the
// softmax denominator keeps torch's 16-lane order (one query per lane, so 16 vectors), and the
// max is VMAXPS, which differs from std::max only on NaN and on +0 vs -0, where s - max and its
// exp are the same either way.
//
// Bernoulli: bit k of row m at step s fires iff float(mix32(mix32(m * full_width + col[k]) ^
// key[s]) >> 8) * 2^-24 < rate[m, k], decided on integers (see bernoulli_avx2).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

// Everything after this line (including the shared header's internal-linkage maths) is compiled
// for AVX2; the library headers above keep their generic code.
#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt,bmi,bmi2")

#include "spikeinfer_cpu.h"
#include "simd_common.h"

namespace spikeinfer_cpu {

namespace {

// All-ones 32-bit lanes for lanes [0, valid) (VMASKMOV selects on the sign bit).
inline __m256i lane_mask8(int64_t valid) {
  const int64_t v = std::max<int64_t>(0, std::min<int64_t>(valid, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(v)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// One IF/LIF step on 8 lanes, the neuron's leak and comparison fixed at compile time; returns
// the fired lanes as an all-ones mask and updates v in place (h - v_th where fired, as the
// scalar select).
template <bool kUnitLeak, bool kFireOnGe>
inline __m256 neuron_step_t(__m256 leak, __m256 th, __m256 current, __m256& v) {
  const __m256 h = kUnitLeak ? _mm256_add_ps(v, current)
                             : _mm256_add_ps(_mm256_mul_ps(leak, v), current);
  const __m256 fired = _mm256_cmp_ps(h, th, kFireOnGe ? _CMP_GE_OQ : _CMP_GT_OQ);
  v = _mm256_blendv_ps(h, _mm256_sub_ps(h, th), fired);
  return fired;
}

// Coefficient row k of the 16-interval GELU table at each lane's interval i (0..15): two 8-entry
// permutes and a blend on i's bit 3.
inline __m256 gelu_coefficient(int k, __m256i i, __m256 upper_half) {
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_load_ps(kGeluTail[k]), i);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_load_ps(kGeluTail[k] + 8), i);
  return _mm256_blendv_ps(lo, hi, upper_half);
}

// The scalar gelu of spikeinfer_cpu.h on 8 lanes, the same operations in the same order.
inline __m256 gelu8(__m256 x) {
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 clamped = _mm256_min_ps(a, _mm256_set1_ps(kGeluMaxTail));  // NaN -> the bound
  const __m256i i = _mm256_cvttps_epi32(_mm256_mul_ps(clamped, _mm256_set1_ps(kGeluInvWidth)));
  const __m256 u = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(-kGeluWidth),
                                   _mm256_sub_ps(clamped, _mm256_set1_ps(0.5f * kGeluWidth)));
  // vpermps reads the low 3 bits of each index; bit 3 picks the table's upper half
  const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(i, 28));
  __m256 q;
  if (_mm256_movemask_ps(upper) == 0) {
    // Every lane in the lower half (|x| < 4, nearly all of a trained model's F currents): the
    // blends would pick the lower half anyway, so one permute per coefficient gives the same
    // bits. On the Zen 3 host this took the F sublayer from 4.8 to 3.6 s on 128 SST-2 dev
    // sentences (bench/op_profile.py).
    q = _mm256_permutevar8x32_ps(_mm256_load_ps(kGeluTail[kGeluDegree]), i);
#pragma GCC unroll 8
    for (int k = kGeluDegree - 1; k >= 0; --k)
      q = _mm256_fmadd_ps(q, u, _mm256_permutevar8x32_ps(_mm256_load_ps(kGeluTail[k]), i));
  } else {
    q = gelu_coefficient(kGeluDegree, i, upper);
#pragma GCC unroll 8
    for (int k = kGeluDegree - 1; k >= 0; --k)
      q = _mm256_fmadd_ps(q, u, gelu_coefficient(k, i, upper));
  }
  const __m256 positive = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
  const __m256 phi = _mm256_blendv_ps(q, _mm256_sub_ps(_mm256_set1_ps(1.0f), q), positive);
  return _mm256_mul_ps(x, phi);
}

// 8 lanes of 1.0f where bit l of `bits` is set, else 0.0f.
inline __m256 bits_to_ones(uint32_t bits) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_cmpeq_epi32(
      _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane_bit), lane_bit);
  return _mm256_and_ps(_mm256_castsi256_ps(set), _mm256_set1_ps(1.0f));
}

// ---- binary projection microkernel -----------------------------------------------------------

constexpr int64_t kByteSpan = 31;  // words per byte-accumulation span (8 * 31 < 256)

// Byte-wise popcount of 32 nibbles (values 0..15), the VPSHUFB table.
inline __m256i nibble_popcount(__m256i nibbles) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                         2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  return _mm256_shuffle_epi8(table, nibbles);
}

// Byte counts (each <= 255) summed into their 32-bit lanes.
inline __m256i bytes_to_lanes(__m256i bytes) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(bytes, _mm256_set1_epi8(1)),
                           _mm256_set1_epi16(1));
}

// Currents of R rows for C consecutive column groups of 8 starting at group g:
// out[r][(g - g_base + c) * 8 + lane], plus the residual spikes (bytes res8[r][g]) when given.
// s_nib[r] holds row r's nibble words broadcast: [kw32][2][8] (lo, hi).
template <int R, int C>
inline void project_tile(const uint32_t* const* s_nib, const int32_t* popc, int64_t kw32,
                         const uint32_t* w_il, int64_t g, int64_t g_base, int64_t N,
                         const float* alpha, const float* bias, const uint8_t* const* res8,
                         float* const* out) {
  __m256i total[R][C];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) total[r][c] = _mm256_setzero_si256();
  const uint32_t* w = w_il + g * kw32 * 16;
  for (int64_t k0 = 0; k0 < kw32; k0 += kByteSpan) {
    const int64_t k1 = std::min(kw32, k0 + kByteSpan);
    // Every loop over r and c is unrolled so that the accumulators stay in registers.
    __m256i acc[R][C];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; ++k) {
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) {
        const __m256i* wc = reinterpret_cast<const __m256i*>(w + (c * kw32 + k) * 16);
        const __m256i wl = _mm256_loadu_si256(wc), wh = _mm256_loadu_si256(wc + 1);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const __m256i* s = reinterpret_cast<const __m256i*>(s_nib[r] + k * 16);
          const __m256i lo = nibble_popcount(_mm256_and_si256(wl, _mm256_load_si256(s)));
          const __m256i hi = nibble_popcount(_mm256_and_si256(wh, _mm256_load_si256(s + 1)));
          acc[r][c] = _mm256_add_epi8(acc[r][c], _mm256_add_epi8(lo, hi));
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c)
        total[r][c] = _mm256_add_epi32(total[r][c], bytes_to_lanes(acc[r][c]));
  }
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) {
    const __m256i valid = lane_mask8(N - (g + c) * 8);
    const __m256 al = _mm256_maskload_ps(alpha + (g + c) * 8, valid);
    const __m256 bi = _mm256_maskload_ps(bias + (g + c) * 8, valid);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256i count =
          _mm256_sub_epi32(_mm256_slli_epi32(total[r][c], 1), _mm256_set1_epi32(popc[r]));
      __m256 f = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(count), al), bi);
      if (res8 != nullptr)  // + residual spike (1.0 or 0.0), as the reference adds it
        f = _mm256_add_ps(f, bits_to_ones(res8[r][g + c]));
      _mm256_store_ps(out[r] + (g - g_base + c) * 8, f);
    }
  }
}

// Currents of R rows for column groups [g0, g1): out[r][0 .. (g1 - g0) * 8) (lanes past N are
// don't-care).
template <int R>
inline void project_rows(const uint32_t* const* s_nib, const int32_t* popc, int64_t kw32,
                         const uint32_t* w_il, int64_t g0, int64_t g1, int64_t N,
                         const float* alpha, const float* bias, const uint8_t* const* res8,
                         float* const* out) {
  constexpr int C = 1;
  int64_t g = g0;
  for (; g + C <= g1; g += C)
    project_tile<R, C>(s_nib, popc, kw32, w_il, g, g0, N, alpha, bias, res8, out);
  for (; g < g1; ++g)
    project_tile<R, 1>(s_nib, popc, kw32, w_il, g, g0, N, alpha, bias, res8, out);
}

// A row of spikes as broadcast nibble words: out[k][0..8) = s[k] & 0x0f0f0f0f,
// out[k][8..16) = (s[k] >> 4) & 0x0f0f0f0f, the padding bits past K cleared.
inline void broadcast_nibbles(const uint64_t* row, int64_t K, int64_t kw32, uint32_t* out) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(row);
  const uint32_t tail = K % 32 == 0 ? 0xFFFFFFFFu : (1u << (K % 32)) - 1;
  for (int64_t k = 0; k < kw32; ++k) {
    const uint32_t word = k == kw32 - 1 ? s[k] & tail : s[k];
    __m256i* o = reinterpret_cast<__m256i*>(out + k * 16);
    _mm256_store_si256(o, _mm256_set1_epi32(static_cast<int>(word & 0x0f0f0f0fu)));
    _mm256_store_si256(o + 1, _mm256_set1_epi32(static_cast<int>((word >> 4) & 0x0f0f0f0fu)));
  }
}

// The LayerNorm output of a row as PyTorch rounds it: fma((x - mean) * rstd, gamma, beta).
struct LayerNormApply {
  float neg_mean, rstd;
  const float* weight;
  const float* bias;
};

// One neuron step for column groups [g0, g1) of a row: currents, membrane and counts are
// chunk-relative (padded to whole groups of 8); spikes go to byte g of the packed row, and the
// row's unused trailing bytes are cleared with the last chunk, so every word is written. The
// neuron's leak and comparison and the epilogue are template arguments (this loop runs once per
// feature group, row and step). The epilogue (LayerNorm with the row's coefficients, or GELU)
// and then the gate apply to the currents before the neuron sees them, as in the reference.
template <bool kUnitLeak, bool kFireOnGe, Epilogue kEpi>
inline void scan_groups_t(const NeuronSpec& spec, const float* cur, float* membrane,
                          int32_t* counts, int64_t N, int64_t g0, int64_t g1, uint64_t* bits,
                          int64_t nw64, const LayerNormApply* ln, const float* gate,
                          float* current_out) {
  uint8_t* bits8 = reinterpret_cast<uint8_t*>(bits);
  const __m256 leak = _mm256_set1_ps(spec.leak), th = _mm256_set1_ps(spec.v_th);
  __m256 neg_mean = _mm256_setzero_ps(), rstd = neg_mean;
  if constexpr (kEpi == kEpilogueResidualLayerNorm) {
    neg_mean = _mm256_set1_ps(ln->neg_mean);
    rstd = _mm256_set1_ps(ln->rstd);
  }
  auto step = [&](int64_t g, __m256i valid, bool full) {
    const int64_t o = (g - g0) * 8;
    __m256 x = _mm256_load_ps(cur + o);
    if constexpr (kEpi == kEpilogueResidualLayerNorm) {
      x = _mm256_mul_ps(_mm256_add_ps(x, neg_mean), rstd);
      x = _mm256_fmadd_ps(x, _mm256_maskload_ps(ln->weight + g * 8, valid),
                          _mm256_maskload_ps(ln->bias + g * 8, valid));
    }
    if constexpr (kEpi == kEpilogueGelu) x = gelu8(x);
    if (gate != nullptr) x = _mm256_mul_ps(x, _mm256_maskload_ps(gate + g * 8, valid));
    if (current_out != nullptr) {
      if (full)
        _mm256_storeu_ps(current_out + g * 8, x);
      else
        _mm256_maskstore_ps(current_out + g * 8, valid, x);
    }
    __m256 v = _mm256_load_ps(membrane + o);
    const __m256 fired = _mm256_and_ps(neuron_step_t<kUnitLeak, kFireOnGe>(leak, th, x, v),
                                       _mm256_castsi256_ps(valid));
    _mm256_store_ps(membrane + o, v);
    bits8[g] = static_cast<uint8_t>(_mm256_movemask_ps(fired));
    const __m256i c = _mm256_load_si256(reinterpret_cast<const __m256i*>(counts + o));
    _mm256_store_si256(reinterpret_cast<__m256i*>(counts + o),
                       _mm256_sub_epi32(c, _mm256_castps_si256(fired)));  // fired lanes are -1
  };
  const int64_t full = std::min(g1, N / 8);  // groups with all 8 lanes valid
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t g = g0;
  for (; g < full; ++g) step(g, all, true);
  for (; g < g1; ++g) step(g, lane_mask8(N - g * 8), false);
  if (g1 == (N + 7) / 8)
    for (int64_t gg = g1; gg < nw64 * 8; ++gg) bits8[gg] = 0;
}

template <Epilogue kEpi>
inline void scan_groups_e(const NeuronSpec& spec, const float* cur, float* membrane,
                          int32_t* counts, int64_t N, int64_t g0, int64_t g1, uint64_t* bits,
                          int64_t nw64, const LayerNormApply* ln, const float* gate,
                          float* current_out) {
  const bool unit = spec.leak == 1.0f, ge = spec.fire_on_ge;
#define SPIKEINFER_SCAN(U, G)                                                              \
  scan_groups_t<U, G, kEpi>(spec, cur, membrane, counts, N, g0, g1, bits, nw64, ln, gate, \
                            current_out)
  if (unit)
    ge ? SPIKEINFER_SCAN(true, true) : SPIKEINFER_SCAN(true, false);
  else
    ge ? SPIKEINFER_SCAN(false, true) : SPIKEINFER_SCAN(false, false);
#undef SPIKEINFER_SCAN
}

inline void scan_groups(const NeuronSpec& spec, const float* cur, float* membrane, int32_t* counts,
                        int64_t N, int64_t g0, int64_t g1, uint64_t* bits, int64_t nw64,
                        int epilogue = kEpiloguePlain, const LayerNormApply* ln = nullptr,
                        const float* gate = nullptr, float* current_out = nullptr) {
  if (epilogue == kEpilogueResidualLayerNorm)
    scan_groups_e<kEpilogueResidualLayerNorm>(spec, cur, membrane, counts, N, g0, g1, bits, nw64,
                                              ln, gate, current_out);
  else if (epilogue == kEpilogueGelu)
    scan_groups_e<kEpilogueGelu>(spec, cur, membrane, counts, N, g0, g1, bits, nw64, ln, gate,
                                 current_out);
  else
    scan_groups_e<kEpiloguePlain>(spec, cur, membrane, counts, N, g0, g1, bits, nw64, ln, gate,
                                  current_out);
}

// Rates as the reference computes them: float(count) / float(T), one rounding.
inline void write_rates(const int32_t* counts, int64_t N, int64_t T, float* rates) {
  const __m256 steps = _mm256_set1_ps(static_cast<float>(T));
  for (int64_t g = 0; g * 8 < N; ++g) {
    const __m256i valid = lane_mask8(N - g * 8);
    const __m256 c = _mm256_cvtepi32_ps(_mm256_maskload_epi32(counts + g * 8, valid));
    _mm256_maskstore_ps(rates + g * 8, valid, _mm256_div_ps(c, steps));
  }
}

}  // namespace

void linear_neuron_avx2(const LinearNeuronArgs& a, int64_t begin, int64_t end) {
  constexpr int R = 6;  // rows of spikes sharing each weight load
  const int64_t N = a.N, groups = (N + 7) / 8;
  const int64_t kw32 = (a.K + 31) / 32;
  // Elementwise epilogues run over column chunks whose weights (kw32 * 64 bytes per group of 8
  // columns) stay in L1 for all T steps of a block of rows; LayerNorm needs whole rows.
  const bool whole_rows = a.epilogue == kEpilogueNone || a.epilogue == kEpilogueResidualLayerNorm;
  const int64_t chunk =
      whole_rows ? groups : std::max<int64_t>(4, (16384 / std::max<int64_t>(kw32 * 64, 1)) / 4 * 4);
  const int64_t chunk_cols = std::min(chunk, groups) * 8;
  Scratch<float> cur(R * chunk_cols), membrane(R * chunk_cols);
  Scratch<int32_t> counts(R * chunk_cols);
  Scratch<uint32_t> nibbles(R * std::max<int64_t>(kw32, 1) * 16);
  std::memset(cur.p, 0, sizeof(float) * R * chunk_cols);
  const bool layer_norm = a.epilogue == kEpilogueResidualLayerNorm;
  float ln_neg_mean[R], ln_rstd[R];  // per row of the current step
  const uint32_t* s_nib[R];
  const uint8_t* res8[R];
  float* cur_rows[R];
  int32_t popc[R];
  for (int r = 0; r < R; ++r) {
    s_nib[r] = nibbles.p + r * kw32 * 16;
    cur_rows[r] = cur.p + r * chunk_cols;
  }
  for (int64_t m0 = begin; m0 < end; m0 += R) {
    const int64_t rr = std::min<int64_t>(R, end - m0);
    for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
      const int64_t g1 = std::min(groups, g0 + chunk);
      const int64_t n0 = g0 * 8, valid_cols = std::min(N, g1 * 8) - n0;
      std::memset(membrane.p, 0, sizeof(float) * R * chunk_cols);
      std::memset(counts.p, 0, sizeof(int32_t) * R * chunk_cols);
      for (int64_t t = 0; t < a.T; ++t) {
        for (int r = 0; r < R; ++r) {
          // Short blocks repeat their last row; the duplicate results are never stored.
          const int64_t row = t * a.M + m0 + std::min<int64_t>(r, rr - 1);
          broadcast_nibbles(a.x + row * a.kw64, a.K, kw32, nibbles.p + r * kw32 * 16);
          popc[r] = masked_popcount(a.x + row * a.kw64, a.K, a.kw64);
          if (a.residual != nullptr)
            res8[r] = reinterpret_cast<const uint8_t*>(a.residual + row * a.nw64);
        }
        if (t + kPrefetchSteps < a.T) {
          const int64_t ahead = (t + kPrefetchSteps) * a.M + m0;
          prefetch_span<false>(a.x + ahead * a.kw64, rr * a.kw64 * 8);
          if (a.epilogue != kEpilogueNone && g0 == 0)
            prefetch_span<true>(a.spikes + ahead * a.nw64, rr * a.nw64 * 8);
        }
        project_rows<R>(s_nib, popc, kw32, a.w_il, g0, g1, N, a.alpha, a.bias,
                        a.residual != nullptr ? res8 : nullptr, cur_rows);
        if (a.epilogue == kEpilogueNone) {
          for (int64_t r = 0; r < rr; ++r)
            std::memcpy(a.out + (t * a.M + m0 + r) * N, cur_rows[r], sizeof(float) * N);
          continue;
        }
        if (layer_norm && N > 0) {  // whole rows: the coefficients for the scan
          if (rr == R)
            layer_norm_coefficients<Avx2Vec8, R>(cur_rows, N, a.eps, ln_neg_mean, ln_rstd);
          else
            for (int64_t r = 0; r < rr; ++r)
              layer_norm_coefficients<Avx2Vec8, 1>(cur_rows + r, N, a.eps, ln_neg_mean + r,
                                                   ln_rstd + r);
        }
        for (int64_t r = 0; r < rr; ++r) {
          const int64_t row = t * a.M + m0 + r;
          LayerNormApply ln{layer_norm ? ln_neg_mean[r] : 0.0f, layer_norm ? ln_rstd[r] : 0.0f,
                            a.ln_weight, a.ln_bias};
          scan_groups(a.neuron, cur_rows[r], membrane.p + r * chunk_cols,
                      counts.p + r * chunk_cols, N, g0, g1, a.spikes + row * a.nw64, a.nw64,
                      a.epilogue, &ln, a.gate, a.out != nullptr ? a.out + row * N : nullptr);
        }
      }
      if (a.rates != nullptr && a.epilogue != kEpilogueNone)
        for (int64_t r = 0; r < rr; ++r)
          write_rates(counts.p + r * chunk_cols, valid_cols, a.T, a.rates + (m0 + r) * N + n0);
    }
  }
}

void scan_avx2(const ScanArgs& a, int64_t begin, int64_t end) {
  const int64_t padded = ((a.N + 7) / 8) * 8;
  Scratch<float> membrane(padded), cur(padded);
  Scratch<int32_t> counts(padded);
  std::memset(cur.p, 0, sizeof(float) * padded);
  for (int64_t m = begin; m < end; ++m) {
    std::memset(membrane.p, 0, sizeof(float) * padded);
    std::memset(counts.p, 0, sizeof(int32_t) * padded);
    for (int64_t t = 0; t < a.T; ++t) {
      std::memcpy(cur.p, a.current + t * a.step_stride + m * a.N, sizeof(float) * a.N);
      scan_groups(a.neuron, cur.p, membrane.p, counts.p, a.N, 0, (a.N + 7) / 8,
                  a.spikes + (t * a.M + m) * a.nw64, a.nw64);
    }
    if (a.rates != nullptr) write_rates(counts.p, a.N, a.T, a.rates + m * a.N);
  }
}

namespace {


// The same for 64-bit lanes [0, valid) of 4.
inline __m256i lane_mask4(int64_t valid) {
  const long long v = std::min<int64_t>(std::max<int64_t>(valid, 0), 4);
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(v), _mm256_setr_epi64x(0, 1, 2, 3));
}

// ---- exact replicas of the scalar maths in spikeinfer_cpu.h, 8 lanes at a time ---------------

// sleef_expf_u10 for d <= 0 (softmax arguments, the max already subtracted; NaN propagates
// through the arithmetic as in the scalar). AVX2 has no VSCALEFPS, so the scaling is the scalar's
// own: two exact power-of-two products u * 2^(q >> 1) * 2^(q - (q >> 1)), the factors built in
// the exponent field. For d >= -104, q >= -150, so both halves are >= -75 and the factors normal.
inline __m256 sleef_expf_u10_nonpositive8(__m256 d) {
  const __m256 qf = _mm256_round_ps(
      _mm256_mul_ps(d, _mm256_set1_ps(
                           1.442695040888963407359924681001892137426645954152985934135449406931f)),
      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-0.693145751953125f), d);
  s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-1.428606765330187045e-06f), s);
  __m256 u = _mm256_set1_ps(0.000198527617612853646278381f);
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00139304355252534151077271f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00833336077630519866943359f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.0416664853692054748535156f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.166666671633720397949219f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.5f));
  u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
  const __m256i q = _mm256_cvtps_epi32(qf);  // qf is integral: exact
  const __m256i q1 = _mm256_srai_epi32(q, 1);
  const __m256i q2 = _mm256_sub_epi32(q, q1);
  const __m256i bias = _mm256_set1_epi32(0x7f);
  u = _mm256_mul_ps(u, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q1, bias), 23)));
  u = _mm256_mul_ps(u, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q2, bias), 23)));
  return _mm256_andnot_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-104.0f), _CMP_LT_OQ), u);
}

inline __m256 neuron_step_v(const NeuronSpec& n, __m256 current, __m256& v) {
  const __m256 leak = _mm256_set1_ps(n.leak), th = _mm256_set1_ps(n.v_th);
  if (n.leak == 1.0f)
    return n.fire_on_ge ? neuron_step_t<true, true>(leak, th, current, v)
                        : neuron_step_t<true, false>(leak, th, current, v);
  return n.fire_on_ge ? neuron_step_t<false, true>(leak, th, current, v)
                      : neuron_step_t<false, false>(leak, th, current, v);
}

// ---- Bernoulli -----------------------------------------------------------------------------------

// Register compress of the 32-bit lanes set in an 8-bit mask (AVX2 has no VPCOMPRESSD): PEXT
// of the byte indices 0..7 by the mask widened to bytes gives the permutation VPERMD needs.
inline __m256i compress8(__m256i x, uint32_t mask8) {
  const uint64_t wide = _pdep_u64(mask8, 0x0101010101010101ull) * 0xffu;
  const uint64_t idx = _pext_u64(0x0706050403020100ull, wide);
  const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(idx)));
  return _mm256_permutevar8x32_epi32(x, perm);
}

// ---- attention ---------------------------------------------------------------------------------

// Per-task scratch of attention_avx2 (tokens padded to Sp = 8 * blocks).
struct AttentionScratch {
  float* q_t;            // [width][Sp]   Q of the group, tokens in lanes
  float* s_t;            // [S][kChunk*8] scores, then probabilities, of one query chunk
  float* membrane;       // [width][Sp]
  int32_t* counts;       // [width][Sp]
  uint8_t* fired;        // [blocks][words * 64] A spikes of 8 queries per column of the group
  int64_t fired_stride;  // words * 64
  uint64_t* v_t;         // [d][key_words] V bits of one head, keys per column
};

// Query blocks of 8 processed together (64 queries): enough independent add chains to cover the
// add latency in the sparse sums, and every K / V bit found once feeds all of them.
constexpr int64_t kChunk = 8;

// Token blocks per Q projection tile: each sign broadcast feeds both, and 2 blocks x 4 columns of
// byte counters, the token words and the table still fit the 16 YMM registers.
constexpr int64_t kQBlocks = 2;

// Q columns [c, c + C) of R blocks of 8 tokens: xb holds the blocks' words split into nibbles
// (x_il layout [blk][k][lo 8 lanes, hi 8 lanes]), wn the columns' sign words likewise
// ([c][k][lo, hi]); each token load feeds C columns and each sign broadcast R blocks.
// A byte lane gains at most 8 per word, so bytes are folded into 32-bit lanes every kByteSpan
// words.
template <int R, int C>
inline void project_q_tile(const uint32_t* xb, const uint32_t* wn, int64_t kw32,
                           const int32_t* popc, const float* alpha, const float* bias, float* out,
                           int64_t Sp) {
  __m256i total[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int cc = 0; cc < C; ++cc) total[r][cc] = _mm256_setzero_si256();
  for (int64_t k0 = 0; k0 < kw32; k0 += kByteSpan) {
    const int64_t k1 = std::min<int64_t>(kw32, k0 + kByteSpan);
    __m256i acc[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int cc = 0; cc < C; ++cc) acc[r][cc] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; ++k) {
      __m256i xl[R], xh[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        xl[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(xb + (r * kw32 + k) * 16));
        xh[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(xb + (r * kw32 + k) * 16 + 8));
      }
#pragma GCC unroll 8
      for (int cc = 0; cc < C; ++cc) {
        const uint32_t* w = wn + (cc * kw32 + k) * 2;
        const __m256i wl = _mm256_set1_epi32(static_cast<int>(w[0]));
        const __m256i wh = _mm256_set1_epi32(static_cast<int>(w[1]));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          acc[r][cc] = _mm256_add_epi8(acc[r][cc], nibble_popcount(_mm256_and_si256(xl[r], wl)));
          acc[r][cc] = _mm256_add_epi8(acc[r][cc], nibble_popcount(_mm256_and_si256(xh[r], wh)));
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int cc = 0; cc < C; ++cc)
        total[r][cc] = _mm256_add_epi32(total[r][cc], bytes_to_lanes(acc[r][cc]));
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m256i pc = _mm256_load_si256(reinterpret_cast<const __m256i*>(popc + r * 8));
#pragma GCC unroll 8
    for (int cc = 0; cc < C; ++cc) {
      const __m256i count = _mm256_sub_epi32(_mm256_slli_epi32(total[r][cc], 1), pc);
      const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(count), _mm256_set1_ps(alpha[cc]));
      _mm256_store_ps(out + cc * Sp + r * 8, _mm256_add_ps(f, _mm256_set1_ps(bias[cc])));
    }
  }
}

// Q columns [0, width) of R blocks.
template <int R>
inline void project_q_blocks(const uint32_t* xb, const uint32_t* wn, int64_t kw32,
                             const int32_t* popc, const float* alpha, const float* bias,
                             float* out, int64_t Sp, int64_t width) {
  constexpr int C = 4;
  int64_t c = 0;
  for (; c + C <= width; c += C)
    project_q_tile<R, C>(xb, wn + c * kw32 * 2, kw32, popc, alpha + c, bias + c, out + c * Sp,
                         Sp);
  for (; c < width; ++c)
    project_q_tile<R, 1>(xb, wn + c * kw32 * 2, kw32, popc, alpha + c, bias + c, out + c * Sp,
                         Sp);
}

// One head, one chunk of NB query blocks (8 queries each) starting at block blk0, one step:
// scores, softmax, P.V and the A neuron scan, queries in lanes.
template <int NB>
void attend_chunk(const AttentionArgs& a, const AttentionScratch& w, int64_t Sp, int64_t row0,
                  int64_t h, int64_t hc, int64_t blk0, const float* mask, int64_t key_words) {
  const int64_t S = a.S, d = a.head_dim;
  constexpr int64_t kRow = kChunk * 8;  // floats per key row of s_t
  const float* q_head = w.q_t + hc * Sp + blk0 * 8;
  const __m256 scale = _mm256_set1_ps(a.scale);
  __m256 mx[NB];
  for (int bb = 0; bb < NB; ++bb) mx[bb] = _mm256_set1_ps(-INFINITY);
  // sT[j] = (sum over c in K[j], ascending, of qT[c]) * scale + mask[j]
  for (int64_t j = 0; j < S; ++j) {
    __m256 acc[NB];
    for (int bb = 0; bb < NB; ++bb) acc[bb] = _mm256_setzero_ps();
    const uint64_t* krow = a.k + (row0 + j) * a.nw64;
    int64_t pos = h * d;
    const int64_t end = pos + d;
    while (pos < end) {
      const int64_t off = pos & 63, take = std::min<int64_t>(64 - off, end - pos);
      uint64_t bits = krow[pos >> 6] >> off;
      if (take < 64) bits &= (uint64_t{1} << take) - 1;
      const float* q = q_head + (pos - h * d) * Sp;
      while (bits != 0) {
        const float* qc = q + static_cast<int64_t>(_tzcnt_u64(bits)) * Sp;
        for (int bb = 0; bb < NB; ++bb)
          acc[bb] = _mm256_add_ps(acc[bb], _mm256_load_ps(qc + bb * 8));
        bits = _blsr_u64(bits);
      }
      pos += take;
    }
    const __m256 mj = _mm256_set1_ps(mask[j]);
    float* sj = w.s_t + j * kRow;
    for (int bb = 0; bb < NB; ++bb) {
      const __m256 sc = _mm256_add_ps(_mm256_mul_ps(acc[bb], scale), mj);
      _mm256_store_ps(sj + bb * 8, sc);
      mx[bb] = _mm256_max_ps(mx[bb], sc);  // differs from std::max only on +-0 and NaN: same exp
    }
  }
  // Softmax down the keys in torch.softmax's order (softmax_sum): each lane is one query, so
  // softmax_sum's 16 partial sums are 16 vectors per block, then its tree 8, 4, 2, 1. All blocks
  // advance together, so the independent exp chains of NB blocks sit side by side.
  {
    __m256 part[16][NB];
    for (int64_t j = 0; j < S; ++j) {
      float* p = w.s_t + j * kRow;
      __m256* lanes = part[j & 15];
      for (int bb = 0; bb < NB; ++bb) {
        const __m256 e =
            sleef_expf_u10_nonpositive8(_mm256_sub_ps(_mm256_load_ps(p + bb * 8), mx[bb]));
        _mm256_store_ps(p + bb * 8, e);
        lanes[bb] = j < 16 ? e : _mm256_add_ps(lanes[bb], e);
      }
    }
    __m256 inv[NB];
    for (int bb = 0; bb < NB; ++bb) {
      __m256 sum;
      if (S < 16) {  // left to right
        sum = part[0][bb];
        for (int64_t j = 1; j < S; ++j) sum = _mm256_add_ps(sum, part[j][bb]);
      } else {
        for (int l = 0; l < 8; ++l) part[l][bb] = _mm256_add_ps(part[l][bb], part[l + 8][bb]);
        for (int l = 0; l < 4; ++l) part[l][bb] = _mm256_add_ps(part[l][bb], part[l + 4][bb]);
        for (int l = 0; l < 2; ++l) part[l][bb] = _mm256_add_ps(part[l][bb], part[l + 2][bb]);
        sum = _mm256_add_ps(part[0][bb], part[1][bb]);
      }
      inv[bb] = _mm256_div_ps(_mm256_set1_ps(1.0f), sum);
    }
    for (int64_t j = 0; j < S; ++j) {
      float* p = w.s_t + j * kRow;
      for (int bb = 0; bb < NB; ++bb)
        _mm256_store_ps(p + bb * 8, _mm256_mul_ps(_mm256_load_ps(p + bb * 8), inv[bb]));
    }
  }
  // aT[c] = sum over keys j with V[j, c] = 1, ascending, of pT[j]; then gate and the A scan.
  const bool gated = a.gate != nullptr;
  const __m256 gate = _mm256_set1_ps(gated ? a.gate[h] : 1.0f);
  for (int64_t c = 0; c < d; ++c) {
    __m256 acc[NB];
    for (int bb = 0; bb < NB; ++bb) acc[bb] = _mm256_setzero_ps();
    const uint64_t* vc = w.v_t + c * key_words;
    for (int64_t kw = 0; kw < key_words; ++kw) {
      uint64_t bits = vc[kw];
      while (bits != 0) {
        const float* pj = w.s_t + (kw * 64 + static_cast<int64_t>(_tzcnt_u64(bits))) * kRow;
        for (int bb = 0; bb < NB; ++bb)
          acc[bb] = _mm256_add_ps(acc[bb], _mm256_load_ps(pj + bb * 8));
        bits = _blsr_u64(bits);
      }
    }
    const int64_t lc = hc + c;  // column within the group
    for (int bb = 0; bb < NB; ++bb) {
      const int64_t blk = blk0 + bb;
      const __m256 cur = gated ? _mm256_mul_ps(acc[bb], gate) : acc[bb];
      if (a.current != nullptr) {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, cur);
        for (int64_t l = 0; l < 8 && blk * 8 + l < S; ++l)
          a.current[(row0 + blk * 8 + l) * a.heads * d + h * d + c] = lanes[l];
      }
      float* vm = w.membrane + lc * Sp + blk * 8;
      __m256 v = _mm256_load_ps(vm);
      const __m256 fired = neuron_step_v(a.neuron, cur, v);
      _mm256_store_ps(vm, v);
      int32_t* cnt = w.counts + lc * Sp + blk * 8;
      const __m256i cv = _mm256_load_si256(reinterpret_cast<const __m256i*>(cnt));
      // fired lanes are -1: subtracting counts them
      _mm256_store_si256(reinterpret_cast<__m256i*>(cnt),
                         _mm256_sub_epi32(cv, _mm256_castps_si256(fired)));
      // Lanes past S are never read back from this mask.
      w.fired[blk * w.fired_stride + lc] = static_cast<uint8_t>(_mm256_movemask_ps(fired));
    }
  }
}

}  // namespace

void attention_avx2(const AttentionArgs& a, int64_t begin, int64_t end) {
  const int64_t S = a.S, d = a.head_dim, H = a.heads, HD = H * d;
  const int64_t group = a.group_heads;
  const int64_t groups = (H + group - 1) / group;
  const int64_t kw32 = (a.K + 31) / 32;
  const int64_t blocks = (S + 7) / 8, Sp = blocks * 8;
  const int64_t max_width = group * d, words = (max_width + 63) / 64;
  const int64_t key_words = (S + 63) / 64;
  const int64_t kw32a = std::max<int64_t>(kw32, 1);
  Scratch<uint32_t> x_il(blocks * kw32a * 16);  // [blk][k][lo 8, hi 8] nibbles of the tokens
  Scratch<int32_t> popc_x(Sp);
  Scratch<uint32_t> wq_nib(max_width * kw32a * 2);  // [c][k][lo, hi] nibbles of the signs
  Scratch<float> q_t(max_width * Sp), s_t(std::max<int64_t>(S, 1) * kChunk * 8),
      membrane(max_width * Sp);
  Scratch<int32_t> counts(max_width * Sp);
  Scratch<uint8_t> fired(blocks * words * 64);
  Scratch<uint64_t> v_t(d * key_words);
  // A head's V bits of each key, keys padded to a whole group of 8 with zero bits.
  const int64_t keys_padded = (S + 7) / 8 * 8;
  Scratch<uint32_t> head_bits32(keys_padded);
  Scratch<uint64_t> head_bits64(keys_padded);
  for (int64_t j = S; j < keys_padded; ++j) head_bits32[j] = 0, head_bits64[j] = 0;
  const AttentionScratch w{q_t.p, s_t.p, membrane.p, counts.p, fired.p, words * 64, v_t.p};
  const uint32_t tail32 = last_word32_mask(a.K);

  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / groups, g = task % groups;
    const int64_t h0 = g * group, h1 = std::min(H, h0 + group);
    const int64_t c0 = h0 * d, width = (h1 - h0) * d, width_words = (width + 63) / 64;
    std::memset(membrane.p, 0, sizeof(float) * max_width * Sp);
    std::memset(counts.p, 0, sizeof(int32_t) * max_width * Sp);
    // Columns past the group's width stay 0 (every other entry is written at every step).
    std::memset(fired.p, 0, sizeof(uint8_t) * blocks * w.fired_stride);
    const float* mask = a.mask_add + b * S;
    // This group's Q sign words in nibbles, padding bits cleared: (x & w) & 0x0f0f0f0f is
    // (x & 0x0f0f0f0f) & (w & 0x0f0f0f0f), so both operands are split once, not per product.
    for (int64_t c = 0; c < width; ++c) {
      const uint32_t* w32 = reinterpret_cast<const uint32_t*>(a.wq + (c0 + c) * a.kw64);
      for (int64_t k = 0; k < kw32; ++k) {
        const uint32_t word = k == kw32 - 1 ? w32[k] & tail32 : w32[k];
        wq_nib[(c * kw32 + k) * 2] = word & 0x0f0f0f0fu;
        wq_nib[(c * kw32 + k) * 2 + 1] = (word >> 4) & 0x0f0f0f0fu;
      }
    }

    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t row0 = t * a.B * S + b * S;
      // Tokens into vector lanes, split into nibbles.
      for (int64_t blk = 0; blk < blocks; ++blk) {
        for (int64_t lane = 0; lane < 8; ++lane) {
          const int64_t i = blk * 8 + lane;
          const uint32_t* xr = i < S ? reinterpret_cast<const uint32_t*>(a.x + (row0 + i) * a.kw64)
                                     : nullptr;
          int32_t pc = 0;
          for (int64_t k = 0; k < kw32; ++k) {
            uint32_t word = xr != nullptr ? xr[k] : 0u;
            if (k == kw32 - 1) word &= tail32;
            x_il[(blk * kw32 + k) * 16 + lane] = word & 0x0f0f0f0fu;
            x_il[(blk * kw32 + k) * 16 + 8 + lane] = (word >> 4) & 0x0f0f0f0fu;
            pc += static_cast<int32_t>(_mm_popcnt_u32(word));
          }
          popc_x[i] = pc;
        }
      }
      // qT[c][i] for this group's columns, four columns per pass so each token load feeds four.
      int64_t blk = 0;
      for (; blk + kQBlocks <= blocks; blk += kQBlocks)
        project_q_blocks<kQBlocks>(x_il.p + blk * kw32 * 16, wq_nib.p, kw32, popc_x.p + blk * 8,
                                   a.alpha_q + c0, a.bias_q + c0, q_t.p + blk * 8, Sp, width);
      for (; blk < blocks; ++blk)
        project_q_blocks<1>(x_il.p + blk * kw32 * 16, wq_nib.p, kw32, popc_x.p + blk * 8,
                            a.alpha_q + c0, a.bias_q + c0, q_t.p + blk * 8, Sp, width);

      for (int64_t h = h0; h < h1; ++h) {
        const int64_t hc = (h - h0) * d;
        // V bits of this head transposed: one key mask per column. Keys' head fields sit in
        // vector lanes; shifting column c to the sign bit and VMOVMSKPS/PD gives that column's
        // bits of 8 keys at once (a per-set-bit scatter is a chain through memory).
        std::memset(v_t.p, 0, sizeof(uint64_t) * d * key_words);
        uint8_t* v_t8 = reinterpret_cast<uint8_t*>(v_t.p);
        const int64_t col_stride = key_words * 8;  // bytes per column of v_t
        if (d <= 32) {
          for (int64_t j = 0; j < S; ++j)
            head_bits32[j] = static_cast<uint32_t>(bit_field(a.v + (row0 + j) * a.nw64, h * d, d));
          const __m128i to_top = _mm_cvtsi32_si128(static_cast<int>(32 - d));
          for (int64_t j0 = 0; j0 < S; j0 += 8) {
            __m256i x = _mm256_sll_epi32(
                _mm256_load_si256(reinterpret_cast<const __m256i*>(head_bits32.p + j0)), to_top);
            uint8_t* dst = v_t8 + (j0 >> 3);
            for (int64_t c = d - 1; c >= 0; --c) {
              dst[c * col_stride] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_castsi256_ps(x)));
              x = _mm256_add_epi32(x, x);
            }
          }
        } else if (d <= 64) {
          for (int64_t j = 0; j < S; ++j)
            head_bits64[j] = bit_field(a.v + (row0 + j) * a.nw64, h * d, d);
          const __m128i to_top = _mm_cvtsi32_si128(static_cast<int>(64 - d));
          for (int64_t j0 = 0; j0 < S; j0 += 8) {
            __m256i x0 = _mm256_sll_epi64(
                _mm256_load_si256(reinterpret_cast<const __m256i*>(head_bits64.p + j0)), to_top);
            __m256i x1 = _mm256_sll_epi64(
                _mm256_load_si256(reinterpret_cast<const __m256i*>(head_bits64.p + j0 + 4)),
                to_top);
            uint8_t* dst = v_t8 + (j0 >> 3);
            for (int64_t c = d - 1; c >= 0; --c) {
              dst[c * col_stride] =
                  static_cast<uint8_t>(_mm256_movemask_pd(_mm256_castsi256_pd(x0)) |
                                       (_mm256_movemask_pd(_mm256_castsi256_pd(x1)) << 4));
              x0 = _mm256_add_epi64(x0, x0);
              x1 = _mm256_add_epi64(x1, x1);
            }
          }
        } else {
          for (int64_t j = 0; j < S; ++j)
            for_each_set_bit(a.v + (row0 + j) * a.nw64, h * d, d, [&](int64_t c) {
              v_t[c * key_words + (j >> 6)] |= uint64_t{1} << (j & 63);
            });
        }
        for (int64_t blk0 = 0; blk0 < blocks; blk0 += kChunk) {
          switch (std::min(kChunk, blocks - blk0)) {
            case 8: attend_chunk<8>(a, w, Sp, row0, h, hc, blk0, mask, key_words); break;
            case 7: attend_chunk<7>(a, w, Sp, row0, h, hc, blk0, mask, key_words); break;
            case 6: attend_chunk<6>(a, w, Sp, row0, h, hc, blk0, mask, key_words); break;
            case 5: attend_chunk<5>(a, w, Sp, row0, h, hc, blk0, mask, key_words); break;
            case 4: attend_chunk<4>(a, w, Sp, row0, h, hc, blk0, mask, key_words); break;
            case 3: attend_chunk<3>(a, w, Sp, row0, h, hc, blk0, mask, key_words); break;
            case 2: attend_chunk<2>(a, w, Sp, row0, h, hc, blk0, mask, key_words); break;
            default: attend_chunk<1>(a, w, Sp, row0, h, hc, blk0, mask, key_words); break;
          }
        }
      }
      // This task owns whole words [c0 / 64, c0 / 64 + width_words) of every A row. A word's 64
      // columns hold one 8-query byte each (two vectors); moving bit l of every byte to its top
      // (bytes doubled with VPADDB, which never carries across bytes) and VPMOVMSKB gives query
      // l's word, from l = 7 down.
      for (int64_t blk = 0; blk < blocks; ++blk) {
        for (int64_t wd = 0; wd < width_words; ++wd) {
          const uint8_t* f = w.fired + blk * w.fired_stride + wd * 64;
          __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(f));
          __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(f + 32));
          for (int64_t l = 7; l >= 0; --l) {
            if (blk * 8 + l < S) {
              const uint64_t word =
                  static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_epi8(lo))) |
                  static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_epi8(hi))) << 32;
              a.spikes[(row0 + blk * 8 + l) * a.nw64 + c0 / 64 + wd] = word;
            }
            lo = _mm256_add_epi8(lo, lo);
            hi = _mm256_add_epi8(hi, hi);
          }
        }
      }
    }
    if (a.rates != nullptr) {
      const float steps = static_cast<float>(a.T);
      for (int64_t i = 0; i < S; ++i)
        for (int64_t c = 0; c < width; ++c)
          a.rates[(b * S + i) * HD + c0 + c] = static_cast<float>(counts[c * Sp + i]) / steps;
    }
  }
}

void bernoulli_avx2(const BernoulliArgs& a, int64_t begin, int64_t end) {
  const int64_t blocks = (a.K + 7) / 8;
  const __m256i m1 = _mm256_set1_epi32(0x7feb352d);
  const __m256i m2 = _mm256_set1_epi32(static_cast<int>(0x846ca68bu));
  // mix32 split after its first xor-shift, which distributes over the step key's xor:
  // (m ^ k) ^ ((m ^ k) >> 16) = (m ^ (m >> 16)) ^ (k ^ (k >> 16)), so the per-element half is
  // stored once and every step starts at the first multiply.
  auto xorshift16 = [&](__m256i x) { return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16)); };
  auto mix_rest = [&](__m256i x) {
    x = _mm256_mullo_epi32(x, m1);
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, m2);
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  };
  auto mix = [&](__m256i x) { return mix_rest(xorshift16(x)); };
  // u = (h >> 8) * 2^-24 < rate  <=>  (h >> 8) < ceil(rate * 2^24), both sides exact (an integer
  // below 2^24 and a power-of-two scaling), so each element's threshold is formed once and every
  // step compares integers; both sides are below 2^25, so the signed compare is the unsigned one.
  // NaN rates become threshold 0 (VMAXPS returns its second operand): never fire, as u < NaN.
  // Lanes past K get threshold 0: they never fire.
  const __m256 two_p24 = _mm256_set1_ps(16777216.0f);
  const __m256i always = _mm256_set1_epi32(1 << 24);
  // Threshold 0 never fires and 2^24 always does (h >> 8 < 2^24): about half the rates of a
  // spiking layer are exactly 0 or 1, so only the other elements are hashed. Each row's
  // undecided elements are packed densely (their hashes and thresholds, in column order), every
  // step hashes that dense list into a bit stream, and PDEP (fast on Zen 3 and Intel) deposits
  // the stream's bits at the undecided positions of each 64-bit word, beside the always-firing
  // ones. Rows with few decided elements skip the packing: the deposit would cost more than the
  // hashes it saves. Rows go in tiles whose element hashes and thresholds are formed once, then
  // step by step, so the words of one step are written contiguously.
  constexpr int64_t kTileRows = 16;
  // + padding to whole words of 64 with threshold 0 (the stream's last word hashes them), and 8
  // lanes for the full-vector store of the last packed block
  const int64_t dense_len = (blocks * 8 + 8 + 63) / 64 * 64;
  const int64_t words = a.kw64;
  Scratch<uint32_t> mixed(kTileRows * dense_len), threshold(kTileRows * dense_len);
  Scratch<uint64_t> undecided(kTileRows * words), fires(kTileRows * words);
  Scratch<uint64_t> stream(dense_len / 64 + 2);
  int64_t dense_count[kTileRows];
  auto threshold_of = [&](int64_t m, int64_t blk) {
    const __m256 rate = _mm256_maskload_ps(a.rates + m * a.K + blk * 8, lane_mask8(a.K - blk * 8));
    const __m256 scaled =
        _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(rate, two_p24), _mm256_setzero_ps()), two_p24);
    return _mm256_cvttps_epi32(_mm256_round_ps(scaled, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
  };
  auto hashed_of = [&](int64_t m, int64_t blk) {  // xorshift16(mix32(element))
    const int64_t valid = a.K - blk * 8;
    const long long* cols = reinterpret_cast<const long long*>(a.cols + blk * 8);
    const __m256i lo = _mm256_maskload_epi64(cols, lane_mask4(valid));
    const __m256i hi = _mm256_maskload_epi64(cols + 4, lane_mask4(valid - 4));
    // The element's low 32 bits: (m * full_width) + col mod 2^32, the low halves gathered.
    const __m256i low = _mm256_castps_si256(_mm256_shuffle_ps(
        _mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi), _MM_SHUFFLE(2, 0, 2, 0)));
    const __m256i ordered = _mm256_permute4x64_epi64(low, _MM_SHUFFLE(3, 1, 2, 0));
    const __m256i element = _mm256_add_epi32(
        ordered, _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(
                     static_cast<uint64_t>(m) * static_cast<uint64_t>(a.full_width)))));
    return xorshift16(mix(element));
  };
  auto drawn_directly = [&](int64_t i) { return dense_count[i] * 4 > blocks * 8 * 3; };
  for (int64_t m0 = begin; m0 < end; m0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, end - m0);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t m = m0 + i;
      uint32_t* row_mixed = mixed.p + i * dense_len;
      uint32_t* row_threshold = threshold.p + i * dense_len;
      uint8_t* row_undecided = reinterpret_cast<uint8_t*>(undecided.p + i * words);
      uint8_t* row_fires = reinterpret_cast<uint8_t*>(fires.p + i * words);
      int64_t n = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {  // the masks, to choose the row's path
        const __m256i thr = threshold_of(m, blk);
        const uint32_t fire = static_cast<uint32_t>(
            _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(thr, always))));
        const uint32_t zero = static_cast<uint32_t>(_mm256_movemask_ps(
            _mm256_castsi256_ps(_mm256_cmpeq_epi32(thr, _mm256_setzero_si256()))));
        const uint32_t open = ~(fire | zero) & 0xffu;
        n += _mm_popcnt_u32(open);
        row_undecided[blk] = static_cast<uint8_t>(open);
        row_fires[blk] = static_cast<uint8_t>(fire);
      }
      for (int64_t blk = blocks; blk < words * 8; ++blk) row_undecided[blk] = row_fires[blk] = 0;
      dense_count[i] = n;
      if (drawn_directly(i)) {
        for (int64_t blk = 0; blk < blocks; ++blk) {
          _mm256_store_si256(reinterpret_cast<__m256i*>(row_mixed + blk * 8), hashed_of(m, blk));
          _mm256_store_si256(reinterpret_cast<__m256i*>(row_threshold + blk * 8),
                             threshold_of(m, blk));
        }
        continue;
      }
      int64_t packed = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        // The 8 lanes past the packed count are overwritten by the next block or the padding.
        const uint32_t open = row_undecided[blk];
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row_mixed + packed),
                            compress8(hashed_of(m, blk), open));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row_threshold + packed),
                            compress8(threshold_of(m, blk), open));
        packed += _mm_popcnt_u32(open);
      }
      const int64_t word_end = (n + 63) / 64 * 64;
      for (int64_t o = n; o < word_end; ++o) row_mixed[o] = row_threshold[o] = 0;
    }
    for (int64_t s = 0; s < a.steps; ++s) {
      const __m256i key = xorshift16(_mm256_set1_epi32(static_cast<int>(a.step_keys[s])));
      for (int64_t i = 0; i < rows; ++i) {
        uint64_t* out = a.spikes + (s * a.M + m0 + i) * words;
        const uint32_t* row_mixed = mixed.p + i * dense_len;
        const uint32_t* row_threshold = threshold.p + i * dense_len;
        if (drawn_directly(i)) {  // mostly undecided: every element drawn
          uint8_t* out8 = reinterpret_cast<uint8_t*>(out);
          for (int64_t blk = 0; blk < blocks; ++blk) {
            const __m256i h = mix_rest(_mm256_xor_si256(
                _mm256_load_si256(reinterpret_cast<const __m256i*>(row_mixed + blk * 8)), key));
            const __m256i thr =
                _mm256_load_si256(reinterpret_cast<const __m256i*>(row_threshold + blk * 8));
            out8[blk] = static_cast<uint8_t>(_mm256_movemask_ps(
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(thr, _mm256_srli_epi32(h, 8)))));
          }
          for (int64_t blk = blocks; blk < words * 8; ++blk) out8[blk] = 0;
          continue;
        }
        const int64_t dense_words = (dense_count[i] + 63) / 64;
        for (int64_t wd = 0; wd < dense_words; ++wd) {
          uint64_t word = 0;
#pragma GCC unroll 8
          for (int q = 0; q < 8; ++q) {
            const int64_t o = (wd * 8 + q) * 8;
            const __m256i h = mix_rest(_mm256_xor_si256(
                _mm256_load_si256(reinterpret_cast<const __m256i*>(row_mixed + o)), key));
            const __m256i thr =
                _mm256_load_si256(reinterpret_cast<const __m256i*>(row_threshold + o));
            const uint32_t fired = static_cast<uint32_t>(_mm256_movemask_ps(
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(thr, _mm256_srli_epi32(h, 8)))));
            word |= static_cast<uint64_t>(fired) << (8 * q);
          }
          stream.p[wd] = word;
        }
        const uint64_t* row_undecided = undecided.p + i * words;
        const uint64_t* row_fires = fires.p + i * words;
        int64_t offset = 0;
        for (int64_t wd = 0; wd < words; ++wd) {
          const int64_t len = _mm_popcnt_u64(row_undecided[wd]);
          out[wd] = _pdep_u64(len == 0 ? 0 : bit_field(stream.p, offset, len), row_undecided[wd]) |
                    row_fires[wd];
          offset += len;
        }
      }
    }
  }
}

}  // namespace spikeinfer_cpu

#pragma GCC pop_options
