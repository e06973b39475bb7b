"""slic_jax.data_shards: a parameter's copy per data shard, and the adds that read it.

The step on a mesh with these copies (the same values as on one device, each table's
gradient all-reduced once) is tested in `tests/test_partitioning.py`.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from slic_jax import data_shards
from slic_jax import partitioning


def test_count_is_the_data_devices_of_the_batch_axis():
  emb, relpos = ("vocab", "embed"), ("heads", "relpos_buckets")
  assert data_shards.count(emb) == 1  # no mesh in context
  with partitioning.Partitioner(num_partitions=2).activation_rules():  # 4 × 2
    assert data_shards.count(emb) == data_shards.count(relpos) == 4
  with partitioning.Partitioner(num_partitions=8).activation_rules():  # 1 × 8
    assert data_shards.count(emb) == 1
  # 2-D parameter partitioning splits 'embed' over 'data': the embedding is already split
  # over the data devices (no copies); the position bias table is not.
  two_d = partitioning.Partitioner(
      num_partitions=2,
      logical_axis_rules=partitioning.standard_logical_axis_rules(parameter_partitioning_dims=2))
  with two_d.activation_rules():
    assert data_shards.count(emb) == 1 and data_shards.count(relpos) == 4
  # Inside shard_map over 'data' (per_device_accumulation) each device is its own shard.
  p = partitioning.Partitioner(num_partitions=2)
  seen = []

  def local(x):
    seen.append(data_shards.count(emb))
    return x

  with p.activation_rules():
    jax.jit(jax.shard_map(local, mesh=p.mesh, in_specs=P("data"), out_specs=P("data"),
                          axis_names={"data"}))(jnp.zeros((8, 2)))
  assert seen == [1]


def test_add_reads_each_rows_shard_and_sum_to_is_its_gradient():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 1, 3, 5)).astype(np.float32)
  y = rng.normal(size=(4, 2, 3, 5)).astype(np.float32)
  out = np.asarray(data_shards.add(jnp.asarray(x), jnp.asarray(y)))
  assert out.shape == (8, 2, 3, 5)
  for b in range(8):
    np.testing.assert_allclose(out[b], x[b] + y[b // 2], rtol=1e-6)
  # One row (or B rows, or fewer axes): numpy's broadcasting.
  for y1 in (y[:1], rng.normal(size=(8, 2, 3, 5)).astype(np.float32), np.float32(2.0)):
    np.testing.assert_allclose(np.asarray(data_shards.add(jnp.asarray(x), jnp.asarray(y1))),
                               x + y1, rtol=1e-6)
  g = rng.normal(size=(8, 2, 3, 5)).astype(np.float32)
  _, vjp = jax.vjp(lambda y: data_shards.add(jnp.asarray(x), y), jnp.asarray(y))
  want = g.reshape(4, 2, 2, 3, 5).sum(axis=1)  # each shard's 2 rows
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(data_shards.sum_to(jnp.asarray(g), y.shape)), want,
                             rtol=1e-5)
  # Summed over the axes it broadcast along as well; and the plain reduction for 1 row.
  np.testing.assert_allclose(np.asarray(data_shards.sum_to(jnp.asarray(g), (4, 1, 3, 5))),
                             want.sum(axis=1, keepdims=True), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(data_shards.sum_to(jnp.asarray(g), (1, 2, 3, 5))),
                             g.sum(axis=0, keepdims=True), rtol=1e-5)
  assert data_shards.sum_to(jnp.asarray(g, jnp.bfloat16), y.shape).dtype == jnp.float32


def test_broadcast_and_take_give_each_shard_the_table_and_its_sum_as_gradient():
  table = jnp.arange(12.0).reshape(6, 2)
  tokens = jnp.asarray([[0, 5], [1, 1], [2, 3], [4, 0]])
  with partitioning.Partitioner(num_partitions=2).activation_rules():  # 4 data shards

    def lookup(t):
      t_d = data_shards.broadcast(t, ("vocab", "embed"), 4)
      assert t_d.shape == (4, 6, 2)
      return data_shards.take(t_d, tokens)

    out, vjp = jax.vjp(jax.jit(lookup), table)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(table)[np.asarray(tokens)])
    g = jnp.ones_like(out)
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=6)[:, None] * np.ones((1, 2))
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), counts)
