"""The T5X path: `python -m t5x.train --gin_file=gin/slic_hf.gin` with real T5X.

Skipped (with the reason printed by `pytest -rs`) where t5x is not importable, e.g. in
the project's own environment. Where it is (see README "T5X"), it checks that
* gin/slic_hf.gin and gin/sft.gin parse as T5X parses them and build slic_jax models
  with T5X's OptimizerDef and t5x.utils configs;
* `python -m t5x.train` trains SLiC-HF from a slic_jax SFT checkpoint with the same
  losses as `slic_jax.train` on the same checkpoint, seed and data;
* each trainer resumes from the other's checkpoints.
"""
import json
import os
import re
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

t5x_train = pytest.importorskip(
    "t5x.train", reason="t5x is not installed here (the T5X path needs T5X from source)")
from t5x import gin_utils  # pylint: disable=g-import-not-at-top
from t5x import optimizers as t5x_optimizers  # pylint: disable=g-import-not-at-top
from t5x import utils as t5x_utils  # pylint: disable=g-import-not-at-top

from slic_jax import models  # pylint: disable=g-import-not-at-top
from slic_jax import t5x_bridge  # pylint: disable=g-import-not-at-top
from slic_jax import train  # pylint: disable=g-import-not-at-top
from slic_jax.data import synthetic  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T5X_SEARCH_PATH = os.path.dirname(os.path.dirname(os.path.abspath(t5x_train.__file__)))
TINY = {
    "network.T5Config.emb_dim": "32", "network.T5Config.num_heads": "2",
    "network.T5Config.head_dim": "16", "network.T5Config.mlp_dim": "64",
    "network.T5Config.num_encoder_layers": "1", "network.T5Config.num_decoder_layers": "1",
    "TASK_FEATURE_LENGTHS": "{'inputs': 64, 'targets': 24}", "BATCH_SIZE": "8",
    "EVAL_STEPS": "2",
}


def _bindings(extra):
  return [f"{k} = {v}" for k, v in {**TINY, **extra}.items()]


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def parse_for_t5x(gin_file, bindings=()):
  """Parses as `python -m t5x.train` does (t5x.train as __main__, T5X's search path);
  `gin_file` is one file or a list, as repeated --gin_file flags."""
  gin_files = [gin_file] if isinstance(gin_file, str) else list(gin_file)
  main = sys.modules["__main__"]
  sys.modules["__main__"] = t5x_train
  cwd = os.getcwd()
  prefixes = list(gin.config._LOCATION_PREFIXES)  # pylint: disable=protected-access
  try:
    os.chdir(REPO)
    with gin.config.interactive_mode():  # slic_jax's train() may be registered too
      gin_utils.parse_gin_flags(["."] + [T5X_SEARCH_PATH], gin_files, list(bindings),
                                finalize_config=False)
  finally:
    gin.config._LOCATION_PREFIXES[:] = prefixes  # pylint: disable=protected-access
    os.chdir(cwd)
    sys.modules["__main__"] = main


def build(name):
  return gin.query_parameter(name).scoped_configurable_fn()


def test_slic_hf_gin_parses_for_t5x():
  parse_for_t5x("gin/slic_hf.gin")
  model = build("%MODEL")
  assert type(model) is models.SlicHFModel
  assert (model.delta, model.reg_weight) == (1.0, 0.5)
  assert isinstance(model.optimizer_def, t5x_optimizers.OptaxWrapper)
  data = build("train_script.train.train_dataset_cfg")
  assert isinstance(data, t5x_utils.DatasetConfig)  # T5X's own run config was included
  assert (data.mixture_or_task_name, data.batch_size, data.seed, data.pack) == (
      "tldr_comparisons", 32, 0, False)
  assert dict(data.task_feature_lengths) == {"inputs": 128, "targets": 32}
  ckpt = build("train_script.train.checkpoint_cfg")
  assert isinstance(ckpt.restore, t5x_utils.RestoreCheckpointConfig)
  assert ckpt.restore.assignment_map == ((r"state/param_states.*", None),)
  assert ckpt.restore.fallback_to_scratch and (ckpt.save.period, ckpt.save.keep) == (500, 2)
  assert float(build("trainer.Trainer.learning_rate_fn")(0)) == pytest.approx(1e-4)
  assert build("train_script.train.total_steps") == 3000


def test_gpu_bf16_gin_parses_for_t5x():
  parse_for_t5x(["gin/slic_hf.gin", "gin/gpu_bf16.gin"])
  cfg = build("%MODEL").module.config
  assert (cfg.dtype.name, cfg.attention_implementation) == ("bfloat16", "cudnn")


def test_cpu_bf16_gin_parses_for_t5x():
  parse_for_t5x(["gin/slic_hf.gin", "gin/cpu_bf16.gin"])
  cfg = build("%MODEL").module.config
  assert (cfg.dtype.name, cfg.attention_implementation) == ("bfloat16", "fused_softmax")


def test_sft_gin_parses_for_t5x_then_for_slic_jax():
  parse_for_t5x("gin/sft.gin")
  assert type(build("%MODEL")) is models.EncoderDecoderModel
  assert isinstance(build("train_script.train.train_dataset_cfg"), t5x_utils.DatasetConfig)
  gin.clear_config()
  # Same process, now for slic_jax.train: the stand-in run config, not T5X's.
  gin.config._LOCATION_PREFIXES.append(T5X_SEARCH_PATH)  # pylint: disable=protected-access
  try:
    train.parse_experiment(["gin/sft.gin"])
  finally:
    gin.config._LOCATION_PREFIXES.remove(T5X_SEARCH_PATH)  # pylint: disable=protected-access
  from slic_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  assert isinstance(build("train_script.train.train_dataset_cfg"), input_pipeline.DatasetConfig)


# ---------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def world(tmp_path_factory):
  data = str(tmp_path_factory.mktemp("world") / "data")
  synthetic.generate_world(data, seed=5, num_sft=(160, 40, 40), num_comparisons=(160, 40, 40))
  return data


def run_t5x(gin_file, model_dir, world, extra):
  """`python -m t5x.train` in a subprocess (cwd = repo root); returns its log. `gin_file`:
  one file or a list (repeated --gin_file flags)."""
  env = dict(os.environ, SLIC_JAX_TLDR_DIR=world, TF_CPP_MIN_LOG_LEVEL="2",
             TF_ENABLE_ONEDNN_OPTS="0", XLA_FLAGS="", CUDA_VISIBLE_DEVICES="")
  flags = [f"--gin.{k}={v}" for k, v in {**TINY, "MODEL_DIR": repr(model_dir), **extra}.items()]
  gin_files = [gin_file] if isinstance(gin_file, str) else gin_file
  proc = subprocess.run([sys.executable, "-m", "t5x.train",
                         *[f"--gin_file={g}" for g in gin_files], *flags, "--alsologtostderr"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-5000:]
  return log


def t5x_train_losses(log):
  """{step: loss} from T5X's `[step] collection=train ... loss=...` log lines."""
  out = {}
  for m in re.finditer(r"\[(\d+)\] collection=train .*?\bloss=([-+0-9.eE]+)", log):
    out[int(m.group(1))] = float(m.group(2))
  return out


def run_slic_jax(gin_file, model_dir, world, extra):
  """slic_jax.train in this process (t5x is loaded: the bridge is active and undone)."""
  old = os.environ.get("SLIC_JAX_TLDR_DIR")
  os.environ["SLIC_JAX_TLDR_DIR"] = world
  train.parse_experiment([gin_file], _bindings({"MODEL_DIR": repr(model_dir), **extra}))
  try:
    return gin.get_configurable(train.train)()
  finally:
    gin.clear_config()
    if old is None:
      os.environ.pop("SLIC_JAX_TLDR_DIR")
    else:
      os.environ["SLIC_JAX_TLDR_DIR"] = old


def jsonl_losses(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_t5x_trains_slic_hf_like_slic_jax_and_checkpoints_cross_restore(world, tmp_path):
  sft = str(tmp_path / "sft")
  run_slic_jax("gin/sft.gin", sft, world, {"TRAIN_STEPS": "4", "LEARNING_RATE": "3e-3"})
  init = repr(os.path.join(sft, "checkpoint_4"))
  common = {"INITIAL_CHECKPOINT_PATH": init, "TRAIN_STEPS": "8", "EVAL_PERIOD": "4",
            "CHECKPOINT_PERIOD": "4"}

  # SLiC-HF from the same SFT checkpoint, seed and data: T5X's trainer vs slic_jax's.
  t5x_dir, ours_dir = str(tmp_path / "slic_t5x"), str(tmp_path / "slic_ours")
  log = run_t5x("gin/slic_hf.gin", t5x_dir, world, common)
  assert "Starting main loop over steps 4-8" in log  # params + step from the SFT checkpoint
  t5x_losses = t5x_train_losses(log)
  assert set(t5x_losses) == {8} and np.isfinite(t5x_losses[8])  # mean over steps 5..8
  assert "timing/seqs_per_second=" in log  # T5X's throughput metric, from the model
  step, _ = run_slic_jax("gin/slic_hf.gin", ours_dir, world, common)
  ours = jsonl_losses(ours_dir)
  assert step == 8 and sorted(ours) == [5, 6, 7, 8]
  np.testing.assert_allclose(np.mean([ours[s] for s in (5, 6, 7, 8)]), t5x_losses[8],
                             rtol=2e-3)

  # Resume across trainers: slic_jax continues T5X's run, T5X continues slic_jax's.
  more = {**common, "TRAIN_STEPS": "10", "EVAL_PERIOD": "2", "CHECKPOINT_PERIOD": "2"}
  step, _ = run_slic_jax("gin/slic_hf.gin", t5x_dir, world, more)
  assert step == 10 and sorted(jsonl_losses(t5x_dir)) == [9, 10]
  log = run_t5x("gin/slic_hf.gin", ours_dir, world, more)
  assert "Starting main loop over steps 8-10" in log
  assert np.isfinite(t5x_train_losses(log)[10])

  # Params written by T5X are the ones slic_jax restores (and vice versa, above).
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(ours_dir, "checkpoint_10", "state"))
  assert set(tree) >= {"target", "state"} and int(tree["state"]["step"]) == 10
  assert isinstance(models.SlicHFModel, type) and t5x_bridge.t5x_loaded()
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree["target"]))


def test_t5x_trains_with_the_cpu_kernels(world, tmp_path):
  """gin/cpu_bf16.gin and the kernel optimizer (create_optimizer(implementation=
  'cpu_kernels'), inside T5X's OptaxWrapper) under `python -m t5x.train`: the kernels
  build, load and train."""
  log = run_t5x(["gin/slic_hf.gin", "gin/cpu_bf16.gin"], str(tmp_path / "kernels"), world,
                {"TRAIN_STEPS": "2", "EVAL_PERIOD": "2", "CHECKPOINT_PERIOD": "2",
                 "optimizers.create_optimizer.implementation": "'cpu_kernels'"})
  with open(tmp_path / "kernels" / "config.gin") as f:  # T5X's operative config
    assert "implementation = 'cpu_kernels'" in f.read()
  assert np.isfinite(t5x_train_losses(log)[2])
