"""Learning-rate schedules and optimizer construction (slic_jax.optimizers)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slic_jax import adafactor_kernels, optimizers

needs_kernels = pytest.mark.skipif(
    not adafactor_kernels.available(),
    reason="the Adafactor kernels need a C++17 compiler ($CXX, default g++)")


def test_constant_with_warmup():
  f = optimizers.learning_rate_schedule(learning_rate=1e-3, warmup_steps=10)
  np.testing.assert_allclose([float(f(s)) for s in (0, 4, 9, 50)], [1e-4, 5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_rsqrt_matches_t5_inverse_square_root():
  f = optimizers.learning_rate_schedule(learning_rate=1.0, schedule="rsqrt", warmup_steps=100)
  # Flat at lr during warm-up's end, then lr * sqrt(w / (s+1)).
  np.testing.assert_allclose(float(f(99)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(f(399)), math.sqrt(100 / 400), rtol=1e-6)


def test_cosine_reaches_zero_at_total_steps():
  f = optimizers.learning_rate_schedule(learning_rate=2.0, schedule="cosine", total_steps=100)
  np.testing.assert_allclose(float(f(0)), 2.0, rtol=1e-6)
  np.testing.assert_allclose(float(f(50)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(f(100)), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="total_steps"):
    optimizers.learning_rate_schedule(schedule="cosine")(0)


def test_unknown_names_are_rejected():
  with pytest.raises(ValueError, match="unknown optimizer"):
    optimizers.create_optimizer(name="sgd")
  with pytest.raises(ValueError, match="unknown schedule"):
    optimizers.learning_rate_schedule(schedule="linear")(0)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_optimizer_decreases_a_quadratic(name):
  tx = optimizers.create_optimizer(name=name, learning_rate=0.05, clip_norm=1.0)
  params = {"w": jnp.full((4, 3), 2.0)}
  loss = lambda p: jnp.sum(p["w"] ** 2)
  state = tx.init(params)
  start = float(loss(params))
  for _ in range(50):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < 0.5 * start


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_clip_by_global_norm_matches_optax(scale):
  """Same updates and state structure as optax.clip_by_global_norm, below and above the norm."""
  grads = {"a": jnp.arange(6.0).reshape(2, 3) * scale, "b": jnp.ones(4) * scale}
  ours, theirs = optimizers.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  u1, s1 = ours.update(grads, ours.init(grads))
  u2, s2 = theirs.update(grads, theirs.init(grads))
  for k in grads:
    np.testing.assert_allclose(np.asarray(u1[k]), np.asarray(u2[k]), rtol=1e-6)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  norm = float(optax.tree.norm(u1))
  assert norm == pytest.approx(min(1.0, float(optax.tree.norm(grads))), rel=1e-5)


# Shapes that take every path of `clipped_adafactor`: factored [R, C] with the longer axis
# second and first, equal axes, a factored 3-D array, too small to factor, 1-D.
_SHAPES = {"rc": (128, 320), "cr": (320, 128), "sq": (128, 128), "3d": (3, 128, 160),
           "small": (32, 6), "vec": (200,)}


def _params_and_grads(seed, scale):
  rng = np.random.default_rng(seed)
  draw = lambda: {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in _SHAPES.items()}
  return draw(), [jax.tree.map(lambda x: x * scale, draw()) for _ in range(3)]


def _updates_against_the_optax_chain(implementation, params, grads, lr, weight_decay):
  """Runs `implementation` and the optax chain over the gradient steps ``grads`` from
  ``params``; asserts the same state structure, updates and statistics (float32 rounding
  apart) and returns the last updates of `implementation`."""
  make = lambda impl: optimizers.create_optimizer(
      name="adafactor", learning_rate=lr, clip_norm=1.0, weight_decay=weight_decay,
      implementation=impl)
  ours, chain = make(implementation), make("optax")
  s1, s2 = ours.init(params), chain.init(params)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  p1 = p2 = params
  for g in grads:
    u1, s1 = jax.jit(ours.update)(g, s1, p1)
    u2, s2 = jax.jit(chain.update)(g, s2, p2)
    for k in params:
      np.testing.assert_allclose(np.asarray(u1[k]), np.asarray(u2[k]), rtol=2e-5,
                                 atol=2e-6 * float(jnp.max(jnp.abs(u2[k]))), err_msg=k)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5)
  return u1


@pytest.mark.parametrize("schedule", [False, True])
@pytest.mark.parametrize("grad_scale", [1e-3, 10.0])  # clipping off / on
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_clipped_adafactor_matches_the_optax_chain(schedule, grad_scale, weight_decay):
  """Same state structure, updates and statistics as clip_by_global_norm → optax.adafactor
  over three steps (float32 rounding apart)."""
  lr = optimizers.learning_rate_schedule(learning_rate=1e-2, warmup_steps=2) if schedule else 1e-2
  params, grads = _params_and_grads(0, grad_scale)
  u = _updates_against_the_optax_chain("fused", params, grads, lr, weight_decay)
  # The updates are not trivially equal: clipping, the factored statistics and the
  # block-rms clip all act here (the first step's factored update has rms 1 by design).
  assert float(jnp.max(jnp.abs(u["rc"]))) > 0


@pytest.mark.parametrize("schedule", [False, True])
@pytest.mark.parametrize("grad_scale", [1e-3, 10.0])  # clipping off / on
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_fused_adafactor_on_other_seeds_matches_the_optax_chain(schedule, grad_scale, weight_decay):
  """implementation='fused' (the norm from each matrix's column sums of g², then one
  product g² · [1, f1²] per factored matrix) on other draws: the same state, updates and
  statistics as the optax chain over three steps, on every path of the update."""
  lr = optimizers.learning_rate_schedule(learning_rate=1e-2, warmup_steps=2) if schedule else 1e-2
  params, grads = _params_and_grads(3, grad_scale)
  u = _updates_against_the_optax_chain("fused", params, grads, lr, weight_decay)
  assert float(jnp.max(jnp.abs(u["cr"]))) > 0 and float(jnp.max(jnp.abs(u["rc"]))) > 0


def test_fused_takes_two_products_per_factored_matrix():
  """'fused': per factored matrix one product for its column sums of g² (which also
  give the norm) and one g² · [C, 2]; a small matrix's norm also from its column sums,
  its update elementwise; the step's grad_norm (`tx.global_norm`) the update's own norm,
  the same ops; a bfloat16 gradient's squares in float32."""
  params = {"w": jnp.ones((256, 640), jnp.float32), "t": jnp.ones((640, 256), jnp.float32),
            "v": jnp.ones((300,), jnp.float32), "s": jnp.ones((32, 6), jnp.float32),
            "h": jnp.ones((256, 640), jnp.bfloat16)}
  grads = {k: (jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) % 7 - 3).astype(x.dtype)
           for k, x in params.items()}
  tx = optimizers.create_optimizer(learning_rate=1e-3, clip_norm=1.0, implementation="fused")
  step = lambda g, s, p: (*tx.update(g, s, p), tx.global_norm(g))  # noqa: E731
  hlo = jax.jit(step).lower(grads, tx.init(params), params).compile().as_text()
  dots = [l for l in hlo.splitlines() if " dot(" in l]
  # 4 matrices' column sums [C, 1], 3 factored matrices' g² · [C, 2] -> [R, 2]
  assert sorted(l.split("=")[1].split("{")[0].strip() for l in dots) == [
      "f32[256,1]", "f32[256,2]", "f32[256,2]", "f32[6,1]", "f32[640,1]", "f32[640,1]",
      "f32[640,2]"], dots
  want = np.sqrt(sum(float(jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in grads.values()))
  np.testing.assert_allclose(float(jax.jit(step)(grads, tx.init(params), params)[2]), want,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="unknown implementation 'optax'"):
    optimizers.clipped_adafactor(1e-3, implementation="optax")


@needs_kernels
@pytest.mark.parametrize("schedule", [False, True])
@pytest.mark.parametrize("grad_scale", [1e-3, 10.0])  # clipping off / on
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_cpu_kernels_adafactor_matches_the_optax_chain(schedule, grad_scale, weight_decay):
  """implementation='cpu_kernels' (the factored matrices reduced by the CPU kernels, the
  others as 'fused'): the same state, updates and statistics as the optax chain over
  three steps, on every path of the update."""
  lr = optimizers.learning_rate_schedule(learning_rate=1e-2, warmup_steps=2) if schedule else 1e-2
  params, grads = _params_and_grads(2, grad_scale)
  u = _updates_against_the_optax_chain("cpu_kernels", params, grads, lr, weight_decay)
  assert float(jnp.max(jnp.abs(u["cr"]))) > 0


@needs_kernels
def test_cpu_kernels_reduce_each_factored_matrix_in_two_calls():
  """'cpu_kernels': two custom calls per factored float32 matrix (its square sums, its
  update's rms) and no matrix-vector products; a small float32 matrix's norm also by the
  kernel, a vector and a bfloat16 matrix XLA's; 'grouped' does not combine with it; the
  step's grad_norm (`tx.global_norm`) is the update's own norm, the same calls."""
  params = {"w": jnp.ones((256, 640), jnp.float32), "t": jnp.ones((640, 256), jnp.float32),
            "v": jnp.ones((300,), jnp.float32), "s": jnp.ones((32, 6), jnp.float32),
            "h": jnp.ones((256, 640), jnp.bfloat16)}
  tx = optimizers.create_optimizer(learning_rate=1e-3, clip_norm=1.0, implementation="cpu_kernels")
  step = lambda g, s, p: (*tx.update(g, s, p), tx.global_norm(g))  # noqa: E731
  hlo = jax.jit(step).lower(params, tx.init(params), params).compile().as_text()
  calls = lambda t: sum(f'custom_call_target="{t}"' in l for l in hlo.splitlines())
  assert calls(adafactor_kernels.SQUARE_SUMS) == 3
  assert calls(adafactor_kernels.WEIGHTED_SQUARE_SUM) == 2
  assert hlo.count(" dot(") == 3  # the bfloat16 matrix's, as 'fused'
  want = np.sqrt(sum(float(jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in params.values()))
  np.testing.assert_allclose(float(jax.jit(step)(params, tx.init(params), params)[2]), want,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="Adafactor with clipping.*got name='adamw'"):
    optimizers.create_optimizer(name="adamw", implementation="cpu_kernels")
  with pytest.raises(ValueError, match="clip_norm=None"):
    optimizers.create_optimizer(clip_norm=None, implementation="cpu_kernels")


@pytest.mark.parametrize("grad_scale", [1e-3, 10.0])  # clipping off / on
def test_grouped_adafactor_matches_the_optax_chain(grad_scale):
  """implementation='grouped' (arrays of one shape stacked and updated at once): the same
  updates and statistics as the optax chain over three steps, every path of the update
  in a group of two or three arrays, next to arrays of a shape of their own."""
  shapes = {f"{k}_{i}": s for k, s in _SHAPES.items() for i in range(1 + (k != "cr"))}
  shapes["vec_2"] = _SHAPES["vec"]
  rng = np.random.default_rng(1)
  draw = lambda scale: {k: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)
                        for k, s in shapes.items()}
  params, grads = draw(1.0), [draw(grad_scale) for _ in range(3)]
  u = _updates_against_the_optax_chain("grouped", params, grads, 1e-2, 1e-2)
  # Arrays of one shape get different updates (no mix-up of a group's members).
  assert float(jnp.max(jnp.abs(u["rc_0"] - u["rc_1"]))) > 0


def test_grouped_adafactor_updates_a_group_in_one_set_of_ops():
  """Two [256, 640] kernels: 'fused' takes two products per array on the CPU (4), 'grouped'
  three batched ones for both (3)."""
  params = {"a": jnp.ones((256, 640), jnp.float32), "b": jnp.full((256, 640), 2.0)}
  counts = {}
  for impl in ("fused", "grouped"):
    tx = optimizers.create_optimizer(learning_rate=1e-3, clip_norm=1.0, implementation=impl)
    hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
    counts[impl] = hlo.count(" dot(")
  assert counts == {"fused": 4, "grouped": 3}, counts


def test_create_optimizer_implementations():
  assert optimizers.create_optimizer(implementation="optax") is not None
  with pytest.raises(ValueError, match="unknown implementation"):
    optimizers.create_optimizer(implementation="triton")


def test_clipped_adafactor_reduces_by_dots_on_cpu():
  """On the CPU the factored statistics are two products (the column sums, then the row
  sums and the update's rms together), the optax chain's reductions none
  (`tools/profile_step.py --optimizer_only` times them against each other)."""
  params = {"w": jnp.ones((256, 640), jnp.float32)}
  counts = {}
  for impl in ("fused", "optax"):
    tx = optimizers.create_optimizer(learning_rate=1e-3, clip_norm=1.0, implementation=impl)
    state = tx.init(params)
    hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
    counts[impl] = hlo.count(" dot(")
  assert counts == {"fused": 2, "optax": 0}, counts
