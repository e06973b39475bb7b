"""The CPU Adafactor reductions (`slic_jax.adafactor_kernels`) against numpy, on one device
and on blocks of a (4, 2) mesh of fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from slic_jax import adafactor_kernels

pytestmark = pytest.mark.skipif(
    not adafactor_kernels.available(),
    reason="the Adafactor kernels need a C++17 compiler ($CXX, default g++)")


def _arrays(shape, seed=0):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=shape).astype(np.float32)
  return g, rng.random(shape[0]).astype(np.float32), rng.random(shape[1]).astype(np.float32)


def _want(g, w0, w1):
  g2 = g.astype(np.float64) ** 2
  return g2.sum(1), g2.sum(0), np.einsum("rc,r,c->", g2, w0.astype(np.float64),
                                         w1.astype(np.float64))


# Shapes with a tail after the 32-wide vector loop, fewer rows than a block, one row,
# and a long axis either way.
@pytest.mark.parametrize("shape", [(37, 53), (1, 129), (5, 32), (300, 17), (1024, 96),
                                   (96, 1024)])
def test_sums_match_numpy(shape):
  g, w0, w1 = _arrays(shape)
  rows, cols = jax.jit(adafactor_kernels.square_sums)(g)
  total = jax.jit(adafactor_kernels.weighted_square_sum)(g, w0, w1)
  want_rows, want_cols, want_total = _want(g, w0, w1)
  assert rows.shape == (shape[0],) and cols.shape == (shape[1],) and total.shape == ()
  np.testing.assert_allclose(np.asarray(rows), want_rows, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(cols), want_cols, rtol=2e-6)
  np.testing.assert_allclose(float(total), want_total, rtol=2e-6)


def test_weights_are_per_row_and_per_column():
  """A one-hot weight on each side picks out one element's square."""
  g, _, _ = _arrays((20, 40))
  w0, w1 = np.zeros(20, np.float32), np.zeros(40, np.float32)
  w0[7], w1[33] = 1.0, 2.0
  np.testing.assert_allclose(float(adafactor_kernels.weighted_square_sum(g, w0, w1)),
                             2.0 * g[7, 33] ** 2, rtol=1e-6)


@pytest.mark.parametrize("spec", [P(), P("data", None), P(None, "model"), P("data", "model"),
                                  P("model", "data"), P(("data", "model"), None)])
def test_partitioned_over_a_mesh(spec):
  """g sharded any way over (4, 2): each device sums its block, the partial sums are added
  over the summed axis' mesh axes, never gathered; the sums are the one device's."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  g, w0, w1 = _arrays((64, 48), seed=1)
  sharded = jax.device_put(g, NamedSharding(mesh, spec))
  rows, cols = jax.jit(adafactor_kernels.square_sums)(sharded)
  total = jax.jit(adafactor_kernels.weighted_square_sum)(sharded, w0, w1)
  want_rows, want_cols, want_total = _want(g, w0, w1)
  np.testing.assert_allclose(np.asarray(rows), want_rows, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(cols), want_cols, rtol=2e-6)
  np.testing.assert_allclose(float(total), want_total, rtol=2e-6)
  spec0 = tuple(spec) + (None, None)
  first = lambda a: (tuple(a.sharding.spec) + (None,))[0]  # noqa: E731
  assert (first(rows), first(cols)) == spec0[:2]
  hlo = jax.jit(adafactor_kernels.square_sums).lower(sharded).compile().as_text()
  assert "all-gather" not in hlo
  assert hlo.count("all-reduce(") == sum(a is not None for a in spec0[:2])
  call = [l for l in hlo.splitlines() if adafactor_kernels.SQUARE_SUMS in l]
  shard = [64 // (4 if "data" in str(spec0[0]) else 1) // (2 if "model" in str(spec0[0]) else 1),
           48 // (4 if "data" in str(spec0[1]) else 1) // (2 if "model" in str(spec0[1]) else 1)]
  assert call and f"f32[{shard[0]},{shard[1]}]" in call[0], call


@pytest.mark.parametrize("bad", [np.zeros((4, 5), jnp.bfloat16), np.zeros((2, 3, 4), np.float32),
                                 np.zeros(7, np.float32)])
def test_other_inputs_are_refused_by_name(bad):
  with pytest.raises(ValueError, match=r"float32 \[R, C\] gradient, not"):
    adafactor_kernels.square_sums(jnp.asarray(bad))
