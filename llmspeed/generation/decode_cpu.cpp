// Fused decode step for Llama-family decoder stacks on CPU (driven by fused_decode.py).
//
// One call runs every layer for n rows (tokens: one per sequence in a decode step, or whole prompt chunks in a
// mixed step): RMSNorm, the q/k/v GEMVs (one parallel region over all their rows), rotary embedding, the
// paged-KV write, attention over each row's blocks, o_proj + residual, RMSNorm, gate/up GEMVs, SiLU(gate) * up,
// down_proj + residual, then the final norm and the vocabulary projection of the sampled rows. The residual
// stream stays in fp32;
// weights are fp32, bf16, weight-only int8 with one scale per output row (llmspeed's Int8Linear) or
// packed 4-bit int4/NF4 (Int4Linear/NF4Linear: q4_tile from the header shared with the quantized matmul,
// llmspeed/quant/kernels/q4_tiles.h), widened to fp32 in registers; the KV cache is fp32, bf16 or fp16.
//
// Decode at small batch is bound by reading the weights once, so the GEMV streams each weight row
// from memory once (software prefetch 4 KiB ahead) and reuses it from L1 for the n rows of x.
// Rows of all matrices of one GEMV group are split over torch's intra-op threads with
// at::parallel_for (this file is built with -fopenmp; see llmspeed/cpp_build.py), or, in steps of a few
// rows, over the team of threads the step holds (step_team.h).
//
// greedy_steps runs several decode steps of the same rows back to back, each row's argmax token the next step's
// input (its embedding row, rotary rows and cache slot made here), for the generator's greedy bursts.
#include "q4_tiles.h"  // NF4, hsum, q4_tile, deinterleave, group_sums (shared with the quantized matmul kernel)
#include "amx_tiles.h"  // the AMX tile matmul (shared with the amx kernel): GEMV groups of many rows
#include "q4_int8.h"  // int8 activations (act_quant) and the int4 / int8 x int8 dot products (VNNI, AVX2)
#include "q4_panels.h"  // int4 x int8 activations for prompt-sized steps (AVX2, AVX-512 VNNI)
#include "q8_panels.h"  // int8 x int8 activations for prompt-sized steps (AVX-512 VNNI)
#include "dequant_rows.h"  // packed rows widened to fp32 for the GEMM of prompt-sized steps
#include "cpu_vec.h"  // widening loads (fp32 / bf16 / fp16 / int8 to fp32 registers)
#include "paged_attention.h"  // Step and attend_cached: attention over the paged KV cache
#include "step_team.h"  // Team: the threads one decode step holds from start to end

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <unordered_map>
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
// Whether steps of fewer than TEAM_ROWS rows hold a team of threads for the whole step (step_team.h) instead of
// opening an OpenMP region per parallel loop; the same results either way (step_team() sets it, for tests and
// A/B timing).
bool g_step_team = true;
// Below this many rows a step's elementwise loops (norms, rotary, SiLU, residual adds) run on one thread anyway
// (their grains), so only its GEMV groups and attention are parallel: those steps hold a team.
constexpr int64_t TEAM_ROWS = 16;

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
  const float* scale;  // int8: [N]; else nullptr
  const half_t* hscale = nullptr;  // 4-bit: fp16 [N, groups]; else nullptr
  const half_t* hzero = nullptr;   // int4: fp16 [N, groups] in the code domain; else nullptr
  const float* bias;   // fp32 [N] or nullptr
  int64_t N, Kp, G;    // Kp: input width (4-bit: padded to whole groups); G: 4-bit group size
  float* y;            // [M, N]
  bool act8 = false;   // int8 activations (QuantConfig.activations): the layer reads x as q * d
  // set per call by gemv_group: the input this layer reads (x, or q * d), and for 4-bit weights x
  // deinterleaved [M, Kp] with its group sums [M, groups], or, for int4 on VNNI, the chunked int8 codes
  const float* x = nullptr;
  at::Tensor xd, xs;
  std::shared_ptr<ActChunks> chunks;
};

// w with its quantization state: float (scale, zero empty), int8 (scale [N]), int4 (uint8 [N, Kp/2],
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
  if (l.kind == Kind::I8) {
    TORCH_CHECK(scale.defined() && scale.scalar_type() == at::kFloat && scale.numel() == w.size(0),
                "fused decode: an int8 weight needs fp32 scales [N]");
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

// y = x . w^T (+ bias) of one linear on AMX tiles (see amx_tiles.h); false when this build or layout has
// no tile path (no AMX, or 4-bit groups that are not whole 32-code tile steps).
bool amx_linear(const float* x, int64_t M, int64_t K, const Linear& l) {
#ifdef LLMSPEED_AMX
  using namespace llmspeed_amx;
  const int64_t Kp = round_up(K, TK);
  switch (l.kind) {
    case Kind::F32: amx_matmul(x, M, K, Kp, l.N, true, true, F32Rows{static_cast<const float*>(l.w), l.N, K}, nullptr, l.y); break;
    case Kind::BF16: amx_matmul(x, M, K, Kp, l.N, true, false, BF16Rows{static_cast<const uint16_t*>(l.w), l.N, K}, nullptr, l.y); break;
    case Kind::I8: amx_matmul(x, M, K, Kp, l.N, true, false, Int8Rows{static_cast<const int8_t*>(l.w), l.N, K}, l.scale, l.y); break;
    case Kind::INT4:
    case Kind::NF4: {
      if (l.G % TK != 0) return false;
      const auto* q = static_cast<const uint8_t*>(l.w);
      if (l.kind == Kind::NF4)
        amx_matmul(x, M, K, l.Kp, l.N, true, true, Q4Rows<true>{q, l.hscale, nullptr, l.N, l.G}, nullptr, l.y);
      else
        amx_matmul(x, M, K, l.Kp, l.N, true, true, Q4Rows<false>{q, l.hscale, l.hzero, l.N, l.G}, nullptr, l.y);
      break;
    }
  }
  if (l.bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < l.N; ++n) l.y[m * l.N + n] += l.bias[n];
  return true;
#else
  return false;
#endif
}

// Whether the row loop multiplies this layer's int4 codes by int8 activation codes (q4_int8.h).
bool vnni_rows(const Linear& l) {
  return l.act8 && vnni_compiled() && (l.kind == Kind::I8 || (l.kind == Kind::INT4 && l.G % 32 == 0));
}
constexpr int64_t VNNI_TILE_ROWS = 16;  // from this many rows, such layers too run on AMX tiles

// The int8 codes of x as the VNNI row loop of l reads them.
ActChunks vnni_chunks(const float* x, int64_t M, int64_t K, const Linear& l) {
#if defined(LLMSPEED_VNNI) || defined(LLMSPEED_AVX2_DOT)
  return l.kind == Kind::I8 ? act_chunks_int8(x, M, K) : act_chunks(x, M, K, l.Kp, l.G);
#else
  TORCH_CHECK(false, "fused decode: this build has no int8 dot-product path (AVX-512 VNNI or AVX2)");
#endif
}

// From this many rows (a step with prompt chunks) fp32 and bf16 matrices run as torch's GEMM (MKL / oneDNN on
// x86), and quantized ones as quant_gemm where AMX tiles do not run them. For fp32 that was as fast as the
// AMX tiles' three-product split up to 256 rows and faster beyond; for bf16, oneDNN's single bf16 product took
// 0.6-0.75x the time of the tiles' two (hi + lo of x).
constexpr int64_t TORCH_GEMM_ROWS = 64;

// Whether torch_gemm widens bf16 weights to fp32 and runs the fp32 GEMM (CPUs without fast bf16 GEMM, where
// llmspeed.precision.cpu_matmul.crossover finds the widened product faster) instead of the native bf16 one.
bool g_upcast_bf16 = false;

// fp32 bytes of weight widened (bf16) or dequantized per block: as llmspeed.precision.cpu_matmul.BLOCK_BYTES, a
// block stays in cache and the buffer is reused
constexpr int64_t WIDEN_BLOCK_BYTES = 1 << 22;

// y [M, N] = x [M, K] @ w^T for a weight widened to fp32 a block of rows at a time: widen(n0, r, out) writes
// rows n0..n0 + r as fp32 [r, width] (width >= K: 4-bit rows are padded to whole groups), then torch's GEMM.
template <typename Widen>
void block_gemm(const float* x, int64_t M, int64_t K, const Linear& l, int64_t width, Widen widen) {
  auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  at::Tensor xt = torch::from_blob(const_cast<float*>(x), {M, K}, f32);
  at::Tensor yt = torch::from_blob(l.y, {M, l.N}, f32);
  const int64_t rows = std::max<int64_t>(1, WIDEN_BLOCK_BYTES / (4 * width));
  at::Tensor block = at::empty({std::min(rows, l.N), width}, f32);  // [r, width]
  for (int64_t n0 = 0; n0 < l.N; n0 += rows) {
    const int64_t r = std::min(rows, l.N - n0);
    widen(n0, r, block.data_ptr<float>());
    at::Tensor b = block.narrow(0, 0, r).narrow(1, 0, K);  // [r, K]
    if (r == l.N) at::mm_out(yt, xt, b.t());
    else yt.narrow(1, n0, r).copy_(at::mm(xt, b.t()));  // [M, r]
  }
  if (l.bias) yt.add_(torch::from_blob(const_cast<float*>(l.bias), {l.N}, f32));
}

// y [M, N] = x [M, K] @ w^T (+ bias) for an fp32 or bf16 weight, through torch's GEMM. A bf16 weight either
// multiplies x rounded to bf16 in torch's bf16 GEMM, or (g_upcast_bf16) is widened to fp32 a block of rows at
// a time and multiplies fp32 x, as the cast model's own forward does on such CPUs.
void torch_gemm(const float* x, int64_t M, int64_t K, const Linear& l) {
  TORCH_CHECK(l.Kp == K, "fused decode: a weight has ", l.Kp, " input columns for an input of ", K);
  auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  at::Tensor xt = torch::from_blob(const_cast<float*>(x), {M, K}, f32);
  at::Tensor yt = torch::from_blob(l.y, {M, l.N}, f32);
  if (l.kind == Kind::BF16 && g_upcast_bf16) {
    at::Tensor wt = torch::from_blob(const_cast<void*>(l.w), {l.N, K}, torch::TensorOptions().dtype(torch::kBFloat16));
    block_gemm(x, M, K, l, K, [&](int64_t n0, int64_t r, float* out) {
      torch::from_blob(out, {r, K}, f32).copy_(wt.narrow(0, n0, r));
    });
    return;
  }
  if (l.kind == Kind::BF16) {
    at::Tensor wt = torch::from_blob(const_cast<void*>(l.w), {l.N, K}, torch::TensorOptions().dtype(torch::kBFloat16));
    yt.copy_(at::mm(xt.to(torch::kBFloat16), wt.t()));
  } else {
    at::mm_out(yt, xt, torch::from_blob(const_cast<void*>(l.w), {l.N, K}, f32).t());
  }
  if (l.bias) yt.add_(torch::from_blob(const_cast<float*>(l.bias), {l.N}, f32));
}

// y [M, N] = x [M, K] @ dequantized w^T (+ bias) for a quantized weight of a prompt-sized step, as the per-layer
// path runs it: int4 with int8 activations as panels of byte multiply-adds (q4_panels.h, AVX2 and VNNI builds),
// int8 with int8 activations likewise on VNNI (q8_panels.h), int4 / NF4 / int8 with float activations widened
// to fp32 a block at a time (dequant_rows.h) for torch's GEMM. False for the rest (int8 with int8 activations
// on AVX2: its integer row loop was faster at every prompt length), which stay in the row loop.
bool quant_gemm(const float* x, int64_t M, int64_t K, const Linear& l) {
  if (l.act8) {
    bool done = false;
#ifdef LLMSPEED_PANELS
    if (l.kind == Kind::INT4 && l.G % ACT_BLOCK == 0) {
      TORCH_CHECK(l.Kp >= K && l.Kp - K < l.G, "fused decode: a 4-bit weight is padded to ", l.Kp, " for ", K);
      q4_panel_gemm(x, M, K, static_cast<const uint8_t*>(l.w), l.N, l.Kp, l.G, l.hscale, l.hzero, l.y);
      done = true;
    }
#endif
#ifdef LLMSPEED_Q8_PANELS
    if (l.kind == Kind::I8) {
      TORCH_CHECK(l.Kp == K, "fused decode: a weight has ", l.Kp, " input columns for an input of ", K);
      q8_panel_gemm(x, M, K, static_cast<const int8_t*>(l.w), l.N, l.scale, l.y);
      done = true;
    }
#endif
    if (done && l.bias) {
      auto f32 = torch::TensorOptions().dtype(torch::kFloat);
      torch::from_blob(l.y, {M, l.N}, f32).add_(torch::from_blob(const_cast<float*>(l.bias), {l.N}, f32));
    }
    return done;
  }
  if (l.kind == Kind::I8) {
    TORCH_CHECK(l.Kp == K, "fused decode: a weight has ", l.Kp, " input columns for an input of ", K);
    const auto* codes = static_cast<const int8_t*>(l.w);
    block_gemm(x, M, K, l, K, [&](int64_t n0, int64_t r, float* out) {
      at::parallel_for(0, r, 8, [&](int64_t lo, int64_t hi) {
        dequant_int8_rows(codes, l.scale, K, n0 + lo, n0 + hi, out + lo * K);
      });
    });
    return true;
  }
  TORCH_CHECK(l.Kp >= K && l.Kp - K < l.G, "fused decode: a 4-bit weight is padded to ", l.Kp, " for ", K);
  const auto* codes = static_cast<const uint8_t*>(l.w);
  block_gemm(x, M, K, l, l.Kp, [&](int64_t n0, int64_t r, float* out) {
    at::parallel_for(0, r, 8, [&](int64_t lo, int64_t hi) {
      dequant_4bit_rows(codes, l.hscale, l.hzero, l.Kp, l.G, n0 + lo, n0 + hi, out + lo * l.Kp);
    });
  });
  return true;
}

// Work that shares a GEMV group's parallel loop (the LoRA rank products of the group's input): count items, each
// worth about `weight` weight rows of the group, run(lo, hi) over items lo <= j < hi; grain: items per task when it
// runs on its own (a group that goes through a GEMM or AMX tiles).
struct Extra {
  int64_t count = 0, weight = 1, grain = 1;
  std::function<void(int64_t, int64_t)> run;
};

void run_extra(const Extra* extra) {
  if (extra && extra->count > 0) llmspeed_team::team_for(extra->count, extra->grain, extra->run);
}

// Bytes one weight row of l costs (about) at K inputs.
int64_t row_bytes(const Linear& l, int64_t K) {
  switch (l.kind) {
    case Kind::F32: return 4 * K;
    case Kind::BF16: return 2 * K;
    case Kind::I8: return K;
    default: return K / 2 + 4 * K / std::max<int64_t>(l.G, 1);  // codes, fp16 scale and zero per group
  }
}

// Every matrix of the group reads the same x [M, K] (as q * d where it has int8 activations); all their
// rows form one parallel range. From ``amx_rows`` rows up (0: never; fp32 weights, which take a split and
// three tile products, from twice as many) each matrix is one AMX tile matmul instead, where the CPU has
// tiles. In the row loop, int8 weights and int4 weights with groups of whole 32-code blocks multiply int8
// activation codes on VNNI where the layer has int8 activations (q4_int8.h).
void gemv_group(const float* x, int64_t M, int64_t K, std::vector<Linear> group, int64_t amx_rows,
                const Extra* extra = nullptr) {
  if (M >= TORCH_GEMM_ROWS) {  // prompt-sized steps: torch's GEMM, or quant_gemm where AMX tiles will not run
    const bool tiles = amx_rows > 0 && M >= amx_rows && llmspeed_amx::usable();
    std::vector<Linear> rest;
    for (const auto& l : group) {
      if (l.kind == Kind::F32 || l.kind == Kind::BF16) torch_gemm(x, M, K, l);
      else if (tiles || !quant_gemm(x, M, K, l)) rest.push_back(l);
    }
    if (rest.empty()) {
      run_extra(extra);
      return;
    }
    group = std::move(rest);
  }
  bool int8_codes = true;  // every matrix multiplies int8 activation codes on VNNI in the row loop
  for (const auto& l : group) int8_codes = int8_codes && vnni_rows(l);
  // the VNNI row loop unpacks each chunk once for 4 rows: ahead of the tiles' bf16 decode up to 16 rows
  const bool tiles_wanted = amx_rows > 0 && M >= amx_rows && llmspeed_amx::usable() && !(int8_codes && M < VNNI_TILE_ROWS);
  std::vector<float> xq;  // q * d [M, K], for the members with int8 activations that multiply floats
  for (auto& l : group) {
    if (l.act8 && xq.empty() && (tiles_wanted || !vnni_rows(l))) {
      xq.resize(M * K);
      act_round(x, M, K, xq.data());
    }
    l.x = l.act8 && !xq.empty() ? xq.data() : x;
  }
  if (tiles_wanted) {
    bool tiles = true;
    for (const auto& l : group)
      tiles = tiles && (l.kind != Kind::INT4 && l.kind != Kind::NF4 || l.G % 32 == 0) &&
              (l.kind != Kind::F32 || M >= 2 * amx_rows);
    if (tiles) {
      for (const auto& l : group) {
        TORCH_CHECK(l.Kp >= K, "fused decode: a weight has ", l.Kp, " input columns for an input of ", K);
        amx_linear(l.x, M, K, l);
      }
      run_extra(extra);
      return;
    }
  }
  int64_t total = 0;
  for (auto& l : group) {
    total += l.N;
    if (l.kind != Kind::INT4 && l.kind != Kind::NF4) {
      TORCH_CHECK(l.Kp == K, "fused decode: a weight has ", l.Kp, " input columns for an input of ", K);
    } else {
      TORCH_CHECK(l.Kp >= K && l.Kp - K < l.G, "fused decode: a 4-bit weight is padded to ", l.Kp, " for ", K);
    }
    if (vnni_rows(l)) {  // int8 codes chunked for this layout, shared by the group's matrices of the same one
      for (const auto& o : group)
        if (o.chunks && (o.kind == Kind::I8) == (l.kind == Kind::I8) && o.Kp == l.Kp && o.G == l.G) l.chunks = o.chunks;
      if (!l.chunks) l.chunks = std::make_shared<ActChunks>(vnni_chunks(x, M, K, l));
      continue;
    }
    if (l.kind == Kind::INT4 || l.kind == Kind::NF4) {  // x rearranged once for the group's 4-bit matrices alike
      for (const auto& o : group)
        if (o.xd.defined() && o.x == l.x && o.Kp == l.Kp && o.G == l.G) {
          l.xd = o.xd;
          if (o.xs.defined()) l.xs = o.xs;
        }
      if (!l.xd.defined()) {
        at::Tensor xt = torch::from_blob(const_cast<float*>(l.x), {M, K}, torch::kFloat);
        l.xd = deinterleave(xt, l.Kp, l.G);
      }
      if (l.kind == Kind::INT4 && !l.xs.defined()) l.xs = group_sums(l.xd, l.G);
    }
  }
  // the extra items after the rows, each counted as `weight` rows, so that a static split stays balanced; an item
  // belongs to the task that holds its first unit
  const int64_t w = extra && extra->count > 0 ? extra->weight : 0, units = total + (w ? extra->count * w : 0);
  llmspeed_team::team_for(units, 16, [&](int64_t begin, int64_t end) {
    if (end > total) {
      const int64_t lo = (std::max(begin, total) - total + w - 1) / w, hi = (end - total + w - 1) / w;
      if (lo < hi) extra->run(lo, hi);
      if (begin >= total) return;
      end = total;
    }
    int64_t base = 0;
    for (const auto& l : group) {
      int64_t lo = std::max(begin, base) - base, hi = std::min(end, base + l.N) - base;
      switch (l.kind) {
        case Kind::F32: gemv_rows(l.x, M, K, l, static_cast<const float*>(l.w), lo, hi); break;
        case Kind::BF16: gemv_rows(l.x, M, K, l, static_cast<const bf16*>(l.w), lo, hi); break;
        case Kind::I8:
          if (l.chunks) gemv_rows_i8(M, K, l, lo, hi);
          else gemv_rows(l.x, M, K, l, static_cast<const int8_t*>(l.w), lo, hi);
          break;
        case Kind::INT4:
          if (l.chunks) gemv_rows_i8(M, K, l, lo, hi);
          else gemv_rows_q4<false>(M, l, lo, hi);
          break;
        case Kind::NF4: gemv_rows_q4<true>(M, l, lo, hi); break;
      }
      base += l.N;
    }
  });
}

// Rows per task when a per-row loop of `cost` elements is split over threads (small steps run inline).
inline int64_t grain(int64_t cost) { return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, cost)); }

// out[m, :] = x[m, :] / sqrt(mean(x[m, :]^2) + eps) * weight   (weight fp32 [E])
void rms_norm(const float* x, const float* weight, int64_t M, int64_t E, double eps, float* out) {
  at::parallel_for(0, M, grain(E), [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) {
      const float* r = x + m * E;
      double ss = 0.0;
      for (int64_t e = 0; e < E; ++e) ss += static_cast<double>(r[e]) * r[e];
      float inv = static_cast<float>(1.0 / std::sqrt(ss / E + eps));
      for (int64_t e = 0; e < E; ++e) out[m * E + e] = r[e] * inv * weight[e];
    }
  });
}

// rotate-half rotary embedding on `heads` heads of each row; cos/sin [M, D]
void rope(float* x, int64_t M, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  at::parallel_for(0, M, grain(heads * D), [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m)
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + (m * heads + h) * D;
        const float* c = cos + m * D;
        const float* s = sin + m * D;
        for (int64_t j = 0; j < half; ++j) {
          float a = v[j], b = v[j + half];
          v[j] = a * c[j] - b * s[j];
          v[j + half] = b * c[j + half] + a * s[j + half];
        }
      }
  });
}

// gate[e] = SiLU(gate[e]) * up[e]: x * sigmoid(x) with sigmoid(x) = e^min(x, 0) / (1 + e^-|x|), both
// exponentials of non-positive arguments (paged_attention.h's exp_neg, vectorized).
void silu_mul(float* gate, const float* up, int64_t count) {
  using namespace attn;
  at::parallel_for(0, count, 1 << 15, [&](int64_t lo, int64_t hi) {
    int64_t e = lo;
    for (; e + VW <= hi; e += VW) {
      const vec x = vloadf(gate + e);
      const vec sig = vdiv(exp_neg(vmin(x, vzero())), vadd(vset(1.f), exp_neg(vmin(x, vsub(vzero(), x)))));
      vstore(gate + e, vmul(vmul(x, sig), vloadf(up + e)));
    }
    for (; e < hi; ++e) gate[e] = gate[e] / (1.f + std::exp(-gate[e])) * up[e];
  });
}

// h += d over count elements
void add_into(float* h, const float* d, int64_t count) {
  at::parallel_for(0, count, 1 << 15, [&](int64_t lo, int64_t hi) {
    for (int64_t e = lo; e < hi; ++e) h[e] += d[e];
  });
}

// Write the new keys/values, then attend over sequence i's blocks.
template <typename C>
void attend(const Step& st, const float* q, const float* k, const float* v, C* kc, C* vc, float* out) {
  const int64_t row = st.Hkv * st.D;
  at::parallel_for(0, st.n, grain(2 * row), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t e = 0; e < row; ++e) {
        from_float(k[i * row + e], kc + st.slots[i] * row + e);
        from_float(v[i * row + e], vc + st.slots[i] * row + e);
      }
  });
  attend_cached(st, q, kc, vc, out);
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "fused decode: ", name, " must be contiguous fp32");
}

// Outputs per block of a B stack (fused_lora.LORA_BLOCK): one AVX-512 register, two AVX2 ones.
constexpr int64_t LORA_BLOCK = 16;

// One matrix's LoRA stacks and the output its deltas go to. A [S, R, K]; B [S, NB, R, 16]: for each block of 16
// outputs (NB = ceil(N / 16), the last zero-padded) the R ranks' 16 values in a row, so a row's delta reads B
// front to back once. The adapter's scale is folded into B; ranks are zero-padded to the largest R; zeros for an
// adapter that does not touch this matrix. Both fp32 or both fp16 (widened in registers). Empty A: no adapter
// touches the matrix.
struct LoraTerm {
  const at::Tensor& A;
  const at::Tensor& B;
  float* y;  // [M, N]
  int64_t N;
};

// y[n0 + j] += sum_r t[r] * blk[r * 16 + j] for the j < count (at most 16) outputs of one block of B
template <typename V>
inline void lora_block(const float* t, const V* blk, int64_t R, float* y, int64_t count) {
  float acc[LORA_BLOCK];
#if defined(__AVX512F__)
  __m512 a = _mm512_setzero_ps();
  for (int64_t r = 0; r < R; ++r) a = _mm512_fmadd_ps(_mm512_set1_ps(t[r]), load16(blk + r * LORA_BLOCK), a);
  if (count == LORA_BLOCK) {
    _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), a));
    return;
  }
  _mm512_storeu_ps(acc, a);
#elif defined(__AVX2__)
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (int64_t r = 0; r < R; ++r) {
    const __m256 tr = _mm256_set1_ps(t[r]);
    lo = _mm256_fmadd_ps(tr, load8(blk + r * LORA_BLOCK), lo);
    hi = _mm256_fmadd_ps(tr, load8(blk + r * LORA_BLOCK + 8), hi);
  }
  if (count == LORA_BLOCK) {
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), lo));
    _mm256_storeu_ps(y + 8, _mm256_add_ps(_mm256_loadu_ps(y + 8), hi));
    return;
  }
  _mm256_storeu_ps(acc, lo);
  _mm256_storeu_ps(acc + 8, hi);
#else
  for (int64_t j = 0; j < LORA_BLOCK; ++j) acc[j] = 0.f;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < LORA_BLOCK; ++j) acc[j] += t[r] * to_float(blk[r * LORA_BLOCK + j]);
#endif
  for (int64_t j = 0; j < count; ++j) y[j] += acc[j];
}

// The LoRA deltas of the matrices that read the same input x [M, K] (q/k/v, gate/up, or one matrix), each row with
// its own adapter: y[i, :] += B[s]^T (A[s] x[i, :]) for s = slot[i] >= 0. Two loops: the rank products t (the
// extra work of the group's GEMV loop, products()), then, once the GEMV has written y, the output blocks
// (add_outputs(): on the step's team where it holds one, else a region, inline when the work is small).
class LoraDeltas {
 public:
  LoraDeltas(const float* x, int64_t M, int64_t K, std::initializer_list<LoraTerm> group, const int64_t* slot)
      : x_(x), M_(M), K_(K), slot_(slot) {
    int64_t adapted = 0;
    for (int64_t i = 0; i < M; ++i) adapted += slot[i] >= 0;
    if (adapted == 0) return;
    for (const LoraTerm& g : group) {
      if (g.A.numel() == 0) continue;
      const auto dtype = g.A.scalar_type();
      TORCH_CHECK((dtype == at::kFloat || dtype == at::kHalf) && g.B.scalar_type() == dtype && g.A.is_contiguous() &&
                      g.B.is_contiguous(),
                  "fused decode: LoRA stacks must be contiguous, both fp32 or both fp16");
      const int64_t S = g.A.size(0), R = g.A.size(1), NB = (g.N + LORA_BLOCK - 1) / LORA_BLOCK;
      TORCH_CHECK(g.A.dim() == 3 && g.A.size(2) == K && g.B.dim() == 4 && g.B.size(0) == S && g.B.size(1) == NB &&
                      g.B.size(2) == R && g.B.size(3) == LORA_BLOCK,
                  "fused decode: LoRA stacks must be A [S, R, ", K, "] and B [S, ", NB, ", R, ", LORA_BLOCK, "]");
      for (int64_t i = 0; i < M; ++i) TORCH_CHECK(slot[i] < S, "fused decode: adapter slot ", slot[i], " out of ", S);
      terms_.push_back({g.A.data_ptr(), g.B.data_ptr(), dtype == at::kHalf, R, g.N, NB, ts_, blocks_, g.y});
      ts_ += M * R;
      blocks_ += NB;
      work_ = std::max(work_, LORA_BLOCK * R * adapted);
    }
    t_.assign(ts_, 0.f);
  }

  // The rank products as extra work of a one-row GEMV group whose rows cost `row` bytes each (an fp16 A row is 2K).
  Extra products(int64_t row) {
    if (ts_ == 0) return {};
    const int64_t bytes = (terms_[0].half ? 2 : 4) * K_;
    return {ts_, std::max<int64_t>(1, (bytes + row / 2) / std::max<int64_t>(row, 1)),
            std::max<int64_t>(1, 32768 / K_),  // ~32k multiply-adds a task on its own
            [this](int64_t lo, int64_t hi) { rank_products(lo, hi); }};
  }

  // Each block of 16 outputs of every term: per adapted row, the R ranks' values of the block (rows sharing an
  // adapter re-read it from cache) summed in registers, then added to the row's outputs once.
  void add_outputs() {
    if (blocks_ == 0) return;
    llmspeed_team::team_for(blocks_, std::max<int64_t>(1, 32768 / work_), [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const Term& g = terms_[term_of(c, true)];
        const int64_t nb = c - g.c0, from = nb * LORA_BLOCK, count = std::min(g.N - from, LORA_BLOCK);
        for (int64_t i = 0; i < M_; ++i) {
          if (slot_[i] < 0) continue;
          const float* ti = t_.data() + g.t0 + i * g.R;
          const int64_t off = (slot_[i] * g.NB + nb) * g.R * LORA_BLOCK;
          if (g.half) lora_block(ti, static_cast<const f16*>(g.b) + off, g.R, g.y + i * g.N + from, count);
          else lora_block(ti, static_cast<const float*>(g.b) + off, g.R, g.y + i * g.N + from, count);
        }
      }
    });
  }

 private:
  struct Term {
    const void* a;
    const void* b;
    bool half;
    int64_t R, N, NB, t0, c0;  // rank, outputs, output blocks, offset in t, first output block
    float* y;
  };

  size_t term_of(int64_t j, bool by_block) const {  // the term that owns rank product j, or output block j
    size_t g = 0;
    while (g + 1 < terms_.size() && (by_block ? terms_[g + 1].c0 : terms_[g + 1].t0) <= j) ++g;
    return g;
  }

  // t[t0 + i * R + r] = A[slot[i], r] x[i] for the rows that have an adapter, lo <= j < hi
  void rank_products(int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const Term& g = terms_[term_of(j, false)];
      const int64_t i = (j - g.t0) / g.R, r = (j - g.t0) % g.R;
      if (slot_[i] < 0) continue;
      const int64_t off = (slot_[i] * g.R + r) * K_;
      t_[j] = g.half ? dot(x_ + i * K_, static_cast<const f16*>(g.a) + off, K_, false)
                     : dot(x_ + i * K_, static_cast<const float*>(g.a) + off, K_, false);
    }
  }

  const float* x_;
  int64_t M_, K_;
  const int64_t* slot_;
  std::vector<Term> terms_;
  int64_t ts_ = 0, blocks_ = 0, work_ = 0;
  std::vector<float> t_;
};

}  // namespace

// ln1, ln2, q bias, k bias, v bias, q norm, k norm (Qwen3's per-head RMSNorm, fp32 [head_dim]), then
// (weight, scale, zero) for q, k, v, o, gate, up, down (see linear(); empty tensors where a format has no
// scale or zero, and for absent biases and norms)
constexpr int64_t FIRST_MATRIX = 7;
constexpr int64_t PER_LAYER = FIRST_MATRIX + 3 * 7;
enum Matrix { Q, K_, V, O, GATE, UP, DOWN };

namespace {

// The tensors of one model snapshot (fused_decode.py's _Snapshot), held here so that a decode step does not
// convert a list of some 900 Python tensors into C++ on every call, with the data pointers and dtypes of
// the model tensors they were read from: a moved or cast parameter shows up as a changed pointer or dtype.
struct Held {
  std::vector<at::Tensor> weights, lm_head, lora, sources, versioned;
  std::vector<std::pair<const void*, at::ScalarType>> layout;  // of sources, when held
  std::vector<int64_t> versions;  // of versioned, when held
  std::vector<int64_t> slot_ends;  // versioned is slot by slot: slot s's tensors end at slot_ends[s]
};

std::mutex held_mutex;
std::unordered_map<int64_t, std::shared_ptr<const Held>> held_sets;
int64_t next_handle = 1;

std::shared_ptr<const Held> held(int64_t handle) {
  std::lock_guard<std::mutex> lock(held_mutex);
  auto it = held_sets.find(handle);
  TORCH_CHECK(it != held_sets.end(), "fused decode: no held weights with handle ", handle, " (released?)");
  return it->second;
}

}  // namespace

// Hold a snapshot's tensors (weights: PER_LAYER per layer; lm_head: weight, scale, zero; lora: empty or 14
// per layer; sources: the model tensors to watch; versioned: the tensors the lora stacks were copied from, whose
// in-place changes must be seen, slot by slot, slot s's ending at slot_ends[s]); returns the handle decode_step
// takes.
int64_t hold(std::vector<at::Tensor> weights, std::vector<at::Tensor> lm_head, std::vector<at::Tensor> lora,
             std::vector<at::Tensor> sources, std::vector<at::Tensor> versioned, std::vector<int64_t> slot_ends) {
  int64_t last = 0;
  for (int64_t end : slot_ends) {
    TORCH_CHECK(end >= last, "fused decode: slot_ends must not decrease");
    last = end;
  }
  TORCH_CHECK(last == (int64_t)versioned.size(), "fused decode: slot_ends must end at the ", versioned.size(),
              " versioned tensors, not ", last);
  auto set = std::make_shared<Held>();
  set->slot_ends = std::move(slot_ends);
  for (const auto& t : sources) set->layout.emplace_back(t.const_data_ptr(), t.scalar_type());
  for (const auto& t : versioned) set->versions.push_back(t._version());
  set->versioned = std::move(versioned);
  set->weights = std::move(weights);
  set->lm_head = std::move(lm_head);
  set->lora = std::move(lora);
  set->sources = std::move(sources);
  std::lock_guard<std::mutex> lock(held_mutex);
  held_sets.emplace(next_handle, std::move(set));
  return next_handle++;
}

// Drop a held snapshot (a step already running keeps its own reference until it returns).
void release(int64_t handle) {
  std::lock_guard<std::mutex> lock(held_mutex);
  held_sets.erase(handle);
}

// Whether every watched model tensor still has the data pointer and dtype it had when held, and every versioned
// tensor of the adapter slots a step reads (slots) its version: a few hundred LoRA tensors an adapter, read here
// in one loop, where the CPU overlaps their cache misses, instead of one Python attribute read each after the
// step's weights have pushed them out of the cache. Slots no row reads are not checked: their stacks may be
// stale until a step reads them, and that step sees it.
bool held_current(int64_t handle, std::vector<int64_t> slots) {
  const auto set = held(handle);
  const int64_t S = set->slot_ends.size();
  for (int64_t s : slots) {
    TORCH_CHECK(s >= 0 && s < S, "fused decode: adapter slot ", s, " is not one of the ", S, " held");
    for (int64_t i = s ? set->slot_ends[s - 1] : 0; i < set->slot_ends[s]; ++i)
      if (set->versioned[i]._version() != set->versions[i]) return false;
  }
  // const_data_ptr(): the pointer without data_ptr()'s mutable-access path (its copy-on-write checks); this runs
  // before every step, over every source tensor
  for (size_t i = 0; i < set->sources.size(); ++i) {
    const at::Tensor& t = set->sources[i];
    if (t.const_data_ptr() != set->layout[i].first || t.scalar_type() != set->layout[i].second) return false;
  }
  return true;
}

// hidden [n, E] fp32 embeddings -> logits [r, V] fp32 of the rows in logit_rows (int64 [r], increasing; empty:
// every row). The held tensors (hold()): weights, PER_LAYER tensors per layer (fp32 norms and biases, matrices
// as in linear()); lm_head, (weight, scale, zero) likewise. key/value cache [L, NB, BS, Hkv, D]; blocks [n, W]
// and context [n] per row: a row attends over the first context[i] positions of its block table, after every
// row's key and value are written (rows of one prompt chunk share a table, each seeing up to its own position).
// lora: empty, or (A, B) stacks (see LoraTerm) for q, k, v, o, gate, up, down of every layer (14 per layer);
// adapter_slot int64 [n]: the stack index of each row's adapter, -1 for none.
// amx_rows: from this many rows up (0: never) the matrices run on AMX tiles where the CPU has them.
// Called with the GIL released (decode_step, greedy_steps).
static at::Tensor step_rows(const at::Tensor& hidden, int64_t handle, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& slots, const at::Tensor& blocks,
                            const at::Tensor& context, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& norm, int64_t num_heads, double eps, double scale,
                            const at::Tensor& adapter_slot, int64_t amx_rows, const at::Tensor& act8,
                            const at::Tensor& logit_rows) {
  const auto set = held(handle);
  const std::vector<at::Tensor>& weights = set->weights;
  const std::vector<at::Tensor>& lm_head = set->lm_head;
  const std::vector<at::Tensor>& lora = set->lora;
  check_f32(hidden, "hidden");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  check_f32(norm, "norm");
  TORCH_CHECK(weights.size() % PER_LAYER == 0, "fused decode: ", PER_LAYER, " weight tensors per layer");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous() && key_cache.dim() == 5,
              "fused decode: caches must be contiguous [L, NB, BS, Hkv, D]");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "fused decode: key/value cache dtypes differ");
  for (const auto* t : {&slots, &blocks, &context})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "fused decode: index tensors must be int64");
  const int64_t layers = weights.size() / PER_LAYER, n = hidden.size(0), E = hidden.size(1);
  TORCH_CHECK(key_cache.size(0) == layers, "fused decode: cache has ", key_cache.size(0), " layers, weights ", layers);
  Step st{n, num_heads, key_cache.size(3), key_cache.size(4), key_cache.size(2), blocks.size(1),
          slots.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(), context.data_ptr<int64_t>(),
          static_cast<float>(scale)};
  TORCH_CHECK(cos.size(0) == n && cos.size(1) == st.D, "fused decode: cos/sin must be [n, head_dim]");
  const int64_t I = weights[FIRST_MATRIX + 3 * GATE].size(0), qw = st.H * st.D, kvw = st.Hkv * st.D;
  const int64_t layer_stride = key_cache[0].numel();
  const bool has_lora = !lora.empty();
  TORCH_CHECK(!has_lora || (int64_t)lora.size() == layers * 14, "fused decode: lora needs 14 tensors per layer");
  TORCH_CHECK(!has_lora || (adapter_slot.scalar_type() == at::kLong && adapter_slot.is_contiguous() &&
                            adapter_slot.numel() == n), "fused decode: adapter_slot must be int64 [n]");
  const int64_t* slot_of = has_lora ? adapter_slot.data_ptr<int64_t>() : nullptr;
  TORCH_CHECK(act8.numel() == 0 || (act8.scalar_type() == at::kBool && act8.is_contiguous() && act8.numel() == layers * 7 + 1),
              "fused decode: act8 must be empty or bool [layers * 7 + 1]");
  const bool* int8_acts = act8.numel() ? act8.data_ptr<bool>() : nullptr;
  TORCH_CHECK(logit_rows.numel() == 0 || (logit_rows.scalar_type() == at::kLong && logit_rows.is_contiguous()),
              "fused decode: logit_rows must be empty or int64");
  for (int64_t i = 1; i < logit_rows.numel(); ++i)
    TORCH_CHECK(logit_rows.data_ptr<int64_t>()[i] > logit_rows.data_ptr<int64_t>()[i - 1],
                "fused decode: logit_rows must be increasing");

  at::Tensor logits;
  auto run = [&]() {
    at::Tensor h = hidden.clone();  // residual stream [n, E]
    std::vector<float> x(n * E), q(n * qw), k(n * kvw), v(n * kvw), att(n * qw), tmp(n * E), gate(n * I), up(n * I);
    float* hp = h.data_ptr<float>();
    auto add_into_h = [&]() { add_into(hp, tmp.data(), n * E); };
    const int64_t rows[7] = {qw, kvw, kvw, E, I, I, E};

    for (int64_t l = 0; l < layers; ++l) {
      const at::Tensor* w = &weights[l * PER_LAYER];
      check_f32(w[0], "input norm");
      check_f32(w[1], "post-attention norm");
      for (int j = 0; j < 7; ++j)
        TORCH_CHECK(w[FIRST_MATRIX + 3 * j].dim() == 2 && w[FIRST_MATRIX + 3 * j].size(0) == rows[j], "fused decode: layer ",
                    l, " matrix ", j, " has ", w[FIRST_MATRIX + 3 * j].size(0), " rows, expected ", rows[j]);
      auto mat = [&](Matrix j, const at::Tensor& bias, float* y) {
        const at::Tensor* m = w + FIRST_MATRIX + 3 * j;
        return linear(m[0], m[1], m[2], bias, y, int8_acts && int8_acts[l * 7 + j]);
      };
      auto term = [&](Matrix j, float* y) { return LoraTerm{lora[l * 14 + 2 * j], lora[l * 14 + 2 * j + 1], y, rows[j]}; };
      // a GEMV group and, with adapters, its LoRA deltas: the rank products (inside the group's loop for one row,
      // where a product and a weight row both cost their bytes; for more rows a weight row costs its rows'
      // arithmetic, and the products split evenly in a loop of their own), then the outputs
      auto group = [&](const float* in, int64_t K, std::vector<Linear> mats, std::initializer_list<LoraTerm> terms) {
        if (!has_lora) return gemv_group(in, n, K, std::move(mats), amx_rows);
        LoraDeltas deltas(in, n, K, terms, slot_of);
        const Extra extra = deltas.products(row_bytes(mats[0], K));
        if (n > 1) run_extra(&extra);
        gemv_group(in, n, K, std::move(mats), amx_rows, n > 1 ? nullptr : &extra);
        deltas.add_outputs();
      };
      rms_norm(hp, w[0].data_ptr<float>(), n, E, eps, x.data());
      group(x.data(), E, {mat(Q, w[2], q.data()), mat(K_, w[3], k.data()), mat(V, w[4], v.data())},
            {term(Q, q.data()), term(K_, k.data()), term(V, v.data())});
      if (w[5].numel() > 0) {  // per-head q/k norms (Qwen3), before the rotary embedding
        check_f32(w[5], "q norm");
        check_f32(w[6], "k norm");
        TORCH_CHECK(w[5].numel() == st.D && w[6].numel() == st.D, "fused decode: q/k norms must be [head_dim]");
        rms_norm(q.data(), w[5].data_ptr<float>(), n * st.H, st.D, eps, q.data());
        rms_norm(k.data(), w[6].data_ptr<float>(), n * st.Hkv, st.D, eps, k.data());
      }
      rope(q.data(), n, st.H, st.D, cos.data_ptr<float>(), sin.data_ptr<float>());
      rope(k.data(), n, st.Hkv, st.D, cos.data_ptr<float>(), sin.data_ptr<float>());
      if (key_cache.scalar_type() == at::kBFloat16) {
        attend(st, q.data(), k.data(), v.data(), key_cache.data_ptr<bf16>() + l * layer_stride,
               value_cache.data_ptr<bf16>() + l * layer_stride, att.data());
      } else if (key_cache.scalar_type() == at::kHalf) {
        attend(st, q.data(), k.data(), v.data(), key_cache.data_ptr<f16>() + l * layer_stride,
               value_cache.data_ptr<f16>() + l * layer_stride, att.data());
      } else {
        TORCH_CHECK(key_cache.scalar_type() == at::kFloat, "fused decode: cache must be fp32, bf16 or fp16");
        attend(st, q.data(), k.data(), v.data(), key_cache.data_ptr<float>() + l * layer_stride,
               value_cache.data_ptr<float>() + l * layer_stride, att.data());
      }
      group(att.data(), qw, {mat(O, at::Tensor(), tmp.data())}, {term(O, tmp.data())});
      add_into_h();
      rms_norm(hp, w[1].data_ptr<float>(), n, E, eps, x.data());
      group(x.data(), E, {mat(GATE, at::Tensor(), gate.data()), mat(UP, at::Tensor(), up.data())},
            {term(GATE, gate.data()), term(UP, up.data())});
      silu_mul(gate.data(), up.data(), n * I);
      group(gate.data(), I, {mat(DOWN, at::Tensor(), tmp.data())}, {term(DOWN, tmp.data())});
      add_into_h();
    }
    // the final norm and the head, on the rows whose logits are wanted (every row when logit_rows is empty)
    int64_t r = n;
    if (logit_rows.numel() > 0) {
      r = logit_rows.numel();
      const int64_t* keep = logit_rows.data_ptr<int64_t>();
      for (int64_t i = 0; i < r; ++i) {
        TORCH_CHECK(keep[i] >= 0 && keep[i] < n, "fused decode: logit row ", keep[i], " is outside the ", n, " rows");
        std::memmove(hp + i * E, hp + keep[i] * E, E * sizeof(float));  // keep is increasing: i <= keep[i]
      }
    }
    rms_norm(hp, norm.data_ptr<float>(), r, E, eps, x.data());
    TORCH_CHECK(lm_head.size() == 3, "fused decode: lm_head is (weight, scale, zero)");
    logits = at::empty({r, lm_head[0].size(0)}, hidden.options());
    gemv_group(x.data(), r, E, {linear(lm_head[0], lm_head[1], lm_head[2], at::Tensor(), logits.data_ptr<float>(),
                                       int8_acts && int8_acts[layers * 7])}, amx_rows);
  };
  // steps of a few rows without tiles keep their threads for the whole step (step_team.h), their LoRA deltas included
  const bool team = llmspeed_team::available() && g_step_team && n < TEAM_ROWS &&
                    at::get_num_threads() > 1 && !(amx_rows > 0 && n >= amx_rows && llmspeed_amx::usable());
  if (team) {
    llmspeed_team::Team::lead(at::get_num_threads(), run);
  } else {
    run();
  }
  return logits;
}

// One step (step_rows) with the GIL released, so that other Python threads (a server's event loop) run meanwhile.
at::Tensor decode_step(at::Tensor hidden, int64_t handle, at::Tensor key_cache, at::Tensor value_cache,
                       at::Tensor slots, at::Tensor blocks, at::Tensor context, at::Tensor cos, at::Tensor sin,
                       at::Tensor norm, int64_t num_heads, double eps, double scale, at::Tensor adapter_slot,
                       int64_t amx_rows, at::Tensor act8, at::Tensor logit_rows) {
  pybind11::gil_scoped_release no_gil;
  return step_rows(hidden, handle, key_cache, value_cache, slots, blocks, context, cos, sin, norm, num_heads, eps,
                   scale, adapter_slot, amx_rows, act8, logit_rows);
}

namespace {

// Rows ids [n] of the input embedding as fp32 out [n, E], with the operations of the embedding module's own
// lookup, so the same bits: a float table [V, E] (fp32 or bf16, widened; scale and zero empty), int8 codes [V, E]
// times row scales [V] (group 0), or 4-bit codes [V, Kp / 2] with fp16 group scales and, for int4, zeros (NF4:
// none) [V, Kp / group] (dequant_rows.h), cut to E columns.
void embed_rows(const at::Tensor& table, const at::Tensor& scale, const at::Tensor& zero, int64_t group,
                const int64_t* ids, int64_t n, int64_t E, float* out) {
  const int64_t V = table.size(0);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(ids[i] >= 0 && ids[i] < V, "greedy steps: token ", ids[i], " is outside the vocabulary of ", V);
  if (table.scalar_type() == at::kFloat) {
    for (int64_t i = 0; i < n; ++i) std::memcpy(out + i * E, table.data_ptr<float>() + ids[i] * E, E * sizeof(float));
  } else if (table.scalar_type() == at::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) {
      const bf16* row = table.data_ptr<bf16>() + ids[i] * E;
      for (int64_t j = 0; j < E; ++j) out[i * E + j] = static_cast<float>(row[j]);
    }
  } else if (table.scalar_type() == at::kChar) {
    for (int64_t i = 0; i < n; ++i)
      dequant_int8_rows(table.data_ptr<int8_t>(), scale.data_ptr<float>(), E, ids[i], ids[i] + 1, out + i * E);
  } else {
    TORCH_CHECK(table.scalar_type() == at::kByte && group > 0 && group % 16 == 0,
                "greedy steps: the embedding must be fp32, bf16, int8 or 4-bit codes in groups of 16");
    const int64_t Kp = table.size(1) * 2;
    std::vector<float> row(Kp);
    for (int64_t i = 0; i < n; ++i) {
      dequant_4bit_rows(table.data_ptr<uint8_t>(), half_data(scale), zero.numel() ? half_data(zero) : nullptr,
                        Kp, group, ids[i], ids[i] + 1, row.data());
      std::memcpy(out + i * E, row.data(), E * sizeof(float));
    }
  }
}

// The index of the largest of x [V]: the first one on ties, the first NaN if there is one (NumPy's argmax, which
// the sampler's greedy rows take).
int64_t argmax(const float* x, int64_t V) {
  int64_t best = 0;
  for (int64_t j = 0; j < V; ++j) {
    if (std::isnan(x[j])) return j;
    if (x[j] > x[best]) best = j;
  }
  return best;
}

}  // namespace

// steps decode steps of n rows back to back, each row's argmax token the next step's input, with nothing but the
// step's inputs made between them: ids and positions int64 [n] (the first step's tokens and their positions),
// blocks [n, W] holding every position up to positions + steps - 1; rope_cos / rope_sin fp32 [P, D], the rows of
// positions 0..P-1; the embedding as embed_rows reads it; the rest as in decode_step. Returns the tokens, int64
// [steps, n], and the seconds from the call's start at which each step's tokens were known, fp64 [steps]. Runs with
// the GIL released.
std::tuple<at::Tensor, at::Tensor> greedy_steps(
    at::Tensor ids, int64_t handle, at::Tensor key_cache, at::Tensor value_cache, at::Tensor blocks,
    at::Tensor positions, at::Tensor rope_cos, at::Tensor rope_sin, at::Tensor embed, at::Tensor embed_scale,
    at::Tensor embed_zero, int64_t embed_group, at::Tensor norm, int64_t num_heads, double eps, double scale,
    at::Tensor adapter_slot, int64_t amx_rows, at::Tensor act8, int64_t steps) {
  pybind11::gil_scoped_release no_gil;
  const auto start = std::chrono::steady_clock::now();
  for (const auto* t : {&ids, &positions, &blocks})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "greedy steps: ids, positions and blocks must be int64");
  check_f32(rope_cos, "rope_cos");
  check_f32(rope_sin, "rope_sin");
  check_f32(norm, "norm");
  TORCH_CHECK(steps >= 1, "greedy steps: steps must be >= 1; got ", steps);
  TORCH_CHECK(rope_cos.dim() == 2 && rope_sin.sizes() == rope_cos.sizes(), "greedy steps: rope tables must be [P, D]");
  TORCH_CHECK(embed.dim() == 2 && embed.is_contiguous(), "greedy steps: the embedding must be a contiguous [V, ...] table");
  const int64_t n = ids.numel(), E = norm.numel(), D = rope_cos.size(1), W = blocks.size(1), BS = key_cache.size(2);
  TORCH_CHECK(positions.numel() == n && blocks.dim() == 2 && blocks.size(0) == n, "greedy steps: ids, positions and blocks disagree on rows");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* table = blocks.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t last = pos[i] + steps - 1;
    TORCH_CHECK(pos[i] >= 0 && last < rope_cos.size(0), "greedy steps: position ", last, " is past the rope tables");
    TORCH_CHECK(last / BS < W, "greedy steps: row ", i, "'s block table does not reach position ", last);
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor hidden = at::empty({n, E}, f32), cos = at::empty({n, D}, f32), sin = at::empty({n, D}, f32);
  at::Tensor slots = at::empty({n}, i64), context = at::empty({n}, i64), every = at::empty({0}, i64);
  at::Tensor tokens = at::empty({steps, n}, i64), known = at::empty({steps}, at::TensorOptions().dtype(at::kDouble));
  std::vector<int64_t> cur(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + n);
  for (int64_t s = 0; s < steps; ++s) {
    embed_rows(embed, embed_scale, embed_zero, embed_group, cur.data(), n, E, hidden.data_ptr<float>());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = pos[i] + s;
      std::memcpy(cos.data_ptr<float>() + i * D, rope_cos.data_ptr<float>() + p * D, D * sizeof(float));
      std::memcpy(sin.data_ptr<float>() + i * D, rope_sin.data_ptr<float>() + p * D, D * sizeof(float));
      slots.data_ptr<int64_t>()[i] = table[i * W + p / BS] * BS + p % BS;
      context.data_ptr<int64_t>()[i] = p + 1;
    }
    const at::Tensor logits = step_rows(hidden, handle, key_cache, value_cache, slots, blocks, context, cos, sin,
                                        norm, num_heads, eps, scale, adapter_slot, amx_rows, act8, every);  // [n, V]
    const int64_t V = logits.size(1);
    for (int64_t i = 0; i < n; ++i) cur[i] = tokens.data_ptr<int64_t>()[s * n + i] = argmax(logits.data_ptr<float>() + i * V, V);
    known.data_ptr<double>()[s] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return {tokens, known};
}

// Decode attention read in place from one layer's paged cache (the generic path's decode kernel):
// q [n, H, D] fp32, key/value [NB, BS, Hkv, D] fp32, bf16 or fp16, tables [n, W] int64, lens [n] int64 -> [n, H, D].
at::Tensor paged_decode(at::Tensor q, at::Tensor key, at::Tensor value, at::Tensor tables, at::Tensor lens, double scale) {
  check_f32(q, "query");
  TORCH_CHECK(key.is_contiguous() && value.is_contiguous() && key.dim() == 4 && key.sizes() == value.sizes(),
              "paged decode: key/value must be contiguous [NB, BS, Hkv, D] of one shape");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "paged decode: key/value cache dtypes differ");
  for (const auto* t : {&tables, &lens})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "paged decode: tables and lens must be int64");
  const int64_t n = q.size(0);
  TORCH_CHECK(tables.size(0) == n && lens.size(0) == n && q.size(2) == key.size(3), "paged decode: shapes disagree");
  Step st{n, q.size(1), key.size(2), key.size(3), key.size(1), tables.size(1), nullptr, tables.data_ptr<int64_t>(),
          lens.data_ptr<int64_t>(), static_cast<float>(scale)};
  auto out = at::empty_like(q);
  if (key.scalar_type() == at::kBFloat16)
    attend_cached(st, q.data_ptr<float>(), key.data_ptr<bf16>(), value.data_ptr<bf16>(), out.data_ptr<float>());
  else if (key.scalar_type() == at::kHalf)
    attend_cached(st, q.data_ptr<float>(), key.data_ptr<f16>(), value.data_ptr<f16>(), out.data_ptr<float>());
  else {
    TORCH_CHECK(key.scalar_type() == at::kFloat, "paged decode: the cache must be fp32, bf16 or fp16");
    attend_cached(st, q.data_ptr<float>(), key.data_ptr<float>(), value.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}

// y [M, N] = x [M, K] @ dequantized w [N, K]^T, w as in linear(): the decode GEMV alone (tests, benchmarks),
// on AMX tiles from amx_rows rows up (0: never), with int8 activations when act8.
at::Tensor gemv(at::Tensor x, at::Tensor w, at::Tensor scale, at::Tensor zero, int64_t amx_rows, bool act8) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2, "gemv: x must be [M, K]");
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  gemv_group(x.data_ptr<float>(), x.size(0), x.size(1), {linear(w, scale, zero, at::Tensor(), y.data_ptr<float>(), act8)},
             amx_rows);
  return y;
}

// Set whether the float row loop prefetches weight rows ahead (g_float_prefetch); returns the previous setting.
bool float_prefetch(bool on) {
  const bool was = g_float_prefetch;
  g_float_prefetch = on;
  return was;
}

// Set whether steps of a few rows hold a team of threads (g_step_team); returns the previous setting.
bool step_team(bool on) {
  const bool was = g_step_team;
  g_step_team = on;
  return was;
}

// Set whether torch_gemm widens bf16 weights to fp32 (g_upcast_bf16); returns the previous setting.
bool upcast_bf16(bool on) {
  const bool was = g_upcast_bf16;
  g_upcast_bf16 = on;
  return was;
}

// Rows from which prompt-sized steps run their matrices as GEMMs (TORCH_GEMM_ROWS), for fused_decode.py's policy.
int64_t gemm_rows() { return TORCH_GEMM_ROWS; }

// Whether the GEMV groups can run on AMX tiles in this process (a CPU and build with AMX-BF16, granted by the OS).
bool amx_usable() { return llmspeed_amx::usable(); }

// Whether int4 / int8 rows with int8 activations multiply integer codes in this build (VNNI or AVX2).
bool vnni_usable() { return vnni_compiled(); }
