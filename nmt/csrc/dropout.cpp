// Dropout (optionally added to a residual) on bf16 CPU tensors in one pass, with its mask as bits.
//
// Element i takes byte i % 8 of splitmix64(seed + i / 8) as its 8-bit lane and is kept when
// lane >= threshold, the keep rule of nmt/models/dropout.py.
// forward:  out = residual + (keep ? x * scale : 0)   (fp32 arithmetic, one bf16 rounding)
// backward: grad_x = keep ? grad * scale : 0
// relu_dropout_forward / relu_dropout_backward: out = keep ? relu(x) * scale : 0, and grad_x = out > 0 ? grad * scale : 0
// (out > 0 exactly where the element was kept and x > 0, so the output alone serves the backward).
// The keep bits of elements 64k..64k+63 are word k of `bits`.
#include <ATen/Parallel.h>

#include "bf16_vec.h"
#include "keep_bits.h"
#include "kernels.h"
#include "parallel.h"

namespace nmt {
namespace {

// For each block of 64 elements: keep = keep_of(block); out = (keep ? in * s : 0), then epilogue(lo, hi,
// offset, count) may change the 32 values of each half before they are stored as bf16.
template <typename KeepOf, typename Epilogue>
void scale_kept_blocks(int64_t n, const uint16_t* in, uint16_t* out, __m512 s, KeepOf keep_of, Epilogue epilogue) {
  parallel_for_pieces(0, (n + 63) / 64, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const uint64_t keep = keep_of(k);
      for (int h = 0; h < 2; ++h) {
        const int64_t off = k * 64 + h * 32, cnt = n - off;
        if (cnt <= 0) break;
        __m512 lo, hi;
        load32(in + off, cnt, lo, hi);
        scale_where(lo, hi, static_cast<__mmask32>(keep >> (32 * h)), s);
        epilogue(lo, hi, off, cnt);
        store32(out + off, cnt, lo, hi);
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> dropout_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                        int64_t threshold, double scale, int64_t seed) {
  check_bf16(x, "x");
  if (residual.has_value()) {
    check_bf16(*residual, "residual");
    TORCH_CHECK(residual->numel() == x.numel(), "residual and x must have the same size");
  }
  TORCH_CHECK(threshold >= 0 && threshold < 256, "threshold must be in [0, 256)");
  const int64_t n = x.numel();
  auto out = at::empty_like(x);
  auto bits = at::empty({(n + 63) / 64}, x.options().dtype(at::kLong));
  const uint16_t* rp = residual.has_value() ? bf16_data(*residual) : nullptr;
  uint64_t* bp = reinterpret_cast<uint64_t*>(bits.data_ptr());
  const __m512i t = _mm512_set1_epi8(static_cast<char>(threshold));
  auto keep_of = [&](int64_t k) {
    uint64_t keep = draw_keep(seed, k, t);
    if (n - k * 64 < 64) keep &= (1ULL << (n - k * 64)) - 1;  // no bits past the end
    return bp[k] = keep;
  };
  auto add_residual = [&](__m512& lo, __m512& hi, int64_t off, int64_t cnt) {
    if (!rp) return;
    __m512 rlo, rhi;
    load32(rp + off, cnt, rlo, rhi);
    lo = _mm512_add_ps(rlo, lo);
    hi = _mm512_add_ps(rhi, hi);
  };
  scale_kept_blocks(n, bf16_data(x), bf16_data_mut(out), _mm512_set1_ps(static_cast<float>(scale)), keep_of, add_residual);
  return {out, bits};
}

at::Tensor dropout_backward(const at::Tensor& grad, const at::Tensor& bits, double scale) {
  check_bf16(grad, "grad");
  const int64_t n = grad.numel();
  TORCH_CHECK(bits.numel() == (n + 63) / 64, "bits do not match grad");
  auto out = at::empty_like(grad);
  const uint64_t* bp = reinterpret_cast<const uint64_t*>(bits.data_ptr());
  scale_kept_blocks(n, bf16_data(grad), bf16_data_mut(out), _mm512_set1_ps(static_cast<float>(scale)), [&](int64_t k) { return bp[k]; },
                    [](__m512&, __m512&, int64_t, int64_t) {});
  return out;
}

at::Tensor relu_dropout_forward(const at::Tensor& x, int64_t threshold, double scale, int64_t seed) {
  check_bf16(x, "x");
  TORCH_CHECK(threshold >= 0 && threshold < 256, "threshold must be in [0, 256)");
  auto out = at::empty_like(x);
  const __m512i t = _mm512_set1_epi8(static_cast<char>(threshold));
  const __m512 zero = _mm512_setzero_ps();
  scale_kept_blocks(x.numel(), bf16_data(x), bf16_data_mut(out), _mm512_set1_ps(static_cast<float>(scale)),
                    [&](int64_t k) { return static_cast<uint64_t>(draw_keep(seed, k, t)); },
                    [&](__m512& lo, __m512& hi, int64_t, int64_t) {
                      lo = _mm512_max_ps(lo, zero);
                      hi = _mm512_max_ps(hi, zero);
                    });
  return out;
}

at::Tensor relu_dropout_backward(const at::Tensor& grad, const at::Tensor& out, double scale) {
  check_bf16(grad, "grad");
  check_bf16(out, "out");
  TORCH_CHECK(out.numel() == grad.numel(), "out and grad must have the same size");
  const int64_t n = grad.numel();
  auto result = at::empty_like(grad);
  const uint16_t* gp = bf16_data(grad);
  const uint16_t* yp = bf16_data(out);
  uint16_t* rp = bf16_data_mut(result);
  const __m512 s = _mm512_set1_ps(static_cast<float>(scale));
  parallel_for_pieces(0, (n + 31) / 32, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t off = k * 32, cnt = n - off;
      // a bf16 value is > 0 exactly when its bits, read as int16, are > 0
      const __mmask32 pos =
          _mm512_cmpgt_epi16_mask(_mm512_maskz_loadu_epi16(first_lanes(cnt), yp + off), _mm512_setzero_si512());
      __m512 lo, hi;
      load32(gp + off, cnt, lo, hi);
      scale_where(lo, hi, pos, s);
      store32(rp + off, cnt, lo, hi);
    }
  });
  return result;
}

}  // namespace nmt
