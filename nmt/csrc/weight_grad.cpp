// weight_grad: a Linear layer's weight gradient dW = dY^T X [N, K] in fp32 from bf16 dY [M, N] and
// X [M, K], with AMX (Sapphire Rapids and later).
//
// The reduction runs over the M rows (tokens), the strided dimension of both operands, so a matmul
// library must repack both: oneDNN's bf16 matmul of this layout ran at a third to a half of its speed
// for [M, K] x [K, N] in the d256 recipe's profiles. Here both are packed 256 rows at a time into AMX tiles
// -- dY transposed (pairs of rows interleaved, then 16 x 16 blocks of 32-bit pairs transposed with AVX-512
// shuffles), X as row pairs (AMX's VNNI layout of its right operand) -- and [N, K] is summed in fp32 tiles
// of 32 x 32 (onto `out` when given). Where dY is wider than X, X is packed whole first and the threads take
// panels of dY's columns as they finish their last (parallel.h); otherwise the threads split the rows and
// their sums are added at the end. Rows past M are packed as zeros. N and K must be multiples of 32.
// weight_bias_grad also returns dY's fp32 column sums (the bias gradient), taken while dY is packed.
#include <ATen/Parallel.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "bf16_vec.h"
#include "kernels.h"
#include "parallel.h"
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

int64_t chunk_steps(int64_t M, int64_t start) { return (std::min(kChunk, M - start) + 31) / 32; }

// X [M, K] packed whole as AMX's right operand, 256 rows at a time, the chunks in parallel, chunk c at
// packed + c * 256 * K
void pack_rows(const uint16_t* x, int64_t M, int64_t K, uint16_t* packed) {
  parallel_for_pieces(0, (M + kChunk - 1) / kChunk, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c)
      pack(x, K, M, K, c * kChunk, chunk_steps(M, c * kChunk), false, packed + c * kChunk * K);
  });
}

// sums[N, K] (row stride ldc; `add`: onto what it holds, else from 0) (+)= dY^T X over M rows, 256 at a time:
// a(start, steps) and b(start, steps) give the chunk's packed operands, N and K columns wide
template <class A, class B>
void accumulate(int64_t M, int64_t N, int64_t K, const A& a_chunk, const B& b_chunk, float* sums, int64_t ldc,
                bool add) {
  for (int64_t start = 0; start < M; start += kChunk) {
    const int64_t steps = chunk_steps(M, start);
    const uint16_t *a_pack = a_chunk(start, steps), *b_pack = b_chunk(start, steps);
    for (int64_t n = 0; n < N; n += 32) {
      for (int64_t k = 0; k < K; k += 32) {
        float* c = sums + n * ldc + k;
        const int64_t stride = ldc * sizeof(float);
        if (add) {
          _tile_loadd(0, c, stride);
          _tile_loadd(1, c + 16, stride);
          _tile_loadd(2, c + 16 * ldc, stride);
          _tile_loadd(3, c + 16 * ldc + 16, stride);
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
        _tile_stored(0, c, stride);
        _tile_stored(1, c + 16, stride);
        _tile_stored(2, c + 16 * ldc, stride);
        _tile_stored(3, c + 16 * ldc + 16, stride);
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
  at::Tensor result = out ? *out : at::empty({N, K}, options);
  if (M == 0) {
    if (!out) result.zero_();
    return bias ? std::vector<at::Tensor>{result, at::zeros({N}, options)} : std::vector<at::Tensor>{result};
  }
  const int64_t threads = at::get_num_threads(), chunks = (M + kChunk - 1) / kChunk;
  const uint16_t *dy = bf16_data(grad), *xp = bf16_data(x);
  if (K >= N || N < 64 * threads) {
    // X at least as wide as dY (or dY too narrow to share): the threads split the rows, each summing all of
    // [N, K] (added at the end, in order) from both operands packed 256 rows at a time
    const int64_t tasks = std::min(threads, chunks);
    const int64_t per_task = (chunks + tasks - 1) / tasks;
    auto others = at::empty({tasks - 1, N, K}, options);
    auto task_sums = at::zeros({bias ? tasks : 0, N}, options);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      amx::TileScope tiles;
      auto a_pack = at::empty({N * kChunk}, x.options()), b_pack = at::empty({K * kChunk}, x.options());
      for (int64_t task = begin; task < end; ++task) {
        const int64_t m0 = std::min(M, task * per_task * kChunk), m1 = std::min(M, (task + 1) * per_task * kChunk);
        float* column_sums = bias ? task_sums.data_ptr<float>() + task * N : nullptr;
        const auto rows_of_dy = [&](int64_t start, int64_t steps) {
          pack(dy, N, m1, N, m0 + start, steps, true, bf16_data_mut(a_pack), column_sums);
          return bf16_data(a_pack);
        };
        const auto rows_of_x = [&](int64_t start, int64_t steps) {
          pack(xp, K, m1, K, m0 + start, steps, false, bf16_data_mut(b_pack));
          return bf16_data(b_pack);
        };
        float* sums = task ? others.data_ptr<float>() + (task - 1) * N * K : result.data_ptr<float>();
        const bool add = task == 0 && out.has_value();
        if (m0 < m1)
          accumulate(m1 - m0, N, K, rows_of_dy, rows_of_x, sums, K, add);
        else if (!add)
          std::fill(sums, sums + N * K, 0.0f);
      }
    });
    for (int64_t i = 0; i < others.size(0); ++i) result.add_(others[i]);
    if (!bias) return {result};
    return {result, task_sums.sum(0)};
  }
  // dY wider than X: X is packed whole first (every panel reads all of it); then the threads take panels of
  // dY's columns, about 4 per thread, as they finish their last (parallel.h), and pack each 256 rows at a
  // time. Each output element is summed by one thread in row order: the result does not depend on which
  // thread took what.
  auto x_packed = at::empty({chunks * kChunk * K}, x.options());
  pack_rows(xp, M, K, bf16_data_mut(x_packed));
  auto chunk_sums = at::zeros({bias ? chunks : 0, N}, options);  // dY's column sums per chunk
  float* sums_p = bias ? chunk_sums.data_ptr<float>() : nullptr;
  const int64_t units = N / 32, panel = std::max<int64_t>(1, units / (4 * threads));
  parallel_pieces(0, units, panel, [&](Pieces& pieces) {
    amx::TileScope tiles;
    auto buffer = at::empty({panel * 32 * kChunk}, x.options());
    for (int64_t first, last; pieces.take(first, last);) {
      const int64_t n0 = first * 32, width = (last - first) * 32;
      const auto panel_of_dy = [&](int64_t start, int64_t steps) {
        pack(dy + n0, N, M, width, start, steps, true, bf16_data_mut(buffer),
             sums_p ? sums_p + start / kChunk * N + n0 : nullptr);
        return bf16_data(buffer);
      };
      const auto rows_of_x = [&](int64_t start, int64_t) { return bf16_data(x_packed) + start * K; };
      accumulate(M, width, K, panel_of_dy, rows_of_x, result.data_ptr<float>() + n0 * K, K, out.has_value());
    }
  });
  if (!bias) return {result};
  return {result, chunk_sums.sum(0)};
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
