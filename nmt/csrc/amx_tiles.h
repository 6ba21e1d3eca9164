// AMX helpers of nmt's AMX kernel (weight_grad.cpp): the tile configuration of 8 tiles of 16 rows x 64
// bytes, and packing bf16 rows into AMX's operand layouts. Needs AMX-TILE, AMX-BF16 and AVX-512; included
// only without NMT_NO_AMX.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "bf16_vec.h"

namespace nmt {
namespace amx {

constexpr int kTileBytes = 1024;  // 16 rows of 64 bytes
constexpr int64_t kTileElements = kTileBytes / 2;  // bf16 values per tile

struct alignas(64) TileConfig {  // LDTILECFG's memory layout
  uint8_t palette = 0, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

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
