// AMX tile matmul shared by llmspeed's quantized matmul kernel (amx_cpu.cpp) and the fused CPU decode
// step (llmspeed/generation/decode_cpu.cpp): each extension compiles it once.
//
// y[m, n] = sum_k x[m, k] * w[n, k] in bf16 tiles with fp32 accumulation, where w is decoded 32 rows at a
// time by a row functor: int8 (w = s[n] q), int4 (w = (q - z) s per group), NF4 (w = NF4[q] s per group),
// bf16 or fp32. The activations are split into two bf16 parts, x = hi + lo + r with |r| <= 2^-17 |x|.
// int8 codes and bf16 weights are exact in bf16 (int8's row scale is applied on store), so two bf16
// products accumulated in fp32 tiles give an fp32-grade result. A 4-bit or fp32 weight is split the same
// way, and three products (hi.hi + hi.lo + lo.hi) keep it fp32-grade: the same order of error as
// reordering an fp32 sum, at AMX speed.
//
// Roles: the weight is the tile "A" operand (16 rows of n x 32 k, row-major: 32 weight rows are decoded
// into a per-thread buffer, no repacking), the activations are the "B" operand, which AMX wants
// pair-interleaved ("VNNI": row p holds (x[m][2p], x[m][2p+1]) for 16 m); they are converted once per call
// and shared by every thread. C tiles come out as [n, m] and are written transposed into y [M, N]. Each
// thread works on blocks of 32 weight rows x 32 rows of x (4 C tiles, 2 A, 2 B: all 8 tile registers), or
// x 16 rows for the last tile of x (2 C tiles, 2 A, 1 B).
// LLMSPEED_AMX is defined where the compiler targets AMX-BF16 on Linux; amx_usable() says whether the OS
// granted the tiles to this process.
#pragma once

#include "q4_tiles.h"  // NF4 (the codebook shared with the other CPU kernels)

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define LLMSPEED_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace llmspeed_amx {

constexpr int64_t TK = 32;  // k per tile step (bf16)
constexpr int64_t TB = 32;  // rows of n and of m per block (two 16-row tiles each)

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

#ifdef LLMSPEED_AMX
struct alignas(64) TileConfig {  // LDTILECFG reads 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline bool request_amx() {  // Linux hands out the tile state only on request, once per process
  constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  static const bool granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return granted;
}

inline TileConfig eight_full_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  return cfg;
}

// Configure 8 tiles of 16 rows x 64 bytes. The configuration lives in a static object: GCC does not
// model LDTILECFG's read of its operand, and dropped the stores to a stack copy as dead (seen with g++ 12).
inline void load_tiles() {
  static const TileConfig cfg = eight_full_tiles();
  _tile_loadconfig(&cfg);
}

inline __m512 bf16_to_fp32(__m256i bits) {  // 16 bf16 -> 16 fp32 (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// 32 floats (a: 0..15, b: 16..31) -> their bf16 parts in order: hi = bf16(v), lo = bf16(v - hi).
inline void split32(__m512 a, __m512 b, __m512i& hi, __m512i& lo) {
  const __m512bh vh = _mm512_cvtne2ps_pbh(b, a);
  hi = reinterpret_cast<const __m512i&>(vh);
  const __m512bh vl = _mm512_cvtne2ps_pbh(_mm512_sub_ps(b, bf16_to_fp32(_mm512_extracti64x4_epi64(hi, 1))),
                                          _mm512_sub_ps(a, bf16_to_fp32(_mm512_castsi512_si256(hi))));
  lo = reinterpret_cast<const __m512i&>(vl);
}

// x [M, K] float -> hi, lo [Mp / 16][Kp / 2][16][2] bf16 (VNNI pairs), zero in the padding.
// 32 values of a row become 16 (even, odd) pairs, scattered one per 64-byte row of the tile layout.
inline void split_activations(const float* x, int64_t M, int64_t K, int64_t Mp, int64_t Kp, bool need_lo,
                       uint16_t* hi, uint16_t* lo) {
  const int64_t pairs = Kp / 2;
  at::parallel_for(0, Mp / 16, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float row[TK];
    const __m512i stride = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    for (int64_t b = b0; b < b1; ++b) {
      uint16_t* h = hi + b * pairs * 32;
      uint16_t* l = need_lo ? lo + b * pairs * 32 : nullptr;
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t m = b * 16 + i;
        const __m512i at = _mm512_add_epi32(stride, _mm512_set1_epi32(static_cast<int>(i)));  // dword offsets
        for (int64_t k = 0; k < Kp; k += TK) {
          const float* src = x + m * K + k;
          const bool full = m < M && k + TK <= K;
          if (!full) {  // the ragged end of a row, or a padding row
            for (int64_t j = 0; j < TK; ++j) row[j] = (m < M && k + j < K) ? src[j] : 0.f;
            src = row;
          }
          __m512i vh, vl;  // k .. k+31 in order: 16 (even, odd) pairs each
          split32(_mm512_loadu_ps(src), _mm512_loadu_ps(src + 16), vh, vl);
          _mm512_i32scatter_epi32(reinterpret_cast<int32_t*>(h + (k / 2) * 32), at, vh, 4);
          if (l) _mm512_i32scatter_epi32(reinterpret_cast<int32_t*>(l + (k / 2) * 32), at, vl, 4);
        }
      }
    }
  });
}

// int8 rows n0..n0+31 -> bf16 (exact), row-major [32][Kp], zero past K and past N.
struct Int8Rows {
  const int8_t* q;
  int64_t N, K;
  void operator()(int64_t n0, int64_t Kp, uint16_t* hi, uint16_t*) const {
    for (int64_t r = 0; r < TB; ++r) {
      uint16_t* wr = hi + r * Kp;
      const int64_t n = n0 + r;
      int64_t k = 0;
      if (n < N) {
        const int8_t* qr = q + n * K;
        for (; k + 16 <= K; k += 16) {  // 16 codes -> 16 bf16 (exact: the top half of the fp32 bits)
          __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k))));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(wr + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16)));
        }
        for (; k < K; ++k) {
          const float f = static_cast<float>(qr[k]);
          uint32_t u;
          std::memcpy(&u, &f, 4);
          wr[k] = static_cast<uint16_t>(u >> 16);
        }
      }
      for (; k < Kp; ++k) wr[k] = 0;
    }
  }
};

// 4-bit rows n0..n0+31 (two codes a byte, low nibble first; Kp codes a row, groups of G, G % 32 == 0)
// decoded to fp32 with the group's scale (and zero: int4) and split into bf16 hi / lo, [32][Kp] each.
template <bool NF>
struct Q4Rows {
  const uint8_t* q;
  const half_t *scales, *zeros;  // fp16 [N, groups]
  int64_t N, G;
  void operator()(int64_t n0, int64_t Kp, uint16_t* hi, uint16_t* lo) const {
    const int64_t groups = Kp / G;
    const __m512i even = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(8));
    const __m512i nibble = _mm512_set1_epi32(15);
    const __m512 table = _mm512_loadu_ps(NF4);
    for (int64_t r = 0; r < TB; ++r) {
      const int64_t n = n0 + r;
      uint16_t *hr = hi + r * Kp, *lr = lo + r * Kp;
      if (n >= N) {
        std::memset(hr, 0, Kp * 2);
        std::memset(lr, 0, Kp * 2);
        continue;
      }
      const uint8_t* qr = q + n * (Kp / 2);
      for (int64_t k = 0; k < Kp; k += TK) {
        const int64_t g = n * groups + k / G;
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k / 2)));
        const __m512i low = _mm512_and_si512(bytes, nibble), high = _mm512_srli_epi32(bytes, 4);
        const __m512i c0 = _mm512_permutex2var_epi32(low, even, high);  // codes k .. k+15
        const __m512i c1 = _mm512_permutex2var_epi32(low, odd, high);   // codes k+16 .. k+31
        const __m512 s = _mm512_set1_ps(h2f(scales[g]));
        __m512 a, b;
        if (NF) {
          a = _mm512_mul_ps(_mm512_permutexvar_ps(c0, table), s);
          b = _mm512_mul_ps(_mm512_permutexvar_ps(c1, table), s);
        } else {
          const __m512 z = _mm512_set1_ps(h2f(zeros[g]));
          a = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c0), z), s);
          b = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c1), z), s);
        }
        __m512i vh, vl;
        split32(a, b, vh, vl);
        _mm512_storeu_si512(hr + k, vh);
        _mm512_storeu_si512(lr + k, vl);
      }
    }
  }
};

// fp32 rows n0..n0+31 split into bf16 hi / lo, [32][Kp] each, zero past K and past N.
struct F32Rows {
  const float* w;
  int64_t N, K;
  void operator()(int64_t n0, int64_t Kp, uint16_t* hi, uint16_t* lo) const {
    for (int64_t r = 0; r < TB; ++r) {
      const int64_t n = n0 + r;
      uint16_t *hr = hi + r * Kp, *lr = lo + r * Kp;
      for (int64_t k = 0; k < Kp; k += TK) {
        const int64_t valid = n < N ? std::min<int64_t>(TK, std::max<int64_t>(K - k, 0)) : 0;
        const __mmask16 m0 = static_cast<__mmask16>(valid >= 16 ? 0xffff : (1u << valid) - 1);
        const __mmask16 m1 = static_cast<__mmask16>(valid >= 32 ? 0xffff : valid > 16 ? (1u << (valid - 16)) - 1 : 0);
        const float* src = w + n * K + k;
        __m512i vh, vl;
        split32(_mm512_maskz_loadu_ps(m0, src), _mm512_maskz_loadu_ps(m1, src + 16), vh, vl);
        _mm512_storeu_si512(hr + k, vh);
        _mm512_storeu_si512(lr + k, vl);
      }
    }
  }
};

// bf16 rows (raw bits) n0..n0+31 copied into [32][Kp] (exact: no low part), zero past K and past N.
struct BF16Rows {
  const uint16_t* w;
  int64_t N, K;
  void operator()(int64_t n0, int64_t Kp, uint16_t* hi, uint16_t*) const {
    for (int64_t r = 0; r < TB; ++r) {
      const int64_t n = n0 + r;
      uint16_t* hr = hi + r * Kp;
      const int64_t valid = n < N ? K : 0;
      if (valid) std::memcpy(hr, w + n * K, valid * 2);
      std::memset(hr + valid, 0, (Kp - valid) * 2);
    }
  }
};

// y [M, N] = x [M, K] . w^T, w decoded 32 rows at a time by ``rows``; ``row_scale`` (or null) multiplies
// output column n. ``split_x``: add x's low bf16 part; ``split_w``: ``rows`` also writes w's low part.
template <class Rows>
void amx_matmul(const float* xp, int64_t M, int64_t K, int64_t Kp, int64_t N, bool split_x, bool split_w,
                const Rows& rows, const float* row_scale, float* yp) {
  // x is padded to whole 16-row tiles: a decode step of a few rows multiplies one x tile per weight tile
  const int64_t Mp = round_up(std::max<int64_t>(M, 1), 16), Np = round_up(N, TB);
  // every element is written by split_activations (padding included): no zero-fill on this hot path
  std::unique_ptr<uint16_t[]> hi(new uint16_t[Mp * Kp]), lo(split_x ? new uint16_t[Mp * Kp] : nullptr);
  split_activations(xp, M, K, Mp, Kp, split_x, hi.get(), lo.get());
  const int64_t pairs = Kp / 2, xblock = pairs * 32;  // bf16 elements per 16 rows of x
  at::parallel_for(0, Np / TB, 1, [&](int64_t nb0, int64_t nb1) {
    load_tiles();
    std::unique_ptr<uint16_t[]> w(new uint16_t[TB * Kp]), wl(split_w ? new uint16_t[TB * Kp] : nullptr);
    alignas(64) float c[16 * 16];
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const int64_t n0 = nb * TB;
      rows(n0, Kp, w.get(), wl.get());
      for (int64_t m0 = 0; m0 < Mp; m0 += TB) {
        const bool two = m0 + 16 < Mp;  // a second x tile (rows m0+16..m0+31) in this block
        const uint16_t* h0 = hi.get() + (m0 / 16) * xblock;
        const uint16_t* h1 = h0 + xblock;
        const uint16_t* l0 = split_x ? lo.get() + (m0 / 16) * xblock : nullptr;
        const uint16_t* l1 = split_x ? l0 + xblock : nullptr;
        auto load_x = [&](const uint16_t* a, const uint16_t* b, int64_t k) {  // x rows, pairs of k
          _tile_loadd(6, a + (k / 2) * 32, 64);
          if (two) _tile_loadd(7, b + (k / 2) * 32, 64);
        };
        auto multiply = [&]() {  // C[n tile i, m tile j] += A_i . B_j
          _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 5, 6);
          if (two) { _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(3, 5, 7); }
        };
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t k = 0; k < Kp; k += TK) {
          _tile_loadd(4, w.get() + k, Kp * 2);            // weight rows n0..n0+15 (hi part)
          _tile_loadd(5, w.get() + 16 * Kp + k, Kp * 2);  // weight rows n0+16..n0+31
          load_x(h0, h1, k);
          multiply();
          if (split_x) {  // w.hi . x.lo
            load_x(l0, l1, k);
            multiply();
          }
          if (split_w) {  // w.lo . x.hi
            _tile_loadd(4, wl.get() + k, Kp * 2);
            _tile_loadd(5, wl.get() + 16 * Kp + k, Kp * 2);
            if (split_x) load_x(h0, h1, k);
            multiply();
          }
        }
        for (int t = 0; t < 4; ++t) {  // C tile t: n rows (t / 2) * 16.., m columns (t % 2) * 16..
          if (t % 2 == 1 && !two) continue;
          switch (t) {
            case 0: _tile_stored(0, c, 64); break;
            case 1: _tile_stored(1, c, 64); break;
            case 2: _tile_stored(2, c, 64); break;
            default: _tile_stored(3, c, 64); break;
          }
          const int64_t nt = n0 + (t / 2) * 16, mt = m0 + (t % 2) * 16;
          if (nt >= N) continue;
          const int64_t ni = std::min<int64_t>(16, N - nt);
          const __mmask16 keep = static_cast<__mmask16>((1u << ni) - 1);
          const __m512 scale = row_scale ? _mm512_maskz_loadu_ps(keep, row_scale + nt) : _mm512_set1_ps(1.f);
          for (int64_t j = 0; j < 16 && mt + j < M; ++j) {  // a row of y: column j of c, 16 contiguous outputs
            const __m512 col = _mm512_i32gather_ps(column, c + j, 4);
            _mm512_mask_storeu_ps(yp + (mt + j) * N + nt, keep, _mm512_mul_ps(col, scale));
          }
        }
      }
    }
    _tile_release();
  });
}
#endif

// Whether this build has the AMX path and the OS granted this process the tile state.
inline bool usable() {
#ifdef LLMSPEED_AMX
  return request_amx();
#else
  return false;
#endif
}

}  // namespace llmspeed_amx
