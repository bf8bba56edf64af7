// Fused softmax attention for XLA:CPU, forward and backward, as XLA FFI custom calls.
//
// Why: XLA:CPU runs the attention core as separate 64-deep dots, exp and reductions over
// [bq, N] blocks at about half the speed of PyTorch's fused CPU kernel; this file keeps each
// (batch, head) pair's query block in cache from QK^T through softmax to PV (and, backward,
// to dQ, dK, dV). Float32, heads-first [..., N, Dh] with Dh a multiple of 16; the Python side
// (cpu_attention.py) compiles it with the local g++ and falls back to XLA when it cannot.
//
// Math (the same as attention.py's custom_vjp path): S = (Q / sqrt(Dh)) K^T, P = softmax(S),
// O = P V, lse = logsumexp(S); backward with D = rowsum(dO * O): dS = P * (dO V^T - D),
// dQ = dS K / sqrt(Dh), dK = dS^T Q / sqrt(Dh), dV = P^T dO.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using larvseg::parallel_for;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // one zmm register
constexpr int kTileRows = 6;  // 6 x 4 accumulators + 4 operand registers of 32
constexpr int kTileVecs = 4;
#else
constexpr int kLanes = 8;  // AVX2 ymm (or what the compiler makes of it)
constexpr int kTileRows = 6;  // 6 x 2 accumulators + 2 operand registers of 16
constexpr int kTileVecs = 2;
#endif
constexpr int kQueryBlock = 64;  // query rows kept in cache from scores to outputs
constexpr int kDepthBlock = 128;  // reduction rows of B kept in L1 by the long products

// Unaligned vector of kLanes floats (GCC/Clang vector extension: portable across ISAs).
typedef float vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t)), aligned(4)));

inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }
// x - (+0.f) is x for every x (-0 included), so the compiler folds it into a broadcast load; the
// former vec{} + x is not (it turns -0 into +0) and cost an add and a register broadcast per
// scalar, both on the FMA ports: the attention core took 1.3x as long.
inline vec splat(float x) { return x - vec{}; }

// exp(x) for x <= ~88 (Cephes expf: round(x / ln 2) range reduction, degree-6 polynomial,
// about 1 ulp); inputs below -87.3 give ~1e-38 rather than 0, callers zero what must be zero.
inline vec exp_vec(vec x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  const vec magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vec n = (x * splat(1.44269504088896341f) + magic) - magic;
  vec r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  vec y = splat(1.9875691500e-4f);
  y = y * r + splat(1.3981999507e-3f);
  y = y * r + splat(8.3334519073e-3f);
  y = y * r + splat(4.1665795894e-2f);
  y = y * r + splat(1.6666665459e-1f);
  y = y * r + splat(5.0000001201e-1f);
  y = y * r * r + r + splat(1.0f);
  ivec e = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec two_n;
  std::memcpy(&two_n, &e, sizeof(two_n));
  return y * two_n;
}

inline float hmax(vec v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

inline float hsum(vec v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// C[r, 0:V*kLanes] (+)= sum_k a[r*ars + k*aks] * B[k*ldb + 0:V*kLanes] for r < R, k < depth:
// R x V accumulators stay in registers, each step broadcasts R scalars of A against V vectors of
// B. General A strides serve A, A^T and row-padded operands with one kernel.
template <int R, int V>
inline void tile(const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb, float* c,
                 int64_t ldc, int64_t depth, bool accumulate) {
  vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? load(c + r * ldc + v * kLanes) : vec{};
  for (int64_t k = 0; k < depth; ++k) {
    vec bv[V];
    for (int v = 0; v < V; ++v) bv[v] = load(b + k * ldb + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const vec ar = splat(a[r * ars + k * aks]);
      for (int v = 0; v < V; ++v) acc[r][v] += ar * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store(c + r * ldc + v * kLanes, acc[r][v]);
}

template <int V>
inline void row_tiles(int64_t rows, const float* a, int64_t ars, int64_t aks, const float* b,
                      int64_t ldb, float* c, int64_t ldc, int64_t depth, bool accumulate) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    tile<kTileRows, V>(a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc, depth, accumulate);
  const float* ar = a + r * ars;
  float* cr = c + r * ldc;
  switch (rows - r) {  // kTileRows is 6
    case 5: tile<5, V>(ar, ars, aks, b, ldb, cr, ldc, depth, accumulate); break;
    case 4: tile<4, V>(ar, ars, aks, b, ldb, cr, ldc, depth, accumulate); break;
    case 3: tile<3, V>(ar, ars, aks, b, ldb, cr, ldc, depth, accumulate); break;
    case 2: tile<2, V>(ar, ars, aks, b, ldb, cr, ldc, depth, accumulate); break;
    case 1: tile<1, V>(ar, ars, aks, b, ldb, cr, ldc, depth, accumulate); break;
    default: break;
  }
}

// C[rows, cols] (+)= A[rows, depth] B[depth, cols], A strided (ars, aks), B and C row-major,
// cols a multiple of kLanes. The reduction is cut into kDepthBlock slices and, within a
// slice, every row tile reuses the same B panel from L1.
void matmul(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t ars, int64_t aks,
            const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t kPanel = kTileVecs * kLanes;
  for (int64_t k0 = 0; k0 < depth; k0 += kDepthBlock) {
    const int64_t kd = std::min<int64_t>(kDepthBlock, depth - k0);
    const bool acc = accumulate || k0 > 0;
    const float* ak = a + k0 * aks;
    const float* bk = b + k0 * ldb;
    int64_t j = 0;
    for (; j + kPanel <= cols; j += kPanel)
      row_tiles<kTileVecs>(rows, ak, ars, aks, bk + j, ldb, c + j, ldc, kd, acc);
    for (; j < cols; j += kLanes) row_tiles<1>(rows, ak, ars, aks, bk + j, ldb, c + j, ldc, kd, acc);
  }
}

// dst[d, j] = src[j, d] for j < n, zero for n <= j < ld: the [Dh, N] operand of the score-form
// products (columns are keys, so a B row is contiguous).
void transpose_padded(const float* src, int64_t n, int64_t dh, float* dst, int64_t ld) {
  for (int64_t d = 0; d < dh; ++d) {
    float* row = dst + d * ld;
    for (int64_t j = 0; j < n; ++j) row[j] = src[j * dh + d];
    for (int64_t j = n; j < ld; ++j) row[j] = 0.f;
  }
}

// Row r of s (length ld, n valid) becomes exp(s - shift[r]) with padding set to 0.
void exp_rows(float* s, int64_t rows, int64_t n, int64_t ld, const float* shift) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    const vec m = splat(shift[r]);
    for (int64_t j = 0; j < ld; j += kLanes) store(row + j, exp_vec(load(row + j) - m));
    for (int64_t j = n; j < ld; ++j) row[j] = 0.f;
  }
}

int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

struct Shape {
  int64_t heads;  // product of the leading dims
  int64_t n;
  int64_t dh;
};

ffi::Error shape_of(const ffi::Buffer<ffi::F32>& x, const char* name, Shape* shape) {
  auto dims = x.dimensions();
  if (dims.size() < 2)
    return ffi::Error::InvalidArgument(std::string(name) + " must be [..., N, Dh]");
  shape->n = dims[dims.size() - 2];
  shape->dh = dims[dims.size() - 1];
  shape->heads = 1;
  for (size_t i = 0; i + 2 < dims.size(); ++i) shape->heads *= dims[i];
  if (shape->dh % 16 != 0)
    return ffi::Error::InvalidArgument(std::string(name) + ": head dim must be a multiple of 16");
  return ffi::Error::Success();
}

ffi::Error same_shape(const ffi::Buffer<ffi::F32>& x, const Shape& s, const char* name) {
  Shape t;
  if (auto e = shape_of(x, name, &t); e.failure()) return e;
  if (t.heads != s.heads || t.n != s.n || t.dh != s.dh)
    return ffi::Error::InvalidArgument(std::string(name) + " differs in shape from q");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse) {
  Shape s;
  if (auto e = shape_of(q, "q", &s); e.failure()) return e;
  if (auto e = same_shape(k, s, "k"); e.failure()) return e;
  if (auto e = same_shape(v, s, "v"); e.failure()) return e;
  const int64_t n = s.n, dh = s.dh, ld = padded(n);
  const float scale = 1.f / std::sqrt(static_cast<float>(dh));
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  parallel_for(pool, s.heads, [&](int64_t h) {
    const float *qh = qp + h * n * dh, *kh = kp + h * n * dh, *vh = vp + h * n * dh;
    float *oh = op + h * n * dh, *lh = lp + h * n;
    std::vector<float> kt(dh * ld), sc(kQueryBlock * ld), qs(kQueryBlock * dh);
    float shift[kQueryBlock], inv_total[kQueryBlock];  // row max; 1 / row sum of exp(s - max)
    transpose_padded(kh, n, dh, kt.data(), ld);
    for (int64_t i0 = 0; i0 < n; i0 += kQueryBlock) {
      const int64_t rows = std::min<int64_t>(kQueryBlock, n - i0);
      for (int64_t i = 0; i < rows * dh; ++i) qs[i] = qh[i0 * dh + i] * scale;
      matmul(rows, ld, dh, qs.data(), dh, 1, kt.data(), ld, sc.data(), ld, false);
      for (int64_t r = 0; r < rows; ++r) {
        float* row = sc.data() + r * ld;
        vec m = splat(-INFINITY);
        int64_t j = 0;
        for (; j + kLanes <= n; j += kLanes) m = m > load(row + j) ? m : load(row + j);
        float mx = hmax(m);
        for (; j < n; ++j) mx = std::max(mx, row[j]);
        shift[r] = mx;
      }
      exp_rows(sc.data(), rows, n, ld, shift);
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = sc.data() + r * ld;
        vec acc{};
        for (int64_t j = 0; j < ld; j += kLanes) acc += load(row + j);
        const float total = hsum(acc);
        lh[i0 + r] = shift[r] + std::log(total);
        inv_total[r] = 1.f / total;
      }
      float* ob = oh + i0 * dh;
      matmul(rows, dh, n, sc.data(), ld, 1, vh, dh, ob, dh, false);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < dh; d += kLanes)
          store(ob + r * dh + d, load(ob + r * dh + d) * splat(inv_total[r]));
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Shape s;
  if (auto e = shape_of(q, "q", &s); e.failure()) return e;
  for (auto [x, name] : {std::pair{&k, "k"}, {&v, "v"}, {&o, "o"}, {&dout, "do"}})
    if (auto e = same_shape(*x, s, name); e.failure()) return e;
  if (lse.element_count() != static_cast<size_t>(s.heads * s.n))
    return ffi::Error::InvalidArgument("lse must hold one value per query row");
  const int64_t n = s.n, dh = s.dh, ld = padded(n);
  const float scale = 1.f / std::sqrt(static_cast<float>(dh));
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = o.typed_data(), *lp = lse.typed_data(), *gp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  parallel_for(pool, s.heads, [&](int64_t h) {
    const int64_t off = h * n * dh;
    const float *qh = qp + off, *kh = kp + off, *vh = vp + off, *oh = op + off, *gh = gp + off;
    const float* lh = lp + h * n;
    float *dqh = dqp + off, *dkh = dkp + off, *dvh = dvp + off;
    std::vector<float> kt(dh * ld), vt(dh * ld), p(kQueryBlock * ld), ds(kQueryBlock * ld),
        qs(kQueryBlock * dh);
    float delta[kQueryBlock];
    transpose_padded(kh, n, dh, kt.data(), ld);
    transpose_padded(vh, n, dh, vt.data(), ld);
    std::fill(dkh, dkh + n * dh, 0.f);
    std::fill(dvh, dvh + n * dh, 0.f);
    for (int64_t i0 = 0; i0 < n; i0 += kQueryBlock) {
      const int64_t rows = std::min<int64_t>(kQueryBlock, n - i0);
      const float* g = gh + i0 * dh;
      for (int64_t i = 0; i < rows * dh; ++i) qs[i] = qh[i0 * dh + i] * scale;
      for (int64_t r = 0; r < rows; ++r) {
        vec acc{};
        for (int64_t d = 0; d < dh; d += kLanes)
          acc += load(g + r * dh + d) * load(oh + (i0 + r) * dh + d);
        delta[r] = hsum(acc);
      }
      matmul(rows, ld, dh, qs.data(), dh, 1, kt.data(), ld, p.data(), ld, false);
      exp_rows(p.data(), rows, n, ld, lh + i0);  // P, recomputed from the saved lse
      matmul(rows, ld, dh, g, dh, 1, vt.data(), ld, ds.data(), ld, false);  // dP = dO V^T
      for (int64_t r = 0; r < rows; ++r) {
        float *pr = p.data() + r * ld, *dr = ds.data() + r * ld;
        const vec dl = splat(delta[r]);
        for (int64_t j = 0; j < ld; j += kLanes) store(dr + j, load(pr + j) * (load(dr + j) - dl));
      }
      matmul(n, dh, rows, p.data(), 1, ld, g, dh, dvh, dh, true);  // dV += P^T dO
      matmul(n, dh, rows, ds.data(), 1, ld, qs.data(), dh, dkh, dh, true);  // dK += dS^T Qs
      float* dqb = dqh + i0 * dh;
      matmul(rows, dh, n, ds.data(), ld, 1, kh, dh, dqb, dh, false);  // dQ = dS K
      for (int64_t i = 0; i < rows * dh; ++i) dqb[i] *= scale;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LarvsegAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LarvsegAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
