// Float32 GEMM for XLA:CPU as an XLA FFI custom call: C = op(A) op(B), op = identity or transpose.
//
// Why: XLA:CPU's own GEMMs (YNNPACK/Eigen) run the ViT-B/16 projections at about 1.2x the time of
// PyTorch's MKL; this one at about 1.05x, 0.92-0.93x XLA's inside one jit (README "Speed against
// PyTorch"). The Python side (cpu_gemm.py) compiles it with the local g++ and keeps XLA's dot
// where it cannot. AVX-512 only: elsewhere XLA's GEMM is used.
//
// Layout (BLIS-style): the depth is cut into slices of kDepth; for each slice this task's rows of
// op(A) are packed once into micro-panels [kRows][kDepth] (kRows rows interleaved per depth step),
// and op(B) into panels of kPanelCols columns, kCols-wide micro-panels [kDepth][kCols] that stay
// in L2 while every row micro-panel (in L1) passes over them. The micro-kernel keeps a 14 x 32
// block of C in 28 zmm registers and per depth step broadcasts 14 scalars of A (folded into the
// FMAs' memory operands) against 2 vectors of B. Transposed operands are packed through 16 x 16
// in-register transposes.
//
// Work is split over XLA's intra-op thread pool by rows of C, or by columns where op(A) is the
// larger operand (each task packs all of the operand it does not split).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

#if !defined(__AVX512F__)
#error "cpu_gemm.cc needs AVX-512 (-march of a CPU with avx512f)"
#endif

namespace ffi = xla::ffi;
using larvseg::parallel_for;

namespace {

constexpr int kLanes = 16;                     // floats per zmm
constexpr int kRows = 14;                      // micro-tile rows (A scalars per depth step)
constexpr int kVecs = 2;                       // micro-tile vectors per row
constexpr int kCols = kVecs * kLanes;          // micro-tile columns
constexpr int64_t kDepth = 384;                // depth slice
constexpr int64_t kPanelCols = 16 * kCols;     // columns of a packed B panel (384 x 512: 768 KB)
constexpr int kPrefetch = 8;                   // depth steps ahead for B

typedef float vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));
inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }
// x - (+0.f) is x for every x, so the broadcast folds into the FMA's memory operand.
inline vec splat(float x) { return x - vec{}; }
inline __mmask16 lanes(int n) { return static_cast<__mmask16>((1u << n) - 1); }

// C[rows, cols] (+)= Ap[depth][kRows] Bp[depth][kCols]; rows <= kRows, cols <= kCols. Always
// inlined: as a call, g++ kept it generic and the GEMMs took 1.5x XLA's time.
__attribute__((always_inline)) inline void micro(int64_t depth, const float* __restrict ap,
                                                 const float* __restrict bp, float* c, int64_t ldc,
                                                 bool accumulate, int rows, int cols) {
  for (int i = 0; i < kRows; ++i) {
    __builtin_prefetch(c + i * ldc, 1);
    __builtin_prefetch(c + i * ldc + kLanes, 1);
  }
  vec r[kRows][kVecs];
#pragma GCC unroll 32
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) r[i][v] = vec{};
#pragma GCC unroll 4
  for (int64_t k = 0; k < depth; ++k) {
    __builtin_prefetch(bp + (k + kPrefetch) * kCols);
    __builtin_prefetch(bp + (k + kPrefetch) * kCols + kLanes);
    vec b[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) b[v] = load(bp + k * kCols + v * kLanes);
#pragma GCC unroll 32
    for (int i = 0; i < kRows; ++i) {
      const vec a = splat(ap[k * kRows + i]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) r[i][v] += a * b[v];
    }
  }
  if (rows == kRows && cols == kCols) {
#pragma GCC unroll 32
    for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        float* p = c + i * ldc + v * kLanes;
        store(p, accumulate ? load(p) + r[i][v] : r[i][v]);
      }
    return;
  }
  alignas(64) float t[kRows][kCols];
  for (int i = 0; i < kRows; ++i)
    for (int v = 0; v < kVecs; ++v) store(&t[i][v * kLanes], r[i][v]);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + t[i][j] : t[i][j];
}

// In-register transpose of 16 rows of 16 floats.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// dst[k * ldd + i] = src[i * lds + k] for i < ni (<= 16; lanes ni..keep-1 get zeros), k < nk;
// only the first `keep` lanes of each dst row are written.
void transpose_block(const float* src, int64_t lds, int ni, int64_t nk, float* dst, int64_t ldd,
                     int keep) {
  __m512 r[16];
  int64_t k = 0;
  for (; k + kLanes <= nk; k += kLanes) {
    for (int i = 0; i < 16; ++i)
      r[i] = i < ni ? _mm512_loadu_ps(src + i * lds + k) : _mm512_setzero_ps();
    transpose16(r);
    for (int j = 0; j < kLanes; ++j) _mm512_mask_storeu_ps(dst + (k + j) * ldd, lanes(keep), r[j]);
  }
  if (k == nk) return;
  const int width = static_cast<int>(nk - k);
  for (int i = 0; i < 16; ++i)
    r[i] = i < ni ? _mm512_maskz_loadu_ps(lanes(width), src + i * lds + k) : _mm512_setzero_ps();
  transpose16(r);
  for (int j = 0; j < width; ++j) _mm512_mask_storeu_ps(dst + (k + j) * ldd, lanes(keep), r[j]);
}

// Rows [i0, i0 + rows) x depth [p0, p0 + depth) of op(A) as micro-panels; A is [M, K] row-major
// (lda = K) or, transposed, [K, M] (lda = M). Rows past the end are zeros.
void pack_a(const float* a, bool transposed, int64_t lda, int64_t i0, int64_t rows, int64_t p0,
            int64_t depth, float* out) {
  for (int64_t s = 0; s < rows; s += kRows) {
    const int n = static_cast<int>(std::min<int64_t>(kRows, rows - s));
    float* o = out + s * depth;
    if (transposed) {
      const float* src = a + p0 * lda + i0 + s;
      for (int64_t k = 0; k < depth; ++k)
        _mm512_mask_storeu_ps(o + k * kRows, lanes(kRows),
                              _mm512_maskz_loadu_ps(lanes(n), src + k * lda));
    } else {
      transpose_block(a + (i0 + s) * lda + p0, lda, n, depth, o, kRows, kRows);
    }
  }
}

// Depth [p0, p0 + depth) x columns [j0, j0 + cols) of op(B) as micro-panels; B is [K, N]
// row-major (ldb = N) or, transposed, [N, K] (ldb = K). Columns past the end are zeros.
void pack_b(const float* b, bool transposed, int64_t ldb, int64_t p0, int64_t depth, int64_t j0,
            int64_t cols, float* out) {
  for (int64_t s = 0; s < cols; s += kCols) {
    const int n = static_cast<int>(std::min<int64_t>(kCols, cols - s));
    int width[kVecs];  // columns of each vector of the micro-panel that exist
    for (int v = 0; v < kVecs; ++v) width[v] = std::max(0, std::min(kLanes, n - v * kLanes));
    float* o = out + s * depth;
    if (transposed) {
      for (int v = 0; v < kVecs; ++v)
        transpose_block(b + (j0 + s + v * kLanes) * ldb + p0, ldb, width[v], depth,
                        o + v * kLanes, kCols, kLanes);
      continue;
    }
    const float* src = b + p0 * ldb + j0 + s;
    for (int64_t k = 0; k < depth; ++k)
      for (int v = 0; v < kVecs; ++v)
        _mm512_storeu_ps(o + k * kCols + v * kLanes,
                         _mm512_maskz_loadu_ps(lanes(width[v]), src + k * ldb + v * kLanes));
  }
}

struct Gemm {
  int64_t m, n, k;
  const float* a;
  bool ta;
  const float* b;
  bool tb;
  float* c;
};

// C[m0:m1, n0:n1] of one GEMM, on the calling thread.
void gemm_block(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t lda = g.ta ? g.m : g.k, ldb = g.tb ? g.k : g.n, rows = m1 - m0;
  static thread_local std::vector<float> ap, bp;
  const size_t a_size = ((rows + kRows - 1) / kRows * kRows) * kDepth;
  const size_t b_size = (kPanelCols + kCols) * kDepth;
  if (ap.size() < a_size) ap.resize(a_size);
  if (bp.size() < b_size) bp.resize(b_size);
  for (int64_t p0 = 0; p0 < g.k; p0 += kDepth) {
    const int64_t depth = std::min<int64_t>(kDepth, g.k - p0);
    pack_a(g.a, g.ta, lda, m0, rows, p0, depth, ap.data());
    for (int64_t j0 = n0; j0 < n1; j0 += kPanelCols) {
      const int64_t cols = std::min<int64_t>(kPanelCols, n1 - j0);
      pack_b(g.b, g.tb, ldb, p0, depth, j0, cols, bp.data());
      for (int64_t i = 0; i < rows; i += kRows)
        for (int64_t j = 0; j < cols; j += kCols)
          micro(depth, ap.data() + i * depth, bp.data() + j * depth, g.c + (m0 + i) * g.n + j0 + j,
                g.n, p0 > 0, static_cast<int>(std::min<int64_t>(kRows, rows - i)),
                static_cast<int>(std::min<int64_t>(kCols, cols - j)));
    }
  }
}

void gemm(ffi::ThreadPool& pool, const Gemm& g) {
  if (g.k == 0) {
    std::fill(g.c, g.c + g.m * g.n, 0.f);
    return;
  }
  // Split rows where op(B) [K, N] is the smaller operand (every task packs all of it), else
  // columns (every task packs all of op(A)); in whole micro-tiles.
  const bool by_rows = g.n <= g.m;
  const int64_t extent = by_rows ? g.m : g.n, unit = by_rows ? kRows : kCols;
  const int64_t tasks = std::max<int64_t>(1, pool.num_threads());
  const int64_t per = ((extent + tasks - 1) / tasks + unit - 1) / unit * unit;
  parallel_for(pool, (extent + per - 1) / per, [&](int64_t t) {
    const int64_t lo = t * per, hi = std::min(extent, lo + per);
    if (by_rows)
      gemm_block(g, lo, hi, 0, g.n);
    else
      gemm_block(g, 0, g.m, lo, hi);
  });
}

// a [..., M, K] (or [..., K, M] if transpose_a), b [..., K, N] (or [..., N, K]), c [..., M, N],
// the same leading dims (vmap's broadcast_all gives them).
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const size_t rank = ad.size();
  if (rank < 2 || bd.size() != rank || cd.size() != rank)
    return ffi::Error::InvalidArgument("larvseg_gemm: a, b and c must have one rank >= 2");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (ad[i] != bd[i] || ad[i] != cd[i])
      return ffi::Error::InvalidArgument("larvseg_gemm: leading dims of a, b, c differ");
    batch *= ad[i];
  }
  const int64_t m = transpose_a ? ad[rank - 1] : ad[rank - 2];
  const int64_t k = transpose_a ? ad[rank - 2] : ad[rank - 1];
  const int64_t kb = transpose_b ? bd[rank - 1] : bd[rank - 2];
  const int64_t n = transpose_b ? bd[rank - 2] : bd[rank - 1];
  if (k != kb || cd[rank - 2] != m || cd[rank - 1] != n)
    return ffi::Error::InvalidArgument(
        "larvseg_gemm: shapes do not chain: op(a) " + std::to_string(m) + "x" + std::to_string(k) +
        ", op(b) " + std::to_string(kb) + "x" + std::to_string(n) + ", c " +
        std::to_string(cd[rank - 2]) + "x" + std::to_string(cd[rank - 1]));
  for (int64_t i = 0; i < batch; ++i)
    gemm(pool, Gemm{m, n, k, a.typed_data() + i * m * k, transpose_a, b.typed_data() + i * k * n,
                    transpose_b, c->typed_data() + i * m * n});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LarvsegGemm, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
