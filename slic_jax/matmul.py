"""Matmuls in a compute dtype with float32 accumulation, forward and backward.

`einsum(equation, a, b, dtype=..., out_dtype=...)` computes

    y = cast_{out_dtype}( sum_k cast_{dtype}(a) · cast_{dtype}(b) )   (sum in float32)

For ``dtype = float32`` it is plain ``jnp.einsum`` in float32, differentiated by JAX,
unless ``float32_vjp=True`` on the CPU: then the backward pass below (without rounding)
lays out the gradient matmuls itself (`_canonical_einsum`). For a lower-precision
``dtype`` (bfloat16, float16) the operands are rounded to ``dtype`` and the products
are accumulated in float32
(``preferred_element_type=float32``), which is how TPUs and T5X's bfloat16 models
compute, and the backward pass does the same: the output cotangent g is rounded to
``dtype`` and

    da = einsum(out, b -> a)(g, b),   db = einsum(a, out -> b)(a, g)   (sums in float32)

cast to a's and b's dtypes. Without the custom VJP, JAX's transpose of a mixed-precision
dot multiplies a float32 cotangent with a bfloat16 operand, which XLA computes by
converting both to float32. On CPUs with AMX-BF16, XLA:CPU runs bfloat16 × bfloat16 →
float32 dots in YNNPACK at several times its float32 rate (`tools/benchmark.py` measures
both peaks; `benchmarks/NOTES.md`), while a bfloat16 → bfloat16 dot is converted to
float32 and is slower than float32 itself. On a CPU without a bf16 dot instruction
(neither AVX512_BF16 nor AMX-BF16) the mixed dot runs below XLA:CPU's float32 rate, so
there a dot that does enough FLOPs per operand element (the projections, not the
attention's dots with a [B, H, Q, K] operand) widens its rounded operands to float32 and
runs as a float32 dot: the same products, summed in float32 (`accumulate`, `_widens`,
`platforms.cpu_low_precision_dots`).
On TPUs/GPUs this is the native bf16 matmul.

Equations use explicit single-letter subscripts for both operands and the output
(``'nd,df->nf'``, no ``...``); every subscript of an operand must appear in the other
operand or in the output (no dimension summed within one operand alone), so that both
gradients are einsums of the same form.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from slic_jax import platforms


def _parse(equation: str) -> tuple[str, str, str]:
  try:
    inputs, out = equation.replace(" ", "").split("->")
    sa, sb = inputs.split(",")
  except ValueError:
    raise ValueError(f"matmul.einsum: equation {equation!r} is not of the form 'ab,bc->ac'") from None
  for name, s in (("first operand", sa), ("second operand", sb), ("output", out)):
    if not s.isalpha():
      raise ValueError(f"matmul.einsum: {name} of {equation!r} must be letters only, got {s!r}")
  for s, other in ((sa, sb), (sb, sa)):
    lonely = set(s) - set(other) - set(out)
    if lonely:
      raise ValueError(f"matmul.einsum: subscripts {sorted(lonely)} of {equation!r} are summed "
                       f"within one operand; sum them before the matmul")
  return sa, sb, out


def accumulate(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """``einsum(equation, a, b)`` of the operands as given, products summed in float32.

      out = Σ_k a · b   (float32 result; a, b of one dtype: float32, bfloat16, float16)

  ``jnp.einsum(..., preferred_element_type=float32)``. Traced for a CPU whose bf16 dots
  are not native (`platforms.cpu_low_precision_dots` is 'float32': no AVX512_BF16 or
  AMX-BF16), bfloat16/float16 operands are widened to float32 first where the dot does
  enough FLOPs per operand element to pay for that pass (`_widens`): the same products
  (exact in float32) and the same float32 sums up to their order, at XLA:CPU's float32
  rate instead of its mixed dot's (on a 2-core Xeon without them: mixed 174–205, float32
  261–288, widened 226–250 GFLOP/s for a square 2048 matmul; `benchmarks/NOTES.md`,
  session 38). No custom gradient: for gradients in the compute dtype use `einsum`.
  """
  sa, sb, _ = _parse(equation)
  if _widens({**dict(zip(sa, a.shape)), **dict(zip(sb, b.shape))}, a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)


# Widening a bf16 dot's operands is a pass over them (read 2 bytes, write 4, and the dot
# reads 4 instead of 2); it pays where the dot does enough FLOPs per operand element.
# On the 2-core Xeon without bf16 dots (`tools/bench_widening.py --reps 20`, the two
# forms alternated in one process; `benchmarks/widening_session39_intel.md`): for
# 'mk,kn->mn' in bf16 with M 2048, K 512 the mixed dot took 0.69× the widened time at
# N 64 (124 FLOPs per operand element), 1.17× at N 128 (241), 1.32× at N 2048; the
# attention's p·v and its gradients (about 2·head_dim FLOPs per element of the
# [B, H, Q, K] probabilities) 0.62–0.78× at Li 512 and 0.40–0.49× at Li 1024.
WIDEN_MIN_FLOPS_PER_ELEMENT = 192


def _widens(sizes: dict[str, int], a: jax.Array, b: jax.Array) -> bool:
  """Whether the dot of ``a`` and ``b`` (subscript sizes ``sizes``) runs on operands
  widened to float32 instead of XLA's mixed bf16 × bf16 → f32 dot.

  Only for bfloat16/float16 operands traced for a CPU without native bf16 dots
  (`platforms.cpu_low_precision_dots` 'float32'), and only where the dot does at least
  `WIDEN_MIN_FLOPS_PER_ELEMENT` FLOPs per operand element:

      2 · Π sizes  ≥  WIDEN_MIN_FLOPS_PER_ELEMENT · (|a| + |b|)

  (the model's projections: hundreds to thousands; the attention's dots with a
  [B, H, Q, K] operand: under 2 · head_dim, so they stay mixed).
  """
  if (a.dtype == jnp.float32 or platforms.target_platform() != "cpu"
      or platforms.cpu_low_precision_dots() != "float32"):
    return False
  return 2 * math.prod(sizes.values()) >= WIDEN_MIN_FLOPS_PER_ELEMENT * (a.size + b.size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _mixed_einsum(equation, dtype, out_dtype, a, b):
  return accumulate(equation, a.astype(dtype), b.astype(dtype)).astype(out_dtype)


def _mixed_fwd(equation, dtype, out_dtype, a, b):
  a_c, b_c = a.astype(dtype), b.astype(dtype)
  y = accumulate(equation, a_c, b_c).astype(out_dtype)
  # Residuals in `dtype` (half the memory of float32 ones); zero-size arrays carry the
  # primal dtypes to the backward pass.
  return y, (a_c, b_c, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _mixed_bwd(equation, dtype, out_dtype, res, g):
  del out_dtype
  a_c, b_c, a_tag, b_tag = res
  sa, sb, out = _parse(equation)
  g_c = g.astype(dtype)
  da = _canonical_einsum(out, sb, sa, g_c, b_c)
  db = _canonical_einsum(sa, out, sb, a_c, g_c)
  return da.astype(a_tag.dtype), db.astype(b_tag.dtype)


_mixed_einsum.defvjp(_mixed_fwd, _mixed_bwd)


def _canonical_einsum(sx: str, sy: str, so: str, x, y):
  """einsum(f'{sx},{sy}->{so}', x, y) accumulated in float32, as a canonical matmul.

  XLA:CPU hands a mixed-precision dot to YNNPACK only if its left operand is
  [batch, M, K] and its right operand [batch, K, N] in memory (contracted dimensions last
  on the left, first on the right); otherwise it converts both operands to float32 and
  runs a float32 dot. Gradients of ordinary matmuls are of the other kind (dW = xᵀ g
  contracts x's first dimension), so on CPU the operands are transposed into that layout
  here, and the [batch, M, N] result into the requested order
  (`_materialized_transpose`). Of the two operand orders, the one that moves fewer
  elements is used. A float32 dot in any other layout is run by XLA:CPU after copying
  its operands into this one, choosing which by itself: for dW = xᵀ g it copies the
  cotangent g [tokens, N] where x [tokens, D] is often the smaller (`einsum`'s
  float32_vjp). A right operand of a float32 dot (float32, or widened) may also stay
  [batch, N, K] (contracted dimensions last on both sides, x · yᵀ): XLA:CPU (jax 0.10)
  gives that dot to YNNPACK as it is, so the input gradient of a dense layer,
  g [tokens, F] · W [D, F]ᵀ, moves nothing (a widened W is only cast, by `_widened`)
  where it used to copy W into [F, D] behind a conditional: for T5 1.1 small's
  vocabulary projection a [32128, 512] float32 array. XLA temporaries of the 4-pair
  step 1096 → 1081 MB in float32, 822 → 771 MB in bf16 widened, the same losses, step
  time not shown different (`tools/ab_commits.py`; `benchmarks/NOTES.md`, session 40).
  A mixed bf16 dot keeps the layout it was tuned with (its speed in the other layout is
  unmeasured on a CPU with bf16 dots). Other backends get the einsum as written.
  """
  if platforms.target_platform() != "cpu":
    return jnp.einsum(f"{sx},{sy}->{so}", x, y, preferred_element_type=jnp.float32)
  # Operands of a dot that is not native here are widened to float32 as they are moved
  # where that pays (`_widens`); the float32 dot then takes the same layout.
  sizes = {**dict(zip(sx, x.shape)), **dict(zip(sy, y.shape))}
  widen = _widens(sizes, x, y)
  best = None
  for (s1, v1), (s2, v2) in (((sx, x), (sy, y)), ((sy, y), (sx, x))):
    batch = [c for c in so if c in s1 and c in s2]
    contract = [c for c in s1 if c in s2 and c not in so]
    free1 = [c for c in so if c in s1 and c not in s2]
    free2 = [c for c in so if c in s2 and c not in s1]
    l1, l2 = "".join(batch + free1 + contract), "".join(batch + contract + free2)
    if (v2.dtype == jnp.float32 or widen) and s2 == "".join(batch + free2 + contract):
      l2 = s2  # [batch, N, K]: taken by YNNPACK as it is in a float32 dot
    lo = "".join(batch + free1 + free2)
    cost = ((l1 != s1) * v1.size + (l2 != s2) * v2.size
            + (lo != so) * math.prod(sizes[c] for c in so))
    if best is None or cost < best[0]:
      best = (cost, s1, v1, l1, s2, v2, l2, lo)
  _, s1, v1, l1, s2, v2, l2, lo = best
  dtype = jnp.float32 if widen else None
  v1 = _materialized_transpose(v1, s1, l1, dtype)
  v2 = _materialized_transpose(v2, s2, l2, dtype)
  out = jnp.einsum(f"{l1},{l2}->{lo}", v1, v2, preferred_element_type=jnp.float32)
  return _materialized_transpose(out, lo, so)


def _widened(v: jax.Array) -> jax.Array:
  """v in float32, for a backward-pass operand that the forward pass also widened.

  A bfloat16 number is the upper half of the float32 with its value, so its bits shifted
  into place are that float32 (exact, NaN and infinity included): the same value as
  ``v.astype(float32)`` written as other ops, so that XLA does not merge it (CSE) with the
  forward pass's cast of the same residual and keep that float32 copy alive from the
  forward pass to the backward (T5 1.1 small, bf16 widened, 4 pairs: XLA temporaries
  835 MB, 1113 with a plain cast; `benchmarks/NOTES.md`, session 38). It stays
  elementwise, so a sharded operand stays sharded (a cast behind `_opaque` kept the
  memory down too, 866 MB, but the SPMD partitioner gathered its operand over the mesh).
  Other dtypes: ``astype``.
  """
  if v.dtype != jnp.bfloat16:
    return v.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(v, jnp.uint16).astype(jnp.uint32) << 16
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _materialized_transpose(v, src: str, dst: str, dtype=None):
  """v with its dimensions reordered from `src` to `dst` (and cast to `dtype` if given),
  as an array XLA keeps.

  XLA's simplifier folds a plain transpose into the dot that consumes it, which would
  undo the layout; computed behind `_opaque` it is kept (with the cast in the same pass).
  A cast alone is `_widened`.
  """
  if src == dst:
    return v if dtype is None else _widened(v)
  perm = [src.index(c) for c in dst]
  return _opaque(lambda a: jnp.transpose(a, perm).astype(dtype or a.dtype), v)


def first_element(v: jax.Array) -> jax.Array:
  """``v``'s first element, a scalar: what `_opaque`'s predicate and
  `weight_gradient_first`'s tie read.

  ``v[0, ..., 0]``, which the SPMD partitioner takes from the device that holds it,
  where ``v.reshape(-1)[0]`` would first gather every shard of v whose split axis is not
  v's first (a [B, H, L, K] activation split over heads, a weight's gradient split over
  'mlp'): the bf16 T5 1.1 small step, 32 pairs, Li 512, on a 4×2 mesh sent 1787 instead
  of 714 MB per device (`tools/mesh_step_cost.py`; `benchmarks/NOTES.md`, session 35).
  Only a step traced for the CPU (`platforms.target_platform`) outside a mesh of several
  devices (`jax.sharding.get_abstract_mesh`, set by `jax.set_mesh` in
  `partitioning.Partitioner.activation_rules`) keeps ``v.reshape(-1)[0]``, the form the
  CPU step was tuned with: the index form adds layout copies to XLA:CPU's one-device
  program (`_opaque`'s predicate; `weight_gradient_first`'s under remat 'full'). That
  includes T5X's legacy ``with Mesh(...)`` context on CPU devices, which sets no abstract
  mesh. Traced for a TPU or GPU it is the index form under any context (compiled by
  libtpu for a TPU v5e 4×2 slice under that legacy context with remat 'full', the
  flattening form gathered nothing either: `benchmarks/NOTES.md`, session 36).
  """
  if jax.sharding.get_abstract_mesh().size > 1 or platforms.target_platform() != "cpu":
    return v[(0,) * v.ndim]
  return v.reshape(-1)[0]


def _opaque(fn, v):
  """fn(v) computed inside a `lax.cond`, which XLA can neither fold into the consumers
  nor fuse with the producers (on CPU `optimization_barrier`s are removed before that).
  The predicate only reads one element: the other branch runs when v's first element is
  NaN and returns NaNs, which the clipped, NaN-propagating update would produce anyway.
  """
  out = jax.eval_shape(fn, v)
  first = first_element(v)
  return jax.lax.cond(first == first, fn,
                      lambda a: jnp.full(out.shape, jnp.nan, out.dtype), v)


def materialized(x: jax.Array) -> jax.Array:
  """x unchanged; on the CPU computed once into an array of its own.

  XLA:CPU fuses a cheap producer into every consumer: the attention mask bias (a
  compare and select of the tokens) was recomputed per element inside each layer's
  max and exp passes over the [B, H, Lq, Lk] logits, and the relative position bias
  read through the gather's [Lq·Lk, H] layout. Behind `_opaque` it is computed once
  and read as a plain array: T5 1.1 small, bf16, 4 pairs, Li 1024: step 3.10–3.19 →
  2.98–3.00 s (`benchmarks/NOTES.md`, session 15). Other backends get x itself (a
  conditional there would wait on its predicate).
  """
  if platforms.target_platform() != "cpu":
    return x
  return _opaque(lambda a: a, x)


def _plain_float32(dtype, float32_vjp: bool) -> bool:
  """Whether a float32 matmul is left to JAX's autodiff (see `einsum`'s float32_vjp)."""
  return jnp.dtype(dtype) == jnp.float32 and not (
      float32_vjp and platforms.target_platform() == "cpu")


def einsum(equation: str, a: jax.Array, b: jax.Array, *, dtype: Any,
           out_dtype: Any = None, float32_vjp: bool = False) -> jax.Array:
  """``einsum(equation, a, b)`` computed in ``dtype``, accumulated in float32.

  Args:
    equation: two-operand einsum with explicit subscripts, e.g. ``'nd,df->nf'``.
    a, b: operands of any float dtype (cast to ``dtype``).
    dtype: compute dtype of the operands (float32, bfloat16, float16).
    out_dtype: dtype of the result; default ``dtype``. ``float32`` keeps the float32
      accumulator (e.g. for attention logits or vocabulary logits before a softmax).
    float32_vjp: float32 on the CPU only: the gradients through the custom VJP of the
      lower precisions, with the operands and result in the layout chosen by
      `_canonical_einsum` (the order that moves the fewest elements). Without it JAX's
      transpose of a dot puts the cotangent on the left (dW = (gᵀ x)ᵀ), and XLA:CPU
      copies the cotangent into [N, tokens] for its matmul library: for T5 1.1 small's
      MLP a [2048, 2048] float32 transpose per layer where x's [512, 2048] would do
      (`tools/profile_step.py --dtype float32`; `benchmarks/NOTES.md`, session 15).
      Off (default): JAX's autodiff of ``jnp.einsum``, as on other backends.

  Returns:
    The einsum result in ``out_dtype``; gradients flow to ``a`` and ``b`` in their own
    dtypes (see the module docstring for the backward pass).
  """
  _parse(equation)
  dtype = jnp.dtype(dtype)
  out_dtype = jnp.dtype(out_dtype) if out_dtype is not None else dtype
  if _plain_float32(dtype, float32_vjp):
    return jnp.einsum(equation, a.astype(dtype), b.astype(dtype)).astype(out_dtype)
  return _mixed_einsum(equation, dtype, out_dtype, a, b)


def contract(equation: str, a: jax.Array, b: jax.Array, *, dtype: Any) -> jax.Array:
  """``einsum(equation, a, b)`` in float32 as `einsum`'s own backward pass computes it.

  For custom VJPs elsewhere that need the same gradient matmuls: operands cast to
  ``dtype``, products summed in float32 and returned in float32; on CPU the operands
  and result are moved into the [batch, M, K] × [batch, K, N] layout that keeps a
  lower-precision dot in ``dtype`` and, in float32, copies fewer elements than XLA's
  own choice (`_canonical_einsum`).
  """
  sa, sb, out = _parse(equation)
  dtype = jnp.dtype(dtype)
  a, b = a.astype(dtype), b.astype(dtype)
  return _canonical_einsum(sa, sb, out, a, b)


@jax.custom_vjp
def weight_gradient_first(x: jax.Array, w: jax.Array):
  """(x, w) unchanged; in the backward pass x's cotangent waits for w's.

  The VJP returns (dx + 0 · dw[0], dw): whatever consumes dx (the rest of the backward
  pass, towards the input) depends on the weight gradient dw, so dw = xᵀ · dy is
  computed where dy is, and x and dy are freed there. Weight gradients are otherwise off
  the critical path, and XLA:CPU's scheduler leaves them to the end of the backward
  pass, keeping every layer's matmul inputs and output cotangents alive until then.
  (`optimization_barrier` would not do: XLA:CPU removes it before scheduling.) A NaN or
  infinite dw[0] makes dx NaN, which the NaN-propagating update would be anyway.
  """
  return x, w


def _weight_gradient_first_fwd(x, w):
  return (x, w), None


def _weight_gradient_first_bwd(_, g):
  dx, dw = g
  return dx + (first_element(dw) * 0).astype(dx.dtype), dw


weight_gradient_first.defvjp(_weight_gradient_first_fwd, _weight_gradient_first_bwd)


def dense(x: jax.Array, kernel: jax.Array, *, dtype: Any, out_dtype: Any = None,
          weight_grad_first: bool = False, float32_vjp: bool = False) -> jax.Array:
  """y = x · W over x's last axis: x [..., D], W [D, *F] -> y [..., *F], via `einsum`.

  float32 is a plain ``jnp.tensordot`` (unless ``float32_vjp``, see `einsum`);
  otherwise x's leading axes are flattened into one (``'md,dF->mF'``) so the matmul and
  its gradients are single canonical GEMMs. ``weight_grad_first``: the backward
  computes dW before passing dx on (`weight_gradient_first`).
  """
  if weight_grad_first:
    x, kernel = weight_gradient_first(x, kernel)
  if _plain_float32(dtype, float32_vjp):
    return jnp.tensordot(x.astype(jnp.float32), kernel.astype(jnp.float32), axes=1).astype(
        out_dtype or jnp.float32)
  features = "nopqrstu"[:kernel.ndim - 1]
  y = einsum(f"md,d{features}->m{features}", x.reshape((-1, x.shape[-1])), kernel,
             dtype=dtype, out_dtype=out_dtype, float32_vjp=float32_vjp)
  return y.reshape(x.shape[:-1] + kernel.shape[1:])


def sum_by_dot(x: jax.Array, axis: int = -1, *, keepdims: bool = False,
               weights: jax.Array | None = None) -> jax.Array:
  """Σ of a float32 ``x`` over one ``axis`` (times ``weights`` along it): on the CPU a dot.

      out[..] = Σ_i x[.., i, ..] · w_i = x · w   (w = ``weights``, default ones; float32,
                                                  precision HIGHEST)

  XLA:CPU rewrites every reduction over more than 32 elements into a tree of
  reduce-windows (`TreeReductionRewriter`), which its loop emitter runs far below memory
  bandwidth; a matrix-vector product goes to its matmul library at memory bandwidth
  (T5 1.1 small, bf16 step, 4 pairs, Li 512: the reduce-windows were 12% of the op time,
  `tools/profile_step.py`; `benchmarks/NOTES.md`, session 14). Other backends get a plain
  ``jnp.sum`` (``lax.platform_dependent``). Same value up to float32 summation order.
  """
  axis = axis % x.ndim
  w = (jnp.ones((x.shape[axis],), x.dtype) if weights is None
       else jnp.asarray(weights).astype(x.dtype))

  def by_dot(x, w):
    return jnp.tensordot(x, w, axes=[[axis], [0]], precision=jax.lax.Precision.HIGHEST)

  def by_sum(x, w):
    shape = [1] * x.ndim
    shape[axis] = w.shape[0]
    return jnp.sum(x if weights is None else x * w.reshape(shape), axis=axis)

  out = jax.lax.platform_dependent(x, w, cpu=by_dot, default=by_sum)
  return jnp.expand_dims(out, axis) if keepdims else out


# The first level of `row_max` on the CPU: rows of this many elements (0: one `jnp.max`).
# Read when a step is traced; `tools/benchmark.py --row_max_level` replaces it.
ROW_MAX_LEVEL = 32


def row_max(x: jax.Array, *, keepdims: bool = False) -> jax.Array:
  """max of ``x`` over its last axis [.., N] -> [..] (or [.., 1]), on the CPU in two levels.

      out[..] = max_j max_i x[.., 32 j + i]   (i < 32 = ``ROW_MAX_LEVEL``; exactly max_n x[.., n])

  XLA:CPU rewrites a reduction over more than 32 elements into a tree of reduce-windows
  (`TreeReductionRewriter`, see `sum_by_dot`), and a reduce-window takes no producer into
  its loop: the producer of a softmax's max (logits + mask bias + position bias) is then
  written out as a whole array, read by the max and read again by the exp that
  recomputes it (T5 1.1 small, 4 pairs, Li 1024: a float32 [4, 6, 1024, 1024] per
  encoder layer). Reduced in rows of 32 first (the partial maxima kept apart from the
  second reduction by an optimization barrier, so that XLA's simplifier does not merge
  the two back into one), the first reduction is an ordinary reduce, which XLA fuses
  with its elementwise producer. Where N is not a multiple of 32, or N ≤ 32, and on
  other backends: ``jnp.max``. Same values (a max is exact in any order).
  """
  n, level = x.shape[-1], ROW_MAX_LEVEL

  def two_level(x):
    if not level or n <= level or n % level:
      return jnp.max(x, axis=-1)
    partial = jnp.max(x.reshape(x.shape[:-1] + (n // level, level)), axis=-1)
    return jnp.max(jax.lax.optimization_barrier(partial), axis=-1)

  out = jax.lax.platform_dependent(x, cpu=two_level, default=lambda x: jnp.max(x, axis=-1))
  return out[..., None] if keepdims else out


def sums_by_dot(x: jax.Array, weights: jax.Array) -> tuple[jax.Array, ...]:
  """K weighted sums of a float32 matrix ``x`` [R, C] over its columns, in one read of x.

      out_k[r] = Σ_c x[r, c] · w[c, k]   (w = ``weights`` [C, K]; float32, HIGHEST)

  On the CPU one matrix product x · w (see `sum_by_dot`); elsewhere K sums. Returns the
  K vectors [R].
  """
  w = jnp.asarray(weights).astype(x.dtype)

  def by_dot(x, w):
    return jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)

  def by_sum(x, w):
    return jnp.stack([jnp.sum(x * w[:, k], axis=1) for k in range(w.shape[1])], axis=1)

  out = jax.lax.platform_dependent(x, w, cpu=by_dot, default=by_sum)
  return tuple(out[:, k] for k in range(w.shape[1]))


def broadcast_by_dot(v: jax.Array, lead_shape: tuple[int, ...]) -> jax.Array:
  """``v`` [D] repeated over ``lead_shape``: [*lead_shape, D] (float32 ``v``).

  On the CPU an outer product with ones, ``out = 1 ⊗ v``, whose transpose (the gradient
  of ``v``: the sum of the cotangent over all leading positions) is a matrix-vector
  product, not a reduction (see `sum_by_dot`); elsewhere ``jnp.broadcast_to``.
  """
  n = math.prod(lead_shape)
  ones = jnp.ones((n,), v.dtype)

  def by_dot(v, ones):
    return jnp.einsum('t,d->td', ones, v, precision=jax.lax.Precision.HIGHEST)

  def by_broadcast(v, ones):
    return jnp.broadcast_to(v, (ones.shape[0], v.shape[0]))

  out = jax.lax.platform_dependent(v, ones, cpu=by_dot, default=by_broadcast)
  return out.reshape(tuple(lead_shape) + v.shape)
