"""Input pipeline (slic_jax.input_pipeline): padding trimmed to length buckets, exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from slic_jax import input_pipeline
from slic_jax import models
from slic_jax import network
from slic_jax import optimizers


def test_bucket_lengths():
  assert input_pipeline.bucket_lengths(512, 4) == [128, 256, 384, 512]
  assert input_pipeline.bucket_lengths(64, 4) == [16, 32, 48, 64]
  assert input_pipeline.bucket_lengths(24, 4) == [8, 16, 24]  # multiples of 8, deduplicated
  assert input_pipeline.bucket_lengths(20, 2) == [16, 20]  # capped at the full length
  assert input_pipeline.bucket_lengths(100, 1) == [100]
  with pytest.raises(ValueError, match="length_buckets must be >= 1"):
    input_pipeline.bucket_lengths(64, 0)


def _batch(enc_extent, dec_extent, li=64, lt=32, n=3):
  """A pair batch whose longest input / target row has these many non-pad tokens."""
  b = len(enc_extent)
  enc = np.zeros((b, li), np.int32)
  tgt = np.zeros((b, n, lt), np.int32)
  for i, (e, d) in enumerate(zip(enc_extent, dec_extent)):
    enc[i, :e] = 5
    tgt[i, 0, :d] = 7
  dec_in = np.concatenate([np.zeros((b, n, 1), np.int32), tgt[..., :-1]], axis=-1)
  return {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
          "decoder_input_tokens": dec_in, "decoder_loss_weights": (tgt > 0).astype(np.int32),
          "scores": np.arange(b * n, dtype=np.float32).reshape(b, n)}


def test_trim_padding_cuts_each_group_to_the_smallest_bucket_that_holds_it():
  batch = _batch(enc_extent=[10, 17], dec_extent=[3, 9])
  out = input_pipeline.trim_padding(batch, 4)  # buckets: inputs 16/32/48/64, targets 8/16/24/32
  assert out["encoder_input_tokens"].shape == (2, 32)  # 17 tokens -> 32
  for k in ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights"):
    assert out[k].shape == (2, 3, 16), k  # 9 tokens -> 16
  np.testing.assert_array_equal(out["scores"], batch["scores"])  # not a sequence feature
  for k, v in out.items():  # nothing but zeros was dropped
    assert v.sum() == batch[k].sum(), k
    np.testing.assert_array_equal(v, batch[k][..., :v.shape[-1]])

  # A position where any feature of the group is nonzero is kept, even if the tokens are 0.
  batch["decoder_input_tokens"][0, 2, 20] = 3
  assert input_pipeline.trim_padding(batch, 4)["decoder_target_tokens"].shape[-1] == 24
  # Exactly full buckets stay; one bucket (T5X's behaviour) changes nothing.
  full = _batch(enc_extent=[64, 1], dec_extent=[32, 1])
  assert input_pipeline.trim_padding(full, 4)["encoder_input_tokens"].shape == (2, 64)
  assert input_pipeline.trim_padding(batch, 1)["encoder_input_tokens"].shape == (2, 64)


def test_trim_padding_rejects_a_group_that_disagrees_on_its_length():
  batch = _batch(enc_extent=[3], dec_extent=[3])
  batch["decoder_loss_weights"] = batch["decoder_loss_weights"][..., :16]
  with pytest.raises(ValueError, match="disagree on their sequence length"):
    input_pipeline.trim_padding(batch, 4)


def test_trimmed_batch_gives_the_same_loss_and_gradients():
  cfg = network.make_config("tiny", vocab_size=64, emb_dim=32, num_heads=2, head_dim=16,
                            mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2)
  vocab = seqio.PassThroughVocabulary(size=64, eos_id=1)
  model = models.SlicHFModel(network.Transformer(cfg), vocab, vocab,
                             optimizers.create_optimizer())
  rng = np.random.default_rng(0)
  batch = _batch(enc_extent=[20, 13, 9], dec_extent=[11, 6, 4], li=64, lt=32)
  for k in ("encoder_input_tokens", "decoder_target_tokens"):
    batch[k] = np.where(batch[k] > 0, rng.integers(2, 64, batch[k].shape), 0).astype(np.int32)
  tgt = batch["decoder_target_tokens"]
  tgt[:, 1:, :5] = rng.integers(2, 64, tgt[:, 1:, :5].shape)  # rejected / reference rows
  batch["decoder_input_tokens"] = np.concatenate(
      [np.zeros(tgt.shape[:2] + (1,), np.int32), tgt[..., :-1]], axis=-1)
  batch["decoder_loss_weights"] = (tgt > 0).astype(np.int32)
  del batch["scores"]
  trimmed = input_pipeline.trim_padding(batch, 4)
  assert trimmed["encoder_input_tokens"].shape[-1] == 32
  assert trimmed["decoder_target_tokens"].shape[-1] == 16

  params = model.get_initial_variables(
      jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()})["params"]
  grad_fn = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))
  (loss_full, m_full), g_full = grad_fn(params, jax.tree.map(jnp.asarray, batch), None)
  (loss_cut, m_cut), g_cut = grad_fn(params, jax.tree.map(jnp.asarray, trimmed), None)
  assert abs(float(loss_full)) > 1.0  # a real loss, not an empty batch
  np.testing.assert_allclose(float(loss_cut), float(loss_full), rtol=1e-5)
  for name in ("chosen_logps", "rejected_logps", "margin"):
    np.testing.assert_allclose(float(m_cut[name].compute()), float(m_full[name].compute()),
                               rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_cut)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_needed_lengths_replace_this_batchs_own():
  """``needed`` (several hosts: the longest slice's extents, `HostBatchAgreement`;
  `tests/test_multiprocess.py` runs the real agreement) sets the cut."""
  batch = _batch(enc_extent=[20, 13, 9], dec_extent=[11, 6, 4], li=64, lt=32)
  assert {k: e for k, (_, e) in input_pipeline.sequence_extents(batch).items()} == {
      "encoder_": 20, "decoder_": 12}  # decoder inputs: the targets shifted by one
  out = input_pipeline.trim_padding(batch, 4, {"encoder_": 40, "decoder_": 12})
  assert out["encoder_input_tokens"].shape[-1] == 48  # another host needs 40 → bucket 48
  assert out["decoder_target_tokens"].shape[-1] == 16  # this host's own 12 → bucket 16
  np.testing.assert_array_equal(out["encoder_input_tokens"],
                                batch["encoder_input_tokens"][..., :48])
  with pytest.raises(ValueError, match="cannot cut the encoder_. features to 16 positions"):
    input_pipeline.trim_padding(batch, 4, {"encoder_": 16, "decoder_": 12})


def test_empty_batch_has_the_datasets_shapes_and_no_weight():
  import tensorflow as tf
  spec = {"encoder_input_tokens": tf.TensorSpec([None, 64], tf.int32),
          "decoder_loss_weights": tf.TensorSpec([None, 3, 32], tf.float32)}
  out = input_pipeline.empty_batch(spec, 4)
  assert out["encoder_input_tokens"].shape == (4, 64)
  assert out["decoder_loss_weights"].shape == (4, 3, 32)
  assert out["decoder_loss_weights"].dtype == np.float32 and not out["decoder_loss_weights"].any()
  with pytest.raises(ValueError, match="'x' has no fixed shape"):
    input_pipeline.empty_batch({"x": tf.TensorSpec([None, None], tf.int32)}, 4)


def test_host_agreement_needs_the_distributed_runtime():
  assert not input_pipeline.can_agree_across_hosts()  # one process, no jax.distributed
  with pytest.raises(RuntimeError, match="jax.distributed.initialize"):
    input_pipeline.HostBatchAgreement("train")
