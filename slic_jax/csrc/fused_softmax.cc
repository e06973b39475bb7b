// Fused softmax passes of T5 self-attention for XLA:CPU (jax.ffi custom calls).
//
// XLA:CPU runs the elementwise passes between attention's two matmuls (logits + masks
// + relative position bias, the row max, exp, the row sum, the bf16 probabilities;
// backward: the probabilities' cotangent, its sum over the batch and over each
// diagonal for the position bias) as separate loops over [B, H, Lq, Lk] arrays. At
// long inputs those arrays leave the caches and every loop is a trip through memory.
// These two kernels do each direction in one pass, a row of Lk values at a time in L1:
//
//   slic_fused_softmax_fwd_{bf16,f32}(logits f32 [B, H, Q, K], diag f32 [H, Q + K - 1],
//                                     key_segments f32 [B, K], query_segments f32 [B, Q])
//       -> probs bf16 / f32 [B, H, Q, K]
//     x[k] = logits[b, h, q, k] + diag[h, k - q + Q - 1]   (bias of relative position k - q)
//     probs[b, h, q, :] = softmax of x over the keys with key_segments[b, k] ==
//                         query_segments[b, q] (0 for the others); uniform 1 / K when
//                         query_segments[b, q] == 0 (padding) or no key is in its segment
//                         (what T5X's -1e10 mask bias gives). Unpacked inputs pass their
//                         validity (1: a token, 0: padding) as the segments.
//
//   slic_fused_softmax_bwd_{bf16,f32}(dp f32 [B, H, Q, K], probs [B, H, Q, K], row f32 [B, H, Q])
//       -> dlogits [B, H, Q, K] (the probs' dtype), ddiag f32 [H, Q + K - 1]
//     dlogits = probs · (dp − row)    (row = Σ_k probs dp, passed in; bf16: rounded)
//     ddiag[h, k - q + Q - 1] = Σ_b Σ_(q, k on that diagonal) dlogits[b, h, q, k]
//
// Rounding to bf16 is round-to-nearest-even, as XLA's convert. Work is split into
// blocks of query rows run on XLA's intra-op thread pool and the calling thread.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define SLIC_AVX512_BF16 1
#endif

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using slic_jax::ParallelFor;

namespace {

constexpr int64_t kRowsPerBlock = 32;

inline uint16_t ToBf16(float f) {  // round to nearest even (no NaN inputs here)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float FromBf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#ifdef SLIC_AVX512_BF16
inline __mmask16 TailMask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF)
                    : static_cast<__mmask16>((1u << left) - 1u);
}

// exp(x) for x <= 0: 2^n · p(r), n = round(x / ln 2), r = x − n ln 2 (|r| <= ln 2 / 2),
// p a degree-6 polynomial (relative error ~1e-7); below −87.3 the result is ~0.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// One row: x = logits + bias over the keys of the row's segment (key_segments[k] ==
// segment), probs = softmax(x) in T (uint16_t: bf16 bits, or float). `scratch` holds K
// floats. Returns false (row untouched) if no key is in the segment.
template <typename T>
bool SoftmaxRow(const float* logits, const float* bias, const float* key_segments,
                float segment, float* scratch, T* probs, int64_t K) {
#ifdef SLIC_AVX512_BF16
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  const __m512 seg = _mm512_set1_ps(segment);
  __m512 m = neg_inf;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 t = TailMask(K - k);
    const __mmask16 valid = _mm512_mask_cmpeq_ps_mask(
        t, _mm512_maskz_loadu_ps(t, key_segments + k), seg);
    __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(t, logits + k),
                             _mm512_maskz_loadu_ps(t, bias + k));
    x = _mm512_mask_blend_ps(valid, neg_inf, x);
    _mm512_mask_storeu_ps(scratch + k, t, x);
    m = _mm512_max_ps(m, x);
  }
  const float row_max = _mm512_reduce_max_ps(m);
  if (row_max == -INFINITY) return false;
  const __m512 mx = _mm512_set1_ps(row_max);
  __m512 s = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 t = TailMask(K - k);
    const __m512 x = _mm512_maskz_loadu_ps(t, scratch + k);
    // Masked keys (−inf) and the tail give exactly 0.
    const __mmask16 finite = _mm512_mask_cmpneq_ps_mask(t, x, neg_inf);
    const __m512 e = _mm512_maskz_mov_ps(finite, Exp(_mm512_sub_ps(x, mx)));
    _mm512_mask_storeu_ps(scratch + k, t, e);
    s = _mm512_add_ps(s, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(s));
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 t = TailMask(K - k);
    const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, scratch + k), inv);
    if constexpr (std::is_same_v<T, float>) {
      _mm512_mask_storeu_ps(probs + k, t, p);
    } else {
      _mm256_mask_storeu_epi16(probs + k, t, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(p)));
    }
  }
  return true;
#else
  float row_max = -INFINITY;
  for (int64_t k = 0; k < K; ++k) {
    const float x = key_segments[k] == segment ? logits[k] + bias[k] : -INFINITY;
    scratch[k] = x;
    row_max = std::max(row_max, x);
  }
  if (row_max == -INFINITY) return false;
  float s = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float e = scratch[k] == -INFINITY ? 0.f : std::exp(scratch[k] - row_max);
    scratch[k] = e;
    s += e;
  }
  const float inv = 1.0f / s;
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (std::is_same_v<T, float>) {
      probs[k] = scratch[k] * inv;
    } else {
      probs[k] = ToBf16(scratch[k] * inv);
    }
  }
  return true;
#endif
}

// One row of the backward pass: out = p (dp − row) in T; acc[k] += float(out[k]).
template <typename T>
void SoftmaxGradRow(const float* dp, const T* probs, float row, T* out, float* acc,
                    int64_t K) {
#ifdef SLIC_AVX512_BF16
  const __m512 r = _mm512_set1_ps(row);
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 t = TailMask(K - k);
      const __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, probs + k),
                                     _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dp + k), r));
      _mm512_mask_storeu_ps(out + k, t, g);
      _mm512_mask_storeu_ps(acc + k, t, _mm512_add_ps(_mm512_maskz_loadu_ps(t, acc + k), g));
    }
  } else {
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 t = TailMask(K - k);
      const __m512 p = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(t, probs + k)), 16));
      const __m512 g = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dp + k), r));
      const __m256i b = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(g));
      _mm256_mask_storeu_epi16(out + k, t, b);
      const __m512 rounded =
          _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      _mm512_mask_storeu_ps(acc + k, t,
                            _mm512_add_ps(_mm512_maskz_loadu_ps(t, acc + k), rounded));
    }
  }
#else
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (std::is_same_v<T, float>) {
      out[k] = probs[k] * (dp[k] - row);
      acc[k] += out[k];
    } else {
      const uint16_t v = ToBf16(FromBf16(probs[k]) * (dp[k] - row));
      out[k] = v;
      acc[k] += FromBf16(v);
    }
  }
#endif
}

ffi::Error CheckShapes(ffi::Span<const int64_t> d, ffi::Span<const int64_t> diag,
                       ffi::Span<const int64_t> a, ffi::Span<const int64_t> b,
                       bool forward) {
  if (d.size() != 4) return ffi::Error::InvalidArgument("expected a [B, H, Q, K] array");
  const int64_t B = d[0], H = d[1], Q = d[2], K = d[3];
  if (diag.size() != 2 || diag[0] != H || diag[1] != Q + K - 1)
    return ffi::Error::InvalidArgument("the diagonal bias must be [H, Q + K - 1]");
  if (forward) {
    if (a.size() != 2 || a[0] != B || a[1] != K)
      return ffi::Error::InvalidArgument("key_segments must be [B, K]");
    if (b.size() != 2 || b[0] != B || b[1] != Q)
      return ffi::Error::InvalidArgument("query_segments must be [B, Q]");
  } else if (a.size() != 4 || !std::equal(a.begin(), a.end(), d.begin()) ||
             b.size() != 3 || b[0] != B || b[1] != H || b[2] != Q) {
    return ffi::Error::InvalidArgument("probs must be [B, H, Q, K] and row [B, H, Q]");
  }
  return ffi::Error::Success();
}

template <ffi::DataType P>
ffi::Error FusedSoftmaxFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                           ffi::Buffer<ffi::F32> diag, ffi::Buffer<ffi::F32> key_segments,
                           ffi::Buffer<ffi::F32> query_segments, ffi::ResultBuffer<P> probs) {
  using T = ffi::NativeType<P>;
  const auto d = logits.dimensions();
  if (auto e = CheckShapes(d, diag.dimensions(), key_segments.dimensions(),
                           query_segments.dimensions(), true);
      e.failure())
    return e;
  const int64_t B = d[0], H = d[1], Q = d[2], K = d[3], D = Q + K - 1;
  const float* x = logits.typed_data();
  const float* dg = diag.typed_data();
  const float* ks = key_segments.typed_data();
  const float* qs = query_segments.typed_data();
  T* p = probs->typed_data();
  T uniform;
  if constexpr (std::is_same_v<T, float>) {
    uniform = 1.0f / static_cast<float>(K);
  } else {
    uniform = ToBf16(1.0f / static_cast<float>(K));
  }
  const int64_t blocks = (Q + kRowsPerBlock - 1) / kRowsPerBlock;
  ParallelFor(pool, B * H * blocks, [&](int64_t i) {
    const int64_t bh = i / blocks, b = bh / H, h = bh % H;
    const int64_t q0 = (i % blocks) * kRowsPerBlock, q1 = std::min(Q, q0 + kRowsPerBlock);
    std::vector<float> scratch(K + 16);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t at = (bh * Q + q) * K;
      const float segment = qs[b * Q + q];
      if (segment == 0.f || !SoftmaxRow(x + at, dg + h * D + (Q - 1 - q), ks + b * K, segment,
                                        scratch.data(), p + at, K))
        std::fill(p + at, p + at + K, uniform);
    }
  });
  return ffi::Error::Success();
}

template <ffi::DataType P>
ffi::Error FusedSoftmaxBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dp,
                           ffi::Buffer<P> probs, ffi::Buffer<ffi::F32> row,
                           ffi::ResultBuffer<P> dlogits, ffi::ResultBuffer<ffi::F32> ddiag) {
  using T = ffi::NativeType<P>;
  const auto d = dp.dimensions();
  if (auto e = CheckShapes(d, ddiag->dimensions(), probs.dimensions(), row.dimensions(), false);
      e.failure())
    return e;
  const int64_t B = d[0], H = d[1], Q = d[2], K = d[3], D = Q + K - 1;
  const float* g = dp.typed_data();
  const T* p = probs.typed_data();
  const float* rt = row.typed_data();
  T* out = dlogits->typed_data();
  float* dd = ddiag->typed_data();
  // Each block is one head's rows q0..q1 over every b, summed into its own partial
  // diagonal sums; the partials are added per head at the end.
  const int64_t blocks = (Q + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t n = H * blocks;
  std::vector<float> partial(n * D, 0.f);
  ParallelFor(pool, n, [&](int64_t i) {
    const int64_t h = i / blocks;
    const int64_t q0 = (i % blocks) * kRowsPerBlock, q1 = std::min(Q, q0 + kRowsPerBlock);
    float* acc = partial.data() + i * D;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t bh = b * H + h;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t at = (bh * Q + q) * K;
        SoftmaxGradRow(g + at, p + at, rt[bh * Q + q], out + at, acc + (Q - 1 - q), K);
      }
    }
  });
  std::fill(dd, dd + H * D, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    float* o = dd + (i / blocks) * D;
    const float* a = partial.data() + i * D;
    for (int64_t j = 0; j < D; ++j) o[j] += a[j];
  }
  return ffi::Error::Success();
}

}  // namespace

#define SLIC_DEFINE_FWD(name, P)                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, FusedSoftmaxFwd<P>,                          \
                                ffi::Ffi::Bind()                                   \
                                    .Ctx<ffi::ThreadPool>()                        \
                                    .Arg<ffi::Buffer<ffi::F32>>()                  \
                                    .Arg<ffi::Buffer<ffi::F32>>()                  \
                                    .Arg<ffi::Buffer<ffi::F32>>()                  \
                                    .Arg<ffi::Buffer<ffi::F32>>()                  \
                                    .Ret<ffi::Buffer<P>>())
#define SLIC_DEFINE_BWD(name, P)                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, FusedSoftmaxBwd<P>,                          \
                                ffi::Ffi::Bind()                                   \
                                    .Ctx<ffi::ThreadPool>()                        \
                                    .Arg<ffi::Buffer<ffi::F32>>()                  \
                                    .Arg<ffi::Buffer<P>>()                         \
                                    .Arg<ffi::Buffer<ffi::F32>>()                  \
                                    .Ret<ffi::Buffer<P>>()                         \
                                    .Ret<ffi::Buffer<ffi::F32>>())

SLIC_DEFINE_FWD(slic_fused_softmax_fwd_bf16, ffi::BF16);
SLIC_DEFINE_FWD(slic_fused_softmax_fwd_f32, ffi::F32);
SLIC_DEFINE_BWD(slic_fused_softmax_bwd_bf16, ffi::BF16);
SLIC_DEFINE_BWD(slic_fused_softmax_bwd_f32, ffi::F32);
