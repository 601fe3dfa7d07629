// Portable kernels (plain C++, no ISA assumptions): the fallback for CPUs without AVX-512
// VPOPCNTDQ and the readable statement of what the AVX-512 unit computes.
//
//   I[t, m, n] = float(2 * popc(x[t, m] & w+[n]) - popc(x[t, m])) * alpha[n] + bias[n]
//   epilogue   -> I' (plain, GELU, or LN(I + residual)), times gate[n] when gated
//   neuron     -> H = leak * V + I', S = H >= v_th, V = H - v_th * S, over t = 0 .. T-1
//
// Attention, per batch b, head h, step t, query i (Q real, K and V spikes):
//   s[j]   = (sum over c with K[j, c] = 1, ascending c, of Q[i, c]) * scale + mask[b, j]
//   p[j]   = exp(s[j] - max s) * (1 / sum_j exp(...))   (exp and sum order as torch.softmax)
//   A[i,c] = sum over j with V[j, c] = 1, ascending j, of p[j]     then the neuron scan.
// The AVX-512 unit evaluates the same expressions in the same order, so both paths agree bit for
// bit; every integer count is exact, so the projections also equal spikeinfer.ops.spike_linear.

#include <algorithm>
#include <numeric>
#include <vector>

#include "spikeinfer_cpu.h"

namespace spikeinfer_cpu {

namespace {

inline uint64_t last_word_mask(int64_t bits) {
  const int64_t rem = bits % 64;
  return rem == 0 ? ~uint64_t{0} : (uint64_t{1} << rem) - 1;
}

// One row of the binary projection over all N outputs. Padding bits past K are ignored.
void binary_row(const uint64_t* s, int64_t K, int64_t kw, const uint64_t* w, int64_t N,
                const float* alpha, const float* bias, float* out) {
  const uint64_t tail_mask = last_word_mask(K);
  int64_t popc_s = 0;
  for (int64_t k = 0; k < kw; ++k)
    popc_s += __builtin_popcountll(k == kw - 1 ? s[k] & tail_mask : s[k]);
  for (int64_t n = 0; n < N; ++n) {
    const uint64_t* wn = w + n * kw;
    int64_t both = 0;
    for (int64_t k = 0; k < kw; ++k)
      both += __builtin_popcountll(s[k] & wn[k] & (k == kw - 1 ? tail_mask : ~uint64_t{0}));
    const float count = static_cast<float>(2 * both - popc_s);
    const float scaled = count * alpha[n];
    out[n] = scaled + bias[n];
  }
}

inline bool test_bit(const uint64_t* row, int64_t i) { return (row[i >> 6] >> (i & 63)) & 1; }

// Residual and LayerNorm of one row in place (GELU and the gate come after).
void residual_layer_norm(const LinearNeuronArgs& a, float* cur, int64_t t, int64_t m) {
  const int64_t N = a.N;
  if (a.residual != nullptr) {
    const uint64_t* r = a.residual + (t * a.M + m) * a.nw64;
    for (int64_t n = 0; n < N; ++n) cur[n] = cur[n] + (test_bit(r, n) ? 1.0f : 0.0f);
  }
  if (a.epilogue == kEpilogueResidualLayerNorm && N > 0) {
    float neg_mean, rstd;
    const float* rows[1] = {cur};
    layer_norm_coefficients<ScalarVec8, 1>(rows, N, a.eps, &neg_mean, &rstd);
    for (int64_t n = 0; n < N; ++n)
      cur[n] = std::fma((cur[n] + neg_mean) * rstd, a.ln_weight[n], a.ln_bias[n]);
  }
}

// One neuron step for a row of N currents; writes every word of the packed spike row.
void scan_row(const NeuronSpec& spec, const float* cur, float* membrane, int32_t* counts,
              int64_t N, uint64_t* bits, int64_t nw64) {
  std::fill(bits, bits + nw64, uint64_t{0});
  for (int64_t n = 0; n < N; ++n) {
    if (neuron_step(spec, cur[n], membrane[n])) {
      bits[n >> 6] |= uint64_t{1} << (n & 63);
      ++counts[n];
    }
  }
}

// Rates as the reference computes them: float(count) / float(T), one rounding.
void write_rates(const int32_t* counts, int64_t N, int64_t T, float* rates) {
  for (int64_t n = 0; n < N; ++n) rates[n] = static_cast<float>(counts[n]) / static_cast<float>(T);
}

}  // namespace

void linear_neuron_portable(const LinearNeuronArgs& a, int64_t begin, int64_t end) {
  const int64_t N = a.N;
  std::vector<float> cur(N), membrane(N);
  std::vector<int32_t> counts(N);
  float* c = cur.data();
  for (int64_t m = begin; m < end; ++m) {
    std::fill(membrane.begin(), membrane.end(), 0.0f);
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t row = t * a.M + m;
      binary_row(a.x + row * a.kw64, a.K, a.kw64, a.w, N, a.alpha, a.bias, c);
      if (a.epilogue == kEpilogueNone) {
        std::copy(c, c + N, a.out + row * N);
        continue;
      }
      residual_layer_norm(a, c, t, m);
      if (a.epilogue == kEpilogueGelu)
        for (int64_t n = 0; n < N; ++n) c[n] = gelu(c[n]);
      if (a.gate != nullptr)
        for (int64_t n = 0; n < N; ++n) c[n] = c[n] * a.gate[n];
      if (a.out != nullptr) std::copy(c, c + N, a.out + row * N);
      scan_row(a.neuron, c, membrane.data(), counts.data(), N, a.spikes + row * a.nw64, a.nw64);
    }
    if (a.rates != nullptr) write_rates(counts.data(), N, a.T, a.rates + m * N);
  }
}

int64_t attention_group_heads(int64_t heads, int64_t head_dim, int64_t batch, int64_t threads) {
  // Tasks own whole 64-bit words of the packed A output, so a group spans a multiple of 64
  // columns unless it is the only group. Each task transposes its block input and projects its
  // Q columns step by step, so wider groups (up to 256 columns) share that transposition, as
  // long as batch * groups leaves every thread four tasks to balance.
  const int64_t unit = 64 / std::gcd<int64_t>(head_dim, 64);  // heads per whole-word span
  int64_t group = std::max<int64_t>(1, std::min(heads, unit));
  while (group < heads && (group + unit) * head_dim <= 256 &&
         batch * ((heads + group + unit - 1) / (group + unit)) >= 4 * threads)
    group = std::min(heads, group + unit);
  return group;
}

void attention_portable(const AttentionArgs& a, int64_t begin, int64_t end) {
  const int64_t S = a.S, d = a.head_dim, H = a.heads;
  const int64_t group = a.group_heads;
  const int64_t groups = (H + group - 1) / group;
  const int64_t HD = H * d;
  std::vector<float> q, scores(S), probs(S), out(d), membrane;
  std::vector<int32_t> counts;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / groups, g = task % groups;
    const int64_t h0 = g * group, h1 = std::min(H, h0 + group);
    const int64_t c0 = h0 * d, width = (h1 - h0) * d;
    q.assign(S * width, 0.0f);
    membrane.assign(S * width, 0.0f);
    counts.assign(S * width, 0);
    const int64_t w0 = c0 / 64, words = (width + 63) / 64;  // this task owns these words
    const float* mask = a.mask_add + b * S;
    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t row0 = t * a.B * S + b * S;
      for (int64_t i = 0; i < S; ++i) {
        uint64_t* bits = a.spikes + (row0 + i) * a.nw64 + w0;
        std::fill(bits, bits + words, uint64_t{0});
        // Q for this group's columns only; the count is exact, so slicing changes nothing.
        binary_row(a.x + (row0 + i) * a.kw64, a.K, a.kw64, a.wq + c0 * a.kw64, width,
                   a.alpha_q + c0, a.bias_q + c0, q.data() + i * width);
      }
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t hc = (h - h0) * d;  // head's first column within the group
        for (int64_t i = 0; i < S; ++i) {
          const float* qi = q.data() + i * width + hc;
          float max_score = -INFINITY;
          for (int64_t j = 0; j < S; ++j) {
            const uint64_t* kj = a.k + (row0 + j) * a.nw64;
            float acc = 0.0f;
            for (int64_t c = 0; c < d; ++c)
              if (test_bit(kj, h * d + c)) acc = acc + qi[c];
            scores[j] = acc * a.scale + mask[j];
            max_score = std::max(max_score, scores[j]);
          }
          for (int64_t j = 0; j < S; ++j) probs[j] = sleef_expf_u10(scores[j] - max_score);
          const float inv = 1.0f / softmax_sum(probs.data(), S);
          std::fill(out.begin(), out.end(), 0.0f);
          for (int64_t j = 0; j < S; ++j) {
            const float p = probs[j] * inv;
            const uint64_t* vj = a.v + (row0 + j) * a.nw64;
            for (int64_t c = 0; c < d; ++c)
              if (test_bit(vj, h * d + c)) out[c] = out[c] + p;
          }
          uint64_t* bits = a.spikes + (row0 + i) * a.nw64;
          for (int64_t c = 0; c < d; ++c) {
            const float current = a.gate != nullptr ? out[c] * a.gate[h] : out[c];
            if (a.current != nullptr) a.current[(row0 + i) * HD + h * d + c] = current;
            if (neuron_step(a.neuron, current, membrane[i * width + hc + c])) {
              const int64_t col = h * d + c;
              bits[col >> 6] |= uint64_t{1} << (col & 63);
              ++counts[i * width + hc + c];
            }
          }
        }
      }
    }
    if (a.rates != nullptr)
      for (int64_t i = 0; i < S; ++i)
        write_rates(counts.data() + i * width, width, a.T, a.rates + (b * S + i) * HD + c0);
  }
}

void scan_portable(const ScanArgs& a, int64_t begin, int64_t end) {
  std::vector<float> membrane(a.N);
  std::vector<int32_t> counts(a.N);
  for (int64_t m = begin; m < end; ++m) {
    std::fill(membrane.begin(), membrane.end(), 0.0f);
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t t = 0; t < a.T; ++t)
      scan_row(a.neuron, a.current + t * a.step_stride + m * a.N, membrane.data(), counts.data(),
               a.N, a.spikes + (t * a.M + m) * a.nw64, a.nw64);
    if (a.rates != nullptr) write_rates(counts.data(), a.N, a.T, a.rates + m * a.N);
  }
}

void bernoulli_portable(const BernoulliArgs& a, int64_t begin, int64_t end) {
  std::vector<uint32_t> mixed(a.K);
  for (int64_t m = begin; m < end; ++m) {
    for (int64_t k = 0; k < a.K; ++k)
      mixed[k] = mix32(static_cast<uint32_t>(static_cast<uint64_t>(m * a.full_width + a.cols[k])));
    const float* rate = a.rates + m * a.K;
    for (int64_t s = 0; s < a.steps; ++s) {
      uint64_t* bits = a.spikes + (s * a.M + m) * a.kw64;
      std::fill(bits, bits + a.kw64, uint64_t{0});
      for (int64_t k = 0; k < a.K; ++k) {
        const uint32_t h = mix32(mixed[k] ^ a.step_keys[s]);
        const float u = static_cast<float>(h >> 8) * 5.9604644775390625e-08f;  // 2^-24
        if (u < rate[k]) bits[k >> 6] |= uint64_t{1} << (k & 63);
      }
    }
  }
}

}  // namespace spikeinfer_cpu
