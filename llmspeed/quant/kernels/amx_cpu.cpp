// int8 weights x float activations on Intel AMX (bf16 tiles, fp32 accumulation), for prompt-sized M.
//
// y[m, n] = s[n] * sum_k x[m, k] * q[n, k]. The int8 codes q are exact in bf16. The activations are split
// into two bf16 parts, x = hi + lo + r with |r| <= 2^-17 |x|, so two bf16 products accumulated in fp32
// tiles give an fp32-grade result (the same order of error as reordering an fp32 sum) at AMX speed.
//
// Roles: the weight is the tile "A" operand (16 rows of n x 32 k, row-major: a plain int8 -> bf16
// conversion of 32 weight rows into a per-thread buffer, no repacking), the activations are the "B"
// operand, which AMX wants pair-interleaved ("VNNI": row p holds (x[m][2p], x[m][2p+1]) for 16 m); they
// are converted once per call and shared by every thread. C tiles come out as [n, m] and are written
// transposed into y [M, N] with the row scale. Each thread works on blocks of 32 weight rows x 32 rows of x
// (4 C tiles, 2 A, 2 B: all 8 tile registers).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define LLMSPEED_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t TK = 32;  // k per tile step (bf16)
constexpr int64_t TB = 32;  // rows of n and of m per block (two 16-row tiles each)

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

inline uint16_t bf16_bits(float f) {  // round to nearest even (inputs are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

#ifdef LLMSPEED_AMX
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool request_amx() {  // Linux hands out the tile state only on request, once per process
  constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  static const bool granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return granted;
}

void load_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// x [M, K] float -> hi, lo [Mp / 16][Kp / 2][16][2] bf16 (VNNI pairs), zero in the padding.
// 32 values of a row become 16 (even, odd) pairs, scattered one per 64-byte row of the tile layout.
void split_activations(const float* x, int64_t M, int64_t K, int64_t Mp, int64_t Kp, bool need_lo,
                       uint16_t* hi, uint16_t* lo) {
  const int64_t pairs = Kp / 2;
  at::parallel_for(0, Mp / 16, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float row[TK];
    const __m512i stride = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    for (int64_t b = b0; b < b1; ++b) {
      uint16_t* h = hi + b * pairs * 32;
      uint16_t* l = need_lo ? lo + b * pairs * 32 : nullptr;
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t m = b * 16 + i;
        const __m512i at = _mm512_add_epi32(stride, _mm512_set1_epi32(static_cast<int>(i)));  // dword offsets
        for (int64_t k = 0; k < Kp; k += TK) {
          const float* src = x + m * K + k;
          const bool full = m < M && k + TK <= K;
          if (!full) {  // the ragged end of a row, or a padding row
            for (int64_t j = 0; j < TK; ++j) row[j] = (m < M && k + j < K) ? src[j] : 0.f;
            src = row;
          }
          const __m512 a = _mm512_loadu_ps(src), b2 = _mm512_loadu_ps(src + 16);
          const __m512bh vh = _mm512_cvtne2ps_pbh(b2, a);  // k .. k+31 in order: 16 (even, odd) pairs
          int32_t* dst = reinterpret_cast<int32_t*>(h + (k / 2) * 32);
          _mm512_i32scatter_epi32(dst, at, reinterpret_cast<const __m512i&>(vh), 4);
          if (l) {
            const __m512i bits = reinterpret_cast<const __m512i&>(vh);
            const __m512 ha = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(bits)), 16));
            const __m512 hb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(bits, 1)), 16));
            const __m512bh vl = _mm512_cvtne2ps_pbh(_mm512_sub_ps(b2, hb), _mm512_sub_ps(a, ha));
            _mm512_i32scatter_epi32(reinterpret_cast<int32_t*>(l + (k / 2) * 32), at, reinterpret_cast<const __m512i&>(vl), 4);
          }
        }
      }
    }
  });
}
#endif

}  // namespace

bool amx_usable() {
#ifdef LLMSPEED_AMX
  return request_amx();
#else
  return false;
#endif
}

// x [..., K] float32, qweight [N, K] int8, scales [N] float32 -> y [..., N] float32. ``split``: add the
// low bf16 part of x (false when every x is a bf16 value already: bf16 activations).
torch::Tensor int8_matmul_amx(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, bool split) {
  TORCH_CHECK(amx_usable(), "int8_matmul_amx: AMX bf16 is not available on this CPU or build");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && qweight.scalar_type() == torch::kInt8, "float32 x, int8 weight");
  x = x.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K, N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K, "weight is [N, ", qweight.size(1), "], x has K = ", K);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty(sizes, x.options());
#ifdef LLMSPEED_AMX
  const int64_t Mp = round_up(std::max<int64_t>(M, 1), TB), Kp = round_up(K, TK), Np = round_up(N, TB);
  const float* xp = x.data_ptr<float>();
  const bool need_lo = split;
  // every element is written by split_activations (padding included): no zero-fill on this hot path
  std::unique_ptr<uint16_t[]> hi(new uint16_t[Mp * Kp]), lo(need_lo ? new uint16_t[Mp * Kp] : nullptr);
  split_activations(xp, M, K, Mp, Kp, need_lo, hi.get(), lo.get());
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t pairs = Kp / 2, xblock = pairs * 32;  // bf16 elements per 16 rows of x
  at::parallel_for(0, Np / TB, 1, [&](int64_t nb0, int64_t nb1) {
    load_tiles();
    std::unique_ptr<uint16_t[]> w(new uint16_t[TB * Kp]);  // 32 weight rows in bf16, row-major, zero padded below
    alignas(64) float c[16 * 16];
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const int64_t n0 = nb * TB;
      for (int64_t r = 0; r < TB; ++r) {
        uint16_t* wr = w.get() + r * Kp;
        const int64_t n = n0 + r;
        int64_t k = 0;
        if (n < N) {
          const int8_t* q = wp + n * K;
          for (; k + 16 <= K; k += 16) {  // 16 codes -> 16 bf16 (exact)
            __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(wr + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16)));
          }
          for (; k < K; ++k) wr[k] = bf16_bits(static_cast<float>(q[k]));
        }
        for (; k < Kp; ++k) wr[k] = 0;
      }
      for (int64_t mb = 0; mb < Mp / TB; ++mb) {
        const uint16_t* h0 = hi.get() + (2 * mb) * xblock;
        const uint16_t* h1 = h0 + xblock;
        const uint16_t* l0 = need_lo ? lo.get() + (2 * mb) * xblock : nullptr;
        const uint16_t* l1 = need_lo ? l0 + xblock : nullptr;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t k = 0; k < Kp; k += TK) {
          _tile_loadd(4, w.get() + k, Kp * 2);            // weight rows n0..n0+15
          _tile_loadd(5, w.get() + 16 * Kp + k, Kp * 2);  // weight rows n0+16..n0+31
          _tile_loadd(6, h0 + (k / 2) * 32, 64);           // x rows 0..15 of the block, pairs of k
          _tile_loadd(7, h1 + (k / 2) * 32, 64);
          _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
          if (need_lo) {
            _tile_loadd(6, l0 + (k / 2) * 32, 64);
            _tile_loadd(7, l1 + (k / 2) * 32, 64);
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
          }
        }
        for (int t = 0; t < 4; ++t) {  // C tile t: n rows (t / 2) * 16.., m columns (t % 2) * 16..
          switch (t) {
            case 0: _tile_stored(0, c, 64); break;
            case 1: _tile_stored(1, c, 64); break;
            case 2: _tile_stored(2, c, 64); break;
            default: _tile_stored(3, c, 64); break;
          }
          const int64_t nt = n0 + (t / 2) * 16, mt = mb * TB + (t % 2) * 16;
          if (nt >= N) continue;
          const int64_t ni = std::min<int64_t>(16, N - nt);
          const __mmask16 keep = static_cast<__mmask16>((1u << ni) - 1);
          const __m512 scale = _mm512_maskz_loadu_ps(keep, sp + nt);
          for (int64_t j = 0; j < 16 && mt + j < M; ++j) {  // a row of y: column j of c, 16 contiguous outputs
            const __m512 col = _mm512_i32gather_ps(column, c + j, 4);
            _mm512_mask_storeu_ps(yp + (mt + j) * N + nt, keep, _mm512_mul_ps(col, scale));
          }
        }
      }
    }
    _tile_release();
  });
#endif
  return y;
}
