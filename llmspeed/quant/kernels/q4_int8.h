// Dynamic int8 activations (QuantConfig(activations="int8")) and the int4 / int8 x int8 dot products on
// AVX-512 VNNI integer multiply-adds, or on AVX2's byte multiply-adds (VPMADDUBSW, VPMADDWD) without VNNI.
//
// act_quant() / act_block(): each block of 32 input channels of each row gets d = absmax / 127 and codes
// round_half_even(x / d) (0 where d == 0), as llmspeed.quant.primitives.quantize_activations; a layer with
// int8 activations computes with q * d (act_round() writes it). A block holding a NaN or an infinity gets
// d = NaN, so all its q * d are NaN as the primitive's (its absmax keeps a NaN; x / inf is 0, times inf NaN):
// the vector max drops NaN lanes, so the blocks are checked apart (else a NaN became a large finite value).
// q4_rows_i8(): int4 weight rows (packed, group G % 32 == 0, asymmetric: w = s * (c - z)) against those
// codes: per 64 input channels one VPDPBUSD multiplies the 64 unsigned 4-bit codes by 64 signed 8-bit
// activation codes into 16 int32 lanes, which are converted and scaled by their block's d and group's s;
// the zero point enters once per group through the group sum of q * d. q8_rows_i8(): int8 weight rows
// likewise, offset to unsigned bytes. Integer products are exact, so the result equals q * d times the
// dequantized weight up to fp32 summation order. The AVX2 versions keep the same contract (below).
// Included by llmspeed/generation/decode_cpu.cpp (the fused decode step) and
// llmspeed/quant/kernels/fused_cpu.cpp (act_round, for the per-layer path).
#pragma once

#include "q4_tiles.h"  // half_t, h2f: the 4-bit scales and zeros

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
#define LLMSPEED_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#define LLMSPEED_AVX2_DOT 1  // the same dot products with AVX2's VPMADDUBSW / VPMADDWD (as llama.cpp's Q4_0 x Q8_0)
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
      for (int64_t k = k0; k < k1; ++k) amax = std::isfinite(r[k]) ? std::max(amax, std::fabs(r[k])) : NAN;
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

// The codes rearranged for q4_rows_i8 over a weight's padded width Kp (rounded up to Kc, whole 64-channel
// chunks, with zero codes and scales): per 64-channel chunk c,
// q [evens of the chunk | odds] (the order of [low nibbles | high nibbles] of its 32 weight bytes), the
// 16 lane scales [d0 x4, d1 x4, d0 x4, d1 x4] (d0, d1: the chunk's two blocks), and per weight group of G
// channels the sum of q * d.
// For int8 weights (act_chunks_int8) the codes keep their order, the lane scales are [d0 x8, d1 x8], and
// off holds 128 x the codes' sum per lane (the weights enter VPDPBUSD offset by 128, as unsigned bytes).
struct ActChunks {
  std::vector<int8_t> q;     // [M, Kc]
  std::vector<float> dv;     // [M, Kc / 64 * 16]
  std::vector<float> sum;    // [M, Kp / G] (4-bit weights)
  std::vector<int32_t> off;  // [M, Kc / 64 * 16] (int8 weights)
  int64_t Kp = 0, Kc = 0;
};

// An ActChunks for M rows over width Kp (Kc: whole 64-channel chunks) with `scales` lane scales a row and
// the group sums of `groups` groups a row (0: none), codes zero.
inline ActChunks act_chunks_sized(int64_t M, int64_t Kp, int64_t scales, int64_t groups) {
  ActChunks c;
  c.Kp = Kp, c.Kc = (Kp + 63) / 64 * 64;
  c.q.resize(M * c.Kc);
  c.dv.resize(M * scales);
  c.sum.assign(M * groups, 0.f);
  return c;
}

#ifdef LLMSPEED_VNNI
// The lanes of a 16-wide step from i that lie before n.
inline __mmask16 lanes16(int64_t n, int64_t i) {
  return n - i >= 16 ? 0xFFFF : n > i ? static_cast<__mmask16>((1u << (n - i)) - 1) : 0;
}

// Lanes of k of 16 fp16 values from p, widened (zero elsewhere): group scales and zeros.
inline __m512 load16h(__mmask16 k, const half_t* p) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }

// The int32 codes of the 32 channels of x from k (zero past K) and their block scale d = absmax / 127:
// the codes of act_quant (the same fp32 division, rounded half to even by the conversion).
inline void act_block(const float* x, int64_t k, int64_t K, __m512i* q, float* d) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  __m512 v[2];
  for (int h = 0; h < 2; ++h, k += 16) v[h] = _mm512_maskz_loadu_ps(lanes16(K, k), x + k);
  const __m512 a0 = _mm512_and_ps(v[0], absmask), a1 = _mm512_and_ps(v[1], absmask);
  const __m512 big = _mm512_set1_ps(FLT_MAX);  // NaN or inf: not <= FLT_MAX (an unordered compare)
  const bool finite = !(_mm512_cmp_ps_mask(a0, big, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(a1, big, _CMP_NLE_UQ));
  *d = finite ? _mm512_reduce_max_ps(_mm512_max_ps(a0, a1)) / 127.f : NAN;  // NaN: see the top of this file
  const __m512 div = _mm512_set1_ps(*d > 0.f ? *d : 1.f);
  q[0] = _mm512_cvtps_epi32(_mm512_div_ps(v[0], div));
  q[1] = _mm512_cvtps_epi32(_mm512_div_ps(v[1], div));
}

// The chunked codes of x [M, K] for int8 weights [N, K]: natural order over Kc = K rounded up to 64.
inline ActChunks act_chunks_int8(const float* x, int64_t M, int64_t K) {
  const int64_t chunks = (K + 63) / 64;
  ActChunks c = act_chunks_sized(M, K, chunks * 16, 0);
  c.off.resize(M * chunks * 16);
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      __m512i q[4];
      float d[2];
      act_block(x + m * K, ch * 64, K, q, d);
      act_block(x + m * K, ch * 64 + 32, K, q + 2, d + 1);
      int8_t* dst = c.q.data() + m * c.Kc + ch * 64;
      for (int j = 0; j < 4; ++j) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * j), _mm512_cvtepi32_epi8(q[j]));
      const __m512i codes = _mm512_loadu_si512(dst);
      _mm512_storeu_si512(c.off.data() + (m * chunks + ch) * 16, _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, codes), 7));
      _mm512_storeu_ps(c.dv.data() + (m * chunks + ch) * 16, _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d[0]), _mm512_set1_ps(d[1])));
    }
  return c;
}

// The chunked codes of x [M, K] for int4 weights of padded width Kp and groups of G, 64 channels a step.
inline ActChunks act_chunks(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t G) {
  const int64_t chunks = (Kp + 63) / 64, groups = Kp / G;
  ActChunks c = act_chunks_sized(M, Kp, chunks * 16, groups);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * K;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      __m512i q[4];
      float d[2];
      for (int b = 0; b < 2; ++b) {  // the chunk's two blocks of 32 channels
        act_block(r, ch * 64 + b * 32, K, q + 2 * b, d + b);
        if (ch * 64 + b * 32 < Kp)  // (the padding of the last chunk holds zero codes)
          c.sum[m * groups + (ch * 64 + b * 32) / G] += static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q[2 * b], q[2 * b + 1]))) * d[b];
      }
      auto* dst = reinterpret_cast<__m128i*>(c.q.data() + m * c.Kc + ch * 64);  // [evens b0 | evens b1 | odds b0 | odds b1]
      _mm_storeu_si128(dst, _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(q[0], even, q[1])));
      _mm_storeu_si128(dst + 1, _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(q[2], even, q[3])));
      _mm_storeu_si128(dst + 2, _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(q[0], odd, q[1])));
      _mm_storeu_si128(dst + 3, _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(q[2], odd, q[3])));
      const __m512 lanes = _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(d[0]), _mm512_set1_ps(d[1]));
      _mm512_storeu_ps(c.dv.data() + (m * chunks + ch) * 16, lanes);
    }
  }
  return c;
}

// The sums of the 16 lanes of v0..v3, as [sum v0, sum v1, sum v2, sum v3].
inline __m128 reduce4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));  // per 128: v0 v1 v0 v1
  const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));  // per 128: v2 v3 v2 v3
  const __m512 c = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));  // per 128: v0 v1 v2 v3
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// y[i * ldy + r] = sum_k (q * d)[m0 + i, k] * s[r, g] * (c[r, k] - z[r, g]) for NR consecutive packed int4
// weight rows (w: row_bytes apart; scale and zero [NR, groups] rows; groups of G channels, G % 32 == 0) and
// MT rows of the chunked activations from m0. Each chunk's codes are unpacked once for the MT rows, and the
// NR x MT sums run as independent chains.
template <int NR, int MT>
inline void q4_rows_i8(const ActChunks& a, int64_t m0, const uint8_t* w, int64_t row_bytes, int64_t G,
                       const half_t* scale, const half_t* zero, float* y, int64_t ldy) {
  const int64_t Kp = a.Kp, Kc = a.Kc, groups = Kp / G, chunks = Kc / 64;
  const int8_t* xq = a.q.data() + m0 * Kc;
  const float* dv = a.dv.data() + m0 * chunks * 16;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  __m512 tot[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MT; ++i) tot[r][i] = _mm512_setzero_ps();
  for (int64_t ch = 0; ch < chunks; ++ch) {
    // the groups of the chunk's two 32-channel blocks (lanes 4-7 and 12-15 hold the second)
    const int64_t g0 = ch * 64 / G, g1 = std::min(groups - 1, (ch * 64 + 32) / G);
    const bool whole = ch * 64 + 64 <= Kp;  // else the last chunk of a width that is 32 past whole chunks
    __m512 sv[NR];
    __m512i codes[NR];
    for (int r = 0; r < NR; ++r) {
      const half_t* sr = scale + r * groups;
      sv[r] = g0 == g1 ? _mm512_set1_ps(h2f(sr[g0])) : _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(h2f(sr[g0])), _mm512_set1_ps(h2f(sr[g1])));
      const uint8_t* p = w + r * row_bytes + ch * 32;
      if ((ch & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_AHEAD), _MM_HINT_T0);
      const __m256i b = whole ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi8(0xFFFF, p);
      const __m256i lo = _mm256_and_si256(b, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);
      codes[r] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // [low nibbles | high]
    }
    for (int i = 0; i < MT; ++i) {
      const __m512i x = _mm512_loadu_si512(xq + i * Kc + ch * 64);
      const __m512 d = _mm512_loadu_ps(dv + (i * chunks + ch) * 16);
      for (int r = 0; r < NR; ++r) {  // NR x MT accumulators, no per-group partials: fits the 32 registers
        const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[r], x);  // 16 x (4 products)
        tot[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, sv[r]), tot[r][i]);
      }
    }
  }
  // the zero points' share, sum_g s * z * (group sum of q * d), 16 groups a step into the same lanes
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 k = lanes16(groups, g);
    for (int r = 0; r < NR; ++r) {
      const __m512 sz = _mm512_mul_ps(load16h(k, scale + r * groups + g), load16h(k, zero + r * groups + g));
      for (int i = 0; i < MT; ++i)
        tot[r][i] = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(k, a.sum.data() + (m0 + i) * groups + g), tot[r][i]);
    }
  }
  for (int i = 0; i < MT; ++i) {
    if constexpr (NR == 4) {
      _mm_storeu_ps(y + i * ldy, reduce4(tot[0][i], tot[1][i], tot[2][i], tot[3][i]));
    } else {
      for (int r = 0; r < NR; ++r) y[i * ldy + r] = _mm512_reduce_add_ps(tot[r][i]);
    }
  }
}
#endif

#ifdef LLMSPEED_VNNI
// y[i * ldy + r] = s[r] * sum_k (q * d)[m0 + i, k] * w[r, k] for NR consecutive int8 weight rows (K codes,
// K apart; per-row scales s) and MT rows of act_chunks_int8 from m0. The weights enter VPDPBUSD as unsigned
// bytes w + 128 (an XOR of the sign bit); 128 x the codes' lane sums (off) is subtracted in int32, exactly.
template <int NR, int MT>
inline void q8_rows_i8(const ActChunks& a, int64_t m0, const int8_t* w, int64_t K, const float* scale, float* y,
                       int64_t ldy) {
  const int64_t Kc = a.Kc, chunks = Kc / 64;
  const int8_t* xq = a.q.data() + m0 * Kc;
  const float* dv = a.dv.data() + m0 * chunks * 16;
  const int32_t* off = a.off.data() + m0 * chunks * 16;
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 tot[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MT; ++i) tot[r][i] = _mm512_setzero_ps();
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t left = K - ch * 64;
    const __mmask64 in = left >= 64 ? ~0ULL : (1ULL << left) - 1;  // past K: bytes 0 (128 after the XOR) meet codes 0
    __m512i wu[NR];
    for (int r = 0; r < NR; ++r) {
      const int8_t* p = w + r * K + ch * 64;
      _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_AHEAD), _MM_HINT_T0);
      wu[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(in, p), sign);
    }
    for (int i = 0; i < MT; ++i) {
      const __m512i x = _mm512_loadu_si512(xq + i * Kc + ch * 64);
      const __m512i o = _mm512_loadu_si512(off + (i * chunks + ch) * 16);
      const __m512 d = _mm512_loadu_ps(dv + (i * chunks + ch) * 16);
      for (int r = 0; r < NR; ++r) {
        const __m512i s = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wu[r], x), o);
        tot[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, tot[r][i]);
      }
    }
  }
  for (int i = 0; i < MT; ++i) {
    if constexpr (NR == 4) {
      _mm_storeu_ps(y + i * ldy, _mm_mul_ps(reduce4(tot[0][i], tot[1][i], tot[2][i], tot[3][i]), _mm_loadu_ps(scale)));
    } else {
      for (int r = 0; r < NR; ++r) y[i * ldy + r] = _mm512_reduce_add_ps(tot[r][i]) * scale[r];
    }
  }
}
#endif

#ifdef LLMSPEED_AVX2_DOT
// AVX2 (no VNNI): the same ActChunks contract on 256-bit registers. VPMADDUBSW multiplies unsigned by signed
// bytes into pairwise int16 sums, VPMADDWD widens them to int32: int4 codes (0..15) times activation codes
// (-127..127) stay far below int16's range; for int8 weights the activations carry the weights' signs and
// the weights enter as magnitudes (|w| <= 128, |x| <= 127: a pair sums to at most 32512). Chunks are 64
// channels as with VNNI; lane scales are [d0 x4, d1 x4] per chunk for int4 and one d per block of 32 for
// int8 (dv), and off is unused.

// Lanes before n of an 8-wide step from i, as a VPMASKMOVD mask.
inline __m256i lanes8(int64_t n, int64_t i) {
  const int64_t left = std::max<int64_t>(0, std::min<int64_t>(8, n - i));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// min(n, 8) fp16 values from p, widened (zero past n): group scales and zeros.
inline __m256 load8h(const half_t* p, int64_t n) {
  if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) half_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

// The int32 codes of the 32 channels of x from k (zero past K) in q[0..3] and d = absmax / 127: act_quant's
// fp32 division, rounded half to even by the conversion.
inline void act_block(const float* x, int64_t k, int64_t K, __m256i* q, float* d) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 big = _mm256_set1_ps(FLT_MAX);  // NaN or inf: not <= FLT_MAX (an unordered compare)
  __m256 v[4];
  __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int h = 0; h < 4; ++h) {
    v[h] = _mm256_maskload_ps(x + k + 8 * h, lanes8(K, k + 8 * h));
    const __m256 a = _mm256_and_ps(v[h], absmask);
    mx = _mm256_max_ps(mx, a);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  *d = _mm256_movemask_ps(bad) ? NAN : _mm_cvtss_f32(m4) / 127.f;  // NaN: see the top of this file
  const __m256 div = _mm256_set1_ps(*d > 0.f ? *d : 1.f);
  for (int h = 0; h < 4; ++h) q[h] = _mm256_cvtps_epi32(_mm256_div_ps(v[h], div));
}

// 32 int32 codes (a, b, c, d: 8 each, in -127..127) as 32 bytes in their order.
inline __m256i pack_codes(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));  // per 128: a b c d quads
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// The chunked codes of x [M, K] for int8 weights [N, K]: natural order over Kc = K rounded up to 64, one d a block.
inline ActChunks act_chunks_int8(const float* x, int64_t M, int64_t K) {
  const int64_t blocks = (K + 63) / 64 * 2;
  ActChunks c = act_chunks_sized(M, K, blocks, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i q[4];
      act_block(x + m * K, b * ACT_BLOCK, K, q, &c.dv[m * blocks + b]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c.q.data() + m * c.Kc + b * ACT_BLOCK), pack_codes(q[0], q[1], q[2], q[3]));
    }
  return c;
}

// The chunked codes of x [M, K] for int4 weights of padded width Kp and groups of G: per 64-channel chunk
// [evens | odds] (the low and high nibbles of its 32 weight bytes), as with VNNI.
inline ActChunks act_chunks(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t G) {
  const int64_t chunks = (Kp + 63) / 64, groups = Kp / G;
  ActChunks c = act_chunks_sized(M, Kp, chunks * 8, groups);
  const __m256i split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // 8 channels as [evens | odds]
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * K;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      __m256i q[8];
      float d[2];
      for (int b = 0; b < 2; ++b) {  // the chunk's two blocks of 32 channels
        act_block(r, ch * 64 + b * 32, K, q + 4 * b, d + b);
        if (ch * 64 + b * 32 < Kp)  // (the padding of the last chunk holds zero codes)
          c.sum[m * groups + (ch * 64 + b * 32) / G] +=
              static_cast<float>(hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[4 * b], q[4 * b + 1]),
                                                           _mm256_add_epi32(q[4 * b + 2], q[4 * b + 3])))) * d[b];
      }
      __m256i ev[4], od[4];
      for (int j = 0; j < 4; ++j) {  // channels 16j..16j+15: their 8 evens and 8 odds
        const __m256i p0 = _mm256_permutevar8x32_epi32(q[2 * j], split), p1 = _mm256_permutevar8x32_epi32(q[2 * j + 1], split);
        ev[j] = _mm256_permute2x128_si256(p0, p1, 0x20);
        od[j] = _mm256_permute2x128_si256(p0, p1, 0x31);
      }
      auto* dst = reinterpret_cast<__m256i*>(c.q.data() + m * c.Kc + ch * 64);
      _mm256_storeu_si256(dst, pack_codes(ev[0], ev[1], ev[2], ev[3]));
      _mm256_storeu_si256(dst + 1, pack_codes(od[0], od[1], od[2], od[3]));
      _mm256_storeu_ps(c.dv.data() + (m * chunks + ch) * 8, _mm256_blend_ps(_mm256_set1_ps(d[0]), _mm256_set1_ps(d[1]), 0xF0));
    }
  }
  return c;
}

// The sum of the 8 lanes of v.
inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The sums of the 8 lanes of v0..v3, as [sum v0, sum v1, sum v2, sum v3].
inline __m128 reduce4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));  // per 128: v0 v1 v2 v3 partials
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// q4_rows_i8 of the VNNI build, on AVX2: per chunk and weight row the 32 bytes split into low and high
// nibbles (the chunk's even and odd channels), two VPMADDUBSW against the codes' evens and odds, one
// VPMADDWD to int32 lanes of 8 channels (lanes 0-3: the chunk's first block, 4-7: its second).
template <int NR, int MT>
inline void q4_rows_i8(const ActChunks& a, int64_t m0, const uint8_t* w, int64_t row_bytes, int64_t G,
                       const half_t* scale, const half_t* zero, float* y, int64_t ldy) {
  const int64_t Kp = a.Kp, Kc = a.Kc, groups = Kp / G, chunks = Kc / 64;
  const int8_t* xq = a.q.data() + m0 * Kc;
  const float* dv = a.dv.data() + m0 * chunks * 8;
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 tot[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MT; ++i) tot[r][i] = _mm256_setzero_ps();
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t g0 = ch * 64 / G, g1 = std::min(groups - 1, (ch * 64 + 32) / G);
    const bool whole = ch * 64 + 64 <= Kp;  // else the last chunk of a width that is 32 past whole chunks
    __m256i lo[NR], hi[NR];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* p = w + r * row_bytes + ch * 32;
      if ((ch & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_AHEAD), _MM_HINT_T0);
      const __m256i b = whole ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                              : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      lo[r] = _mm256_and_si256(b, nibble);
      hi[r] = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);
    }
    for (int i = 0; i < MT; ++i) {
      const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * Kc + ch * 64));
      const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * Kc + ch * 64 + 32));
      const __m256 d = _mm256_loadu_ps(dv + (i * chunks + ch) * 8);
      for (int r = 0; r < NR; ++r) {
        const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], xe), _mm256_maddubs_epi16(hi[r], xo));
        const __m256 s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        const half_t* sr = scale + r * groups;
        const __m256 sv = g0 == g1 ? _mm256_set1_ps(h2f(sr[g0])) : _mm256_blend_ps(_mm256_set1_ps(h2f(sr[g0])), _mm256_set1_ps(h2f(sr[g1])), 0xF0);
        tot[r][i] = _mm256_fmadd_ps(s, _mm256_mul_ps(d, sv), tot[r][i]);
      }
    }
  }
  // the zero points' share, sum_g s * z * (group sum of q * d), 8 groups a step into the same lanes
  for (int64_t g = 0; g < groups; g += 8) {
    const __m256i k = lanes8(groups, g);
    for (int r = 0; r < NR; ++r) {
      const __m256 sz = _mm256_mul_ps(load8h(scale + r * groups + g, groups - g), load8h(zero + r * groups + g, groups - g));
      for (int i = 0; i < MT; ++i)
        tot[r][i] = _mm256_fnmadd_ps(sz, _mm256_maskload_ps(a.sum.data() + (m0 + i) * groups + g, k), tot[r][i]);
    }
  }
  for (int i = 0; i < MT; ++i) {
    if constexpr (NR == 4) {
      _mm_storeu_ps(y + i * ldy, reduce4(tot[0][i], tot[1][i], tot[2][i], tot[3][i]));
    } else {
      for (int r = 0; r < NR; ++r) y[i * ldy + r] = lane_sum(tot[r][i]);
    }
  }
}

// q8_rows_i8 of the VNNI build, on AVX2: per block of 32 channels, VPMADDUBSW of |w| by the codes with w's
// signs (VPSIGNB), VPMADDWD to int32, scaled by the block's d; the row scale s at the end.
template <int NR, int MT>
inline void q8_block(const ActChunks& a, const int8_t* xq, const float* dv, int64_t b, const __m256i* wv,
                     __m256 (&tot)[NR][MT]) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t Kc = a.Kc, blocks = Kc / ACT_BLOCK;
  for (int i = 0; i < MT; ++i) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * Kc + b * ACT_BLOCK));
    const __m256 d = _mm256_broadcast_ss(dv + i * blocks + b);
    for (int r = 0; r < NR; ++r) {
      const __m256i p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(wv[r]), _mm256_sign_epi8(x, wv[r]));
      tot[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones)), d, tot[r][i]);
    }
  }
}

template <int NR, int MT>
inline void q8_rows_i8(const ActChunks& a, int64_t m0, const int8_t* w, int64_t K, const float* scale, float* y,
                       int64_t ldy) {
  const int64_t Kc = a.Kc, blocks = Kc / ACT_BLOCK, whole = K / ACT_BLOCK;
  const int8_t* xq = a.q.data() + m0 * Kc;
  const float* dv = a.dv.data() + m0 * blocks;
  __m256 tot[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MT; ++i) tot[r][i] = _mm256_setzero_ps();
  __m256i wv[NR];
  for (int64_t b = 0; b < whole; ++b) {
    for (int r = 0; r < NR; ++r) {
      const int8_t* p = w + r * K + b * ACT_BLOCK;
      if ((b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_AHEAD), _MM_HINT_T0);
      wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    }
    q8_block<NR, MT>(a, xq, dv, b, wv, tot);
  }
  if (K > whole * ACT_BLOCK) {  // the rows' last partial block: bytes past K are zero weights
    alignas(32) int8_t t[NR][ACT_BLOCK] = {};
    for (int r = 0; r < NR; ++r) {
      std::memcpy(t[r], w + r * K + whole * ACT_BLOCK, K - whole * ACT_BLOCK);
      wv[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(t[r]));
    }
    q8_block<NR, MT>(a, xq, dv, whole, wv, tot);
  }
  for (int i = 0; i < MT; ++i) {
    if constexpr (NR == 4) {
      _mm_storeu_ps(y + i * ldy, _mm_mul_ps(reduce4(tot[0][i], tot[1][i], tot[2][i], tot[3][i]), _mm_loadu_ps(scale)));
    } else {
      for (int r = 0; r < NR; ++r) y[i * ldy + r] = lane_sum(tot[r][i]) * scale[r];
    }
  }
}
#endif

// q * d of x [M, K] into out [M, K] (quantize_activations), rows split over torch's threads; 32 channels a
// step with AVX-512 or AVX2 (act_block), else through act_quant.
inline void act_round(const float* x, int64_t M, int64_t K, float* out) {
  at::parallel_for(0, M, 16, [&](int64_t lo, int64_t hi) {
#ifdef LLMSPEED_VNNI
    for (int64_t m = lo; m < hi; ++m)
      for (int64_t k = 0; k < K; k += ACT_BLOCK) {
        __m512i q[2];
        float d;
        act_block(x + m * K, k, K, q, &d);
        const __m512 dv = _mm512_set1_ps(d);
        for (int h = 0; h < 2; ++h) {
          const int64_t at = k + 16 * h;
          _mm512_mask_storeu_ps(out + m * K + at, lanes16(K, at), _mm512_mul_ps(_mm512_cvtepi32_ps(q[h]), dv));
        }
      }
#elif defined(LLMSPEED_AVX2_DOT)
    for (int64_t m = lo; m < hi; ++m)
      for (int64_t k = 0; k < K; k += ACT_BLOCK) {
        __m256i q[4];
        float d;
        act_block(x + m * K, k, K, q, &d);
        const __m256 dv = _mm256_set1_ps(d);
        for (int h = 0; h < 4; ++h) {
          const int64_t at = k + 8 * h;
          _mm256_maskstore_ps(out + m * K + at, lanes8(K, at), _mm256_mul_ps(_mm256_cvtepi32_ps(q[h]), dv));
        }
      }
#else
    const std::vector<float> y = act_dequant(act_quant(x + lo * K, hi - lo, K));
    std::copy(y.begin(), y.end(), out + lo * K);
#endif
  });
}

// Whether this build multiplies int4 / int8 codes by int8 activation codes (AVX-512 VNNI or AVX2).
inline bool vnni_compiled() {
#if defined(LLMSPEED_VNNI) || defined(LLMSPEED_AVX2_DOT)
  return true;
#else
  return false;
#endif
}
