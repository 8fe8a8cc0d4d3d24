// Rows of llmspeed's packed weights widened to fp32, for the fp32 GEMM of prompt-sized steps: shared by the
// quantized matmul kernel (fused_cpu.cpp: dequantize_4bit / dequantize_int8) and the fused decode step
// (decode_cpu.cpp: quantized matrices of steps with prompt chunks). The same fp32 operations as
// llmspeed.quant.primitives.dequantize_int4 / dequantize_nf4 / dequantize_int8, so the same bits.
#pragma once

#include "q4_tiles.h"  // NF4

#include <cstdint>
#ifdef __AVX2__
#include <immintrin.h>
#endif

// Rows r0..r1 of a packed 4-bit weight q [R, Kp / 2] as fp32 out [r1 - r0, Kp]: int4 (c - z) * s, NF4 NF4[c] * s
// (zero == nullptr). Scales and zeros fp16 [R, Kp / G]; groups of G % 16 == 0; each 8 bytes (16 codes) widen to
// fp32 in registers with AVX2.
inline void dequant_4bit_rows(const uint8_t* q, const half_t* scale, const half_t* zero, int64_t Kp, int64_t G,
                              int64_t r0, int64_t r1, float* out) {
  const bool nf = zero == nullptr;
  const int64_t groups = Kp / G;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float s = h2f(scale[r * groups + g]), z = nf ? 0.f : h2f(zero[r * groups + g]);
      const uint8_t* p = q + r * (Kp / 2) + g * (G / 2);
      float* y = out + (r - r0) * Kp + g * G;
      int64_t j = 0;
#ifdef __AVX2__
      const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
      const __m256 cb0 = _mm256_loadu_ps(NF4), cb1 = _mm256_loadu_ps(NF4 + 8);
      const __m128i nib = _mm_set1_epi8(0x0F);
      for (; j < G / 2; j += 8, y += 16) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j));
        const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(b, nib), _mm_and_si128(_mm_srli_epi16(b, 4), nib));
        for (int h = 0; h < 2; ++h) {
          const __m256i c = _mm256_cvtepu8_epi32(h == 0 ? codes : _mm_srli_si128(codes, 8));
          __m256 v;
          if (nf) {
            v = _mm256_mul_ps(nf4_lookup8(c, cb0, cb1), sv);
          } else {
            v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c), zv), sv);
          }
          _mm256_storeu_ps(y + 8 * h, v);
        }
      }
#endif
      for (; j < G / 2; ++j, y += 2) {
        const int c0 = p[j] & 0x0F, c1 = p[j] >> 4;
        y[0] = nf ? NF4[c0] * s : (static_cast<float>(c0) - z) * s;
        y[1] = nf ? NF4[c1] * s : (static_cast<float>(c1) - z) * s;
      }
    }
}

// Rows r0..r1 of int8 codes c [R, K] times their row scales, fp32 out [r1 - r0, K].
inline void dequant_int8_rows(const int8_t* c, const float* scale, int64_t K, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t k = 0; k < K; ++k) out[(r - r0) * K + k] = static_cast<float>(c[r * K + k]) * scale[r];
}
