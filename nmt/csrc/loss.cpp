// The cross-entropy's passes over bf16 logits [rows, V] (nmt/training/loss.py, fused output layer + loss).
//
// logit_row_stats: per row, in fp32, lse = log sum_v e^z_v, sum_v z_v and z_target: the loss terms follow
//   (nll = lse - z_target, sum_v -log p_v = V lse - sum_v z_v) without a [rows, V] fp32 copy. Given `out`,
//   the same pass also writes the gradient's [rows, V] part up to a factor per row: out = e^(z - max) with
//   k * sum_v e^(z_v - max) subtracted at the target (rows whose keep is false all 0), and returns that
//   factor, 1 / sum_v e^(z_v - max) (0 on those rows): softmax(z) - k * onehot(target) = factor * out,
//   with no second exponential pass over the logits.
// softmax_minus_target: out = scale * e^(z - lse) with k subtracted at the target (before one bf16
//   rounding), rows whose keep is false all 0: the gradient's [rows, V] part, written into `out`.
#include <ATen/Parallel.h>

#include <cmath>

#include "bf16_vec.h"
#include "kernels.h"
#include "parallel.h"

namespace nmt {
namespace {

void check_rows(const at::Tensor& logits, const at::Tensor& per_row, at::ScalarType type, const char* name) {
  TORCH_CHECK(per_row.device().is_cpu() && per_row.scalar_type() == type && per_row.is_contiguous() &&
                  per_row.numel() == logits.size(0),
              name, " must be a contiguous CPU tensor of ", type, " with one value per row of the logits");
}

// target ids checked against the vocabulary before any row is read
const int64_t* checked_targets(const at::Tensor& logits, const at::Tensor& target) {
  check_rows(logits, target, at::kLong, "target");
  const int64_t* ids = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < logits.size(0); ++r)
    TORCH_CHECK(ids[r] >= 0 && ids[r] < logits.size(1), "target id ", ids[r], " outside the vocabulary");
  return ids;
}

}  // namespace

std::vector<at::Tensor> logit_row_stats(const at::Tensor& logits, const at::Tensor& target,
                                        const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& keep,
                                        double k) {
  check_bf16(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "logits must be [rows, V]");
  const int64_t rows = logits.size(0), V = logits.size(1);
  const int64_t* ids = checked_targets(logits, target);
  TORCH_CHECK(out.has_value() == keep.has_value(), "out and keep go together");
  uint16_t* o = nullptr;
  const bool* keep_p = nullptr;
  if (out) {
    check_bf16(*out, "out");
    TORCH_CHECK(out->sizes() == logits.sizes(), "logits and out must be [rows, V]");
    check_rows(logits, *keep, at::kBool, "keep");
    o = bf16_data_mut(const_cast<at::Tensor&>(*out));
    keep_p = keep->data_ptr<bool>();
  }
  auto options = logits.options().dtype(at::kFloat);
  auto lse = at::empty({rows}, options), total = at::empty({rows}, options), at_target = at::empty({rows}, options);
  auto factor = at::empty({out ? rows : 0}, options);
  const uint16_t* z = bf16_data(logits);
  float *lse_p = lse.data_ptr<float>(), *total_p = total.data_ptr<float>(), *target_p = at_target.data_ptr<float>();
  float* factor_p = factor.data_ptr<float>();
  parallel_for_pieces(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* row = z + r * V;
      __m512 high = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < V; j += 32) {  // pass 1: max and sum (masked-off lanes read as 0)
        __m512 lo, hi;
        load32(row + j, V - j, lo, hi);
        const __mmask32 m = first_lanes(V - j);
        sum = _mm512_add_ps(sum, _mm512_add_ps(lo, hi));
        high = _mm512_mask_max_ps(high, static_cast<__mmask16>(m), high, lo);
        high = _mm512_mask_max_ps(high, static_cast<__mmask16>(m >> 16), high, hi);
      }
      const float row_max = _mm512_reduce_max_ps(high);
      const __m512 shift = _mm512_set1_ps(row_max);
      uint16_t* out_row = o && keep_p[r] ? o + r * V : nullptr;
      __m512 exp_sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < V; j += 32) {  // pass 2: sum of e^(z - max) over the real lanes (written out)
        __m512 lo, hi;
        load32(row + j, V - j, lo, hi);
        const __mmask32 m = first_lanes(V - j);
        const __m512 e_lo = _mm512_maskz_mov_ps(static_cast<__mmask16>(m), exp_nonpositive(_mm512_sub_ps(lo, shift)));
        const __m512 e_hi = _mm512_maskz_mov_ps(static_cast<__mmask16>(m >> 16), exp_nonpositive(_mm512_sub_ps(hi, shift)));
        exp_sum = _mm512_add_ps(exp_sum, _mm512_add_ps(e_lo, e_hi));
        if (out_row) store32(out_row + j, V - j, e_lo, e_hi);
      }
      const float exp_total = _mm512_reduce_add_ps(exp_sum);
      const float z_target = bf16_to_float(row[ids[r]]);
      lse_p[r] = row_max + std::log(exp_total);
      total_p[r] = _mm512_reduce_add_ps(sum);
      target_p[r] = z_target;
      if (!o) continue;
      if (out_row) {
        out_row[ids[r]] = float_to_bf16(std::exp(z_target - row_max) - static_cast<float>(k) * exp_total);
        factor_p[r] = 1.0f / exp_total;
      } else {
        std::memset(o + r * V, 0, V * sizeof(uint16_t));
        factor_p[r] = 0.0f;
      }
    }
  });
  if (out) return {lse, total, at_target, factor};
  return {lse, total, at_target};
}

void softmax_minus_target(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& target,
                          const at::Tensor& keep, double scale, double k, at::Tensor& out) {
  check_bf16(logits, "logits");
  check_bf16(out, "out");
  TORCH_CHECK(logits.dim() == 2 && out.sizes() == logits.sizes(), "logits and out must be [rows, V]");
  check_rows(logits, lse, at::kFloat, "lse");
  check_rows(logits, keep, at::kBool, "keep");
  const int64_t rows = logits.size(0), V = logits.size(1);
  const int64_t* ids = checked_targets(logits, target);
  const uint16_t* z = bf16_data(logits);
  uint16_t* o = bf16_data_mut(out);
  const float* lse_p = lse.data_ptr<float>();
  const bool* keep_p = keep.data_ptr<bool>();
  const __m512 s = _mm512_set1_ps(static_cast<float>(scale));
  parallel_for_pieces(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint16_t* out_row = o + r * V;
      if (!keep_p[r]) {
        std::memset(out_row, 0, V * sizeof(uint16_t));
        continue;
      }
      const uint16_t* row = z + r * V;
      const __m512 shift = _mm512_set1_ps(lse_p[r]);
      for (int64_t j = 0; j < V; j += 32) {
        __m512 lo, hi;
        load32(row + j, V - j, lo, hi);
        store32(out_row + j, V - j, _mm512_mul_ps(exp_nonpositive(_mm512_sub_ps(lo, shift)), s),
                _mm512_mul_ps(exp_nonpositive(_mm512_sub_ps(hi, shift)), s));
      }
      const float p_target = static_cast<float>(scale) * std::exp(bf16_to_float(row[ids[r]]) - lse_p[r]);
      out_row[ids[r]] = float_to_bf16(p_target - static_cast<float>(k));
    }
  });
}

}  // namespace nmt
