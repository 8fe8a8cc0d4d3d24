// Attention over the paged KV cache on the CPU: each query row against the keys and values its block table
// points at, up to its own context length (one row per sequence in a decode step; one per token of a prompt
// chunk, each seeing the positions up to its own, in a mixed step). Used by the fused step (decode_cpu.cpp,
// after it writes the new keys/values) and by the generic path's decode kernel (paged_decode).
//
// Each task takes one sequence and a range of its positions, and reads each cache row (all KV heads of one
// position, contiguous) once for every query head, so the cache streams from memory once per step:
//   1. scores s[h, p] = (q_h * scale) . k[p, g(h)], four query heads per horizontal reduction;
//   2. per head, m = max_p s, s = exp(s - m) (vectorized), l = sum_p s;
//   3. o_h = sum_p s[h, p] v[p, g(h)].
// A sequence's positions are split into several ranges only when there are fewer sequences than twice the
// threads (batch 1 and long contexts use both cores); the partial (m, l, o) of its ranges are then merged as
// flash-decoding does: out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c.
#pragma once

#include "cpu_vec.h"
#include "step_team.h"  // team_for: the decode step's own threads when it holds a team

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

struct Step {
  int64_t n, H, Hkv, D, BS, W;
  const int64_t* slots;    // [n]
  const int64_t* blocks;   // [n, W]
  const int64_t* context;  // [n]
  float scale;
};

namespace attn {

constexpr int64_t MIN_RANGE = 64;  // positions per task when a sequence is split over threads
constexpr int64_t AHEAD = 16;      // positions between a cache row's software prefetch and its use
constexpr int64_t TASK_COST = 8;   // a task's fixed cost, in positions, when tasks are shared out by cost

// Bring the cache lines of one head's segment (n elements of C) towards L1 ahead of use.
template <typename C>
inline void prefetch(const C* p, int64_t n) {
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(C)); b += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + b, 0, 3);
}

// A register of fp32 lanes: 16 with AVX-512, 8 with AVX2, else one float.
#if defined(__AVX512F__)
using vec = __m512;
constexpr int64_t VW = 16;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset(float a) { return _mm512_set1_ps(a); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
inline vec vloadf(const float* p) { return _mm512_loadu_ps(p); }
template <typename C>
inline vec vload(const C* p) { return load16(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline float vhmax(vec v) { return _mm512_reduce_max_ps(v); }
inline float vhsum(vec v) { return _mm512_reduce_add_ps(v); }
inline __m256 half_sum(vec a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
#elif defined(__AVX2__)
using vec = __m256;
constexpr int64_t VW = 8;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset(float a) { return _mm256_set1_ps(a); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
inline vec vloadf(const float* p) { return _mm256_loadu_ps(p); }
template <typename C>
inline vec vload(const C* p) { return load8(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline float vhmax(vec v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline float vhsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline __m256 half_sum(vec a) { return a; }
#else
using vec = float;
constexpr int64_t VW = 1;
inline vec vzero() { return 0.f; }
inline vec vset(float a) { return a; }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline vec vmax(vec a, vec b) { return std::max(a, b); }
inline vec vadd(vec a, vec b) { return a + b; }
inline vec vmin(vec a, vec b) { return std::min(a, b); }
inline vec vsub(vec a, vec b) { return a - b; }
inline vec vmul(vec a, vec b) { return a * b; }
inline vec vdiv(vec a, vec b) { return a / b; }
inline vec vloadf(const float* p) { return *p; }
template <typename C>
inline vec vload(const C* p) { return to_float(*p); }
inline void vstore(float* p, vec v) { *p = v; }
inline float vhmax(vec v) { return v; }
inline float vhsum(vec v) { return v; }
#endif

// e^x for x <= 0, lane by lane (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial in r, then
// 2^n; relative error about 1e-7). Arguments below -87 give e^-87, which no softmax sum can see.
inline vec exp_neg(vec x) {
#if defined(__AVX512F__) || defined(__AVX2__)
  x = vmax(x, vset(-87.f));
#if defined(__AVX512F__)
  vec n = _mm512_roundscale_ps(_mm512_mul_ps(x, vset(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vec r = _mm512_fnmadd_ps(n, vset(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, vset(-2.12194440e-4f), r);
#else
  vec n = _mm256_round_ps(_mm256_mul_ps(x, vset(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vec r = _mm256_fnmadd_ps(n, vset(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, vset(-2.12194440e-4f), r);
#endif
  vec p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
#if defined(__AVX512F__)
  p = vfma(p, _mm512_mul_ps(r, r), vadd(r, vset(1.f)));
  return _mm512_scalef_ps(p, n);
#else
  p = vfma(p, _mm256_mul_ps(r, r), vadd(r, vset(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
#endif
#else
  return std::exp(x);
#endif
}

// fn(p, cache row) for positions p0 <= p < p1 of sequence i, walking its block table (no division per position)
template <typename F>
inline void each_position(const Step& st, int64_t i, int64_t p0, int64_t p1, F&& fn) {
  const int64_t* table = st.blocks + i * st.W;
  int64_t b = p0 / st.BS, j = p0 % st.BS;
  for (int64_t p = p0; p < p1; ++b, j = 0)
    for (const int64_t base = table[b] * st.BS; j < st.BS && p < p1; ++j, ++p) fn(p, base + j);
}

// Four sums of DV * VW products into out[0..3], one horizontal reduction for the four.
inline void reduce4(vec a0, vec a1, vec a2, vec a3, float* out) {
#if defined(__AVX512F__) || defined(__AVX2__)
  __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(half_sum(a0), half_sum(a1)), _mm256_hadd_ps(half_sum(a2), half_sum(a3)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));  // [a0 a1 a2 a3]
#else
  out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
#endif
}

// f(std::integral_constant<int, nr>{}, h) for the heads [h0, h1) in blocks of nr <= MAX heads (MAX <= 4): each block
// size is its own instantiation, so a block's registers are fixed at compile time.
template <int MAX, typename F>
inline void head_blocks(int64_t h0, int64_t h1, F&& f) {
  for (int64_t h = h0; h < h1;) {
    const int64_t nr = std::min<int64_t>(MAX, h1 - h);
    if constexpr (MAX >= 4) {
      if (nr == 4) f(std::integral_constant<int, 4>{}, h);
    }
    if constexpr (MAX >= 3) {
      if (nr == 3) f(std::integral_constant<int, 3>{}, h);
    }
    if constexpr (MAX >= 2) {
      if (nr == 2) f(std::integral_constant<int, 2>{}, h);
    }
    if (nr == 1) f(std::integral_constant<int, 1>{}, h);
    h += nr;
  }
}

// The three passes over positions [0, len) of one range, for head dims of DV registers (D = DV * VW): the
// loops over D unroll and each head's query, and its output rows, stay in registers.
template <int DV>
struct Fixed {
  static constexpr int REGS = VW == 16 ? 32 : 16;  // AVX-512's vector registers, or AVX2's
  // heads whose outputs are summed in registers at once (with AVX2 two heads at D = 64 spill a little to L1,
  // and measured no slower than one)
  static constexpr int HR = DV <= 4 ? 4 : DV <= 8 ? 2 : 1;

  // Query heads of one group scored together, so each key row is loaded (and widened) once for them: their
  // queries and 4 positions' sums must fit the registers with one row of keys (3 heads with D = 64 on AVX-512;
  // one with AVX2).
  static constexpr int SR = (REGS - DV) / (DV + 4) >= 3 ? 3 : 1;

  // s[r * ld + at] = q_r . k[at] for NR heads (queries q + r * DV * VW) and the positions' rows k = kc + rows[at]
  // (rows: element offsets of the group's segment)
  template <int NR, typename C>
  static void scores(const float* __restrict q, const C* kc, const int64_t* rows, int64_t len, float* __restrict s,
                     int64_t ld) {
    vec qv[NR][DV];
    for (int r = 0; r < NR; ++r)
      for (int d = 0; d < DV; ++d) qv[r][d] = vloadf(q + r * DV * VW + d * VW);
    int64_t at = 0;
    for (; at + 4 <= len; at += 4) {
      const C* k[4] = {kc + rows[at], kc + rows[at + 1], kc + rows[at + 2], kc + rows[at + 3]};
      if (at + AHEAD + 4 <= len)
        for (int j = 0; j < 4; ++j) prefetch(kc + rows[at + AHEAD + j], DV * VW);
      vec a[NR][4];
      for (int r = 0; r < NR; ++r)
        for (int j = 0; j < 4; ++j) a[r][j] = vzero();
      for (int d = 0; d < DV; ++d)
        for (int j = 0; j < 4; ++j) {
          const vec kv = vload(k[j] + d * VW);
          for (int r = 0; r < NR; ++r) a[r][j] = vfma(qv[r][d], kv, a[r][j]);
        }
      for (int r = 0; r < NR; ++r) reduce4(a[r][0], a[r][1], a[r][2], a[r][3], s + r * ld + at);
    }
    for (; at < len; ++at) {
      vec a[NR];
      for (int r = 0; r < NR; ++r) a[r] = vzero();
      for (int d = 0; d < DV; ++d) {
        const vec kv = vload(kc + rows[at] + d * VW);
        for (int r = 0; r < NR; ++r) a[r] = vfma(qv[r][d], kv, a[r]);
      }
      for (int r = 0; r < NR; ++r) s[r * ld + at] = vhsum(a[r]);
    }
  }

  // The heads [h0, h1) of one group, SR (else fewer) at a time; s [H, len]
  template <typename C>
  static void scores_group(const float* q, int64_t h0, int64_t h1, const C* kc, const int64_t* rows, int64_t len,
                           float* s) {
    head_blocks<SR>(h0, h1, [&](auto nr, int64_t h) {
      scores<decltype(nr)::value>(q + h * DV * VW, kc, rows, len, s + h * len, len);
    });
  }

  // o[r * D : (r + 1) * D] = sum_at w[r * len + at] v[at] for NR <= HR heads that read the same value segment
  template <int NR, typename C>
  static void values(const float* w, const C* vc, const int64_t* rows, int64_t len, float* o) {
    vec acc[NR][DV];
    for (int r = 0; r < NR; ++r)
      for (int d = 0; d < DV; ++d) acc[r][d] = vzero();
    for (int64_t at = 0; at < len; ++at) {
      const C* v = vc + rows[at];
      if (at + AHEAD < len) prefetch(vc + rows[at + AHEAD], DV * VW);
      vec vv[DV];
      for (int d = 0; d < DV; ++d) vv[d] = vload(v + d * VW);
      for (int r = 0; r < NR; ++r) {
        const vec wr = vset(w[r * len + at]);
        for (int d = 0; d < DV; ++d) acc[r][d] = vfma(wr, vv[d], acc[r][d]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int d = 0; d < DV; ++d) vstore(o + r * DV * VW + d * VW, acc[r][d]);
  }

  // The heads [h0, h1) of one group, HR (else fewer) at a time; w [H, len], o [H, D]
  template <typename C>
  static void values_group(const float* w, int64_t h0, int64_t h1, const C* vc, const int64_t* rows, int64_t len,
                           float* o) {
    head_blocks<HR>(h0, h1, [&](auto nr, int64_t h) {
      values<decltype(nr)::value>(w + h * len, vc, rows, len, o + h * DV * VW);
    });
  }
};

// s[at] = q . k[at] and o += w[at] v[at] for any head dim D (no fixed register layout)
template <typename C>
void scores_any(const float* q, int64_t D, const C* kc, const int64_t* rows, int64_t len, float* s) {
  for (int64_t at = 0; at < len; ++at) {
    const C* k = kc + rows[at];
    vec a = vzero();
    int64_t d = 0;
    for (; d + VW <= D; d += VW) a = vfma(vloadf(q + d), vload(k + d), a);
    float sum = vhsum(a);
    for (; d < D; ++d) sum += q[d] * to_float(k[d]);
    s[at] = sum;
  }
}

template <typename C>
void values_any_dim(const float* w, int64_t D, const C* vc, const int64_t* rows, int64_t len, float* o) {
  std::memset(o, 0, D * sizeof(float));
  for (int64_t at = 0; at < len; ++at) {
    const C* v = vc + rows[at];
    const vec wv = vset(w[at]);
    int64_t d = 0;
    for (; d + VW <= D; d += VW) vstore(o + d, vfma(wv, vload(v + d), vloadf(o + d)));
    for (; d < D; ++d) o[d] += w[at] * to_float(v[d]);
  }
}

// Positions [p0, p1) of sequence i, every head: m [H], l [H], o [H, D] as in the header comment.
template <typename C>
void attend_range(const Step& st, int64_t i, int64_t p0, int64_t p1, const float* q, const C* kc, const C* vc,
                  float* m, float* l, float* o, std::vector<float>& buf, std::vector<int64_t>& rows) {
  const int64_t H = st.H, D = st.D, row = st.Hkv * D, group = H / st.Hkv, len = p1 - p0;
  buf.resize(H * D + H * len);
  rows.resize(len);
  float* qs = buf.data();  // [H, D] the queries times the softmax scale
  float* s = qs + H * D;   // [H, len] scores, then their exponentials
  for (int64_t e = 0; e < H * D; ++e) qs[e] = q[i * H * D + e] * st.scale;
  each_position(st, i, p0, p1, [&](int64_t p, int64_t slot) { rows[p - p0] = slot * row; });
  const int64_t dv = D % VW == 0 ? D / VW : 0;
  for (int64_t g = 0; g < st.Hkv; ++g) {
    const C* kg = kc + g * D;
    if (dv == 4) Fixed<4>::scores_group(qs, g * group, (g + 1) * group, kg, rows.data(), len, s);
    else if (dv == 8) Fixed<8>::scores_group(qs, g * group, (g + 1) * group, kg, rows.data(), len, s);
    else
      for (int64_t h = g * group; h < (g + 1) * group; ++h) scores_any(qs + h * D, D, kg, rows.data(), len, s + h * len);
  }
  for (int64_t h = 0; h < H; ++h) {
    float* sh = s + h * len;
    vec mv = vset(-INFINITY);
    int64_t p = 0;
    for (; p + VW <= len; p += VW) mv = vmax(mv, vloadf(sh + p));
    float mx = vhmax(mv);
    for (; p < len; ++p) mx = std::max(mx, sh[p]);
    vec sum = vzero();
    for (p = 0; p + VW <= len; p += VW) {
      vec e = exp_neg(vadd(vloadf(sh + p), vset(-mx)));
      vstore(sh + p, e);
      sum = vadd(sum, e);
    }
    float total = vhsum(sum);
    for (; p < len; ++p) total += (sh[p] = std::exp(sh[p] - mx));
    m[h] = mx;
    l[h] = total;
  }
  for (int64_t g = 0; g < st.Hkv; ++g) {
    const C* vg = vc + g * D;
    if (dv == 4) Fixed<4>::values_group(s, g * group, (g + 1) * group, vg, rows.data(), len, o);
    else if (dv == 8) Fixed<8>::values_group(s, g * group, (g + 1) * group, vg, rows.data(), len, o);
    else
      for (int64_t h = g * group; h < (g + 1) * group; ++h) values_any_dim(s + h * len, D, vg, rows.data(), len, o + h * D);
  }
}

}  // namespace attn

// out[i, h, :] = softmax(q . K^T * scale) V over sequence i's blocks (keys already in the cache).
template <typename C>
void attend_cached(const Step& st, const float* q, const C* kc, const C* vc, float* out) {
  const int64_t H = st.H, D = st.D, threads = at::get_num_threads();
  struct Range {
    int64_t i, p0, p1;
  };
  std::vector<Range> ranges;
  std::vector<int64_t> first(st.n + 1);
  for (int64_t i = 0; i < st.n; ++i) {
    const int64_t L = st.context[i];
    int64_t pieces = st.n >= 2 * threads ? 1 : (2 * threads + st.n - 1) / st.n;
    pieces = std::max<int64_t>(1, std::min(pieces, L / attn::MIN_RANGE));
    first[i] = ranges.size();
    for (int64_t c = 0; c < pieces; ++c) ranges.push_back({i, L * c / pieces, L * (c + 1) / pieces});
  }
  first[st.n] = ranges.size();
  const int64_t R = ranges.size();
  std::vector<float> m(R * H), l(R * H), o(R * H * D);
  // each thread takes consecutive ranges holding an equal share of the positions: the rows of a prompt chunk
  // (one per token, each over the positions up to its own) grow longer down the batch
  std::vector<int64_t> cost(R + 1, 0);
  for (int64_t r = 0; r < R; ++r) cost[r + 1] = cost[r] + (ranges[r].p1 - ranges[r].p0) + attn::TASK_COST;
  const int64_t T = std::max<int64_t>(1, std::min(threads, R));
  llmspeed_team::team_for(T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf;
    std::vector<int64_t> rows;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lo = std::lower_bound(cost.begin(), cost.end() - 1, cost[R] * t / T) - cost.begin();
      const int64_t hi = std::lower_bound(cost.begin(), cost.end() - 1, cost[R] * (t + 1) / T) - cost.begin();
      for (int64_t r = lo; r < hi; ++r)
        attn::attend_range(st, ranges[r].i, ranges[r].p0, ranges[r].p1, q, kc, vc, &m[r * H], &l[r * H],
                           &o[r * H * D], buf, rows);
    }
  });
  for (int64_t i = 0; i < st.n; ++i)
    for (int64_t h = 0; h < H; ++h) {
      float mx = -INFINITY;
      for (int64_t r = first[i]; r < first[i + 1]; ++r) mx = std::max(mx, m[r * H + h]);
      float total = 0.f;
      float* dst = out + (i * H + h) * D;
      std::memset(dst, 0, D * sizeof(float));
      for (int64_t r = first[i]; r < first[i + 1]; ++r) {
        if (l[r * H + h] == 0.f) continue;  // an empty range (a sequence with no position yet)
        const float w = std::exp(m[r * H + h] - mx);
        total += w * l[r * H + h];
        for (int64_t d = 0; d < D; ++d) dst[d] += w * o[(r * H + h) * D + d];
      }
      if (total > 0.f)
        for (int64_t d = 0; d < D; ++d) dst[d] /= total;
    }
}

}  // namespace
