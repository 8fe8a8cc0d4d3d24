// Shared 4-bit decoding for llmspeed's CPU kernels: the NF4 codebook, hsum, the activation
// deinterleave and group sums, q4_tile (decode 32 codes at a time in AVX-512 registers, 16 with
// AVX2, and multiply-add), q4_rows (one x row against four weight rows; q4_rows_avx2 on AVX2) and q4_row_range
// (the loop over rows both kernels run).
// Included by fused_cpu.cpp (the quantized matmul extension) and by
// llmspeed/generation/decode_cpu.cpp (the fused decode step): each extension compiles it once.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static const float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// The 4-bit formats keep their group scales and zero points as IEEE fp16 (torch.float16); a kernel widens each
// one where it reads it (exact: every fp16 value is an fp32 value), so results are those of fp32 copies.
typedef uint16_t half_t;
static inline float h2f(half_t h) {
#if defined(__F16C__) && defined(__AVX2__)
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// The fp16 bits of a float16 tensor (scales, zeros) for the kernels above.
static inline const half_t* half_data(const torch::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == torch::kHalf && t.is_contiguous(),
              "4-bit scales and zeros must be contiguous float16; got ", t.scalar_type());
  return reinterpret_cast<const half_t*>(t.data_ptr<at::Half>());
}

#ifdef __AVX2__
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// NF4[c] for 8 codes c (int32 lanes, 0..15) from the codebook's halves in two registers
static inline __m256 nf4_lookup8(__m256i c, __m256 tab_lo, __m256 tab_hi) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(tab_lo, c), _mm256_permutevar8x32_ps(tab_hi, c),
                          _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));  // sign bit: code >= 8
}
#endif

// ---------------------------------------------------------------- 4-bit (int4 / nf4), group-wise
// Codes per block of deinterleave()'s layout for groups of G codes: 32 with AVX-512 where the groups hold whole
// 32-code blocks (the low and the high nibbles of 16 bytes each meet 16 contiguous x: no permutes), else 16.
static inline int64_t q4_block(int64_t G) {
#ifdef __AVX512F__
  return G % 32 == 0 ? 32 : 16;
#else
  (void)G;
  return 16;
#endif
}

// x is first rearranged per B-element block (B = q4_block(G)) into [x0 x2 .. x(B-2) | x1 x3 .. x(B-1)]
// (zero-padded to Kp), so the low nibbles (even elements) and high nibbles (odd elements) of B / 2 bytes meet
// contiguous x. Whole blocks take two permutes (AVX-512, B = 32) or two shuffles (AVX2, B = 16); the last, partial
// block is copied element by element.
static torch::Tensor deinterleave(const torch::Tensor& x, int64_t Kp, int64_t G) {
  const int64_t K = x.size(-1), M = x.numel() / K, B = q4_block(G), half = B / 2;
  auto out = torch::empty({M, Kp}, x.options());
  const float* s = x.data_ptr<float>();
  float* d = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* sr = s + m * K;
    float* dr = d + m * Kp;
    int64_t b = 0;
#if defined(__AVX512F__)
    if (B == 32) {
      const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
      for (; b + 32 <= K; b += 32) {
        const __m512 lo = _mm512_loadu_ps(sr + b), hi = _mm512_loadu_ps(sr + b + 16);
        _mm512_storeu_ps(dr + b, _mm512_permutex2var_ps(lo, even, hi));
        _mm512_storeu_ps(dr + b + 16, _mm512_permutex2var_ps(lo, odd, hi));
      }
    }
#endif
#if defined(__AVX2__)
    if (B == 16) {
      for (; b + 16 <= K; b += 16) {  // per 128-bit lane [a0 a2 c0 c2 | a4 a6 c4 c6], then the lanes' halves in order
        const __m256 a = _mm256_loadu_ps(sr + b), c = _mm256_loadu_ps(sr + b + 8);
        const __m256 ev = _mm256_shuffle_ps(a, c, _MM_SHUFFLE(2, 0, 2, 0)), od = _mm256_shuffle_ps(a, c, _MM_SHUFFLE(3, 1, 3, 1));
        _mm256_storeu_ps(dr + b, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8)));
        _mm256_storeu_ps(dr + b + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xD8)));
      }
    }
#endif
    for (; b < Kp; b += B)
      for (int64_t j = 0; j < B; ++j) {
        const int64_t k = b + j;
        dr[b + (j >> 1) + (j & 1) * half] = k < K ? sr[k] : 0.f;
      }
  }
  return out;
}

static torch::Tensor group_sums(const torch::Tensor& xd, int64_t G) {  // [M, Kp / G]
  const int64_t M = xd.size(0), Kp = xd.size(1), groups = Kp / G;
  auto out = torch::empty({M, groups}, xd.options());
  const float* s = xd.data_ptr<float>();
  float* d = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float t = 0.f;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) t += s[m * Kp + k];
      d[m * groups + g] = t;
    }
  return out;
}

template <int MT, bool NF>
static void q4_tile(const float* x, int64_t ldx, const uint8_t* w, int64_t Kp, int64_t G,
                    const half_t* scale, const half_t* zero, const float* xsum, int64_t ldxs,
                    float* y, int64_t ldy) {
  const int64_t groups = Kp / G;
  float res[MT];
  for (int i = 0; i < MT; ++i) res[i] = 0.f;
#ifdef __AVX512F__
  // 32 codes (16 bytes) a step, 16-wide. With q4_block(G) = 32 the low nibbles meet x's first 16 of the block
  // and the high nibbles the next 16 as they come; with 16-code blocks (groups of 16 * odd codes) two permutes
  // put each block's weights [low nibbles | high nibbles] against x's [x0 x2 .. x14 | x1 x3 .. x15].
  const bool wide = q4_block(G) == 32;
  const __m512i nibble = _mm512_set1_epi32(15);
  const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  const __m512 table = _mm512_loadu_ps(NF4);
  // Two FMA chains per row (the two 16-code halves of each step), the zero points' share summed apart: one
  // chain per row held an M = 1 GEMV at FMA latency.
  __m512 tot[MT];
  float corr[MT];
  for (int i = 0; i < MT; ++i) tot[i] = _mm512_setzero_ps(), corr[i] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MT], acc2[MT];
    for (int i = 0; i < MT; ++i) acc[i] = acc2[i] = _mm512_setzero_ps();
    int64_t k = g * G;
    for (; k + 32 <= (g + 1) * G; k += 32) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2)));
      __m512i c0 = _mm512_and_si512(b, nibble), c1 = _mm512_srli_epi32(b, 4);  // bytes: c1 <= 15
      if (!wide) {
        const __m512i lo = c0;
        c0 = _mm512_permutex2var_epi32(lo, first, c1), c1 = _mm512_permutex2var_epi32(lo, second, c1);
      }
      const __m512 w0 = NF ? _mm512_permutexvar_ps(c0, table) : _mm512_cvtepi32_ps(c0);
      const __m512 w1 = NF ? _mm512_permutexvar_ps(c1, table) : _mm512_cvtepi32_ps(c1);
      for (int i = 0; i < MT; ++i) {
        acc[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * ldx + k), acc[i]);
        acc2[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i * ldx + k + 16), acc2[i]);
      }
    }
    if (k < (g + 1) * G) {  // a group of 16 * odd codes: its last 16-code block alone
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k / 2)));
      const __m512i lo = _mm512_and_si512(b, nibble), hi = _mm512_srli_epi32(b, 4);  // bytes: hi <= 15
      const __m512i c0 = _mm512_permutex2var_epi32(lo, first, hi);
      const __m512 w0 = NF ? _mm512_permutexvar_ps(c0, table) : _mm512_cvtepi32_ps(c0);
      for (int i = 0; i < MT; ++i) acc[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * ldx + k), acc[i]);
    }
    const __m512 sv = _mm512_set1_ps(h2f(scale[g]));
    for (int i = 0; i < MT; ++i) {
      tot[i] = _mm512_fmadd_ps(sv, _mm512_add_ps(acc[i], acc2[i]), tot[i]);
      if (!NF) corr[i] += h2f(scale[g]) * h2f(zero[g]) * xsum[i * ldxs + g];
    }
  }
  for (int i = 0; i < MT; ++i) res[i] = _mm512_reduce_add_ps(tot[i]) - corr[i];
#elif defined(__AVX2__)
  const __m128i lowmask = _mm_set1_epi8(0x0F);
  const __m256 tab_lo = _mm256_loadu_ps(NF4), tab_hi = _mm256_loadu_ps(NF4 + 8);
  __m256 tot[MT];
  for (int i = 0; i < MT; ++i) tot[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[MT], acc2[MT];  // two FMA chains per row (even / odd elements)
    for (int i = 0; i < MT; ++i) acc[i] = acc2[i] = _mm256_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
      __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k / 2));
      __m128i lo8 = _mm_and_si128(b, lowmask), hi8 = _mm_and_si128(_mm_srli_epi16(b, 4), lowmask);
      __m256i lo = _mm256_cvtepu8_epi32(lo8), hi = _mm256_cvtepu8_epi32(hi8);
      __m256 wl, wh;
      if (NF) {
        wl = nf4_lookup8(lo, tab_lo, tab_hi);
        wh = nf4_lookup8(hi, tab_lo, tab_hi);
      } else {
        wl = _mm256_cvtepi32_ps(lo);
        wh = _mm256_cvtepi32_ps(hi);
      }
      for (int i = 0; i < MT; ++i) {
        acc[i] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(x + i * ldx + k), acc[i]);
        acc2[i] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(x + i * ldx + k + 8), acc2[i]);
      }
    }
    const __m256 sv = _mm256_set1_ps(h2f(scale[g]));
    for (int i = 0; i < MT; ++i) {
      tot[i] = _mm256_fmadd_ps(sv, _mm256_add_ps(acc[i], acc2[i]), tot[i]);
      if (!NF) res[i] -= h2f(scale[g]) * h2f(zero[g]) * xsum[i * ldxs + g];
    }
  }
  for (int i = 0; i < MT; ++i) res[i] += hsum(tot[i]);
#else
  for (int64_t g = 0; g < groups; ++g) {
    float acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = 0.f;
    for (int64_t k = g * G; k < (g + 1) * G; k += 16)
      for (int j = 0; j < 8; ++j) {
        uint8_t byte = w[k / 2 + j];
        float wl = NF ? NF4[byte & 15] : float(byte & 15), wh = NF ? NF4[byte >> 4] : float(byte >> 4);
        for (int i = 0; i < MT; ++i) acc[i] += wl * x[i * ldx + k + j] + wh * x[i * ldx + k + 8 + j];
      }
    for (int i = 0; i < MT; ++i) {
      res[i] += h2f(scale[g]) * acc[i];
      if (!NF) res[i] -= h2f(scale[g]) * h2f(zero[g]) * xsum[i * ldxs + g];
    }
  }
#endif
  for (int i = 0; i < MT; ++i) y[i * ldy] = res[i];
}

// Bytes q4_rows prefetches ahead of each weight row's read position: 4 KiB, as the float row loop and the int8-
// activation loops (q4_int8.h) do. 256 bytes, under a quarter of a 4-row block of 576-code rows, left the one-row
// decode step waiting on memory (docs/kernels.md has the measurement).
constexpr int64_t Q4_AHEAD = 4096;

#ifdef __AVX512F__
// The 16 values a group's codes stand for, (c - z) * s (int4) or NF4[c] * s (NF4), computed as dequantize() does:
// one vpermps of a code vector against this table gives its dequantized weights (vpermps reads only an index's
// low 4 bits, so a byte holding two nibbles indexes its low one without a mask).
template <bool NF>
static inline __m512 q4_group_table(float s, float z) {
  const __m512 ramp = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return NF ? _mm512_mul_ps(_mm512_loadu_ps(NF4), _mm512_set1_ps(s))
            : _mm512_mul_ps(_mm512_sub_ps(ramp, _mm512_set1_ps(z)), _mm512_set1_ps(s));
}

// One row of x (deinterleaved in 32-code blocks: q4_block(G) == 32) against NR weight rows `ld` bytes apart, their
// scales and zeros `groups` apart: each x load serves the NR rows, each row's codes become its dequantized weights
// through its group's table (q4_group_table: no per-group scale or zero-point work after the multiply-adds), and
// each row prefetches Q4_AHEAD bytes ahead once per 64-byte line. y[r] for r < NR.
template <int NR, bool NF>
static void q4_rows(const float* x, const uint8_t* w, int64_t ld, int64_t Kp, int64_t G, const half_t* scale,
                    const half_t* zero, float* y) {
  const int64_t groups = Kp / G;
  __m512 acc[NR], acc2[NR];
  for (int r = 0; r < NR; ++r) acc[r] = acc2[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 tab[NR];
    for (int r = 0; r < NR; ++r) tab[r] = q4_group_table<NF>(h2f(scale[r * groups + g]), NF ? 0.f : h2f(zero[r * groups + g]));
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
      for (int r = 0; r < NR; ++r) {
        const uint8_t* p = w + r * ld + k / 2;
        if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + Q4_AHEAD), _MM_HINT_T0);
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        acc[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, tab[r]), x0, acc[r]);
        acc2[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab[r]), x1, acc2[r]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r]));
}

// R rows of x (deinterleaved in 32-code blocks, ldx apart) against one weight row: each 32-code chunk is decoded
// and scaled once, (c - z) * s or NF4[c] * s as dequantize() computes it (one vpermps of the group's table), then
// multiplied into the R rows (two FMA chains a row). No per-group work per row, which q4_tile<4> pays (its scale and
// zero-point terms) and which outweighed the FMAs at 64-code groups. y[i * ldy] for i < R.
template <int R, bool NF>
static void q4_dot_rows(const float* x, int64_t ldx, const uint8_t* w, int64_t Kp, int64_t G, const half_t* scale,
                        const half_t* zero, float* y, int64_t ldy) {
  const int64_t groups = Kp / G;
  __m512 acc[R], acc2[R];
  for (int i = 0; i < R; ++i) acc[i] = acc2[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 tab = q4_group_table<NF>(h2f(scale[g]), NF ? 0.f : h2f(zero[g]));
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2)));
      const __m512 w0 = _mm512_permutexvar_ps(b, tab), w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab);
      for (int i = 0; i < R; ++i) {
        acc[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * ldx + k), acc[i]);
        acc2[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i * ldx + k + 16), acc2[i]);
      }
    }
  }
  for (int i = 0; i < R; ++i) y[i * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i], acc2[i]));
}
#elif defined(__AVX2__)
// One row of x (16-code blocks, as q4_dot_rows below reads it) against NR weight rows `ld` bytes apart, their
// scales (and zeros) `groups` apart, and (int4) x's group sums xsum: each x load serves the NR rows and each row
// prefetches Q4_AHEAD bytes ahead once per 64-byte line. Each row's arithmetic is q4_tile<1>'s in the same order
// (codes, or their NF4 values, times x in two chains a group, then its scale, and for int4 the zero points' share
// through xsum), so y[r] for r < NR is bit for bit what NR calls of q4_tile<1> give.
template <int NR, bool NF>
static void q4_rows_avx2(const float* x, const float* xsum, const uint8_t* w, int64_t ld, int64_t Kp, int64_t G,
                         const half_t* scale, const half_t* zero, float* y) {
  const int64_t groups = Kp / G;
  const __m128i lowmask = _mm_set1_epi8(0x0F);
  const __m256 tab_lo = _mm256_loadu_ps(NF4), tab_hi = _mm256_loadu_ps(NF4 + 8);
  __m256 tot[NR];
  float res[NR];
  for (int r = 0; r < NR; ++r) tot[r] = _mm256_setzero_ps(), res[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[NR], acc2[NR];
    for (int r = 0; r < NR; ++r) acc[r] = acc2[r] = _mm256_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int r = 0; r < NR; ++r) {
        const uint8_t* p = w + r * ld + k / 2;
        if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + Q4_AHEAD), _MM_HINT_T0);
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        const __m256i lo = _mm256_cvtepu8_epi32(_mm_and_si128(b, lowmask));
        const __m256i hi = _mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), lowmask));
        const __m256 wl = NF ? nf4_lookup8(lo, tab_lo, tab_hi) : _mm256_cvtepi32_ps(lo);
        const __m256 wh = NF ? nf4_lookup8(hi, tab_lo, tab_hi) : _mm256_cvtepi32_ps(hi);
        acc[r] = _mm256_fmadd_ps(wl, x0, acc[r]);
        acc2[r] = _mm256_fmadd_ps(wh, x1, acc2[r]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      const float s = h2f(scale[r * groups + g]);
      tot[r] = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_add_ps(acc[r], acc2[r]), tot[r]);
      if (!NF) res[r] -= s * h2f(zero[r * groups + g]) * xsum[g];
    }
  }
  for (int r = 0; r < NR; ++r) y[r] = res[r] + hsum(tot[r]);
}

// The same with AVX2 over 16-code blocks (8 bytes: low nibbles against x's first 8, high against the next 8);
// two FMA chains a row up to 4 rows, one from 8 (16 registers).
template <int R, bool NF>
static void q4_dot_rows(const float* x, int64_t ldx, const uint8_t* w, int64_t Kp, int64_t G, const half_t* scale,
                        const half_t* zero, float* y, int64_t ldy) {
  constexpr int C = R > 4 ? 1 : 2;
  const int64_t groups = Kp / G;
  const __m128i lowmask = _mm_set1_epi8(0x0F);
  const __m256 tab_lo = _mm256_loadu_ps(NF4), tab_hi = _mm256_loadu_ps(NF4 + 8);
  __m256 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int i = 0; i < R; ++i) acc[c][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 sv = _mm256_set1_ps(h2f(scale[g])), zv = _mm256_set1_ps(NF ? 0.f : h2f(zero[g]));
    for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k / 2));
      const __m256i lo = _mm256_cvtepu8_epi32(_mm_and_si128(b, lowmask));
      const __m256i hi = _mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), lowmask));
      const __m256 wl = NF ? _mm256_mul_ps(nf4_lookup8(lo, tab_lo, tab_hi), sv)
                           : _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(lo), zv), sv);
      const __m256 wh = NF ? _mm256_mul_ps(nf4_lookup8(hi, tab_lo, tab_hi), sv)
                           : _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(hi), zv), sv);
      for (int i = 0; i < R; ++i) {
        acc[0][i] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(x + i * ldx + k), acc[0][i]);
        acc[C - 1][i] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(x + i * ldx + k + 8), acc[C - 1][i]);
      }
    }
  }
  for (int i = 0; i < R; ++i) y[i * ldy] = hsum(C == 1 ? acc[0][i] : _mm256_add_ps(acc[0][i], acc[C - 1][i]));
}
#endif

// Whether q4_dot_rows reads deinterleave()'s layout for groups of G codes: AVX-512 with 32-code blocks, AVX2.
static inline bool q4_dot_layout(int64_t G) {
#if defined(__AVX512F__)
  return q4_block(G) == 32;
#elif defined(__AVX2__)
  (void)G;
  return true;
#else
  (void)G;
  return false;
#endif
}

// y[m, n] (+ bias[n] where bias) for every row m < M of xd (deinterleave()d, [M, Kp]; xs its group sums
// [M, groups], int4 only) and weight rows lo <= n < hi of w [N, Kp / 2] with scales (and zeros) [N, groups]; y is
// [M, ldy]. Weight rows go four at a time on AVX2 and where AVX-512 has whole 32-code blocks (one otherwise), each block
// while it is in cache: x rows 8, 4 or 2 at a time take each weight row's decoded, scaled chunks
// (q4_dot_rows; q4_tile<4> where its layout is not read), and a last single x row takes the block's four
// weight rows at once (q4_rows) or one (q4_tile<1>).
template <bool NF>
static void q4_row_range(const float* xd, const float* xs, int64_t M, const uint8_t* w, const half_t* scale,
                         const half_t* zero, const float* bias, int64_t Kp, int64_t G, float* y, int64_t ldy,
                         int64_t lo, int64_t hi) {
  const int64_t groups = Kp / G, M4 = M / 4 * 4, ld = Kp / 2;
  const bool dot = q4_dot_layout(G);
#ifdef __AVX512F__
  const int64_t NB = q4_block(G) == 32 ? 4 : 1;
#elif defined(__AVX2__)
  const int64_t NB = 4;
#else
  const int64_t NB = 1;
#endif
  for (int64_t n0 = lo; n0 < hi; n0 += NB) {
    const int64_t n1 = std::min(hi, n0 + NB);
    int64_t m = 0;
    for (int64_t n = n0; n < n1; ++n) {
      const half_t *sr = scale + n * groups, *zr = NF ? nullptr : zero + n * groups;
      m = 0;
#if defined(__AVX2__)
      if (dot) {
        for (; m + 8 <= M; m += 8) q4_dot_rows<8, NF>(xd + m * Kp, Kp, w + n * ld, Kp, G, sr, zr, y + m * ldy + n, ldy);
        for (; m + 4 <= M; m += 4) q4_dot_rows<4, NF>(xd + m * Kp, Kp, w + n * ld, Kp, G, sr, zr, y + m * ldy + n, ldy);
        for (; m + 2 <= M; m += 2) q4_dot_rows<2, NF>(xd + m * Kp, Kp, w + n * ld, Kp, G, sr, zr, y + m * ldy + n, ldy);
        continue;
      }
#endif
      for (; m < M4; m += 4)
        q4_tile<4, NF>(xd + m * Kp, Kp, w + n * ld, Kp, G, sr, zr, NF ? nullptr : xs + m * groups, groups, y + m * ldy + n, ldy);
    }
    for (; m < M; ++m) {  // the rows left: one (dot) or up to three
#ifdef __AVX512F__
      if (n1 - n0 == 4) {
        q4_rows<4, NF>(xd + m * Kp, w + n0 * ld, ld, Kp, G, scale + n0 * groups, NF ? nullptr : zero + n0 * groups,
                       y + m * ldy + n0);
        continue;
      }
#elif defined(__AVX2__)
      if (n1 - n0 == 4) {
        q4_rows_avx2<4, NF>(xd + m * Kp, NF ? nullptr : xs + m * groups, w + n0 * ld, ld, Kp, G, scale + n0 * groups,
                            NF ? nullptr : zero + n0 * groups, y + m * ldy + n0);
        continue;
      }
#endif
      for (int64_t n = n0; n < n1; ++n)
        q4_tile<1, NF>(xd + m * Kp, Kp, w + n * ld, Kp, G, scale + n * groups, NF ? nullptr : zero + n * groups,
                       NF ? nullptr : xs + m * groups, groups, y + m * ldy + n, ldy);
    }
    if (bias)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t n = n0; n < n1; ++n) y[i * ldy + n] += bias[n];
  }
}
