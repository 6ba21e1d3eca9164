// column_sums: the fp32 sums over the rows of a bf16 matrix [rows, N], i.e. a Linear layer's bias
// gradient from its output gradient. torch's `grad.sum(0).float()` rounds the sums to bf16 (and reads
// the strided dimension through its generic reduction); this reads each row once, in blocks of 64
// columns per thread, with fp32 partial sums per 256 rows added into the totals.
#include <ATen/Parallel.h>

#include "bf16_vec.h"
#include "kernels.h"

namespace nmt {

at::Tensor column_sums(const at::Tensor& x) {
  check_bf16(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [rows, N]");
  const int64_t rows = x.size(0), N = x.size(1);
  auto out = at::zeros({N}, x.options().dtype(at::kFloat));
  const uint16_t* data = bf16_data(x);
  float* total = out.data_ptr<float>();
  constexpr int64_t kColumns = 64, kRows = 256;
  at::parallel_for(0, (N + kColumns - 1) / kColumns, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * kColumns, width = std::min(kColumns, N - c0);
      __m512 sum[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        __m512 part[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t r = r0; r < std::min(rows, r0 + kRows); ++r) {
          const uint16_t* row = data + r * N + c0;
          for (int half = 0; half < 2 && 32 * half < width; ++half) {
            __m512 lo, hi;
            load32(row + 32 * half, width - 32 * half, lo, hi);  // lanes past the row read as 0
            part[2 * half] = _mm512_add_ps(part[2 * half], lo);
            part[2 * half + 1] = _mm512_add_ps(part[2 * half + 1], hi);
          }
        }
        for (int i = 0; i < 4; ++i) sum[i] = _mm512_add_ps(sum[i], part[i]);
      }
      for (int i = 0; i < 4 && 16 * i < width; ++i) {
        const int64_t n = std::min<int64_t>(16, width - 16 * i);
        _mm512_mask_storeu_ps(total + c0 + 16 * i, static_cast<__mmask16>((1u << n) - 1), sum[i]);
      }
    }
  });
  return out;
}

}  // namespace nmt
