// A GEMV group of the fused decode step: the matrices that read the same input (q/k/v, gate/up, or one), their
// rows one parallel range (row loops: gemv_rows.h), or, for prompt-sized steps, torch's GEMM, AMX tiles
// (amx_tiles.h) or the int8-activation panels (q4_panels.h, q8_panels.h); with extra work (the LoRA rank
// products) sharing the loop.
// Included by decode_cpu.cpp alone: its definitions sit in that one translation unit's anonymous namespace.
#pragma once

#include "gemv_rows.h"  // Linear and the row loops
#include "amx_tiles.h"  // the AMX tile matmul (shared with the amx kernel): GEMV groups of many rows
#include "q4_panels.h"  // int4 x int8 activations for prompt-sized steps (AVX2, AVX-512 VNNI)
#include "q8_panels.h"  // int8 x int8 activations for prompt-sized steps (AVX-512 VNNI)
#include "dequant_rows.h"  // packed rows widened to fp32 for the GEMM of prompt-sized steps
#include "step_team.h"  // team_for: the loops of a step that holds its threads

#include <torch/extension.h>
#include <functional>
#include <memory>
#include <vector>

namespace {

// y = x . w^T (+ bias) of one linear on AMX tiles (see amx_tiles.h); false when this build or layout has
// no tile path (no AMX, or 4-bit groups that are not whole 32-code tile steps).
bool amx_linear(const float* x, int64_t M, int64_t K, const Linear& l) {
#ifdef LLMSPEED_AMX
  using namespace llmspeed_amx;
  const int64_t Kp = round_up(K, TK);
  switch (l.kind) {
    case Kind::F32: amx_matmul(x, M, K, Kp, l.N, true, true, F32Rows{static_cast<const float*>(l.w), l.N, K}, nullptr, l.y); break;
    case Kind::BF16: amx_matmul(x, M, K, Kp, l.N, true, false, BF16Rows{static_cast<const uint16_t*>(l.w), l.N, K}, nullptr, l.y); break;
    case Kind::I8:
      if (l.hscale) return false;  // group-wise int8: the row loop
      amx_matmul(x, M, K, Kp, l.N, true, false, Int8Rows{static_cast<const int8_t*>(l.w), l.N, K}, l.scale, l.y);
      break;
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
  return l.act8 && vnni_compiled() && ((l.kind == Kind::I8 && !l.hscale) || (l.kind == Kind::INT4 && l.G % 32 == 0));
}
// Whether the row loop multiplies this group-wise int8 layer's codes by int8 activation codes (int8_groups.h).
bool i8g_code_rows(const Linear& l) { return l.act8 && l.kind == Kind::I8 && l.hscale; }
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
    if (l.kind == Kind::I8 && !l.hscale) {
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
        if (l.hscale) dequant_int8_group_rows(codes, l.hscale, K, l.G, n0 + lo, n0 + hi, out + lo * K);
        else dequant_int8_rows(codes, l.scale, K, n0 + lo, n0 + hi, out + lo * K);
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
    case Kind::I8: return l.hscale ? K + 2 * K / l.G : K;  // codes (and an fp16 scale per group)
    default: return K / 2 + 4 * K / std::max<int64_t>(l.G, 1);  // codes, fp16 scale and zero per group
  }
}

// Every matrix of the group reads the same x [M, K] (as q * d where it has int8 activations); all their
// rows form one parallel range. From ``amx_rows`` rows up (0: never; fp32 weights, which take a split and
// three tile products, from twice as many) each matrix is one AMX tile matmul instead, where the CPU has
// tiles. In the row loop, int8 weights and int4 weights with groups of whole 32-code blocks multiply int8
// activation codes on VNNI (or AVX2) where the layer has int8 activations (q4_int8.h), and group-wise int8 weights
// do on AVX2 (int8_groups.h).
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
    if (l.act8 && xq.empty() && (tiles_wanted || !vnni_rows(l) && !i8g_code_rows(l))) {
      xq.resize(M * K);
      act_round(x, M, K, xq.data());
    }
    l.x = l.act8 && !xq.empty() ? xq.data() : x;
  }
  if (tiles_wanted) {
    bool tiles = true;
    for (const auto& l : group)
      tiles = tiles && (l.kind != Kind::INT4 && l.kind != Kind::NF4 || l.G % 32 == 0) &&
              (l.kind != Kind::F32 || M >= 2 * amx_rows) && !(l.kind == Kind::I8 && l.hscale);
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
    if (i8g_code_rows(l)) {  // the codes in order, shared by the group's matrices alike
      for (const auto& o : group)
        if (o.codes) l.codes = o.codes;
      if (!l.codes) l.codes = std::make_shared<ActCodes>(act_quant(x, M, K));
      continue;
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
          else if (l.codes) gemv_rows_i8g_codes(M, K, l, lo, hi);
          else if (l.hscale) gemv_rows_i8g(l.x, M, K, l, lo, hi);
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

}  // namespace
