// Shared declarations and scalar maths for the spikeinfer CPU kernels.
//
// Maths implemented by the kernels (DESIGN sections 1-2), all time-major over T steps:
//
//   binary projection   I[n] = float(2 * popc(s & w+_n) - popc(s)) * alpha[n] + bias[n]
//                       (s: packed 0/1 spikes, w+_n: bit set where sign(W[n, k]) = +1; the count
//                       is exact, then two roundings: * alpha, + bias; never fused into an FMA)
//   epilogues           plain: I;  GELU: gelu(I);  residual + LayerNorm: LN(I + r)
//                       then times a per-feature gate (head / neuron masks) when gated; GELU is
//                       x * Phi(x) from a piecewise polynomial of the normal tail (gelu.h,
//                       within 3 ulp of the exact function, not torch's bits: DESIGN section 10's
//                       near-tie rule covers the difference)
//   IF/LIF neuron       H = leak * V + I (V + I when leak == 1);  S = H >= v_th (> when not
//                       fire_on_ge);  V = H - v_th * S
//   Bernoulli draws     the counter-based hash of spikeinfer/rng.py
//
// The portable, AVX2 and AVX-512 translation units all include this header. The scalar functions
// below are exact replicas of the float arithmetic of PyTorch's CPU kernels (LayerNorm moments,
// the exp and summation order of its softmax), written with explicit std::fma wherever PyTorch's
// build fuses, so that with -ffp-contract=off every path and the reference round identically where
// the reference's order of operations is known (the projections' integer counts always are).

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "gelu.h"

namespace spikeinfer_cpu {

enum Epilogue : int {
  kEpilogueNone = 0,   // real output, no neuron (Q, binary_gemm)
  kEpiloguePlain = 1,  // K, V
  kEpilogueGelu = 2,   // F
  kEpilogueResidualLayerNorm = 3,  // O1, O2
};

struct NeuronSpec {
  float v_th = 1.0f;
  float leak = 1.0f;
  bool fire_on_ge = true;
};

// One binary projection over T timesteps of M rows, followed by an epilogue and (unless the
// epilogue is kEpilogueNone) a neuron scan over the T steps of every (row, feature).
struct LinearNeuronArgs {
  const uint64_t* x = nullptr;  // packed input spikes [T, M, kw64]
  int64_t T = 1, M = 0, K = 0, kw64 = 0;
  const uint64_t* w = nullptr;  // packed +1 signs [N, kw64] (portable path)
  // AVX-512 path: 16-column interleaved [ceil(N/16), kw32, 16]; AVX2 path: 8-column interleaved
  // nibbles [ceil(N/8), kw32, 2, 8] (w & 0x0f0f0f0f, then (w >> 4) & 0x0f0f0f0f); null otherwise
  const uint32_t* w_il = nullptr;
  const float* alpha = nullptr;    // [N]
  const float* bias = nullptr;     // [N]
  int64_t N = 0, nw64 = 0;
  int epilogue = kEpiloguePlain;
  const uint64_t* residual = nullptr;  // packed [T, M, nw64] or null
  const float* ln_weight = nullptr;    // [N]
  const float* ln_bias = nullptr;      // [N]
  float eps = 1e-12f;
  const float* gate = nullptr;  // [N] or null
  NeuronSpec neuron;
  uint64_t* spikes = nullptr;  // packed output [T, M, nw64], every word written
  float* rates = nullptr;      // [M, N] spike count / T, or null
  float* out = nullptr;        // kEpilogueNone: [T * M, N]; else the neuron input current or null
};

// Spiking attention of one block at all timesteps, Q projected inside, then the A neuron scan.
struct AttentionArgs {
  const uint64_t* x = nullptr;  // block input spikes [T, B*S, kw64]
  int64_t T = 1, B = 0, S = 0, K = 0, kw64 = 0;
  const uint64_t* wq = nullptr;    // packed Q signs [H*d, kw64]
  const float* alpha_q = nullptr;
  const float* bias_q = nullptr;
  const uint64_t* k = nullptr;  // spikes of K [T, B*S, nw64]
  const uint64_t* v = nullptr;  // spikes of V [T, B*S, nw64]
  const float* mask_add = nullptr;  // [B, S] additive key mask
  const float* gate = nullptr;      // [H] or null
  int64_t heads = 0, head_dim = 0, nw64 = 0;
  int64_t group_heads = 1;  // heads per task (attention_group_heads)
  float scale = 1.0f;  // float32(1 / sqrt(head_dim))
  NeuronSpec neuron;
  uint64_t* spikes = nullptr;  // A spikes [T, B*S, nw64], every word written
  float* rates = nullptr;      // [B*S, H*d] spike count / T, or null
  float* current = nullptr;    // A currents [T, B*S, H*d] (diagnostics) or null
};

// Neuron scan of given currents (the embedding neurons, tests): current [T, M, N] with rows of
// each step contiguous and `step_stride` elements between steps (0 for a constant current).
struct ScanArgs {
  const float* current = nullptr;
  int64_t step_stride = 0, T = 1, M = 0, N = 0, nw64 = 0;
  NeuronSpec neuron;
  uint64_t* spikes = nullptr;  // [T, M, nw64], every word written
  float* rates = nullptr;      // [M, N] spike count / T, or null
};

struct BernoulliArgs {
  const float* rates = nullptr;  // [M, K]
  const int64_t* cols = nullptr;  // [K] original column of each feature
  int64_t M = 0, K = 0, kw64 = 0, full_width = 0, steps = 0;
  const uint32_t* step_keys = nullptr;  // [steps]
  uint64_t* spikes = nullptr;  // [steps, M, kw64], every word written
};

// Kernels over rows [begin, end) (tokens for the neuron ops, (batch, head group) tasks for
// attention); the op layer splits the range over threads.
void linear_neuron_portable(const LinearNeuronArgs& a, int64_t begin, int64_t end);
void linear_neuron_avx512(const LinearNeuronArgs& a, int64_t begin, int64_t end);
void linear_neuron_avx2(const LinearNeuronArgs& a, int64_t begin, int64_t end);
void attention_portable(const AttentionArgs& a, int64_t begin, int64_t end);
void attention_avx512(const AttentionArgs& a, int64_t begin, int64_t end);
void attention_avx2(const AttentionArgs& a, int64_t begin, int64_t end);
void scan_portable(const ScanArgs& a, int64_t begin, int64_t end);
void scan_avx512(const ScanArgs& a, int64_t begin, int64_t end);
void scan_avx2(const ScanArgs& a, int64_t begin, int64_t end);
void bernoulli_portable(const BernoulliArgs& a, int64_t begin, int64_t end);
void bernoulli_avx512(const BernoulliArgs& a, int64_t begin, int64_t end);
void bernoulli_avx2(const BernoulliArgs& a, int64_t begin, int64_t end);
int64_t attention_group_heads(int64_t heads, int64_t head_dim, int64_t batch, int64_t threads);

// Everything below has internal linkage: each translation unit compiles its own copy for its own
// target (the AVX-512 unit includes this header after `#pragma GCC target`), so no generic caller
// can ever be linked to an AVX-512 instantiation.
namespace {

// ---------------------------------------------------------------------------------------------
// Counter-based hash (spikeinfer/rng.py).

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t step_key(int64_t seed, int64_t stream, int64_t step) {
  return mix32(static_cast<uint32_t>(step) ^
               mix32(static_cast<uint32_t>(stream) ^ mix32(static_cast<uint32_t>(seed))));
}

// ---------------------------------------------------------------------------------------------
// The neuron update, shared by every path. `h - v_th * s` with s in {0, 1} is h or h - v_th
// exactly, so the select below rounds like the reference.

inline bool neuron_step(const NeuronSpec& n, float current, float& v) {
  const float h = n.leak == 1.0f ? v + current : n.leak * v + current;
  const bool fired = n.fire_on_ge ? h >= n.v_th : h > n.v_th;
  v = fired ? h - n.v_th : h;
  return fired;
}

// ---------------------------------------------------------------------------------------------
// GELU (csrc/gelu_table.py): x * Phi(x), Phi from the normal tail Q(|x|) on [0, 8], beyond which
// the value at 8 holds. The AVX-512 unit's gelu16 evaluates the same operations lane-wise.

inline float gelu(float x) {
  const float a = std::fabs(x);
  const float clamped = a < kGeluMaxTail ? a : kGeluMaxTail;  // NaN -> the bound, as vminps
  const int32_t i = static_cast<int32_t>(clamped * kGeluInvWidth);
  // u = clamped - interval centre
  const float u = std::fma(static_cast<float>(i), -kGeluWidth, clamped - 0.5f * kGeluWidth);
  float q = kGeluTail[kGeluDegree][i];
  for (int k = kGeluDegree - 1; k >= 0; --k) q = std::fma(q, u, kGeluTail[k][i]);
  return x * (x >= 0.0f ? 1.0f - q : q);
}

// ---------------------------------------------------------------------------------------------
// Float helpers on bit patterns.

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Sleef_expf_u10, the exp of PyTorch's AVX-512 softmax (Vectorized<float>::exp), in scalar form.
inline float sleef_expf_u10(float d) {
  if (d < -104.0f) return 0.0f;
  if (d > 100.0f) return INFINITY;
  if (d != d) return d;
  const float r_ln2 = 1.442695040888963407359924681001892137426645954152985934135449406931f;
  const int32_t q = static_cast<int32_t>(std::nearbyint(d * r_ln2));
  const float qf = static_cast<float>(q);
  float s = std::fma(qf, -0.693145751953125f, d);
  s = std::fma(qf, -1.428606765330187045e-06f, s);
  float u = 0.000198527617612853646278381f;
  u = std::fma(u, s, 0.00139304355252534151077271f);
  u = std::fma(u, s, 0.00833336077630519866943359f);
  u = std::fma(u, s, 0.0416664853692054748535156f);
  u = std::fma(u, s, 0.166666671633720397949219f);
  u = std::fma(u, s, 0.5f);
  u = 1.0f + std::fma(s * s, u, s);
  const int32_t q1 = q >> 1, q2 = q - q1;
  u = u * bits_to_float(static_cast<uint32_t>(q1 + 0x7f) << 23);
  return u * bits_to_float(static_cast<uint32_t>(q2 + 0x7f) << 23);
}

// The softmax denominator in PyTorch's order (vec::reduce_all with 16 lanes): rows shorter than 16
// sum left to right; otherwise lane l accumulates every 16th element from l, and the 16 lanes
// combine in the shuffle tree of its AVX-512 horizontal reduction.
inline float softmax_sum(const float* e, int64_t n) {
  if (n < 16) {
    float acc = e[0];
    for (int64_t j = 1; j < n; ++j) acc = acc + e[j];
    return acc;
  }
  float lanes[16];
  for (int64_t l = 0; l < 16; ++l) lanes[l] = e[l];
  for (int64_t j = 16; j < n; ++j) lanes[j % 16] = lanes[j % 16] + e[j];
  for (int64_t half = 8; half >= 1; half /= 2)
    for (int64_t l = 0; l < half; ++l) lanes[l] = lanes[l] + lanes[l + half];
  return lanes[0];
}

// Row mean and biased variance exactly as PyTorch computes them for nn.LayerNorm on float32. Its
// LayerNorm kernel has no AVX-512 registration, so on AVX-512 machines it runs the AVX2 build of
// RowwiseMoments (8-lane vectors): Welford per lane over chunks of 16 vectors, chunks merged in a
// cascade (binary counter), lanes merged at the end, scalar Welford for the tail; its scalar
// multiply-adds are contracted into FMAs by the compiler. `Vec` is an 8-lane float vector type
// (a plain array in the portable unit, __m256 in the AVX-512 unit) with lane-wise + - * and
// fmadd, so both paths round identically.
// The weight m0_add / (m0 + m0_add) of a merged-in part, as PyTorch computes it. Rows of one
// LayerNorm have equal lengths, so their counts, and these weights, are the same at every merge:
// rowwise_moments divides once per merge for all R rows, not once per row.
inline float merge_weight(int64_t m0, int64_t m0_add) {
  const int64_t n = m0 + m0_add;
  return n == 0 ? 0.0f : static_cast<float>(m0_add) / static_cast<float>(n);
}

inline void add_moments_scalar(int64_t m0_add, float m1_add, float m2_add, float c, int64_t& m0,
                               float& m1, float& m2) {
  const float delta = m1_add - m1;
  m1 = std::fma(c, delta, m1);
  m2 = m2 + std::fma(delta * delta * c, static_cast<float>(m0), m2_add);
  m0 += m0_add;
}

template <class Vec>
inline void add_moments_vec(int64_t m0_add, const Vec& m1_add, const Vec& m2_add, float c,
                            int64_t& m0, Vec& m1, Vec& m2) {
  const Vec c_vec = Vec::set1(c);
  const Vec delta = m1_add - m1;
  const Vec m2_tmp = m2 + m2_add;
  const Vec c_delta = c_vec * delta;
  const Vec m0_delta = delta * Vec::set1(static_cast<float>(m0));
  m1 = m1 + c_delta;
  m2 = Vec::fmadd(m0_delta, c_delta, m2_tmp);
  m0 += m0_add;
}

// 1 / (j + 1) in float, the per-step Welford weights of a chunk (PyTorch keeps the same table).
constexpr float kWelfordWeights[16] = {
    1.0f / 1, 1.0f / 2,  1.0f / 3,  1.0f / 4,  1.0f / 5,  1.0f / 6,  1.0f / 7,  1.0f / 8,
    1.0f / 9, 1.0f / 10, 1.0f / 11, 1.0f / 12, 1.0f / 13, 1.0f / 14, 1.0f / 15, 1.0f / 16};

// R rows of equal length at once: the same arithmetic per row, interleaved so that the Welford
// dependency chains of different rows overlap.
template <class Vec, int R>
inline void rowwise_moments(const float* const* x, int64_t len, float* mean, float* var) {
  constexpr int64_t kLanes = Vec::kLanes, kChunk = 16, kMaxDepth = 64;
  const int64_t n = len / kLanes;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  int64_t depth = 0;
  while ((int64_t{1} << depth) < chunks) ++depth;  // CeilLog2
  int64_t m0_stk[R][kMaxDepth];
  Vec m1_stk[R][kMaxDepth], m2_stk[R][kMaxDepth];
  for (int r = 0; r < R; ++r)
    for (int64_t i = 0; i < kMaxDepth && i < depth + 1; ++i) {
      m0_stk[r][i] = 0;
      m1_stk[r][i] = m2_stk[r][i] = Vec::set1(0.0f);
    }
  for (int64_t i = 0; i < chunks; ++i) {
    const int64_t m0 = n - i * kChunk < kChunk ? n - i * kChunk : kChunk;
    Vec m1[R], m2[R];
    for (int r = 0; r < R; ++r) m1[r] = m2[r] = Vec::set1(0.0f);
    for (int64_t j = 0; j < m0; ++j) {
      const Vec c = Vec::set1(kWelfordWeights[j]);
      for (int r = 0; r < R; ++r) {
        const Vec xv = Vec::load(x[r] + (i * kChunk + j) * kLanes);
        const Vec delta = xv - m1[r];
        m1[r] = Vec::fmadd(c, delta, m1[r]);
        m2[r] = Vec::fmadd(delta, xv - m1[r], m2[r]);
      }
    }
    const float c0 = merge_weight(m0_stk[0][0], m0);
    for (int r = 0; r < R; ++r)
      add_moments_vec(m0, m1[r], m2[r], c0, m0_stk[r][0], m1_stk[r][0], m2_stk[r][0]);
    int64_t mask = i + 1;
    for (int64_t j = 1; j < depth && (mask & 1) == 0; ++j) {
      const float c = merge_weight(m0_stk[0][j], m0_stk[0][j - 1]);
      for (int r = 0; r < R; ++r) {
        add_moments_vec(m0_stk[r][j - 1], m1_stk[r][j - 1], m2_stk[r][j - 1], c, m0_stk[r][j],
                        m1_stk[r][j], m2_stk[r][j]);
        m0_stk[r][j - 1] = 0;
        m1_stk[r][j - 1] = m2_stk[r][j - 1] = Vec::set1(0.0f);
      }
      mask >>= 1;
    }
  }
  // Final merges, rows interleaved so their serial chains overlap.
  float m1_lanes[R][kLanes], m2_lanes[R][kLanes];
  int64_t m0[R];
  float m1[R], m2[R];
  for (int64_t i = 1; i < depth; ++i) {
    const float c = merge_weight(m0_stk[0][0], m0_stk[0][i]);
    for (int r = 0; r < R; ++r)
      add_moments_vec(m0_stk[r][i], m1_stk[r][i], m2_stk[r][i], c, m0_stk[r][0], m1_stk[r][0],
                      m2_stk[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    m1_stk[r][0].store(m1_lanes[r]);
    m2_stk[r][0].store(m2_lanes[r]);
    m0[r] = 0;
    m1[r] = m2[r] = 0.0f;
    for (int64_t i = n * kLanes; i < len; ++i) {
      const float xi = x[r][i];
      const float delta = xi - m1[r];
      ++m0[r];
      m1[r] += delta / static_cast<float>(m0[r]);
      m2[r] = std::fma(delta, xi - m1[r], m2[r]);
    }
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    const float c = merge_weight(m0[0], n);
    for (int r = 0; r < R; ++r)
      add_moments_scalar(n, m1_lanes[r][l], m2_lanes[r][l], c, m0[r], m1[r], m2[r]);
  }
  for (int r = 0; r < R; ++r) {
    mean[r] = m1[r];
    var[r] = m2[r] / static_cast<float>(len);
  }
}

// 8 floats as a plain array: the portable unit's `Vec` for rowwise_moments.
struct ScalarVec8 {
  static constexpr int64_t kLanes = 8;
  float v[8];
  static ScalarVec8 set1(float a) {
    ScalarVec8 r;
    for (float& e : r.v) e = a;
    return r;
  }
  static ScalarVec8 load(const float* p) {
    ScalarVec8 r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  void store(float* p) const { std::memcpy(p, v, sizeof v); }
  static ScalarVec8 fmadd(const ScalarVec8& a, const ScalarVec8& b, const ScalarVec8& c) {
    ScalarVec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
    return r;
  }
};

inline ScalarVec8 operator+(const ScalarVec8& a, const ScalarVec8& b) {
  ScalarVec8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] + b.v[i];
  return r;
}
inline ScalarVec8 operator-(const ScalarVec8& a, const ScalarVec8& b) {
  ScalarVec8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] - b.v[i];
  return r;
}
inline ScalarVec8 operator*(const ScalarVec8& a, const ScalarVec8& b) {
  ScalarVec8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i];
  return r;
}

// LayerNorm coefficients of R rows; the output is fma((x + neg_mean) * rstd, gamma, beta) with
// rstd = 1 / sqrt(var + eps) in float, as PyTorch's kernel rounds it.
template <class Vec, int R>
inline void layer_norm_coefficients(const float* const* x, int64_t n, float eps, float* neg_mean,
                                    float* rstd) {
  float mean[R], var[R];
  rowwise_moments<Vec, R>(x, n, mean, var);
  for (int r = 0; r < R; ++r) {
    rstd[r] = 1.0f / std::sqrt(var[r] + eps);
    neg_mean[r] = -mean[r];
  }
}

}  // namespace

}  // namespace spikeinfer_cpu
