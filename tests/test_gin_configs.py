"""The experiment gin files as `python -m slic_jax.train` parses them (runs everywhere).

gin/sft.gin and gin/slic_hf.gin include T5X's run config by name
('t5x/configs/runs/finetune.gin'); slic_jax.train resolves it to its stand-in in
gin/slic_jax_runs/ even when another entry (e.g. T5X's site-packages) is on gin's
search path. tests/test_t5x_path.py parses the same files for `python -m t5x.train`.
"""

import gin
import pytest

from slic_jax import checkpointing
from slic_jax import input_pipeline
from slic_jax import models
from slic_jax import partitioning
from slic_jax import t5x_bridge
from slic_jax import train



def parse_for_slic_jax(gin_file, bindings=()):
  gin.clear_config()
  train.parse_experiment([gin_file], bindings)


def build(name):
  return gin.query_parameter(name).scoped_configurable_fn()


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


@pytest.mark.parametrize("gin_file, model_cls, task", [
    ("gin/sft.gin", models.EncoderDecoderModel, "tldr_sft"),
    ("gin/slic_hf.gin", models.SlicHFModel, "tldr_comparisons"),
])
def test_experiment_builds_model_data_and_run_config(gin_file, model_cls, task):
  parse_for_slic_jax(gin_file)
  model = build("%MODEL")
  assert type(model) is model_cls
  if model_cls is models.SlicHFModel:
    assert (model.delta, model.reg_weight, model.length_normalize) == (1.0, 0.5, False)
    assert gin.query_parameter("%TRAIN_STEPS") == 3000
    assert gin.query_parameter("%LEARNING_RATE") == 1e-4
  # optax transformation (no t5x in the process) or T5X's wrapper of it (t5x loaded).
  assert hasattr(t5x_bridge.as_optax(model.optimizer_def), "update")

  data = build("train_script.train.train_dataset_cfg")
  assert isinstance(data, input_pipeline.DatasetConfig)  # the stand-in's, not t5x.utils'
  assert data.mixture_or_task_name == task
  assert dict(data.task_feature_lengths) == {"inputs": 128, "targets": 32}
  assert (data.batch_size, data.seed, data.pack, data.shuffle, data.use_cached) == (
      32, 0, False, True, False)
  assert build("train_script.train.train_eval_dataset_cfg").split == "validation"
  ckpt = build("train_script.train.checkpoint_cfg")
  assert isinstance(ckpt, checkpointing.CheckpointConfig)
  assert (ckpt.save.period, ckpt.save.keep, ckpt.restore.path) == (500, 2, None)
  if model_cls is models.SlicHFModel:  # T5X's params-only restore, accepted here
    assert ckpt.restore.assignment_map == ((r"state/param_states.*", None),)
    assert ckpt.restore.fallback_to_scratch
  assert isinstance(build("train_script.train.partitioner"), partitioning.Partitioner)
  assert build("train_script.train.eval_period") == 500
  assert gin.query_parameter("%EVAL_PERIOD") == 500
  assert gin.query_parameter("%DROPOUT_RATE") == 0.0  # experiment overrides finetune.gin's 0.1


@pytest.mark.parametrize("add_on,attention", [("gin/gpu_bf16.gin", "cudnn"),
                                               ("gin/cpu_bf16.gin", "fused_softmax")])
def test_bf16_add_on_files_switch_dtype_and_attention_for_either_experiment(add_on, attention):
  for experiment in ("gin/slic_hf.gin", "gin/sft.gin"):
    gin.clear_config()
    train.parse_experiment([experiment, add_on], [])
    cfg = build("%MODEL").module.config
    assert (cfg.dtype.name, cfg.attention_implementation, cfg.logits_dtype.name) == (
        "bfloat16", attention, "float32"), experiment
    assert cfg.dropout_rate == 0.0  # neither attention has dropout on the weights


@pytest.mark.parametrize("experiment", ["gin/slic_hf.gin", "gin/sft.gin"])
def test_the_kernel_optimizer_is_one_gin_binding(experiment):
  """--gin.optimizers.create_optimizer.implementation="'cpu_kernels'" gives the model the
  optimizer whose update and grad_norm take the CPU kernels' reductions; by default both
  take the column sums of g² of the fused update."""
  from slic_jax import optimizers
  parse_for_slic_jax(experiment, ["optimizers.create_optimizer.implementation = 'cpu_kernels'"])
  tx = t5x_bridge.as_optax(build("%MODEL").optimizer_def)
  assert isinstance(tx, optimizers.KernelNormTransformation)
  parse_for_slic_jax(experiment)
  assert isinstance(t5x_bridge.as_optax(build("%MODEL").optimizer_def),
                    optimizers.SumsNormTransformation)


def test_demo_style_overrides():
  """tools/run_demo.py's command-line bindings (as --gin.NAME=VALUE)."""
  parse_for_slic_jax("gin/slic_hf.gin", [
      "MODEL_DIR = '/tmp/x'", "TRAIN_STEPS = 20", "INITIAL_CHECKPOINT_PATH = '/tmp/sft'",
      "RANDOM_SEED = 3"])
  assert build("train_script.train.train_dataset_cfg").seed == 3
  assert build("train_script.train.checkpoint_cfg").restore.path == "/tmp/sft"
  assert build("train_script.train.random_seed") == 3


def test_stand_in_wins_over_other_search_paths(tmp_path):
  """A T5X-like entry on gin's search path (as after parsing a T5X config in the same
  process) does not shadow gin/slic_jax_runs, and parse_gin leaves the path as it was."""
  fake = tmp_path / "t5x" / "configs" / "runs"
  fake.mkdir(parents=True)
  (fake / "finetune.gin").write_text("this is not gin\n")
  prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
  saved = list(prefixes)
  prefixes.insert(1, str(tmp_path))
  try:
    before = list(prefixes)
    parse_for_slic_jax("gin/sft.gin")
    assert list(prefixes) == before
    assert type(build("%MODEL")) is models.EncoderDecoderModel
  finally:
    prefixes[:] = saved


def test_bridge_utils_resolve_to_slic_jax_outside_t5x():
  assert not t5x_bridge.running_under_t5x()
  assert t5x_bridge.DatasetConfig is input_pipeline.DatasetConfig
  assert t5x_bridge.RestoreCheckpointConfig is checkpointing.RestoreCheckpointConfig
  assert t5x_bridge.create_learning_rate_scheduler(base_learning_rate=1.0) is None
  with pytest.raises(AttributeError):
    t5x_bridge.NoSuchThing  # pylint: disable=pointless-statement


def test_model_metrics_without_t5x_have_no_t5x_timing():
  if t5x_bridge.t5x_loaded():
    pytest.skip("t5x is loaded in this process (its timing metrics are added then)")
  assert t5x_bridge.timing_metrics(4, 40) == {}
  tx = object()
  assert t5x_bridge.as_t5x_optimizer(tx) is tx and t5x_bridge.as_optax(tx) is tx
