// int8 weights x int8 activations for prompt-sized M on AVX-512 VNNI (QuantConfig(activations="int8")).
//
// y[m, n] = s[n] * sum_b d[m, b] * sum_{k in b} q[m, k] * w[n, k]
// with q, d the int8 codes of x in blocks b of 32 channels (act_quant's values), w the int8 weight codes and
// s their per-row scales. The panels of q4_panels.h with bytes for codes: per 4 channels the 16 rows' 4 weight
// bytes side by side, offset to unsigned (w + 128, an XOR of the sign bit) for VPDPBUSD, whose int32 lanes
// then hold sum (w + 128) q; 128 x the block's code sum comes off in int32, exactly. The row scales multiply
// once at the end. On AVX2 the fused step's integer row loop stays faster for these layers at every prompt
// length measured (docs/batching.md), so this is VNNI only.
#pragma once

#include "q4_panels.h"

#ifdef LLMSPEED_VNNI
#define LLMSPEED_Q8_PANELS 1

// Rows n0..n0+15 of int8 weights w [N, K] as a panel over Kp = K rounded up to 32 (rows from N on, and
// channels from K on, are zero weights): w8[t * 16 + j] = the 4 bytes + 128 of row j at channels 4t..4t+3,
// and the rows' scales sv[j].
inline void pack_panel_i8(const int8_t* w, int64_t K, int64_t Kp, const float* scale, int64_t n0, int64_t N,
                          uint32_t* w8, float* sv) {
  int64_t t0 = 0;  // steps before t0 packed 16 rows at a time: one gather of the rows' 4 bytes a step
  if (n0 + PANEL_ROWS <= N && K < (int64_t{1} << 27)) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(K)));
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80808080u));
    for (; 4 * t0 + 4 <= K; ++t0)
      _mm512_storeu_si512(w8 + t0 * PANEL_ROWS, _mm512_xor_si512(_mm512_i32gather_epi32(rows, w + n0 * K + 4 * t0, 1), sign));
  }
  for (int64_t j = 0; j < PANEL_ROWS; ++j) {
    const int64_t n = n0 + j;
    sv[j] = n < N ? scale[n] : 0.f;
    for (int64_t t = t0; t < Kp / 4; ++t) {
      uint32_t four = 0x80808080u;  // zero weights, offset
      if (n < N && 4 * t + 4 <= K) {
        std::memcpy(&four, w + n * K + 4 * t, 4);
        four ^= 0x80808080u;
      } else if (n < N) {
        for (int64_t i = 0; i < 4 && 4 * t + i < K; ++i)
          four = (four & ~(0xFFu << (8 * i))) | (static_cast<uint32_t>(static_cast<uint8_t>(w[n * K + 4 * t + i] ^ 0x80)) << (8 * i));
      }
      w8[t * PANEL_ROWS + j] = four;
    }
  }
}

// Outputs of NP consecutive panels (w8 / sv of panel p at p * wstride / p * PANEL_ROWS) for MT activation rows
// from m0: y[(m0 + i) * ldy + n0 + p * 16 + j], only columns before N written.
template <int NP, int MT>
inline void panel_tile_i8(const uint32_t* w8, int64_t wstride, const float* sv, const PanelActs& a, int64_t m0,
                          int64_t Kp, float* y, int64_t ldy, int64_t n0, int64_t N) {
  const int64_t Kb = Kp / ACT_BLOCK;
  __m512 acc[NP][MT];
  for (int p = 0; p < NP; ++p)
    for (int i = 0; i < MT; ++i) acc[p][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < Kb; ++b) {
    __m512i s32[NP][MT];
    panel_block_sums<NP, MT>(w8, wstride, a, m0, Kp, b, s32);
    for (int i = 0; i < MT; ++i) {
      const __m512i off = _mm512_set1_epi32(128 * a.xs[(m0 + i) * Kb + b]);
      const __m512 d = _mm512_set1_ps(a.d[(m0 + i) * Kb + b]);
      for (int p = 0; p < NP; ++p)
        acc[p][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s32[p][i], off)), d, acc[p][i]);
    }
  }
  for (int p = 0; p < NP; ++p) {
    const __m512 s = _mm512_loadu_ps(sv + p * PANEL_ROWS);
    for (int i = 0; i < MT; ++i)
      _mm512_mask_storeu_ps(y + (m0 + i) * ldy + n0 + p * PANEL_ROWS, lanes16(N, n0 + p * PANEL_ROWS),
                            _mm512_mul_ps(acc[p][i], s));
  }
}

// y [M, N] = the int8 x int8 product above for x [M, K] fp32 and int8 weights w [N, K] with row scales:
// pairs of panels split over torch's threads, each packed once into a per-thread buffer.
inline void q8_panel_gemm(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t N, const float* scale, float* y) {
  const int64_t Kp = (K + ACT_BLOCK - 1) / ACT_BLOCK * ACT_BLOCK, wstride = Kp / 4 * PANEL_ROWS;
  const PanelActs a = panel_acts(x, M, K, Kp, Kp);
  const int64_t pairs = (N + 2 * PANEL_ROWS - 1) / (2 * PANEL_ROWS);
  at::parallel_for(0, pairs, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> w8(2 * wstride);
    std::vector<float> sv(2 * PANEL_ROWS);
    for (int64_t pair = lo; pair < hi; ++pair) {
      const int64_t n0 = pair * 2 * PANEL_ROWS;
      for (int p = 0; p < 2; ++p)
        pack_panel_i8(w, K, Kp, scale, n0 + p * PANEL_ROWS, N, w8.data() + p * wstride, sv.data() + p * PANEL_ROWS);
      int64_t m = 0;
      for (; m + PANEL_MT <= M; m += PANEL_MT)
        panel_tile_i8<2, PANEL_MT>(w8.data(), wstride, sv.data(), a, m, Kp, y, N, n0, N);
      for (; m < M; ++m)
        panel_tile_i8<2, 1>(w8.data(), wstride, sv.data(), a, m, Kp, y, N, n0, N);
    }
  });
}

#endif  // LLMSPEED_VNNI
