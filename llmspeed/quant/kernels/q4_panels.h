// int4 weights x int8 activations for prompt-sized M (QuantConfig(activations="int8")), on AVX2 and on AVX-512 VNNI.
//
// y[m, n] = sum_b d[m, b] * s[n, g(b)] * sum_{k in b} q[m, k] * c[n, k]  -  sum_g s[n, g] * z[n, g] * A[m, g]
// with q, d the int8 codes of x in blocks b of 32 channels (act_quant's values), c the 4-bit codes,
// s, z the group scales and zero points (groups of G % 32 == 0) and A[m, g] = sum_{k in g} q * d.
//
// The weights are repacked per panel of PANEL_ROWS output rows (8 on AVX2, 16 on AVX-512), one panel at a
// time, into a buffer that stays in L1: for each 4 channels, the panel's rows' 4 codes side by side (one
// register). One byte multiply-add of that register by a broadcast of the same 4 channels' activation codes
// gives every row's 4-product sum at once: on AVX2 VPMADDUBSW gives pair sums that add up in int16 over a
// block of 32 channels (8 x 2 x 15 x 127 = 30480 < 2^15) and widen once a block (VPMADDWD); on VNNI VPDPBUSD
// sums the 4 products into int32 lanes directly. Each block's sums are scaled in fp32. A row of outputs is
// one vector: no horizontal sums. llama.cpp's repacked Q4_0x8 layout for prompt evaluation is the same idea.
// Integer products are exact, so the result is the reference's (q * d) times the dequantized weight up to
// fp32 summation order, and both builds give the same bits.
#pragma once

#include "q4_int8.h"

#if defined(LLMSPEED_VNNI) || defined(LLMSPEED_AVX2_DOT)
#define LLMSPEED_PANELS 1

#ifdef LLMSPEED_VNNI
constexpr int64_t PANEL_ROWS = 16;  // output rows of a panel: one int32 / fp32 lane each
constexpr int PANEL_MT = 4;         // activation rows a tile runs against two panels (16 accumulators)
#else
constexpr int64_t PANEL_ROWS = 8;
constexpr int PANEL_MT = 3;
#endif

// The int8 codes of x [M, K] over the padded width Kp in natural order (zero past K), their block scales d
// [M, Kp / 32], group sums A [M, Kp / G] of q * d and block sums xs [M, Kp / 32] of q. Rows split over
// torch's threads.
struct PanelActs {
  std::vector<int8_t> q;
  std::vector<float> d, A;
  std::vector<int32_t> xs;
};

inline PanelActs panel_acts(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t G) {
  const int64_t Kb = Kp / ACT_BLOCK, groups = Kp / G, live = (K + ACT_BLOCK - 1) / ACT_BLOCK;
  PanelActs a;
  a.q.assign(M * Kp, 0);
  a.d.assign(M * Kb, 0.f);
  a.A.assign(M * groups, 0.f);
  a.xs.assign(M * Kb, 0);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < live; ++b) {
        float d;
        int8_t* dst = a.q.data() + m * Kp + b * ACT_BLOCK;
#ifdef LLMSPEED_VNNI
        __m512i c[2];
        act_block(x + m * K, b * ACT_BLOCK, K, c, &d);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(c[0]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtepi32_epi8(c[1]));
        const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(c[0], c[1]));
#else
        __m256i c[4];
        act_block(x + m * K, b * ACT_BLOCK, K, c, &d);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), pack_codes(c[0], c[1], c[2], c[3]));
        const int32_t sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3])));
#endif
        a.d[m * Kb + b] = d;
        a.xs[m * Kb + b] = sum;
        a.A[m * groups + b * ACT_BLOCK / G] += d * static_cast<float>(sum);
      }
  });
  return a;
}

// Rows n0..n0+7 of packed int4 weights (row_bytes = Kp / 2 apart; rows from N on are zero) as a panel:
// w4[t * 8 + j] = the 4 codes of row j at channels 4t..4t+3 (byte i: channel 4t + i), and their group
// scales sv[g * 8 + j] and scale x zero szv[g * 8 + j].
inline void pack_panel(const uint8_t* w, int64_t row_bytes, const half_t* scale, const half_t* zero, int64_t groups,
                       int64_t n0, int64_t N, uint32_t* w4, float* sv, float* szv) {
  const int64_t steps = row_bytes / 2;  // 4 channels: 2 packed bytes (low nibble first)
  for (int64_t j = 0; j < PANEL_ROWS; ++j) {
    const int64_t n = n0 + j;
    if (n >= N) {
      for (int64_t t = 0; t < steps; ++t) w4[t * PANEL_ROWS + j] = 0;
      for (int64_t g = 0; g < groups; ++g) sv[g * PANEL_ROWS + j] = szv[g * PANEL_ROWS + j] = 0.f;
      continue;
    }
    const uint8_t* p = w + n * row_bytes;
    for (int64_t t = 0; t < steps; ++t) {
      const uint32_t b = p[2 * t] | (static_cast<uint32_t>(p[2 * t + 1]) << 8);
      w4[t * PANEL_ROWS + j] = (b & 0xF) | ((b >> 4) & 0xF) << 8 | ((b >> 8) & 0xF) << 16 | ((b >> 12) & 0xF) << 24;
    }
    for (int64_t g = 0; g < groups; ++g) {
      sv[g * PANEL_ROWS + j] = h2f(scale[n * groups + g]);
      szv[g * PANEL_ROWS + j] = h2f(scale[n * groups + g]) * h2f(zero[n * groups + g]);
    }
  }
}

#ifdef LLMSPEED_VNNI
// The int32 sums of block b (32 channels) for NP panels (panel p's bytes at w + p * wstride) and MT activation
// rows from m0: s32[p][i] lane j = sum of row j's bytes times row m0 + i's codes. VPDPBUSD takes the weight
// bytes as its unsigned operand and the activation codes as its signed one.
template <int NP, int MT>
inline void panel_block_sums(const uint32_t* w, int64_t wstride, const PanelActs& a, int64_t m0, int64_t Kp,
                             int64_t b, __m512i (&s32)[NP][MT]) {
  for (int p = 0; p < NP; ++p)
    for (int i = 0; i < MT; ++i) s32[p][i] = _mm512_setzero_si512();
  for (int t = 0; t < ACT_BLOCK / 4; ++t) {
    __m512i wv[NP];
    for (int p = 0; p < NP; ++p) wv[p] = _mm512_loadu_si512(w + p * wstride + (b * 8 + t) * PANEL_ROWS);
    for (int i = 0; i < MT; ++i) {
      int32_t four;
      std::memcpy(&four, a.q.data() + (m0 + i) * Kp + b * ACT_BLOCK + 4 * t, 4);
      const __m512i xv = _mm512_set1_epi32(four);
      for (int p = 0; p < NP; ++p) s32[p][i] = _mm512_dpbusd_epi32(s32[p][i], wv[p], xv);
    }
  }
}

// Outputs of NP consecutive panels (w4 / sv / szv of panel p at p * wstride / p * sstride) for MT activation
// rows from m0: y[(m0 + i) * ldy + n0 + p * 16 + j], only columns before N written.
template <int NP, int MT>
inline void panel_tile(const uint32_t* w4, int64_t wstride, const float* sv, const float* szv, int64_t sstride,
                       const PanelActs& a, int64_t m0, int64_t Kp, int64_t G, float* y, int64_t ldy, int64_t n0, int64_t N) {
  const int64_t Kb = Kp / ACT_BLOCK, groups = Kp / G, per_group = G / ACT_BLOCK;
  __m512 acc[NP][MT];
  for (int p = 0; p < NP; ++p)
    for (int i = 0; i < MT; ++i) acc[p][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < Kb; ++b) {
    __m512i s32[NP][MT];
    panel_block_sums<NP, MT>(w4, wstride, a, m0, Kp, b, s32);
    const int64_t g = b / per_group;
    for (int p = 0; p < NP; ++p) {
      const __m512 s = _mm512_loadu_ps(sv + p * sstride + g * PANEL_ROWS);
      for (int i = 0; i < MT; ++i) {
        const __m512 sd = _mm512_mul_ps(s, _mm512_set1_ps(a.d[(m0 + i) * Kb + b]));
        acc[p][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32[p][i]), sd, acc[p][i]);
      }
    }
  }
  for (int64_t g = 0; g < groups; ++g)  // the zero points' share
    for (int p = 0; p < NP; ++p) {
      const __m512 sz = _mm512_loadu_ps(szv + p * sstride + g * PANEL_ROWS);
      for (int i = 0; i < MT; ++i) acc[p][i] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(a.A[(m0 + i) * groups + g]), acc[p][i]);
    }
  for (int p = 0; p < NP; ++p)
    for (int i = 0; i < MT; ++i)
      _mm512_mask_storeu_ps(y + (m0 + i) * ldy + n0 + p * PANEL_ROWS, lanes16(N, n0 + p * PANEL_ROWS), acc[p][i]);
}
#else
// Outputs of NP consecutive panels (w4 / sv / szv of panel p at p * wstride / p * sstride) for MT activation
// rows from m0: y[(m0 + i) * ldy + n0 + p * 8 + j], only columns before N written.
template <int NP, int MT>
inline void panel_tile(const uint32_t* w4, int64_t wstride, const float* sv, const float* szv, int64_t sstride,
                       const PanelActs& a, int64_t m0, int64_t Kp, int64_t G, float* y, int64_t ldy, int64_t n0, int64_t N) {
  const int64_t Kb = Kp / ACT_BLOCK, groups = Kp / G, per_group = G / ACT_BLOCK;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[NP][MT];
  for (int p = 0; p < NP; ++p)
    for (int i = 0; i < MT; ++i) acc[p][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < Kb; ++b) {
    __m256i s16[NP][MT];
    for (int p = 0; p < NP; ++p)
      for (int i = 0; i < MT; ++i) s16[p][i] = _mm256_setzero_si256();
    for (int t = 0; t < ACT_BLOCK / 4; ++t) {
      __m256i wv[NP];
      for (int p = 0; p < NP; ++p)
        wv[p] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w4 + p * wstride + (b * 8 + t) * PANEL_ROWS));
      for (int i = 0; i < MT; ++i) {
        int32_t four;
        std::memcpy(&four, a.q.data() + (m0 + i) * Kp + b * ACT_BLOCK + 4 * t, 4);
        const __m256i xv = _mm256_set1_epi32(four);
        for (int p = 0; p < NP; ++p) s16[p][i] = _mm256_add_epi16(s16[p][i], _mm256_maddubs_epi16(wv[p], xv));
      }
    }
    const int64_t g = b / per_group;
    for (int p = 0; p < NP; ++p) {
      const __m256 s = _mm256_loadu_ps(sv + p * sstride + g * PANEL_ROWS);
      for (int i = 0; i < MT; ++i) {
        const __m256 sd = _mm256_mul_ps(s, _mm256_set1_ps(a.d[(m0 + i) * Kb + b]));
        acc[p][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16[p][i], ones)), sd, acc[p][i]);
      }
    }
  }
  for (int64_t g = 0; g < groups; ++g)  // the zero points' share
    for (int p = 0; p < NP; ++p) {
      const __m256 sz = _mm256_loadu_ps(szv + p * sstride + g * PANEL_ROWS);
      for (int i = 0; i < MT; ++i) acc[p][i] = _mm256_fnmadd_ps(sz, _mm256_set1_ps(a.A[(m0 + i) * groups + g]), acc[p][i]);
    }
  for (int p = 0; p < NP; ++p) {
    const int64_t n = n0 + p * PANEL_ROWS;
    for (int i = 0; i < MT; ++i) {
      float* out = y + (m0 + i) * ldy + n;
      if (n + PANEL_ROWS <= N) {
        _mm256_storeu_ps(out, acc[p][i]);
      } else if (n < N) {
        _mm256_maskstore_ps(out, lanes8(N, n), acc[p][i]);
      }
    }
  }
}
#endif

// y [M, N] = the int4 x int8 product above for x [M, K] fp32 and packed weights w [N, Kp / 2]: pairs of panels
// split over torch's threads, each packed once into a per-thread buffer and run against every row of x.
inline void q4_panel_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, int64_t Kp, int64_t G,
                          const half_t* scale, const half_t* zero, float* y) {
  const PanelActs a = panel_acts(x, M, K, Kp, G);
  const int64_t groups = Kp / G, wstride = Kp / 4 * PANEL_ROWS, sstride = groups * PANEL_ROWS;
  const int64_t pairs = (N + 2 * PANEL_ROWS - 1) / (2 * PANEL_ROWS);
  at::parallel_for(0, pairs, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> w4(2 * wstride);
    std::vector<float> sv(2 * sstride), szv(2 * sstride);
    for (int64_t pair = lo; pair < hi; ++pair) {
      const int64_t n0 = pair * 2 * PANEL_ROWS;
      for (int p = 0; p < 2; ++p)
        pack_panel(w, Kp / 2, scale, zero, groups, n0 + p * PANEL_ROWS, N, w4.data() + p * wstride,
                   sv.data() + p * sstride, szv.data() + p * sstride);
      int64_t m = 0;
      for (; m + PANEL_MT <= M; m += PANEL_MT)
        panel_tile<2, PANEL_MT>(w4.data(), wstride, sv.data(), szv.data(), sstride, a, m, Kp, G, y, N, n0, N);
      for (; m < M; ++m)
        panel_tile<2, 1>(w4.data(), wstride, sv.data(), szv.data(), sstride, a, m, Kp, G, y, N, n0, N);
    }
  });
}

#endif  // LLMSPEED_VNNI || LLMSPEED_AVX2_DOT
