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

from slic_jax import update_step

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

  def params_shardings(self, params_axes: Any, params: Any = None) -> Any:
    """Tree of NamedSharding for params from the network's ``params_axes`` collection.

    With ``params`` (arrays or `jax.ShapeDtypeStruct`s of the same tree), every
    parameter's dimensions are checked against the mesh: a dimension split over a mesh
    axis must be divisible by its size, or a ValueError names the parameter, its logical
    axis and the mesh axis (instead of jax's error when the array is first placed).
    """
    logical_specs = flax.core.unfreeze(flax_partitioning.get_axis_names(params_axes))
    shardings = nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.logical_axis_rules)
    if params is not None:
      self._check_divisible(params, shardings, logical_specs)
    return shardings

  def _check_divisible(self, params: Any, shardings: Any, logical_specs: Any) -> None:
    flat_specs = {_dict_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(
        logical_specs, is_leaf=lambda x: isinstance(x, P))[0]}
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                      jax.tree_util.tree_leaves(shardings)):
      for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        parts = int(np.prod([self.mesh.shape[a] for a in axes]))
        if size % parts:
          logical = tuple(flat_specs.get(_dict_path(path), (None,) * leaf.ndim))[dim]
          raise ValueError(
              f"param {'/'.join(_dict_path(path))} {tuple(leaf.shape)}: dimension {dim} "
              f"({logical!r}, size {size}) is split over mesh axis {'×'.join(axes)!r} of size "
              f"{parts}, which does not divide it; use a mesh whose {'×'.join(axes)!r} axis "
              f"divides it (num_partitions for 'model') or map {logical!r} to None in the "
              f"logical axis rules")

  def train_state_shardings(self, model: Any, tx: Any, input_shapes: Any,
                            input_types: Any = None) -> tuple[Any, Any]:
    """The train state as `slic_jax.train` places it: (abstract state, its shardings).

    Params follow the network's logical axes (`params_shardings`, checked against the
    mesh), the optimizer state mirrors them (`optimizer_state_shardings`), the step is
    replicated. Returns two `update_step.TrainState` trees: `jax.ShapeDtypeStruct`s
    carrying their sharding (for ``jit(...).lower``) and the `NamedSharding`s (for
    ``in_shardings``/``out_shardings``). Nothing is allocated.
    """
    abstract_vars = jax.eval_shape(
        lambda r: model.get_initial_variables(r, input_shapes, input_types),
        jax.random.PRNGKey(0))
    params = abstract_vars["params"]
    params_sh = self.params_shardings(abstract_vars["params_axes"], params)
    opt_state = jax.eval_shape(tx.init, params)
    opt_sh = self.optimizer_state_shardings(opt_state, params, params_sh)
    shardings = update_step.TrainState(step=self.replicated(), params=params_sh,
                                       opt_state=opt_sh)
    abstract = update_step.TrainState(step=jax.ShapeDtypeStruct((), np.int32), params=params,
                                      opt_state=opt_state)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return abstract, shardings

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
