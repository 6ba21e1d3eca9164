// LayerNorm over the last dimension of a bf16 tensor [rows, D] with fp32 weight and bias (the Transformer's
// residual stream under bf16 autocast), statistics and arithmetic in fp32, one bf16 rounding per output.
//
// forward:  y = (x - mean) * rstd * weight + bias, rstd = 1 / sqrt(var + eps) (biased variance, two passes)
// backward: with xhat = (x - mean) * rstd and g = grad * weight,
//           grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat)),
//           grad_weight = sum over rows of grad * xhat, grad_bias = sum over rows of grad
//           (plus `residual`, the gradient x receives past the norm in a pre-norm residual block, when given:
//           added in fp32 before the one rounding, instead of by a separate pass)
// The weight and bias gradients are summed per task (one task per thread, fixed row ranges) and then over
// the tasks in order: the same thread count gives the same bits.
#include <ATen/Parallel.h>

#include <cmath>

#include "bf16_vec.h"
#include "kernels.h"
#include "parallel.h"

namespace nmt {
namespace {

void check_params(const at::Tensor& t, int64_t size, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == size, name,
              " must be a contiguous fp32 CPU tensor of the normalized size");
}

// calls f(offset, count, lo, hi) for each block of 32 values of one row (lo, hi: the row's values in fp32)
template <typename F>
inline void for_each_block(const uint16_t* row, int64_t size, F f) {
  for (int64_t j = 0; j < size; j += 32) {
    __m512 lo, hi;
    load32(row + j, size - j, lo, hi);
    f(j, size - j, lo, hi);
  }
}

// the fp32 values at p + j (the first n of 32; the rest read as 0)
inline void load32_fp32(const float* p, int64_t n, __m512& lo, __m512& hi) {
  const __mmask32 m = first_lanes(n);
  lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), p);
  hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m >> 16), p + 16);
}

inline float sum_of(__m512 lo, __m512 hi) { return _mm512_reduce_add_ps(_mm512_add_ps(lo, hi)); }

}  // namespace

std::vector<at::Tensor> layer_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                           double eps) {
  check_bf16(x, "x");
  const int64_t size = x.size(-1), rows = x.numel() / size;
  check_params(weight, size, "weight");
  check_params(bias, size, "bias");
  auto y = at::empty_like(x);
  auto options = x.options().dtype(at::kFloat);
  auto mean = at::empty({rows}, options), rstd = at::empty({rows}, options);
  const uint16_t* xp = bf16_data(x);
  uint16_t* yp = bf16_data_mut(y);
  const float *w = weight.data_ptr<float>(), *b = bias.data_ptr<float>();
  float *mean_p = mean.data_ptr<float>(), *rstd_p = rstd.data_ptr<float>();
  parallel_for_pieces(0, rows, 128, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* row = xp + r * size;
      __m512 s_lo = _mm512_setzero_ps(), s_hi = _mm512_setzero_ps();
      for_each_block(row, size, [&](int64_t, int64_t, __m512 lo, __m512 hi) {
        s_lo = _mm512_add_ps(s_lo, lo);
        s_hi = _mm512_add_ps(s_hi, hi);
      });
      const float mu = sum_of(s_lo, s_hi) / size;
      const __m512 m = _mm512_set1_ps(mu);
      __m512 q_lo = _mm512_setzero_ps(), q_hi = _mm512_setzero_ps();
      for_each_block(row, size, [&](int64_t, int64_t n, __m512 lo, __m512 hi) {
        const __mmask32 real = first_lanes(n);
        const __m512 d_lo = _mm512_maskz_sub_ps(static_cast<__mmask16>(real), lo, m);
        const __m512 d_hi = _mm512_maskz_sub_ps(static_cast<__mmask16>(real >> 16), hi, m);
        q_lo = _mm512_fmadd_ps(d_lo, d_lo, q_lo);
        q_hi = _mm512_fmadd_ps(d_hi, d_hi, q_hi);
      });
      const float inv = 1.0f / std::sqrt(sum_of(q_lo, q_hi) / size + static_cast<float>(eps));
      const __m512 is = _mm512_set1_ps(inv);
      uint16_t* out = yp + r * size;
      for_each_block(row, size, [&](int64_t j, int64_t n, __m512 lo, __m512 hi) {
        __m512 w_lo, w_hi, b_lo, b_hi;
        load32_fp32(w + j, n, w_lo, w_hi);
        load32_fp32(b + j, n, b_lo, b_hi);
        store32(out + j, n, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(lo, m), is), w_lo, b_lo),
                _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(hi, m), is), w_hi, b_hi));
      });
      mean_p[r] = mu;
      rstd_p[r] = inv;
    }
  });
  return {y, mean, rstd};
}

std::vector<at::Tensor> layer_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                            const at::Tensor& rstd, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& residual) {
  check_bf16(grad, "grad");
  check_bf16(x, "x");
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad and x must have the same shape");
  if (residual) {
    check_bf16(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual and x must have the same shape");
  }
  const uint16_t* rp = residual ? bf16_data(*residual) : nullptr;
  const int64_t size = x.size(-1), rows = x.numel() / size;
  check_params(weight, size, "weight");
  check_params(mean, rows, "mean");
  check_params(rstd, rows, "rstd");
  auto grad_x = at::empty_like(x);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  const int64_t chunk = (rows + tasks - 1) / tasks;
  auto partial = at::zeros({tasks, 2, size}, x.options().dtype(at::kFloat));  // per task: weight, bias sums
  const uint16_t *gp = bf16_data(grad), *xp = bf16_data(x);
  uint16_t* out = bf16_data_mut(grad_x);
  const float *w = weight.data_ptr<float>(), *mean_p = mean.data_ptr<float>(), *rstd_p = rstd.data_ptr<float>();
  float* partial_p = partial.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      float* gw = partial_p + task * 2 * size;
      float* gb = gw + size;
      for (int64_t r = task * chunk; r < std::min(rows, (task + 1) * chunk); ++r) {
        const uint16_t *g_row = gp + r * size, *x_row = xp + r * size;
        const __m512 m = _mm512_set1_ps(mean_p[r]), is = _mm512_set1_ps(rstd_p[r]);
        __m512 a_lo = _mm512_setzero_ps(), a_hi = _mm512_setzero_ps(), c_lo = a_lo, c_hi = a_hi;
        for (int64_t j = 0; j < size; j += 32) {  // sums of g and g * xhat; the parameters' gradients
          __m512 g_lo, g_hi, x_lo, x_hi, w_lo, w_hi, pw_lo, pw_hi, pb_lo, pb_hi;
          load32(g_row + j, size - j, g_lo, g_hi);
          load32(x_row + j, size - j, x_lo, x_hi);
          load32_fp32(w + j, size - j, w_lo, w_hi);
          const __m512 h_lo = _mm512_mul_ps(_mm512_sub_ps(x_lo, m), is), h_hi = _mm512_mul_ps(_mm512_sub_ps(x_hi, m), is);
          const __m512 gg_lo = _mm512_mul_ps(g_lo, w_lo), gg_hi = _mm512_mul_ps(g_hi, w_hi);
          a_lo = _mm512_add_ps(a_lo, gg_lo);
          a_hi = _mm512_add_ps(a_hi, gg_hi);
          c_lo = _mm512_fmadd_ps(gg_lo, h_lo, c_lo);
          c_hi = _mm512_fmadd_ps(gg_hi, h_hi, c_hi);
          const __mmask32 real = first_lanes(size - j);
          load32_fp32(gw + j, size - j, pw_lo, pw_hi);
          load32_fp32(gb + j, size - j, pb_lo, pb_hi);
          _mm512_mask_storeu_ps(gw + j, static_cast<__mmask16>(real), _mm512_fmadd_ps(g_lo, h_lo, pw_lo));
          _mm512_mask_storeu_ps(gw + j + 16, static_cast<__mmask16>(real >> 16), _mm512_fmadd_ps(g_hi, h_hi, pw_hi));
          _mm512_mask_storeu_ps(gb + j, static_cast<__mmask16>(real), _mm512_add_ps(g_lo, pb_lo));
          _mm512_mask_storeu_ps(gb + j + 16, static_cast<__mmask16>(real >> 16), _mm512_add_ps(g_hi, pb_hi));
        }
        const __m512 mean_g = _mm512_set1_ps(sum_of(a_lo, a_hi) / size);
        const __m512 mean_gh = _mm512_set1_ps(sum_of(c_lo, c_hi) / size);
        for (int64_t j = 0; j < size; j += 32) {
          __m512 g_lo, g_hi, x_lo, x_hi, w_lo, w_hi;
          load32(g_row + j, size - j, g_lo, g_hi);
          load32(x_row + j, size - j, x_lo, x_hi);
          load32_fp32(w + j, size - j, w_lo, w_hi);
          const __m512 h_lo = _mm512_mul_ps(_mm512_sub_ps(x_lo, m), is), h_hi = _mm512_mul_ps(_mm512_sub_ps(x_hi, m), is);
          const __m512 d_lo = _mm512_fnmadd_ps(h_lo, mean_gh, _mm512_sub_ps(_mm512_mul_ps(g_lo, w_lo), mean_g));
          const __m512 d_hi = _mm512_fnmadd_ps(h_hi, mean_gh, _mm512_sub_ps(_mm512_mul_ps(g_hi, w_hi), mean_g));
          __m512 r_lo = _mm512_setzero_ps(), r_hi = r_lo;
          if (rp) load32(rp + r * size + j, size - j, r_lo, r_hi);
          store32(out + r * size + j, size - j, _mm512_fmadd_ps(d_lo, is, r_lo), _mm512_fmadd_ps(d_hi, is, r_hi));
        }
      }
    }
  });
  auto sums = partial.sum(0);  // [2, size], over the tasks in order
  return {grad_x, sums[0], sums[1]};
}

}  // namespace nmt
