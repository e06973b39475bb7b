"""Device mesh and logical-axis sharding, in T5X's vocabulary.

A `Partitioner` owns a 2-D `jax.sharding.Mesh` with named axes ``('data', 'model')``
and a list of logical axis rules mapping the names that the network puts on its
params (``params_axes`` collection, e.g. ``('embed', 'mlp')``) and activations
(``('batch', 'length', 'embed')``) onto those mesh axes. Everything is placed with
`NamedSharding`; the trainer jits its step with the shardings this module returns.

Rules follow `t5x.partitioning.standard_logical_axis_rules`: batch → data;
vocab / mlp / heads / joined_kv → model; everything else replicated. With
``parameter_partitioning_dims=2`` params are also split over ``embed → data``
(2-D / FSDP-like partitioning for T5-XXL).
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import numpy as np
from flax.linen import partitioning as flax_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LogicalRules = Sequence[tuple[str, str | None]]


def standard_logical_axis_rules(
    activation_partitioning_dims: int = 1, parameter_partitioning_dims: int = 1
) -> tuple[tuple[str, str | None], ...]:
  """T5X's default logical → mesh axis rules (1-D or 2-D partitioning)."""
  if activation_partitioning_dims not in (1, 2) or parameter_partitioning_dims not in (1, 2):
    raise ValueError("partitioning dims must be 1 or 2")
  rules = [
      ("batch", "data"),
      ("vocab", "model"),
      ("mlp", "model"),
      ("heads", "model"),
      ("joined_kv", "model"),
      ("kv", None),
      ("length", None),
      ("relpos_buckets", None),
      ("abspos_buckets", None),
      ("layers", None),
      ("stack", None),
      ("mlp_activations", None),
  ]
  if activation_partitioning_dims == 2:
    rules.append(("embed", "model"))
  elif parameter_partitioning_dims == 2:
    rules.append(("embed", "data"))
  else:
    rules.append(("embed", None))
  return tuple(rules)


class Partitioner:
  """A ('data', 'model') mesh plus logical axis rules.

  Args:
    num_partitions: size of the 'model' mesh axis (model parallelism); the 'data'
      axis gets ``num_devices // num_partitions``.
    model_parallel_submesh: T5X-style ``(x, y, z, core)`` submesh; only its
      product is used here (the size of the 'model' axis). Mutually exclusive
      with ``num_partitions``.
    logical_axis_rules: logical name → mesh axis pairs; default
      `standard_logical_axis_rules()`.
    devices: devices to lay out (default: all of `jax.devices()`).
  """

  def __init__(
      self,
      num_partitions: int | None = 1,
      model_parallel_submesh: Sequence[int] | None = None,
      logical_axis_rules: LogicalRules | None = None,
      devices: Sequence[Any] | None = None,
  ):
    if model_parallel_submesh is not None:
      if num_partitions not in (None, 1):
        raise ValueError("set num_partitions or model_parallel_submesh, not both")
      num_partitions = int(np.prod(model_parallel_submesh))
    num_partitions = num_partitions or 1
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % num_partitions:
      raise ValueError(
          f"num_partitions={num_partitions} does not divide the {len(devices)} devices"
      )
    grid = np.asarray(devices).reshape(len(devices) // num_partitions, num_partitions)
    self.mesh = Mesh(grid, ("data", "model"))
    self.logical_axis_rules = tuple(logical_axis_rules or standard_logical_axis_rules())

  @property
  def data_size(self) -> int:
    return self.mesh.shape["data"]

  @contextlib.contextmanager
  def activation_rules(self):
    """Context in which `with_sharding_constraint` on logical names is active."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.logical_axis_rules):
      yield

  def sharding(self, logical_spec: Sequence[str | None] | None) -> NamedSharding:
    """NamedSharding for one array given its logical axis names."""
    spec = nn.logical_to_mesh_axes(tuple(logical_spec or ()), self.logical_axis_rules)
    return NamedSharding(self.mesh, spec)

  def params_shardings(self, params_axes: Any) -> Any:
    """Tree of NamedSharding for params from the network's ``params_axes`` collection."""
    logical_specs = flax.core.unfreeze(flax_partitioning.get_axis_names(params_axes))
    return nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.logical_axis_rules)

  def batch_sharding(self, ndim: int) -> NamedSharding:
    """Leading (batch) axis over 'data', the rest replicated."""
    return NamedSharding(self.mesh, P("data", *([None] * (ndim - 1))))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def optimizer_state_shardings(self, opt_state: Any, params: Any, params_shardings: Any) -> Any:
    """Shardings for an optax state tree, derived from the params it mirrors.

    optax states hold sub-trees shaped like the params (Adam's ``mu``/``nu``) and,
    for Adafactor, factored statistics with one axis dropped (``v_row``: param shape
    without the last axis, ``v_col``: without the second-to-last). A state leaf whose
    path ends in a param's path gets that param's spec, with the dropped axis removed
    for factored leaves; anything else (counts, scalars, placeholders) is replicated.
    """
    flat_params = {
        _dict_path(path): (leaf.shape, sharding.spec)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree_util.tree_leaves(params_shardings),
        )
    }

    def leaf_sharding(path, leaf):
      shape = getattr(leaf, "shape", ())
      keys = _dict_path(path)
      for start in range(len(keys)):
        match = flat_params.get(keys[start:])
        if match is None:
          continue
        param_shape, spec = match
        spec = tuple(spec) + (None,) * (len(param_shape) - len(spec))
        if tuple(shape) == tuple(param_shape):
          return NamedSharding(self.mesh, P(*spec))
        if len(shape) == len(param_shape) - 1:
          for dropped in (len(param_shape) - 1, len(param_shape) - 2):
            kept = [d for i, d in enumerate(param_shape) if i != dropped]
            if tuple(kept) == tuple(shape):
              return NamedSharding(self.mesh, P(*[s for i, s in enumerate(spec) if i != dropped]))
        break
      return self.replicated()

    return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state)


def _dict_path(path) -> tuple[str, ...]:
  """The dict keys (param names) along a pytree path, ignoring tuple/attr steps."""
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
