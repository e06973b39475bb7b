"""optax optimizers and learning-rate schedules, configured from gin.

`create_optimizer()` returns one `optax.GradientTransformation` that the model
carries as ``optimizer_def`` (T5X's name for it):

    clip_by_global_norm(clip_norm) → adafactor | adamw (with schedule) .

Schedules (``schedule=``), with ``s`` the step, ``w`` warm-up steps, ``lr`` the
base rate and ``T`` the total steps:
  constant:  lr · min(1, (s+1)/w)
  rsqrt:     lr · min(1, (s+1)/w) · sqrt(max(w, 1) / max(s+1, w))   (T5's inverse square root)
  cosine:    lr · min(1, (s+1)/w) · ½(1 + cos(π · min(s, T)/T))
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(
    *,
    learning_rate: float = 1e-3,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
) -> optax.Schedule:
  """Returns ``step -> learning rate`` (see the module docstring for the equations)."""
  warmup = max(int(warmup_steps), 0)

  def fn(step):
    s = jnp.asarray(step, jnp.float32) + 1.0
    ramp = jnp.minimum(1.0, s / warmup) if warmup else 1.0
    if schedule == "constant":
      decay = 1.0
    elif schedule == "rsqrt":
      decay = jnp.sqrt(max(warmup, 1) / jnp.maximum(s, max(warmup, 1)))
    elif schedule == "cosine":
      if not total_steps:
        raise ValueError("schedule='cosine' needs total_steps")
      frac = jnp.minimum(s - 1.0, total_steps) / total_steps
      decay = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    else:
      raise ValueError(f"unknown schedule {schedule!r}; expected constant, rsqrt or cosine")
    return learning_rate * ramp * decay

  return fn


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """``g ← g · min(1, max_norm / ‖g‖₂)``, ‖g‖₂ the norm over all leaves (gradient clipping).

  The same transformation and state (`optax.EmptyState`) as `optax.clip_by_global_norm`,
  written as one multiply by a scalar instead of optax's per-leaf ``select(trigger, g,
  g / ‖g‖ · max_norm)``: XLA then fuses the scale into the optimizer's own passes over
  the gradients instead of first writing a clipped copy of every gradient.
  """

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def create_optimizer(
    *,
    name: str = "adafactor",
    learning_rate: optax.ScalarOrSchedule | None = None,
    clip_norm: float | None = 1.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    decay_rate: float = 0.8,
    multiply_by_parameter_scale: bool = False,
) -> optax.GradientTransformation:
  """The training optimizer.

  Args:
    name: 'adafactor' (T5's default; factored second moments, decay_rate 0.8) or
      'adamw'.
    learning_rate: a float or schedule; default `learning_rate_schedule()` from gin.
    clip_norm: global-norm gradient clipping threshold (None: off).
    weight_decay: decoupled weight decay (AdamW's λ; Adafactor's decay_rate-independent
      weight decay).
    b1, b2, eps: AdamW moments.
    decay_rate, multiply_by_parameter_scale: Adafactor settings. T5X fine-tuning
      uses a constant 1e-3 step without parameter scaling; that is the default.
  """
  lr = learning_rate if learning_rate is not None else learning_rate_schedule()
  if name == "adafactor":
    opt = optax.adafactor(
        learning_rate=lr,
        decay_rate=decay_rate,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=1.0,
        weight_decay_rate=weight_decay or None,
    )
  elif name == "adamw":
    opt = optax.adamw(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  else:
    raise ValueError(f"unknown optimizer {name!r}; expected 'adafactor' or 'adamw'")
  if clip_norm:
    opt = optax.chain(clip_by_global_norm(clip_norm), opt)
  return opt
