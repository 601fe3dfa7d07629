// AVX2 (with FMA, POPCNT, BMI1/2) kernels of the binary projection and the neuron scans, selected
// at run time on x86-64 CPUs without AVX-512 VPOPCNTDQ (AMD Zen 1-3, Intel Haswell to Comet Lake).
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
// of 8 columns. Epilogues and the IF/LIF scan evaluate exactly the expressions of
// kernels_portable.cpp in the same order, lane-wise, so every path gives the same bits.

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

namespace spikeinfer_cpu {

namespace {

// 8-lane float vector for the shared rowwise_moments template (PyTorch's LayerNorm moments).
struct Avx2Vec8 {
  static constexpr int64_t kLanes = 8;
  __m256 v;
  static Avx2Vec8 set1(float a) { return {_mm256_set1_ps(a)}; }
  static Avx2Vec8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  static Avx2Vec8 fmadd(const Avx2Vec8& a, const Avx2Vec8& b, const Avx2Vec8& c) {
    return {_mm256_fmadd_ps(a.v, b.v, c.v)};
  }
};

// Free operators: GCC does not apply the target pragma to friend functions defined in a class.
inline Avx2Vec8 operator+(const Avx2Vec8& a, const Avx2Vec8& b) {
  return {_mm256_add_ps(a.v, b.v)};
}
inline Avx2Vec8 operator-(const Avx2Vec8& a, const Avx2Vec8& b) {
  return {_mm256_sub_ps(a.v, b.v)};
}
inline Avx2Vec8 operator*(const Avx2Vec8& a, const Avx2Vec8& b) {
  return {_mm256_mul_ps(a.v, b.v)};
}

// Scratch memory without std containers, so no library template is instantiated for this target.
template <class T>
struct Scratch {
  T* p = nullptr;
  explicit Scratch(int64_t n) {
    const size_t bytes = ((static_cast<size_t>(n > 0 ? n : 1) * sizeof(T) + 63) / 64) * 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (p == nullptr) std::abort();
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Lanes [0, valid) of 8 as an all-ones mask (valid >= 8: all).
inline __m256i tail_mask8(int64_t valid) {
  const int64_t v = std::max<int64_t>(0, std::min<int64_t>(valid, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(v)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline uint64_t last_word64_mask(int64_t bits) {
  const int64_t rem = bits % 64;
  return rem == 0 ? ~uint64_t{0} : (uint64_t{1} << rem) - 1;
}

inline int32_t masked_popcount(const uint64_t* row, int64_t K, int64_t kw64) {
  int64_t total = 0;
  for (int64_t k = 0; k + 1 < kw64; ++k) total += _mm_popcnt_u64(row[k]);
  if (kw64 > 0) total += _mm_popcnt_u64(row[kw64 - 1] & last_word64_mask(K));
  return static_cast<int32_t>(total);
}

// Software prefetch of [p, p + bytes): a row's consecutive steps lie M rows apart in the
// time-major tensors, a stride the hardware prefetchers do not follow (kernels_avx512.cpp).
constexpr int64_t kPrefetchSteps = 2;

template <bool kForWrite>
inline void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, kForWrite ? 1 : 0, 3);
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
  __m256 q = gelu_coefficient(kGeluDegree, i, upper);
#pragma GCC unroll 8
  for (int k = kGeluDegree - 1; k >= 0; --k)
    q = _mm256_fmadd_ps(q, u, gelu_coefficient(k, i, upper));
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

// Currents of R rows for C consecutive column groups of 8 starting at group g:
// out[r][(g - g_base + c) * 8 + lane], plus the residual spikes (bytes res8[r][g]) when given.
// s_nib[r] holds row r's nibble words broadcast: [kw32][2][8] (lo, hi).
template <int R, int C>
inline void project_tile(const uint32_t* const* s_nib, const int32_t* popc, int64_t kw32,
                         const uint32_t* w_il, int64_t g, int64_t g_base, int64_t N,
                         const float* alpha, const float* bias, const uint8_t* const* res8,
                         float* const* out) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,  //
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i ones8 = _mm256_set1_epi8(1);
  const __m256i ones16 = _mm256_set1_epi16(1);
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
          const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(wl, _mm256_load_si256(s)));
          const __m256i hi =
              _mm256_shuffle_epi8(lut, _mm256_and_si256(wh, _mm256_load_si256(s + 1)));
          acc[r][c] = _mm256_add_epi8(acc[r][c], _mm256_add_epi8(lo, hi));
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c)
        total[r][c] = _mm256_add_epi32(
            total[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(acc[r][c], ones8), ones16));
  }
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) {
    const __m256i valid = tail_mask8(N - (g + c) * 8);
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
  for (; g < g1; ++g) step(g, tail_mask8(N - g * 8), false);
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
    const __m256i valid = tail_mask8(N - g * 8);
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

}  // namespace spikeinfer_cpu

#pragma GCC pop_options
