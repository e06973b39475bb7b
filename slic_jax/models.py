"""Model objects in T5X's protocol: SFT (`EncoderDecoderModel`) and SLiC-HF (`SlicHFModel`).

A model owns the network, the vocabularies, the optimizer and the loss: the
trainer (ours or `t5x.train`) only calls ``get_initial_variables``, ``loss_fn``,
``eval_fn``, ``score_batch`` and ``predict_batch_with_aux``. The loss equations
live in `slic_jax.losses`; this module wires network outputs into them.

Batches (T5X feature names):
  SFT:   encoder_input_tokens [B, Li], decoder_{input,target}_tokens [B, Lt],
         decoder_loss_weights [B, Lt]  (seqio.EncDecFeatureConverter).
  Pairs: encoder_input_tokens [B, Li], decoder_{input,target}_tokens [B, n, Lt],
         decoder_loss_weights [B, n, Lt] with rows (chosen, rejected, reference)
         (`PairEncDecFeatureConverter`).
For pair batches the encoder runs once per prompt; its output is repeated n times
for the decoder (`_pair_sequence_log_probs`), so a pair costs one encoder pass.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping

import clu.metrics as clu_metrics
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from slic_jax import decoding
from slic_jax import losses
from slic_jax import network
from slic_jax import t5x_bridge

if TYPE_CHECKING:  # annotations only; importing seqio loads TensorFlow
  import seqio

Array = jax.Array
Batch = Mapping[str, Array]
MetricsMap = dict[str, clu_metrics.Metric]


class _Lazy:
  """A class attribute imported on first access: ``_Lazy('seqio', 'EncDecFeatureConverter')``.

  Models name their SeqIO feature converter, but importing SeqIO loads TensorFlow
  (~0.6 GB resident); a process that only runs the step on arrays (benchmarks,
  scoring) never touches the attribute and never pays for it.
  """

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __get__(self, obj, objtype=None):
    return getattr(importlib.import_module(self.module), self.name)


@flax.struct.dataclass
class Sum(clu_metrics.Metric):
  """A metric that adds up: merged over microbatches and report windows it is the total
  (T5X reports ``num_examples`` / ``num_tokens`` as sums too)."""

  total: jax.Array

  @classmethod
  def from_model_output(cls, values: Array, **_) -> "Sum":
    return cls(total=jnp.sum(jnp.asarray(values, jnp.float32)))

  def merge(self, other: "Sum") -> "Sum":
    return type(self)(total=self.total + other.total)

  def compute(self) -> Array:
    return self.total


def _average(value: Array, count: Array | float = 1.0) -> clu_metrics.Average:
  """A clu Average holding ``value`` as the mean of ``count`` observations."""
  count = jnp.asarray(count, jnp.float32)
  return clu_metrics.Average(total=jnp.asarray(value, jnp.float32) * count, count=count)


class EncoderDecoderModel:
  """Supervised (SFT) T5 model: token cross-entropy on ``decoder_target_tokens``.

  Args:
    module: a `slic_jax.network.Transformer` (or any module with T5X's
      encode/decode/__call__ signatures).
    input_vocabulary, output_vocabulary: seqio vocabularies.
    optimizer_def: an optax GradientTransformation. Read back through the
      ``optimizer_def`` property, which wraps it in ``t5x.optimizers.OptaxWrapper``
      when t5x is loaded in the process (`slic_jax.t5x_bridge`).
    decode_fn: sampling function with `decoding.temperature_sample`'s signature.
    label_smoothing, z_loss: cross-entropy options (T5X defaults 0.0 and 1e-4).
    loss_normalizing_factor: None divides the summed token loss by the number of
      real target tokens in the batch; a number divides by that constant (T5X's
      fixed normaliser).
  """

  FEATURE_CONVERTER_CLS = _Lazy("seqio", "EncDecFeatureConverter")

  def __init__(
      self,
      module,
      input_vocabulary: seqio.Vocabulary,
      output_vocabulary: seqio.Vocabulary,
      optimizer_def: optax.GradientTransformation,
      decode_fn: Callable[..., Any] = decoding.temperature_sample,
      label_smoothing: float = 0.0,
      z_loss: float = 1e-4,
      loss_normalizing_factor: float | None = None,
  ):
    self.module = module
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    self.optimizer_def = optimizer_def
    self._decode_fn = decode_fn
    self._label_smoothing = label_smoothing
    self._z_loss = z_loss
    self._loss_normalizing_factor = loss_normalizing_factor

  # ---------------------------------------------------------------- T5X bridge
  @property
  def optimizer_def(self):
    """The optax transformation; a ``t5x.optimizers.OptaxWrapper`` of it when t5x is
    loaded (T5X's trainer needs an OptimizerDef; slic_jax's unwraps it again)."""
    if self._t5x_optimizer_def is None and t5x_bridge.t5x_loaded():
      self._t5x_optimizer_def = t5x_bridge.as_t5x_optimizer(self._optimizer_def)
    return self._t5x_optimizer_def or self._optimizer_def

  @optimizer_def.setter
  def optimizer_def(self, value):
    self._optimizer_def = t5x_bridge.as_optax(value)
    self._t5x_optimizer_def = None

  # ---------------------------------------------------------------- variables
  def get_initial_variables(
      self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]], input_types=None
  ) -> Mapping[str, Any]:
    """Params and ``params_axes`` for batches of ``input_shapes``.

    Pair shapes ``[B, n, Lt]`` are folded to ``[B·n, Lt]`` (the network sees plain
    encoder-decoder batches).
    """
    input_types = input_types or {}
    enc_shape = input_shapes["encoder_input_tokens"]
    dec_shape = input_shapes["decoder_input_tokens"]
    dec_shape = (int(np.prod(dec_shape[:-1])), dec_shape[-1])
    enc = jnp.ones(enc_shape, input_types.get("encoder_input_tokens", jnp.int32))
    dec = jnp.ones(dec_shape, input_types.get("decoder_input_tokens", jnp.int32))
    if dec_shape[0] != enc_shape[0]:
      enc = jnp.ones((dec_shape[0],) + tuple(enc_shape[1:]), enc.dtype)
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.module.init(
        {"params": params_rng, "dropout": dropout_rng}, enc, dec, dec, enable_dropout=False
    )
    return dict(variables)

  # ---------------------------------------------------------------- forward
  def _logits(self, params, batch: Batch, dropout_rng=None) -> Array:
    """Teacher-forced logits ``[B, Lt, V]`` for a plain encoder-decoder batch."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {"params": params},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"),
        enable_dropout=rngs is not None,
        rngs=rngs,
    )

  def _pair_logits(self, params, batch: Batch, dropout_rng=None) -> Array:
    """Logits ``[B, n, Lt, V]`` for n target sequences per prompt, one encoder pass.

    encoded = encode(x) : [B, Li, D]  (once per prompt);
    logits  = decode(encoded, y_1..n) : [B·n, Lt, V] → [B, n, Lt, V], the decoder's
    cross-attention projecting each prompt's keys/values once for its n rows.
    """
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    dec_in = batch["decoder_input_tokens"]
    b, n, lt = dec_in.shape
    # One apply: the module's `decode` takes B·n decoder rows for B encoded prompts
    # (grouped), and the encoder and decoder share one setup (the embedding's copy per
    # data shard, `network.Embed`).
    logits = self.module.apply(
        {"params": params},
        batch["encoder_input_tokens"],
        dec_in.reshape(b * n, lt),
        batch["decoder_target_tokens"].reshape(b * n, lt),
        enable_dropout=rngs is not None,
        rngs=rngs,
    )
    return logits.reshape(b, n, lt, -1)

  def sequence_log_probs(
      self, params, batch: Batch, dropout_rng=None, length_normalize: bool = False
  ) -> Array:
    """log P(y|x) per target sequence: ``[B]`` (SFT batch) or ``[B, n]`` (pair batch)."""
    pairs = batch["decoder_target_tokens"].ndim == 3
    logits = (self._pair_logits if pairs else self._logits)(params, batch, dropout_rng)
    return losses.sequence_log_probs(
        logits=logits,
        targets=batch["decoder_target_tokens"],
        weights=batch["decoder_loss_weights"],
        length_normalize=length_normalize,
    )

  # ---------------------------------------------------------------- losses
  def loss_fn(self, params, batch: Batch, dropout_rng: Array | None) -> tuple[Array, MetricsMap]:
    """Token cross-entropy: ``L = Σ_t w_t·CE_t / N`` (N = real target tokens or the fixed factor)."""
    logits = self._logits(params, batch, dropout_rng)
    return self._cross_entropy(logits, batch)

  def _cross_entropy(self, logits: Array, batch: Batch) -> tuple[Array, MetricsMap]:
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    loss_sum, z_loss_sum, weight_sum = losses.cross_entropy_loss(
        logits=logits,
        targets=batch["decoder_target_tokens"],
        weights=weights,
        z_loss=self._z_loss,
        label_smoothing=self._label_smoothing,
    )
    norm = self._loss_normalizing_factor or jnp.maximum(weight_sum, 1.0)
    loss = loss_sum / norm
    correct = (jnp.argmax(logits, -1) == batch["decoder_target_tokens"]) * weights
    if "decoder_segment_ids" in batch:  # packed: segments 1..k in each row
      num_examples = jnp.sum(jnp.max(batch["decoder_segment_ids"], axis=-1))
    else:
      num_examples = jnp.sum(jnp.any(batch["decoder_target_tokens"] > 0, axis=-1))
    metrics = {
        "loss": _average(loss),
        "cross_ent_loss_per_token": _average((loss_sum - z_loss_sum) / jnp.maximum(weight_sum, 1.0), weight_sum),
        "z_loss": _average(z_loss_sum / norm),
        "accuracy": _average(jnp.sum(correct) / jnp.maximum(weight_sum, 1.0), weight_sum),
        "num_tokens": Sum.from_model_output(weight_sum),
        "num_examples": Sum.from_model_output(num_examples),
    }
    targets = batch["decoder_target_tokens"]
    metrics.update(t5x_bridge.timing_metrics(targets.shape[0], targets.size))
    return loss, metrics

  def eval_fn(self, params, batch: Batch) -> tuple[Array, MetricsMap]:
    """The training loss without dropout."""
    return self.loss_fn(params, batch, None)

  # ---------------------------------------------------------------- scoring
  def score_batch(self, params, batch: Batch, return_intermediates: bool = False) -> Array:
    """Sum of target-token log-probs: ``[B]`` for SFT batches, ``[B, n]`` for pair batches."""
    if return_intermediates:
      raise NotImplementedError("return_intermediates is not supported")
    return self.sequence_log_probs(params, batch)

  # ---------------------------------------------------------------- decoding
  def predict_batch_with_aux(
      self,
      params,
      batch: Batch,
      rng: Array | None = None,
      decoder_params: Mapping[str, Any] | None = None,
      return_all_decodes: bool = False,
      num_decodes: int = 1,
      prompt_with_targets: bool = False,
  ) -> tuple[Array, Mapping[str, Array]]:
    """Decodes from ``encoder_input_tokens`` with the KV cache.

    Returns ``(decodes, {'scores': log P(decode|x)})``: decodes ``[B, L]`` (the best
    of ``num_decodes`` by score) or ``[B, num_decodes, L]`` with
    ``return_all_decodes``. ``decoder_params`` go to ``decode_fn`` (e.g.
    ``temperature``, ``topk``, ``max_decode_steps``). The decode length is that of
    ``decoder_input_tokens`` in the batch.
    """
    if prompt_with_targets:
      raise NotImplementedError("prompt_with_targets is not supported")
    enc_tokens = batch["encoder_input_tokens"]
    dec_len = batch["decoder_input_tokens"].shape[-1]
    b = enc_tokens.shape[0]
    # An all-zero cache for batch B (decode_fn repeats it num_decodes times).
    cache = network.init_decoder_cache(self.module, b, enc_tokens.shape[1], dec_len)
    encoded = self.module.apply(
        {"params": params}, enc_tokens, enable_dropout=False, method=self.module.encode
    )
    encoded = decoding.batch_repeat(encoded, num_decodes)
    enc_rep = decoding.batch_repeat(enc_tokens, num_decodes)

    def tokens_to_logits(state: decoding.DecodingState):
      logits, new_vars = self.module.apply(
          {"params": params, "cache": state.cache},
          encoded,
          enc_rep,
          state.cur_token,
          state.cur_token,
          enable_dropout=False,
          decode=True,
          max_decode_length=dec_len,
          mutable=["cache"],
          method=self.module.decode,
      )
      return logits[:, -1, :], new_vars["cache"]

    decoder_params = dict(decoder_params or {})
    rng = jax.random.PRNGKey(0) if rng is None else rng
    decodes, scores = self._decode_fn(
        inputs=jnp.zeros((b, dec_len), jnp.int32),
        cache=cache,
        tokens_to_logits=tokens_to_logits,
        eos_id=self.output_vocabulary.eos_id,
        decode_rng=rng,
        num_decodes=num_decodes,
        **decoder_params,
    )
    if return_all_decodes:
      return decodes, {"scores": scores}
    # decode_fn sorts each example's decodes by increasing score (T5X): the best is last.
    return decodes[:, -1], {"scores": scores[:, -1]}

  def predict_batch(self, params, batch: Batch, rng: Array | None = None, **kwargs) -> Array:
    return self.predict_batch_with_aux(params, batch, rng=rng, **kwargs)[0]


class SlicHFModel(EncoderDecoderModel):
  """SLiC-HF: sequence-likelihood calibration on (chosen, rejected) pairs.

  ``L(θ) = mean_b [ max(0, δ − log π(y⁺|x) + log π(y⁻|x)) − λ · log π(y_ref|x) ]``

  Batches carry three target rows per prompt: chosen y⁺, rejected y⁻ and the
  regulariser's target y_ref (the SFT reference summary, or y⁺; see
  `tasks.tldr.tldr_options`). One encoder pass serves all rows.

  Args (beyond `EncoderDecoderModel`'s):
    delta: ranking margin δ (paper: 1.0).
    reg_weight: λ, weight of the cross-entropy regulariser on y_ref.
    length_normalize: use per-token mean log-probs instead of sums (default off, as
      in the paper).
    reg_target: 'reference' (default): y_ref is targets row 2 of the batch (what the
      task put there: the SFT summary in the paper's SLiC-HF-direct). 'chosen':
      y_ref = y⁺ (the NLL-on-chosen term of TRL's CPO), so only rows 0 and 1 are
      decoded: a third less decoder and logits work; any row 2 is ignored.
  """

  FEATURE_CONVERTER_CLS = _Lazy("slic_jax.feature_converters", "PairEncDecFeatureConverter")
  REG_TARGETS = ("reference", "chosen")

  def __init__(self, *args, delta: float = 1.0, reg_weight: float = 0.5,
               length_normalize: bool = False, reg_target: str = "reference", **kwargs):
    super().__init__(*args, **kwargs)
    if reg_target not in self.REG_TARGETS:
      raise ValueError(f"SlicHFModel.reg_target must be one of {self.REG_TARGETS}, "
                       f"got {reg_target!r}")
    self.delta = delta
    self.reg_weight = reg_weight
    self.length_normalize = length_normalize
    self.reg_target = reg_target

  def loss_fn(self, params, batch: Batch, dropout_rng: Array | None) -> tuple[Array, MetricsMap]:
    if self.reg_target == "chosen":  # decode (chosen, rejected) only
      batch = {k: (v[:, :2] if k.startswith("decoder_") else v) for k, v in batch.items()}
    ref_row = 2 if self.reg_target == "reference" else 0
    logps = self.sequence_log_probs(params, batch, dropout_rng, self.length_normalize)
    mask = jnp.any(batch["decoder_target_tokens"][:, 0] > 0, axis=-1).astype(jnp.float32)
    loss, stats = losses.slic_hf_loss(
        chosen_logps=logps[:, 0],
        rejected_logps=logps[:, 1],
        reference_logps=logps[:, ref_row],
        delta=self.delta,
        reg_weight=self.reg_weight,
        mask=mask,
    )
    count = jnp.sum(mask)
    lengths = jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32), axis=-1)
    per_row = lambda x: jnp.sum(x * mask) / jnp.maximum(count, 1.0)
    metrics = {k: _average(v, count) for k, v in stats.items()}
    metrics["loss"] = _average(loss)
    metrics["chosen_length"] = _average(per_row(lengths[:, 0]), count)
    metrics["rejected_length"] = _average(per_row(lengths[:, 1]), count)
    metrics["num_examples"] = Sum.from_model_output(count)
    # T5X's throughput metrics (only when t5x is loaded): one sequence = one prompt
    # with its (chosen, rejected[, reference]) rows.
    targets = batch["decoder_target_tokens"]
    metrics.update(t5x_bridge.timing_metrics(targets.shape[0], targets.size))
    return loss, metrics
