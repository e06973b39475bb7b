"""Parameter gradients summed on each data shard first, all-reduced once.

A parameter read by several ops of a data-parallel step gets one partial gradient per op
on each device, and the SPMD partitioner all-reduces each where it is taken: the token
embedding once per lookup (the encoder's, the decoder's), the relative position bias
as its [H, L, L] gradient in every layer, summed over that layer's batch (XLA:CPU sends
each; libtpu combines them into one). Inside the microbatch loop
(`update_step.make_train_step`) the sum of all-reduced parts is also what keeps an
all-reduce in the loop: XLA moves ``acc + all-reduce(g)`` after a loop (libtpu does;
XLA's ``WhileLoopAllReduceCodeMotion``), not ``acc + all-reduce(g1) + all-reduce(g2)``.

`broadcast` gives the parameter a leading axis of D, the number of devices the 'batch'
logical axis is split over, laid out over those devices: ``x_d [D, ...] = x`` for every
d, one copy per device (what a replicated parameter already is). An op reads shard d of
its batch from ``x_d[d]`` (`take`, `add`). The ops' gradients then sum into ``dx_d [D,
...]`` on each device with no communication (`sum_to`), what is computed from x (the
bias from its table) is differentiated per shard, and the broadcast's own gradient,
``dx = Σ_d dx_d[d]``, is the one all-reduce, of the table's gradient. The values are
the same (a sum reassociated). T5 1.1 small, bf16, 32 pairs, Li 512
(`tools/mesh_step_cost.py`, `benchmarks/NOTES.md`, session 37): 8×1 XLA:CPU 425 -> 308 MB
per device per step; 4 microbatches on a TPU v5e 8×1 531 -> 308 MB.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def count(param_axes: Sequence[str | None]) -> int:
  """D: the devices that the 'batch' logical axis is split over in the mesh in context.

  1 outside a mesh (`jax.sharding.get_abstract_mesh`, set by `jax.set_mesh` in
  `partitioning.Partitioner.activation_rules`; T5X's legacy ``with Mesh`` sets none),
  where 'batch' maps to no mesh axis or to a manual one (`jax.shard_map`, as
  ``per_device_accumulation``), or where one of the parameter's logical axes
  ``param_axes`` maps to the same mesh axis (T5X's 2-D parameter partitioning: the
  parameter is already split over the data devices).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  batch = _mesh_axes("batch")
  if not batch or set(batch) & set(mesh.manual_axes):
    return 1
  if any(set(batch) & set(_mesh_axes(a)) for a in param_axes if a is not None):
    return 1
  return math.prod(dict(mesh.shape)[a] for a in batch)


def broadcast(x: jax.Array, param_axes: Sequence[str | None], shards: int) -> jax.Array:
  """x [...] -> x_d [shards, ...], x_d[d] = x, split over 'batch''s mesh axes (one copy
  per device), the other axes as ``param_axes`` map. Its gradient is ``Σ_d dx_d[d]``."""
  x_d = jnp.broadcast_to(x, (shards,) + x.shape)
  spec = P(_spec_entry(_mesh_axes("batch")), *(_spec_entry(_mesh_axes(a)) for a in param_axes))
  return jax.lax.with_sharding_constraint(x_d, spec)


def take(table_d: jax.Array, tokens: jax.Array) -> jax.Array:
  """table_d [D, V, E], tokens [B, ...] (B divisible by D) -> [B, ..., E]:
  ``out[b] = table_d[b // (B/D)][tokens[b]]``, each shard of the batch from its own
  device's copy (the rows of a batch split over D devices, in order)."""
  shards = table_d.shape[0]
  local = tokens.reshape((shards, tokens.shape[0] // shards) + tokens.shape[1:])
  out = jax.vmap(lambda t, i: jnp.take(t, i, axis=0))(table_d, local)
  return out.reshape(tokens.shape + table_d.shape[2:])


def add(x: jax.Array, y: jax.Array) -> jax.Array:
  """x [B, ...] + y [D, ...] (a `broadcast` parameter's value per data shard): row b of x
  gets ``y[b // (B/D)]``; y with 1 or B rows, or fewer axes than x, broadcasts as
  usual. The other axes broadcast against each other ([B, 1, Lq, Lk] + [D, H, Lq, Lk]
  -> [B, H, Lq, Lk])."""
  if y.ndim < x.ndim or y.shape[0] in (1, x.shape[0]):
    return x + y
  rows, shards = x.shape[0], y.shape[0]
  out = (x.reshape((shards, rows // shards) + x.shape[1:]) + y[:, None])
  return out.reshape((rows,) + out.shape[2:])


def sum_to(g: jax.Array, shape: Sequence[int]) -> jax.Array:
  """The gradient of `add`'s y: g [B, ...] summed to ``shape`` = [D, ...] in float32,
  over each data shard's B/D rows (no communication) and over the axes y broadcast
  along. ``shape[0]`` 1 or B: the usual reduction of a broadcast."""
  g = g.astype(jnp.float32)
  shards = shape[0]
  if shards not in (1, g.shape[0]):
    g = g.reshape((shards, g.shape[0] // shards) + g.shape[1:]).sum(axis=1)
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
  return jnp.sum(g, axis=axes, keepdims=True).reshape(shape)


def _mesh_axes(logical: str) -> tuple[str, ...]:
  if logical is None:
    return ()
  entry = nn.logical_to_mesh_axes((logical,))[0]
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes
