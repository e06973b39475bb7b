"""The gin-configured trainer end to end (slic_jax.train) on a small synthetic world.

One SFT run (checkpoints, TensorBoard, metrics.jsonl, eval), a resume from the
latest checkpoint, and a SLiC-HF run initialised from the SFT checkpoint, all
through the repo's real gin files with a tiny network bound on top.
"""
import glob
import json
import os

import gin
import jax
import numpy as np
import pytest

from slic_jax import checkpointing
from slic_jax import train
from slic_jax.data import synthetic

TINY = [
    "network.T5Config.emb_dim = 32", "network.T5Config.num_heads = 2",
    "network.T5Config.head_dim = 16", "network.T5Config.mlp_dim = 64",
    "network.T5Config.num_encoder_layers = 1", "network.T5Config.num_decoder_layers = 1",
    "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 24}", "BATCH_SIZE = 8",
    "EVAL_STEPS = 2",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  data = str(tmp_path_factory.mktemp("world") / "data")
  synthetic.generate_world(data, seed=3, num_sft=(200, 40, 40), num_comparisons=(200, 40, 40))
  old = os.environ.get("SLIC_JAX_TLDR_DIR")
  os.environ["SLIC_JAX_TLDR_DIR"] = data
  yield data
  if old is None:
    os.environ.pop("SLIC_JAX_TLDR_DIR")
  else:
    os.environ["SLIC_JAX_TLDR_DIR"] = old


def run(gin_file, bindings):
  """Parses the experiment as `python -m slic_jax.train` would and calls train()."""
  gin.clear_config()
  train.parse_experiment([gin_file], TINY + bindings)
  try:
    return gin.get_configurable(train.train)()
  finally:
    gin.clear_config()


def read_jsonl(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_sft_then_resume_then_slic_hf_from_sft(world, tmp_path):
  sft_dir = str(tmp_path / "sft")
  common = ["CHECKPOINT_PERIOD = 4", "CHECKPOINTS_KEPT = 2", "EVAL_PERIOD = 4",
            "LEARNING_RATE = 3e-3"]
  step, state = run("gin/sft.gin", common + [f"MODEL_DIR = '{sft_dir}'", "TRAIN_STEPS = 12"])
  assert step == 12 and int(state.step) == 12

  rows = read_jsonl(sft_dir)
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == list(range(1, 13))
  assert train_rows[-1]["loss"] < 0.8 * train_rows[0]["loss"]  # it learns
  assert {"timing/seqs_per_second", "grad_norm", "accuracy"} <= set(train_rows[0])
  assert [r["step"] for r in rows if r["split"] == "train_eval"] == [4, 8, 12]
  assert glob.glob(os.path.join(sft_dir, "train", "events.out.tfevents.*"))
  assert glob.glob(os.path.join(sft_dir, "train_eval", "events.out.tfevents.*"))
  ckpts = sorted(d for d in os.listdir(sft_dir) if d.startswith("checkpoint_"))
  assert ckpts == ["checkpoint_12", "checkpoint_8"]  # T5X's layout; keep 2
  assert os.path.isdir(os.path.join(sft_dir, "checkpoint_12", "state"))
  assert "MODEL_DIR" in open(os.path.join(sft_dir, "config.gin")).read()

  # Resume: the same MODEL_DIR continues from step 12, not from scratch.
  saved = jax.tree.map(np.asarray, state.params)
  step, state = run("gin/sft.gin", common + [f"MODEL_DIR = '{sft_dir}'", "TRAIN_STEPS = 14"])
  assert step == 14
  steps = [r["step"] for r in read_jsonl(sft_dir) if r["split"] == "train"]
  assert steps == list(range(1, 15))

  # SLiC-HF from the SFT run: at step 0 its params are exactly the SFT params of step 14.
  slic_dir = str(tmp_path / "slic")
  sft_final = jax.tree.map(np.asarray, state.params)
  step, init_state = run("gin/slic_hf.gin", [f"MODEL_DIR = '{slic_dir}'", "TRAIN_STEPS = 14",
                                             f"INITIAL_CHECKPOINT_PATH = '{sft_dir}'"])
  assert step == 14  # TRAIN_STEPS is absolute: the step continues from the SFT checkpoint
  for a, b in zip(jax.tree.leaves(sft_final), jax.tree.leaves(init_state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(sft_final)))

  step, _ = run("gin/slic_hf.gin", [f"MODEL_DIR = '{slic_dir}'", "TRAIN_STEPS = 18",
                                    "EVAL_PERIOD = 4", f"INITIAL_CHECKPOINT_PATH = '{sft_dir}'"])
  assert step == 18
  rows = read_jsonl(slic_dir)
  assert [r["step"] for r in rows if r["split"] == "train"] == [15, 16, 17, 18]
  evals = [r for r in rows if r["split"] == "train_eval"]
  assert evals and {"pair_accuracy", "margin", "chosen_logps", "rejected_logps",
                    "hinge_active_fraction"} <= set(evals[-1])
  assert 0.0 <= evals[-1]["pair_accuracy"] <= 1.0


def test_checkpointer_round_trip_and_missing_initial_checkpoint(tmp_path):
  params = {"a": jax.numpy.arange(6.0).reshape(2, 3)}
  opt = {"m": jax.numpy.ones(3)}
  ck = checkpointing.Checkpointer(str(tmp_path), checkpointing.SaveCheckpointConfig(period=2, keep=1))
  assert not ck.maybe_save(1, params, opt)
  assert ck.maybe_save(2, params, opt)
  ck.manager.wait_until_finished()
  assert ck.latest_step() == 2
  p2, o2 = ck.restore(2, jax.tree.map(jax.numpy.zeros_like, params), jax.tree.map(jax.numpy.zeros_like, opt))
  np.testing.assert_array_equal(np.asarray(p2["a"]), np.asarray(params["a"]))
  ck.close()
  zeros = jax.tree.map(jax.numpy.zeros_like, params)
  restored, step = checkpointing.restore_params(str(tmp_path), zeros)  # a model_dir: latest
  assert step == 2 and float(restored["a"][1, 2]) == 5.0
  restored, step = checkpointing.restore_params(str(tmp_path / "checkpoint_2"), zeros)
  assert step == 2 and float(restored["a"][1, 2]) == 5.0
  with pytest.raises(FileNotFoundError, match="INITIAL_CHECKPOINT_PATH not found: .*nowhere"):
    checkpointing.restore_params(str(tmp_path / "nowhere"), params)


def test_gin_shorthand_flags_are_rewritten():
  assert train._rewrite_gin_args(["prog", "--gin.TRAIN_STEPS=5", "--gin_file=x.gin"]) == [
      "prog", "--gin_bindings=TRAIN_STEPS = 5", "--gin_file=x.gin"]


def test_checkpoint_is_t5x_layout_with_optax_state(tmp_path):
  """checkpoint_<step>/state = {'target', 'state': {'step', 'param_states'}} (T5X's tree);
  the optax state (with EmptyStates, stored as T5X's OptaxWrapper does) round-trips."""
  import orbax.checkpoint as ocp

  from slic_jax import optimizers

  tx = optimizers.create_optimizer(name="adafactor", learning_rate=1e-3)
  params = {"dense": {"kernel": jax.numpy.ones((4, 3))}, "scale": jax.numpy.ones(3)}
  opt = tx.init(params)
  _, opt = tx.update(jax.tree.map(lambda x: 0.1 * x, params), opt, params)
  ck = checkpointing.Checkpointer(str(tmp_path), checkpointing.SaveCheckpointConfig())
  assert ck.maybe_save(7, params, opt, force=True)
  ck.close()
  # Read back with orbax itself (not slic_jax's restore), as numpy arrays: the on-disk tree.
  on_disk = ocp.PyTreeCheckpointer()
  state_dir = str(tmp_path / "checkpoint_7" / "state")
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          on_disk.metadata(state_dir).item_metadata.tree)
  tree = on_disk.restore(state_dir, restore_args=as_numpy)
  assert set(tree) == {"target", "state"} and set(tree["state"]) == {"step", "param_states"}
  assert int(tree["state"]["step"]) == 7
  expected = checkpointing.opt_state_to_t5x(opt)  # e.g. {'1': {'0': {'count', 'v_row', ...}}}
  assert jax.tree.structure(tree["state"]["param_states"]) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(tree["state"]["param_states"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ck = checkpointing.Checkpointer(str(tmp_path), checkpointing.SaveCheckpointConfig())
  zeros = jax.tree.map(jax.numpy.zeros_like, (params, opt))
  p2, o2 = ck.restore(7, *zeros)
  ck.close()
  for a, b in zip(jax.tree.leaves((params, opt)), jax.tree.leaves((p2, o2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(o2) == jax.tree.structure(opt)


def test_length_buckets_train_the_same_model_on_trimmed_batches(world, tmp_path, monkeypatch):
  """LENGTH_BUCKETS = 4 vs 1 (T5X's fixed lengths): the same
  data, the same updates; only all-padding positions are left out of the batches."""
  shapes = []
  trim = train.input_pipeline.trim_padding

  def recording_trim(batch, num_buckets, needed=None):
    assert needed is None  # one process: nothing to agree on
    out = trim(batch, num_buckets)
    shapes.append((out["encoder_input_tokens"].shape[-1], out["decoder_target_tokens"].shape[-1]))
    return out

  monkeypatch.setattr(train.input_pipeline, "trim_padding", recording_trim)
  lengths = ["TASK_FEATURE_LENGTHS = {'inputs': 256, 'targets': 32}", "TRAIN_STEPS = 3",
             "EVAL_PERIOD = 3", "LEARNING_RATE = 3e-3"]
  states = {}
  for buckets in (4, 1):
    shapes.clear()
    _, states[buckets] = run("gin/slic_hf.gin", lengths + [
        f"MODEL_DIR = '{tmp_path / str(buckets)}'", f"LENGTH_BUCKETS = {buckets}"])
    if buckets == 4:  # synthetic prompts fill well under 256 tokens, summaries under 32
      assert min(li for li, _ in shapes) < 256 and min(lt for _, lt in shapes) < 32, shapes
    else:
      assert set(shapes) == {(256, 32)}
  for a, b in zip(jax.tree.leaves(states[1].params), jax.tree.leaves(states[4].params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
  evals = {b: [r for r in read_jsonl(str(tmp_path / str(b))) if r["split"] == "train_eval"][-1]
           for b in (4, 1)}
  np.testing.assert_allclose(evals[4]["loss"], evals[1]["loss"], rtol=1e-4)


def test_microbatches_that_do_not_split_each_devices_rows_are_refused(world, tmp_path):
  """BATCH_SIZE 8 over the 8 fake devices' data axis is one row per device: 2 microbatches
  would span devices (the partitioner would move the batch every step). Refused before
  any data is read or anything compiled, naming both settings."""
  with pytest.raises(ValueError, match=r"BATCH_SIZE and train.num_microbatches: a batch of 8 "
                     r"rows over a data axis of 8 device\(s\) gives 1 rows per device, which "
                     r"do not split into num_microbatches=2 .* a multiple of 16"):
    run("gin/sft.gin", [f"MODEL_DIR = '{tmp_path}'", "TRAIN_STEPS = 1",
                        "train.num_microbatches = 2"])
  assert not os.path.exists(os.path.join(tmp_path, "checkpoint_1"))


def test_per_device_accumulation_trains_through_gin(world, tmp_path):
  """train.per_device_accumulation from gin: 16 examples over the 8 fake devices' data
  axis, 2 microbatches of one example per device each, gradients all-reduced once."""
  step, state = run("gin/sft.gin", [f"MODEL_DIR = '{tmp_path}'", "TRAIN_STEPS = 2",
                                    "BATCH_SIZE = 16", "train.num_microbatches = 2",
                                    "train.per_device_accumulation = True"])
  assert step == 2 and int(state.step) == 2
  rows = [r for r in read_jsonl(str(tmp_path)) if r["split"] == "train"]
  assert rows[-1]["step"] == 2 and sum(r["num_examples"] for r in rows) == 32  # 2 × 16
  assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
