// Fused decode step for Llama-family decoder stacks on CPU (driven by fused_decode.py).
//
// One call runs every layer for n rows (tokens: one per sequence in a decode step, or whole prompt chunks in a
// mixed step): RMSNorm, the q/k/v GEMVs (one parallel region over all their rows), rotary embedding, the
// paged-KV write, attention over each row's blocks, o_proj + residual, RMSNorm, gate/up GEMVs, SiLU(gate) * up,
// down_proj + residual, then the final norm and the vocabulary projection of the sampled rows. The residual
// stream stays in fp32;
// weights are fp32, bf16, weight-only int8 with one scale per output row or per group (llmspeed's Int8Linear) or
// packed 4-bit int4/NF4 (Int4Linear/NF4Linear: q4_tile from the header shared with the quantized matmul,
// llmspeed/quant/kernels/q4_tiles.h), widened to fp32 in registers; the KV cache is fp32, bf16 or fp16.
//
// Decode at small batch is bound by reading the weights once, so the GEMV streams each weight row
// from memory once (software prefetch 4 KiB ahead) and reuses it from L1 for the n rows of x (gemv_rows.h).
// Rows of all matrices of one GEMV group (gemv_group.h) are split over torch's intra-op threads with
// at::parallel_for (this file is built with -fopenmp; see llmspeed/cpp_build.py), or, in steps of a few
// rows, over the team of threads the step holds (step_team.h). The work between the groups is in step_ops.h,
// per-row LoRA adapters in lora_deltas.h, and the snapshots' tensors held between steps in held_weights.h; this
// file is the step itself and the functions Python calls.
//
// greedy_steps runs several decode steps of the same rows back to back, each row's argmax token the next step's
// input (its embedding row, rotary rows and cache slot made here), for the generator's greedy bursts.
#include "gemv_group.h"  // Linear, linear() and gemv_group: the matrices of a step (gemv_rows.h: the row loops)
#include "step_ops.h"  // RMSNorm, rotary embedding, SiLU * up, residual add, the paged-KV write and attention
#include "lora_deltas.h"  // LoraTerm and LoraDeltas: per-row LoRA adapters
#include "held_weights.h"  // hold, release, held_current: the snapshots' tensors between steps
#include "step_team.h"  // Team: the threads one decode step holds from start to end

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

// Whether steps of fewer than TEAM_ROWS rows hold a team of threads for the whole step (step_team.h) instead of
// opening an OpenMP region per parallel loop; the same results either way (step_team() sets it, for tests and
// A/B timing).
bool g_step_team = true;
// Below this many rows a step's elementwise loops (norms, rotary, SiLU, residual adds) run on one thread anyway
// (their grains), so only its GEMV groups and attention are parallel: those steps hold a team.
constexpr int64_t TEAM_ROWS = 16;

}  // namespace

// ln1, ln2, q bias, k bias, v bias, q norm, k norm (Qwen3's per-head RMSNorm, fp32 [head_dim]), then
// (weight, scale, zero) for q, k, v, o, gate, up, down (see linear(); empty tensors where a format has no
// scale or zero, and for absent biases and norms)
constexpr int64_t FIRST_MATRIX = 7;
constexpr int64_t PER_LAYER = FIRST_MATRIX + 3 * 7;
enum Matrix { Q, K_, V, O, GATE, UP, DOWN };

// hidden [n, E] fp32 embeddings -> logits [r, V] fp32 of the rows in logit_rows (int64 [r], increasing; empty:
// every row). The held tensors (hold()): weights, PER_LAYER tensors per layer (fp32 norms and biases, matrices
// as in linear()); lm_head, (weight, scale, zero) likewise. key/value cache [L, NB, BS, Hkv, D]; blocks [n, W]
// and context [n] per row: a row attends over the first context[i] positions of its block table, after every
// row's key and value are written (rows of one prompt chunk share a table, each seeing up to its own position).
// lora: empty, or (A, B) stacks (see LoraTerm) for q, k, v, o, gate, up, down of every layer (14 per layer);
// adapter_slot int64 [n]: the stack index of each row's adapter, -1 for none.
// amx_rows: from this many rows up (0: never) the matrices run on AMX tiles where the CPU has them.
// flags: empty, or uint8 [layers * 7 + 1], per matrix then the head: 1 reads its input as int8 codes, 2 its input
// is rotated within its groups first (hadamard_groups; not the head; q/k/v, and gate/up, which read one input,
// agree on it: fused_snapshot.py checks).
// Called with the GIL released (decode_step, greedy_steps).
static at::Tensor step_rows(const at::Tensor& hidden, int64_t handle, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& slots, const at::Tensor& blocks,
                            const at::Tensor& context, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& norm, int64_t num_heads, double eps, double scale,
                            const at::Tensor& adapter_slot, int64_t amx_rows, const at::Tensor& flags,
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
  const int64_t R = cos.size(1);  // the rotary width: head_dim, or less for a partial rotary embedding
  TORCH_CHECK(cos.size(0) == n && R <= st.D && R % 2 == 0 && sin.sizes() == cos.sizes(),
              "fused decode: cos/sin must be [n, rotary width], an even width up to head_dim");
  const int64_t I = weights[FIRST_MATRIX + 3 * GATE].size(0), qw = st.H * st.D, kvw = st.Hkv * st.D;
  const int64_t layer_stride = key_cache[0].numel();
  const bool has_lora = !lora.empty();
  TORCH_CHECK(!has_lora || (int64_t)lora.size() == layers * 14, "fused decode: lora needs 14 tensors per layer");
  TORCH_CHECK(!has_lora || (adapter_slot.scalar_type() == at::kLong && adapter_slot.is_contiguous() &&
                            adapter_slot.numel() == n), "fused decode: adapter_slot must be int64 [n]");
  const int64_t* slot_of = has_lora ? adapter_slot.data_ptr<int64_t>() : nullptr;
  TORCH_CHECK(flags.numel() == 0 || (flags.scalar_type() == at::kByte && flags.is_contiguous() && flags.numel() == layers * 7 + 1),
              "fused decode: flags must be empty or uint8 [layers * 7 + 1]");
  const uint8_t* flag = flags.numel() ? flags.data_ptr<uint8_t>() : nullptr;
  auto int8_act = [&](int64_t i) { return flag && (flag[i] & 1); };  // the matrix reads its input as int8 codes
  auto rotated = [&](int64_t i) { return flag && (flag[i] & 2); };   // ... rotated within groups
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
        return linear(m[0], m[1], m[2], bias, y, int8_act(l * 7 + j));
      };
      // matrix j is packed in a basis rotated within its groups: rotate its input [n, K] in place to match (the
      // buffer feeds only j's GEMV group, whose other matrices rotate the same way, and its adapters, whose A is
      // stacked rotated)
      auto rotate_input = [&](Matrix j, float* in, int64_t K) {
        if (!rotated(l * 7 + j)) return;
        const at::Tensor& scales = w[FIRST_MATRIX + 3 * j + 1];
        TORCH_CHECK(scales.dim() == 2 && scales.size(1) > 0 && K % scales.size(1) == 0, "fused decode: layer ", l,
                    " matrix ", j, " is rotated without group scales");
        hadamard_groups(in, n, K, K / scales.size(1));
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
      rotate_input(Q, x.data(), E);
      group(x.data(), E, {mat(Q, w[2], q.data()), mat(K_, w[3], k.data()), mat(V, w[4], v.data())},
            {term(Q, q.data()), term(K_, k.data()), term(V, v.data())});
      if (w[5].numel() > 0) {  // per-head q/k norms (Qwen3), before the rotary embedding
        check_f32(w[5], "q norm");
        check_f32(w[6], "k norm");
        TORCH_CHECK(w[5].numel() == st.D && w[6].numel() == st.D, "fused decode: q/k norms must be [head_dim]");
        rms_norm(q.data(), w[5].data_ptr<float>(), n * st.H, st.D, eps, q.data());
        rms_norm(k.data(), w[6].data_ptr<float>(), n * st.Hkv, st.D, eps, k.data());
      }
      rope(q.data(), n, st.H, st.D, R, cos.data_ptr<float>(), sin.data_ptr<float>());
      rope(k.data(), n, st.Hkv, st.D, R, cos.data_ptr<float>(), sin.data_ptr<float>());
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
      rotate_input(O, att.data(), qw);
      group(att.data(), qw, {mat(O, at::Tensor(), tmp.data())}, {term(O, tmp.data())});
      add_into_h();
      rms_norm(hp, w[1].data_ptr<float>(), n, E, eps, x.data());
      rotate_input(GATE, x.data(), E);
      group(x.data(), E, {mat(GATE, at::Tensor(), gate.data()), mat(UP, at::Tensor(), up.data())},
            {term(GATE, gate.data()), term(UP, up.data())});
      silu_mul(gate.data(), up.data(), n * I);
      rotate_input(DOWN, gate.data(), I);
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
                                       int8_act(layers * 7))}, amx_rows);
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
                       int64_t amx_rows, at::Tensor flags, at::Tensor logit_rows) {
  pybind11::gil_scoped_release no_gil;
  return step_rows(hidden, handle, key_cache, value_cache, slots, blocks, context, cos, sin, norm, num_heads, eps,
                   scale, adapter_slot, amx_rows, flags, logit_rows);
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
    at::Tensor adapter_slot, int64_t amx_rows, at::Tensor flags, int64_t steps) {
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
                                        norm, num_heads, eps, scale, adapter_slot, amx_rows, flags, every);  // [n, V]
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
