"""orbax checkpoints in T5X's layout: save every N steps, keep K, resume from the latest.

Layout (what ``python -m t5x.train`` writes and reads, so either trainer resumes or
starts from the other's checkpoints)::

  {model_dir}/checkpoint_{step}/state      orbax PyTree (OCDBT) of
      {'target': params,
       'state': {'step': int32,
                 'param_states': optimizer state}}

``param_states`` is the optax state as T5X's ``OptaxWrapper.state_dict`` stores it:
`flax.serialization.to_state_dict` of the optax state with empty sub-dicts (optax's
``EmptyState``) removed. T5X additionally writes an (empty) ``dataset`` item; it is
not needed to restore.

``INITIAL_CHECKPOINT_PATH`` (`restore_params`) takes a ``.../checkpoint_{step}`` dir
or a model_dir (its latest step) and restores the params (``target``) only, plus the
step. Config classes mirror ``t5x.utils``' names and fields
(`SaveCheckpointConfig`, `RestoreCheckpointConfig`, `CheckpointConfig`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

STEP_PREFIX = "checkpoint"
ITEM = "state"


@dataclasses.dataclass(frozen=True)
class SaveCheckpointConfig:
  period: int | None = None  # steps between saves; None: only at the end
  keep: int | None = None  # number of checkpoints kept; None: all
  dtype: str = "float32"  # kept for T5X compatibility; params are saved as they are
  save_dataset: bool = False  # T5X field; slic_jax never saves the input pipeline


@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
  """``INITIAL_CHECKPOINT_PATH``. slic_jax always restores params + step from it.

  ``assignment_map`` / ``fallback_to_scratch`` / ``strict`` are T5X's fields, accepted
  so that one experiment file configures both trainers: in T5X,
  ``assignment_map=((r'state/param_states.*', None),)`` with ``fallback_to_scratch=True``
  makes T5X take params + step only too (fresh optimizer state), which is what
  slic_jax does regardless.
  """

  path: str | None = None  # a model_dir (latest step) or one checkpoint_{step} dir
  mode: str = "specific"  # 'specific' (path) or 'latest'
  dtype: str = "float32"
  assignment_map: Sequence[tuple[str, str | None]] | None = None
  fallback_to_scratch: bool = False
  strict: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  save: SaveCheckpointConfig | None = None
  restore: RestoreCheckpointConfig | None = None


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding (restore targets)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
  )


# ---------------------------------------------------------------------- optax <-> T5X
def opt_state_to_t5x(opt_state: Any) -> dict:
  """optax state → T5X's ``param_states`` dict (state dict without empty sub-dicts)."""
  flat = traverse_util.flatten_dict(flax.serialization.to_state_dict(opt_state), sep="/")
  return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


def opt_state_from_t5x(template: Any, param_states: Any) -> Any:
  """Inverse of `opt_state_to_t5x`: fills ``template`` (an optax state) from the dict."""
  ref = traverse_util.flatten_dict(
      flax.serialization.to_state_dict(template), keep_empty_nodes=True, sep="/")
  src = traverse_util.flatten_dict(param_states or {}, sep="/")
  missing = [k for k, v in ref.items() if k not in src and v is not traverse_util.empty_node]
  if missing:
    raise ValueError(f"optimizer state in the checkpoint lacks {missing[:5]} ...")
  full = {k: src.get(k, v) for k, v in ref.items()}
  return flax.serialization.from_state_dict(
      template, traverse_util.unflatten_dict(full, sep="/"))


def _t5x_tree(step: Any, params: Any, opt_state: Any) -> dict:
  return {"target": params, "state": {"step": step, "param_states": opt_state_to_t5x(opt_state)}}


def _restore_args(abstract_tree: Any) -> Any:
  return jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
      abstract_tree)


def _manager(directory: str, *, keep: int | None = None, read_only: bool = False):
  return ocp.CheckpointManager(
      directory,
      item_names=(ITEM,),
      item_handlers={ITEM: ocp.PyTreeCheckpointHandler(use_ocdbt=True)},
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=not read_only, read_only=read_only,
          step_prefix=STEP_PREFIX, save_interval_steps=0 if read_only else 1,
      ),
  )


class Checkpointer:
  """Saves/restores the train state as ``{model_dir}/checkpoint_{step}/state``."""

  def __init__(self, model_dir: str, cfg: SaveCheckpointConfig | None):
    cfg = cfg or SaveCheckpointConfig()
    self.period = cfg.period
    self.manager = _manager(os.path.abspath(model_dir), keep=cfg.keep)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def maybe_save(self, step: int, params: Any, opt_state: Any, *, force: bool = False) -> bool:
    if not force and not (self.period and step % self.period == 0):
      return False
    if self.manager.latest_step() == step:
      return False
    tree = _t5x_tree(np.int32(step), params, opt_state)
    self.manager.save(step, args=ocp.args.Composite(**{ITEM: ocp.args.PyTreeSave(tree)}))
    return True

  def restore(self, step: int, params: Any, opt_state: Any) -> tuple[Any, Any]:
    """Restores params and optimizer state into the shardings of the given templates."""
    tree = _t5x_tree(None, _abstract(params), _abstract(opt_state))
    restore_args = _restore_args(tree)
    tree["state"]["step"] = jax.ShapeDtypeStruct((), np.int32)
    restore_args["state"]["step"] = ocp.RestoreArgs(restore_type=np.ndarray)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{ITEM: ocp.args.PyTreeRestore(
        item=tree, restore_args=restore_args)}))[ITEM]
    return restored["target"], opt_state_from_t5x(opt_state, restored["state"]["param_states"])

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _step_dir(path: str) -> tuple[str, int | None]:
  """(model_dir, step) for ``.../checkpoint_{step}``; (path, None) for a model_dir."""
  m = re.fullmatch(rf"{STEP_PREFIX}_(\d+)", os.path.basename(path.rstrip("/")))
  if m:
    return os.path.dirname(path.rstrip("/")), int(m.group(1))
  return path, None


def restore_params(path: str, params_template: Any) -> tuple[Any, int]:
  """Params from another run (ours or T5X's): ``path`` is its model_dir (latest step)
  or one ``checkpoint_{step}`` dir. Returns ``(params, step)`` placed like
  ``params_template``; the optimizer state in the checkpoint is not read.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"INITIAL_CHECKPOINT_PATH not found: {path}")
  directory, step = _step_dir(path)
  manager = _manager(directory, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no {STEP_PREFIX}_<step> checkpoints under {directory}")
  logging.info("initialising params from %s step %d", directory, step)
  tree = {"target": _abstract(params_template)}
  restored = manager.restore(step, args=ocp.args.Composite(**{ITEM: ocp.args.PyTreeRestore(
      item=tree, restore_args=_restore_args(tree), partial_restore=True)}))[ITEM]
  manager.close()
  return restored["target"], step
