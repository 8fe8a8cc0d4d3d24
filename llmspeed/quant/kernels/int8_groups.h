// Group-wise int8 weights (QuantConfig("int8", group_size=G), GGUF's Q8_0 at G = 32): int8 codes w [N, K] and a
// fp16 scale per G consecutive input channels of a row, s [N, ceil(K / G)] (a row's last group may be shorter).
// Shared by the quantized matmul kernel (fused_cpu.cpp: int8_group_matmul, dequantize_int8_groups) and the fused
// decode step (gemv_rows.h, gemv_group.h): one dot product per group, folded into the row's sum by its scale.
#pragma once

#include "q4_tiles.h"  // half_t, h2f, hsum

#include <algorithm>
#include <cstdint>
#ifdef __AVX2__
#include <immintrin.h>
#endif

// y[r] = sum_g s[g] * sum_{k in group g} x[r * ldx + k] * w[k] for R rows of x; w one weight row [K], s its
// group scales. Each group's products gather in registers (two chains of 8 lanes, 16 codes a step) and fold
// into the row's running sum with one FMA by the group's scale: no horizontal sum per group.
template <int R>
inline void i8g_dot_rows(const float* x, int64_t ldx, const int8_t* w, int64_t K, int64_t G, const half_t* s,
                         float* y) {
  float tail[R] = {};
#ifdef __AVX2__
  __m256 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
#endif
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, ++g) {
    const int64_t k1 = std::min(K, k0 + G);
    const float sg = h2f(s[g]);
    int64_t k = k0;
#ifdef __AVX2__
    __m256 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    for (; k + 16 <= k1; k += 16) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
      for (int r = 0; r < R; ++r) {
        a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * ldx + k), a0[r]);
        a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * ldx + k + 8), a1[r]);
      }
    }
    const __m256 sv = _mm256_set1_ps(sg);
    for (int r = 0; r < R; ++r) tot[r] = _mm256_fmadd_ps(_mm256_add_ps(a0[r], a1[r]), sv, tot[r]);
#endif
    for (int r = 0; r < R; ++r) {
      float part = 0.f;
      for (int64_t j = k; j < k1; ++j) part += x[r * ldx + j] * static_cast<float>(w[j]);
      tail[r] += part * sg;
    }
  }
  for (int r = 0; r < R; ++r) {
#ifdef __AVX2__
    y[r] = hsum(tot[r]) + tail[r];
#else
    y[r] = tail[r];
#endif
  }
}

// Rows r0..r1 of group-wise int8 codes c [R, K] times their group scales s [R, ceil(K / G)], fp32 out
// [r1 - r0, K]: the products primitives.dequantize_int8 forms (code * scale in fp32), so the same bits.
inline void dequant_int8_group_rows(const int8_t* c, const half_t* s, int64_t K, int64_t G, int64_t r0, int64_t r1,
                                    float* out) {
  const int64_t groups = (K + G - 1) / G;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t k = 0; k < K; ++k)
      out[(r - r0) * K + k] = static_cast<float>(c[r * K + k]) * h2f(s[r * groups + k / G]);
}
