// AVX-512 (F, BW, DQ, VL, VPOPCNTDQ) kernels, selected at run time when the CPU has the flags.
//
// Binary projection, vectorised across output columns so the inner loop has no horizontal
// reduction: the +1-sign words of 16 output columns are interleaved, so one 512-bit load holds
// the same 32-bit input word for 16 columns, and for a row of spikes s
//
//   acc[n] += popcnt32(w+[n, k] & broadcast(s[k]))         (16 columns per instruction)
//   I[n]    = float(2 * acc[n] - popc(s)) * alpha[n] + bias[n]
//
// register-blocked over R rows of spikes (one weight load feeds R rows) and C column groups.
// Epilogues, the IF/LIF scan, attention and the Bernoulli hash evaluate exactly the expressions of
// kernels_portable.cpp in the same order (lane-wise), or ones proven to give the same bits (the
// Bernoulli test on integers, the softmax exp's single-step scaling; see each), so both paths
// agree bit for bit.
//
// Attention runs transposed (queries in vector lanes), which turns both products with spiking
// operands into sparse sums over the set bits of K and V:
//   sT[j][i] = sum_{c in K[j]} qT[c][i],   then softmax down j per lane (torch.softmax's order),
//   aT[c][i] = sum_{j : c in V[j]} pT[j][i].

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

// Everything after this line (including the shared header's internal-linkage maths) is compiled
// for AVX-512; the library headers above keep their generic code.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,fma,popcnt,bmi,bmi2")

#include "spikeinfer_cpu.h"
#include "simd_common.h"

namespace spikeinfer_cpu {

namespace {

inline __mmask16 tail_mask16(int64_t valid) {
  return valid >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
}

// ---- exact replicas of the scalar maths in spikeinfer_cpu.h, 16 lanes at a time --------------

// sleef_expf_u10 for d <= 0 (softmax arguments, the max already subtracted). Sleef scales by
// 2^q as two exact power-of-two products, u * 2^(q/2) * 2^(q - q/2), so that the intermediate
// stays normal; VSCALEFPS forms u * 2^q in one step with a single rounding, which for d >= -104
// (q >= -150) is the same rounding of the same exact product, so the result is identical to
// the scalar replica bit for bit at about two thirds of the instructions.
inline __m512 sleef_expf_u10_nonpositive_v(__m512 d) {
  const __m512 qf = _mm512_roundscale_ps(
      _mm512_mul_ps(d, _mm512_set1_ps(
                           1.442695040888963407359924681001892137426645954152985934135449406931f)),
      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-0.693145751953125f), d);
  s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-1.428606765330187045e-06f), s);
  __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00139304355252534151077271f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00833336077630519866943359f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.0416664853692054748535156f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.166666671633720397949219f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
  u = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
  u = _mm512_scalef_ps(u, qf);
  return _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.0f), _CMP_LT_OQ),
                            _mm512_setzero_ps());
}

// acc + popcount(x & broadcast(w)) on 16 lanes of 32 bits.
inline __m512i popcount_add(__m512i acc, __m512i x, uint32_t w) {
  return _mm512_add_epi32(
      acc, _mm512_popcnt_epi32(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(w)))));
}

// One IF/LIF step on 16 lanes, the neuron's leak and comparison fixed at compile time; returns
// the fired mask and updates v in place.
template <bool kUnitLeak, bool kFireOnGe>
inline __mmask16 neuron_step_t(__m512 leak, __m512 th, __m512 current, __m512& v) {
  const __m512 h = kUnitLeak ? _mm512_add_ps(v, current)
                             : _mm512_add_ps(_mm512_mul_ps(leak, v), current);
  const __mmask16 fired = _mm512_cmp_ps_mask(h, th, kFireOnGe ? _CMP_GE_OQ : _CMP_GT_OQ);
  v = _mm512_mask_sub_ps(h, fired, h, th);
  return fired;
}

// The same with the neuron read at run time (attention's A scan, a step per column and block).
inline __mmask16 neuron_step_v(const NeuronSpec& n, __m512 current, __m512& v) {
  const __m512 leak = _mm512_set1_ps(n.leak), th = _mm512_set1_ps(n.v_th);
  if (n.leak == 1.0f)
    return n.fire_on_ge ? neuron_step_t<true, true>(leak, th, current, v)
                        : neuron_step_t<true, false>(leak, th, current, v);
  return n.fire_on_ge ? neuron_step_t<false, true>(leak, th, current, v)
                      : neuron_step_t<false, false>(leak, th, current, v);
}

// The scalar gelu of spikeinfer_cpu.h on 16 lanes: each power of u's 16 coefficients fill one
// register and VPERMPS picks every lane's interval, so the epilogue costs a few instructions per
// lane and no pass over memory (the table loads are loop-invariant and leave the scan's loop).
inline __m512 gelu16(__m512 x) {
  const __m512 a = _mm512_abs_ps(x);
  const __m512 clamped = _mm512_min_ps(a, _mm512_set1_ps(kGeluMaxTail));  // NaN -> the bound
  const __m512i i = _mm512_cvttps_epi32(_mm512_mul_ps(clamped, _mm512_set1_ps(kGeluInvWidth)));
  const __m512 u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_set1_ps(-kGeluWidth),
                                   _mm512_sub_ps(clamped, _mm512_set1_ps(0.5f * kGeluWidth)));
  __m512 q = _mm512_permutexvar_ps(i, _mm512_load_ps(kGeluTail[kGeluDegree]));
#pragma GCC unroll 8
  for (int k = kGeluDegree - 1; k >= 0; --k)
    q = _mm512_fmadd_ps(q, u, _mm512_permutexvar_ps(i, _mm512_load_ps(kGeluTail[k])));
  const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 phi = _mm512_mask_sub_ps(q, positive, _mm512_set1_ps(1.0f), q);
  return _mm512_mul_ps(x, phi);
}

// ---- binary projection microkernel -----------------------------------------------------------

// acc[r][c][lane] = popcount(w+ & s) over the K words of spike row r and column (c, lane) of
// the C interleaved groups at w: the K loop every projection tile runs. Every loop over r and c
// is unrolled so that acc stays in registers (GCC keeps a partly indexed array in memory and
// stores it on every iteration of the K loop).
template <int R, int C>
inline void popcount_tile(const uint32_t* const* rows, int64_t kw32, const uint32_t* w,
                          __m512i (&acc)[R][C]) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t k = 0; k < kw32; ++k) {
    __m512i wv[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_si512(w + (c * kw32 + k) * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i s = _mm512_set1_epi32(static_cast<int>(rows[r][k]));
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c)
        acc[r][c] = _mm512_add_epi32(acc[r][c], _mm512_popcnt_epi32(_mm512_and_si512(wv[c], s)));
    }
  }
}

// Currents of R rows for C consecutive interleaved column groups starting at group g:
// out[r][(g - g_base + c) * 16 + lane], plus the residual spikes (16-bit slots res16[r][g]) when
// given. The accumulators live in registers for the whole K loop.
template <int R, int C>
inline void project_tile(const uint32_t* const* rows, const int32_t* popc, int64_t kw32,
                         const uint32_t* w_il, int64_t g, int64_t g_base, int64_t N,
                         const float* alpha, const float* bias, const uint16_t* const* res16,
                         float* const* out) {
  __m512i acc[R][C];
  popcount_tile<R, C>(rows, kw32, w_il + g * kw32 * 16, acc);
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) {
    const __mmask16 valid = tail_mask16(N - (g + c) * 16);
    const __m512 al = _mm512_maskz_loadu_ps(valid, alpha + (g + c) * 16);
    const __m512 bi = _mm512_maskz_loadu_ps(valid, bias + (g + c) * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i count =
          _mm512_sub_epi32(_mm512_slli_epi32(acc[r][c], 1), _mm512_set1_epi32(popc[r]));
      __m512 f = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(count), al), bi);
      if (res16 != nullptr)  // + residual spike (1.0 or 0.0), as the reference adds it
        f = _mm512_add_ps(f, _mm512_maskz_mov_ps(static_cast<__mmask16>(res16[r][g + c]) & valid,
                                                 _mm512_set1_ps(1.0f)));
      _mm512_store_ps(out[r] + (g - g_base + c) * 16, f);
    }
  }
}

// Currents of R rows for column groups [g0, g1): out[r][0 .. (g1 - g0) * 16) (lanes past N are
// don't-care).
template <int R>
inline void project_rows(const uint32_t* const* rows, const int32_t* popc, int64_t kw32,
                         const uint32_t* w_il, int64_t g0, int64_t g1, int64_t N,
                         const float* alpha, const float* bias, const uint16_t* const* res16,
                         float* const* out) {
  constexpr int C = 4;
  int64_t g = g0;
  for (; g + C <= g1; g += C)
    project_tile<R, C>(rows, popc, kw32, w_il, g, g0, N, alpha, bias, res16, out);
  for (; g < g1; ++g)
    project_tile<R, 1>(rows, popc, kw32, w_il, g, g0, N, alpha, bias, res16, out);
}

// LayerNorm coefficients (-mean, rstd) of R rows of currents (residual already added).
template <int R>
inline void layer_norm_stats(const float* const* cur, int64_t N, float eps, float* neg_mean,
                             float* rstd) {
  layer_norm_coefficients<Avx2Vec8, R>(cur, N, eps, neg_mean, rstd);
}

// The LayerNorm output of a row as PyTorch rounds it: fma((x - mean) * rstd, gamma, beta).
struct LayerNormApply {
  float neg_mean, rstd;
  const float* weight;
  const float* bias;
};

// One neuron step for column groups [g0, g1) of a row: currents, membrane and counts are
// chunk-relative (padded to whole groups of 16); spikes go to 16-bit slots g of the packed row,
// and the row's unused trailing slots are cleared with the last chunk, so every word is written.
// The neuron's leak and comparison and the epilogue are template arguments: this loop runs once
// per feature group, row and step, and branching on them per group cost a fifth of it. The
// epilogue (LayerNorm with the row's coefficients, or GELU) and then the gate apply to the
// currents before the neuron sees them, as in the reference.
template <bool kUnitLeak, bool kFireOnGe, Epilogue kEpi>
inline void scan_groups_t(const NeuronSpec& spec, const float* cur, float* membrane,
                          int32_t* counts, int64_t N, int64_t g0, int64_t g1, uint64_t* bits,
                          int64_t nw64, const LayerNormApply* ln, const float* gate,
                          float* current_out) {
  uint16_t* bits16 = reinterpret_cast<uint16_t*>(bits);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512 leak = _mm512_set1_ps(spec.leak), th = _mm512_set1_ps(spec.v_th);
  __m512 neg_mean = _mm512_setzero_ps(), rstd = neg_mean;
  if constexpr (kEpi == kEpilogueResidualLayerNorm) {
    neg_mean = _mm512_set1_ps(ln->neg_mean);
    rstd = _mm512_set1_ps(ln->rstd);
  }
  auto step = [&](int64_t g, __mmask16 valid) {
    const int64_t o = (g - g0) * 16;
    __m512 x = _mm512_load_ps(cur + o);
    if constexpr (kEpi == kEpilogueResidualLayerNorm) {
      x = _mm512_mul_ps(_mm512_add_ps(x, neg_mean), rstd);
      x = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(valid, ln->weight + g * 16),
                          _mm512_maskz_loadu_ps(valid, ln->bias + g * 16));
    }
    if constexpr (kEpi == kEpilogueGelu) x = gelu16(x);
    if (gate != nullptr) x = _mm512_mul_ps(x, _mm512_maskz_loadu_ps(valid, gate + g * 16));
    if (current_out != nullptr) _mm512_mask_storeu_ps(current_out + g * 16, valid, x);
    __m512 v = _mm512_load_ps(membrane + o);
    const __mmask16 fired = neuron_step_t<kUnitLeak, kFireOnGe>(leak, th, x, v) & valid;
    _mm512_store_ps(membrane + o, v);
    bits16[g] = static_cast<uint16_t>(fired);
    const __m512i c = _mm512_load_si512(counts + o);
    _mm512_store_si512(counts + o, _mm512_mask_add_epi32(c, fired, c, one));
  };
  const int64_t full = std::min(g1, N / 16);  // groups with all 16 lanes valid
  int64_t g = g0;
  for (; g < full; ++g) step(g, static_cast<__mmask16>(0xFFFF));
  for (; g < g1; ++g) step(g, tail_mask16(N - g * 16));
  if (g1 == (N + 15) / 16)
    for (int64_t gg = g1; gg < nw64 * 4; ++gg) bits16[gg] = 0;
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
  const __m512 steps = _mm512_set1_ps(static_cast<float>(T));
  for (int64_t g = 0; g * 16 < N; ++g) {
    const __mmask16 valid = tail_mask16(N - g * 16);
    const __m512 c = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(valid, counts + g * 16));
    _mm512_mask_storeu_ps(rates + g * 16, valid, _mm512_div_ps(c, steps));
  }
}

// ---- plain epilogue: the membrane in registers across the steps -----------------------------

// R rows by C column groups at every step, the steps innermost: the accumulators, the membrane
// and the spike counts of the tile all stay in registers from t = 0 to T - 1, so a step costs
// the K loop plus a handful of instructions per 16 outputs (the row-at-a-time scan reloads and
// stores membrane, counts and currents at every step: a fifth of the op's samples at K = N = 384).
// The steps' spike rows (4 x T x K / 8 bytes) and the tile's weights stay in L1 across the
// column groups. popc[t * R + r]: the set bits of row r at step t.
template <int R, int C, bool kUnitLeak, bool kFireOnGe>
inline void project_scan_tile(const LinearNeuronArgs& a, int64_t m0, int64_t rr, int64_t g,
                              int64_t kw32, const int32_t* popc) {
  const int64_t N = a.N;
  const __m512 leak = _mm512_set1_ps(a.neuron.leak), th = _mm512_set1_ps(a.neuron.v_th);
  __m512 v[R][C];
  __m512i cnt[R][C];
  __mmask16 valid[C];
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) {
    valid[c] = tail_mask16(N - (g + c) * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      v[r][c] = _mm512_setzero_ps();
      cnt[r][c] = _mm512_setzero_si512();
    }
  }
  const uint32_t* w = a.w_il + g * kw32 * 16;
  for (int64_t t = 0; t < a.T; ++t) {
    const uint32_t* rows[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)  // short blocks repeat their last row, never stored
      rows[r] = reinterpret_cast<const uint32_t*>(
          a.x + (t * a.M + m0 + std::min<int64_t>(r, rr - 1)) * a.kw64);
    __m512i acc[R][C];
    popcount_tile<R, C>(rows, kw32, w, acc);
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const int64_t col = (g + c) * 16;
      const __m512 al = _mm512_maskz_loadu_ps(valid[c], a.alpha + col);
      const __m512 bi = _mm512_maskz_loadu_ps(valid[c], a.bias + col);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const int64_t row = t * a.M + m0 + r;
        const __m512i count = _mm512_sub_epi32(_mm512_slli_epi32(acc[r][c], 1),
                                               _mm512_set1_epi32(popc[t * R + r]));
        __m512 x = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(count), al), bi);
        if (a.gate != nullptr)
          x = _mm512_mul_ps(x, _mm512_maskz_loadu_ps(valid[c], a.gate + col));
        const __mmask16 fired = neuron_step_t<kUnitLeak, kFireOnGe>(leak, th, x, v[r][c]) &
                                valid[c];
        cnt[r][c] = _mm512_mask_sub_epi32(cnt[r][c], fired, cnt[r][c], _mm512_set1_epi32(-1));
        if (r < rr) {
          reinterpret_cast<uint16_t*>(a.spikes + row * a.nw64)[g + c] =
              static_cast<uint16_t>(fired);
          if (a.out != nullptr) _mm512_mask_storeu_ps(a.out + row * N + col, valid[c], x);
        }
      }
    }
  }
  if (a.rates == nullptr) return;
  const __m512 steps = _mm512_set1_ps(static_cast<float>(a.T));
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    if (r < rr)
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c)
        _mm512_mask_storeu_ps(a.rates + (m0 + r) * N + (g + c) * 16, valid[c],
                              _mm512_div_ps(_mm512_cvtepi32_ps(cnt[r][c]), steps));
}

template <int R, int C, bool kUnitLeak, bool kFireOnGe>
void linear_neuron_plain_t(const LinearNeuronArgs& a, int64_t begin, int64_t end) {
  const int64_t N = a.N, groups = (N + 15) / 16, kw32 = (a.K + 31) / 32;
  Scratch<int32_t> popc(a.T * R);
  for (int64_t m0 = begin; m0 < end; m0 += R) {
    const int64_t rr = std::min<int64_t>(R, end - m0);
    for (int64_t t = 0; t < a.T; ++t)
      for (int r = 0; r < R; ++r)
        popc[t * R + r] =
            masked_popcount(a.x + (t * a.M + m0 + std::min<int64_t>(r, rr - 1)) * a.kw64, a.K,
                            a.kw64);
    int64_t g = 0;
    for (; g + C <= groups; g += C)
      project_scan_tile<R, C, kUnitLeak, kFireOnGe>(a, m0, rr, g, kw32, popc.p);
    for (; g < groups; ++g)
      project_scan_tile<R, 1, kUnitLeak, kFireOnGe>(a, m0, rr, g, kw32, popc.p);
    // The rows' unused trailing 16-bit slots.
    for (int64_t t = 0; t < a.T; ++t)
      for (int64_t r = 0; r < rr; ++r) {
        uint16_t* bits16 = reinterpret_cast<uint16_t*>(a.spikes + (t * a.M + m0 + r) * a.nw64);
        for (int64_t gg = groups; gg < a.nw64 * 4; ++gg) bits16[gg] = 0;
      }
  }
}

// The plain epilogue (K, V): currents straight into the neuron.
void linear_neuron_plain(const LinearNeuronArgs& a, int64_t begin, int64_t end) {
  const bool unit = a.neuron.leak == 1.0f, ge = a.neuron.fire_on_ge;
  if (unit)
    ge ? linear_neuron_plain_t<4, 2, true, true>(a, begin, end)
       : linear_neuron_plain_t<4, 2, true, false>(a, begin, end);
  else
    ge ? linear_neuron_plain_t<4, 2, false, true>(a, begin, end)
       : linear_neuron_plain_t<4, 2, false, false>(a, begin, end);
}

}  // namespace

void linear_neuron_avx512(const LinearNeuronArgs& a, int64_t begin, int64_t end) {
  // The plain epilogue keeps the membrane in registers across the steps. GELU stays on the
  // row-at-a-time scan below, whose loop keeps GELU's 7 coefficient tables in registers: with
  // the steps innermost they compete with the tile for registers and the op ran 10 % slower
  // (384 x 1536, two threads, interleaved with the row-at-a-time path).
  if (a.epilogue == kEpiloguePlain) return linear_neuron_plain(a, begin, end);
  constexpr int R = 4;  // rows of spikes sharing each weight load
  const int64_t N = a.N, groups = (N + 15) / 16;
  const int64_t kw32 = (a.K + 31) / 32;
  // Elementwise epilogues run over column chunks whose weights (kw32 * 64 bytes per group of 16
  // columns) stay in L1 for all T steps of a block of rows; LayerNorm needs whole rows.
  const bool whole_rows = a.epilogue == kEpilogueNone || a.epilogue == kEpilogueResidualLayerNorm;
  const int64_t chunk =
      whole_rows ? groups : std::max<int64_t>(4, (16384 / std::max<int64_t>(kw32 * 64, 1)) / 4 * 4);
  const int64_t chunk_cols = std::min(chunk, groups) * 16;
  Scratch<float> cur(R * chunk_cols), membrane(R * chunk_cols);
  Scratch<int32_t> counts(R * chunk_cols);
  std::memset(cur.p, 0, sizeof(float) * R * chunk_cols);
  const bool layer_norm = a.epilogue == kEpilogueResidualLayerNorm;
  float ln_neg_mean[R], ln_rstd[R];  // per row of the current step
  const uint32_t* rows[R];
  const uint16_t* res16[R];
  float* cur_rows[R];
  int32_t popc[R];
  for (int64_t m0 = begin; m0 < end; m0 += R) {
    const int64_t rr = std::min<int64_t>(R, end - m0);
    for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
      const int64_t g1 = std::min(groups, g0 + chunk);
      const int64_t n0 = g0 * 16, valid_cols = std::min(N, g1 * 16) - n0;
      std::memset(membrane.p, 0, sizeof(float) * R * chunk_cols);
      std::memset(counts.p, 0, sizeof(int32_t) * R * chunk_cols);
      for (int64_t t = 0; t < a.T; ++t) {
        for (int r = 0; r < R; ++r) {
          // Short blocks repeat their last row; the duplicate results are never stored.
          const int64_t row = t * a.M + m0 + std::min<int64_t>(r, rr - 1);
          rows[r] = reinterpret_cast<const uint32_t*>(a.x + row * a.kw64);
          popc[r] = masked_popcount(a.x + row * a.kw64, a.K, a.kw64);
          if (a.residual != nullptr)
            res16[r] = reinterpret_cast<const uint16_t*>(a.residual + row * a.nw64);
          cur_rows[r] = cur.p + r * chunk_cols;
        }
        if (t + kPrefetchSteps < a.T) {
          const int64_t ahead = (t + kPrefetchSteps) * a.M + m0;
          prefetch_span<false>(a.x + ahead * a.kw64, rr * a.kw64 * 8);
          if (a.epilogue != kEpilogueNone && g0 == 0)
            prefetch_span<true>(a.spikes + ahead * a.nw64, rr * a.nw64 * 8);
        }
        project_rows<R>(rows, popc, kw32, a.w_il, g0, g1, N, a.alpha, a.bias,
                        a.residual != nullptr ? res16 : nullptr, cur_rows);
        if (a.epilogue == kEpilogueNone) {
          for (int64_t r = 0; r < rr; ++r)
            std::memcpy(a.out + (t * a.M + m0 + r) * N, cur_rows[r], sizeof(float) * N);
          continue;
        }
        if (layer_norm && N > 0) {  // whole rows: the coefficients for the scan
          if (rr == R)
            layer_norm_stats<R>(cur_rows, N, a.eps, ln_neg_mean, ln_rstd);
          else
            for (int64_t r = 0; r < rr; ++r)
              layer_norm_stats<1>(cur_rows + r, N, a.eps, ln_neg_mean + r, ln_rstd + r);
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

void scan_avx512(const ScanArgs& a, int64_t begin, int64_t end) {
  const int64_t padded = ((a.N + 15) / 16) * 16;
  Scratch<float> membrane(padded), cur(padded);
  Scratch<int32_t> counts(padded);
  std::memset(cur.p, 0, sizeof(float) * padded);
  for (int64_t m = begin; m < end; ++m) {
    std::memset(membrane.p, 0, sizeof(float) * padded);
    std::memset(counts.p, 0, sizeof(int32_t) * padded);
    for (int64_t t = 0; t < a.T; ++t) {
      std::memcpy(cur.p, a.current + t * a.step_stride + m * a.N, sizeof(float) * a.N);
      scan_groups(a.neuron, cur.p, membrane.p, counts.p, a.N, 0, (a.N + 15) / 16,
                  a.spikes + (t * a.M + m) * a.nw64, a.nw64);
    }
    if (a.rates != nullptr) write_rates(counts.p, a.N, a.T, a.rates + m * a.N);
  }
}

namespace {

// Per-task scratch of attention_avx512 (tokens padded to Sp = 16 * blocks).
struct AttentionScratch {
  float* q_t;          // [width][Sp]   Q of the group, tokens in lanes
  float* s_t;          // [S][kChunk*16] scores, then probabilities, of one query chunk
  float* membrane;     // [width][Sp]
  int32_t* counts;     // [width][Sp]
  uint16_t* fired;     // [blocks][words * 64] A spikes of 16 queries per column of the group
  int64_t fired_stride;  // words * 64
  uint64_t* v_t;       // [d][key_words] V bits of one head, keys per column
};

constexpr int64_t kChunk = 4;  // query blocks of 16 processed together (64 queries)

// One head, one chunk of NB query blocks (16 queries each) starting at block blk0, one step:
// scores, softmax, P.V and the A neuron scan, queries in lanes.
template <int NB>
void attend_chunk(const AttentionArgs& a, const AttentionScratch& w, int64_t Sp, int64_t row0,
                  int64_t h, int64_t hc, int64_t blk0, const float* mask, int64_t key_words) {
  const int64_t S = a.S, d = a.head_dim;
  const float* q_head = w.q_t + hc * Sp + blk0 * 16;
  const __m512 scale = _mm512_set1_ps(a.scale);
  __m512 mx[NB];
  for (int bb = 0; bb < NB; ++bb) mx[bb] = _mm512_set1_ps(-INFINITY);
  // sT[j] = (sum over c in K[j], ascending, of qT[c]) * scale + mask[j]
  for (int64_t j = 0; j < S; ++j) {
    __m512 acc[NB];
    for (int bb = 0; bb < NB; ++bb) acc[bb] = _mm512_setzero_ps();
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
          acc[bb] = _mm512_add_ps(acc[bb], _mm512_load_ps(qc + bb * 16));
        bits = _blsr_u64(bits);
      }
      pos += take;
    }
    const __m512 mj = _mm512_set1_ps(mask[j]);
    float* sj = w.s_t + j * kChunk * 16;
    for (int bb = 0; bb < NB; ++bb) {
      const __m512 sc = _mm512_add_ps(_mm512_mul_ps(acc[bb], scale), mj);
      _mm512_store_ps(sj + bb * 16, sc);
      mx[bb] = _mm512_max_ps(mx[bb], sc);
    }
  }
  // Softmax down the keys in torch.softmax's order (softmax_sum): 16 lane sums, then the tree.
  for (int bb = 0; bb < NB; ++bb) {
    __m512 sum;
    if (S < 16) {
      sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < S; ++j) {
        float* p = w.s_t + j * kChunk * 16 + bb * 16;
        const __m512 e =
            sleef_expf_u10_nonpositive_v(_mm512_sub_ps(_mm512_load_ps(p), mx[bb]));
        _mm512_store_ps(p, e);
        sum = j == 0 ? e : _mm512_add_ps(sum, e);
      }
    } else {
      __m512 lanes[16];
      for (int64_t j0 = 0; j0 < S; j0 += 16) {
        for (int l = 0; l < 16; ++l) {
          if (j0 + l >= S) break;
          float* p = w.s_t + (j0 + l) * kChunk * 16 + bb * 16;
          const __m512 e =
              sleef_expf_u10_nonpositive_v(_mm512_sub_ps(_mm512_load_ps(p), mx[bb]));
          _mm512_store_ps(p, e);
          lanes[l] = j0 == 0 ? e : _mm512_add_ps(lanes[l], e);
        }
      }
      for (int l = 0; l < 8; ++l) lanes[l] = _mm512_add_ps(lanes[l], lanes[l + 8]);
      for (int l = 0; l < 4; ++l) lanes[l] = _mm512_add_ps(lanes[l], lanes[l + 4]);
      for (int l = 0; l < 2; ++l) lanes[l] = _mm512_add_ps(lanes[l], lanes[l + 2]);
      sum = _mm512_add_ps(lanes[0], lanes[1]);
    }
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), sum);
    for (int64_t j = 0; j < S; ++j) {
      float* p = w.s_t + j * kChunk * 16 + bb * 16;
      _mm512_store_ps(p, _mm512_mul_ps(_mm512_load_ps(p), inv));
    }
  }
  // aT[c] = sum over keys j with V[j, c] = 1, ascending, of pT[j]; then gate and the A scan.
  const bool gated = a.gate != nullptr;
  const __m512 gate = _mm512_set1_ps(gated ? a.gate[h] : 1.0f);
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t c = 0; c < d; ++c) {
    __m512 acc[NB];
    for (int bb = 0; bb < NB; ++bb) acc[bb] = _mm512_setzero_ps();
    const uint64_t* vc = w.v_t + c * key_words;
    for (int64_t kw = 0; kw < key_words; ++kw) {
      uint64_t bits = vc[kw];
      while (bits != 0) {
        const float* pj = w.s_t + (kw * 64 + static_cast<int64_t>(_tzcnt_u64(bits))) * kChunk * 16;
        for (int bb = 0; bb < NB; ++bb)
          acc[bb] = _mm512_add_ps(acc[bb], _mm512_load_ps(pj + bb * 16));
        bits = _blsr_u64(bits);
      }
    }
    const int64_t lc = hc + c;  // column within the group
    for (int bb = 0; bb < NB; ++bb) {
      const int64_t blk = blk0 + bb;
      __m512 cur = gated ? _mm512_mul_ps(acc[bb], gate) : acc[bb];
      if (a.current != nullptr) {
        alignas(64) float lanes[16];
        _mm512_store_ps(lanes, cur);
        for (int64_t l = 0; l < 16 && blk * 16 + l < S; ++l)
          a.current[(row0 + blk * 16 + l) * a.heads * d + h * d + c] = lanes[l];
      }
      float* vm = w.membrane + lc * Sp + blk * 16;
      __m512 v = _mm512_load_ps(vm);
      const __mmask16 fired = neuron_step_v(a.neuron, cur, v) & tail_mask16(S - blk * 16);
      _mm512_store_ps(vm, v);
      int32_t* cnt = w.counts + lc * Sp + blk * 16;
      const __m512i cv = _mm512_load_si512(cnt);
      _mm512_store_si512(cnt, _mm512_mask_add_epi32(cv, fired, cv, one));
      w.fired[blk * w.fired_stride + lc] = fired;
    }
  }
}

}  // namespace

void attention_avx512(const AttentionArgs& a, int64_t begin, int64_t end) {
  const int64_t S = a.S, d = a.head_dim, H = a.heads, HD = H * d;
  const int64_t group = a.group_heads;
  const int64_t groups = (H + group - 1) / group;
  const int64_t kw32 = (a.K + 31) / 32;
  const int64_t blocks = (S + 15) / 16, Sp = blocks * 16;
  const int64_t max_width = group * d, words = (max_width + 63) / 64;
  const int64_t key_words = (S + 63) / 64;
  Scratch<uint32_t> x_il(blocks * std::max<int64_t>(kw32, 1) * 16);
  Scratch<int32_t> popc_x(Sp);
  Scratch<uint32_t> wq32(max_width * std::max<int64_t>(kw32, 1));
  Scratch<float> q_t(max_width * Sp), s_t(std::max<int64_t>(S, 1) * kChunk * 16),
      membrane(max_width * Sp);
  Scratch<int32_t> counts(max_width * Sp);
  Scratch<uint16_t> fired(blocks * words * 64);
  Scratch<uint64_t> v_t(d * key_words);
  // Keys padded to a whole group of 8 with zero bits (read as one 512-bit load).
  Scratch<uint64_t> head_bits((S + 7) / 8 * 8);
  for (int64_t j = S; j < (S + 7) / 8 * 8; ++j) head_bits[j] = 0;
  const AttentionScratch w{q_t.p, s_t.p, membrane.p, counts.p, fired.p, words * 64, v_t.p};
  const uint32_t tail32 = last_word32_mask(a.K);

  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / groups, g = task % groups;
    const int64_t h0 = g * group, h1 = std::min(H, h0 + group);
    const int64_t c0 = h0 * d, width = (h1 - h0) * d, width_words = (width + 63) / 64;
    std::memset(membrane.p, 0, sizeof(float) * max_width * Sp);
    std::memset(counts.p, 0, sizeof(int32_t) * max_width * Sp);
    // Columns past the group's width stay 0 (every other entry is written at every step).
    std::memset(fired.p, 0, sizeof(uint16_t) * blocks * w.fired_stride);
    const float* mask = a.mask_add + b * S;
    // This group's Q sign words, padding bits cleared.
    for (int64_t c = 0; c < width; ++c) {
      const uint32_t* w32 = reinterpret_cast<const uint32_t*>(a.wq + (c0 + c) * a.kw64);
      for (int64_t k = 0; k < kw32; ++k)
        wq32[c * kw32 + k] = k == kw32 - 1 ? w32[k] & tail32 : w32[k];
    }

    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t row0 = t * a.B * S + b * S;
      // Tokens into vector lanes: x_il[block][k][lane] = word k of token block*16 + lane.
      for (int64_t blk = 0; blk < blocks; ++blk) {
        for (int64_t lane = 0; lane < 16; ++lane) {
          const int64_t i = blk * 16 + lane;
          const uint32_t* xr = i < S ? reinterpret_cast<const uint32_t*>(a.x + (row0 + i) * a.kw64)
                                     : nullptr;
          int32_t pc = 0;
          for (int64_t k = 0; k < kw32; ++k) {
            uint32_t word = xr != nullptr ? xr[k] : 0u;
            if (k == kw32 - 1) word &= tail32;
            x_il[(blk * kw32 + k) * 16 + lane] = word;
            pc += static_cast<int32_t>(_mm_popcnt_u32(word));
          }
          popc_x[i] = pc;
        }
      }
      // qT[c][i] for this group's columns: the exact projection with tokens in lanes, four
      // columns per pass so each token word loaded feeds four popcounts.
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const uint32_t* xb = x_il.p + blk * kw32 * 16;
        const __m512i popc = _mm512_load_si512(popc_x.p + blk * 16);
        auto finish = [&](__m512i acc, int64_t cc) {
          const __m512i count = _mm512_sub_epi32(_mm512_slli_epi32(acc, 1), popc);
          const __m512 f =
              _mm512_mul_ps(_mm512_cvtepi32_ps(count), _mm512_set1_ps(a.alpha_q[c0 + cc]));
          _mm512_store_ps(q_t.p + cc * Sp + blk * 16,
                          _mm512_add_ps(f, _mm512_set1_ps(a.bias_q[c0 + cc])));
        };
        int64_t c = 0;
        for (; c + 4 <= width; c += 4) {
          const uint32_t* w0 = wq32.p + c * kw32;
          __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
          for (int64_t k = 0; k < kw32; ++k) {
            const __m512i xv = _mm512_load_si512(xb + k * 16);
            acc0 = popcount_add(acc0, xv, w0[k]);
            acc1 = popcount_add(acc1, xv, w0[kw32 + k]);
            acc2 = popcount_add(acc2, xv, w0[2 * kw32 + k]);
            acc3 = popcount_add(acc3, xv, w0[3 * kw32 + k]);
          }
          finish(acc0, c);
          finish(acc1, c + 1);
          finish(acc2, c + 2);
          finish(acc3, c + 3);
        }
        for (; c < width; ++c) {
          const uint32_t* w0 = wq32.p + c * kw32;
          __m512i acc = _mm512_setzero_si512();
          for (int64_t k = 0; k < kw32; ++k)
            acc = popcount_add(acc, _mm512_load_si512(xb + k * 16), w0[k]);
          finish(acc, c);
        }
      }

      for (int64_t h = h0; h < h1; ++h) {
        const int64_t hc = (h - h0) * d;
        // V bits of this head transposed: one key mask per column.
        std::memset(v_t.p, 0, sizeof(uint64_t) * d * key_words);
        if (d <= 64) {
          // The head's d bits of 8 keys in 8 lanes; one VPTESTMQ per column gives that
          // column's byte of key bits (a per-set-bit scatter cost a fifth of the op).
          for (int64_t j = 0; j < S; ++j)
            head_bits[j] = bit_field(a.v + (row0 + j) * a.nw64, h * d, d);
          uint8_t* v_t8 = reinterpret_cast<uint8_t*>(v_t.p);
          for (int64_t j0 = 0; j0 < S; j0 += 8) {
            const __m512i keys = _mm512_load_si512(head_bits.p + j0);
            const int64_t byte = (j0 >> 6) * 8 + ((j0 & 63) >> 3);
            for (int64_t c = 0; c < d; ++c) {
              const __m512i column = _mm512_set1_epi64(static_cast<long long>(1ull << c));
              v_t8[c * key_words * 8 + byte] =
                  static_cast<uint8_t>(_mm512_test_epi64_mask(keys, column));
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
            case 4: attend_chunk<4>(a, w, Sp, row0, h, hc, blk0, mask, key_words); break;
            case 3: attend_chunk<3>(a, w, Sp, row0, h, hc, blk0, mask, key_words); break;
            case 2: attend_chunk<2>(a, w, Sp, row0, h, hc, blk0, mask, key_words); break;
            default: attend_chunk<1>(a, w, Sp, row0, h, hc, blk0, mask, key_words); break;
          }
        }
      }
      // This task owns whole words [c0 / 64, c0 / 64 + width_words) of every A row. The 64
      // columns' 16-query masks of a word are 64 x 16 bits in two vectors; testing bit l of all
      // of them at once (VPTESTMW) gives query l's word.
      for (int64_t blk = 0; blk < blocks; ++blk) {
        for (int64_t wd = 0; wd < width_words; ++wd) {
          const uint16_t* f = w.fired + blk * w.fired_stride + wd * 64;
          const __m512i lo = _mm512_load_si512(f), hi = _mm512_load_si512(f + 32);
          for (int64_t l = 0; l < 16 && blk * 16 + l < S; ++l) {
            const __m512i probe = _mm512_set1_epi16(static_cast<short>(1 << l));
            const uint64_t word = static_cast<uint64_t>(_mm512_test_epi16_mask(lo, probe)) |
                                  static_cast<uint64_t>(_mm512_test_epi16_mask(hi, probe)) << 32;
            a.spikes[(row0 + blk * 16 + l) * a.nw64 + c0 / 64 + wd] = word;
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

void bernoulli_avx512(const BernoulliArgs& a, int64_t begin, int64_t end) {
  const int64_t blocks = (a.K + 15) / 16;
  const __m512i m1 = _mm512_set1_epi32(0x7feb352d);
  const __m512i m2 = _mm512_set1_epi32(static_cast<int>(0x846ca68bu));
  // mix32 split after its first xor-shift, which distributes over the step key's xor:
  // (m ^ k) ^ ((m ^ k) >> 16) = (m ^ (m >> 16)) ^ (k ^ (k >> 16)), so the per-element half is
  // stored once and every step starts at the first multiply.
  auto xorshift16 = [](__m512i x) { return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16)); };
  auto mix_rest = [&](__m512i x) {
    x = _mm512_mullo_epi32(x, m1);
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, m2);
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  };
  auto mix = [&](__m512i x) { return mix_rest(xorshift16(x)); };
  // u = (h >> 8) * 2^-24 < rate  <=>  (h >> 8) < ceil(rate * 2^24), both sides exact (an integer
  // below 2^24 and a power-of-two scaling), so each element's threshold is formed once and every
  // step compares integers. Lanes past K get threshold 0: they never fire.
  const __m512 two_p24 = _mm512_set1_ps(16777216.0f);
  const __m512i always = _mm512_set1_epi32(1 << 24);
  // Threshold 0 never fires and 2^24 always does (h >> 8 < 2^24): about half the rates of a
  // spiking layer are exactly 0 or 1, so only the other elements are hashed. Each row's
  // undecided elements are packed densely (their hashes and thresholds, in column order), every
  // step hashes that dense list into a bit stream, and PDEP deposits the stream's bits at the
  // undecided positions of each 64-bit word, beside the always-firing ones. Rows with few decided
  // elements skip the packing: the deposit would cost more than the hashes it saves.
  // Rows go in tiles whose element hashes and thresholds are formed once, then step by step, so
  // the words of one step are written contiguously (row by row, all steps of one row would touch
  // a page per step).
  constexpr int64_t kTileRows = 16;
  // + padding to whole words of 64 with threshold 0 (the stream's last word hashes them)
  const int64_t dense_len = (blocks * 16 + 16 + 63) / 64 * 64;
  const int64_t words = a.kw64;
  // Per row of the tile: the hashes' step-independent half and the thresholds, packed (or in
  // column order for rows drawn directly), and the undecided and always-firing masks.
  Scratch<uint32_t> mixed(kTileRows * dense_len), threshold(kTileRows * dense_len);
  Scratch<uint64_t> undecided(kTileRows * words), fires(kTileRows * words);
  Scratch<uint64_t> stream(dense_len / 64 + 2);
  int64_t dense_count[kTileRows];
  auto threshold_of = [&](int64_t m, int64_t blk) {
    const __m512 rate =
        _mm512_maskz_loadu_ps(tail_mask16(a.K - blk * 16), a.rates + m * a.K + blk * 16);
    const __m512 scaled = _mm512_min_ps(
        _mm512_max_ps(_mm512_mul_ps(rate, two_p24), _mm512_setzero_ps()), two_p24);
    return _mm512_cvttps_epu32(
        _mm512_roundscale_ps(scaled, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
  };
  auto hashed_of = [&](int64_t m, int64_t blk) {  // xorshift16(mix32(element))
    const __mmask16 valid = tail_mask16(a.K - blk * 16);
    const __m512i row_base = _mm512_set1_epi64(m * a.full_width);
    const __m512i lo = _mm512_add_epi64(
        row_base, _mm512_maskz_loadu_epi64(static_cast<__mmask8>(valid), a.cols + blk * 16));
    const __m512i hi = _mm512_add_epi64(
        row_base,
        _mm512_maskz_loadu_epi64(static_cast<__mmask8>(valid >> 8), a.cols + blk * 16 + 8));
    const __m512i element = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)), _mm512_cvtepi64_epi32(hi), 1);
    return xorshift16(mix(element));
  };
  auto drawn_directly = [&](int64_t i) { return dense_count[i] * 4 > blocks * 16 * 3; };
  for (int64_t m0 = begin; m0 < end; m0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, end - m0);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t m = m0 + i;
      uint32_t* row_mixed = mixed.p + i * dense_len;
      uint32_t* row_threshold = threshold.p + i * dense_len;
      uint16_t* row_undecided = reinterpret_cast<uint16_t*>(undecided.p + i * words);
      uint16_t* row_fires = reinterpret_cast<uint16_t*>(fires.p + i * words);
      int64_t n = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {  // the masks, to choose the row's path
        const __m512i thr = threshold_of(m, blk);
        const __mmask16 fire = _mm512_cmpeq_epi32_mask(thr, always);
        const __mmask16 open = _mm512_test_epi32_mask(thr, thr) & ~fire;
        n += _mm_popcnt_u32(open);
        row_undecided[blk] = open;
        row_fires[blk] = fire;
      }
      for (int64_t blk = blocks; blk < words * 4; ++blk) row_undecided[blk] = row_fires[blk] = 0;
      dense_count[i] = n;
      if (drawn_directly(i)) {
        for (int64_t blk = 0; blk < blocks; ++blk) {
          _mm512_store_si512(row_mixed + blk * 16, hashed_of(m, blk));
          _mm512_store_si512(row_threshold + blk * 16, threshold_of(m, blk));
        }
        continue;
      }
      int64_t packed = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        // Register compress, then a full store: the memory form of VPCOMPRESSD is microcoded
        // on Zen 4. The 16 lanes past the packed count are overwritten by the next block or
        // the padding.
        const __mmask16 open = row_undecided[blk];
        _mm512_storeu_si512(row_mixed + packed,
                            _mm512_maskz_compress_epi32(open, hashed_of(m, blk)));
        _mm512_storeu_si512(row_threshold + packed,
                            _mm512_maskz_compress_epi32(open, threshold_of(m, blk)));
        packed += _mm_popcnt_u32(open);
      }
      const int64_t word_end = (n + 63) / 64 * 64;
      for (int64_t o = n; o < word_end; o += 16)  // the last word's spare lanes
        _mm512_mask_storeu_epi32(row_threshold + o, tail_mask16(word_end - o),
                                 _mm512_setzero_si512());
    }
    for (int64_t s = 0; s < a.steps; ++s) {
      const __m512i key = xorshift16(_mm512_set1_epi32(static_cast<int>(a.step_keys[s])));
      for (int64_t i = 0; i < rows; ++i) {
        uint64_t* out = a.spikes + (s * a.M + m0 + i) * words;
        const uint32_t* row_mixed = mixed.p + i * dense_len;
        const uint32_t* row_threshold = threshold.p + i * dense_len;
        if (drawn_directly(i)) {  // mostly undecided: every element drawn
          uint16_t* out16 = reinterpret_cast<uint16_t*>(out);
          for (int64_t blk = 0; blk < blocks; ++blk) {
            const __m512i h =
                mix_rest(_mm512_xor_si512(_mm512_load_si512(row_mixed + blk * 16), key));
            out16[blk] = static_cast<uint16_t>(_mm512_cmplt_epu32_mask(
                _mm512_srli_epi32(h, 8), _mm512_load_si512(row_threshold + blk * 16)));
          }
          for (int64_t blk = blocks; blk < words * 4; ++blk) out16[blk] = 0;
          continue;
        }
        // The stream is written in whole words: the deposit loop reads it back at once, and a
        // word load spanning several 16-bit stores would miss store-to-load forwarding.
        const int64_t dense_words = (dense_count[i] + 63) / 64;
        for (int64_t w = 0; w < dense_words; ++w) {
          uint64_t word = 0;
#pragma GCC unroll 4
          for (int q = 0; q < 4; ++q) {
            const int64_t o = (w * 4 + q) * 16;
            const __m512i h = mix_rest(_mm512_xor_si512(_mm512_loadu_si512(row_mixed + o), key));
            const __mmask16 fired = _mm512_cmplt_epu32_mask(_mm512_srli_epi32(h, 8),
                                                           _mm512_loadu_si512(row_threshold + o));
            word |= static_cast<uint64_t>(fired) << (16 * q);
          }
          stream.p[w] = word;
        }
        const uint64_t* row_undecided = undecided.p + i * words;
        const uint64_t* row_fires = fires.p + i * words;
        int64_t offset = 0;
        for (int64_t w = 0; w < words; ++w) {
          const int64_t len = _mm_popcnt_u64(row_undecided[w]);
          out[w] = _pdep_u64(bit_field(stream.p, offset, len), row_undecided[w]) | row_fires[w];
          offset += len;
        }
      }
    }
  }
}

}  // namespace spikeinfer_cpu

#pragma GCC pop_options
