// Fused dequantize + matmul for llmspeed's packed layouts (see llmspeed/quant/primitives.py).
// y[m, n] = sum_k x[m, k] * w[n, k], with w rebuilt from codes in registers, never in memory.
// Rows n are split across torch's intra-op threads; M rows of x are processed in tiles of MT so
// each weight chunk is decoded once per tile. AVX2/FMA when compiled for it, portable loops otherwise.
#include "q4_tiles.h"  // NF4, hsum, deinterleave, group_sums, q4_tile (shared with the fused decode step)
#include "q4_int8.h"   // int8 activations: act_round (shared with the fused decode step)
#include "q4_panels.h"  // int4 x int8 activations for prompt-sized M (AVX2, AVX-512 VNNI)
#include "q8_panels.h"  // int8 x int8 activations for prompt-sized M (AVX-512 VNNI)
#include "dequant_rows.h"  // packed rows widened to fp32 (shared with the fused decode step)
#include "int8_groups.h"  // group-wise int8 (GGUF's Q8_0): dot products and rows (shared with the fused decode step)
#include "gptq_columns.h"  // GPTQ's column loop (llmspeed/quant/methods/gptq.py), bound here to share the build


// ---------------------------------------------------------------- int8, per-row scale
// C independent FMA chains per row of x hide the FMA latency (C = 4 for one row, 2 for a tile of 4).
template <int MT>
static void int8_tile(const float* x, int64_t ldx, const int8_t* w, int64_t K, float s, float* y, int64_t ldy) {
  constexpr int C = MT == 1 ? 4 : 2;
  int64_t k = 0;
  float acc_tail[MT];
  for (int i = 0; i < MT; ++i) acc_tail[i] = 0.f;
#ifdef __AVX2__
  __m256 a[MT][C];
  for (int i = 0; i < MT; ++i)
    for (int c = 0; c < C; ++c) a[i][c] = _mm256_setzero_ps();
  for (; k + 8 * C <= K; k += 8 * C) {
    __m256 wv[C];
    for (int c = 0; c < C; c += 2) {
      __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 8 * c));
      wv[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
      wv[c + 1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
    }
    for (int i = 0; i < MT; ++i)
      for (int c = 0; c < C; ++c) a[i][c] = _mm256_fmadd_ps(wv[c], _mm256_loadu_ps(x + i * ldx + k + 8 * c), a[i][c]);
  }
  for (int i = 0; i < MT; ++i) {
    __m256 t = a[i][0];
    for (int c = 1; c < C; ++c) t = _mm256_add_ps(t, a[i][c]);
    acc_tail[i] = hsum(t);
  }
#endif
  for (; k < K; ++k)
    for (int i = 0; i < MT; ++i) acc_tail[i] += x[i * ldx + k] * static_cast<float>(w[k]);
  for (int i = 0; i < MT; ++i) y[i * ldy] = acc_tail[i] * s;
}

// x may have any leading dims ([..., K], fp32); y is [..., N]. Saves Python-side reshapes per call.
static torch::Tensor output_like(const torch::Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return torch::empty(sizes, x.options());
}

torch::Tensor int8_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales) {
  x = x.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K, N = qweight.size(0);
  auto y = output_like(x, N);
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) int8_tile<4>(xp + m * K, K, wp + n * K, K, sp[n], yp + m * N + n, N);
      for (; m < M; ++m) int8_tile<1>(xp + m * K, K, wp + n * K, K, sp[n], yp + m * N + n, N);
    }
  });
  return y;
}

// Group-wise int8: qweight [N, K] int8, scales fp16 [N, ceil(K / G)] (int8_groups.h); rows of y split over threads.
torch::Tensor int8_group_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, int64_t G) {
  x = x.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K, N = qweight.size(0), groups = (K + G - 1) / G;
  TORCH_CHECK(qweight.scalar_type() == torch::kChar && qweight.is_contiguous() && qweight.size(1) == K && G > 0 &&
                  G % 16 == 0, "int8_group_matmul: qweight must be contiguous int8 [N, K] and G a multiple of 16");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == groups,
              "int8_group_matmul: scales must be fp16 [N, ceil(K / G)]");
  auto y = output_like(x, N);
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const half_t* sp = half_data(scales);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float t[4];
    for (int64_t n = n0; n < n1; ++n) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {
        i8g_dot_rows<4>(xp + m * K, K, wp + n * K, K, G, sp + n * groups, t);
        for (int i = 0; i < 4; ++i) yp[(m + i) * N + n] = t[i];
      }
      for (; m < M; ++m) i8g_dot_rows<1>(xp + m * K, K, wp + n * K, K, G, sp + n * groups, yp + m * N + n);
    }
  });
  return y;
}

// codes [R, K] int8 times their group scales fp16 [R, ceil(K / G)], fp32 [R, K] (primitives.dequantize_int8).
torch::Tensor dequantize_int8_groups(torch::Tensor codes, torch::Tensor scales, int64_t G) {
  TORCH_CHECK(codes.scalar_type() == torch::kChar && codes.dim() == 2 && codes.is_contiguous() && G > 0,
              "dequantize_int8_groups: codes must be contiguous int8 [R, K]");
  const int64_t R = codes.size(0), K = codes.size(1);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == R && scales.size(1) == (K + G - 1) / G,
              "dequantize_int8_groups: scales must be fp16 [R, ceil(K / G)]");
  auto out = torch::empty({R, K}, codes.options().dtype(torch::kFloat));
  const int8_t* c = codes.data_ptr<int8_t>();
  const half_t* sc = half_data(scales);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, R, 8, [&](int64_t lo, int64_t hi) {
    dequant_int8_group_rows(c, sc, K, G, lo, hi, o + lo * K);  // rows lo..hi: sc from row 0, out from row lo
  });
  return out;
}

template <bool NF>
static torch::Tensor q4_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                               torch::Tensor zeros, int64_t G) {
  x = x.contiguous();
  const int64_t M = x.numel() / x.size(-1), N = qweight.size(0), Kp = qweight.size(1) * 2;
  auto xd = deinterleave(x, Kp, G);  // [M, Kp]
  torch::Tensor xs;  // [M, groups] sums of x per group (for the zero-point term)
  if (!NF) xs = group_sums(xd, G);
  auto y = output_like(x, N);
  const float* xp = xd.data_ptr<float>();
  const float* xsp = NF ? nullptr : xs.data_ptr<float>();
  const uint8_t* wp = qweight.data_ptr<uint8_t>();
  const half_t* sp = half_data(scales);
  const half_t* zp = NF ? nullptr : half_data(zeros);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    q4_row_range<NF>(xp, xsp, M, wp, sp, zp, nullptr, Kp, G, yp, N, n0, n1);
  });
  return y;
}

torch::Tensor int4_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t group) {
  return q4_matmul<false>(x, qweight, scales, zeros, group);
}

torch::Tensor nf4_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, int64_t group) {
  return q4_matmul<true>(x, qweight, scales, scales, group);
}

// int4 weights x int8 activations (x already on the int8 grid of its layer, or any fp32: its codes are taken
// again) for prompt-sized M: q4_panels.h. Built where the CPU has AVX2 or AVX-512 VNNI (panel_gemm_built()).
torch::Tensor int4_matmul_i8(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t G) {
#ifdef LLMSPEED_PANELS
  x = x.contiguous();
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "int4_matmul_i8: x must be fp32");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, N = qweight.size(0), Kp = qweight.size(1) * 2;
  TORCH_CHECK(G > 0 && G % ACT_BLOCK == 0 && Kp % G == 0 && K <= Kp, "int4_matmul_i8: groups must be multiples of 32 that split Kp");
  auto y = output_like(x, N);
  q4_panel_gemm(x.data_ptr<float>(), M, K, qweight.data_ptr<uint8_t>(), N, Kp, G, half_data(scales),
                half_data(zeros), y.data_ptr<float>());
  return y;
#else
  TORCH_CHECK(false, "int4_matmul_i8: not built for this CPU (needs AVX2 or AVX-512 VNNI)");
  return x;
#endif
}

// int8 weights [N, K] with row scales x int8 activations (x as above) for prompt-sized M: q8_panels.h. Built
// where the CPU has AVX-512 VNNI (int8_panels_built()).
torch::Tensor int8_matmul_i8(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales) {
#ifdef LLMSPEED_Q8_PANELS
  x = x.contiguous();
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "int8_matmul_i8: x must be fp32");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K && scales.numel() == N, "int8_matmul_i8: weights [N, K] and N scales");
  auto y = output_like(x, N);
  q8_panel_gemm(x.data_ptr<float>(), M, K, qweight.data_ptr<int8_t>(), N, scales.data_ptr<float>(), y.data_ptr<float>());
  return y;
#else
  TORCH_CHECK(false, "int8_matmul_i8: not built for this CPU (needs AVX-512 VNNI)");
  return x;
#endif
}

bool int8_panels_built() {
#ifdef LLMSPEED_Q8_PANELS
  return true;
#else
  return false;
#endif
}

bool panel_gemm_built() {
#ifdef LLMSPEED_PANELS
  return true;
#else
  return false;
#endif
}

// quantize_activations(x) for contiguous fp32 x [..., K]: see q4_int8.h (act_round).
torch::Tensor quantize_activations(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() >= 1,
              "quantize_activations: x must be contiguous fp32");
  auto out = torch::empty_like(x);
  const int64_t K = x.size(-1);
  act_round(x.data_ptr<float>(), K ? x.numel() / K : 0, K, out.data_ptr<float>());
  return out;
}

// ---------------------------------------------------------------- dequantize (for the fp32 GEMM of long prompts)
// The rows of a packed 4-bit weight as fp32 [R, Kp] in one pass (dequant_rows.h): int4 (c - z) * s, NF4
// NF4[c] * s (zeros empty), the same bits as primitives.dequantize_int4 / dequantize_nf4.
torch::Tensor dequantize_4bit(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t G) {
  const bool nf = zeros.numel() == 0;
  TORCH_CHECK(qweight.scalar_type() == torch::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              "dequantize_4bit: qweight must be contiguous uint8 [R, Kp / 2]");
  const int64_t R = qweight.size(0), Kp = qweight.size(1) * 2;
  TORCH_CHECK(G > 0 && G % 16 == 0 && Kp % G == 0, "dequantize_4bit: groups must be multiples of 16 that split Kp");
  const int64_t groups = Kp / G;
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && scales.numel() == R * groups,
              "dequantize_4bit: scales must be contiguous fp16 [R, groups]");
  TORCH_CHECK(nf || (zeros.scalar_type() == torch::kHalf && zeros.is_contiguous() && zeros.numel() == R * groups),
              "dequantize_4bit: zeros must be contiguous fp16 [R, groups] (empty for NF4)");
  auto out = torch::empty({R, Kp}, qweight.options().dtype(torch::kFloat));
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const half_t* sc = half_data(scales);
  const half_t* ze = nf ? nullptr : half_data(zeros);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, R, 8, [&](int64_t lo, int64_t hi) { dequant_4bit_rows(q, sc, ze, Kp, G, lo, hi, o + lo * Kp); });
  return out;
}

// codes [R, K] int8 times their row scales, fp32 [R, K] in one pass (primitives.dequantize_int8).
torch::Tensor dequantize_int8(torch::Tensor codes, torch::Tensor scales) {
  TORCH_CHECK(codes.scalar_type() == torch::kChar && codes.dim() == 2 && codes.is_contiguous(),
              "dequantize_int8: codes must be contiguous int8 [R, K]");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() && scales.numel() == codes.size(0),
              "dequantize_int8: scales must be contiguous fp32 [R]");
  const int64_t R = codes.size(0), K = codes.size(1);
  auto out = torch::empty({R, K}, codes.options().dtype(torch::kFloat));
  const int8_t* c = codes.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, R, 8, [&](int64_t lo, int64_t hi) { dequant_int8_rows(c, sc, K, lo, hi, o + lo * K); });
  return out;
}

bool has_avx2() {
#ifdef __AVX2__
  return true;
#else
  return false;
#endif
}
