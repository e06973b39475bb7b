"""Adafactor's reductions over a factored gradient as XLA:CPU kernels (`jax.ffi`).

`optimizers.clipped_adafactor(..., implementation='cpu_kernels')` (`create_optimizer(
implementation='cpu_kernels')`) takes two reductions per factored gradient g [R, C] from here
(`slic_jax/csrc/adafactor_stats.cc`), each one read of g:

    square_sums(g)                   rows[r] = Σ_c g²[r, c],  cols[c] = Σ_r g²[r, c]
    weighted_square_sum(g, w0, w1)   Σ_r w0[r] Σ_c g²[r, c] w1[c]

The first gives the second-moment statistics and, summed, g's share of the gradient
norm; the second the update's RMS. XLA:CPU computes the same from a squared copy of g,
three matrix-vector products and a separate reduction tree for the norm (the
optimizer-only profile of session 41: 160 of its 210 ms of op time).

The kernels are built and registered by `slic_jax.cpu_kernels`. Under a device mesh
both calls are partitioned (`jax.experimental.custom_partitioning`): each device reduces
its own block of g, and the partial sums are added over the mesh axes of the axis
summed (`psum`): rows over C's axes, cols over R's, the weighted sum over both.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from slic_jax import cpu_kernels

SOURCE = cpu_kernels.CSRC / "adafactor_stats.cc"
SQUARE_SUMS = "slic_adafactor_square_sums"
WEIGHTED_SQUARE_SUM = "slic_adafactor_weighted_square_sum"
_FEATURE = "create_optimizer(implementation='cpu_kernels')"
KernelUnavailable = cpu_kernels.KernelUnavailable


def register():
  """Builds (once per machine) and registers the two CPU custom calls; idempotent."""
  return cpu_kernels.register(SOURCE, (SQUARE_SUMS, WEIGHTED_SQUARE_SUM), _FEATURE)


def available() -> bool:
  """True if the kernels build and load here (used by tests to skip, counted)."""
  return cpu_kernels.builds(register)


def _check(g):
  if g.ndim != 2 or g.dtype != jnp.float32:
    raise ValueError(f"the Adafactor kernels take a float32 [R, C] gradient, not "
                     f"{g.dtype} {tuple(g.shape)}")


def square_sums(g):
  """(rows [R], cols [C]): the sums of g² along axis 1 and along axis 0; g f32 [R, C]."""
  _check(g)
  register()
  return _partitioned_square_sums(g)


def weighted_square_sum(g, w0, w1):
  """Σ_r w0[r] Σ_c g[r, c]² w1[c] (f32 scalar); g f32 [R, C], w0 [R], w1 [C]."""
  _check(g)
  register()
  return _partitioned_weighted(g, w0.astype(jnp.float32), w1.astype(jnp.float32))


def _square_sums_call(g):
  r, c = g.shape
  return jax.ffi.ffi_call(SQUARE_SUMS, (jax.ShapeDtypeStruct((r,), jnp.float32),
                                        jax.ShapeDtypeStruct((c,), jnp.float32)))(g)


def _weighted_call(g, w0, w1):
  return jax.ffi.ffi_call(WEIGHTED_SQUARE_SUM, jax.ShapeDtypeStruct((), jnp.float32))(g, w0, w1)


# --- partitioning: each device sums its block, the partial sums are psum'd --------------

_axes = cpu_kernels.leading_mesh_axes  # (R's mesh axes, C's mesh axes) of g's sharding


def _square_sums_infer(mesh, arg_shapes, result_shape):
  rows, cols = _axes(arg_shapes[0].sharding)
  return NamedSharding(mesh, P(rows)), NamedSharding(mesh, P(cols))


def _square_sums_partition(mesh, arg_shapes, result_shape):
  rows, cols = _axes(arg_shapes[0].sharding)

  def lower(g):
    r, c = _square_sums_call(g)
    if cols is not None:  # each device summed its own columns of each row
      r = jax.lax.psum(r, cols)
    if rows is not None:
      c = jax.lax.psum(c, rows)
    return r, c

  return (mesh, lower, (NamedSharding(mesh, P(rows)), NamedSharding(mesh, P(cols))),
          (NamedSharding(mesh, P(rows, cols)),))


_partitioned_square_sums = custom_partitioning(_square_sums_call)
_partitioned_square_sums.def_partition(
    infer_sharding_from_operands=_square_sums_infer, partition=_square_sums_partition,
    sharding_rule="r c -> r, c")


def _weighted_infer(mesh, arg_shapes, result_shape):
  return NamedSharding(mesh, P())


def _weighted_partition(mesh, arg_shapes, result_shape):
  rows, cols = _axes(arg_shapes[0].sharding)
  summed = tuple(a for axes in (rows, cols) if axes is not None
                 for a in (axes if isinstance(axes, tuple) else (axes,)))

  def lower(g, w0, w1):
    total = _weighted_call(g, w0, w1)
    return jax.lax.psum(total, summed) if summed else total

  return (mesh, lower, NamedSharding(mesh, P()),
          (NamedSharding(mesh, P(rows, cols)), NamedSharding(mesh, P(rows)),
           NamedSharding(mesh, P(cols))))


_partitioned_weighted = custom_partitioning(_weighted_call)
_partitioned_weighted.def_partition(
    infer_sharding_from_operands=_weighted_infer, partition=_weighted_partition,
    sharding_rule="r c, r, c -> ", reduction_factors=("r", "c"))
