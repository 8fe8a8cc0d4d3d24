// LoRA adapters inside the fused decode step (fused_lora.py stacks them): each row of a step with its own
// adapter, y += B[s] (A[s] x), the rank products as extra work of the GEMV group's loop (gemv_group.h).
// Included by decode_cpu.cpp alone: its definitions sit in that one translation unit's anonymous namespace.
#pragma once

#include "gemv_group.h"  // dot, Extra
#include "cpu_vec.h"  // load8 / load16: fp32 or fp16 to fp32 registers
#include "step_team.h"  // team_for

#include <torch/extension.h>
#include <algorithm>
#include <initializer_list>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

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
