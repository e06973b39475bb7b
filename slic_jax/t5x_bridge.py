"""What lets `python -m t5x.train` drive slic_jax models, without importing t5x.

slic_jax never imports t5x: everything here looks at what the running process has
already loaded (``sys.modules``) and falls back to plain slic_jax behaviour.

* ``optimizer_def``: experiments bind an optax transformation
  (`slic_jax.optimizers.create_optimizer`). T5X needs a ``t5x.optimizers.OptimizerDef``;
  `as_t5x_optimizer` wraps the transformation in ``t5x.optimizers.OptaxWrapper`` when
  t5x is loaded, `as_optax` unwraps it again for slic_jax's trainer. The learning rate
  lives in the optax transformation; T5X's ``trainer.Trainer.learning_rate_fn`` is then
  only logged (as ``learning_rate``), never applied.
* Timing metrics: T5X's throughput numbers (``timing/seqs_per_second`` ...) come from
  the model's ``loss_fn``. `timing_metrics` returns them (t5x's own metric classes)
  when t5x is loaded, else nothing; slic_jax's trainer measures its own.
* Adafactor under T5X's partitioner: ``OptaxWrapper`` derives the optimizer state's
  logical axes per optax state type and has no rule for ``optax.FactoredState``
  (optax.adafactor); `as_t5x_optimizer` adds one (full-size second moments follow
  their param; the factored row/column statistics and the count are replicated —
  the same layout slic_jax's partitioner uses).
* Gin: experiment files import this module as ``utils``
  (``from slic_jax import t5x_bridge as utils``). Attribute access then resolves to
  ``t5x.utils.<name>`` when the running trainer (``__main__``) is T5X's, and to
  slic_jax's class of the same name otherwise, so one binding such as
  ``train/utils.DatasetConfig.pack = False`` configures whichever trainer runs.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

import jax
import jax.numpy as jnp

# t5x.utils names that experiment files may bind, and slic_jax's counterparts.
_UTILS = {
    "DatasetConfig": "slic_jax.input_pipeline",
    "CheckpointConfig": "slic_jax.checkpointing",
    "SaveCheckpointConfig": "slic_jax.checkpointing",
    "RestoreCheckpointConfig": "slic_jax.checkpointing",
    # Only logged by T5X (the optax schedule applies); nothing reads it in slic_jax.
    "create_learning_rate_scheduler": "slic_jax.t5x_bridge",
}


def t5x_loaded() -> bool:
  """Whether the process has imported t5x (``t5x.train`` imports ``t5x.optimizers``)."""
  return "t5x.optimizers" in sys.modules


def running_under_t5x() -> bool:
  """Whether ``__main__`` is a T5X entry point (``python -m t5x.train``, or a test
  that points ``sys.modules['__main__']`` at ``t5x.train`` while parsing gin)."""
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  name = getattr(spec, "name", None) or getattr(main, "__name__", "")
  return name.startswith("t5x.")


def __getattr__(name: str) -> Any:
  """``utils.<Config>`` for gin: t5x.utils' class under T5X, else slic_jax's."""
  if name not in _UTILS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  if running_under_t5x():
    return getattr(importlib.import_module("t5x.utils"), name)
  module = importlib.import_module(_UTILS[name])
  return getattr(module, "_slic_jax_" + name, None) or getattr(module, name)


def _slic_jax_create_learning_rate_scheduler(**unused_kwargs):
  """Stands in for ``t5x.utils.create_learning_rate_scheduler`` (T5X's logged-only
  learning rate); slic_jax's trainer takes the rate from the optax transformation."""
  return None


# ---------------------------------------------------------------------- optimizer
def as_optax(optimizer_def: Any) -> Any:
  """The optax transformation inside a T5X ``OptaxWrapper`` (or the argument itself)."""
  return getattr(optimizer_def, "optax_optimizer", optimizer_def)


def as_t5x_optimizer(optimizer_def: Any) -> Any:
  """``t5x.optimizers.OptaxWrapper(tx)`` when t5x is loaded and ``tx`` is plain optax."""
  if not t5x_loaded() or hasattr(optimizer_def, "init_state"):
    return optimizer_def  # no t5x here, or already a t5x OptimizerDef
  t5x_optimizers = sys.modules["t5x.optimizers"]
  _add_factored_state_rule(t5x_optimizers)
  return t5x_optimizers.OptaxWrapper(optimizer_def)


def _factored_state_axes(state, params_axes):
  """Logical axes of an ``optax.FactoredState`` (see the module docstring)."""
  import optax  # pylint: disable=g-import-not-at-top

  def full_or_none(v, axes):
    rank = len(getattr(v, "shape", ()))
    return axes if axes is not None and rank == len(axes) and rank > 0 else None

  def none_like(tree):
    return jax.tree.map(lambda _: None, tree)

  return optax.FactoredState(
      count=None,
      v_row=none_like(state.v_row),
      v_col=none_like(state.v_col),
      v=jax.tree.map(lambda axes, v: full_or_none(v, axes), params_axes, state.v,
                     is_leaf=lambda x: x is None),
  )


def _add_factored_state_rule(t5x_optimizers) -> None:
  import optax  # pylint: disable=g-import-not-at-top

  rules = t5x_optimizers.OptaxStatePartitionRules._RULES  # pylint: disable=protected-access
  rules.setdefault(optax.FactoredState, _factored_state_axes)


# ---------------------------------------------------------------------- metrics
def timing_metrics(num_seqs: jax.Array, num_target_tokens: jax.Array) -> dict[str, Any]:
  """T5X's throughput metrics (as in ``t5x.models.compute_base_metrics``) when t5x is
  loaded; ``{}`` otherwise. T5X's trainer fills in the wall time and step count."""
  metrics_lib = sys.modules.get("t5x.metrics")
  if metrics_lib is None:
    return {}
  num_seqs = jnp.asarray(num_seqs, jnp.float32)
  num_target_tokens = jnp.asarray(num_target_tokens, jnp.float32)
  cores = jax.device_count()
  return {
      "timing/seqs_per_second": metrics_lib.TimeRate.from_model_output(numerator=num_seqs),
      "timing/steps_per_second": metrics_lib.StepsPerTime.from_model_output(),
      "timing/seconds": metrics_lib.Time(),
      "timing/seqs": metrics_lib.Sum(num_seqs),
      "timing/seqs_per_second_per_core": metrics_lib.TimeRate.from_model_output(
          numerator=num_seqs / cores),
      "timing/target_tokens_per_second": metrics_lib.TimeRate.from_model_output(
          numerator=num_target_tokens),
      "timing/target_tokens_per_second_per_core": metrics_lib.TimeRate.from_model_output(
          numerator=num_target_tokens / cores),
  }
