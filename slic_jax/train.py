r"""slic_jax's trainer: ``python -m slic_jax.train --gin_file=gin/slic_hf.gin``.

One gin-configured `train()` whose argument and macro names follow
`t5x.train.train` (MODEL, MODEL_DIR, MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS,
TRAIN_STEPS, BATCH_SIZE, INITIAL_CHECKPOINT_PATH, EVAL_PERIOD, ...). The trainer
knows nothing of any loss: it differentiates ``model.loss_fn`` and logs the clu
metrics the model returns.

Sections: mesh → input pipeline → state (init / restore) → update step → loop
(metrics, eval, checkpoints).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from slic_jax import checkpointing
from slic_jax import compiler_options
from slic_jax import host_memory
from slic_jax import input_pipeline
from slic_jax import metric_logging
from slic_jax import partitioning
from slic_jax import t5x_bridge
from slic_jax.update_step import (  # noqa: F401 (TrainState, make_train_step re-exported)
    TrainState, check_microbatches, make_train_step)

# slic_jax's stand-ins for T5X's run configs: experiments `include
# 't5x/configs/runs/finetune.gin'`; `python -m t5x.train` finds T5X's own file, this
# trainer finds gin/slic_jax_runs/t5x/configs/runs/finetune.gin (see `parse_gin`).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_CONFIGS_DIR = os.path.join(REPO_ROOT, "gin", "slic_jax_runs")


def _compute(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(m.compute())) for k, m in metrics.items()}


def _merge(acc: Mapping[str, Any] | None, new: Mapping[str, Any]) -> Mapping[str, Any]:
  # timing/* from the model are T5X's wall-clock metrics (t5x_bridge.timing_metrics,
  # present when t5x is loaded); this trainer measures its own (Progress.rates).
  new = {k: v for k, v in new.items() if not k.startswith("timing/")}
  return dict(new) if acc is None else {k: acc[k].merge(v) for k, v in new.items()}


def train(
    *,
    model,
    train_dataset_cfg: input_pipeline.DatasetConfig,
    train_eval_dataset_cfg: input_pipeline.DatasetConfig | None = None,
    checkpoint_cfg: checkpointing.CheckpointConfig | None = None,
    partitioner: partitioning.Partitioner | None = None,
    model_dir: str,
    total_steps: int,
    eval_steps: int | None = None,
    eval_period: int = 1000,
    stats_period: int | None = None,
    random_seed: int | None = 0,
    run_eval_before_training: bool = False,
    num_microbatches: int | None = None,
    per_device_accumulation: bool = False,
    length_buckets: int = 1,
    **unused_t5x_kwargs,
) -> tuple[int, TrainState]:
  """Trains ``model`` until ``total_steps`` (absolute, as in T5X) and returns (step, state).

  Args:
    model: a `slic_jax.models` model (T5X protocol).
    train_dataset_cfg / train_eval_dataset_cfg: what to train / evaluate on.
    checkpoint_cfg: ``save`` (period, keep) and ``restore`` (INITIAL_CHECKPOINT_PATH).
      A run always resumes from the latest checkpoint in ``model_dir`` first.
    partitioner: the mesh and logical axis rules (default: all devices on 'data').
    model_dir: checkpoints, TensorBoard events and ``metrics.jsonl`` go here.
    total_steps: final step number.
    eval_steps: eval batches per evaluation (None: the whole split).
    eval_period: steps between evaluations (and the progress line).
    stats_period: steps between training-metric writes (default: eval_period / 10).
    random_seed: seeds parameter init and dropout.
    num_microbatches: split each batch into this many microbatches and accumulate their
      gradients (`update_step.make_train_step`; T5X: ``trainer.Trainer.num_microbatches``).
      Bind with ``--gin.train.num_microbatches=4`` (slic_jax.train only).
    per_device_accumulation: with microbatches on a mesh whose 'data' axis has several
      devices, accumulate each device's gradients locally and all-reduce them once per
      step instead of once per microbatch (`update_step.make_train_step`: the same
      gradient when every device's share of a microbatch holds as many examples). On
      TPU the default already all-reduces once per step (libtpu moves the loop's
      all-reduces after it); on CPU devices it does not.
    length_buckets: n > 1 pads each batch only as far as its longest example needs,
      rounded up to one of n bucket lengths per sequence axis
      (`input_pipeline.trim_padding`; exact for T5: only padding is dropped). Fewer
      positions is less work; each new shape compiles the step once more (at most n per
      axis). 1: every batch at TASK_FEATURE_LENGTHS, as T5X. slic_jax.train's run config
      binds ``LENGTH_BUCKETS`` (default 2). With several processes the hosts agree on
      each batch's lengths (`input_pipeline.HostBatchAgreement`).
    unused_t5x_kwargs: T5X run-config arguments that have no meaning here
      (e.g. ``trainer_cls``, ``use_orbax``); logged and ignored.
  """
  if unused_t5x_kwargs:
    logging.info("ignoring T5X-only train() arguments: %s", sorted(unused_t5x_kwargs))
  seed = 0 if random_seed is None else int(random_seed)
  stats_period = stats_period or max(eval_period // 10, 1)
  checkpoint_cfg = checkpoint_cfg or checkpointing.CheckpointConfig()
  os.makedirs(model_dir, exist_ok=True)
  if jax.process_index() == 0:  # multi-host: one writer, as for metrics and checkpoints
    with open(os.path.join(model_dir, "config.gin"), "w") as f:
      f.write(gin.operative_config_str() or gin.config_str())

  # ------------------------------------------------------------------ mesh
  p = partitioner or partitioning.Partitioner()
  logging.info("mesh %s over %d devices", dict(p.mesh.shape), p.mesh.size)

  # ------------------------------------------------------------------ input pipeline
  cfg = train_dataset_cfg
  if cfg.batch_size % p.data_size:
    raise ValueError(f"BATCH_SIZE {cfg.batch_size} is not divisible by the data axis {p.data_size}")
  try:
    check_microbatches(cfg.batch_size, num_microbatches, p.data_size)
  except ValueError as e:
    raise ValueError(f"BATCH_SIZE and train.num_microbatches: {e}") from None
  train_ds = input_pipeline.get_dataset(
      cfg, model.FEATURE_CONVERTER_CLS,
      shard_id=jax.process_index(), num_shards=jax.process_count(),
  )
  if length_buckets < 1:
    raise ValueError(f"train.length_buckets must be >= 1 (1: no trimming), got {length_buckets}")

  multihost = jax.process_count() > 1
  if multihost and not input_pipeline.can_agree_across_hosts():
    logging.warning(
        "%d processes but no jax distributed runtime (jax.distributed.initialize was not "
        "called): the hosts cannot agree on their batches, so every batch is padded to "
        "TASK_FEATURE_LENGTHS (length_buckets = 1), and eval needs the same number of "
        "batches on every host", jax.process_count())
    length_buckets = 1
    multihost = False

  def batch_agreement(name):
    # Several processes: every host's slice of a batch has the same lengths, and every
    # host yields the same number of batches (eval data sharded unevenly).
    return input_pipeline.HostBatchAgreement(name) if multihost else None

  host_batch = cfg.batch_size // jax.process_count()
  train_iter = input_pipeline.device_iterator(train_ds, p, batch_size=host_batch,
                                              length_buckets=length_buckets,
                                              agreement=batch_agreement("train"))
  element_spec = train_ds.element_spec
  input_shapes = {k: (cfg.batch_size,) + tuple(v.shape[1:]) for k, v in element_spec.items()}
  input_types = {k: v.dtype.as_numpy_dtype for k, v in element_spec.items()}

  # ------------------------------------------------------------------ state
  tx = t5x_bridge.as_optax(model.optimizer_def)  # unwraps T5X's OptaxWrapper if t5x is loaded
  init_rng = jax.random.PRNGKey(seed)
  _, state_sh = p.train_state_shardings(model, tx, input_shapes, input_types)
  params_sh = state_sh.params

  def init_state(rng):
    params = model.get_initial_variables(rng, input_shapes, input_types)["params"]
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))

  with p.activation_rules():
    state = jax.jit(init_state, out_shardings=state_sh)(init_rng)
  del init_state  # frees its compiled executable before the update step is compiled
  host_memory.trim()

  ckpt = checkpointing.Checkpointer(model_dir, checkpoint_cfg.save)
  latest = ckpt.latest_step()
  if latest is not None:
    params, opt_state = ckpt.restore(latest, state.params, state.opt_state)
    state = TrainState(step=jax.device_put(jnp.int32(latest), p.replicated()),
                       params=params, opt_state=opt_state)
    logging.info("resumed from %s step %d", model_dir, latest)
  elif checkpoint_cfg.restore and checkpoint_cfg.restore.path:
    params, init_step = checkpointing.restore_params(checkpoint_cfg.restore.path, state.params)
    # As in T5X, the step continues from the initial checkpoint (TRAIN_STEPS is absolute);
    # the optimizer state starts fresh.
    state = state.replace(params=params, step=jax.device_put(jnp.int32(init_step), p.replicated()))
    logging.info("initialised from %s (step %d)", checkpoint_cfg.restore.path, init_step)
  start_step = int(state.step)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info("%d params; starting at step %d of %d", num_params, start_step, total_steps)

  # ------------------------------------------------------------------ update step
  batch_sh = {k: p.batch_sharding(len(s)) for k, s in input_shapes.items()}
  xla_options = compiler_options.step_compiler_options()
  step_fn = jax.jit(
      make_train_step(model, tx, dropout_seed=seed + 1, num_microbatches=num_microbatches,
                      per_device_accumulation=per_device_accumulation),
      in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, None),
      donate_argnums=(0,),
      compiler_options=xla_options,
  )
  eval_fns = {}  # eval features (train's, or others: e.g. packed train, padded eval)

  def eval_fn(params, batch):
    features = tuple(sorted((k, v.ndim) for k, v in batch.items()))
    if features not in eval_fns:
      eval_fns[features] = jax.jit(
          model.eval_fn, compiler_options=xla_options,
          in_shardings=(params_sh, {k: p.batch_sharding(n) for k, n in features}))
    return eval_fns[features](params, batch)

  compiled_steps = {}  # batch shapes → the step compiled for them

  def compile_step(state, batch):
    # One executable per batch shape (one shape unless length_buckets > 1), compiled
    # before its first batch runs, so that the memory the compiler frees goes back to
    # the OS (host_memory.trim) before the step allocates its buffers.
    shapes = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
    if shapes not in compiled_steps:
      t0 = time.perf_counter()
      compiled_steps[shapes] = step_fn.lower(state, batch).compile()
      host_memory.trim()
      logging.info("update step compiled for %s (%d shape(s) so far) in %.1f s",
                   dict(shapes), len(compiled_steps), time.perf_counter() - t0)
    return compiled_steps[shapes]

  def run_step(state, batch):
    return compile_step(state, batch)(state, batch)

  if start_step < total_steps and length_buckets == 1:
    # The one shape is compiled ahead of the loop: the first window holds no compile.
    with p.activation_rules():
      compile_step(state, {k: jax.ShapeDtypeStruct(s, input_types[k], sharding=batch_sh[k])
                           for k, s in input_shapes.items()})

  def evaluate(step: int) -> dict[str, float] | None:
    if train_eval_dataset_cfg is None:
      return None
    ecfg = train_eval_dataset_cfg
    ds = input_pipeline.get_dataset(
        ecfg, model.FEATURE_CONVERTER_CLS, num_epochs=1,
        shard_id=jax.process_index(), num_shards=jax.process_count(),
    )
    acc = None
    with p.activation_rules():
      for i, batch in enumerate(input_pipeline.device_iterator(
          ds, p, batch_size=ecfg.batch_size // jax.process_count(),
          length_buckets=length_buckets, agreement=batch_agreement(f"eval/{step}"))):
        if eval_steps is not None and i >= eval_steps:
          break
        acc = _merge(acc, eval_fn(state.params, batch)[1])
    scalars = _compute(acc) if acc else {}
    logger.write(step, "train_eval", scalars)
    metric_logging.print_line(
        f"eval @ {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(scalars.items())))
    return scalars

  # ------------------------------------------------------------------ loop
  logger = metric_logging.MetricLogger(model_dir, write_files=jax.process_index() == 0)
  progress = metric_logging.Progress(total_steps, start_step)
  if run_eval_before_training:
    evaluate(start_step)
  window = None
  step = start_step
  with p.activation_rules():
    while step < total_steps:
      batch = next(train_iter)
      state, metrics = run_step(state, batch)
      step += 1
      window = _merge(window, metrics)
      if step % stats_period == 0 or step == total_steps:
        scalars = _compute(window)
        window = None
        scalars.update(progress.rates(step, cfg.batch_size))
        logger.write(step, "train", scalars)
        metric_logging.print_line(progress.line(
            step, scalars["loss"], scalars["timing/seqs_per_second"],
            scalars["timing/steps_per_second"]))
      if step % eval_period == 0 or step == total_steps:
        evaluate(step)
      ckpt.maybe_save(step, state.params, state.opt_state, force=step == total_steps)
  ckpt.close()
  logger.close()
  return step, state


# ---------------------------------------------------------------------- command line
def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              gin_search_paths: Sequence[str] = (".",)) -> None:
  """Parses gin files for this trainer.

  Search order: the name as given (relative to the cwd), then ``gin/slic_jax_runs``
  (slic_jax's stand-ins for ``t5x/configs/runs/*.gin``), then ``gin_search_paths`` and
  the repo root. Both are set for this parse only: gin keeps process-wide lists, and
  T5X's entries must not shadow the stand-ins -- its site-packages search path (added
  when a T5X config was parsed earlier in the process) and gin's "Python package"
  file reader, which would resolve 't5x/configs/runs/finetune.gin' to T5X's file
  wherever t5x is importable.
  """
  from gin import resource_reader  # pylint: disable=g-import-not-at-top

  prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  saved_prefixes, saved_readers = list(prefixes), list(readers)
  prefixes[:] = [""] + [p for p in (RUN_CONFIGS_DIR, *gin_search_paths, REPO_ROOT) if p]
  readers[:] = [r for r in readers if r[0] is not resource_reader.system_path_reader]
  try:
    # interactive_mode: one process may parse configs for both trainers (tests, tools),
    # and both register their train() as `train_script.train`.
    with gin.config.interactive_mode():
      gin.parse_config_files_and_bindings(gin_files, gin_bindings, finalize_config=True)
  finally:
    prefixes[:], readers[:] = saved_prefixes, saved_readers


def parse_experiment(gin_files: Sequence[str], gin_bindings: Sequence[str] = ()) -> None:
  """Parses experiment gin files as ``python -m slic_jax.train`` would, from any process.

  The run config does ``import __main__ as train_script``; while parsing, ``__main__`` is
  this module (tests, tools and notebooks have another ``__main__``).
  """
  main = sys.modules["__main__"]
  sys.modules["__main__"] = sys.modules[__name__]
  try:
    parse_gin(list(gin_files), list(gin_bindings))
  finally:
    sys.modules["__main__"] = main


def _rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """``--gin.NAME=VALUE`` → ``--gin_bindings=NAME = VALUE`` (T5X's shorthand)."""
  out = []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      name, value = arg[len("--gin."):].split("=", 1)
      out.append(f"--gin_bindings={name} = {value}")
    else:
      out.append(arg)
  return out


def main(argv: Sequence[str]) -> None:
  from absl import flags

  f = flags.FLAGS
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  if f.multiprocess_gpu:
    # As t5x.train: several processes (hosts), one jax distributed runtime.
    logging.info("jax.distributed.initialize(coordinator_address=%s, num_processes=%s, "
                 "process_id=%s)", f.coordinator_address, f.process_count, f.process_index)
    jax.distributed.initialize(f.coordinator_address, f.process_count, f.process_index)
  parse_gin(f.gin_file, f.gin_bindings, f.gin_search_paths)
  # Before jax starts its backend: keep the step's freed host buffers for reuse.
  logging.info("host_memory.reuse_freed_memory: %s", host_memory.reuse_freed_memory())
  train_fn = sys.modules["__main__"].__dict__.get("train", train)
  gin.get_configurable(train_fn)()  # gin supplies every argument


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_multi_string("gin_file", [], "gin config files")
  flags.DEFINE_multi_string("gin_bindings", [], "individual gin bindings")
  flags.DEFINE_list("gin_search_paths", ["."], "gin include search paths")
  # t5x.train's multi-host flags (its name: the same runtime serves CPU processes too).
  flags.DEFINE_boolean("multiprocess_gpu", False, "initialize jax's distributed runtime with "
                       "coordinator_address, process_count and process_index")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator")
  flags.DEFINE_integer("process_count", None, "number of processes")
  flags.DEFINE_integer("process_index", None, "index of this process")
  logging.set_verbosity(logging.INFO)
  app.run(main, argv=_rewrite_gin_args(sys.argv))
