// Quantized weights x float activations on Intel AMX tiles, for prompt-sized M: the torch bindings of the
// tile matmul in amx_tiles.h (shared with the fused CPU decode step), which explains the arithmetic.
#include "amx_tiles.h"

using namespace llmspeed_amx;

namespace {

torch::Tensor output_for(const torch::Tensor& x, int64_t N) {  // [..., N] float32
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return torch::empty(sizes, x.options());
}

}  // namespace

bool amx_usable() { return usable(); }

// x [..., K] float32, qweight [N, K] int8, scales [N] float32 -> y [..., N] float32. ``split``: add the
// low bf16 part of x (false when every x is a bf16 value already: bf16 activations).
torch::Tensor int8_matmul_amx(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, bool split) {
  TORCH_CHECK(amx_usable(), "int8_matmul_amx: AMX bf16 is not available on this CPU or build");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && qweight.scalar_type() == torch::kInt8, "float32 x, int8 weight");
  x = x.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K, N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K, "weight is [N, ", qweight.size(1), "], x has K = ", K);
  auto y = output_for(x, N);
#ifdef LLMSPEED_AMX
  const Int8Rows rows{qweight.data_ptr<int8_t>(), N, K};
  amx_matmul(x.data_ptr<float>(), M, K, round_up(K, TK), N, split, false, rows, scales.data_ptr<float>(),
             y.data_ptr<float>());
#endif
  return y;
}

// x [..., K] float32, qweight [N, Kp / 2] uint8 (Kp: the padded width, a multiple of the group size G,
// itself a multiple of 32), scales [N, Kp / G] float16, zeros the same (int4) or empty (``nf4``)
// -> y [..., N] float32.
torch::Tensor q4_matmul_amx(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                            int64_t G, bool nf4, bool split) {
  TORCH_CHECK(amx_usable(), "q4_matmul_amx: AMX bf16 is not available on this CPU or build");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && qweight.scalar_type() == torch::kUInt8, "float32 x, uint8 weight");
  x = x.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K, N = qweight.size(0), Kp = qweight.size(1) * 2;
  TORCH_CHECK(G % TK == 0 && Kp % G == 0 && K <= Kp, "q4_matmul_amx: group ", G, " must be a multiple of 32 ",
              "dividing the padded width ", Kp, " >= K = ", K);
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == N * (Kp / G), "scales must be [N, Kp / G], contiguous");
  TORCH_CHECK(nf4 || (zeros.is_contiguous() && zeros.numel() == scales.numel()), "zeros must match scales");
  auto y = output_for(x, N);
#ifdef LLMSPEED_AMX
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const half_t* s = half_data(scales);
  if (nf4) {
    amx_matmul(x.data_ptr<float>(), M, K, Kp, N, split, true, Q4Rows<true>{q, s, nullptr, N, G}, nullptr,
               y.data_ptr<float>());
  } else {
    amx_matmul(x.data_ptr<float>(), M, K, Kp, N, split, true, Q4Rows<false>{q, s, half_data(zeros), N, G},
               nullptr, y.data_ptr<float>());
  }
#endif
  return y;
}
