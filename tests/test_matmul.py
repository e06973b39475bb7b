"""slic_jax.matmul: compute-dtype matmuls with float32 accumulation, forward and backward."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slic_jax import matmul

BF16 = jnp.bfloat16


def _round(x):
  return x.astype(BF16).astype(jnp.float32)


# (equation, shape of a, shape of b): the projections' and attention's matmuls.
EQUATIONS = [
    ("nd,df->nf", (6, 8), (8, 5)),
    ("md,dnf->mnf", (6, 8), (8, 3, 5)),
    ("bqhd,bkhd->bhqk", (2, 4, 3, 8), (2, 5, 3, 8)),
    ("bhqk,bkhd->bqhd", (2, 3, 4, 5), (2, 5, 3, 8)),
]


@pytest.mark.parametrize("dots,widen_min", [("native", None), ("float32", 0)])
@pytest.mark.parametrize("equation,sa,sb", EQUATIONS)
def test_bf16_forward_and_gradients_match_float32_on_rounded_operands(equation, sa, sb, dots,
                                                                      widen_min,
                                                                      low_precision_dots):
  """y = Σ round(a)·round(b) in float32; da = round(g)·round(b)ᵀ, db = round(a)ᵀ·round(g).

  With bf16 × bf16 → f32 dots and with the rounded operands widened to float32 first (a
  CPU without native bf16 dots, `platforms.cpu_low_precision_dots`; every dot widened
  here, whatever its size).
  """
  low_precision_dots(dots, widen_min)
  ka, kb, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  a = jax.random.normal(ka, sa, jnp.float32)
  b = jax.random.normal(kb, sb, jnp.float32)
  out_shape = jnp.einsum(equation, a, b).shape
  g = jax.random.normal(kg, out_shape, jnp.float32)

  y, vjp = jax.vjp(lambda a, b: matmul.einsum(equation, a, b, dtype=BF16,
                                               out_dtype=jnp.float32), a, b)
  da, db = vjp(g)
  # Reference: float32 einsum of the bf16-rounded operands (bf16 products are exact in f32).
  y_ref, vjp_ref = jax.vjp(lambda a, b: jnp.einsum(equation, a, b), _round(a), _round(b))
  da_ref, db_ref = vjp_ref(_round(g))
  assert y.dtype == jnp.float32 and da.dtype == a.dtype and db.dtype == b.dtype
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(da, da_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(db, db_ref, rtol=1e-5, atol=1e-5)
  # ... and it is not the float32 product (the operands really are rounded).
  assert not np.allclose(y, jnp.einsum(equation, a, b), rtol=1e-6, atol=1e-6)


def test_bf16_output_dtype_and_float32_path_is_plain_einsum():
  a = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
  b = jax.random.normal(jax.random.PRNGKey(2), (8, 3))
  assert matmul.einsum("nd,df->nf", a, b, dtype=BF16).dtype == BF16
  y32 = matmul.einsum("nd,df->nf", a, b, dtype=jnp.float32)
  np.testing.assert_array_equal(y32, jnp.einsum("nd,df->nf", a, b))
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 8))
  np.testing.assert_array_equal(matmul.dense(x, b, dtype=jnp.float32), jnp.dot(x, b))
  np.testing.assert_allclose(matmul.dense(x, b, dtype=BF16, out_dtype=jnp.float32),
                             jnp.dot(_round(x), _round(b)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation,message", [
    ("...d,df->...f", "letters only"),
    ("nd,df", "not of the form"),
    ("nd,ef->nf", "summed within one operand"),
])
def test_bad_equations_are_named(equation, message):
  a, b = jnp.ones((2, 3)), jnp.ones((3, 4))
  with pytest.raises(ValueError, match=message) as e:
    matmul.einsum(equation, a, b, dtype=BF16)
  assert re.escape(equation) in re.escape(str(e.value)) or equation in str(e.value)


def test_backward_nan_propagates():
  """The layout helper's other branch (first element NaN) still yields NaN gradients."""
  a = jnp.ones((4, 8)).at[0, 0].set(jnp.nan)
  b = jnp.ones((8, 3))
  da, db = jax.grad(lambda a, b: matmul.einsum("nd,df->nf", a, b, dtype=BF16,
                                                out_dtype=jnp.float32).sum(),
                    argnums=(0, 1))(a, b)
  assert np.isnan(np.asarray(db)).any() and np.isfinite(np.asarray(da)).all()


def _dot_operand_types(hlo: str) -> list[list[str]]:
  """[[lhs dtype, rhs dtype]] of every float32-result dot of a compiled HLO text."""
  dots = re.findall(r"= f32\[[\d,]+\]\{[\d,]+\} dot\(([^)]*)\)", hlo)
  operand_types = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?(%\S+) = (\w+)\[", line)
    if m:
      operand_types[m.group(1)] = m.group(2)
  return [[operand_types.get(o.strip()) for o in ops.split(",")] for ops in dots]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU lowering check")
@pytest.mark.parametrize("dots,shape,operands", [
    ("native", (64, 32, 48), "bf16"), ("native", (256, 256, 256), "bf16"),
    ("float32", (256, 256, 256), "f32"), ("float32", (64, 32, 48), "bf16")])
def test_cpu_backward_dots_stay_bfloat16(low_precision_dots, dots, shape, operands):
  """All three dots of a dense layer's forward + backward run bf16 × bf16 → f32 on CPU
  ('native'), never one operand of each dtype. Where bf16 dots are not native
  ('float32', `platforms.cpu_low_precision_dots`) the three dots of a [256, 256] ×
  [256, 256] layer (256 FLOPs per operand element each) run float32 × float32 (the
  rounded operands widened); those of a [64, 32] × [32, 48] one (38–55) stay bf16.

  Without the materialised transposes XLA folds the weight-gradient transpose into the
  dot, cannot give that dot to YNNPACK and converts its operands to float32.
  """
  low_precision_dots(dots)
  m, k, n = shape
  x = jnp.ones((m, k), jnp.float32)
  w = jnp.ones((k, n), jnp.float32)

  def loss(x, w):
    return jnp.sum(jnp.tanh(matmul.dense(jnp.tanh(x), w, dtype=BF16).astype(jnp.float32)))

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
  assert _dot_operand_types(hlo) == [[operands, operands]] * 3, hlo


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU lowering check")
def test_accumulate_widens_only_low_precision_operands_on_the_cpu(low_precision_dots):
  """`accumulate`: bf16 operands widened under 'float32', kept under 'native'; float32
  operands as they are; the same values either way (bf16 products are exact in f32)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (256, 64)).astype(BF16)
  b = jax.random.normal(jax.random.PRNGKey(1), (64, 256)).astype(BF16)
  out = {}
  for dots in ("native", "float32"):
    low_precision_dots(dots)
    fn = jax.jit(lambda a, b: matmul.accumulate("mk,kn->mn", a, b))
    assert _dot_operand_types(fn.lower(a, b).compile().as_text()) == [
        ["bf16", "bf16"] if dots == "native" else ["f32", "f32"]]
    out[dots] = fn(a, b)
    assert out[dots].dtype == jnp.float32
  # (sums of 64 products: only their order differs)
  np.testing.assert_allclose(out["native"], out["float32"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["float32"], a.astype(jnp.float32) @ b.astype(jnp.float32),
                             rtol=1e-5, atol=1e-5)
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  assert _dot_operand_types(jax.jit(lambda a, b: matmul.accumulate("mk,kn->mn", a, b))
                            .lower(a32, b32).compile().as_text()) == [["f32", "f32"]]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU lowering check")
@pytest.mark.parametrize("equation,sa,sb,flops_per_element", [
    # attention scores q·kᵀ: K FLOPs per element of q and k
    ("bqhd,bkhd->bhqk", (2, 256, 2, 16), (2, 256, 2, 16), 256),
    ("bqhd,bkhd->bhqk", (2, 128, 2, 16), (2, 128, 2, 16), 128),
    # p·v: 2·Q·D / (Q + D) per element of the [B, H, Q, K] probabilities and v
    ("bhqk,bkhd->bqhd", (2, 2, 256, 256), (2, 256, 2, 256), 256),
    ("bhqk,bkhd->bqhd", (2, 2, 256, 256), (2, 256, 2, 64), 102.4),
])
def test_only_dots_with_enough_flops_per_operand_element_are_widened(
    low_precision_dots, equation, sa, sb, flops_per_element):
  """Widening is a pass over the operands: in 'float32' mode a bf16 dot is widened iff
  2 · Π sizes ≥ `matmul.WIDEN_MIN_FLOPS_PER_ELEMENT` · (|a| + |b|), forward
  (`accumulate`) and backward (`contract`, `_canonical_einsum`) alike."""
  low_precision_dots("float32")
  a = jnp.ones(sa, BF16)
  b = jnp.ones(sb, BF16)
  sizes = {**dict(zip(equation[:4], sa)), **dict(zip(equation[5:9], sb))}
  assert 2 * np.prod(list(sizes.values())) / (a.size + b.size) == pytest.approx(
      flops_per_element, rel=1e-3)
  expected = "f32" if flops_per_element >= matmul.WIDEN_MIN_FLOPS_PER_ELEMENT else "bf16"
  for fn in (lambda a, b: matmul.accumulate(equation, a, b),
             lambda a, b: matmul.contract(equation, a, b, dtype=BF16)):
    hlo = jax.jit(fn).lower(a, b).compile().as_text()
    assert _dot_operand_types(hlo) == [[expected, expected]], hlo
  low_precision_dots("float32", widen_min=0)
  hlo = jax.jit(lambda a, b: matmul.accumulate(equation, a, b)).lower(a, b).compile().as_text()
  assert _dot_operand_types(hlo) == [["f32", "f32"]]


def test_contract_is_einsum_backward_matmul():
  """float32: jnp.einsum; bf16: bf16-rounded operands summed in float32, float32 result."""
  a = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 4))
  b = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 3, 4))
  eq = 'bqhd,bkhd->bhqk'
  np.testing.assert_allclose(matmul.contract(eq, a, b, dtype=jnp.float32),
                             jnp.einsum(eq, a, b, precision='highest'), rtol=1e-5, atol=1e-5)
  got = matmul.contract(eq, a, b, dtype=jnp.bfloat16)
  rounded = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  want = jnp.einsum(eq, rounded(a), rounded(b), precision='highest')
  assert got.dtype == jnp.float32 and got.shape == (2, 3, 5, 7)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_weight_gradient_first_is_the_identity_with_tied_cotangents():
  """(x, w) unchanged; the VJP returns dx + 0 · dw[0] (same values) and dw, and dx depends on dw."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 5))
  f = lambda x, w: jnp.sum(jnp.sin(matmul.dense(x, w, dtype=jnp.float32, weight_grad_first=True)))
  ref = lambda x, w: jnp.sum(jnp.sin(x @ w))
  np.testing.assert_allclose(f(x, w), ref(x, w), rtol=1e-6)
  for a, b in zip(jax.grad(f, argnums=(0, 1))(x, w), jax.grad(ref, argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # The dependency itself: dx's jaxpr reads dw (a 0-multiplied element of it).
  (y, tied), vjp = jax.vjp(matmul.weight_gradient_first, x, w)
  assert y is x and tied is w
  jaxpr = str(jax.make_jaxpr(vjp)((jnp.ones_like(x), jnp.full_like(w, jnp.nan))))
  assert 'mul' in jaxpr
  dx, dw = vjp((jnp.ones_like(x), jnp.full_like(w, jnp.nan)))
  assert bool(jnp.isnan(dx).all()) and bool(jnp.isnan(dw).all())  # NaN dw reaches dx


def test_sum_and_broadcast_by_dot_are_sums_and_broadcasts_as_dots_on_the_cpu():
  """matmul.sum_by_dot / broadcast_by_dot: values and gradients of jnp.sum / broadcast_to;
  on the CPU the long sums compile to dots, no reductions (XLA:CPU's reduce-window trees)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 300))
  for axis in (0, 1, 2, -1):
    np.testing.assert_allclose(matmul.sum_by_dot(x, axis), x.sum(axis), rtol=1e-5, atol=1e-5)
    assert matmul.sum_by_dot(x, axis, keepdims=True).shape == x.sum(axis, keepdims=True).shape
  w = jnp.linspace(0.5, 2.0, 300)
  np.testing.assert_allclose(matmul.sum_by_dot(x, -1, weights=w), (x * w).sum(-1), rtol=1e-5,
                             atol=1e-5)
  v = jnp.arange(4.0)
  np.testing.assert_array_equal(matmul.broadcast_by_dot(v, (2, 3)), jnp.broadcast_to(v, (2, 3, 4)))
  g = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4))
  (dv,) = jax.vjp(lambda v: matmul.broadcast_by_dot(v, (2, 3)), v)[1](g)
  np.testing.assert_allclose(dv, g.sum((0, 1)), rtol=1e-6)
  big = jnp.ones((256, 4096))
  for f in (lambda a: matmul.sum_by_dot(a, -1), lambda a: matmul.sum_by_dot(a, 0),
            lambda a: jax.grad(lambda v: (matmul.broadcast_by_dot(v, (256,)) * a).sum())(a[0])):
    hlo = jax.jit(f).lower(big).compile().as_text()
    assert ' dot(' in hlo and 'reduce' not in hlo, hlo[-2000:]
  hlo = jax.jit(lambda a: a.sum(-1)).lower(big).compile().as_text()
  assert 'reduce' in hlo  # what it replaces


def test_row_max_is_the_max_and_fuses_its_producer_on_the_cpu():
  """matmul.row_max: jnp.max over the last axis, exactly (any length, keepdims, NaN-free);
  on the CPU, with the step's compiler options, the max of a sum of arrays compiles to one
  fusion reading the summands: no reduce-window and no [.., N] sum written out, which
  jnp.max gives (XLA:CPU's TreeReductionRewriter)."""
  from slic_jax import compiler_options
  for n in (7, 32, 64, 96, 100, 1024):
    x = jax.random.normal(jax.random.PRNGKey(n), (3, 5, n))
    np.testing.assert_array_equal(matmul.row_max(x), jnp.max(x, -1))
    np.testing.assert_array_equal(matmul.row_max(x, keepdims=True), jnp.max(x, -1, keepdims=True))
  opts = compiler_options.step_compiler_options("cpu")
  a = jnp.zeros((4, 64, 1024))
  b = jnp.zeros((1, 64, 1024))
  softmax_max = lambda f: jax.jit(lambda a, b: f(a + b), compiler_options=opts).lower(
      a, b).compile().as_text()
  ours = softmax_max(matmul.row_max)
  entry = ours[ours.index("ENTRY"):]
  assert "reduce-window" not in ours
  written_sum = r"= f32\[4,64,1024\]\S* fusion\("
  assert not re.search(written_sum, entry), entry  # the sum is never written
  plain = softmax_max(lambda s: jnp.max(s, -1))
  assert "reduce-window" in plain and re.search(written_sum, plain[plain.index("ENTRY"):])


@pytest.mark.parametrize("equation,sa,sb", EQUATIONS + [("nd,vd->nv", (6, 8), (9, 8))])
def test_float32_vjp_gives_autodiffs_values_and_gradients(equation, sa, sb):
  """float32_vjp changes where the gradient matmuls' operands are laid out, not their values."""
  ka, kb, kg = jax.random.split(jax.random.PRNGKey(3), 3)
  a = jax.random.normal(ka, sa, jnp.float32)
  b = jax.random.normal(kb, sb, jnp.float32)
  g = jax.random.normal(kg, jnp.einsum(equation, a, b).shape, jnp.float32)
  y, vjp = jax.vjp(lambda a, b: matmul.einsum(equation, a, b, dtype=jnp.float32,
                                              float32_vjp=True), a, b)
  y_ref, vjp_ref = jax.vjp(lambda a, b: jnp.einsum(equation, a, b, precision='highest'), a, b)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(vjp(g), vjp_ref(g)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_float32_vjp_moves_the_smaller_operand_for_the_weight_gradient():
  """x [2048, 512] · W [512, 2, 1024] on the CPU: JAX's autodiff computes dW as (gᵀ x)ᵀ and
  XLA:CPU copies the cotangent g (2048 × 2048 elements) into [N, tokens]; with
  float32_vjp no array that large is transposed or copied (x's transpose is 1M elements),
  and the compiled gradient needs fewer temporary bytes."""
  from slic_jax import compiler_options
  x = jax.ShapeDtypeStruct((4, 512, 512), jnp.float32)
  w = jax.ShapeDtypeStruct((512, 2, 1024), jnp.float32)

  def compiled(float32_vjp):
    f = lambda x, w: jnp.sum(jnp.sin(matmul.dense(x, w, dtype=jnp.float32,
                                                  float32_vjp=float32_vjp)))
    return jax.jit(jax.grad(f, argnums=(0, 1)),
                   compiler_options=compiler_options.step_compiler_options("cpu")
                   ).lower(x, w).compile()

  def largest_moved(c):
    sizes = [int(np.prod([int(d) for d in m.group(1).split(",")]))
             for m in re.finditer(r"= f32\[([\d,]+)\]\{[\d,]+\} (?:transpose|copy)\(",
                                  c.as_text())]
    return max(sizes, default=0)

  plain, laid_out = compiled(False), compiled(True)
  assert largest_moved(plain) >= 2048 * 2048  # measured: the cotangent, 4M elements
  assert largest_moved(laid_out) <= 2048 * 512, largest_moved(laid_out)
  assert (laid_out.memory_analysis().temp_size_in_bytes
          < plain.memory_analysis().temp_size_in_bytes)  # measured: 20 vs 32 MB


@pytest.mark.parametrize("dtype,dots,in_place", [
    (jnp.float32, "native", True), (BF16, "float32", True), (BF16, "native", False)])
def test_the_input_gradient_leaves_the_kernel_in_place_where_its_dot_runs_in_float32(
    low_precision_dots, dtype, dots, in_place):
  """dx = g · Wᵀ of a dense layer (x [512, 512] · W [512, 4096], the vocabulary
  projection's form) on the CPU: XLA:CPU's YNNPACK takes W [D, F] as the right operand
  with its contracted dimension last, so where that dot runs in float32 (float32_vjp, or
  bf16 operands widened) neither W nor g is copied into [F, D] (it used to be, behind a
  conditional); a mixed bf16 dot keeps the layout it was tuned with. The gradient keeps
  autodiff's values."""
  from slic_jax import compiler_options
  low_precision_dots(dots)
  x = jax.random.normal(jax.random.PRNGKey(0), (512, 512), jnp.float32)
  w = jax.random.normal(jax.random.PRNGKey(1), (512, 4096), jnp.float32) / 32

  def grad_x(dtype, float32_vjp=True):
    f = lambda x, w: jnp.sum(jnp.sin(matmul.dense(x, w, dtype=dtype,
                                                  float32_vjp=float32_vjp)))
    return jax.jit(jax.grad(f), compiler_options=compiler_options.step_compiler_options("cpu"))

  text = grad_x(dtype).lower(x, w).compile().as_text()
  moved = re.findall(r"(?:f32|bf16)\[4096,512\]", text)  # W or g transposed
  assert (not moved) == in_place, moved[:3]
  if in_place:
    assert " conditional(" not in text  # no `_opaque` layout pass at all
  want = grad_x(jnp.float32, float32_vjp=False)(x, w)
  tol = 1e-4 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(grad_x(dtype)(x, w), want, rtol=tol, atol=tol)


def test_widened_is_the_float32_of_every_bfloat16():
  """`_widened` (the backward pass's cast, written as a bit shift) equals ``astype`` for
  every one of the 65536 bfloat16 bit patterns: NaNs, infinities, ±0, subnormals."""
  v = jax.lax.bitcast_convert_type(jnp.arange(2 ** 16, dtype=jnp.uint32).astype(jnp.uint16),
                                   jnp.bfloat16)
  got = jax.jit(matmul._widened)(v)
  want = v.astype(jnp.float32)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(jax.lax.bitcast_convert_type(got, jnp.uint32),
                                jax.lax.bitcast_convert_type(want, jnp.uint32))
  half = jnp.asarray([1.5, -2.0], jnp.float16)
  np.testing.assert_array_equal(matmul._widened(half), half.astype(jnp.float32))
