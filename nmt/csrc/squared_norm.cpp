// squared_norm: the sum of the squares of every element of a list of contiguous fp32 tensors (the
// gradients whose total 2-norm gradient clipping needs), in one parallel pass over all of them instead of
// one reduction op per tensor. Per chunk of 16K elements an fp32 sum; the chunks added in double.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace nmt {

double squared_norm(const std::vector<at::Tensor>& tensors) {
  constexpr int64_t kChunk = 1 << 14;
  std::vector<const float*> data;
  std::vector<int64_t> first_chunk{0};  // tensor i's chunks are [first_chunk[i], first_chunk[i + 1])
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                "squared_norm takes contiguous fp32 CPU tensors");
    data.push_back(t.data_ptr<float>());
    first_chunk.push_back(first_chunk.back() + (t.numel() + kChunk - 1) / kChunk);
  }
  std::vector<double> partial(first_chunk.back(), 0.0);
  at::parallel_for(0, first_chunk.back(), 4, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t i = std::upper_bound(first_chunk.begin(), first_chunk.end(), chunk) - first_chunk.begin() - 1;
      const int64_t start = (chunk - first_chunk[i]) * kChunk;
      const int64_t n = std::min(kChunk, tensors[i].numel() - start);
      const float* x = data[i] + start;
      __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 32 <= n; j += 32) {
        const __m512 u = _mm512_loadu_ps(x + j), v = _mm512_loadu_ps(x + j + 16);
        a = _mm512_fmadd_ps(u, u, a);
        b = _mm512_fmadd_ps(v, v, b);
      }
      for (; j < n; j += 16) {
        const __mmask16 m = static_cast<__mmask16>(n - j >= 16 ? 0xFFFF : (1u << (n - j)) - 1);
        const __m512 u = _mm512_maskz_loadu_ps(m, x + j);
        a = _mm512_fmadd_ps(u, u, a);
      }
      partial[chunk] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace nmt
