"""Held-out evaluation helpers (slic_jax.evaluation, slic_jax.tldr_eval)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slic_jax import evaluation
from slic_jax import models
from slic_jax import network
from slic_jax import optimizers
from slic_jax import tldr_eval
from slic_jax.data import readers
from slic_jax.data import synthetic

CFG = network.make_config("tiny", emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                          num_encoder_layers=1, num_decoder_layers=1)


@pytest.fixture(scope="module")
def model_and_params():
  vocab = synthetic.default_vocabulary()
  model = models.EncoderDecoderModel(network.Transformer(CFG), vocab, vocab,
                                     optimizers.create_optimizer())
  shapes = {"encoder_input_tokens": (2, 32), "decoder_input_tokens": (2, 3, 8)}
  params = model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]
  return model, params


def test_pair_accuracy_counts_real_pairs_only(model_and_params):
  model, params = model_and_params
  rng = np.random.default_rng(0)
  tgt = rng.integers(3, 512, (4, 3, 8)).astype(np.int32)
  tgt[3] = 0  # a padding row
  batch = {
      "encoder_input_tokens": rng.integers(3, 512, (4, 32)).astype(np.int32),
      "decoder_input_tokens": np.concatenate([np.zeros((4, 3, 1), np.int32), tgt[..., :-1]], -1),
      "decoder_target_tokens": tgt,
      "decoder_loss_weights": (tgt > 0).astype(np.int32),
  }
  out = evaluation.pair_accuracy(model, params, [batch])
  lp = np.asarray(model.score_batch(params, {k: jnp.asarray(v) for k, v in batch.items()}))[:3]
  assert out["num_pairs"] == 3
  assert out["pair_accuracy"] == pytest.approx(np.mean(lp[:, 0] > lp[:, 1]))
  assert out["margin"] == pytest.approx(np.mean(lp[:, 0] - lp[:, 1]), rel=1e-5)
  with pytest.raises(ValueError, match="no comparison pairs"):
    evaluation.pair_accuracy(model, params, [])


def test_prompts_are_fitted_and_summaries_decoded(model_and_params, tmp_path):
  model, params = model_and_params
  synthetic.generate_world(str(tmp_path), seed=1, num_sft=(5, 5, 5), num_comparisons=(5, 5, 5))
  posts = list(readers.read_sft(str(tmp_path), "test"))
  enc = evaluation.encode_prompts(model.input_vocabulary, posts, max_input_tokens=48)
  assert enc.shape == (5, 48)
  for row in enc:  # every prompt ends in EOS and keeps the "TL;DR:" cue after the newline cut
    ids = [int(t) for t in row if t]
    assert ids[-1] == 1
    assert model.input_vocabulary.decode(ids[:-1]).startswith("SUBREDDIT: r/")
  texts = evaluation.decode_summaries(model, params, enc, max_target_tokens=8, batch_size=4,
                                      decoder_params={"temperature": 0.0})
  assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
  # Greedy decoding is deterministic.
  assert texts == evaluation.decode_summaries(model, params, enc, max_target_tokens=8,
                                              batch_size=4, decoder_params={"temperature": 0.0})


def test_format_table():
  row = dict(model="SFT", step=10, pair_accuracy=0.5, num_pairs=4, oracle_win_rate=0.25,
             num_posts=8, oracle_score=1.5, reference_score=2.0, mean_words=7.0)
  table = tldr_eval.format_table([row])
  assert "| SFT | 10 | 0.500 (4 pairs) | 0.250 (8 posts) | 1.50 (2.00) | 7.0 |" in table
