"""SeqIO feature converters for pairwise / listwise encoder-decoder training.

`PairEncDecFeatureConverter` maps a task example with one prompt and several
targets to the encoder-decoder model features T5X uses, keeping the targets
axis::

  task features                          model features
  inputs   int32 [Li']                -> encoder_input_tokens   int32 [Li]
  targets  int32 [n, Lt'] (or ragged) -> decoder_target_tokens  int32 [n, Lt]
                                         decoder_input_tokens   int32 [n, Lt]
                                         decoder_loss_weights   int32 [n, Lt]
  scores   float32 [n]   (optional)   -> scores                 float32 [n]

For the SLiC-HF pair tasks the rows of `targets` are (chosen, rejected,
reference); for list losses they are the m candidates, with an optional
`scores` feature (passed through unchanged; its length is the static size of
its first dimension unless `task_feature_lengths['scores']` gives it).

`inputs` is trimmed/padded to ``task_feature_lengths['inputs']`` and every
targets row to ``task_feature_lengths['targets']`` (the LAST dimension; the
number of rows is not changed), padding with 0. `decoder_input_tokens` is each
row shifted right by one with `bos_id` (0) first, as
`seqio.utils.make_autoregressive_inputs` does for an unpacked sequence;
`decoder_loss_weights` is 1 on non-padding target positions (int32, as in
`seqio.EncDecFeatureConverter`).

Packing: several target rows share one encoder row, so examples cannot be
packed. T5X constructs converters as ``cls(pack=..., use_custom_packing_ops=
...)``; both keywords are accepted, but with ``pack=True`` a warning is logged
(once per process) and the examples are padded instead. The converter's `pack`
property is therefore always False and no segment-id / position features are
produced.
"""

from __future__ import annotations

import copy
from typing import Mapping, Optional

from absl import logging
import seqio
import tensorflow as tf

__all__ = ["PairEncDecFeatureConverter"]

_FeatureSpec = seqio.FeatureConverter.FeatureSpec

_PACK_WARNING_ISSUED = False


def _last_dim_length(length) -> int:
  """An int length, or the last entry of a per-dimension length sequence."""
  if isinstance(length, (list, tuple)):
    length = length[-1]
  return int(length)


class PairEncDecFeatureConverter(seqio.FeatureConverter):
  """Encoder-decoder features for one input and n targets (pairs or lists).

  See the module docstring for the features. Accepts T5X's `pack=` and
  `use_custom_packing_ops=` keywords; `pack=True` logs a warning once and pads.
  """

  TASK_FEATURES = {
      "inputs": _FeatureSpec(dtype=tf.int32),
      "targets": _FeatureSpec(dtype=tf.int32, rank=2, sequence_dim=1),
  }
  MODEL_FEATURES = {
      "encoder_input_tokens": _FeatureSpec(dtype=tf.int32),
      "decoder_target_tokens": _FeatureSpec(
          dtype=tf.int32, rank=2, sequence_dim=1
      ),
      "decoder_input_tokens": _FeatureSpec(
          dtype=tf.int32, rank=2, sequence_dim=1
      ),
      "decoder_loss_weights": _FeatureSpec(
          dtype=tf.int32, rank=2, sequence_dim=1
      ),
  }
  # Never packs; defined (empty) so the base class accepts pack=True too.
  PACKING_FEATURE_DTYPES = {}

  SCORES_FEATURE = "scores"
  _SCORES_SPEC = _FeatureSpec(dtype=tf.float32)

  def __init__(
      self,
      pack: bool = False,
      use_custom_packing_ops: bool = False,
      apply_length_check: bool = True,
      bos_id: int = 0,
      passthrough_features: Optional[Mapping[str, _FeatureSpec]] = None,
  ):
    global _PACK_WARNING_ISSUED
    self._requested_pack = bool(pack)
    if pack and not _PACK_WARNING_ISSUED:
      _PACK_WARNING_ISSUED = True
      logging.warning(
          "PairEncDecFeatureConverter: pack=True requested, but examples whose"
          " target rows share one encoder row cannot be packed; padding each"
          " example instead (pack is ignored)."
      )
    super().__init__(
        pack=False,
        use_custom_packing_ops=use_custom_packing_ops,
        apply_length_check=apply_length_check,
        bos_id=bos_id,
        passthrough_features=passthrough_features,
    )

  @property
  def requested_pack(self) -> bool:
    """The `pack` value the caller asked for (ignored; see class doc)."""
    return self._requested_pack

  def _has_scores(self) -> bool:
    return self.SCORES_FEATURE in self.TASK_FEATURES

  def _with_scores(self) -> "PairEncDecFeatureConverter":
    conv = copy.copy(self)
    conv.TASK_FEATURES = dict(self.TASK_FEATURES)
    conv.TASK_FEATURES[self.SCORES_FEATURE] = self._SCORES_SPEC
    conv.MODEL_FEATURES = dict(self.MODEL_FEATURES)
    conv.MODEL_FEATURES[self.SCORES_FEATURE] = self._SCORES_SPEC
    return conv

  def __call__(
      self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    lengths = dict(task_feature_lengths)
    if "targets" in lengths:
      lengths["targets"] = _last_dim_length(lengths["targets"])
    if (
        self.SCORES_FEATURE in ds.element_spec
        and self.SCORES_FEATURE not in self._passthrough_features
        and not self._has_scores()
    ):
      if self.SCORES_FEATURE not in lengths:
        n = ds.element_spec[self.SCORES_FEATURE].shape
        n = n[0] if n.rank else None
        if n is None:
          raise ValueError(
              "the 'scores' feature has no static length; give it in "
              "task_feature_lengths['scores']"
          )
        lengths[self.SCORES_FEATURE] = int(n)
      return seqio.FeatureConverter.__call__(self._with_scores(), ds, lengths)
    return super().__call__(ds, lengths)

  def _convert_features(
      self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    li = int(task_feature_lengths["inputs"])
    lt = _last_dim_length(task_feature_lengths["targets"])
    bos_id = self.bos_id
    keep = list(self._passthrough_features)
    if self._has_scores():
      keep.append(self.SCORES_FEATURE)

    def trim_pad_1d(t: tf.Tensor, length: int) -> tf.Tensor:
      if isinstance(t, tf.RaggedTensor):
        t = t.to_tensor()
      t = t[:length]
      t = tf.pad(t, [[0, length - tf.shape(t)[0]]])
      t.set_shape([length])
      return t

    def trim_pad_rows(t: tf.Tensor, length: int) -> tf.Tensor:
      n = t.shape[0]
      if isinstance(t, tf.RaggedTensor):
        t = t.to_tensor()
      t = t[:, :length]
      t = tf.pad(t, [[0, 0], [0, length - tf.shape(t)[1]]])
      t.set_shape([n, length])
      return t

    def convert(ex):
      inputs = trim_pad_1d(ex["inputs"], li)
      targets = trim_pad_rows(ex["targets"], lt)
      bos = tf.fill([tf.shape(targets)[0], 1], tf.constant(bos_id, tf.int32))
      decoder_inputs = tf.concat([bos, targets[:, :-1]], axis=1)
      decoder_inputs.set_shape(targets.shape)
      out = {
          "encoder_input_tokens": inputs,
          "decoder_target_tokens": targets,
          "decoder_input_tokens": decoder_inputs,
          "decoder_loss_weights": tf.cast(tf.not_equal(targets, 0), tf.int32),
      }
      for k in keep:
        out[k] = ex[k]
      return out

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(
      self, task_feature_lengths: Mapping[str, int]
  ) -> Mapping[str, int]:
    """{'encoder_input_tokens': Li, 'decoder_*': Lt (last dim), ...}."""
    li = int(task_feature_lengths["inputs"])
    lt = _last_dim_length(task_feature_lengths["targets"])
    lengths = {
        "encoder_input_tokens": li,
        "decoder_target_tokens": lt,
        "decoder_input_tokens": lt,
        "decoder_loss_weights": lt,
    }
    for k in self._passthrough_features:
      lengths[k] = task_feature_lengths[k]
    if self.SCORES_FEATURE in task_feature_lengths:
      lengths[self.SCORES_FEATURE] = int(
          task_feature_lengths[self.SCORES_FEATURE]
      )
    return lengths
