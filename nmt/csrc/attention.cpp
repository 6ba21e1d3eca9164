// The softmax of attention scores over bf16 [B, heads, T, S] (nmt/models/multihead.py, training path):
// weights = softmax(scale * scores) over the allowed keys of each row, 0 on the others, with fp32
// arithmetic and one bf16 rounding, so neither the masked copy of the scores nor fp32 weights are made.
// A key j is allowed for query t of batch row b when key_mask[b, j] (if given) and, with `causal`,
// j <= S - T + t (the queries are the last T of the S positions). A row with no allowed key gets all 0.
// backward: grad_scores = scale * w * (grad - sum_j grad_j w_j).
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "bf16_vec.h"
#include "kernels.h"

namespace nmt {

at::Tensor attention_softmax_forward(const at::Tensor& scores, const std::optional<at::Tensor>& key_mask, bool causal,
                                     double scale) {
  check_bf16(scores, "scores");
  TORCH_CHECK(scores.dim() == 4, "scores must be [B, heads, T, S]");
  const int64_t batch = scores.size(0), heads = scores.size(1), queries = scores.size(2), keys = scores.size(3);
  const bool* mask = nullptr;
  if (key_mask.has_value()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->is_contiguous() && key_mask->dim() == 2 &&
                    key_mask->size(0) == batch && key_mask->size(1) == keys,
                "key_mask must be a contiguous bool [B, S]");
    mask = key_mask->data_ptr<bool>();
  }
  auto weights = at::empty_like(scores);
  const uint16_t* in = bf16_data(scores);
  uint16_t* out = bf16_data_mut(weights);
  const __m512 s = _mm512_set1_ps(static_cast<float>(scale));
  at::parallel_for(0, batch * heads * queries, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> exps(((keys + 31) / 32) * 32);
    std::vector<__mmask32> allowed((keys + 31) / 32);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (heads * queries), t = r % queries;
      const int64_t last = causal ? std::min(keys, keys - queries + t + 1) : keys;  // keys [0, last) may be seen
      const uint16_t* row = in + r * keys;
      __m512 high = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < keys; j += 32) {  // allowed lanes, and the max over them
        __mmask32 m = last > j ? first_lanes(last - j) : 0;
        if (mask) m &= _mm256_cmpneq_epi8_mask(_mm256_maskz_loadu_epi8(first_lanes(keys - j), mask + b * keys + j),
                                               _mm256_setzero_si256());
        allowed[j / 32] = m;
        __m512 lo, hi;
        load32(row + j, keys - j, lo, hi);
        high = _mm512_mask_max_ps(high, static_cast<__mmask16>(m), high, _mm512_mul_ps(lo, s));
        high = _mm512_mask_max_ps(high, static_cast<__mmask16>(m >> 16), high, _mm512_mul_ps(hi, s));
      }
      const float row_max = _mm512_reduce_max_ps(high);
      uint16_t* out_row = out + r * keys;
      if (row_max == -INFINITY) {  // nothing allowed
        std::memset(out_row, 0, keys * sizeof(uint16_t));
        continue;
      }
      const __m512 shift = _mm512_set1_ps(row_max);
      __m512 total = _mm512_setzero_ps();
      for (int64_t j = 0; j < keys; j += 32) {
        __m512 lo, hi;
        load32(row + j, keys - j, lo, hi);
        const __mmask32 m = allowed[j / 32];
        const __m512 e_lo = _mm512_maskz_mov_ps(static_cast<__mmask16>(m), exp_nonpositive(_mm512_fmsub_ps(lo, s, shift)));
        const __m512 e_hi =
            _mm512_maskz_mov_ps(static_cast<__mmask16>(m >> 16), exp_nonpositive(_mm512_fmsub_ps(hi, s, shift)));
        total = _mm512_add_ps(total, _mm512_add_ps(e_lo, e_hi));
        _mm512_storeu_ps(exps.data() + j, e_lo);
        _mm512_storeu_ps(exps.data() + j + 16, e_hi);
      }
      const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
      for (int64_t j = 0; j < keys; j += 32)
        store32(out_row + j, keys - j, _mm512_mul_ps(_mm512_loadu_ps(exps.data() + j), inverse),
                _mm512_mul_ps(_mm512_loadu_ps(exps.data() + j + 16), inverse));
    }
  });
  return weights;
}

at::Tensor attention_softmax_backward(const at::Tensor& grad, const at::Tensor& weights, double scale) {
  check_bf16(grad, "grad");
  check_bf16(weights, "weights");
  TORCH_CHECK(grad.sizes() == weights.sizes(), "grad and weights must have the same shape");
  const int64_t keys = weights.size(-1), rows = weights.numel() / keys;
  auto result = at::empty_like(grad);
  const uint16_t *g = bf16_data(grad), *w = bf16_data(weights);
  uint16_t* out = bf16_data_mut(result);
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t *g_row = g + r * keys, *w_row = w + r * keys;
      __m512 dot = _mm512_setzero_ps();
      for (int64_t j = 0; j < keys; j += 32) {
        __m512 g_lo, g_hi, w_lo, w_hi;
        load32(g_row + j, keys - j, g_lo, g_hi);
        load32(w_row + j, keys - j, w_lo, w_hi);
        dot = _mm512_fmadd_ps(g_lo, w_lo, _mm512_fmadd_ps(g_hi, w_hi, dot));
      }
      const __m512 d = _mm512_set1_ps(_mm512_reduce_add_ps(dot)), s = _mm512_set1_ps(sc);
      for (int64_t j = 0; j < keys; j += 32) {
        __m512 g_lo, g_hi, w_lo, w_hi;
        load32(g_row + j, keys - j, g_lo, g_hi);
        load32(w_row + j, keys - j, w_lo, w_hi);
        store32(out + r * keys + j, keys - j, _mm512_mul_ps(_mm512_mul_ps(w_lo, s), _mm512_sub_ps(g_lo, d)),
                _mm512_mul_ps(_mm512_mul_ps(w_hi, s), _mm512_sub_ps(g_hi, d)));
      }
    }
  });
  return result;
}

}  // namespace nmt
