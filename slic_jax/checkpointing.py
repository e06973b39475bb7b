"""orbax checkpoints: save every N steps, keep K, resume from the latest.

Layout: ``{model_dir}/checkpoints/{step}/{params,opt_state}`` — two orbax items so
that a run can start from another run's params alone
(``INITIAL_CHECKPOINT_PATH``). Config classes mirror T5X's names
(`utils.SaveCheckpointConfig`, `utils.RestoreCheckpointConfig`,
`utils.CheckpointConfig`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


@dataclasses.dataclass(frozen=True)
class SaveCheckpointConfig:
  period: int | None = None  # steps between saves; None: only at the end
  keep: int | None = None  # number of checkpoints kept; None: all
  dtype: str = "float32"  # kept for T5X compatibility; params are saved as they are


@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
  path: str | None = None  # a run's checkpoints dir, or one step dir inside it
  mode: str = "specific"  # 'specific' (path) or 'latest'
  dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  save: SaveCheckpointConfig | None = None
  restore: RestoreCheckpointConfig | None = None


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding (restore targets)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
  )


class Checkpointer:
  """Saves/restores ``{'params', 'opt_state'}`` under ``{model_dir}/checkpoints``."""

  def __init__(self, model_dir: str, cfg: SaveCheckpointConfig | None):
    cfg = cfg or SaveCheckpointConfig()
    self.period = cfg.period
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(model_dir), "checkpoints"),
        item_names=("params", "opt_state"),
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def maybe_save(self, step: int, params: Any, opt_state: Any, *, force: bool = False) -> bool:
    if not force and not (self.period and step % self.period == 0):
      return False
    if self.manager.latest_step() == step:
      return False
    self.manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)
        ),
    )
    return True

  def restore(self, step: int, params: Any, opt_state: Any) -> tuple[Any, Any]:
    """Restores both items into the shardings of the given (template) trees."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
        ),
    )
    return restored["params"], restored["opt_state"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(path: str, params_template: Any) -> tuple[Any, int]:
  """Params from another run: ``path`` is its checkpoints dir (latest step) or a step dir.

  Returns ``(params, step)`` placed like ``params_template``.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"INITIAL_CHECKPOINT_PATH not found: {path}")
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit():
    directory, step = os.path.dirname(path), int(base)
  else:
    directory = path
    if os.path.isdir(os.path.join(path, "checkpoints")):
      directory = os.path.join(path, "checkpoints")
    step = None
  manager = ocp.CheckpointManager(
      directory, item_names=("params", "opt_state"),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
  )
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint steps under {directory}")
  logging.info("initialising params from %s step %d", directory, step)
  restored = manager.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params_template)))
  )
  manager.close()
  return restored["params"], step
