"""Packed SFT batches (seqio.EncDecFeatureConverter(pack=True), T5X's finetune default).

Several examples share a row: segment ids keep attention (encoder, decoder, cross) within
an example, decoder inputs restart at each example's BOS and T5's relative positions do
not depend on where in the row an example starts, so the packed batch's loss and
gradients equal the padded batch's (same target tokens, same normaliser).
"""
import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf

from slic_jax import models
from slic_jax import network
from slic_jax import optimizers

CFG = network.make_config("tiny", emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                          num_encoder_layers=1, num_decoder_layers=1, vocab_size=64)
LENGTHS = {"inputs": 32, "targets": 16}


def converted(examples, pack):
  ds = tf.data.Dataset.from_generator(
      lambda: iter(examples),
      output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                        "targets": tf.TensorSpec([None], tf.int32)})
  ds = seqio.EncDecFeatureConverter(pack=pack)(ds, LENGTHS)
  rows = list(ds.as_numpy_iterator())
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_packed_batch_gives_the_padded_batchs_loss_and_gradients():
  rng = np.random.default_rng(0)
  examples = [{"inputs": rng.integers(2, 64, li).astype(np.int32),
               "targets": rng.integers(2, 64, lt).astype(np.int32)}
              for li, lt in [(9, 5), (12, 4), (6, 6), (10, 3), (7, 5), (5, 2)]]
  padded = converted(examples, pack=False)
  packed = converted(examples, pack=True)
  assert padded["encoder_input_tokens"].shape == (6, 32)
  assert packed["encoder_input_tokens"].shape[0] < 6  # several examples per row
  assert packed["decoder_segment_ids"].max() >= 2
  model = models.EncoderDecoderModel(
      network.Transformer(CFG), seqio.PassThroughVocabulary(64, eos_id=1),
      seqio.PassThroughVocabulary(64, eos_id=1), optimizers.create_optimizer())
  params = model.get_initial_variables(
      jax.random.PRNGKey(0), {k: v.shape for k, v in padded.items()})["params"]
  grad_fn = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))
  (loss_pad, m_pad), g_pad = grad_fn(params, jax.tree.map(jnp.asarray, padded), None)
  (loss_pack, m_pack), g_pack = grad_fn(params, jax.tree.map(jnp.asarray, packed), None)
  assert float(loss_pad) > 1.0
  np.testing.assert_allclose(float(loss_pack), float(loss_pad), rtol=1e-5)
  for name in ("num_tokens", "num_examples", "accuracy", "cross_ent_loss_per_token"):
    np.testing.assert_allclose(float(m_pack[name].compute()), float(m_pad[name].compute()),
                               rtol=1e-5, err_msg=name)
  assert float(m_pack["num_examples"].compute()) == 6  # examples, not rows
  for a, b in zip(jax.tree.leaves(g_pad), jax.tree.leaves(g_pack)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_packed_features_are_trimmed_with_their_group():
  """`trim_padding` cuts segment ids and positions with the tokens of their group."""
  from slic_jax import input_pipeline
  rng = np.random.default_rng(1)
  examples = [{"inputs": rng.integers(2, 64, 5).astype(np.int32),
               "targets": rng.integers(2, 64, 3).astype(np.int32)} for _ in range(2)]
  packed = converted(examples, pack=True)  # one row: 10 input, 6 target positions used
  assert packed["encoder_input_tokens"].shape == (1, 32)
  out = input_pipeline.trim_padding(packed, 4)  # buckets 8/16/24/32 and 8/16
  for k in ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions"):
    assert out[k].shape == (1, 16), k
    np.testing.assert_array_equal(out[k], packed[k][:, :16])
  for k in ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions"):
    assert out[k].shape == (1, 8), k
  np.testing.assert_array_equal(out["encoder_segment_ids"][0, :10], [1] * 5 + [2] * 5)


def test_trainer_packs_sft_and_evaluates_padded(tmp_path, monkeypatch):
  """slic_jax.train with packed training batches and padded eval batches (sft.gin's
  train_eval keeps pack = False): eval has its own features (no segment ids)."""
  import json
  import os
  import gin
  from slic_jax import train
  from slic_jax.data import synthetic
  world = str(tmp_path / "world")
  synthetic.generate_world(world, seed=3, num_sft=(100, 16, 8), num_comparisons=(8, 8, 8))
  monkeypatch.setenv("SLIC_JAX_TLDR_DIR", world)
  model_dir = str(tmp_path / "model")
  gin.clear_config()
  train.parse_experiment(["gin/sft.gin"], [
      "network.T5Config.emb_dim = 32", "network.T5Config.num_heads = 2",
      "network.T5Config.head_dim = 16", "network.T5Config.mlp_dim = 64",
      "network.T5Config.num_encoder_layers = 1", "network.T5Config.num_decoder_layers = 1",
      "TASK_FEATURE_LENGTHS = {'inputs': 256, 'targets': 32}", "BATCH_SIZE = 8",
      "TRAIN_STEPS = 2", "EVAL_PERIOD = 2", "EVAL_STEPS = 1", f"MODEL_DIR = '{model_dir}'",
      "train/input_pipeline.DatasetConfig.pack = True"])
  try:
    gin.get_configurable(train.train)()
  finally:
    gin.clear_config()
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train_rows = [r for r in records if r["split"] == "train"]
  # Packed: more examples than the 8 rows of each step (synthetic posts are short).
  assert sum(r["num_examples"] for r in train_rows) > 2 * 8, train_rows
  (ev,) = [r for r in records if r["split"] == "train_eval"]
  assert ev["num_examples"] == 8  # padded eval: one example per row, 1 batch of 8
