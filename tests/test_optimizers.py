"""Learning-rate schedules and optimizer construction (slic_jax.optimizers)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slic_jax import optimizers


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
