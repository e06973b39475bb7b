"""The pure update step: ``(state, batch) -> (state', metrics)``, jitted by the caller.

Kept apart from `slic_jax.train` (which also builds the SeqIO input pipeline) so that
anything that only needs the step (benchmarks, tests, other loops) imports neither
SeqIO nor TensorFlow. The step knows nothing of any loss: it differentiates
``model.loss_fn`` and returns the clu metrics the model reports plus ``grad_norm``.
"""
from __future__ import annotations

from typing import Any, Callable

import clu.metrics as clu_metrics
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def make_train_step(model, tx: optax.GradientTransformation, dropout_seed: int) -> Callable:
  """The pure update: (state, batch) → (state', metrics). Jitted by the caller."""
  base_rng = jax.random.PRNGKey(dropout_seed)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    (_, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
        state.params, batch, rng
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics["grad_norm"] = _scalar_metric(optax.tree.norm(grads))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def _scalar_metric(x):
  return clu_metrics.Average(total=jnp.asarray(x, jnp.float32), count=jnp.float32(1.0))
