// Multi-head attention of bf16 tensors in one kernel each way (nmt/models/fused_attention.py):
//
//   P = softmax(scale * Q K^T) over the allowed keys (0 on the others),  O = dropout(P) V
//
// per sentence b and head h, with Q [T, D], K and V [S, D] read in place from strided [B, heads, len, D]
// views (the last dimension contiguous), so the heads are never copied into a layout of their own. The
// products use AVX512-BF16 dot products of bf16 pairs with fp32 sums (the precision of a bf16 matmul),
// the softmax is fp32; P, dropout(P) and its gradient are rounded to bf16 where they enter a product,
// as the tensor-op path rounds them. A key j is allowed for query t when key_mask[b, j] (if given) and,
// with `causal`, j <= S - T + t; a row with no allowed key gets P = 0 and O = 0.
// Dropout keeps P[b, h, t, j] when byte j % 64 of draw_keep(seed, (((b * heads + h) * T + t) * W + j / 64))
// is >= threshold (W = 64-key blocks per row); the backward draws the same bits again.
// backward: dPd = dO V^T, dP = keep * dropscale * dPd, dS = scale * P * (dP - sum_j P_j dP_j),
//           dQ = dS K, dK = dS^T Q, dV = dropout(P)^T dO.
#include <ATen/Parallel.h>

#include <cmath>
#include <utility>
#include <vector>

#include "bf16_vec.h"
#include "keep_bits.h"
#include "kernels.h"
#include "parallel.h"
#ifndef NMT_NO_AMX
#include "amx_tiles.h"
#endif

namespace nmt {
namespace {

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A strided [B, heads, len, D] bf16 view with a contiguous last dimension.
struct Heads {
  uint16_t* data;
  int64_t sb, sh, st;
  Heads(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 4 && t.stride(3) == 1, name,
                " must be a bf16 CPU [B, heads, len, D] tensor with a contiguous last dimension");
    TORCH_CHECK(t.stride(0) % 2 == 0 && t.stride(1) % 2 == 0 && t.stride(2) % 2 == 0 &&
                    reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0,
                name, " must have even strides and a 4-byte aligned start");
    data = reinterpret_cast<uint16_t*>(t.data_ptr());
    sb = t.stride(0), sh = t.stride(1), st = t.stride(2);
  }
  uint16_t* row(int64_t b, int64_t h, int64_t t) const { return data + b * sb + h * sh + t * st; }
  // asks for rows [0, len) of (b, h) (D values each) to be brought into cache: the next item's rows lie
  // apart in the joint projection's output, where the hardware's prefetchers do not follow them
  void prefetch(int64_t b, int64_t h, int64_t len, int64_t D) const {
    for (int64_t t = 0; t < len; ++t) {
      const char* p = reinterpret_cast<const char*>(row(b, h, t));
      for (int64_t offset = 0; offset < 2 * D; offset += 64) _mm_prefetch(p + offset, _MM_HINT_T0);
      _mm_prefetch(p + 2 * D - 1, _MM_HINT_T0);
    }
  }
  // rows [0, len) of (b, h) as (first row, row stride): in place, or with `padded` (AMX reads whole tiles,
  // past the last row) copied into `buffer`, whose rows past len stay zero
  std::pair<const uint16_t*, int64_t> rows(int64_t b, int64_t h, int64_t len, int64_t D, bool padded,
                                           std::vector<uint16_t>& buffer) const {
    if (!padded) return {row(b, h, 0), st};
    for (int64_t t = 0; t < len; ++t) std::memcpy(buffer.data() + t * D, row(b, h, t), D * sizeof(uint16_t));
    return {buffer.data(), D};
  }
};

// C[m, n] = sum_p A(m, p) . B[p, n] for m < M, n < N (fp32 C, row stride ldc >= N rounded up to 16): each
// A(m, p) = a[m * sam + p * sap] and B[p, n] = b[p * ldb + n] is a pair of bf16 values (the two
// consecutive reduction indices 2p, 2p + 1), so one dpbf16 adds two products per lane. b's rows must
// be readable up to N rounded up to 16. Register blocks of R rows x V vectors of 16 columns.
template <int R, int V>
void pair_block(int64_t P, const uint32_t* a, int64_t sam, int64_t sap, const uint32_t* b, int64_t ldb, float* c,
                int64_t ldc) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh bv[V];
    for (int v = 0; v < V; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + p * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * sam + p * sap]));
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

template <int R>
void pair_rows(int V, int64_t P, const uint32_t* a, int64_t sam, int64_t sap, const uint32_t* b, int64_t ldb,
               float* c, int64_t ldc) {
  switch (V) {
    case 1: return pair_block<R, 1>(P, a, sam, sap, b, ldb, c, ldc);
    case 2: return pair_block<R, 2>(P, a, sam, sap, b, ldb, c, ldc);
    case 3: return pair_block<R, 3>(P, a, sam, sap, b, ldb, c, ldc);
    default: return pair_block<R, 4>(P, a, sam, sap, b, ldb, c, ldc);
  }
}

void pair_gemm(int64_t M, int64_t N, int64_t P, const uint32_t* a, int64_t sam, int64_t sap, const uint32_t* b,
               int64_t ldb, float* c, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int V = static_cast<int>(std::min<int64_t>(4, (N - n0 + 15) / 16));
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const uint32_t* am = a + m0 * sam;
      float* cm = c + m0 * ldc + n0;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: pair_rows<1>(V, P, am, sam, sap, b + n0, ldb, cm, ldc); break;
        case 2: pair_rows<2>(V, P, am, sam, sap, b + n0, ldb, cm, ldc); break;
        case 3: pair_rows<3>(V, P, am, sam, sap, b + n0, ldb, cm, ldc); break;
        default: pair_rows<4>(V, P, am, sam, sap, b + n0, ldb, cm, ldc);
      }
    }
  }
}

#ifndef NMT_NO_AMX
// C[Mp, Np] (row stride ldc floats) = A B with AMX, for A [Mp, K] bf16 rows (stride lda) and B as pairs
// [K / 2, ldb] (the layout pair_gemm reads); Mp, Np and K multiples of 32, every row and column of them
// readable (the callers' buffers are padded with zeros). Needs the tiles configured (amx::TileScope).
void amx_gemm(int64_t Mp, int64_t Np, int64_t K, const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
              float* c, int64_t ldc) {
  const int64_t a_bytes = 2 * lda, b_bytes = 4 * ldb, c_bytes = 4 * ldc;
  for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
    for (int64_t n0 = 0; n0 < Np; n0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        _tile_loadd(4, a + m0 * lda + k0, a_bytes);
        _tile_loadd(5, a + (m0 + 16) * lda + k0, a_bytes);
        _tile_loadd(6, b + (k0 / 2) * ldb + n0, b_bytes);
        _tile_loadd(7, b + (k0 / 2) * ldb + n0 + 16, b_bytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      float* cm = c + m0 * ldc + n0;
      _tile_stored(0, cm, c_bytes);
      _tile_stored(1, cm + 16, c_bytes);
      _tile_stored(2, cm + 16 * ldc, c_bytes);
      _tile_stored(3, cm + 16 * ldc + 16, c_bytes);
    }
  }
}
#endif

void transpose_pairs(const uint16_t* x, int64_t rows, int64_t stride, int64_t P, uint32_t* out, int64_t ld);

struct Shape {
  int64_t B, H, T, S, D;
  int64_t Sp, Dp, Tp, S2, T2, P;  // S, D, T rounded up to 32 (the buffers' whole tiles); pairs along S, T, D
  Shape(int64_t B, int64_t H, int64_t T, int64_t S, int64_t D)
      : B(B), H(H), T(T), S(S), D(D), Sp(round_up(S, 32)), Dp(round_up(D, 32)), Tp(round_up(T, 32)), S2((S + 1) / 2),
        T2((T + 1) / 2), P(D / 2) {}
};

constexpr int64_t kItemsPerPiece = 8;  // (sentence, head) pairs a thread takes at a time (parallel.h)

// Queries and keys from which the products run on AMX: with fewer, the padding to whole 32-row tiles
// costs more than AMX saves (forward + backward of ~4,000-token batches, 4 heads, size 64, against the dot
// products: 0.85x at 13 tokens, 1.16x at 17, 1.07-1.18x at 20, 1.28x at 25, 1.42x at 32).
constexpr int64_t kAmxMinLength = 17;

// The products of one call: AMX where this process may use it, the head size is a multiple of 32 (whole
// 32 x 32 tiles along D) and there are kAmxMinLength queries and keys or more, else AVX512-BF16 dot
// products (pair_gemm).
struct Products {
  bool amx = false;
#ifndef NMT_NO_AMX
  std::optional<amx::TileScope> tiles;  // per thread, for the duration of its items
#endif
  explicit Products(const Shape& n) {
#ifndef NMT_NO_AMX
    amx = n.D % 32 == 0 && n.T >= kAmxMinLength && n.S >= kAmxMinLength && amx_available();
    if (amx) tiles.emplace();
#endif
  }
  // C[rows, N] = A B for A [rows, K] bf16 rows (stride lda; rows up to rows rounded to 32 readable when
  // amx), B pairs [K / 2 (rounded up to 16 when amx), ldb]; C has rows and ldc >= N rounded up to 32
  void gemm(int64_t rows, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
            float* c, int64_t ldc) const {
#ifndef NMT_NO_AMX
    if (amx) return amx_gemm(round_up(rows, 32), round_up(N, 32), round_up(K, 32), a, lda, b, ldb, c, ldc);
#endif
    pair_gemm(rows, N, (K + 1) / 2, reinterpret_cast<const uint32_t*>(a), lda / 2, 1, b, ldb, c, ldc);
  }
  // C[M, N] = X^T B for X [K, M] given as its row pairs x_pairs [K / 2 (rounded up to 16 when amx, the
  // rest 0), ldx >= M rounded up to 32] (interleave_rows' layout), B as in gemm; `scratch` holds
  // ldx * K / 2 (rounded) values, for X^T's rows when amx
  void gemm_over_pairs(int64_t M, int64_t N, int64_t K, const uint32_t* x_pairs, int64_t ldx, const uint32_t* b,
                       int64_t ldb, float* c, int64_t ldc, uint32_t* scratch) const {
    if (amx) {  // X^T's rows: the pairs transposed
      const int64_t pairs = round_up(K, 32) / 2;
      transpose_pairs(reinterpret_cast<const uint16_t*>(x_pairs), pairs, 2 * ldx, ldx, scratch, pairs);
      return gemm(M, N, K, reinterpret_cast<const uint16_t*>(scratch), 2 * pairs, b, ldb, c, ldc);
    }
    pair_gemm(M, N, (K + 1) / 2, x_pairs, 1, ldx, b, ldb, c, ldc);
  }
};

// out[p, j] = pair p of row j (j < rows; columns up to ld are zero): the pair layout of X^T for X [rows, 2P];
// ld a multiple of 16. Blocks of 16 rows x 16 pairs, transposed in registers.
void transpose_pairs(const uint16_t* x, int64_t rows, int64_t stride, int64_t P, uint32_t* out, int64_t ld) {
  const int64_t padded = round_up(rows, 16);
  for (int64_t p = 0; p < P; ++p) std::memset(out + p * ld + padded, 0, (ld - padded) * sizeof(uint32_t));
  for (int64_t j0 = 0; j0 < rows; j0 += 16) {
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
      const __mmask16 lanes = P - p0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (P - p0)) - 1);
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = j0 + i < rows ? _mm512_maskz_loadu_epi32(lanes, x + (j0 + i) * stride + 2 * p0) : _mm512_setzero_si512();
      transpose16(r);  // r[c]: pair p0 + c of rows j0 .. j0 + 15
      for (int c = 0; c < 16 && p0 + c < P; ++c) _mm512_storeu_si512(out + (p0 + c) * ld + j0, r[c]);
    }
  }
}

// out[r, n] = (X[2r, n], X[2r + 1, n]) for X [rows, N] (a missing last row reads as 0), r < ceil(rows / 2),
// n < N; the pair layout of X as the right operand of a product reducing over its rows. ld >= N.
void interleave_rows(const uint16_t* x, int64_t rows, int64_t stride, int64_t N, uint32_t* out, int64_t ld) {
  static const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                                                 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  static const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  for (int64_t r = 0; r < (rows + 1) / 2; ++r) {
    const uint16_t* x0 = x + 2 * r * stride;
    const bool second = 2 * r + 1 < rows;
    uint32_t* o = out + r * ld;
    for (int64_t n = 0; n < ld; n += 32) {
      const __mmask32 m = n < N ? first_lanes(N - n) : 0;
      const __m512i a = _mm512_maskz_loadu_epi16(m, x0 + n);
      const __m512i b = second ? _mm512_maskz_loadu_epi16(m, x0 + stride + n) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(o + n, ld - n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (ld - n)) - 1),
                               _mm512_permutex2var_epi16(a, lo_idx, b));
      if (ld - n > 16)
        _mm512_mask_storeu_epi32(o + n + 16, ld - n >= 32 ? __mmask16(0xFFFF) : __mmask16((1u << (ld - n - 16)) - 1),
                                 _mm512_permutex2var_epi16(a, hi_idx, b));
    }
  }
}

// The first n fp32 values at src as bf16 at dst.
inline void store_row(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t j = 0; j < n; j += 32)
    store32(dst + j, n - j, _mm512_loadu_ps(src + j), _mm512_loadu_ps(src + j + 16));
}

// Which keys query t may see: bit j of allowed[j / 32]; returns whether any is allowed.
inline bool allowed_keys(const bool* mask, bool causal, int64_t T, int64_t S, int64_t t, __mmask32* allowed) {
  const int64_t last = causal ? std::min(S, S - T + t + 1) : S;  // keys [0, last)
  bool any = false;
  for (int64_t j = 0; j < S; j += 32) {
    __mmask32 m = last > j ? first_lanes(last - j) : 0;
    if (mask) m &= _mm256_cmpneq_epi8_mask(_mm256_maskz_loadu_epi8(first_lanes(S - j), mask + j), _mm256_setzero_si256());
    allowed[j / 32] = m;
    any |= m != 0;
  }
  return any;
}

struct Dropout {
  int64_t seed;
  __m512i threshold;
  __m512 scale;
  bool on;
  int64_t words;  // 64-key blocks per row
  // keep bits of keys 32w .. 32w + 31 of row `row` (all kept without dropout)
  __mmask32 keep(int64_t row, int64_t w) const {
    if (!on) return ~__mmask32(0);
    return static_cast<__mmask32>(draw_keep(seed, row * words + w / 2, threshold) >> (32 * (w % 2)));
  }
};

Dropout make_dropout(int64_t threshold, double scale, int64_t seed, int64_t S) {
  TORCH_CHECK(threshold >= 0 && threshold < 256, "threshold must be in [0, 256)");
  return {seed, _mm512_set1_epi8(static_cast<char>(threshold)), _mm512_set1_ps(static_cast<float>(scale)),
          threshold > 0, (S + 63) / 64};
}

const bool* mask_data(const std::optional<at::Tensor>& key_mask, int64_t B, int64_t S) {
  if (!key_mask.has_value()) return nullptr;
  TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->is_contiguous() && key_mask->dim() == 2 &&
                  key_mask->size(0) == B && key_mask->size(1) == S,
              "key_mask must be a contiguous bool [B, S]");
  return key_mask->data_ptr<bool>();
}

}  // namespace

std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& key_mask, bool causal, double scale,
                                          int64_t threshold, double drop_scale, int64_t seed) {
  const Heads hq(q, "q"), hk(k, "k"), hv(v, "v");
  const Shape n(q.size(0), q.size(1), q.size(2), k.size(2), q.size(3));
  TORCH_CHECK(n.D % 2 == 0 && k.size(3) == n.D && v.sizes() == k.sizes() && k.size(0) == n.B && k.size(1) == n.H,
              "q [B, heads, T, D], k and v [B, heads, S, D] with an even D");
  const bool* mask = mask_data(key_mask, n.B, n.S);
  const Dropout drop = make_dropout(threshold, drop_scale, seed, n.S);
  // context as [B, T, heads, D] (returned as its [B, heads, T, D] view); P for the backward
  auto context = at::empty({n.B, n.T, n.H, n.D}, q.options());
  auto probs = at::empty({n.B, n.H, n.T, n.S}, q.options());
  const Heads ho(context.transpose(1, 2), "context");
  uint16_t* pp = bf16_data_mut(probs);
  const float sc = static_cast<float>(scale);
  parallel_pieces(0, n.B * n.H, kItemsPerPiece, [&](Pieces& pieces) {
    const Products products(n);
    // zero-padded to whole 32-row / 32-column tiles: Q's rows (AMX's copy), V's row pairs, dropout(P)'s rows
    // and columns
    std::vector<uint16_t> qrows(products.amx ? n.Tp * n.D : 0, 0), pd(n.Tp * n.Sp, 0);
    std::vector<uint32_t> kt(n.P * n.Sp), vp(n.Sp / 2 * n.Dp, 0);
    std::vector<float> scores(n.Tp * n.Sp), out(n.Tp * n.Dp);
    std::vector<__mmask32> allowed((n.S + 31) / 32);
    for (int64_t begin, end; pieces.take(begin, end);)
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / n.H, h = item % n.H;
        if (item + 1 < end)
          for (const Heads* x : {&hq, &hk, &hv})
            x->prefetch((item + 1) / n.H, (item + 1) % n.H, x == &hq ? n.T : n.S, n.D);
        transpose_pairs(hk.row(b, h, 0), n.S, hk.st, n.P, kt.data(), n.Sp);
        interleave_rows(hv.row(b, h, 0), n.S, hv.st, n.D, vp.data(), n.Dp);
        const auto [q_rows, q_stride] = hq.rows(b, h, n.T, n.D, products.amx, qrows);
        products.gemm(n.T, n.S, n.D, q_rows, q_stride, kt.data(), n.Sp, scores.data(), n.Sp);
        uint16_t* pd16 = pd.data();
        for (int64_t t = 0; t < n.T; ++t) {
          float* row = scores.data() + t * n.Sp;
          uint16_t* p_out = pp + (item * n.T + t) * n.S;
          uint16_t* d_out = pd16 + t * n.Sp;  // its columns past S stay 0
          if (!allowed_keys(mask ? mask + b * n.S : nullptr, causal, n.T, n.S, t, allowed.data())) {
            std::memset(p_out, 0, n.S * sizeof(uint16_t));
            std::memset(d_out, 0, n.S * sizeof(uint16_t));
            continue;
          }
          __m512 high = _mm512_set1_ps(-INFINITY);
          for (int64_t j = 0; j < n.S; j += 16) {
            const __mmask16 m = static_cast<__mmask16>(allowed[j / 32] >> (j % 32));
            high = _mm512_mask_max_ps(high, m, high, _mm512_mul_ps(_mm512_loadu_ps(row + j), _mm512_set1_ps(sc)));
          }
          const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(high));
          __m512 total = _mm512_setzero_ps();
          for (int64_t j = 0; j < n.S; j += 16) {
            const __mmask16 m = static_cast<__mmask16>(allowed[j / 32] >> (j % 32));
            const __m512 e = _mm512_maskz_mov_ps(
                m, exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(row + j), _mm512_set1_ps(sc), shift)));
            total = _mm512_add_ps(total, e);
            _mm512_storeu_ps(row + j, e);
          }
          const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
          for (int64_t j = 0; j < n.S; j += 32) {
            const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(row + j), inverse);
            const __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(row + j + 16), inverse);
            // dropout of the bf16-rounded P, as the tensor-op path drops the bf16 weights (rounded in registers:
            // reading back the masked store would stall on store forwarding)
            const __m512i rounded = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
            _mm512_mask_storeu_epi16(p_out + j, first_lanes(n.S - j), rounded);
            const __mmask32 keep = drop.keep(item * n.T + t, j / 32);
            __m512 rlo = bf16_to_fp32(_mm512_castsi512_si256(rounded));
            __m512 rhi = bf16_to_fp32(_mm512_extracti64x4_epi64(rounded, 1));
            scale_where(rlo, rhi, keep, drop.scale);
            store32(d_out + j, n.S - j, rlo, rhi);
          }
        }
        products.gemm(n.T, n.D, n.S, pd16, n.Sp, vp.data(), n.Dp, out.data(), n.Dp);
        for (int64_t t = 0; t < n.T; ++t) store_row(ho.row(b, h, t), out.data() + t * n.Dp, n.D);
      }
  });
  return {context.transpose(1, 2), probs};
}

void attention_backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& probs, double scale, int64_t threshold, double drop_scale, int64_t seed,
                        at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  const Heads hg(grad, "grad"), hq(q, "q"), hk(k, "k"), hv(v, "v");
  const Heads gq(grad_q, "grad_q"), gk(grad_k, "grad_k"), gv(grad_v, "grad_v");
  const Shape n(q.size(0), q.size(1), q.size(2), k.size(2), q.size(3));
  check_bf16(probs, "probs");
  TORCH_CHECK(probs.numel() == n.B * n.H * n.T * n.S && grad.sizes() == q.sizes() && grad_q.sizes() == q.sizes() &&
                  grad_k.sizes() == k.sizes() && grad_v.sizes() == v.sizes(),
              "attention_backward: shapes do not match");
  const Dropout drop = make_dropout(threshold, drop_scale, seed, n.S);
  const uint16_t* pp = bf16_data(probs);
  const float sc = static_cast<float>(scale);
  parallel_pieces(0, n.B * n.H, kItemsPerPiece, [&](Pieces& pieces) {
    const Products products(n);
    // zero-padded to whole 32-row / 32-column tiles (see the forward)
    std::vector<uint16_t> grows(products.amx ? n.Tp * n.D : 0, 0), ds(n.Tp * n.Sp, 0), pd(n.Tp * n.Sp, 0);
    std::vector<uint32_t> vt(n.P * n.Sp), kp(n.Sp / 2 * n.Dp, 0), qp(n.Tp / 2 * n.Dp, 0), gp(n.Tp / 2 * n.Dp, 0);
    std::vector<uint32_t> ds_pairs(n.Tp / 2 * n.Sp, 0), pd_pairs(n.Tp / 2 * n.Sp, 0), scratch(n.Sp * n.Tp / 2);
    std::vector<float> dp(n.Tp * n.Sp), out(std::max(n.Tp, n.Sp) * n.Dp);
    for (int64_t begin, end; pieces.take(begin, end);)
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / n.H, h = item % n.H;
        if (item + 1 < end)
          for (const Heads* x : {&hg, &hq, &hk, &hv})
            x->prefetch((item + 1) / n.H, (item + 1) % n.H, x == &hq || x == &hg ? n.T : n.S, n.D);
        transpose_pairs(hv.row(b, h, 0), n.S, hv.st, n.P, vt.data(), n.Sp);
        const auto [g_rows, g_stride] = hg.rows(b, h, n.T, n.D, products.amx, grows);
        products.gemm(n.T, n.S, n.D, g_rows, g_stride, vt.data(), n.Sp, dp.data(), n.Sp);
        uint16_t *ds16 = ds.data(), *pd16 = pd.data();  // rows of Sp values, those past S staying 0
        for (int64_t t = 0; t < n.T; ++t) {
          const uint16_t* p_row = pp + (item * n.T + t) * n.S;
          float* d_row = dp.data() + t * n.Sp;
          __m512 dot = _mm512_setzero_ps();
          for (int64_t j = 0; j < n.S; j += 32) {  // dP = keep * dropscale * dPd (in place), sum_j P_j dP_j
            const __mmask32 keep = drop.keep(item * n.T + t, j / 32);
            __m512 plo, phi;
            load32(p_row + j, n.S - j, plo, phi);
            __m512 lo = _mm512_loadu_ps(d_row + j), hi = _mm512_loadu_ps(d_row + j + 16);
            scale_where(lo, hi, keep, drop.scale);
            _mm512_storeu_ps(d_row + j, lo);
            _mm512_storeu_ps(d_row + j + 16, hi);
            dot = _mm512_fmadd_ps(plo, lo, _mm512_fmadd_ps(phi, hi, dot));
            scale_where(plo, phi, keep, drop.scale);  // dropout(P), for dV
            store32(pd16 + t * n.Sp + j, n.S - j, plo, phi);
          }
          const __m512 r = _mm512_set1_ps(_mm512_reduce_add_ps(dot)), s = _mm512_set1_ps(sc);
          for (int64_t j = 0; j < n.S; j += 32) {
            __m512 plo, phi;
            load32(p_row + j, n.S - j, plo, phi);
            store32(ds16 + t * n.Sp + j, n.S - j,
                    _mm512_mul_ps(_mm512_mul_ps(plo, s), _mm512_sub_ps(_mm512_loadu_ps(d_row + j), r)),
                    _mm512_mul_ps(_mm512_mul_ps(phi, s), _mm512_sub_ps(_mm512_loadu_ps(d_row + j + 16), r)));
          }
        }
        // dQ = dS K
        interleave_rows(hk.row(b, h, 0), n.S, hk.st, n.D, kp.data(), n.Dp);
        products.gemm(n.T, n.D, n.S, ds16, n.Sp, kp.data(), n.Dp, out.data(), n.Dp);
        for (int64_t t = 0; t < n.T; ++t) store_row(gq.row(b, h, t), out.data() + t * n.Dp, n.D);
        // dK = dS^T Q, dV = dropout(P)^T dO: products reducing over the queries
        interleave_rows(ds16, n.T, n.Sp, n.S, ds_pairs.data(), n.Sp);
        interleave_rows(pd16, n.T, n.Sp, n.S, pd_pairs.data(), n.Sp);
        interleave_rows(hq.row(b, h, 0), n.T, hq.st, n.D, qp.data(), n.Dp);
        interleave_rows(hg.row(b, h, 0), n.T, hg.st, n.D, gp.data(), n.Dp);
        products.gemm_over_pairs(n.S, n.D, n.T, ds_pairs.data(), n.Sp, qp.data(), n.Dp, out.data(), n.Dp,
                                 scratch.data());
        for (int64_t j = 0; j < n.S; ++j) store_row(gk.row(b, h, j), out.data() + j * n.Dp, n.D);
        products.gemm_over_pairs(n.S, n.D, n.T, pd_pairs.data(), n.Sp, gp.data(), n.Dp, out.data(), n.Dp,
                                 scratch.data());
        for (int64_t j = 0; j < n.S; ++j) store_row(gv.row(b, h, j), out.data() + j * n.Dp, n.D);
      }
  });
}

}  // namespace nmt
