// AMX helpers of nmt's AMX kernel (weight_grad.cpp): the tile configuration of 8 tiles of 16 rows x 64
// bytes, and packing bf16 rows into AMX's operand layouts. Needs AMX-TILE, AMX-BF16 and AVX-512; included
// only without NMT_NO_AMX.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace nmt {
namespace amx {

constexpr int kTileBytes = 1024;  // 16 rows of 64 bytes
constexpr int64_t kTileElements = kTileBytes / 2;  // bf16 values per tile

struct alignas(64) TileConfig {  // LDTILECFG's memory layout
  uint8_t palette = 0, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

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

// rows [m0, m0 + 32 * steps) of `width` columns of a bf16 matrix (row stride ld) into tiles
// [width / 16][steps][16 x 32]: with `transposed`, tile row c holds column c's 32 values (AMX's left
// operand); otherwise row i holds the pairs of rows 2i and 2i + 1 (its right operand). Rows at or past M
// are zeros. With `column_sums`, the rows' fp32 sums per column are added to it.
inline void pack(const uint16_t* src, int64_t ld, int64_t M, int64_t width, int64_t m0, int64_t steps, bool transposed,
                 uint16_t* out, float* column_sums = nullptr) {
  for (int64_t s = 0; s < steps; ++s) {  // 32 rows at a time, read once and in order
    for (int64_t col = 0; col < width; col += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t m = m0 + 32 * s + 2 * i;
        r[i] = paired(m < M ? src + m * ld + col : nullptr, m + 1 < M ? src + (m + 1) * ld + col : nullptr);
      }
      if (column_sums) {  // the packed rows' fp32 sums per column, added to column_sums[col, col + 16)
        __m512 sum = _mm512_loadu_ps(column_sums + col);
        for (int i = 0; i < 16; ++i) {
          sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(r[i], 16)));
          sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_and_si512(r[i], _mm512_set1_epi32(-65536))));
        }
        _mm512_storeu_ps(column_sums + col, sum);
      }
      if (transposed) transpose16(r);
      uint16_t* tile = out + ((col / 16) * steps + s) * kTileElements;
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(tile + 32 * i, r[i]);
    }
  }
}

// Tiles 0-7 configured as 16 rows x 64 bytes for this scope on this thread; the thread's previous
// configuration (e.g. oneDNN's) is restored after it, or the tiles released when there was none.
class TileScope {
 public:
  TileScope() {
    _tile_storeconfig(&saved_);
    TileConfig config;
    config.palette = 1;
    for (int i = 0; i < 8; ++i) config.rows[i] = 16, config.colsb[i] = 64;
    _tile_loadconfig(&config);
  }
  ~TileScope() {
    if (saved_.palette)
      _tile_loadconfig(&saved_);
    else
      _tile_release();
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  TileConfig saved_;
};

}  // namespace amx
}  // namespace nmt
