"""PairEncDecFeatureConverter: pair/list targets -> T5X encoder-decoder features."""

import logging

import numpy as np
import pytest
import seqio
import tensorflow as tf

from slic_jax import feature_converters as fc
from slic_jax.feature_converters import PairEncDecFeatureConverter


def _ds(examples, ragged=True):
  def gen():
    for ex in examples:
      yield ex

  sig = {
      "inputs": tf.TensorSpec([None], tf.int32),
      "targets": (tf.RaggedTensorSpec([3, None], tf.int32, ragged_rank=1)
                  if ragged else tf.TensorSpec([3, None], tf.int32)),
  }
  if "scores" in examples[0]:
    sig["scores"] = tf.TensorSpec([3], tf.float32)

  def fix(ex):
    ex = dict(ex)
    if ragged:
      ex["targets"] = tf.ragged.constant(ex["targets"], dtype=tf.int32)
    return ex

  return tf.data.Dataset.from_generator(
      lambda: (fix(e) for e in gen()), output_signature=sig)


EXAMPLES = [
    {"inputs": [7, 8, 5, 1], "targets": [[3, 9, 1], [4, 1], [6, 6, 6, 1]]},
    {"inputs": [8, 1], "targets": [[2, 1], [5, 5, 1], [1]]},
]

EXPECTED = [
    {
        "encoder_input_tokens": [7, 8, 5, 1, 0, 0],
        "decoder_target_tokens": [[3, 9, 1, 0, 0], [4, 1, 0, 0, 0], [6, 6, 6, 1, 0]],
        "decoder_input_tokens": [[0, 3, 9, 1, 0], [0, 4, 1, 0, 0], [0, 6, 6, 6, 1]],
        "decoder_loss_weights": [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]],
    },
    {
        "encoder_input_tokens": [8, 1, 0, 0, 0, 0],
        "decoder_target_tokens": [[2, 1, 0, 0, 0], [5, 5, 1, 0, 0], [1, 0, 0, 0, 0]],
        "decoder_input_tokens": [[0, 2, 1, 0, 0], [0, 5, 5, 1, 0], [0, 1, 0, 0, 0]],
        "decoder_loss_weights": [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]],
    },
]

LENGTHS = {"inputs": 6, "targets": 5}


def _check(out, expected):
  assert len(out) == len(expected)
  for got, want in zip(out, expected):
    assert set(got) == set(want)
    for k, v in want.items():
      np.testing.assert_array_equal(got[k], np.asarray(v, np.int32), err_msg=k)
      assert got[k].dtype == np.int32, k


@pytest.mark.parametrize("ragged", [True, False])
def test_convert_exact_values(ragged):
  examples = EXAMPLES
  if not ragged:  # dense targets must already be rectangular (0-padded)
    examples = [
        {"inputs": e["inputs"],
         "targets": [r + [0] * (4 - len(r)) for r in e["targets"]]} for e in EXAMPLES]
  conv = PairEncDecFeatureConverter(pack=False)
  ds = conv(_ds(examples, ragged=ragged), LENGTHS)
  spec = ds.element_spec
  assert spec["encoder_input_tokens"].shape == (6,)
  for k in ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights"):
    assert spec[k].shape == (3, 5), k
  _check(list(ds.as_numpy_iterator()), EXPECTED)


def test_model_feature_lengths():
  conv = PairEncDecFeatureConverter(pack=False)
  assert conv.get_model_feature_lengths({"inputs": 512, "targets": 48}) == {
      "encoder_input_tokens": 512,
      "decoder_target_tokens": 48,
      "decoder_input_tokens": 48,
      "decoder_loss_weights": 48,
  }
  # A per-dimension length: Lt is the last entry.
  assert conv.get_model_feature_lengths(
      {"inputs": 8, "targets": [3, 16]})["decoder_target_tokens"] == 16


def test_too_long_targets_rejected_by_length_check():
  conv = PairEncDecFeatureConverter(pack=False)
  ds = conv(_ds(EXAMPLES), {"inputs": 6, "targets": 3})
  with pytest.raises(tf.errors.InvalidArgumentError, match="targets"):
    list(ds.as_numpy_iterator())


def test_pack_true_warns_once_and_pads(caplog, monkeypatch):
  monkeypatch.setattr(fc, "_PACK_WARNING_ISSUED", False)
  with caplog.at_level(logging.WARNING):
    conv = PairEncDecFeatureConverter(pack=True, use_custom_packing_ops=False)
    conv2 = PairEncDecFeatureConverter(pack=True, use_custom_packing_ops=True)
  warnings = [r for r in caplog.records if "cannot be packed" in r.getMessage()]
  assert len(warnings) == 1
  assert conv.pack is False and conv.requested_pack is True and conv2.pack is False
  out = list(conv(_ds(EXAMPLES), LENGTHS).as_numpy_iterator())
  _check(out, EXPECTED)  # padded, no segment ids / positions
  assert conv.get_model_feature_lengths(LENGTHS).keys() == EXPECTED[0].keys()


def test_scores_passthrough():
  examples = [dict(e, scores=[0.5, 0.25, 1.0]) for e in EXAMPLES]
  conv = PairEncDecFeatureConverter(pack=False)
  ds = conv(_ds(examples), LENGTHS)
  assert ds.element_spec["scores"] == tf.TensorSpec([3], tf.float32)
  out = list(ds.as_numpy_iterator())
  np.testing.assert_array_equal(out[1]["scores"], np.float32([0.5, 0.25, 1.0]))
  _check([{k: v for k, v in o.items() if k != "scores"} for o in out], EXPECTED)
  assert conv.get_model_feature_lengths(
      {"inputs": 6, "targets": 5, "scores": 3})["scores"] == 3
  # The converter itself is unchanged (no 'scores' leaks into its class features).
  assert "scores" not in conv.TASK_FEATURES


def test_seqio_get_dataset_end_to_end():
  name = "slic_jax_test_pair_converter_task"
  vocab = seqio.ByteVocabulary()

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({
        "inputs": tf.ragged.constant([[10, 11, 12], [13]], tf.int32),
        "targets": tf.ragged.constant([[[20, 21], [22], [23, 24]],
                                       [[25], [26, 27], [28]]], tf.int32),
    })

  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
      preprocessors=[seqio.preprocessors.append_eos],
      output_features={
          "inputs": seqio.Feature(vocab, add_eos=True),
          "targets": seqio.Feature(vocab, add_eos=True, rank=2),
      },
  )
  try:
    ds = seqio.get_dataset(
        name, task_feature_lengths={"inputs": 5, "targets": 4}, dataset_split="train",
        shuffle=False, feature_converter=PairEncDecFeatureConverter(pack=False))
    out = list(ds.as_numpy_iterator())
  finally:
    seqio.TaskRegistry.remove(name)
  assert len(out) == 2
  np.testing.assert_array_equal(out[0]["encoder_input_tokens"], [10, 11, 12, 1, 0])
  np.testing.assert_array_equal(
      out[0]["decoder_target_tokens"], [[20, 21, 1, 0], [22, 1, 0, 0], [23, 24, 1, 0]])
  np.testing.assert_array_equal(
      out[0]["decoder_input_tokens"], [[0, 20, 21, 1], [0, 22, 1, 0], [0, 23, 24, 1]])
  np.testing.assert_array_equal(out[1]["encoder_input_tokens"], [13, 1, 0, 0, 0])
  np.testing.assert_array_equal(
      out[1]["decoder_loss_weights"], [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
