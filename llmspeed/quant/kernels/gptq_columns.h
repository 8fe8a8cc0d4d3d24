// GPTQ's column loop (llmspeed/quant/methods/gptq.py) for an affine code grid, in one C++ call per run of columns
// whose groups are fitted. A column's codes and error use the grid's float operations in the Python loop's order
// (no contraction); the error pushed onto the later columns is one fused multiply-add per weight (torch's addr_
// rounds either way, depending on the BLAS and the size), so the two loops agree to rounding, not bit for bit.
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <cmath>

// W1 [b, out]: the block's rows of the error-updated weight (row k becomes its grid values);
// H1 [b, b]: the block of the upper Cholesky factor of H^-1; E [b, out]: each column's scaled error;
// scales, zeros [groups, out]; groups [b] int64: each block position's group; positions [start, stop) are done;
// lo, hi: the code range; with_zero: add and remove the zero point (false: a symmetric grid without one).
__attribute__((optimize("fp-contract=off")))
void gptq_columns(torch::Tensor W1, torch::Tensor H1, torch::Tensor E, torch::Tensor scales, torch::Tensor zeros,
                  torch::Tensor groups, int64_t start, int64_t stop, double lo, double hi, bool with_zero) {
  TORCH_CHECK(W1.dtype() == torch::kFloat32 && H1.dtype() == torch::kFloat32 && E.dtype() == torch::kFloat32 &&
              scales.dtype() == torch::kFloat32 && zeros.dtype() == torch::kFloat32 && groups.dtype() == torch::kInt64,
              "gptq_columns: float32 tensors and int64 groups");
  TORCH_CHECK(W1.stride(1) == 1 && E.stride(1) == 1 && scales.is_contiguous() && zeros.is_contiguous() &&
              groups.is_contiguous(), "gptq_columns: rows of W1, E, scales, zeros must be contiguous");
  // H1 may be strided either way (the Cholesky factor comes back column-major)
  const int64_t b = W1.size(0), out = W1.size(1), ldw = W1.stride(0), lde = E.stride(0);
  const int64_t hs0 = H1.stride(0), hs1 = H1.stride(1);
  TORCH_CHECK(0 <= start && start <= stop && stop <= b && H1.size(0) == b && H1.size(1) == b && E.size(0) == b &&
              E.size(1) == out && scales.size(1) == out && groups.size(0) == b, "gptq_columns: shapes");
  float* w = W1.data_ptr<float>();
  const float* h = H1.data_ptr<float>();
  float* e = E.data_ptr<float>();
  const float* s_all = scales.data_ptr<float>();
  const float* z_all = zeros.data_ptr<float>();
  const int64_t* g = groups.data_ptr<int64_t>();
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  for (int64_t k = start; k < stop; ++k) {
    const float* s = s_all + g[k] * out;
    const float* z = z_all + g[k] * out;
    const float d = h[k * hs0 + k * hs1];
    float* wk = w + k * ldw;
    float* ek = e + k * lde;
    for (int64_t o = 0; o < out; ++o) {
      float q = std::nearbyint(wk[o] / s[o]);  // torch.round: half to even
      if (with_zero) q = q + z[o];
      q = std::min(std::max(q, flo), fhi);
      if (with_zero) q = q - z[o];
      q = q * s[o];
      ek[o] = (wk[o] - q) / d;
      wk[o] = q;
    }
    for (int64_t r = k + 1; r < b; ++r) {  // the rest of the block takes this column's error
      const float hr = h[k * hs0 + r * hs1];
      float* wr = w + r * ldw;
      for (int64_t o = 0; o < out; ++o) wr[o] = std::fma(-hr, ek[o], wr[o]);
    }
  }
}
