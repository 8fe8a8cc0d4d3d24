// Dynamic int8 activations (QuantConfig(activations="int8")) and the int4 x int8 dot product on
// AVX-512 VNNI integer multiply-adds.
//
// act_quant(): each block of 32 input channels of each row gets d = absmax / 127 and codes
// round_half_even(x / d) (0 where d == 0), as llmspeed.quant.primitives.quantize_activations; a layer with
// int8 activations computes with q * d.
// q4_rows_i8(): int4 weight rows (packed, group G % 64 == 0, asymmetric: w = s * (c - z)) against those
// codes: per 64 input channels one VPDPBUSD multiplies the 64 unsigned 4-bit codes by 64 signed 8-bit
// activation codes into 16 int32 lanes, which are converted and scaled by their block's d; the zero point
// enters once per group through the group sum of q * d. Integer products are exact, so the result equals
// q * d times the dequantized weight up to fp32 summation order.
// Included by llmspeed/generation/decode_cpu.cpp (the fused decode step).
#pragma once

#include <torch/extension.h>
#include <cmath>
#include <cstdint>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LLMSPEED_VNNI 1
#endif

constexpr int64_t ACT_BLOCK = 32;
constexpr int64_t PREFETCH_AHEAD = 4096;  // bytes of weight rows requested ahead of the ones being read

// Int8 codes of x [M, K] in blocks of ACT_BLOCK: q [M, Kb * 32] (zero past K), d [M, Kb].
struct ActCodes {
  int64_t M = 0, K = 0, Kb = 0;
  std::vector<int8_t> q;
  std::vector<float> d;
};

inline ActCodes act_quant(const float* x, int64_t M, int64_t K) {
  ActCodes a;
  a.M = M, a.K = K, a.Kb = (K + ACT_BLOCK - 1) / ACT_BLOCK;
  a.q.assign(M * a.Kb * ACT_BLOCK, 0);
  a.d.assign(M * a.Kb, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < a.Kb; ++b) {
      const int64_t k0 = b * ACT_BLOCK, k1 = std::min(K, k0 + ACT_BLOCK);
      const float* r = x + m * K;
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(r[k]));
      const float d = amax / 127.f;
      a.d[m * a.Kb + b] = d;
      if (d > 0.f)
        for (int64_t k = k0; k < k1; ++k) a.q[m * a.Kb * ACT_BLOCK + k] = static_cast<int8_t>(std::nearbyint(r[k] / d));
    }
  return a;
}

// q * d as fp32 [M, K]: what a layer with int8 activations multiplies (any kernel, any path).
inline std::vector<float> act_dequant(const ActCodes& a) {
  std::vector<float> out(a.M * a.K);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t k = 0; k < a.K; ++k)
      out[m * a.K + k] = a.q[m * a.Kb * ACT_BLOCK + k] * a.d[m * a.Kb + k / ACT_BLOCK];
  return out;
}

// The codes rearranged for q4_rows_i8 over a padded width Kp (a multiple of 64): per 64-channel chunk c,
// q [evens of the chunk | odds] (the order of [low nibbles | high nibbles] of its 32 weight bytes), the
// 16 lane scales [d0 x4, d1 x4, d0 x4, d1 x4] (d0, d1: the chunk's two blocks), and per weight group of G
// channels the sum of q * d.
struct ActChunks {
  std::vector<int8_t> q;   // [M, Kp]
  std::vector<float> dv;   // [M, Kp / 64 * 16]
  std::vector<float> sum;  // [M, Kp / G]
  int64_t Kp = 0;
};

inline ActChunks act_chunks(const ActCodes& a, int64_t Kp, int64_t G) {
  ActChunks c;
  c.Kp = Kp;
  const int64_t chunks = Kp / 64, groups = Kp / G, width = a.Kb * ACT_BLOCK;
  c.q.assign(a.M * Kp, 0);
  c.dv.assign(a.M * chunks * 16, 0.f);
  c.sum.assign(a.M * groups, 0.f);
  for (int64_t m = 0; m < a.M; ++m) {
    const int8_t* src = a.q.data() + m * width;
    const float* d = a.d.data() + m * a.Kb;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      int8_t* dst = c.q.data() + m * Kp + ch * 64;
      for (int64_t j = 0; j < 32; ++j) {
        const int64_t e = ch * 64 + 2 * j;
        dst[j] = e < width ? src[e] : 0;
        dst[32 + j] = e + 1 < width ? src[e + 1] : 0;
      }
      for (int64_t lane = 0; lane < 16; ++lane) {
        const int64_t b = 2 * ch + ((lane >> 2) & 1);
        c.dv[(m * chunks + ch) * 16 + lane] = b < a.Kb ? d[b] : 0.f;
      }
    }
    for (int64_t b = 0; b < a.Kb; ++b) {
      int32_t s = 0;
      for (int64_t k = 0; k < ACT_BLOCK; ++k) s += src[b * ACT_BLOCK + k];
      c.sum[m * groups + b * ACT_BLOCK / G] += static_cast<float>(s) * d[b];
    }
  }
  return c;
}

#ifdef LLMSPEED_VNNI
// y[r] = sum_k (q * d)[m, k] * s[r, g] * (c[r, k] - z[r, g]) for NR consecutive packed int4 weight rows
// (w: row_bytes apart; scale and zero [NR, groups] rows; groups of G channels, G % 64 == 0) and row m of the
// chunked activations. The NR rows share each chunk's activation loads and run as independent chains.
template <int NR>
inline void q4_rows_i8(const ActChunks& a, int64_t m, const uint8_t* w, int64_t row_bytes, int64_t G,
                       const float* scale, const float* zero, float* y) {
  const int64_t Kp = a.Kp, groups = Kp / G, per = G / 64, chunks = Kp / 64;
  const int8_t* xq = a.q.data() + m * Kp;
  const float* dv = a.dv.data() + m * chunks * 16;
  const float* xs = a.sum.data() + m * groups;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  __m512 tot[NR];
  for (int r = 0; r < NR; ++r) tot[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t ch = g * per; ch < (g + 1) * per; ++ch) {
      const __m512i x = _mm512_loadu_si512(xq + ch * 64);
      const __m512 d = _mm512_loadu_ps(dv + ch * 16);
      for (int r = 0; r < NR; ++r) {
        const uint8_t* p = w + r * row_bytes + ch * 32;
        if ((ch & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_AHEAD), _MM_HINT_T0);
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i lo = _mm256_and_si256(b, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);
        const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // [low nibbles | high]
        const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, x);  // 16 x (4 products)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc[r]);
      }
    }
    for (int r = 0; r < NR; ++r) tot[r] = _mm512_fmadd_ps(_mm512_set1_ps(scale[r * groups + g]), acc[r], tot[r]);
  }
  for (int r = 0; r < NR; ++r) {
    float zt = 0.f;  // the zero points' share: sum_g s * z * (group sum of q * d)
    for (int64_t g = 0; g < groups; ++g) zt += scale[r * groups + g] * zero[r * groups + g] * xs[g];
    y[r] = _mm512_reduce_add_ps(tot[r]) - zt;
  }
}
#endif

// Whether this build multiplies int4 codes by int8 activations with VNNI.
inline bool vnni_compiled() {
#ifdef LLMSPEED_VNNI
  return true;
#else
  return false;
#endif
}
