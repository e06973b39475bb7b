"""Tests for slic_jax.decoding: cached sampling against full teacher-forced passes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slic_jax import decoding
from slic_jax import network

MODEL = network.Transformer(network.make_config('tiny'))
ENC = jnp.array([[5, 9, 33, 2, 17, 1], [44, 3, 8, 1, 0, 0]], jnp.int32)
BATCH, LENGTH = 2, 6  # decode length L
NO_EOS = 511  # an id the tiny model is not asked to stop on


def _ban_pad(logits):
  """The sampler never picks id 0 (padding), so sequences teacher-force cleanly."""
  return logits.at[..., 0].set(-1e9)


@pytest.fixture(scope='module')
def params():
  init = jax.jit(lambda r: MODEL.init(r, ENC, ENC[:, :LENGTH], ENC[:, :LENGTH],
                                      enable_dropout=False))
  return init(jax.random.PRNGKey(0))['params']


def _cached_decoder(params, num_decodes):
  """ENC encoded once, repeated num_decodes times; returns (cache, tokens_to_logits)."""
  encoded = MODEL.apply({'params': params}, ENC, enable_dropout=False,
                        method=MODEL.encode)
  cache = network.init_decoder_cache(MODEL, BATCH, ENC.shape[1], LENGTH)
  encoded = decoding.batch_repeat(encoded, num_decodes)
  raw = decoding.batch_repeat(ENC, num_decodes)

  def tokens_to_logits(state):
    logits, variables = MODEL.apply(
        {'params': params, 'cache': state.cache}, encoded, raw, state.cur_token,
        state.cur_token, enable_dropout=False, decode=True,
        max_decode_length=LENGTH, mutable=['cache'], method=MODEL.decode)
    return _ban_pad(logits[:, 0]), variables['cache']

  return cache, tokens_to_logits


@functools.partial(jax.jit, static_argnames=('num_decodes', 'topk', 'max_decode_steps'))
def _sample(params, inputs, rng, temperature, eos_id, num_decodes=1, topk=0,
            max_decode_steps=None):
  """temperature_sample on the tiny model with the cache; returns (seqs, log_probs)."""
  cache, tokens_to_logits = _cached_decoder(params, num_decodes)
  return decoding.temperature_sample(
      inputs, cache, tokens_to_logits, eos_id, rng, num_decodes=num_decodes,
      temperature=temperature, topk=topk, max_decode_steps=max_decode_steps)


@jax.jit
def _token_log_probs(params, targets):
  """Teacher-forced log p(targets[b, t] | targets[b, <t]) [B, L], padding -> 0."""
  inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
  logits = MODEL.apply({'params': params}, ENC, inputs, targets, enable_dropout=False)
  lp = jax.nn.log_softmax(_ban_pad(logits))
  return jnp.take_along_axis(lp, targets[..., None], -1)[..., 0] * (targets > 0)


@jax.jit
def _logits(params, decoder_inputs):
  """Full forward logits [B, L, V]; targets only matter through padding, so all 1."""
  return MODEL.apply({'params': params}, ENC, decoder_inputs,
                     jnp.ones_like(decoder_inputs), enable_dropout=False)


def _greedy_by_hand(params, eos_id):
  """Greedy decoding by re-running the full model on the growing prefix."""
  seq = np.zeros((BATCH, LENGTH), np.int32)
  done = np.zeros(BATCH, bool)
  for t in range(LENGTH):
    inputs = np.pad(seq[:, :-1], ((0, 0), (1, 0)))
    nxt = np.asarray(jnp.argmax(_ban_pad(_logits(params, inputs)[:, t]), -1))
    seq[:, t] = np.where(done, 0, nxt)
    done |= nxt == eos_id
  return seq


def _greedy(params, eos_id=NO_EOS, inputs=None, **kw):
  inputs = jnp.zeros((BATCH, LENGTH), jnp.int32) if inputs is None else inputs
  return _sample(params, inputs, jax.random.PRNGKey(3), 0.0, eos_id, **kw)


def test_greedy_matches_full_forward_argmax(params):
  seqs, log_probs = _greedy(params)
  assert seqs.shape == (BATCH, 1, LENGTH) and log_probs.shape == (BATCH, 1)
  assert seqs.dtype == jnp.int32 and log_probs.dtype == jnp.float32
  np.testing.assert_array_equal(seqs[:, 0], _greedy_by_hand(params, NO_EOS))
  expected = _token_log_probs(params, seqs[:, 0]).sum(-1)
  np.testing.assert_allclose(log_probs[:, 0], expected, atol=1e-4, rtol=1e-5)


def test_eos_ends_sequence_and_zeroes_tail(params):
  free, _ = _greedy(params)
  # Stop on the token row 0 emits at step 2 (pick a step where it is new).
  t = next(t for t in range(1, LENGTH - 1) if free[0, 0, t] not in free[0, 0, :t])
  eos = int(free[0, 0, t])
  seqs, log_probs = _greedy(params, eos_id=eos)
  np.testing.assert_array_equal(seqs[:, 0], _greedy_by_hand(params, eos))
  np.testing.assert_array_equal(seqs[0, 0, :t + 1], free[0, 0, :t + 1])
  np.testing.assert_array_equal(seqs[0, 0, t + 1:], 0)
  # The EOS token is scored, nothing after it.
  expected = _token_log_probs(params, free[:, 0])[0, :t + 1].sum()
  np.testing.assert_allclose(log_probs[0, 0], expected, atol=1e-4, rtol=1e-5)


def test_sampled_log_probs_match_teacher_forcing(params):
  n = 3
  inputs = jnp.zeros((BATCH, LENGTH), jnp.int32)
  seqs, log_probs = _sample(params, inputs, jax.random.PRNGKey(1), 1.0, NO_EOS,
                            num_decodes=n)
  assert seqs.shape == (BATCH, n, LENGTH) and log_probs.shape == (BATCH, n)
  flat = seqs.reshape(BATCH * n, LENGTH)
  assert np.all(flat > 0)  # id 0 banned, no EOS -> full length
  # Each example's samples are scored against its own encoder input.
  for k in range(n):
    expected = _token_log_probs(params, seqs[:, k]).sum(-1)
    np.testing.assert_allclose(log_probs[:, k], expected, atol=1e-4, rtol=1e-5)
  assert np.all(np.diff(log_probs, axis=-1) >= 0)  # sorted ascending as in T5X
  assert len({tuple(r) for r in np.asarray(flat)}) > 1  # samples differ
  # Same rng -> same samples.
  again, _ = _sample(params, inputs, jax.random.PRNGKey(1), 1.0, NO_EOS, num_decodes=n)
  np.testing.assert_array_equal(again, seqs)


def test_topk1_sampling_equals_greedy(params):
  greedy, greedy_lp = _greedy(params)
  seqs, lp = _sample(params, jnp.zeros((BATCH, LENGTH), jnp.int32),
                     jax.random.PRNGKey(7), 1.0, NO_EOS, topk=1)
  np.testing.assert_array_equal(seqs, greedy)
  np.testing.assert_allclose(lp, greedy_lp, atol=1e-5)


def test_prompt_tokens_are_forced_and_not_scored(params):
  # Decoder prompt in the shifted convention: outputs 0 and 1 are forced.
  prompt = jnp.zeros((BATCH, LENGTH), jnp.int32).at[:, 1:3].set(
      jnp.array([[7, 8], [9, 10]]))
  seqs, log_probs = _greedy(params, inputs=prompt)
  np.testing.assert_array_equal(seqs[:, 0, :2], [[7, 8], [9, 10]])
  # The continuation is the greedy continuation of the prompt under the full model.
  seq = np.asarray(seqs[:, 0])
  for t in range(2, LENGTH):
    inputs = np.pad(seq[:, :-1], ((0, 0), (1, 0)))
    np.testing.assert_array_equal(
        seq[:, t], np.argmax(_ban_pad(_logits(params, inputs)[:, t]), -1))
  expected = _token_log_probs(params, seqs[:, 0])[:, 2:].sum(-1)
  np.testing.assert_allclose(log_probs[:, 0], expected, atol=1e-4, rtol=1e-5)


def test_max_decode_steps(params):
  seqs, log_probs = _greedy(params, max_decode_steps=3)
  free, _ = _greedy(params)
  np.testing.assert_array_equal(seqs[..., :3], free[..., :3])
  np.testing.assert_array_equal(seqs[..., 3:], 0)
  expected = _token_log_probs(params, free[:, 0])[:, :3].sum(-1)
  np.testing.assert_allclose(log_probs[:, 0], expected, atol=1e-4, rtol=1e-5)


def test_loop_stops_when_all_rows_end():
  """Fake model: at index i it prefers token i + 2, and EOS (1) at index 3."""
  calls = []
  vocab, eos = 16, 1

  def tokens_to_logits(state):
    jax.debug.callback(lambda: calls.append(1))
    favourite = jnp.where(state.cur_index == 3, eos, state.cur_index + 2)
    return 5.0 * jax.nn.one_hot(favourite, vocab), state.cache

  cache = {'layer': {'cached_key': jnp.zeros((2, 3)), 'cache_index': jnp.array(0)}}
  seqs, log_probs = jax.jit(lambda: decoding.temperature_sample(
      jnp.zeros((2, 10), jnp.int32), cache, tokens_to_logits, eos,
      temperature=0.0))()
  np.testing.assert_array_equal(seqs[:, 0], [[2, 3, 4, 1, 0, 0, 0, 0, 0, 0]] * 2)
  step_lp = 5.0 - np.log(np.exp(5.0) + vocab - 1)
  np.testing.assert_allclose(log_probs[:, 0], 4 * step_lp, rtol=1e-6)
  assert len(calls) == 4
  # Scored under the (greedy, point-mass) sampling distribution instead: 0.
  _, rescaled = decoding.temperature_sample(
      jnp.zeros((2, 10), jnp.int32), cache, tokens_to_logits, eos,
      temperature=0.0, rescale_log_probs=True)
  np.testing.assert_array_equal(rescaled, 0.0)


def test_top_k_and_top_p_masks():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = lambda masked: (np.asarray(masked) > decoding.NEG_INF / 2).astype(int).tolist()
  assert kept(decoding._top_k_mask(logits, 2)) == [[1, 1, 0, 0, 0]]
  assert kept(decoding._top_p_mask(logits, 0.5)) == [[1, 0, 0, 0, 0]]
  assert kept(decoding._top_p_mask(logits, 0.6)) == [[1, 1, 0, 0, 0]]
  assert kept(decoding._top_p_mask(logits, 0.86)) == [[1, 1, 1, 1, 0]]
  assert kept(decoding._top_p_mask(logits, 1.0)) == [[1, 1, 1, 1, 1]]
  assert kept(decoding._top_p_mask(logits[:, ::-1], 0.6)) == [[0, 0, 0, 1, 1]]


def test_cache_batch_repeat():
  cache = {'a': {'cached_key': jnp.arange(6).reshape(2, 3),
                 'cache_index': jnp.array(4)}}
  out = decoding.cache_batch_repeat(cache, 3)
  np.testing.assert_array_equal(out['a']['cached_key'][:, 0], [0, 0, 0, 3, 3, 3])
  assert out['a']['cache_index'].shape == () and int(out['a']['cache_index']) == 4


@functools.partial(jax.jit, static_argnames=('num_decodes',))
def _beam(params, eos_id, alpha, num_decodes):
  cache, tokens_to_logits = _cached_decoder(params, num_decodes)
  return decoding.beam_search(jnp.zeros((BATCH, LENGTH), jnp.int32), cache,
                              tokens_to_logits, eos_id, num_decodes=num_decodes,
                              alpha=alpha)


def test_beam_search_on_model(params):
  greedy, greedy_lp = _greedy(params)
  one, one_score = _beam(params, NO_EOS, 0.0, 1)
  np.testing.assert_array_equal(one, greedy)
  np.testing.assert_allclose(one_score, greedy_lp, atol=1e-4, rtol=1e-5)

  # With an EOS the model does emit, scores are penalised teacher-forced log-probs.
  eos = int(greedy[0, 0, 2])
  seqs, scores = _beam(params, eos, 0.6, 4)
  assert seqs.shape == (BATCH, 4, LENGTH)
  assert np.all(np.diff(scores, axis=-1) >= 0)
  for k in range(4):
    lengths = np.where((seqs[:, k] == eos).any(-1), np.argmax(seqs[:, k] == eos, -1) + 1, LENGTH)
    np.testing.assert_array_equal(seqs[:, k] > 0, np.arange(LENGTH) < lengths[:, None])
    expected = _token_log_probs(params, seqs[:, k]).sum(-1) / decoding.brevity_penalty(0.6, lengths)
    np.testing.assert_allclose(scores[:, k], expected, atol=1e-4, rtol=1e-5)


def test_beam_search_is_exact_with_wide_beams():
  """Markov fake model, V=3 (EOS=1), L=3: 15 possible outputs, K=16 finds them all."""
  vocab, eos, length, alpha = 3, 1, 3, 0.6
  table = jax.random.normal(jax.random.PRNGKey(4), (length, vocab, vocab)) * 2.0

  def tokens_to_logits(state):
    return table[state.cur_index, state.cur_token[:, 0]], state.cache

  cache = {'cached_key': jnp.zeros((1, 2)), 'cache_index': jnp.array(0)}
  seqs, scores = decoding.beam_search(jnp.zeros((1, length), jnp.int32), cache,
                                      tokens_to_logits, eos, num_decodes=16,
                                      alpha=alpha)
  lp = np.asarray(jax.nn.log_softmax(table))
  best = {}
  for seq in np.ndindex(*(vocab,) * length):
    end = seq.index(eos) + 1 if eos in seq else length
    seq = seq[:end]
    prev = (0,) + seq[:-1]
    logp = sum(lp[t, prev[t], seq[t]] for t in range(end))
    best[seq] = logp / decoding.brevity_penalty(alpha, end)
  ranked = sorted(best.items(), key=lambda kv: kv[1])
  assert len(ranked) == 15 and scores[0, 0] == decoding.NEG_INF
  for j, (seq, score) in enumerate(ranked, start=1):
    np.testing.assert_array_equal(seqs[0, j], list(seq) + [0] * (length - len(seq)))
    np.testing.assert_allclose(scores[0, j], score, rtol=1e-5)
