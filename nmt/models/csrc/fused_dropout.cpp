// Dropout (optionally added to a residual) on bf16 CPU tensors in one pass, with its mask as bits.
//
// Element i takes byte i % 8 of splitmix64(seed + i / 8) as its 8-bit lane and is kept when
// lane >= threshold, the keep rule of nmt/models/dropout.py.
// forward:  out = residual + (keep ? x * scale : 0)   (fp32 arithmetic, one bf16 rounding)
// backward: grad_x = keep ? grad * scale : 0
// relu_forward / relu_backward: out = keep ? relu(x) * scale : 0, and grad_x = out > 0 ? grad * scale : 0
// (out > 0 exactly where the element was kept and x > 0, so the output alone serves the backward).
// The keep bits of elements 64k..64k+63 are word k of `bits`. Needs AVX-512 (BW, DQ) and AVX512-BF16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline __m512i splitmix64(__m512i x) {
  x = _mm512_add_epi64(x, _mm512_set1_epi64(0x9E3779B97F4A7C15ULL));
  x = _mm512_mullo_epi64(_mm512_xor_si512(x, _mm512_srli_epi64(x, 30)), _mm512_set1_epi64(0xBF58476D1CE4E5B9ULL));
  x = _mm512_mullo_epi64(_mm512_xor_si512(x, _mm512_srli_epi64(x, 27)), _mm512_set1_epi64(0x94D049BB133111EBULL));
  return _mm512_xor_si512(x, _mm512_srli_epi64(x, 31));
}

inline __m512 bf16_to_fp32(__m256i half) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// 32 bf16 values at p (the first `n` of them; the rest read as 0) -> two fp32 vectors
inline void load32(const uint16_t* p, int64_t n, __m512& lo, __m512& hi) {
  __mmask32 m = n >= 32 ? ~__mmask32(0) : (__mmask32)((1ULL << n) - 1);
  __m512i v = _mm512_maskz_loadu_epi16(m, p);
  lo = bf16_to_fp32(_mm512_castsi512_si256(v));
  hi = bf16_to_fp32(_mm512_extracti64x4_epi64(v, 1));
}

inline void store32(uint16_t* p, int64_t n, __m512 lo, __m512 hi) {
  __mmask32 m = n >= 32 ? ~__mmask32(0) : (__mmask32)((1ULL << n) - 1);
  _mm512_mask_storeu_epi16(p, m, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// keep bits of elements 64k..64k+63: byte j of splitmix64(seed + 8k + l) decides element 64k + 8l + j
inline __mmask64 draw_keep(int64_t seed, int64_t k, __m512i threshold) {
  const __m512i words = _mm512_add_epi64(_mm512_set1_epi64(seed + k * 8), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  return _mm512_cmpge_epu8_mask(splitmix64(words), threshold);
}

// lo/hi (32 values) times s where the bits of m are set, 0 elsewhere
inline void scale_where(__m512& lo, __m512& hi, __mmask32 m, __m512 s) {
  lo = _mm512_maskz_mul_ps(static_cast<__mmask16>(m), lo, s);
  hi = _mm512_maskz_mul_ps(static_cast<__mmask16>(m >> 16), hi, s);
}

void check_bf16(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kBFloat16 && t.is_contiguous(),
              name, " must be a contiguous bf16 CPU tensor");
}

}  // namespace

// For each block of 64 elements: keep = keep_of(block); out = (keep ? in * s : 0), then epilogue(lo, hi,
// offset, count) may change the 32 values of each half before they are stored as bf16.
template <typename KeepOf, typename Epilogue>
void scale_kept_blocks(int64_t n, const uint16_t* in, uint16_t* out, __m512 s, KeepOf keep_of, Epilogue epilogue) {
  at::parallel_for(0, (n + 63) / 64, 256, [&](int64_t begin, int64_t end) {
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

std::vector<torch::Tensor> forward(torch::Tensor x, c10::optional<torch::Tensor> residual, int64_t threshold,
                                   double scale, int64_t seed) {
  check_bf16(x, "x");
  if (residual.has_value()) {
    check_bf16(*residual, "residual");
    TORCH_CHECK(residual->numel() == x.numel(), "residual and x must have the same size");
  }
  TORCH_CHECK(threshold >= 0 && threshold < 256, "threshold must be in [0, 256)");
  const int64_t n = x.numel();
  auto out = torch::empty_like(x);
  auto bits = torch::empty({(n + 63) / 64}, x.options().dtype(torch::kLong));
  const uint16_t* rp = residual.has_value() ? reinterpret_cast<const uint16_t*>(residual->data_ptr()) : nullptr;
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
  scale_kept_blocks(n, reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()),
                    _mm512_set1_ps(static_cast<float>(scale)), keep_of, add_residual);
  return {out, bits};
}

torch::Tensor backward(torch::Tensor grad, torch::Tensor bits, double scale) {
  check_bf16(grad, "grad");
  const int64_t n = grad.numel();
  TORCH_CHECK(bits.numel() == (n + 63) / 64, "bits do not match grad");
  auto out = torch::empty_like(grad);
  const uint64_t* bp = reinterpret_cast<const uint64_t*>(bits.data_ptr());
  scale_kept_blocks(n, reinterpret_cast<const uint16_t*>(grad.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()),
                    _mm512_set1_ps(static_cast<float>(scale)), [&](int64_t k) { return bp[k]; },
                    [](__m512&, __m512&, int64_t, int64_t) {});
  return out;
}

torch::Tensor relu_forward(torch::Tensor x, int64_t threshold, double scale, int64_t seed) {
  check_bf16(x, "x");
  TORCH_CHECK(threshold >= 0 && threshold < 256, "threshold must be in [0, 256)");
  auto out = torch::empty_like(x);
  const __m512i t = _mm512_set1_epi8(static_cast<char>(threshold));
  const __m512 zero = _mm512_setzero_ps();
  scale_kept_blocks(x.numel(), reinterpret_cast<const uint16_t*>(x.data_ptr()),
                    reinterpret_cast<uint16_t*>(out.data_ptr()), _mm512_set1_ps(static_cast<float>(scale)),
                    [&](int64_t k) { return static_cast<uint64_t>(draw_keep(seed, k, t)); },
                    [&](__m512& lo, __m512& hi, int64_t, int64_t) {
                      lo = _mm512_max_ps(lo, zero);
                      hi = _mm512_max_ps(hi, zero);
                    });
  return out;
}

torch::Tensor relu_backward(torch::Tensor grad, torch::Tensor out, double scale) {
  check_bf16(grad, "grad");
  check_bf16(out, "out");
  TORCH_CHECK(out.numel() == grad.numel(), "out and grad must have the same size");
  const int64_t n = grad.numel();
  auto result = torch::empty_like(grad);
  const uint16_t* gp = reinterpret_cast<const uint16_t*>(grad.data_ptr());
  const uint16_t* yp = reinterpret_cast<const uint16_t*>(out.data_ptr());
  uint16_t* rp = reinterpret_cast<uint16_t*>(result.data_ptr());
  const __m512 s = _mm512_set1_ps(static_cast<float>(scale));
  at::parallel_for(0, (n + 31) / 32, 512, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t off = k * 32, cnt = n - off;
      const __mmask32 m = cnt >= 32 ? ~__mmask32(0) : (__mmask32)((1ULL << cnt) - 1);
      // a bf16 value is > 0 exactly when its bits, read as int16, are > 0
      const __mmask32 pos = _mm512_cmpgt_epi16_mask(_mm512_maskz_loadu_epi16(m, yp + off), _mm512_setzero_si512());
      __m512 lo, hi;
      load32(gp + off, cnt, lo, hi);
      scale_where(lo, hi, pos, s);
      store32(rp + off, cnt, lo, hi);
    }
  });
  return result;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "residual + dropout(x), bf16, mask as bits");
  m.def("backward", &backward, "gradient of dropout(x) from its bits");
  m.def("relu_forward", &relu_forward, "dropout(relu(x)), bf16");
  m.def("relu_backward", &relu_backward, "gradient of dropout(relu(x)) from its output");
}
