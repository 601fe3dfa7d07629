// Helpers shared by the vector kernel units (kernels_avx2.cpp, kernels_avx512.cpp). Each unit
// includes this header after its `#pragma GCC target`, so every helper compiles for that unit's
// target with internal linkage (as spikeinfer_cpu.h's maths does); the portable unit, compiled
// for the generic target, does not include it. Needs <immintrin.h> included before the pragma.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace spikeinfer_cpu {

namespace {

// 8-lane float vector for the shared rowwise_moments template (PyTorch's LayerNorm moments run
// on 8-lane AVX2 vectors even on AVX-512 machines).
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
  T& operator[](int64_t i) { return p[i]; }
};

inline uint32_t last_word32_mask(int64_t bits) {
  const int64_t rem = bits % 32;
  return rem == 0 ? 0xFFFFFFFFu : (1u << rem) - 1;
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

// Software prefetch of the bytes [p, p + bytes). Time-major tensors put a row's consecutive steps
// M rows apart, a stride the hardware prefetchers do not follow, so every step's first touch of
// a block's input and output spike rows missed the cache. Prefetching them kPrefetchSteps ahead
// made the fused projection with the plain epilogue, then on the row-at-a-time path, 11-14 %
// faster on the 2-core Zen 4 (384 x 384, T 85, 800 rows; the GELU epilogue is bound by GELU and
// gained nothing measurable). The attention op, with far more work per step, gained nothing
// either, nor did the AVX-512 plain epilogue's steps-innermost tile (1.50 T at 384 x 384, T 85,
// with and without), so neither has any.
constexpr int64_t kPrefetchSteps = 2;

template <bool kForWrite>
inline void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, kForWrite ? 1 : 0, 3);
}

// Bits row[start .. start+len) as the low len bits of a word (len <= 64).
inline uint64_t bit_field(const uint64_t* row, int64_t start, int64_t len) {
  const int64_t off = start & 63;
  uint64_t bits = row[start >> 6] >> off;
  if (off + len > 64) bits |= row[(start >> 6) + 1] << (64 - off);
  return len < 64 ? bits & ((uint64_t{1} << len) - 1) : bits;
}

// Calls f(offset) for every set bit of row[start .. start+len), in ascending order.
template <class F>
inline void for_each_set_bit(const uint64_t* row, int64_t start, int64_t len, F&& f) {
  int64_t pos = start;
  const int64_t end = start + len;
  while (pos < end) {
    const int64_t off = pos & 63;
    const int64_t take = std::min<int64_t>(64 - off, end - pos);
    uint64_t bits = row[pos >> 6] >> off;
    if (take < 64) bits &= (uint64_t{1} << take) - 1;
    while (bits != 0) {
      f(pos - start + static_cast<int64_t>(_tzcnt_u64(bits)));
      bits = _blsr_u64(bits);
    }
    pos += take;
  }
}

}  // namespace

}  // namespace spikeinfer_cpu
