"""Self-attention's softmax passes as two fused XLA:CPU kernels (`jax.ffi`).

`network.T5Config.attention_implementation = 'fused_softmax'` routes the encoder's
self-attention through `softmax_weighted_values` here: the q·k and p·v matmuls (and
their gradients) stay XLA's, and everything between them is one pass over the
[B, H, Lq, Lk] arrays per direction (`slic_jax/csrc/fused_softmax.cc`):

    forward   p = bf16(softmax_k(logits + E[h, bucket(k − q)], over the keys of q's segment))
    backward  dlogits = bf16(p ⊙ (dp − Σ_d do ⊙ o)),
              dE_diag[h, k − q] = Σ_b Σ_(q, k) dlogits        (per diagonal, [H, Lq + Lk − 1])

XLA:CPU runs these as five to seven separate loops (the logits + biases add, the max,
the exp, the sum, the bf16 rounding; the cotangent, its sum over the batch and the
relative-position-bias reduction), which leave the caches at long inputs (T5 1.1 small,
4 pairs, Li 1024: a [4, 6, 1024, 1024] float32 array is 100 MB). The position bias enters
as one value per diagonal (`network.RelativePositionBiases(..., diagonals=True)`), never
as an [H, Lq, Lk] array.

The kernels are built, cached and registered by `slic_jax.cpu_kernels` (AVX-512 BF16
intrinsics where the target has them, plain loops otherwise). The probabilities are in
the compute dtype (bfloat16 or float32), as in `network.softmax_weighted_values`.

Under a device mesh both calls are partitioned (`jax.experimental.custom_partitioning`):
every row is independent, so the batch and head axes keep the mesh axes they arrive
with and each device runs the kernels on its own shard; the query and key axes are
gathered if they come sharded (the softmax needs whole rows, the bias index k − q whole
diagonals). The bias gradient, summed over the batch inside the backward kernel, is
summed over the batch's mesh axes (`psum`) after it.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from slic_jax import cpu_kernels, matmul

SOURCE = cpu_kernels.CSRC / "fused_softmax.cc"
# The custom calls by the probabilities' dtype.
FORWARD_TARGETS = {"bfloat16": "slic_fused_softmax_fwd_bf16", "float32": "slic_fused_softmax_fwd_f32"}
BACKWARD_TARGETS = {"bfloat16": "slic_fused_softmax_bwd_bf16", "float32": "slic_fused_softmax_bwd_f32"}
_FEATURE = "attention_implementation='fused_softmax'"
UNUSED_DAYS = cpu_kernels.UNUSED_DAYS
KernelUnavailable = cpu_kernels.KernelUnavailable


def library_path() -> Path:
  """Builds the kernels' shared library if needed; returns its path
  (`cpu_kernels.library_path`: `KernelUnavailable` names the compiler or the failure)."""
  return cpu_kernels.library_path(SOURCE, _FEATURE)


def prune_cache(directory: Path, keep: Path, unused_days: float = UNUSED_DAYS) -> list[Path]:
  """`cpu_kernels.prune_cache` for this source's builds."""
  return cpu_kernels.prune_cache(directory, keep, f"{SOURCE.stem}-", unused_days)


def register() -> Path:
  """Builds (once per machine) and registers the CPU custom calls (forward and backward,
  bf16 and float32); idempotent."""
  return cpu_kernels.register(SOURCE, (*FORWARD_TARGETS.values(), *BACKWARD_TARGETS.values()),
                              _FEATURE)


def available() -> bool:
  """True if the kernels build and load here (used by tests to skip, counted)."""
  return cpu_kernels.builds(register)


def _kind(dtype) -> str:
  name = jnp.dtype(dtype).name
  if name not in FORWARD_TARGETS:
    raise ValueError(f"fused_softmax computes bfloat16 or float32 probabilities, not {name}")
  return name


def probabilities(logits, diagonal_bias, key_segments, query_segments, dtype=jnp.bfloat16):
  """p = softmax of logits + bias over the keys of each query's segment, in `dtype` (the
  forward kernel alone).

  logits f32 [B, H, Q, K]; diagonal_bias f32 [H, Q + K − 1], entry k − q + Q − 1 the bias
  of relative position k − q; key_segments [B, K], query_segments [B, Q]: query q attends
  to the keys whose segment equals its own; segment 0 is padding. Unpacked inputs pass
  their validity (1: a token, 0: padding); packed ones SeqIO's segment ids (1, 2, ...;
  exact in float32 below 2^24). A padding query row, or one with no key in its segment,
  is uniform 1/K (T5X's −1e10 mask bias gives the same). Returns p [B, H, Q, K] in
  `dtype` (bfloat16 or float32).
  Partitioned over B and H under a mesh (the module docstring).
  """
  register()
  _check_not_partially_manual()
  return _partitioned_forward(logits.astype(jnp.float32), diagonal_bias.astype(jnp.float32),
                              key_segments.astype(jnp.float32), query_segments.astype(jnp.float32),
                              _kind(dtype))


def probabilities_grad(dp, probs, row):
  """dlogits = p (dp − row) in p's dtype and its per-diagonal sums over b and the rows.

  dp f32 [B, H, Q, K], probs bf16 or f32 [B, H, Q, K], row f32 [B, H, Q]. Returns dlogits
  [B, H, Q, K] in probs' dtype (bf16: rounded once) and ddiag f32 [H, Q + K − 1] (sums of
  dlogits as returned). Partitioned over B and H under a mesh, ddiag summed over B's
  mesh axes.
  """
  register()
  kind = _kind(probs.dtype)
  return _partitioned_backward(dp.astype(jnp.float32), probs, row.astype(jnp.float32), kind)


def _forward_call(logits, diagonal_bias, key_segments, query_segments, kind):
  return jax.ffi.ffi_call(FORWARD_TARGETS[kind], jax.ShapeDtypeStruct(logits.shape, kind))(
      logits, diagonal_bias, key_segments, query_segments)


def _backward_call(dp, probs, row, kind):
  b, h, q, k = dp.shape
  return jax.ffi.ffi_call(
      BACKWARD_TARGETS[kind], (jax.ShapeDtypeStruct(dp.shape, kind),
                               jax.ShapeDtypeStruct((h, q + k - 1), jnp.float32)))(
      dp, probs, row)


# --- partitioning: rows are independent, so B and H keep their mesh axes -----------------

def _check_not_partially_manual():
  """custom_partitioning cannot run inside a shard_map that leaves a mesh axis of several
  devices to the partitioner (jax asserts while compiling); say so by name instead."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not mesh.manual_axes:
    return
  auto = [a for a, n in dict(mesh.shape).items() if n > 1 and a not in mesh.manual_axes]
  if auto:
    raise ValueError(
        f"attention_implementation='fused_softmax' inside a shard_map manual over "
        f"{sorted(mesh.manual_axes)} with mesh axes {auto} left to the partitioner "
        f"(per_device_accumulation with a 'model' axis of several devices) is not "
        f"supported: the kernels' partitioning rule cannot run there; use "
        f"attention_implementation='default' or per_device_accumulation=False")


_row_axes = cpu_kernels.leading_mesh_axes  # (batch axes, head axes) of a [B, H, Q, K] operand


def _forward_shardings(mesh, batch, heads):
  rows = NamedSharding(mesh, P(batch, heads, None, None))
  args = (rows, NamedSharding(mesh, P(heads, None)), NamedSharding(mesh, P(batch, None)),
          NamedSharding(mesh, P(batch, None)))
  return rows, args


def _forward_infer(kind, mesh, arg_shapes, result_shape):
  return _forward_shardings(mesh, *_row_axes(arg_shapes[0].sharding))[0]


def _forward_partition(kind, mesh, arg_shapes, result_shape):
  out, args = _forward_shardings(mesh, *_row_axes(arg_shapes[0].sharding))

  def lower(logits, diagonal_bias, key_segments, query_segments):
    return _forward_call(logits, diagonal_bias, key_segments, query_segments, kind)

  return mesh, lower, out, args


_partitioned_forward = custom_partitioning(_forward_call, static_argnums=(4,))
_partitioned_forward.def_partition(
    infer_sharding_from_operands=_forward_infer, partition=_forward_partition,
    sharding_rule="b h q k, h n, b k, b q -> b h q k",
    need_replication_factors=("q", "k", "n"))


def _backward_shardings(mesh, batch, heads):
  rows = NamedSharding(mesh, P(batch, heads, None, None))
  out = (rows, NamedSharding(mesh, P(heads, None)))
  return out, (rows, rows, NamedSharding(mesh, P(batch, heads, None)))


def _backward_infer(kind, mesh, arg_shapes, result_shape):
  return _backward_shardings(mesh, *_row_axes(arg_shapes[0].sharding))[0]


def _backward_partition(kind, mesh, arg_shapes, result_shape):
  batch, heads = _row_axes(arg_shapes[0].sharding)
  out, args = _backward_shardings(mesh, batch, heads)

  def lower(dp, probs, row):
    dlogits, ddiag = _backward_call(dp, probs, row, kind)
    if batch is not None:  # each device summed its own rows of the batch
      ddiag = jax.lax.psum(ddiag, batch)
    return dlogits, ddiag

  return mesh, lower, out, args


_partitioned_backward = custom_partitioning(_backward_call, static_argnums=(3,))
_partitioned_backward.def_partition(
    infer_sharding_from_operands=_backward_infer, partition=_backward_partition,
    sharding_rule="b h q k, b h q k, b h q -> b h q k, h n",
    need_replication_factors=("q", "k"))


def softmax_weighted_values(logits, value, diagonal_bias, key_segments, query_segments,
                            dtype):
  """o = softmax(logits + bias, masked) · v with the fused kernels.

  logits f32 [B, H, Q, K] (q·k, no bias), value [B, K, H, D], diagonal_bias f32
  [H, Q + K − 1], key_segments [B, K], query_segments [B, Q] (as `probabilities`: a query
  attends to its segment's keys; 0 is padding). Returns o [B, Q, H, D] in `dtype`
  (bfloat16 or float32: the probabilities' and the p·v matmul's dtype, float32
  accumulation). The VJP is `network.softmax_weighted_values`'s (dp = do · vᵀ in float32,
  row = Σ_d do ⊙ o, dv = pᵀ · do) with the elementwise part in the backward kernel; the
  bias gets its per-diagonal sums, the segments no gradient.
  """
  return _softmax_weighted_values(logits, value, diagonal_bias, key_segments, query_segments,
                                  _kind(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _softmax_weighted_values(logits, value, diagonal_bias, key_segments, query_segments, kind):
  return _fwd(logits, value, diagonal_bias, key_segments, query_segments, kind)[0]


def _fwd(logits, value, diagonal_bias, key_segments, query_segments, kind):
  p = probabilities(logits, diagonal_bias, key_segments, query_segments, kind)
  v = value.astype(kind)
  o = matmul.accumulate('bhqk,bkhd->bqhd', p, v).astype(kind)
  tags = tuple(jnp.zeros((0,), x.dtype) for x in (logits, value, diagonal_bias))
  return o, (p, v, o, key_segments, query_segments, tags)


def _bwd(kind, res, g):
  p, v, o, key_segments, query_segments, (logits_tag, value_tag, bias_tag) = res
  g = g.astype(kind)
  dv = matmul.contract('bhqk,bqhd->bkhd', p, g, dtype=kind)
  dp = matmul.contract('bqhd,bkhd->bhqk', g, v, dtype=kind)
  row = jnp.einsum('bqhd,bqhd->bhq', g.astype(jnp.float32), o.astype(jnp.float32))
  dlogits, ddiag = probabilities_grad(dp, p, row)
  return (dlogits.astype(logits_tag.dtype), dv.astype(value_tag.dtype),
          ddiag.astype(bias_tag.dtype), jnp.zeros_like(key_segments),
          jnp.zeros_like(query_segments))


_softmax_weighted_values.defvjp(_fwd, _bwd)
