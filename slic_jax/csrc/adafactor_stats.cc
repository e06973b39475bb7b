// Adafactor's two reductions over a factored gradient for XLA:CPU (jax.ffi custom calls).
//
// A factored Adafactor update (slic_jax.optimizers.clipped_adafactor) needs, per
// gradient g [R, C], the sums of g² along each axis (its second-moment statistics and,
// summed, g's share of the global norm) and, once the new statistics give the factors
// f0 [R] and f1 [C], Σ g² f0² f1² (the update's RMS). XLA:CPU computes the first as a
// squared copy of g read by matrix-vector products and the norm as its own reduction
// tree; these kernels read g once for each:
//
//   slic_adafactor_square_sums(g f32 [R, C]) -> rows f32 [R], cols f32 [C]
//     rows[r] = Σ_c g[r, c]²,   cols[c] = Σ_r g[r, c]²
//
//   slic_adafactor_weighted_square_sum(g f32 [R, C], w0 f32 [R], w1 f32 [C]) -> f32 []
//     Σ_r w0[r] Σ_c g[r, c]² w1[c]
//
// Each row's sum runs in float32 lanes (AVX-512 where the target has it, 16 lanes
// of plain loops the compiler vectorises otherwise), rows are split into blocks on XLA's intra-op thread pool and the calling
// thread, the column sums are per-block partials added at the end, and the weighted
// sum adds rows in double precision.
#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using slic_jax::ParallelFor;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kMinRowsPerBlock = 8;

// Rows per block: a few blocks per thread, at least kMinRowsPerBlock rows each.
int64_t RowsPerBlock(const ffi::ThreadPool& pool, int64_t rows) {
  const int64_t blocks = std::max<int64_t>(1, 4 * std::max<int64_t>(1, pool.num_threads()));
  return std::max(kMinRowsPerBlock, (rows + blocks - 1) / blocks);
}

// Σ_c x[c]² · w[c] (w == nullptr: weights 1); with cols != nullptr also cols[c] += x[c]².
template <bool kWeighted, bool kCols>
inline float RowSquares(const float* __restrict x, const float* __restrict w,
                        float* __restrict cols, int64_t n) {
  int64_t c = 0;
  float total = 0.f;
#ifdef __AVX512F__
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; c + 2 * kLanes <= n; c += 2 * kLanes) {
    const __m512 x0 = _mm512_loadu_ps(x + c), x1 = _mm512_loadu_ps(x + c + kLanes);
    const __m512 s0 = _mm512_mul_ps(x0, x0), s1 = _mm512_mul_ps(x1, x1);
    if constexpr (kCols) {
      _mm512_storeu_ps(cols + c, _mm512_add_ps(_mm512_loadu_ps(cols + c), s0));
      _mm512_storeu_ps(cols + c + kLanes,
                       _mm512_add_ps(_mm512_loadu_ps(cols + c + kLanes), s1));
    }
    if constexpr (kWeighted) {
      acc0 = _mm512_fmadd_ps(s0, _mm512_loadu_ps(w + c), acc0);
      acc1 = _mm512_fmadd_ps(s1, _mm512_loadu_ps(w + c + kLanes), acc1);
    } else {
      acc0 = _mm512_add_ps(acc0, s0);
      acc1 = _mm512_add_ps(acc1, s1);
    }
  }
  total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
  float lanes[kLanes] = {0.f};
  for (; c + kLanes <= n; c += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const float sq = x[c + j] * x[c + j];
      if constexpr (kCols) cols[c + j] += sq;
      lanes[j] += kWeighted ? sq * w[c + j] : sq;
    }
  }
  for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
#endif
  for (; c < n; ++c) {
    const float sq = x[c] * x[c];
    if constexpr (kCols) cols[c] += sq;
    total += kWeighted ? sq * w[c] : sq;
  }
  return total;
}

ffi::Error CheckMatrix(const ffi::Span<const int64_t>& d) {
  if (d.size() != 2)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "slic_adafactor kernels take a rank-2 gradient [R, C]");
  return ffi::Error::Success();
}

ffi::Error SquareSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> rows, ffi::ResultBuffer<ffi::F32> cols) {
  const auto d = g.dimensions();
  if (auto e = CheckMatrix(d); e.failure()) return e;
  const int64_t R = d[0], C = d[1];
  if (rows->dimensions().size() != 1 || rows->dimensions()[0] != R ||
      cols->dimensions().size() != 1 || cols->dimensions()[0] != C)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "slic_adafactor_square_sums: results must be [R] and [C]");
  const float* x = g.typed_data();
  float* row_out = rows->typed_data();
  float* col_out = cols->typed_data();
  const int64_t per = RowsPerBlock(pool, R);
  const int64_t blocks = (R + per - 1) / per;
  std::vector<float> partial(blocks * C, 0.f);
  ParallelFor(pool, blocks, [&](int64_t i) {
    float* acc = partial.data() + i * C;
    for (int64_t r = i * per, end = std::min(R, r + per); r < end; ++r)
      row_out[r] = RowSquares<false, true>(x + r * C, nullptr, acc, C);
  });
  std::fill(col_out, col_out + C, 0.f);
  for (int64_t i = 0; i < blocks; ++i) {
    const float* a = partial.data() + i * C;
    for (int64_t c = 0; c < C; ++c) col_out[c] += a[c];
  }
  return ffi::Error::Success();
}

ffi::Error WeightedSquareSum(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                             ffi::Buffer<ffi::F32> w0, ffi::Buffer<ffi::F32> w1,
                             ffi::ResultBuffer<ffi::F32> out) {
  const auto d = g.dimensions();
  if (auto e = CheckMatrix(d); e.failure()) return e;
  const int64_t R = d[0], C = d[1];
  if (w0.dimensions().size() != 1 || w0.dimensions()[0] != R ||
      w1.dimensions().size() != 1 || w1.dimensions()[0] != C)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "slic_adafactor_weighted_square_sum: weights must be [R] and [C]");
  const float* x = g.typed_data();
  const float* a = w0.typed_data();
  const float* b = w1.typed_data();
  const int64_t per = RowsPerBlock(pool, R);
  const int64_t blocks = (R + per - 1) / per;
  std::vector<double> partial(blocks, 0.0);
  ParallelFor(pool, blocks, [&](int64_t i) {
    double acc = 0.0;
    for (int64_t r = i * per, end = std::min(R, r + per); r < end; ++r)
      acc += static_cast<double>(a[r]) * RowSquares<true, false>(x + r * C, b, nullptr, C);
    partial[i] = acc;
  });
  double total = 0.0;
  for (double p : partial) total += p;
  *out->typed_data() = static_cast<float>(total);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(slic_adafactor_square_sums, SquareSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(slic_adafactor_weighted_square_sum, WeightedSquareSum,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
