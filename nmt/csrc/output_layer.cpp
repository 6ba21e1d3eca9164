// The output layer and its label-smoothed cross-entropy in one AMX kernel (nmt/training/loss.py):
//
//   z = h w^T + b,  lse = log sum_v e^z_v,  P = softmax(z) - k onehot(target) (0 on rows not kept),
//   grad_h = P w [R, H],  grad_w = P^T h [V, H],  grad_b = sum_rows P [V]   (all fp32)
//
// for bf16 h [R, H], w [V, H], bias [V], without ever holding the [R, V] logits: the threads split the
// vocabulary (32-column units), and each works through cache-sized blocks of 256 rows x 256 columns.
// Phase 1 computes each block's logits with AMX and folds them into per-row running (max, sum e^z, sum z,
// z_target), combined over the threads into lse. Phase 2 computes every block's logits again (the same
// tiles in the same order: bitwise the same values), turns them into P (bf16, rounded where it enters the
// products, as the unfused path rounds it), and multiplies P out while it is in cache: P w into the
// thread's [R, H] sums (added over the threads at the end), P^T h into its own rows of [V, H], P's column
// sums into the bias gradient. Recomputing the logits costs one more [R, H] x [H, V] product and saves
// writing and reading [R, V] twice, which bound the unfused path on these CPUs.
//
// Operand layouts (AMX: 16 x 32 bf16 left tiles, 16 pairs x 16 columns right tiles, fp32 16 x 16 sums):
//   h        left operand of the logits, read in place (row-major, K = H);
//   logit_w  w^T's pairs along H, tiles [Vp / 16][H / 32]: the logits' right operand;
//   grad_w   w's pairs of rows along V, per 256-row chunk [H / 16][steps]: P w's right operand;
//   P        row-major [256, 256] bf16: P w's left operand; its transpose packed [256 / 16][steps]: P^T h's;
//   h pairs  h's pairs of rows per 256-row block, [H / 16][steps]: P^T h's right operand.
// H and R must be multiples of 32; V is padded to 32 columns (the padding masked out).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "bf16_vec.h"
#include "kernels.h"
#ifndef NMT_NO_AMX
#include "amx_tiles.h"
#endif

namespace nmt {

#ifndef NMT_NO_AMX

namespace {

using amx::kTileElements;

constexpr int64_t kRows = 256;     // rows per block (a multiple of 32)
constexpr int64_t kColumns = 256;  // vocabulary columns per block (a multiple of 32)

// One AMX operand of a 32 x 32 block: tile s of half i at p + i * half + s * step, rows `stride` bytes apart.
struct Operand {
  const uint16_t* p;
  int64_t half, step, stride;
};

// c[32 x 32] (row stride ldc floats) = (accumulate ? c : 0) + sum over `steps` of a_s b_s. `next`, when given,
// is the next call's c: its 32 rows are fetched into L1 meanwhile (a tile load of sums from L2 or memory
// would otherwise stall the products behind it).
inline void tile_block(float* c, int64_t ldc, bool accumulate, const Operand& a, const Operand& b, int64_t steps,
                       const float* next = nullptr) {
  const int64_t bytes = ldc * static_cast<int64_t>(sizeof(float));
  if (next)
    for (int r = 0; r < 32; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(next + r * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(next + r * ldc + 16), _MM_HINT_T0);
    }
  if (accumulate) {
    _tile_loadd(0, c, bytes);
    _tile_loadd(1, c + 16, bytes);
    _tile_loadd(2, c + 16 * ldc, bytes);
    _tile_loadd(3, c + 16 * ldc + 16, bytes);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a.p + s * a.step, a.stride);
    _tile_loadd(5, a.p + a.half + s * a.step, a.stride);
    _tile_loadd(6, b.p + s * b.step, b.stride);
    _tile_loadd(7, b.p + b.half + s * b.step, b.stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, bytes);
  _tile_stored(1, c + 16, bytes);
  _tile_stored(2, c + 16 * ldc, bytes);
  _tile_stored(3, c + 16 * ldc + 16, bytes);
}

// w^T's right-operand tiles for the 16-column blocks [j0, j1): tile (j, s) row i, lane n = the pair
// (w[16j + n, 32s + 2i], w[16j + n, 32s + 2i + 1]); rows of w at or past V read as 0.
void pack_logit_operand(const uint16_t* w, int64_t V, int64_t H, int64_t j0, int64_t j1, uint16_t* out) {
  const uint32_t* pairs = reinterpret_cast<const uint32_t*>(w);  // row r's pair q at r * H / 2 + q
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t s = 0; s < H / 32; ++s) {
      __m512i r[16];
      for (int n = 0; n < 16; ++n) {
        const int64_t row = 16 * j + n;
        r[n] = row < V ? _mm512_loadu_si512(pairs + row * (H / 2) + 16 * s) : _mm512_setzero_si512();
      }
      transpose16(r);
      uint16_t* tile = out + (j * (H / 32) + s) * kTileElements;
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(tile + 32 * i, r[i]);
    }
  }
}

inline __mmask16 first16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? 0 : __mmask16((1u << n) - 1); }

struct Problem {
  const uint16_t *h, *w;
  const float* bias;  // fp32, padded to Vp with zeros
  const int64_t* target;
  const bool* keep;
  int64_t R, H, V, Vp;
  uint16_t* logit_w;  // packed w^T (all of it, filled by the threads in phase 1)
};

// z[32 x width] (row stride kColumns) = rows [row0, row0 + 32) of h w^T for the columns [c0, c0 + width)
void logits_strip(const Problem& pr, int64_t row0, int64_t c0, int64_t width, float* z) {
  const int64_t steps = pr.H / 32;
  const Operand a{pr.h + row0 * pr.H, 16 * pr.H, 32, 2 * pr.H};
  for (int64_t c = 0; c < width; c += 32) {
    const Operand b{pr.logit_w + ((c0 + c) / 16) * steps * kTileElements, steps * kTileElements, kTileElements, 64};
    tile_block(z + c, kColumns, false, a, b, steps);
  }
}

// Per-row running statistics of one thread's columns.
struct RowStats {
  float *max, *sum, *total, *at_target;
};

// folds a strip of logits z (32 rows from row0, columns c0 .. c0 + width, of which `valid` are real) into st
void fold_stats(const Problem& pr, const float* z, int64_t row0, int64_t c0, int64_t width, int64_t valid,
                const RowStats& st) {
  const float* bias = pr.bias + c0;
  for (int64_t r = 0; r < 32; ++r) {
    const int64_t row = row0 + r;
    if (!pr.keep[row]) continue;
    const float* zr = z + r * kColumns;
    __m512 high = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; j += 16) {
      const __mmask16 m = first16(valid - j);
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(zr + j), _mm512_loadu_ps(bias + j));
      high = _mm512_mask_max_ps(high, m, high, v);
      total = _mm512_mask_add_ps(total, m, total, v);
    }
    const float old_max = st.max[row], new_max = std::max(old_max, _mm512_reduce_max_ps(high));
    const __m512 shift = _mm512_set1_ps(new_max);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; j += 16) {
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(zr + j), _mm512_loadu_ps(bias + j));
      sum = _mm512_mask_add_ps(sum, first16(valid - j), sum, exp_nonpositive(_mm512_sub_ps(v, shift)));
    }
    st.sum[row] = st.sum[row] * std::exp(old_max - new_max) + _mm512_reduce_add_ps(sum);
    st.max[row] = new_max;
    st.total[row] += _mm512_reduce_add_ps(total);
    const int64_t t = pr.target[row] - c0;
    if (t >= 0 && t < valid) st.at_target[row] = zr[t] + bias[t];
  }
}

// p[32 x width] (row stride kColumns) = e^(z - lse) - k onehot(target), bf16; 0 on rows not kept and columns
// past V
void softmax_strip(const Problem& pr, const float* z, int64_t row0, int64_t c0, int64_t width, int64_t valid,
                   const float* lse, float k, uint16_t* p) {
  const float* bias = pr.bias + c0;
  for (int64_t r = 0; r < 32; ++r) {
    const int64_t row = row0 + r;
    uint16_t* pr_row = p + r * kColumns;
    if (!pr.keep[row]) {
      std::memset(pr_row, 0, width * sizeof(uint16_t));
      continue;
    }
    const float* zr = z + r * kColumns;
    const __m512 shift = _mm512_set1_ps(lse[row]);
    for (int64_t j = 0; j < width; j += 32) {
      const __m512 lo = _mm512_add_ps(_mm512_loadu_ps(zr + j), _mm512_loadu_ps(bias + j));
      const __m512 hi = _mm512_add_ps(_mm512_loadu_ps(zr + j + 16), _mm512_loadu_ps(bias + j + 16));
      store32(pr_row + j, 32, _mm512_maskz_mov_ps(first16(valid - j), exp_nonpositive(_mm512_sub_ps(lo, shift))),
              _mm512_maskz_mov_ps(first16(valid - j - 16), exp_nonpositive(_mm512_sub_ps(hi, shift))));
    }
    const int64_t t = pr.target[row] - c0;
    if (t >= 0 && t < valid) pr_row[t] = float_to_bf16(std::exp(zr[t] + bias[t] - lse[row]) - k);
  }
}

// The threads' split of the padded vocabulary: `per_task` 32-column units each, none empty.
struct Split {
  int64_t units, per_task, tasks;
  explicit Split(int64_t Vp)
      : units(Vp / 32), per_task((units + at::get_num_threads() - 1) / at::get_num_threads()),
        tasks((units + per_task - 1) / per_task) {}
  std::pair<int64_t, int64_t> columns(int64_t task) const {  // [v0, v1)
    return {task * per_task * 32, std::min(units, (task + 1) * per_task) * 32};
  }
};

// Phase 1 of one task: pack its columns of w^T, then fold all rows' logits over them into st.
void phase_stats(const Problem& pr, int64_t v0, int64_t v1, const RowStats& st) {
  pack_logit_operand(pr.w, pr.V, pr.H, v0 / 16, v1 / 16, pr.logit_w);
  std::vector<float> z(32 * kColumns);
  for (int64_t c0 = v0; c0 < v1; c0 += kColumns) {
    const int64_t width = std::min(kColumns, v1 - c0), valid = std::min(width, pr.V - c0);
    for (int64_t row0 = 0; row0 < pr.R; row0 += 32) {
      logits_strip(pr, row0, c0, width, z.data());
      fold_stats(pr, z.data(), row0, c0, width, valid, st);
    }
  }
}

// Phase 2 of one task: P for its columns, multiplied out into grad_h (this task's [R, H] sums), its rows
// of grad_w [Vp, H] and its entries of grad_b [Vp].
void phase_gradients(const Problem& pr, int64_t v0, int64_t v1, const float* lse, float k, float* grad_h,
                     float* grad_w, float* grad_b) {
  const int64_t H = pr.H;
  std::vector<uint16_t> w_pairs((v1 - v0) * H);  // w's row pairs, chunk by chunk of kColumns rows
  for (int64_t c0 = v0; c0 < v1; c0 += kColumns)
    amx::pack(pr.w, H, pr.V, H, c0, std::min(kColumns, v1 - c0) / 32, false, w_pairs.data() + (c0 - v0) * H);
  std::vector<float> z(32 * kColumns);
  std::vector<uint16_t> p(kRows * kColumns), p_t(kRows * kColumns), h_pairs(kRows * H);
  for (int64_t r0 = 0; r0 < pr.R; r0 += kRows) {
    const int64_t rows = std::min(kRows, pr.R - r0), row_steps = rows / 32;
    amx::pack(pr.h, H, pr.R, H, r0, row_steps, false, h_pairs.data());
    for (int64_t c0 = v0; c0 < v1; c0 += kColumns) {
      const int64_t width = std::min(kColumns, v1 - c0), valid = std::min(width, pr.V - c0);
      const int64_t column_steps = width / 32;
      for (int64_t s = 0; s < row_steps; ++s) {
        logits_strip(pr, r0 + 32 * s, c0, width, z.data());
        softmax_strip(pr, z.data(), r0 + 32 * s, c0, width, valid, lse, k, p.data() + 32 * s * kColumns);
      }
      // grad_h[rows] += P w[c0 .. c0 + width]
      const uint16_t* wc = w_pairs.data() + (c0 - v0) * H;
      for (int64_t s = 0; s < row_steps; ++s) {
        const Operand a{p.data() + 32 * s * kColumns, 16 * kColumns, 32, 2 * kColumns};
        for (int64_t n = 0; n < H; n += 32) {
          const Operand b{wc + (n / 16) * column_steps * kTileElements, column_steps * kTileElements, kTileElements,
                          64};
          float* c = grad_h + (r0 + 32 * s) * H + n;
          tile_block(c, H, c0 != v0, a, b, column_steps, n + 32 < H ? c + 32 : c + 32 * H - n);
        }
      }
      // grad_w[c0 .. c0 + width] += P^T h[rows]; grad_b += P's column sums (taken while P is packed)
      amx::pack(p.data(), kColumns, rows, width, 0, row_steps, true, p_t.data(), grad_b + c0);
      for (int64_t c = 0; c < width; c += 32) {
        const Operand a{p_t.data() + (c / 16) * row_steps * kTileElements, row_steps * kTileElements, kTileElements,
                        64};
        for (int64_t n = 0; n < H; n += 32) {
          const Operand b{h_pairs.data() + (n / 16) * row_steps * kTileElements, row_steps * kTileElements,
                          kTileElements, 64};
          float* sums = grad_w + (c0 + c) * H + n;
          tile_block(sums, H, r0 != 0, a, b, row_steps, n + 32 < H ? sums + 32 : sums + 32 * H - n);
        }
      }
    }
  }
}

}  // namespace

std::vector<at::Tensor> output_layer_loss(const at::Tensor& hidden, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                          const at::Tensor& keep, double k, bool gradients) {
  check_bf16(hidden, "hidden");
  check_bf16(weight, "weight");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden [R, H] and weight [V, H] must share H");
  const int64_t R = hidden.size(0), H = hidden.size(1), V = weight.size(0), Vp = (V + 31) / 32 * 32;
  TORCH_CHECK(R % 32 == 0 && H % 32 == 0 && V > 0, "R and H must be multiples of 32, got ", R, " and ", H);
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong && target.is_contiguous() &&
                  target.numel() == R && keep.device().is_cpu() && keep.scalar_type() == at::kBool &&
                  keep.is_contiguous() && keep.numel() == R,
              "target (int64) and keep (bool) must be contiguous CPU tensors with one value per row");
  TORCH_CHECK(amx_available(), "AMX is not available");
  const int64_t* ids = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(ids[r] >= 0 && ids[r] < V, "target id ", ids[r], " outside the vocabulary");
  auto f32 = hidden.options().dtype(at::kFloat);
  auto bias_f32 = at::zeros({Vp}, f32);
  if (bias) {
    check_bf16(*bias, "bias");
    TORCH_CHECK(bias->numel() == V, "bias must have one value per row of weight");
    bias_f32.narrow(0, 0, V).copy_(*bias);
  }
  auto logit_w = at::empty({Vp * H}, hidden.options());
  const Problem pr{bf16_data(hidden), bf16_data(weight), bias_f32.data_ptr<float>(), ids, keep.data_ptr<bool>(),
                   R, H, V, Vp, bf16_data_mut(logit_w)};
  const Split split(Vp);
  const int64_t tasks = split.tasks;

  // phase 1: per task and row (max, sum e^(z - max), sum z, z_target) over the task's columns
  auto stats = at::zeros({4, tasks, R}, f32);
  stats[0].fill_(-INFINITY);
  float* sp = stats.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    amx::TileScope tiles;
    for (int64_t task = begin; task < end; ++task) {
      const auto [v0, v1] = split.columns(task);
      const RowStats st{sp + task * R, sp + (tasks + task) * R, sp + (2 * tasks + task) * R,
                        sp + (3 * tasks + task) * R};
      phase_stats(pr, v0, v1, st);
    }
  });
  const auto high = std::get<0>(stats[0].max(0));
  auto lse = high + (stats[1] * (stats[0] - high).exp()).sum(0).log();
  lse.masked_fill_(keep.logical_not(), 0.0);  // rows not kept saw no logits
  auto total = stats[2].sum(0), at_target = stats[3].sum(0);
  if (!gradients) return {lse, total, at_target};

  // phase 2: the gradients' sums
  auto grad_h = at::empty({tasks, R, H}, f32), grad_w = at::empty({Vp, H}, f32), grad_b = at::zeros({Vp}, f32);
  const float* lse_p = lse.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    amx::TileScope tiles;
    for (int64_t task = begin; task < end; ++task) {
      const auto [v0, v1] = split.columns(task);
      phase_gradients(pr, v0, v1, lse_p, static_cast<float>(k), grad_h.data_ptr<float>() + task * R * H,
                      grad_w.data_ptr<float>(), grad_b.data_ptr<float>());
    }
  });
  return {lse, total, at_target, tasks > 1 ? grad_h.sum(0) : grad_h[0], grad_w.narrow(0, 0, V),
          grad_b.narrow(0, 0, V)};
}

#else  // built without AMX intrinsics (nmt/cpu_kernels.py): the caller uses its unfused path

std::vector<at::Tensor> output_layer_loss(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                          const at::Tensor&, const at::Tensor&, double, bool) {
  TORCH_CHECK(false, "nmt's CPU kernels were built without AMX");
}

#endif

}  // namespace nmt
