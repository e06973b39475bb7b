"""Model objects (slic_jax.models): T5X protocol, shared encoder pass, SLiC-HF loss wiring."""
import clu.metrics as clu_metrics
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from slic_jax import feature_converters
from slic_jax import models
from slic_jax import network
from slic_jax import optimizers

B, N, LI, LT = 3, 3, 12, 7
CFG = network.make_config("tiny", vocab_size=64, emb_dim=32, num_heads=2, head_dim=16,
                          mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1)
VOCAB = seqio.PassThroughVocabulary(size=64, eos_id=1)


def _model(cls=models.SlicHFModel, **kw):
  return cls(network.Transformer(CFG), VOCAB, VOCAB, optimizers.create_optimizer(), **kw)


def _pair_batch(seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, 64, (B, LI)).astype(np.int32)
  enc[0, 9:] = 0  # padding
  tgt = rng.integers(2, 64, (B, N, LT)).astype(np.int32)
  tgt[:, :, 5:] = 0
  tgt[:, :, 4] = 1  # EOS
  tgt[1, 1, 3:] = 0  # a shorter rejected summary
  dec_in = np.concatenate([np.zeros((B, N, 1), np.int32), tgt[:, :, :-1]], axis=-1)
  return {
      "encoder_input_tokens": jnp.asarray(enc),
      "decoder_input_tokens": jnp.asarray(dec_in),
      "decoder_target_tokens": jnp.asarray(tgt),
      "decoder_loss_weights": jnp.asarray((tgt > 0).astype(np.int32)),
  }


def _params(model, batch):
  shapes = {k: v.shape for k, v in batch.items()}
  variables = model.get_initial_variables(jax.random.PRNGKey(0), shapes)
  assert "params_axes" in variables
  return variables["params"]


def _score(model, params, batch):
  """score_batch under jax.jit, as T5X calls it (eager dispatch is several times slower)."""
  return jax.jit(model.score_batch)(params, batch)


def _loss(model, params, batch, rng=None):
  """loss_fn under jax.jit, as a trainer calls it."""
  return jax.jit(model.loss_fn)(params, batch, rng)


def _row(batch, i):
  """The i-th target row of a pair batch as a plain encoder-decoder batch."""
  return {
      "encoder_input_tokens": batch["encoder_input_tokens"],
      "decoder_input_tokens": batch["decoder_input_tokens"][:, i],
      "decoder_target_tokens": batch["decoder_target_tokens"][:, i],
      "decoder_loss_weights": batch["decoder_loss_weights"][:, i],
  }


def test_protocol_attributes():
  m = _model()
  assert m.FEATURE_CONVERTER_CLS is feature_converters.PairEncDecFeatureConverter
  assert models.EncoderDecoderModel.FEATURE_CONVERTER_CLS is seqio.EncDecFeatureConverter
  conv = m.FEATURE_CONVERTER_CLS(pack=False, use_custom_packing_ops=False)
  assert isinstance(conv, seqio.FeatureConverter)
  for name in ("optimizer_def", "get_initial_variables", "loss_fn", "eval_fn", "score_batch",
               "predict_batch_with_aux"):
    assert hasattr(m, name)


def test_pair_scores_equal_separate_forward_passes():
  m = _model()
  batch = _pair_batch()
  params = _params(m, batch)
  pair = np.asarray(_score(m, params, batch))
  assert pair.shape == (B, N)
  for i in range(N):
    single = np.asarray(_score(m, params, _row(batch, i)))
    np.testing.assert_allclose(pair[:, i], single, rtol=1e-5, atol=1e-5)


def test_encoder_runs_once_per_prompt(monkeypatch):
  """The shared pass: one encode call over B prompts, not B·n summaries."""
  calls = []
  original = network.Transformer.encode

  def counting_encode(self, encoder_input_tokens, *args, **kwargs):
    calls.append(encoder_input_tokens.shape)
    return original(self, encoder_input_tokens, *args, **kwargs)

  m = _model()
  batch = _pair_batch()
  params = _params(m, batch)
  monkeypatch.setattr(network.Transformer, "encode", counting_encode)
  jax.make_jaxpr(lambda p: m.loss_fn(p, batch, jax.random.PRNGKey(1)))(params)
  assert calls == [(B, LI)]


def test_slic_hf_loss_fn_matches_the_equation():
  m = _model(delta=1.0, reg_weight=0.3)
  batch = _pair_batch(1)
  params = _params(m, batch)
  loss, metrics = _loss(m, params, batch)
  lp = np.asarray(_score(m, params, batch), np.float64)
  expected = np.mean(np.maximum(0.0, 1.0 - lp[:, 0] + lp[:, 1]) - 0.3 * lp[:, 2])
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert all(isinstance(v, clu_metrics.Metric) for v in metrics.values())
  np.testing.assert_allclose(float(metrics["pair_accuracy"].compute()),
                             np.mean(lp[:, 0] > lp[:, 1]), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["chosen_logps"].compute()), lp[:, 0].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["rejected_length"].compute()),
                             np.asarray(batch["decoder_loss_weights"])[:, 1].sum(-1).mean())


def test_reg_target_chosen_is_cpo_loss_on_two_rows(monkeypatch):
  """reg_target='chosen': hinge + λ·NLL(y+) (TRL CPO's loss), decoding 2 rows, not 3."""
  m = _model(delta=1.0, reg_weight=0.3, reg_target="chosen")
  batch = _pair_batch(4)
  params = _params(m, batch)
  lp = np.asarray(_score(m, params, batch), np.float64)
  loss, metrics = _loss(m, params, batch)
  expected = np.mean(np.maximum(0.0, 1.0 - lp[:, 0] + lp[:, 1]) - 0.3 * lp[:, 0])
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["reference_logps"].compute()), lp[:, 0].mean(),
                             rtol=1e-5)
  # The same loss and gradients as reg_target='reference' with y+ copied into row 2.
  copied = {k: v.at[:, 2].set(v[:, 0]) if k.startswith("decoder_") else v
            for k, v in batch.items()}
  ref = _model(delta=1.0, reg_weight=0.3)
  g_chosen = jax.jit(jax.grad(lambda p: m.loss_fn(p, batch, None)[0]))(params)
  g_ref = jax.jit(jax.grad(lambda p: ref.loss_fn(p, copied, None)[0]))(params)
  for a, b in zip(jax.tree.leaves(g_chosen), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # Only 2 rows per prompt reach the decoder.
  rows = []
  original = network.Transformer.decode

  def counting_decode(self, encoded, encoder_input_tokens, decoder_input_tokens, *a, **kw):
    rows.append(decoder_input_tokens.shape[0])
    return original(self, encoded, encoder_input_tokens, decoder_input_tokens, *a, **kw)

  monkeypatch.setattr(network.Transformer, "decode", counting_decode)
  jax.make_jaxpr(lambda p: m.loss_fn(p, batch, None))(params)
  assert rows == [2 * B]
  with pytest.raises(ValueError, match="reg_target"):
    _model(reg_target="sft")


def test_padding_rows_do_not_count():
  m = _model()
  batch = _pair_batch(2)
  params = _params(m, batch)
  padded = {k: jnp.concatenate([v, jnp.zeros_like(v[:1])]) for k, v in batch.items()}
  l1, m1 = _loss(m, params, batch)
  l2, m2 = _loss(m, params, padded)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
  assert float(m2["num_examples"].compute()) == B


def test_gradient_moves_the_pair_apart():
  """A few SGD steps on the SLiC-HF loss raise the chosen-minus-rejected margin."""
  m = _model(reg_weight=0.0)
  batch = _pair_batch(3)
  params = _params(m, batch)
  margin = lambda p: float(jnp.mean(jnp.diff(_score(m, p, batch)[:, :2][:, ::-1], axis=1)))
  before = margin(params)
  grad_fn = jax.jit(jax.grad(lambda p: m.loss_fn(p, batch, None)[0]))
  for _ in range(5):
    params = jax.tree.map(lambda w, g: w - 0.1 * g, params, grad_fn(params))
  assert margin(params) > before + 0.5


def test_sft_loss_is_mean_token_cross_entropy():
  m = _model(models.EncoderDecoderModel, z_loss=0.0)
  batch = _row(_pair_batch(4), 0)
  params = _params(m, batch)
  loss, metrics = _loss(m, params, batch)
  lp = np.asarray(_score(m, params, batch))
  ntok = float(np.asarray(batch["decoder_loss_weights"]).sum())
  np.testing.assert_allclose(float(loss), -lp.sum() / ntok, rtol=1e-5)
  assert float(metrics["num_tokens"].compute()) == ntok


def test_dropout_rng_changes_the_loss_only_with_dropout():
  cfg = network.make_config("tiny", vocab_size=64, emb_dim=32, num_heads=2, head_dim=16,
                            mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                            dropout_rate=0.3)
  m = models.SlicHFModel(network.Transformer(cfg), VOCAB, VOCAB, optimizers.create_optimizer())
  batch = _pair_batch(5)
  params = _params(m, batch)
  a = float(_loss(m, params, batch, jax.random.PRNGKey(1))[0])
  b = float(_loss(m, params, batch, jax.random.PRNGKey(2))[0])
  c = float(jax.jit(m.eval_fn)(params, batch)[0])
  d = float(jax.jit(m.eval_fn)(params, batch)[0])
  assert a != b and c == d


def test_predict_batch_greedy_scores_are_its_log_likelihood():
  m = _model(models.EncoderDecoderModel)
  batch = _row(_pair_batch(6), 0)
  params = _params(m, batch)
  decodes, aux = jax.jit(
      lambda p, b: m.predict_batch_with_aux(p, b, decoder_params={"temperature": 0.0}))(params, batch)
  assert decodes.shape == (B, LT)
  tgt = np.asarray(decodes)
  weights = np.ones_like(tgt)
  for r in range(B):  # weights up to and including the first EOS
    eos = np.where(tgt[r] == 1)[0]
    if eos.size:
      weights[r, eos[0] + 1:] = 0
  dec_in = np.concatenate([np.zeros((B, 1), np.int32), tgt[:, :-1]], axis=1)
  rescored = _score(m, params, {
      "encoder_input_tokens": batch["encoder_input_tokens"],
      "decoder_input_tokens": jnp.asarray(dec_in),
      "decoder_target_tokens": jnp.asarray(tgt),
      "decoder_loss_weights": jnp.asarray(weights),
  })
  np.testing.assert_allclose(np.asarray(aux["scores"]), np.asarray(rescored), rtol=1e-4, atol=1e-4)
  # Greedy: every emitted token is the argmax of its teacher-forced logits.
  logits = m._logits(params, {**batch, "decoder_input_tokens": jnp.asarray(dec_in),
                              "decoder_target_tokens": jnp.asarray(tgt)})
  argmax = np.asarray(jnp.argmax(logits, -1))
  np.testing.assert_array_equal(np.where(weights > 0, argmax, 0), np.where(weights > 0, tgt, 0))


def test_return_all_decodes_shapes():
  m = _model(models.EncoderDecoderModel)
  batch = _row(_pair_batch(7), 0)
  params = _params(m, batch)
  decodes, aux = m.predict_batch_with_aux(
      params, batch, rng=jax.random.PRNGKey(3), num_decodes=4, return_all_decodes=True,
      decoder_params={"temperature": 1.0, "topk": 8})
  assert decodes.shape == (B, 4, LT) and aux["scores"].shape == (B, 4)
  assert np.all(np.diff(np.asarray(aux["scores"]), axis=1) >= -1e-6)  # sorted, best last


def test_list_of_m_candidates_shares_one_encoder_pass():
  """m = 5 candidates per prompt: same scores as five separate forward passes."""
  m = _model()
  rng = np.random.default_rng(8)
  tgt = rng.integers(2, 64, (2, 5, LT)).astype(np.int32)
  batch = {
      "encoder_input_tokens": jnp.asarray(rng.integers(2, 64, (2, LI)).astype(np.int32)),
      "decoder_input_tokens": jnp.asarray(
          np.concatenate([np.zeros((2, 5, 1), np.int32), tgt[..., :-1]], -1)),
      "decoder_target_tokens": jnp.asarray(tgt),
      "decoder_loss_weights": jnp.ones((2, 5, LT), jnp.int32),
  }
  params = _params(m, batch)
  scores = np.asarray(_score(m, params, batch))
  assert scores.shape == (2, 5)
  for i in range(5):
    np.testing.assert_allclose(scores[:, i], np.asarray(_score(m, params, _row(batch, i))),
                               rtol=1e-5, atol=1e-5)
