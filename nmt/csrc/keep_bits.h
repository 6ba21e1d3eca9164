// Dropout's random keep decisions, shared by the kernels that drop: a counter-based generator
// (splitmix64 of seed + counter), so a backward pass can draw the same bits again.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace nmt {

inline __m512i splitmix64(__m512i x) {
  x = _mm512_add_epi64(x, _mm512_set1_epi64(0x9E3779B97F4A7C15ULL));
  x = _mm512_mullo_epi64(_mm512_xor_si512(x, _mm512_srli_epi64(x, 30)), _mm512_set1_epi64(0xBF58476D1CE4E5B9ULL));
  x = _mm512_mullo_epi64(_mm512_xor_si512(x, _mm512_srli_epi64(x, 27)), _mm512_set1_epi64(0x94D049BB133111EBULL));
  return _mm512_xor_si512(x, _mm512_srli_epi64(x, 31));
}

// 64 keep bits for block k: byte j of splitmix64(seed + 8k + l) decides bit 8l + j, kept when the byte
// (an 8-bit lane) >= threshold
inline __mmask64 draw_keep(int64_t seed, int64_t k, __m512i threshold) {
  const __m512i words = _mm512_add_epi64(_mm512_set1_epi64(seed + k * 8), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  return _mm512_cmpge_epu8_mask(splitmix64(words), threshold);
}

// lo/hi (32 values) times s where the bits of m are set, 0 elsewhere
inline void scale_where(__m512& lo, __m512& hi, __mmask32 m, __m512 s) {
  lo = _mm512_maskz_mul_ps(static_cast<__mmask16>(m), lo, s);
  hi = _mm512_maskz_mul_ps(static_cast<__mmask16>(m >> 16), hi, s);
}

}  // namespace nmt
