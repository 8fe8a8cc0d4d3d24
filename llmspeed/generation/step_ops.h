// The fused decode step's elementwise work between its GEMV groups: RMSNorm, the rotary embedding, SiLU(gate) * up,
// the residual add, and the paged-KV write before attention (paged_attention.h).
// Included by decode_cpu.cpp alone: its definitions sit in that one translation unit's anonymous namespace.
#pragma once

#include "cpu_vec.h"  // vector loads and stores of fp32
#include "paged_attention.h"  // Step and attend_cached: attention over the paged KV cache

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

namespace {

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

// rotate-half rotary embedding on the first R dimensions of `heads` heads (D wide) of each row; cos/sin [M, R].
// R < D is a partial rotary embedding (Phi-4-mini's partial_rotary_factor): the last D - R dimensions pass as they are
void rope(float* x, int64_t M, int64_t heads, int64_t D, int64_t R, const float* cos, const float* sin) {
  const int64_t half = R / 2;
  at::parallel_for(0, M, grain(heads * D), [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m)
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + (m * heads + h) * D;
        const float* c = cos + m * R;
        const float* s = sin + m * R;
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

#if defined(__AVX2__)
// The butterflies of distances 1, 2 and 4 within one register of 8 values (the 8 x 8 Sylvester Hadamard matrix,
// unscaled): each stage adds a lane's partner (a permute) to the lower lane and subtracts it at the upper one.
inline __m256 hadamard8(__m256 a) {
  __m256 t = _mm256_permute_ps(a, 0xB1);  // lanes 1 0 3 2 ...
  a = _mm256_blend_ps(_mm256_add_ps(a, t), _mm256_sub_ps(t, a), 0xAA);
  t = _mm256_permute_ps(a, 0x4E);  // lanes 2 3 0 1 ...
  a = _mm256_blend_ps(_mm256_add_ps(a, t), _mm256_sub_ps(t, a), 0xCC);
  t = _mm256_permute2f128_ps(a, a, 0x01);  // the two halves swapped
  return _mm256_blend_ps(_mm256_add_ps(a, t), _mm256_sub_ps(t, a), 0xF0);
}
#endif

// Each block of g values of each of the M rows of x [M, K] times the g x g Sylvester Hadamard matrix over sqrt(g)
// (quant/hadamard.py's rotate: the input of a layer quantized with QuantConfig.hadamard), in place: log2(g)
// butterfly stages of sums and differences, then the scale. g a power of two dividing K. The stages commute (the
// matrix is a Kronecker product of 2 x 2 ones), so with AVX2 the three within a register of 8 go first, in
// registers, then the stages across registers; the sums differ from the matmul's only in rounding order.
void hadamard_groups(float* x, int64_t M, int64_t K, int64_t g) {
  const float s = 1.f / std::sqrt(static_cast<float>(g));
  at::parallel_for(0, M * (K / g), grain(g * 8), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      float* v = x + b * g;
#if defined(__AVX2__)
      if (g % 8 == 0) {
        const __m256 scale = _mm256_set1_ps(s);
        if (g == 8) {
          _mm256_storeu_ps(v, _mm256_mul_ps(hadamard8(_mm256_loadu_ps(v)), scale));
          continue;
        }
        for (int64_t j = 0; j < g; j += 8) _mm256_storeu_ps(v + j, hadamard8(_mm256_loadu_ps(v + j)));
        for (int64_t h = 8; h < g; h *= 2) {
          const bool last = 2 * h == g;  // the last stage scales as it stores
          for (int64_t i = 0; i < g; i += 2 * h)
            for (int64_t j = i; j < i + h; j += 8) {
              const __m256 a = _mm256_loadu_ps(v + j), c = _mm256_loadu_ps(v + j + h);
              const __m256 sum = _mm256_add_ps(a, c), diff = _mm256_sub_ps(a, c);
              _mm256_storeu_ps(v + j, last ? _mm256_mul_ps(sum, scale) : sum);
              _mm256_storeu_ps(v + j + h, last ? _mm256_mul_ps(diff, scale) : diff);
            }
        }
        continue;
      }
#endif
      for (int64_t h = 1; h < g; h *= 2)
        for (int64_t i = 0; i < g; i += 2 * h)
          for (int64_t j = i; j < i + h; ++j) {
            const float a = v[j], c = v[j + h];
            v[j] = a + c;
            v[j + h] = a - c;
          }
      for (int64_t j = 0; j < g; ++j) v[j] *= s;
    }
  });
}

// h += d over count elements
void add_into(float* h, const float* d, int64_t count) {
  at::parallel_for(0, count, 1 << 15, [&](int64_t lo, int64_t hi) {
    for (int64_t e = lo; e < hi; ++e) h[e] += d[e];
  });
}

// Write the new keys/values, then attend over sequence i's blocks. An fp16 cache refuses, before writing, a
// key or value it would round to infinity (|x| >= 65520): every score or output reading it would be NaN.
template <typename C>
void attend(const Step& st, const float* q, const float* k, const float* v, C* kc, C* vc, float* out) {
  const int64_t row = st.Hkv * st.D;
  if constexpr (std::is_same_v<C, f16>) {
    float big = 0.f;
    for (int64_t e = 0; e < st.n * row; ++e) big = std::max(big, std::max(std::abs(k[e]), std::abs(v[e])));
    TORCH_CHECK_VALUE(big < 65520.f, "kv_cache_dtype='fp16' cannot hold a key or value of magnitude ", big,
                      " (fp16's largest is 65504; it would be stored as inf): use kv_cache_dtype='bf16' or 'fp32'");
  }
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

}  // namespace
