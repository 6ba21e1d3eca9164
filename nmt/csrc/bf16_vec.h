// AVX-512 helpers shared by nmt's CPU kernels: bf16 loads and stores in blocks of 32 values, and e^x.
// Needs AVX-512 (F, BW, DQ) and AVX512-BF16.
#pragma once
#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace nmt {

inline __m512 bf16_to_fp32(__m256i half) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// the first n of 32 lanes (all of them when n >= 32)
inline __mmask32 first_lanes(int64_t n) { return n >= 32 ? ~__mmask32(0) : (__mmask32)((1ULL << n) - 1); }

// 32 bf16 values at p (the first `n` of them; the rest read as 0) -> two fp32 vectors
inline void load32(const uint16_t* p, int64_t n, __m512& lo, __m512& hi) {
  const __m512i v = _mm512_maskz_loadu_epi16(first_lanes(n), p);
  lo = bf16_to_fp32(_mm512_castsi512_si256(v));
  hi = bf16_to_fp32(_mm512_extracti64x4_epi64(v, 1));
}

// the first `n` of the 32 values lo, hi rounded to bf16 (nearest even) and stored at p
inline void store32(uint16_t* p, int64_t n, __m512 lo, __m512 hi) {
  _mm512_mask_storeu_epi16(p, first_lanes(n), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// round to nearest even, as _mm512_cvtne2ps_pbh (finite values)
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// e^x for x <= 0, relative error about 2e-7 (larger x is not needed by the callers): e^x = 2^n e^r with
// n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its degree-6 Taylor polynomial; 0 below about -104.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts: r exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The 16 pairs (a[c], b[c]) of two rows of 16 bf16 as 32-bit lanes (a in the low half); a null row reads as 0.
inline __m512i paired(const uint16_t* a, const uint16_t* b) {
  const __m256i zero = _mm256_setzero_si256();
  const __m512i lo = _mm512_cvtepu16_epi32(a ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)) : zero);
  const __m512i hi = _mm512_cvtepu16_epi32(b ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)) : zero);
  return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

// r[i][j] -> r[j][i] for a 16 x 16 block of 32-bit values
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + c]: lane L holds column 4L + c of rows g..g+3
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
    r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xdd);
  }
}

inline void check_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.is_contiguous(), name,
              " must be a contiguous bf16 CPU tensor");
}

inline const uint16_t* bf16_data(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
inline uint16_t* bf16_data_mut(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

}  // namespace nmt
