// weight_grad: a Linear layer's weight gradient dW = dY^T X [N, K] in fp32 from bf16 dY [M, N] and
// X [M, K], with AMX (Sapphire Rapids and later).
//
// The reduction runs over the M rows (tokens), the strided dimension of both operands, so a matmul
// library must repack both: oneDNN's bf16 matmul of this layout ran at a third to a half of its speed
// for [M, K] x [K, N] in the d256 recipe's profiles. Here the threads split dY's columns (or, where X is
// the wider operand, the rows); each packs 256 rows at a time into AMX tiles -- dY transposed (pairs of
// rows interleaved, then 16 x 16 blocks of 32-bit pairs transposed with AVX-512 shuffles), X as row pairs
// (AMX's VNNI layout of its right operand) -- and accumulates its part of [N, K] in fp32 tiles of 32 x 32
// (with split rows, the threads' sums are added at the end; onto `out` when given). Rows past M are
// packed as zeros. N and K must be multiples of 32.
// weight_bias_grad also returns dY's fp32 column sums (the bias gradient), taken while dY is packed.
#include <ATen/Parallel.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>

#include "bf16_vec.h"
#include "kernels.h"
#ifndef NMT_NO_AMX
#include "amx_tiles.h"
#endif

namespace nmt {

#ifndef NMT_NO_AMX

bool amx_available() {
  // Linux hands out the AMX tile state only on request (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA)
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
}

namespace {

using amx::kTileElements;
using amx::pack;

constexpr int64_t kChunk = 256;  // rows packed at once (a multiple of 32)
// sums[N, K] (+)= rows [m0, m1) of dY^T X for the N columns of dy (row stride ldy), 256 rows at a time
// (`add`: onto what sums holds; else from 0); with `column_sums`, those rows' sums of dy are added to it
void accumulate(const uint16_t* dy, int64_t ldy, const uint16_t* x, int64_t N, int64_t K, int64_t m0, int64_t m1,
                float* sums, bool add, uint16_t* a_pack, uint16_t* b_pack, float* column_sums) {
  for (int64_t start = m0; start < m1; start += kChunk) {
    const int64_t steps = (std::min(kChunk, m1 - start) + 31) / 32;
    pack(dy, ldy, m1, N, start, steps, true, a_pack, column_sums);
    pack(x, K, m1, K, start, steps, false, b_pack);
    for (int64_t n = 0; n < N; n += 32) {
      for (int64_t k = 0; k < K; k += 32) {
        float* c = sums + n * K + k;
        const int64_t ldc = K * sizeof(float);
        if (add) {
          _tile_loadd(0, c, ldc);
          _tile_loadd(1, c + 16, ldc);
          _tile_loadd(2, c + 16 * K, ldc);
          _tile_loadd(3, c + 16 * K + 16, ldc);
        } else {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        }
        const uint16_t* a = a_pack + (n / 16) * steps * kTileElements;
        const uint16_t* b = b_pack + (k / 16) * steps * kTileElements;
        for (int64_t s = 0; s < steps; ++s) {
          _tile_loadd(4, a + s * kTileElements, 64);
          _tile_loadd(5, a + (steps + s) * kTileElements, 64);
          _tile_loadd(6, b + s * kTileElements, 64);
          _tile_loadd(7, b + (steps + s) * kTileElements, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c, ldc);
        _tile_stored(1, c + 16, ldc);
        _tile_stored(2, c + 16 * K, ldc);
        _tile_stored(3, c + 16 * K + 16, ldc);
      }
    }
    add = true;
  }
}

// dY^T X (onto `out` when given) and, with `bias`, dY's column sums as well (read in the same pass)
std::vector<at::Tensor> weight_and_bias_grad(const at::Tensor& grad, const at::Tensor& x,
                                             const std::optional<at::Tensor>& out, bool bias) {
  check_bf16(grad, "grad");
  check_bf16(x, "x");
  TORCH_CHECK(grad.dim() == 2 && x.dim() == 2 && grad.size(0) == x.size(0), "grad [M, N] and x [M, K] must share M");
  const int64_t M = grad.size(0), N = grad.size(1), K = x.size(1);
  TORCH_CHECK(N % 32 == 0 && K % 32 == 0, "N and K must be multiples of 32, got ", N, " and ", K);
  TORCH_CHECK(amx_available(), "AMX is not available");
  if (out)
    TORCH_CHECK(out->device().is_cpu() && out->scalar_type() == at::kFloat && out->is_contiguous() &&
                    out->dim() == 2 && out->size(0) == N && out->size(1) == K,
                "out must be a contiguous fp32 CPU tensor [N, K]");
  auto options = x.options().dtype(at::kFloat);
  // The threads split the columns of dY (each packs all of X; no sums to add), or, where X is at least as
  // wide (so packing all of it in every thread costs more than adding the sums: [256, 256] 1.11x faster by
  // rows) or dY too narrow to share, the rows (each sums all of [N, K]; the sums are added at the end).
  const int64_t threads = at::get_num_threads();
  const bool split_rows = K >= N || N < 64 * threads;
  const int64_t units = split_rows ? (M + kChunk - 1) / kChunk : N / 32;  // row chunks or 32-column blocks
  const int64_t tasks = std::max<int64_t>(1, std::min(threads, units));
  const int64_t per_task = (units + tasks - 1) / tasks;
  at::Tensor result = out ? *out : at::empty({N, K}, options);
  auto others = at::empty({split_rows ? tasks - 1 : 0, N, K}, options);  // row tasks 1.. sum here
  auto column_sums = at::zeros({bias ? tasks : 0, N}, options);  // per task
  const uint16_t *dy = bf16_data(grad), *xp = bf16_data(x);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    amx::TileScope tiles;
    const int64_t packed_columns = split_rows ? N : per_task * 32;  // the widest part of dY a task packs
    auto a_pack = at::empty({packed_columns / 16, kChunk / 32, kTileElements}, x.options());
    auto b_pack = at::empty({K / 16, kChunk / 32, kTileElements}, x.options());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = std::min(units, task * per_task), last = std::min(units, (task + 1) * per_task);
      if (split_rows) {
        float* sums = task ? others.data_ptr<float>() + (task - 1) * N * K : result.data_ptr<float>();
        const bool add = task == 0 && out.has_value();
        float* task_sums = bias ? column_sums.data_ptr<float>() + task * N : nullptr;
        if (first < last)
          accumulate(dy, N, xp, N, K, first * kChunk, std::min(M, last * kChunk), sums, add,
                     bf16_data_mut(a_pack), bf16_data_mut(b_pack), task_sums);
        else if (!add)
          std::fill(sums, sums + N * K, 0.0f);
      } else if (first < last) {
        const int64_t n0 = first * 32, width = (last - first) * 32;
        float* sums = result.data_ptr<float>() + n0 * K;
        float* task_sums = bias ? column_sums.data_ptr<float>() + task * N + n0 : nullptr;
        if (M > 0)
          accumulate(dy + n0, N, xp, width, K, 0, M, sums, out.has_value(), bf16_data_mut(a_pack),
                     bf16_data_mut(b_pack), task_sums);
        else if (!out)
          std::fill(sums, sums + width * K, 0.0f);
      }
    }
  });
  for (int64_t i = 0; i < others.size(0); ++i) result.add_(others[i]);
  if (!bias) return {result};
  return {result, column_sums.sum(0)};
}

}  // namespace

at::Tensor weight_grad(const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& out) {
  return weight_and_bias_grad(grad, x, out, false)[0];
}

std::vector<at::Tensor> weight_bias_grad(const at::Tensor& grad, const at::Tensor& x) {
  return weight_and_bias_grad(grad, x, std::nullopt, true);
}

#else  // built without AMX intrinsics (nmt/cpu_kernels.py): the callers use torch's matmul

bool amx_available() { return false; }

at::Tensor weight_grad(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "nmt's CPU kernels were built without AMX");
}

std::vector<at::Tensor> weight_bias_grad(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "nmt's CPU kernels were built without AMX");
}

#endif

}  // namespace nmt
