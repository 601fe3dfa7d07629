// Torch op layer of the spikeinfer CPU backend: argument checks, output allocation, run-time ISA
// dispatch (AVX-512 VPOPCNTDQ, else AVX2, else the portable kernels, or the lower path that
// SPIKEINFER_CPU_ISA names; read at every call) and threading over rows with at::parallel_for.
//
// Packed spike layout everywhere: int64 words [..., ceil(F / 64)], bit f % 64 of word f / 64 is
// feature f (little-endian), padding bits zero. Signs pack the same way with bit = 1 for +1.
// The maths of each op is stated in spikeinfer_cpu.h and the kernel sources.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "spikeinfer_cpu.h"

namespace spikeinfer_cpu {

namespace {

using at::Tensor;

// The kernel paths, fastest last. AVX2 (with FMA, POPCNT, BMI1/2) covers the x86-64 CPUs without
// AVX-512 VPOPCNTDQ (AMD Zen 1-3, Intel Haswell to Comet Lake), where the portable loops made
// whole-model inference 18 times slower (SST-2 dev on a Zen 3: 0.66 against 11.9 sentences/s).
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512-vpopcntdq";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

Isa cpu_best_isa() {
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vpopcntdq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi") &&
        __builtin_cpu_supports("bmi2"))
      return Isa::kAvx2;
    return Isa::kPortable;
  }();
  return best;
}

// The path of this call: the CPU's best, or the one SPIKEINFER_CPU_ISA names (portable, avx2,
// avx512; read at every call so tests can compare paths in one process). SPIKEINFER_CPU_PORTABLE=1
// is the older spelling of SPIKEINFER_CPU_ISA=portable. A path the CPU cannot run is an error,
// never a silent substitute.
Isa active_isa() {
  const char* portable = std::getenv("SPIKEINFER_CPU_PORTABLE");
  if (portable != nullptr && portable[0] != '\0' && std::strcmp(portable, "0") != 0)
    return Isa::kPortable;
  const Isa best = cpu_best_isa();
  const char* env = std::getenv("SPIKEINFER_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  Isa wanted;
  if (std::strcmp(env, "portable") == 0)
    wanted = Isa::kPortable;
  else if (std::strcmp(env, "avx2") == 0)
    wanted = Isa::kAvx2;
  else if (std::strcmp(env, "avx512") == 0 || std::strcmp(env, "avx512-vpopcntdq") == 0)
    wanted = Isa::kAvx512;
  else
    TORCH_CHECK(false, "spikeinfer_cpu: SPIKEINFER_CPU_ISA must be portable, avx2 or avx512, got '",
                env, "'");
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(best),
              "spikeinfer_cpu: SPIKEINFER_CPU_ISA=", env, " asks for a kernel path this CPU cannot "
              "run (its best is ", isa_name(best), "); unset it or name a lower one");
  return wanted;
}

std::string isa() { return isa_name(active_isa()); }

int64_t words_for(int64_t features) { return (features + 63) / 64; }

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "spikeinfer_cpu: ", name, " must be a CPU tensor, got ",
              t.device());
}

void check_packed(const Tensor& t, const char* name, int64_t features) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, "spikeinfer_cpu: ", name,
              " must be packed int64 words, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == words_for(features), "spikeinfer_cpu: ", name,
              " must end in ", words_for(features), " words for ", features, " features, got ",
              t.sizes());
}

Tensor float_vector(const Tensor& t, const char* name, int64_t n) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "spikeinfer_cpu: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "spikeinfer_cpu: ", name, " must have shape [", n,
              "], got ", t.sizes());
  return t.contiguous();
}

const uint64_t* words(const Tensor& t) {
  return reinterpret_cast<const uint64_t*>(t.const_data_ptr<int64_t>());
}

uint64_t* mutable_words(Tensor& t) {
  return reinterpret_cast<uint64_t*>(t.mutable_data_ptr<int64_t>());
}

NeuronSpec neuron_spec(double v_th, double leak, bool fire_on_ge) {
  TORCH_CHECK(v_th > 0, "spikeinfer_cpu: v_th must be positive, got ", v_th);
  TORCH_CHECK(leak > 0 && leak <= 1, "spikeinfer_cpu: leak must be in (0, 1], got ", leak);
  NeuronSpec n;
  n.v_th = static_cast<float>(v_th);
  n.leak = static_cast<float>(leak);
  n.fire_on_ge = fire_on_ge;
  return n;
}

// Grain (rows per task) so that small problems stay on one thread.
int64_t grain_for(int64_t rows, double work_per_row) {
  const double min_work = 65536.0;
  const int64_t grain = static_cast<int64_t>(std::ceil(min_work / std::max(1.0, work_per_row)));
  return std::max<int64_t>(1, std::min(grain, rows));
}

// +1-sign words of the vector paths' column groups, interleaved per 32-bit input word, padding
// bits and padding columns zero. AVX-512: 16 columns, [ceil(N/16), kw32, 16]. AVX2 (`nibbles`):
// 8 columns split into nibbles, [ceil(N/8), kw32, 2, 8] holding w & 0x0f0f0f0f, then
// (w >> 4) & 0x0f0f0f0f (its table-lookup popcount indexes bytes by nibble).
std::vector<uint32_t> interleave_signs(const uint64_t* w, int64_t N, int64_t K, int64_t kw64,
                                       bool nibbles) {
  const int64_t lanes = nibbles ? 8 : 16;
  const int64_t kw32 = (K + 31) / 32, groups = (N + lanes - 1) / lanes;
  const uint32_t tail = K % 32 == 0 ? 0xFFFFFFFFu : (1u << (K % 32)) - 1;
  std::vector<uint32_t> il(static_cast<size_t>(std::max<int64_t>(groups * kw32 * 16, 1)), 0u);
  for (int64_t n = 0; n < N; ++n) {
    const uint32_t* w32 = reinterpret_cast<const uint32_t*>(w + n * kw64);
    for (int64_t k = 0; k < kw32; ++k) {
      const uint32_t word = k == kw32 - 1 ? w32[k] & tail : w32[k];
      uint32_t* slot = il.data() + ((n / lanes) * kw32 + k) * 16 + n % lanes;
      if (nibbles) {
        slot[0] = word & 0x0f0f0f0fu;
        slot[8] = (word >> 4) & 0x0f0f0f0fu;
      } else {
        slot[0] = word;
      }
    }
  }
  return il;
}

void run_linear(LinearNeuronArgs& a) {
  const Isa path = active_isa();
  std::vector<uint32_t> il;
  if (path != Isa::kPortable) {
    il = interleave_signs(a.w, a.N, a.K, a.kw64, /*nibbles=*/path == Isa::kAvx2);
    a.w_il = il.data();
  }
  const double work = static_cast<double>(a.T) * (a.N + 1) * (a.kw64 + 4);
  at::parallel_for(0, a.M, grain_for(a.M, work), [&](int64_t begin, int64_t end) {
    if (path == Isa::kAvx512)
      linear_neuron_avx512(a, begin, end);
    else if (path == Isa::kAvx2)
      linear_neuron_avx2(a, begin, end);
    else
      linear_neuron_portable(a, begin, end);
  });
}

// ---- ops ------------------------------------------------------------------------------------

Tensor pack_spikes(const Tensor& spikes) {
  check_cpu(spikes, "spikes");
  TORCH_CHECK(spikes.dim() >= 1, "spikeinfer_cpu.pack_spikes: spikes must have a feature dim");
  const int64_t K = spikes.size(-1), kw = words_for(K);
  auto shape = spikes.sizes().vec();
  shape.back() = kw;
  Tensor out = at::zeros(shape, spikes.options().dtype(at::kLong));
  if (spikes.numel() == 0) return out;
  const Tensor bits = spikes.ne(0).to(at::kByte).contiguous().reshape({-1, K});
  const int64_t rows = bits.size(0);
  const uint8_t* src = bits.const_data_ptr<uint8_t>();
  uint64_t* dst = mutable_words(out);
  at::parallel_for(0, rows, grain_for(rows, static_cast<double>(K)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t k = 0; k < K; ++k)
        if (src[r * K + k]) dst[r * kw + k / 64] |= uint64_t{1} << (k % 64);
  });
  return out;
}

Tensor pack_signs(const Tensor& signs) {
  check_cpu(signs, "signs");
  TORCH_CHECK(signs.dim() == 2, "spikeinfer_cpu.pack_signs: signs must be [N, K], got ",
              signs.sizes());
  // Bit = 1 for +1 (sign(0) is +1 by the 1-bit convention, so test > 0 on +-1 inputs only).
  return pack_spikes(signs.gt(0));
}

Tensor unpack_spikes(const Tensor& packed, int64_t features) {
  check_packed(packed, "packed", features);
  const Tensor p = packed.contiguous();
  const int64_t kw = words_for(features);
  auto shape = p.sizes().vec();
  shape.back() = features;
  Tensor out = at::empty(shape, p.options().dtype(at::kFloat));
  const int64_t rows = kw == 0 ? out.numel() / std::max<int64_t>(features, 1) : p.numel() / kw;
  const uint64_t* src = words(p);
  float* dst = out.mutable_data_ptr<float>();
  const int64_t grain = grain_for(rows, static_cast<double>(features));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t f = 0; f < features; ++f)
        dst[r * features + f] = static_cast<float>((src[r * kw + f / 64] >> (f % 64)) & 1);
  });
  return out;
}

Tensor binary_gemm(const Tensor& spikes, const Tensor& signs, int64_t in_features,
                   const Tensor& alpha, const Tensor& bias) {
  TORCH_CHECK(in_features >= 0, "spikeinfer_cpu.binary_gemm: in_features must be >= 0");
  check_packed(spikes, "spikes", in_features);
  check_packed(signs, "signs", in_features);
  TORCH_CHECK(signs.dim() == 2, "spikeinfer_cpu.binary_gemm: signs must be [N, words], got ",
              signs.sizes());
  const int64_t N = signs.size(0), kw = words_for(in_features);
  const Tensor x = spikes.contiguous(), w = signs.contiguous();
  const Tensor al = float_vector(alpha, "alpha", N), bi = float_vector(bias, "bias", N);
  auto shape = x.sizes().vec();
  shape.back() = N;
  Tensor out = at::empty(shape, x.options().dtype(at::kFloat));
  int64_t M = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) M *= shape[i];
  if (M == 0 || N == 0) return out;
  LinearNeuronArgs a;
  a.x = words(x);
  a.T = 1;
  a.M = M;
  a.K = in_features;
  a.kw64 = kw;
  a.w = words(w);
  a.alpha = al.const_data_ptr<float>();
  a.bias = bi.const_data_ptr<float>();
  a.N = N;
  a.nw64 = words_for(N);
  a.epilogue = kEpilogueNone;
  a.out = out.mutable_data_ptr<float>();
  run_linear(a);
  return out;
}

std::tuple<Tensor, Tensor> neuron_scan(const Tensor& current, double v_th, double leak,
                                       bool fire_on_ge) {
  check_cpu(current, "current");
  TORCH_CHECK(current.scalar_type() == at::kFloat && current.dim() == 3,
              "spikeinfer_cpu.neuron_scan: current must be float32 [T, M, N], got ",
              current.scalar_type(), " ", current.sizes());
  const int64_t T = current.size(0), M = current.size(1), N = current.size(2);
  TORCH_CHECK(T >= 1, "spikeinfer_cpu.neuron_scan: need T >= 1");
  // A constant current broadcast over T (stride 0) is read in place.
  Tensor cur = current;
  if (!(current.stride(2) == 1 && current.stride(1) == N && M * N > 0 &&
        (current.stride(0) == 0 || current.stride(0) == M * N)))
    cur = current.contiguous();
  Tensor spikes = at::empty({T, M, words_for(N)}, current.options().dtype(at::kLong));
  Tensor rates = at::empty({M, N}, current.options().dtype(at::kFloat));
  if (M * N == 0) return {spikes, rates};
  ScanArgs a;
  a.current = cur.const_data_ptr<float>();
  a.step_stride = cur.stride(0);
  a.T = T;
  a.M = M;
  a.N = N;
  a.nw64 = words_for(N);
  a.neuron = neuron_spec(v_th, leak, fire_on_ge);
  a.spikes = mutable_words(spikes);
  a.rates = rates.mutable_data_ptr<float>();
  const Isa path = active_isa();
  at::parallel_for(0, M, grain_for(M, static_cast<double>(T) * N), [&](int64_t b, int64_t e) {
    if (path == Isa::kAvx512)
      scan_avx512(a, b, e);
    else if (path == Isa::kAvx2)
      scan_avx2(a, b, e);
    else
      scan_portable(a, b, e);
  });
  return {spikes, rates};
}

std::tuple<Tensor, Tensor, Tensor> spike_linear_neuron(
    const Tensor& spikes, const Tensor& signs, int64_t in_features, const Tensor& alpha,
    const Tensor& bias, int64_t epilogue, const std::optional<Tensor>& residual,
    const std::optional<Tensor>& ln_weight, const std::optional<Tensor>& ln_bias, double eps,
    const std::optional<Tensor>& gate, double v_th, double leak, bool fire_on_ge,
    bool return_current) {
  TORCH_CHECK(epilogue == kEpiloguePlain || epilogue == kEpilogueGelu ||
                  epilogue == kEpilogueResidualLayerNorm,
              "spikeinfer_cpu.spike_linear_neuron: epilogue must be 1 (plain), 2 (GELU) or 3 "
              "(residual + LayerNorm), got ", epilogue);
  check_packed(spikes, "spikes", in_features);
  TORCH_CHECK(spikes.dim() == 3,
              "spikeinfer_cpu.spike_linear_neuron: spikes must be [T, M, words]");
  check_packed(signs, "signs", in_features);
  TORCH_CHECK(signs.dim() == 2, "spikeinfer_cpu.spike_linear_neuron: signs must be [N, words]");
  const int64_t T = spikes.size(0), M = spikes.size(1), N = signs.size(0);
  TORCH_CHECK(T >= 1, "spikeinfer_cpu.spike_linear_neuron: need T >= 1");
  const Tensor x = spikes.contiguous(), w = signs.contiguous();
  const Tensor al = float_vector(alpha, "alpha", N), bi = float_vector(bias, "bias", N);
  LinearNeuronArgs a;
  Tensor res, lw, lb, gt;
  if (residual.has_value()) {
    check_packed(*residual, "residual", N);
    TORCH_CHECK(residual->dim() == 3 && residual->size(0) == T && residual->size(1) == M,
                "spikeinfer_cpu.spike_linear_neuron: residual must be [T, M, words(N)], got ",
                residual->sizes());
    res = residual->contiguous();
    a.residual = words(res);
  }
  if (epilogue == kEpilogueResidualLayerNorm) {
    TORCH_CHECK(ln_weight.has_value() && ln_bias.has_value(),
                "spikeinfer_cpu.spike_linear_neuron: LayerNorm epilogue needs ln_weight and "
                "ln_bias");
    lw = float_vector(*ln_weight, "ln_weight", N);
    lb = float_vector(*ln_bias, "ln_bias", N);
    a.ln_weight = lw.const_data_ptr<float>();
    a.ln_bias = lb.const_data_ptr<float>();
  }
  if (gate.has_value()) {
    gt = float_vector(*gate, "gate", N);
    a.gate = gt.const_data_ptr<float>();
  }
  Tensor out_spikes = at::empty({T, M, words_for(N)}, spikes.options());
  Tensor rates = at::empty({M, N}, spikes.options().dtype(at::kFloat));
  Tensor current = return_current ? at::empty({T, M, N}, spikes.options().dtype(at::kFloat))
                                  : at::empty({0}, spikes.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return {out_spikes, rates, current};
  a.x = words(x);
  a.T = T;
  a.M = M;
  a.K = in_features;
  a.kw64 = words_for(in_features);
  a.w = words(w);
  a.alpha = al.const_data_ptr<float>();
  a.bias = bi.const_data_ptr<float>();
  a.N = N;
  a.nw64 = words_for(N);
  a.epilogue = static_cast<int>(epilogue);
  a.eps = static_cast<float>(eps);
  a.neuron = neuron_spec(v_th, leak, fire_on_ge);
  a.spikes = mutable_words(out_spikes);
  a.rates = rates.mutable_data_ptr<float>();
  a.out = return_current ? current.mutable_data_ptr<float>() : nullptr;
  run_linear(a);
  return {out_spikes, rates, current};
}

std::tuple<Tensor, Tensor, Tensor> spiking_attention_neuron(
    const Tensor& spikes, const Tensor& q_signs, int64_t in_features, const Tensor& q_alpha,
    const Tensor& q_bias, const Tensor& k_spikes, const Tensor& v_spikes, const Tensor& mask_add,
    const std::optional<Tensor>& head_gate, int64_t heads, double v_th, double leak,
    bool fire_on_ge, bool return_current) {
  check_packed(spikes, "spikes", in_features);
  TORCH_CHECK(spikes.dim() == 4, "spikeinfer_cpu.spiking_attention_neuron: spikes must be "
              "[T, B, S, words], got ", spikes.sizes());
  check_packed(q_signs, "q_signs", in_features);
  TORCH_CHECK(q_signs.dim() == 2, "spikeinfer_cpu.spiking_attention_neuron: q_signs must be 2-D");
  const int64_t T = spikes.size(0), B = spikes.size(1), S = spikes.size(2);
  const int64_t HD = q_signs.size(0);
  TORCH_CHECK(heads >= 1 && HD % heads == 0, "spikeinfer_cpu.spiking_attention_neuron: ", HD,
              " Q columns do not split into ", heads, " heads");
  const int64_t d = HD / heads;
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{k_spikes, "k_spikes"},
                                std::pair<const Tensor&, const char*>{v_spikes, "v_spikes"}}) {
    check_packed(t, name, HD);
    TORCH_CHECK(t.dim() == 4 && t.size(0) == T && t.size(1) == B && t.size(2) == S,
                "spikeinfer_cpu.spiking_attention_neuron: ", name,
                " must be [T, B, S, words], got ",
                t.sizes());
  }
  check_cpu(mask_add, "mask_add");
  TORCH_CHECK(mask_add.scalar_type() == at::kFloat && mask_add.dim() == 2 &&
                  mask_add.size(0) == B && mask_add.size(1) == S,
              "spikeinfer_cpu.spiking_attention_neuron: mask_add must be float32 [B, S], got ",
              mask_add.sizes());
  const Tensor x = spikes.contiguous(), wq = q_signs.contiguous(), k = k_spikes.contiguous(),
               v = v_spikes.contiguous(), mask = mask_add.contiguous();
  const Tensor al = float_vector(q_alpha, "q_alpha", HD), bi = float_vector(q_bias, "q_bias", HD);
  Tensor gt;
  AttentionArgs a;
  if (head_gate.has_value()) {
    gt = float_vector(*head_gate, "head_gate", heads);
    a.gate = gt.const_data_ptr<float>();
  }
  Tensor out_spikes = at::empty({T, B, S, words_for(HD)}, spikes.options());
  Tensor rates = at::empty({B, S, HD}, spikes.options().dtype(at::kFloat));
  Tensor current = return_current ? at::zeros({T, B, S, HD}, spikes.options().dtype(at::kFloat))
                                  : at::empty({0}, spikes.options().dtype(at::kFloat));
  if (B * S == 0 || HD == 0) return {out_spikes, rates, current};
  a.x = words(x);
  a.T = T;
  a.B = B;
  a.S = S;
  a.K = in_features;
  a.kw64 = words_for(in_features);
  a.wq = words(wq);
  a.alpha_q = al.const_data_ptr<float>();
  a.bias_q = bi.const_data_ptr<float>();
  a.k = words(k);
  a.v = words(v);
  a.mask_add = mask.const_data_ptr<float>();
  a.heads = heads;
  a.head_dim = d;
  a.nw64 = words_for(HD);
  // The reference multiplies by the Python float 1 / sqrt(d), which torch rounds to float32.
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  a.neuron = neuron_spec(v_th, leak, fire_on_ge);
  a.spikes = mutable_words(out_spikes);
  a.rates = rates.mutable_data_ptr<float>();
  a.current = return_current ? current.mutable_data_ptr<float>() : nullptr;
  a.group_heads = attention_group_heads(heads, d, B, at::get_num_threads());
  const int64_t tasks = B * ((heads + a.group_heads - 1) / a.group_heads);
  const Isa path = active_isa();
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    if (path == Isa::kAvx512)
      attention_avx512(a, b, e);
    else if (path == Isa::kAvx2)
      attention_avx2(a, b, e);
    else
      attention_portable(a, b, e);
  });
  return {out_spikes, rates, current};
}

Tensor bernoulli_pack(const Tensor& rates, const Tensor& columns, int64_t full_width, int64_t seed,
                      int64_t stream, int64_t steps) {
  check_cpu(rates, "rates");
  TORCH_CHECK(rates.scalar_type() == at::kFloat && rates.dim() >= 1,
              "spikeinfer_cpu.bernoulli_pack: rates must be float32 [..., K], got ",
              rates.scalar_type(), " ", rates.sizes());
  const int64_t K = rates.size(-1);
  check_cpu(columns, "columns");
  TORCH_CHECK(columns.scalar_type() == at::kLong && columns.dim() == 1 && columns.size(0) == K,
              "spikeinfer_cpu.bernoulli_pack: columns must be int64 [", K, "], got ",
              columns.sizes());
  TORCH_CHECK(steps >= 1, "spikeinfer_cpu.bernoulli_pack: steps must be >= 1");
  const Tensor r = rates.contiguous(), cols = columns.contiguous();
  auto shape = r.sizes().vec();
  shape.back() = words_for(K);
  shape.insert(shape.begin(), steps);
  Tensor out = at::empty(shape, rates.options().dtype(at::kLong));
  const int64_t M = K == 0 ? 0 : r.numel() / K;
  if (M == 0) return out;
  std::vector<uint32_t> keys(static_cast<size_t>(steps));
  for (int64_t s = 0; s < steps; ++s) keys[s] = step_key(seed, stream, s);
  BernoulliArgs a;
  a.rates = r.const_data_ptr<float>();
  a.cols = cols.const_data_ptr<int64_t>();
  a.M = M;
  a.K = K;
  a.kw64 = words_for(K);
  a.full_width = full_width;
  a.steps = steps;
  a.step_keys = keys.data();
  a.spikes = mutable_words(out);
  const Isa path = active_isa();
  at::parallel_for(0, M, grain_for(M, static_cast<double>(K) * steps), [&](int64_t b, int64_t e) {
    if (path == Isa::kAvx512)
      bernoulli_avx512(a, b, e);
    else if (path == Isa::kAvx2)
      bernoulli_avx2(a, b, e);
    else
      bernoulli_portable(a, b, e);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(spikeinfer_cpu, m) {
  m.def("isa() -> str", &isa);
  m.def("pack_spikes(Tensor spikes) -> Tensor");
  m.def("pack_signs(Tensor signs) -> Tensor");
  m.def("unpack_spikes(Tensor packed, int features) -> Tensor");
  m.def("binary_gemm(Tensor spikes, Tensor signs, int in_features, Tensor alpha, Tensor bias) "
        "-> Tensor");
  m.def("neuron_scan(Tensor current, float v_th, float leak, bool fire_on_ge) -> (Tensor, Tensor)");
  m.def("spike_linear_neuron(Tensor spikes, Tensor signs, int in_features, Tensor alpha, "
        "Tensor bias, int epilogue, Tensor? residual, Tensor? ln_weight, Tensor? ln_bias, "
        "float eps, Tensor? gate, float v_th, float leak, bool fire_on_ge, bool return_current) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("spiking_attention_neuron(Tensor spikes, Tensor q_signs, int in_features, "
        "Tensor q_alpha, Tensor q_bias, Tensor k_spikes, Tensor v_spikes, Tensor mask_add, "
        "Tensor? head_gate, int heads, float v_th, float leak, bool fire_on_ge, "
        "bool return_current) -> (Tensor, Tensor, Tensor)");
  m.def("bernoulli_pack(Tensor rates, Tensor columns, int full_width, int seed, int stream, "
        "int steps) -> Tensor");
}

TORCH_LIBRARY_IMPL(spikeinfer_cpu, CPU, m) {
  m.impl("pack_spikes", &pack_spikes);
  m.impl("pack_signs", &pack_signs);
  m.impl("unpack_spikes", &unpack_spikes);
  m.impl("binary_gemm", &binary_gemm);
  m.impl("neuron_scan", &neuron_scan);
  m.impl("spike_linear_neuron", &spike_linear_neuron);
  m.impl("spiking_attention_neuron", &spiking_attention_neuron);
  m.impl("bernoulli_pack", &bernoulli_pack);
}

}  // namespace spikeinfer_cpu
