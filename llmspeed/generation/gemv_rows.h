// The fused decode step's GEMV row loops: one matrix's weight rows against the few rows x of a decode step.
//
// Each weight row is streamed from memory once (software prefetch PREFETCH_BYTES ahead) and reused from L1 for
// the M rows of x. Linear is one matrix with its quantization state (linear() reads it from the held tensors);
// the row loops take fp32, bf16 and int8 weights widened to fp32 (dot, dot_rows), 4-bit int4/NF4 (q4_tiles.h),
// and int8 or int4 weights times int8 activation codes on VNNI or AVX2 (q4_int8.h).
// Included by decode_cpu.cpp alone: its definitions sit in that one translation unit's anonymous namespace.
#pragma once

#include "q4_tiles.h"  // NF4, hsum, q4_tile, deinterleave, group_sums (shared with the quantized matmul kernel)
#include "q4_int8.h"  // int8 activations (act_quant) and the int4 / int8 x int8 dot products (VNNI, AVX2)
#include "cpu_vec.h"  // widening loads (fp32 / bf16 / fp16 / int8 to fp32 registers)
#include "int8_groups.h"  // group-wise int8 rows (shared with the quantized matmul kernel)

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t PREFETCH_BYTES = 4096;
// Whether the float row loop (fp32 and bf16 weights, int8 widened to fp32) prefetches weight rows ahead. It
// helps on some CPUs and costs 4-8% of a decode step on others (2-core Zen 3), so fused_decode.py measures
// both once per machine and sets it (float_prefetch()).
bool g_float_prefetch = true;

// sum_k x[k] * w[k]; x fp32, w fp32, bf16, fp16 or int8 (16-wide with AVX-512, else 8-wide with AVX2)
template <typename W>
inline float dot(const float* x, const W* w, int64_t K, bool prefetch) {
  int64_t k = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  constexpr int64_t ahead = PREFETCH_BYTES / sizeof(W);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + k + ahead), _MM_HINT_T0);
    a0 = _mm512_fmadd_ps(load16(w + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(load16(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__)
  constexpr int64_t ahead = PREFETCH_BYTES / sizeof(W);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + k + ahead), _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(load8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
  }
  s = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; k < K; ++k) s += x[k] * to_float(w[k]);
  return s;
}

// y[r] = sum_k x[r * K + k] * w[k] for R rows of x (4 or 8): each weight vector is loaded (and widened) once
// for the R rows
template <int R, typename W>
inline void dot_rows(const float* x, const W* w, int64_t K, bool prefetch, float* y) {
  int64_t k = 0;
  float s[R] = {};
#if defined(__AVX512F__)
  constexpr int64_t ahead = PREFETCH_BYTES / sizeof(W);
  __m512 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    if (prefetch && (k & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k + ahead), _MM_HINT_T0);
    __m512 wv = load16(w + k);
    for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * K + k), a[r]);
  }
  for (int r = 0; r < R; ++r) s[r] = _mm512_reduce_add_ps(a[r]);
#elif defined(__AVX2__)
  constexpr int64_t ahead = PREFETCH_BYTES / sizeof(W);
  __m256 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    if (prefetch && (k & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k + ahead), _MM_HINT_T0);
    __m256 wv = load8(w + k);
    for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + k), a[r]);
  }
  for (int r = 0; r < R; ++r) s[r] = hsum(a[r]);
#endif
  for (; k < K; ++k)
    for (int r = 0; r < R; ++r) s[r] += x[r * K + k] * to_float(w[k]);
  for (int r = 0; r < R; ++r) y[r] = s[r];
}

// out[k] += a * v[k]
template <typename V>
inline void axpy(float a, const V* v, float* out, int64_t K) {
  int64_t k = 0;
#ifdef __AVX512F__
  const __m512 aw = _mm512_set1_ps(a);
  for (; k + 16 <= K; k += 16) _mm512_storeu_ps(out + k, _mm512_fmadd_ps(aw, load16(v + k), _mm512_loadu_ps(out + k)));
#endif
#ifdef __AVX2__
  __m256 av = _mm256_set1_ps(a);
  for (; k + 8 <= K; k += 8) _mm256_storeu_ps(out + k, _mm256_fmadd_ps(av, load8(v + k), _mm256_loadu_ps(out + k)));
#endif
  for (; k < K; ++k) out[k] += a * to_float(v[k]);
}

// One linear layer of a GEMV group: y[m, n] = x[m, :] . dequantized w[n, :] + bias[n], m < M.
enum class Kind { F32, BF16, I8, INT4, NF4 };

struct Linear {
  const void* w;
  Kind kind;
  const float* scale;  // int8 with row scales: [N]; else nullptr
  const half_t* hscale = nullptr;  // 4-bit and group-wise int8: fp16 [N, groups]; else nullptr
  const half_t* hzero = nullptr;   // int4: fp16 [N, groups] in the code domain; else nullptr
  const float* bias;   // fp32 [N] or nullptr
  int64_t N, Kp, G;    // Kp: input width (4-bit: padded to whole groups); G: 4-bit or int8 group size
  float* y;            // [M, N]
  bool act8 = false;   // int8 activations (QuantConfig.activations): the layer reads x as q * d
  // set per call by gemv_group: the input this layer reads (x, or q * d), and for 4-bit weights x
  // deinterleaved [M, Kp] with its group sums [M, groups], or, for int4 on VNNI, the chunked int8 codes, or,
  // for group-wise int8 with int8 activations, the codes in order (act_quant)
  const float* x = nullptr;
  at::Tensor xd, xs;
  std::shared_ptr<ActChunks> chunks;
  std::shared_ptr<ActCodes> codes;
};

// w with its quantization state: float (scale, zero empty), int8 (scale fp32 [N], or fp16 [N, groups] for
// group-wise int8 whose groups split the row evenly), int4 (uint8 [N, Kp/2],
// scale and zero [N, groups]) or NF4 (uint8 [N, Kp/2], scale [N, groups], zero empty)
Linear linear(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& bias, float* y,
              bool act8 = false) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "fused decode: weights must be contiguous 2-D tensors");
  Linear l{w.data_ptr(), Kind::F32, nullptr, nullptr, nullptr, nullptr, w.size(0), w.size(1), 0, y, act8};
  switch (w.scalar_type()) {
    case at::kFloat: break;
    case at::kBFloat16: l.kind = Kind::BF16; break;
    case at::kChar: l.kind = Kind::I8; break;
    case at::kByte: l.kind = zero.defined() && zero.numel() > 0 ? Kind::INT4 : Kind::NF4; break;
    default: TORCH_CHECK(false, "fused decode: weights must be float32, bfloat16, int8 or packed uint8, got ", w.scalar_type());
  }
  if (l.kind == Kind::I8 && scale.defined() && scale.scalar_type() == at::kHalf) {  // group-wise int8
    TORCH_CHECK(scale.dim() == 2 && scale.is_contiguous() && scale.size(0) == w.size(0) && scale.size(1) > 0 &&
                    w.size(1) % scale.size(1) == 0 && (w.size(1) / scale.size(1)) % 16 == 0,
                "fused decode: a group-wise int8 weight needs contiguous fp16 scales [N, groups] of whole groups "
                "of a multiple of 16");
    l.hscale = half_data(scale);
    l.G = w.size(1) / scale.size(1);
  } else if (l.kind == Kind::I8) {
    TORCH_CHECK(scale.defined() && scale.scalar_type() == at::kFloat && scale.numel() == w.size(0),
                "fused decode: an int8 weight needs fp32 scales [N] (or fp16 scales [N, groups])");
    l.scale = scale.data_ptr<float>();
  }
  if (l.kind == Kind::INT4 || l.kind == Kind::NF4) {
    TORCH_CHECK(scale.defined() && scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.dim() == 2 &&
                    scale.size(0) == w.size(0), "fused decode: a 4-bit weight needs contiguous fp16 scales [N, groups]");
    l.Kp = w.size(1) * 2;
    l.G = l.Kp / scale.size(1);
    TORCH_CHECK(l.G * scale.size(1) == l.Kp && l.G % 16 == 0, "fused decode: 4-bit groups must be multiples of 16");
    l.hscale = half_data(scale);
    if (l.kind == Kind::INT4) {
      TORCH_CHECK(zero.scalar_type() == at::kHalf && zero.is_contiguous() && zero.sizes() == scale.sizes(),
                  "fused decode: int4 zeros must be contiguous fp16 like the scales");
      l.hzero = half_data(zero);
    }
  }
  if (bias.defined() && bias.numel() > 0) {
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == w.size(0), "fused decode: bias must be fp32 [N]");
    l.bias = bias.data_ptr<float>();
  }
  return l;
}

// Group-wise int8 rows lo..hi (l.hscale, l.G): int8_groups.h's dot products, 4 rows of x at a time.
void gemv_rows_i8g(const float* x, int64_t M, int64_t K, const Linear& l, int64_t lo, int64_t hi) {
  const int8_t* w = static_cast<const int8_t*>(l.w);
  const int64_t groups = K / l.G;
  float t[4];
  for (int64_t n = lo; n < hi; ++n) {
    const float bias = l.bias ? l.bias[n] : 0.f;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      i8g_dot_rows<4>(x + m * K, K, w + n * K, K, l.G, l.hscale + n * groups, t);
      for (int r = 0; r < 4; ++r) l.y[(m + r) * l.N + n] = t[r] + bias;
    }
    for (; m < M; ++m) {
      i8g_dot_rows<1>(x + m * K, K, w + n * K, K, l.G, l.hscale + n * groups, t);
      l.y[m * l.N + n] = t[0] + bias;
    }
  }
}

// Group-wise int8 rows lo..hi against int8 activation codes (l.codes): i8g_dot_codes, 4 rows of x at a time.
void gemv_rows_i8g_codes(int64_t M, int64_t K, const Linear& l, int64_t lo, int64_t hi) {
  const int8_t* w = static_cast<const int8_t*>(l.w);
  const ActCodes& a = *l.codes;
  const int64_t groups = K / l.G, ldq = a.Kb * ACT_BLOCK;
  float t[4];
  for (int64_t n = lo; n < hi; ++n) {
    const float bias = l.bias ? l.bias[n] : 0.f;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      i8g_dot_codes<4>(a.q.data() + m * ldq, ldq, a.d.data() + m * a.Kb, a.Kb, w + n * K, K, l.G,
                       l.hscale + n * groups, t);
      for (int r = 0; r < 4; ++r) l.y[(m + r) * l.N + n] = t[r] + bias;
    }
    for (; m < M; ++m) {
      i8g_dot_codes<1>(a.q.data() + m * ldq, ldq, a.d.data() + m * a.Kb, a.Kb, w + n * K, K, l.G,
                       l.hscale + n * groups, t);
      l.y[m * l.N + n] = t[0] + bias;
    }
  }
}

template <typename W>
void gemv_rows(const float* x, int64_t M, int64_t K, const Linear& l, const W* w, int64_t lo, int64_t hi) {
  const bool prefetch = g_float_prefetch;
  for (int64_t n = lo; n < hi; ++n) {
    const W* wr = w + n * K;
    const float s = l.scale ? l.scale[n] : 1.f, bias = l.bias ? l.bias[n] : 0.f;
    float r8[8];
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) {
      dot_rows<8>(x + m * K, wr, K, prefetch && m == 0, r8);
      for (int r = 0; r < 8; ++r) l.y[(m + r) * l.N + n] = r8[r] * s + bias;
    }
    for (; m + 4 <= M; m += 4) {
      dot_rows<4>(x + m * K, wr, K, prefetch && m == 0, r8);
      for (int r = 0; r < 4; ++r) l.y[(m + r) * l.N + n] = r8[r] * s + bias;
    }
    for (; m < M; ++m) l.y[m * l.N + n] = dot(x + m * K, wr, K, prefetch && m == 0) * s + bias;
  }
}

template <bool NF>
void gemv_rows_q4(int64_t M, const Linear& l, int64_t lo, int64_t hi) {
  q4_row_range<NF>(l.xd.data_ptr<float>(), NF ? nullptr : l.xs.data_ptr<float>(), M, static_cast<const uint8_t*>(l.w),
                   l.hscale, l.hzero, l.bias, l.Kp, l.G, l.y, l.N, lo, hi);
}

// The integer row loops' tiling: weight rows lo..hi in blocks of NR (the tail one by one) against x rows in
// blocks of MT (likewise); tile(nr, mt, n, m, t, NR) writes t [mt, NR] (rows NR apart) for nr weight rows from
// n and mt x rows from m (nr, mt as std::integral_constant, so each pair is its own instantiation).
template <int NR, int MT, typename Tile>
void dot_tiles(int64_t M, const Linear& l, int64_t lo, int64_t hi, Tile tile) {
  using rows_t = std::integral_constant<int, NR>;
  using xs_t = std::integral_constant<int, MT>;
  using one = std::integral_constant<int, 1>;
  float t[MT * NR];  // [x rows, weight rows]
  for (int64_t n = lo; n < hi;) {
    const int64_t rows = hi - n >= NR ? NR : 1;
    for (int64_t m = 0; m < M;) {
      const int64_t xs = M - m >= MT ? MT : 1;
      if (rows == NR && xs == MT) tile(rows_t{}, xs_t{}, n, m, t, NR);
      else if (rows == NR) tile(rows_t{}, one{}, n, m, t, NR);
      else if (xs == MT) tile(one{}, xs_t{}, n, m, t, NR);
      else tile(one{}, one{}, n, m, t, NR);
      for (int64_t i = 0; i < xs; ++i)
        for (int64_t r = 0; r < rows; ++r) l.y[(m + i) * l.N + n + r] = t[i * NR + r] + (l.bias ? l.bias[n + r] : 0.f);
      m += xs;
    }
    n += rows;
  }
}

#ifdef LLMSPEED_VNNI
constexpr int DOT_ROWS = 4, DOT_XS = 4;  // 4 x 4 accumulators of 16 lanes in AVX-512's 32 registers
constexpr bool I8_ROW_AT_A_TIME = false;
#else
// AVX2 has 16 registers: 4 weight rows x 2 x rows. A lone x row multiplies int8 weight rows one at a time: on
// a 2-core Zen 1 the 49152 x 576 int8 head took about 1.4 ms so against 2.2 four rows at a time (ad hoc timings).
constexpr int DOT_ROWS = 4, DOT_XS = 2;
constexpr bool I8_ROW_AT_A_TIME = true;
#endif

// int4 rows (l.chunks from act_chunks) or int8 rows (from act_chunks_int8) against int8 activation codes
void gemv_rows_i8(int64_t M, int64_t K, const Linear& l, int64_t lo, int64_t hi) {
#if defined(LLMSPEED_VNNI) || defined(LLMSPEED_AVX2_DOT)
  if (l.kind == Kind::I8) {
    const int8_t* w = static_cast<const int8_t*>(l.w);
    const auto tile = [&](auto nr, auto mt, int64_t n, int64_t m, float* t, int64_t ldt) {
      q8_rows_i8<decltype(nr)::value, decltype(mt)::value>(*l.chunks, m, w + n * K, K, l.scale + n, t, ldt);
    };
    if (I8_ROW_AT_A_TIME && M == 1) dot_tiles<1, 1>(M, l, lo, hi, tile);
    else dot_tiles<DOT_ROWS, DOT_XS>(M, l, lo, hi, tile);
  } else {
    const int64_t groups = l.Kp / l.G, row_bytes = l.Kp / 2;
    const uint8_t* w = static_cast<const uint8_t*>(l.w);
    dot_tiles<DOT_ROWS, DOT_XS>(M, l, lo, hi, [&](auto nr, auto mt, int64_t n, int64_t m, float* t, int64_t ldt) {
      q4_rows_i8<decltype(nr)::value, decltype(mt)::value>(*l.chunks, m, w + n * row_bytes, row_bytes, l.G,
                                                           l.hscale + n * groups, l.hzero + n * groups, t, ldt);
    });
  }
#else
  TORCH_CHECK(false, "fused decode: this build has no int8 dot-product path (AVX-512 VNNI or AVX2)");
#endif
}

}  // namespace
