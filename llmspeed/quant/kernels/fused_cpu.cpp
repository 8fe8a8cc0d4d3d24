// Fused dequantize + matmul for llmspeed's packed layouts (see llmspeed/quant/primitives.py).
// y[m, n] = sum_k x[m, k] * w[n, k], with w rebuilt from codes in registers, never in memory.
// Rows n are split across torch's intra-op threads; M rows of x are processed in tiles of MT so
// each weight chunk is decoded once per tile. AVX2/FMA when compiled for it, portable loops otherwise.
#include "q4_tiles.h"  // NF4, hsum, deinterleave, group_sums, q4_tile (shared with the fused decode step)
#include "q4_int8.h"   // int8 activations: act_round (shared with the fused decode step)


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


template <bool NF>
static torch::Tensor q4_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                               torch::Tensor zeros, int64_t G) {
  x = x.contiguous();
  const int64_t M = x.numel() / x.size(-1), N = qweight.size(0), Kp = qweight.size(1) * 2, groups = Kp / G;
  auto xd = deinterleave(x, Kp);  // [M, Kp]
  torch::Tensor xs;  // [M, groups] sums of x per group (for the zero-point term)
  if (!NF) xs = group_sums(xd, G);
  auto y = output_like(x, N);
  const float* xp = xd.data_ptr<float>();
  const float* xsp = NF ? nullptr : xs.data_ptr<float>();
  const uint8_t* wp = qweight.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = NF ? nullptr : zeros.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = wp + n * (Kp / 2);
      const float* sr = sp + n * groups;
      const float* zr = NF ? nullptr : zp + n * groups;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4)
        q4_tile<4, NF>(xp + m * Kp, Kp, wr, Kp, G, sr, zr, NF ? nullptr : xsp + m * groups, groups, yp + m * N + n, N);
      for (; m < M; ++m)
        q4_tile<1, NF>(xp + m * Kp, Kp, wr, Kp, G, sr, zr, NF ? nullptr : xsp + m * groups, groups, yp + m * N + n, N);
    }
  });
  return y;
}

torch::Tensor int4_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t group) {
  return q4_matmul<false>(x, qweight, scales, zeros, group);
}

torch::Tensor nf4_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, int64_t group) {
  return q4_matmul<true>(x, qweight, scales, scales, group);
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

bool has_avx2() {
#ifdef __AVX2__
  return true;
#else
  return false;
#endif
}
