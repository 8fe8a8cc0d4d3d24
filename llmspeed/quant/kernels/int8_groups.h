// Group-wise int8 weights (QuantConfig("int8", group_size=G), GGUF's Q8_0 at G = 32): int8 codes w [N, K] and a
// fp16 scale per G consecutive input channels of a row, s [N, ceil(K / G)] (a row's last group may be shorter).
// Shared by the quantized matmul kernel (fused_cpu.cpp: int8_group_matmul, dequantize_int8_groups) and the fused
// decode step (gemv_rows.h, gemv_group.h). With int8 activations (i8g_dot_codes) the step multiplies the weight
// codes by the activation codes of q4_int8.h's act_quant as integers, as llama.cpp's Q8_0 x Q8_0 dot product.
#pragma once

#include "q4_tiles.h"  // half_t, h2f, hsum

#include <algorithm>
#include <cstdint>
#ifdef __AVX2__
#include <immintrin.h>
#endif

// y[r] = sum_g s[g] * sum_{k in group g} x[r * ldx + k] * w[k] for R rows of x; w one weight row [K], s its
// group scales (groups a multiple of 16 codes, so no run of 16 crosses a group's edge). Each 8 codes widen to fp32
// and take their group's scale (code * scale: the dequantized weight, as primitives.dequantize_int8 forms it), shared
// by the R rows; C FMA chains per row (4 for one or two rows, 2 for more, as the per-row int8 tile), one horizontal
// sum per row at the end.
template <int R>
inline void i8g_dot_rows(const float* x, int64_t ldx, const int8_t* w, int64_t K, int64_t G, const half_t* s,
                         float* y) {
  float tail[R] = {};
  int64_t g = 0, end = G;  // the group of the codes being read, and where it ends
  float sg = h2f(s[0]);
  const auto scale_at = [&](int64_t k) {  // the scale of code k (k never decreases)
    while (k >= end) {
      ++g;
      end += G;
      sg = h2f(s[g]);
    }
    return sg;
  };
  int64_t k = 0;
#ifdef __AVX2__
  constexpr int C = R <= 2 ? 4 : 2;
  __m256 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = _mm256_setzero_ps();
  for (; k + 8 * C <= K; k += 8 * C) {
    __m256 wv[C];
    for (int c = 0; c < C; c += 2) {  // 16 codes of one group
      const __m256 sv = _mm256_set1_ps(scale_at(k + 8 * c));
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 8 * c));
      wv[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), sv);
      wv[c + 1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))), sv);
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) a[r][c] = _mm256_fmadd_ps(wv[c], _mm256_loadu_ps(x + r * ldx + k + 8 * c), a[r][c]);
  }
#endif
  for (; k < K; ++k) {
    const float wk = static_cast<float>(w[k]) * scale_at(k);
    for (int r = 0; r < R; ++r) tail[r] += x[r * ldx + k] * wk;
  }
  for (int r = 0; r < R; ++r) {
#ifdef __AVX2__
    __m256 t = a[r][0];
    for (int c = 1; c < C; ++c) t = _mm256_add_ps(t, a[r][c]);
    y[r] = hsum(t) + tail[r];
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

// y[r] = sum_b d[r, b] * sum_k s[k / G] * w[k] * q[r, k] for R rows of int8 activation codes q (row stride ldq,
// zero past K) with their 32-channel block scales d (row stride ldd): what i8g_dot_rows gives for x = q * d,
// computed as integers. On AVX2 each 32 channels take one VPMADDUBSW of |w| by q carrying w's sign (as llama.cpp's
// Q8_0 x Q8_0; |w| <= 128 and |q| <= 127 keep the pair sums inside int16) and one VPMADDWD, giving 8 int32 lanes
// of 4 channels: lanes 0-3 the block's first 16 channels, 4-7 its last 16, each half inside one group (G % 16 == 0),
// so each half takes its group's scale times the row's d. Integer products are exact: the result equals the
// float dot product of q * d with the dequantized weight up to fp32 summation order.
template <int R>
inline void i8g_dot_codes(const int8_t* q, int64_t ldq, const float* d, int64_t ldd, const int8_t* w, int64_t K,
                          int64_t G, const half_t* s, float* y) {
  float tail[R] = {};
  int64_t k = 0, g = 0, left = G / 16;  // the group of the 16 channels at k, and its halves left before the next
  const auto next_half = [&]() {
    if (--left == 0) {
      ++g;
      left = G / 16;
    }
  };
#ifdef __AVX2__
  __m256 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (; k + 32 <= K; k += 32) {
    const float s0 = h2f(s[g]);
    next_half();
    const float s1 = h2f(s[g]);
    next_half();
    const __m256 sv = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));  // lanes 0-3: s0, 4-7: s1
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    const __m256i aw = _mm256_sign_epi8(wv, wv);  // |w| as unsigned bytes (-128 gives 128)
    for (int r = 0; r < R; ++r) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * ldq + k));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(qv, wv)), ones);  // [8] int32
      const __m256 ds = _mm256_mul_ps(sv, _mm256_set1_ps(d[r * ldd + k / 32]));
      a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), ds, a[r]);
    }
  }
#endif
  for (; k < K; ++k) {  // the last channels (fewer than 32), or all of them without AVX2
    const float wk = static_cast<float>(w[k]) * h2f(s[k / G]);
    for (int r = 0; r < R; ++r) tail[r] += static_cast<float>(q[r * ldq + k]) * d[r * ldd + k / 32] * wk;
  }
  for (int r = 0; r < R; ++r) {
#ifdef __AVX2__
    y[r] = hsum(a[r]) + tail[r];
#else
    y[r] = tail[r];
#endif
  }
}
