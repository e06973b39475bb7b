"""The pure update step: ``(state, batch) -> (state', metrics)``, jitted by the caller.

Kept apart from `slic_jax.train` (which also builds the SeqIO input pipeline) so that
anything that only needs the step (benchmarks, tests, other loops) imports neither
SeqIO nor TensorFlow. The step knows nothing of any loss: it differentiates
``model.loss_fn`` and returns the clu metrics the model reports plus ``grad_norm``.
"""
from __future__ import annotations

from typing import Any, Callable

import clu.metrics as clu_metrics
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def check_microbatches(batch_rows: int, num_microbatches: int | None, data_shards: int) -> None:
  """Raises a ValueError unless every device's rows split into ``num_microbatches``.

  `make_train_step` sends example b to microbatch b mod k, so that each device's shard of
  a batch split over ``data_shards`` devices splits locally; with ``batch_rows /
  data_shards`` not a multiple of k a microbatch would span devices unevenly and the SPMD
  partitioner moves the batch between devices every step ("involuntary full
  rematerialization"). Needs ``batch_rows`` divisible by ``data_shards · k``.
  """
  k = int(num_microbatches or 1)
  if k < 1:
    raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
  if batch_rows % (data_shards * k):
    raise ValueError(
        f"a batch of {batch_rows} rows over a data axis of {data_shards} device(s) gives "
        f"{batch_rows / data_shards:g} rows per device, which do not split into "
        f"num_microbatches={k} whole microbatches: the batch size must be a multiple of "
        f"{data_shards * k}")


def make_train_step(model, tx: optax.GradientTransformation, dropout_seed: int,
                    num_microbatches: int | None = None,
                    per_device_accumulation: bool = False) -> Callable:
  """The pure update: (state, batch) → (state', metrics). Jitted by the caller.

  ``g = ∇ model.loss_fn(params, batch)``; ``params' = params + tx(g)``; the metric
  ``grad_norm = ‖g‖₂``, by ``tx.global_norm(g)`` where the transformation has one (the
  norm its own update computes, e.g. `optimizers.KernelNormTransformation`: XLA then
  computes it once), else `optax.tree.norm`.

  num_microbatches: k > 1 splits the batch into k microbatches (example b goes to
    microbatch b mod k, so each device's shard of a data-sharded batch splits locally),
    runs them one after the other (``lax.scan``) and applies one update with the mean of
    their gradients, ``g = (1/k) Σ_i ∇ loss(params, batch_i)``: the whole-batch gradient
    when every microbatch holds the same number of real examples, with about 1/k of the
    activation memory. Metrics are merged over the microbatches. As T5X's
    ``Trainer.num_microbatches``; None or 1: the whole batch at once. On a mesh whose
    'data' axis has D > 1 devices the SPMD partitioner all-reduces every microbatch's
    gradients over 'data' inside the loop. XLA:CPU keeps them there (k times the one
    all-reduce of a whole-batch step); libtpu moves the all-reduce of each accumulated
    gradient after the loop, where it is one all-reduce per gradient (the embedding's
    and the position biases' are, `slic_jax.data_shards`): T5 1.1 small, bf16, 4
    microbatches on a TPU v5e 8×1 sends 308 MB per device per step, the float32
    gradients once (`tools/mesh_step_cost.py --topology`, `benchmarks/NOTES.md`,
    session 37). XLA's GPU pipeline has the same pass (``WhileLoopAllReduceCodeMotion``;
    not compiled here).
  per_device_accumulation: with k > 1 on such a mesh, each device instead accumulates
    the gradients of its own shard of every microbatch and the sum is all-reduced once,
    ``g = (1/(kD)) Σ_{i,d} ∇ loss(params, batch_{i,d})`` (``jax.shard_map`` manual over
    'data', the other mesh axes left to the partitioner): each device's share of a
    microbatch is normalised on its own, as each microbatch already is, so the gradient
    is the same when every share holds the same number of real examples (SLiC-HF's
    means over pairs, full batches) and a weighting by shares otherwise (token-averaged
    SFT with uneven padding). Metrics are merged over devices by summing their fields
    (clu ``Average``, slic_jax's ``Sum``); dropout draws per device. Needs logical-axis
    rules that map nothing but 'batch' to 'data' (not T5X's 2-D parameter partitioning)
    and, with a 'model' axis of several devices, not the CPU softmax kernels. Off, or
    without such a mesh: the step above. For a compiler that moves the loop's
    all-reduces after it (libtpu) the step above already sends as much (T5 1.1 small,
    bf16, 4 microbatches, TPU v5e 8×1 and 4×2: 308 and 405 MB per device either way,
    session 37); where it does not (XLA:CPU), this sends k times less.
  """
  grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
  k = int(num_microbatches or 1)

  def loss_grads(params, batch, rng):
    if k <= 1:
      (_, metrics), grads = grad_fn(params, batch, rng)
      return dict(metrics), grads
    rows = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(rows) != 1 or next(iter(rows)) % k:
      raise ValueError(f"batch of {sorted(rows)} rows does not split into {k} microbatches")
    b = next(iter(rows))
    split = jax.tree.map(lambda x: x.reshape((b // k, k) + x.shape[1:]).swapaxes(0, 1), batch)

    def body(carry, xs):
      acc_grads, acc_metrics = carry
      i, micro = xs
      (_, m), g = grad_fn(params, micro, jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, acc_grads, g),
              {name: acc_metrics[name].merge(m[name]) for name in acc_metrics}), None

    # All k microbatches inside the loop, from zeros (the metrics are sums, clu
    # `Average` and slic_jax's `Sum`, whose zeros merge as nothing): the model is in
    # the program once (a first microbatch outside the loop compiled it twice), and
    # every gradient's all-reduce is `acc + all-reduce(g)` inside the loop, the pattern
    # that libtpu moves after it (not XLA:CPU); `acc + all-reduce(g1) + all-reduce(g2)`,
    # a parameter read twice, stays (`slic_jax.data_shards`).
    (_, m0), g0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], split), rng)
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
    (grads, metrics), _ = jax.lax.scan(
        body, (jax.tree.map(zeros, g0), jax.tree.map(zeros, dict(m0))),
        (jnp.arange(k), split))
    return metrics, jax.tree.map(lambda g: g / k, grads)

  def per_device_loss_grads(params, batch, rng):
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else dict(mesh.shape).get("data", 1)
    if k <= 1 or shards <= 1:
      return loss_grads(params, batch, rng)
    rules = tuple(nn.get_logical_axis_rules())
    if any(axis == "data" and name != "batch" for name, axis in rules):
      raise ValueError(
          "per_device_accumulation needs logical-axis rules that map only 'batch' to the "
          f"'data' mesh axis, got {[n for n, a in rules if a == 'data']}")
    # Manual: 'data' and the axes of one device (nothing to partition there); the rest
    # (a 'model' axis of several devices) stays with the SPMD partitioner.
    manual = {"data"} | {a for a, n in dict(mesh.shape).items() if n == 1}
    local_rules = tuple((name, None if axis in manual else axis) for name, axis in rules)

    def local(params, batch, rng):  # one device's shard of the batch ('data' manual)
      with nn.logical_axis_rules(local_rules):
        metrics, grads = loss_grads(params, batch,
                                    jax.random.fold_in(rng, jax.lax.axis_index("data")))
      grads = jax.tree.map(lambda g: jax.lax.psum(g, "data") / shards, grads)
      return jax.tree.map(lambda x: jax.lax.psum(x, "data"), metrics), grads

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P()),
                         out_specs=(P(), P()), axis_names=manual,
                         check_vma=False)(params, batch, rng)

  def train_step(state: TrainState, batch):
    # The key made inside the step (a constant there), not when the step is built: no
    # array is placed on a device before the step is compiled for its mesh.
    rng = jax.random.fold_in(jax.random.PRNGKey(dropout_seed), state.step)
    metrics, grads = (per_device_loss_grads if per_device_accumulation else loss_grads)(
        state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = _scalar_metric(getattr(tx, "global_norm", optax.tree.norm)(grads))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def _scalar_metric(x):
  return clu_metrics.Average(total=jnp.asarray(x, jnp.float32), count=jnp.float32(1.0))
