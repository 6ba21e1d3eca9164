// transpose_bf16: a row-major copy of the transpose of a bf16 matrix [R, C] (R a multiple of 32, C of 16),
// e.g. the output layer's w^T [H, V], the right operand of its logits. torch's copy of the transposed
// view reads with a stride of C and ran at about 1 GB/s here; this moves 32 x 16 blocks: rows paired
// into 32-bit lanes, transposed 16 x 16 with AVX-512 shuffles, so that each lane vector is 32
// consecutive values of an output row.
#include <ATen/Parallel.h>

#include "bf16_vec.h"
#include "kernels.h"

namespace nmt {

at::Tensor transpose_bf16(const at::Tensor& x) {
  check_bf16(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) % 32 == 0 && x.size(1) % 16 == 0,
              "x must be [R, C] with R a multiple of 32 and C of 16");
  const int64_t R = x.size(0), C = x.size(1);
  auto out = at::empty({C, R}, x.options());
  const uint16_t* src = bf16_data(x);
  uint16_t* dst = bf16_data_mut(out);
  at::parallel_for(0, R / 32, 8, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = 32 * block;
      for (int64_t c0 = 0; c0 < C; c0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = paired(src + (r0 + 2 * i) * C + c0, src + (r0 + 2 * i + 1) * C + c0);
        transpose16(r);  // r[c]: rows r0 .. r0 + 31 of column c0 + c
        for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + (c0 + c) * R + r0, r[c]);
      }
    }
  });
  return out;
}

}  // namespace nmt
