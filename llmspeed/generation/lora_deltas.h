// LoRA adapters inside the fused decode step (fused_lora.py stacks them): each row of a step with its own
// adapter, y += B[s] (A[s] x), the rank products as extra work of the GEMV group's loop (gemv_group.h). Rows
// that share an adapter are taken together, so that each adapter value loaded serves all of them.
// Included by decode_cpu.cpp alone: its definitions sit in that one translation unit's anonymous namespace.
#pragma once

#include "gemv_group.h"  // Extra (and hsum, through gemv_rows.h)
#include "cpu_vec.h"  // load8 / load16: fp32 or fp16 to fp32 registers
#include "step_team.h"  // team_for

#include <torch/extension.h>
#include <algorithm>
#include <initializer_list>
#include <type_traits>
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

// Most rows of one adapter that the grouped loops below carry in registers at once.
constexpr int LORA_ROWS = 4;

// The C rows of one adapter together: y_c[j] += sum_r t_c[r] * blk[r * 16 + j], each B value loaded (and
// widened from fp16) once for the C rows
template <int C, typename V>
inline void lora_block_rows(const float* const* t, const V* blk, int64_t R, float* const* y, int64_t count) {
  float acc[C][LORA_BLOCK];
#if defined(__AVX512F__)
  __m512 a[C];
  for (int c = 0; c < C; ++c) a[c] = _mm512_setzero_ps();
  for (int64_t r = 0; r < R; ++r) {
    const __m512 b = load16(blk + r * LORA_BLOCK);
    for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(_mm512_set1_ps(t[c][r]), b, a[c]);
  }
  if (count == LORA_BLOCK) {
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(y[c], _mm512_add_ps(_mm512_loadu_ps(y[c]), a[c]));
    return;
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc[c], a[c]);
#elif defined(__AVX2__)
  __m256 lo[C], hi[C];
  for (int c = 0; c < C; ++c) lo[c] = hi[c] = _mm256_setzero_ps();
  for (int64_t r = 0; r < R; ++r) {
    const __m256 bl = load8(blk + r * LORA_BLOCK), bh = load8(blk + r * LORA_BLOCK + 8);
    for (int c = 0; c < C; ++c) {
      const __m256 tr = _mm256_set1_ps(t[c][r]);
      lo[c] = _mm256_fmadd_ps(tr, bl, lo[c]);
      hi[c] = _mm256_fmadd_ps(tr, bh, hi[c]);
    }
  }
  if (count == LORA_BLOCK) {
    for (int c = 0; c < C; ++c) {
      _mm256_storeu_ps(y[c], _mm256_add_ps(_mm256_loadu_ps(y[c]), lo[c]));
      _mm256_storeu_ps(y[c] + 8, _mm256_add_ps(_mm256_loadu_ps(y[c] + 8), hi[c]));
    }
    return;
  }
  for (int c = 0; c < C; ++c) {
    _mm256_storeu_ps(acc[c], lo[c]);
    _mm256_storeu_ps(acc[c] + 8, hi[c]);
  }
#else
  for (int c = 0; c < C; ++c)
    for (int64_t j = 0; j < LORA_BLOCK; ++j) acc[c][j] = 0.f;
  for (int64_t r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      for (int64_t j = 0; j < LORA_BLOCK; ++j) acc[c][j] += t[c][r] * to_float(blk[r * LORA_BLOCK + j]);
#endif
  for (int c = 0; c < C; ++c)
    for (int64_t j = 0; j < count; ++j) y[c][j] += acc[c][j];
}

// out[c] = sum_k x_c[k] * w[k] for the C rows x_c of one adapter: each value of the A row w loaded (and widened)
// once for the C rows; each row's sum in the order of gemv_rows.h's dot, whatever C is
template <int C, typename W>
inline void dot_ptrs(const float* const* x, const W* w, int64_t K, float* out) {
  int64_t k = 0;
  float s[C] = {};
#if defined(__AVX512F__)
  __m512 a0[C], a1[C];
  for (int c = 0; c < C; ++c) a0[c] = a1[c] = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = load16(w + k), w1 = load16(w + k + 16);
    for (int c = 0; c < C; ++c) {
      a0[c] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[c] + k), a0[c]);
      a1[c] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[c] + k + 16), a1[c]);
    }
  }
  for (int c = 0; c < C; ++c) s[c] = _mm512_reduce_add_ps(_mm512_add_ps(a0[c], a1[c]));
#elif defined(__AVX2__)
  __m256 a0[C], a1[C];
  for (int c = 0; c < C; ++c) a0[c] = a1[c] = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = load8(w + k), w1 = load8(w + k + 8);
    for (int c = 0; c < C; ++c) {
      a0[c] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[c] + k), a0[c]);
      a1[c] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[c] + k + 8), a1[c]);
    }
  }
  for (int c = 0; c < C; ++c) s[c] = hsum(_mm256_add_ps(a0[c], a1[c]));
#endif
  for (; k < K; ++k) {
    const float wk = to_float(w[k]);
    for (int c = 0; c < C; ++c) s[c] += x[c][k] * wk;
  }
  for (int c = 0; c < C; ++c) out[c] = s[c];
}

// The LoRA deltas of the matrices that read the same input x [M, K] (q/k/v, gate/up, or one matrix), each row with
// its own adapter: y[i, :] += B[s]^T (A[s] x[i, :]) for s = slot[i] >= 0. The rows are taken in packs of up to
// LORA_ROWS rows that share an adapter, so each adapter value a step loads serves every row of its pack. Two
// loops: the rank products t (the extra work of the group's GEMV loop, products()), then, once the GEMV has
// written y, the output blocks (add_outputs(): on the step's team where it holds one, else a region, inline when
// the work is small).
class LoraDeltas {
 public:
  LoraDeltas(const float* x, int64_t M, int64_t K, std::initializer_list<LoraTerm> group, const int64_t* slot)
      : x_(x), K_(K) {
    std::vector<bool> taken(M, false);
    for (int64_t i = 0; i < M; ++i) {  // packs: the rows of each adapter in order, LORA_ROWS at most a pack
      if (slot[i] < 0 || taken[i]) continue;
      Pack p{slot[i], 0, {}};
      for (int64_t j = i; j < M; ++j) {
        if (slot[j] != slot[i] || taken[j]) continue;
        taken[j] = true;
        p.row[p.size++] = j;
        if (p.size == LORA_ROWS) {
          packs_.push_back(p);
          p.size = 0;
        }
      }
      if (p.size > 0) packs_.push_back(p);
    }
    if (packs_.empty()) return;
    int64_t adapted = 0;
    for (const Pack& p : packs_) adapted += p.size;
    const int64_t P = packs_.size();
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
      terms_.push_back({g.A.data_ptr(), g.B.data_ptr(), dtype == at::kHalf, R, g.N, NB, ts_, products_, blocks_, g.y});
      ts_ += M * R;
      products_ += P * R;
      blocks_ += NB;
      work_ = std::max(work_, LORA_BLOCK * R * adapted);
    }
    t_.assign(ts_, 0.f);
  }

  // The rank products as extra work of a one-row GEMV group whose rows cost `row` bytes each (an fp16 A row is 2K).
  Extra products(int64_t row) {
    if (products_ == 0) return {};
    const int64_t bytes = (terms_[0].half ? 2 : 4) * K_;
    return {products_, std::max<int64_t>(1, (bytes + row / 2) / std::max<int64_t>(row, 1)),
            std::max<int64_t>(1, 32768 / K_),  // ~32k multiply-adds a task on its own
            [this](int64_t lo, int64_t hi) { rank_products(lo, hi); }};
  }

  // Each block of 16 outputs of every term: per pack, the R ranks' values of the block loaded once and summed in
  // registers for the pack's rows, then added to each row's outputs once.
  void add_outputs() {
    if (blocks_ == 0) return;
    llmspeed_team::team_for(blocks_, std::max<int64_t>(1, 32768 / work_), [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const Term& g = terms_[term_of(c, Index::BLOCK)];
        const int64_t nb = c - g.c0, from = nb * LORA_BLOCK, count = std::min(g.N - from, LORA_BLOCK);
        for (const Pack& p : packs_) {
          const float* t[LORA_ROWS];
          float* y[LORA_ROWS];
          for (int k = 0; k < p.size; ++k) {
            t[k] = t_.data() + g.t0 + p.row[k] * g.R;
            y[k] = g.y + p.row[k] * g.N + from;
          }
          const int64_t off = (p.slot * g.NB + nb) * g.R * LORA_BLOCK;
          by_size(p.size, [&](auto C) {
            constexpr int rows = decltype(C)::value;
            if (g.half) lora_block_rows<rows>(t, static_cast<const f16*>(g.b) + off, g.R, y, count);
            else lora_block_rows<rows>(t, static_cast<const float*>(g.b) + off, g.R, y, count);
          });
        }
      }
    });
  }

 private:
  struct Term {
    const void* a;
    const void* b;
    bool half;
    int64_t R, N, NB, t0, p0, c0;  // rank, outputs, output blocks, offsets in t, of the products, of the blocks
    float* y;
  };
  struct Pack {  // up to LORA_ROWS rows with the same adapter slot
    int64_t slot;
    int size;
    int64_t row[LORA_ROWS];
  };
  enum class Index { PRODUCT, BLOCK };

  // f(std::integral_constant<int, size>) for a pack of 1..LORA_ROWS rows
  template <typename F>
  static void by_size(int size, const F& f) {
    switch (size) {
      case 1: return f(std::integral_constant<int, 1>());
      case 2: return f(std::integral_constant<int, 2>());
      case 3: return f(std::integral_constant<int, 3>());
      default: return f(std::integral_constant<int, LORA_ROWS>());
    }
  }

  size_t term_of(int64_t j, Index kind) const {  // the term that owns rank product j, or output block j
    size_t g = 0;
    while (g + 1 < terms_.size() && (kind == Index::BLOCK ? terms_[g + 1].c0 : terms_[g + 1].p0) <= j) ++g;
    return g;
  }

  // for lo <= j < hi, j = (term, pack, rank r): t[t0 + i * R + r] = A[slot, r] x[i] for the rows i of the pack
  void rank_products(int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const Term& g = terms_[term_of(j, Index::PRODUCT)];
      const Pack& p = packs_[(j - g.p0) / g.R];
      const int64_t r = (j - g.p0) % g.R, off = (p.slot * g.R + r) * K_;
      const float* x[LORA_ROWS];
      float out[LORA_ROWS];
      for (int k = 0; k < p.size; ++k) x[k] = x_ + p.row[k] * K_;
      by_size(p.size, [&](auto C) {
        constexpr int rows = decltype(C)::value;
        if (g.half) dot_ptrs<rows>(x, static_cast<const f16*>(g.a) + off, K_, out);
        else dot_ptrs<rows>(x, static_cast<const float*>(g.a) + off, K_, out);
      });
      for (int k = 0; k < p.size; ++k) t_[g.t0 + p.row[k] * g.R + r] = out[k];
    }
  }

  const float* x_;
  int64_t K_;
  std::vector<Pack> packs_;
  std::vector<Term> terms_;
  int64_t ts_ = 0, products_ = 0, blocks_ = 0, work_ = 0;
  std::vector<float> t_;
};

}  // namespace
