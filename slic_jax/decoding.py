"""Autoregressive sampling (temperature / top-k / top-p) and beam search with a KV cache.

Follows the calling convention of `t5x.decoding.temperature_sample` (no prompt
prefill): the caller passes the decoder prompt `inputs` [B, L] (targets shifted
right, so inputs[:, 0] is the BOS 0 and is ignored; zeros elsewhere are
positions to generate), the *unexpanded* cache of the model for batch B, and a
`tokens_to_logits(DecodingState) -> (logits [B*n, V], new_cache)` function.
With `num_decodes = n > 1`, batch row b is repeated n times in place
([b0, b0, b1, b1, ...], i.e. `jnp.repeat(x, n, axis=0)`): the cache is expanded
here, while `tokens_to_logits` must close over encoder outputs expanded the
same way (`batch_repeat`).
"""

from typing import Any, Callable, Optional, Tuple

import flax
import jax
from jax import lax
import jax.numpy as jnp

# Temperatures at or below this value mean greedy decoding.
MIN_TEMPERATURE = 1e-4
# Logit given to tokens excluded by top-k / top-p.
NEG_INF = -1.0e7


@flax.struct.dataclass
class DecodingState:
  """What `tokens_to_logits` sees at each step (as T5X's `DecodingState`).

  Attributes:
    cur_index: [B*n] int32 position of `cur_token` in the sequence (0 = BOS).
    sequences: [B*n, L+1] tokens so far: BOS, then prompt/generated tokens.
    cur_token: [B*n, 1] int32 token to feed the decoder now.
    cache: the model's cache pytree for batch B*n.
  """

  cur_index: jnp.ndarray
  sequences: jnp.ndarray
  cur_token: jnp.ndarray
  cache: Any


def batch_repeat(x: jnp.ndarray, n: int) -> jnp.ndarray:
  """[B, ...] -> [B*n, ...], each row repeated n times in place."""
  return jnp.repeat(x, n, axis=0)


def cache_batch_repeat(cache, n: int):
  """Repeats every batched cache leaf n times along axis 0 (see `batch_repeat`).

  Scalar leaves (the shared `cache_index`) are left as they are.
  """
  return jax.tree.map(lambda x: batch_repeat(x, n) if x.ndim else x, cache)


def _top_k_mask(logits: jnp.ndarray, k: int) -> jnp.ndarray:
  """Keeps logits >= the k-th largest per row, others -> NEG_INF. [N, V] -> [N, V]."""
  kth = lax.top_k(logits, k)[0][:, -1:]
  return jnp.where(logits >= kth, logits, NEG_INF)


def _top_p_mask(logits: jnp.ndarray, p: float) -> jnp.ndarray:
  """Nucleus filter: keeps the smallest set of most likely tokens with mass >= p.

  A token is kept when the probability mass of the tokens strictly more likely
  than it is < p (so the most likely token is always kept). [N, V] -> [N, V].
  """
  sorted_logits = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  threshold = jnp.min(jnp.where(mass_before < p, sorted_logits, jnp.inf),
                      axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, NEG_INF)


def temperature_sample(
    inputs: jnp.ndarray,
    cache: Any,
    tokens_to_logits: Callable[[DecodingState], Tuple[jnp.ndarray, Any]],
    eos_id: int,
    decode_rng: Optional[jax.Array] = None,
    num_decodes: int = 1,
    temperature: float = 1.0,
    topk: int = 0,
    topp: float = 0.0,
    max_decode_steps: Optional[int] = None,
    rescale_log_probs: bool = False,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Samples `num_decodes` continuations per example, one token per step.

  At step i the decoder reads token s_i (s_0 = 0) and the next token is
    s_{i+1} = inputs[:, i+1]                         if that prompt token is non-zero,
              argmax(logits)                          if temperature <= 1e-4,
              ~ softmax(filter(logits / temperature)) otherwise,
  where filter keeps the top-k (topk > 0) and/or the top-p nucleus (topp > 0).
  A row ends once it generates `eos_id` or has generated `max_decode_steps`
  tokens (or reaches length L); later positions are 0. The loop is a
  `lax.while_loop` that stops when every row has ended, so this jits.

  Args:
    inputs: [B, L] int32 decoder prompt, targets-shifted-right convention:
      inputs[:, 0] ignored; non-zero inputs[:, j] (j >= 1) is forced as output
      token j-1. All zeros for plain decoding.
    cache: the model cache for batch B (cache index 0).
    tokens_to_logits: DecodingState -> (logits [B*n, V], new cache).
    eos_id: end-of-sequence id.
    decode_rng: PRNG key (default PRNGKey(0)).
    num_decodes: n, samples per example.
    temperature: sampling temperature; 0 means greedy.
    topk: if > 0 sample only among the k most likely tokens.
    topp: if > 0 sample only within the top-p nucleus.
    max_decode_steps: cap on generated (non-prompt) tokens per row.
    rescale_log_probs: score tokens under the sampling distribution (after
      temperature and filters, T5X's default; greedy tokens then score 0)
      instead of the model's own distribution log_softmax(logits) (default).

  Returns:
    sequences [B, n, L] int32 (output token j at [:, :, j], prompt included) and
    log_probs [B, n] float32, the sum over generated tokens up to and including
    EOS of log p(token | prefix); prompt tokens are not scored. Like T5X the n
    decodes of each example are sorted by increasing log_prob.
  """
  batch, length = inputs.shape
  decode_rng = jax.random.PRNGKey(0) if decode_rng is None else decode_rng
  if num_decodes > 1:
    inputs = batch_repeat(inputs, num_decodes)
    cache = cache_batch_repeat(cache, num_decodes)
  cache = flax.core.unfreeze(cache)  # the loop carry must keep one pytree type
  rows = inputs.shape[0]
  # [B*n, L+1]: position 0 is the BOS 0, position j+1 holds output token j.
  sequences0 = jnp.concatenate(
      [jnp.zeros((rows, 1), jnp.int32), inputs[:, 1:].astype(jnp.int32),
       jnp.zeros((rows, 1), jnp.int32)], axis=1)
  # [B*n] output tokens each row may hold: its prompt tokens + max_decode_steps.
  max_len = jnp.full((rows,), length, jnp.int32)
  if max_decode_steps is not None:
    max_len = jnp.minimum(max_len, jnp.sum(inputs[:, 1:] != 0, axis=1) + max_decode_steps)
  temperature = jnp.asarray(temperature, jnp.float32)

  def cond_fn(carry):
    i, _, _, ended, _, _ = carry
    return (i < length) & ~jnp.all(ended)

  def body_fn(carry):
    i, sequences, cache, ended, rng, log_prob = carry
    rng, sample_rng = jax.random.split(rng)
    state = DecodingState(cur_index=jnp.full((rows,), i, jnp.int32),
                          sequences=sequences,
                          cur_token=sequences[:, i][:, None], cache=cache)
    logits, cache = tokens_to_logits(state)
    cache = flax.core.unfreeze(cache)
    logits = logits.astype(jnp.float32)  # [B*n, V]

    scaled = logits / jnp.maximum(temperature, MIN_TEMPERATURE)
    if topk:
      scaled = _top_k_mask(scaled, topk)
    if topp:
      scaled = _top_p_mask(scaled, topp)
    greedy = temperature <= MIN_TEMPERATURE
    token = jnp.where(greedy, jnp.argmax(logits, axis=-1),
                      jax.random.categorical(sample_rng, scaled)).astype(jnp.int32)

    prompt_token = sequences[:, i + 1]
    forced = prompt_token != 0
    token = jnp.where(forced, prompt_token, token)
    if rescale_log_probs:
      token_log_prob = jnp.where(
          greedy, 0.0, jnp.take_along_axis(jax.nn.log_softmax(scaled), token[:, None], -1)[:, 0])
    else:
      token_log_prob = jnp.take_along_axis(
          jax.nn.log_softmax(logits), token[:, None], -1)[:, 0]
    log_prob = log_prob + jnp.where(forced | ended, 0.0, token_log_prob)
    token = jnp.where(ended, 0, token)
    sequences = sequences.at[:, i + 1].set(token)
    ended = ended | (~forced & (token == eos_id)) | (i + 1 >= max_len)
    return i + 1, sequences, cache, ended, rng, log_prob

  init = (jnp.array(0, jnp.int32), sequences0, cache,
          jnp.zeros((rows,), bool), decode_rng, jnp.zeros((rows,), jnp.float32))
  _, sequences, _, _, _, log_prob = lax.while_loop(cond_fn, body_fn, init)

  sequences = sequences[:, 1:length + 1].reshape(batch, num_decodes, length)
  log_prob = log_prob.reshape(batch, num_decodes)
  order = jnp.argsort(log_prob, axis=-1)
  return (jnp.take_along_axis(sequences, order[:, :, None], axis=1),
          jnp.take_along_axis(log_prob, order, axis=1))


def brevity_penalty(alpha: float, length) -> jnp.ndarray:
  """GNMT length penalty ((5 + length) / 6) ** alpha (T5X's beam-search default)."""
  return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(x: jnp.ndarray, beam_indices: jnp.ndarray) -> jnp.ndarray:
  """x [B, K, ...], beam_indices [B, K'] -> x[b, beam_indices[b, k]] [B, K', ...]."""
  return jax.vmap(lambda xb, ib: xb[ib])(x, beam_indices)


def beam_search(
    inputs: jnp.ndarray,
    cache: Any,
    tokens_to_logits: Callable[[DecodingState], Tuple[jnp.ndarray, Any]],
    eos_id: int,
    decode_rng: Optional[jax.Array] = None,
    num_decodes: int = 4,
    alpha: float = 0.6,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Beam search with `num_decodes` = K beams and length penalty `alpha`.

  Each step extends every live beam by every token, keeps the 2K best
  extensions by log P(prefix), files those ending in `eos_id` (or reaching
  length L) as finished with score log P(y) / brevity_penalty(alpha, |y|), and
  keeps the K best others alive. The loop stops early once no live beam can
  beat the worst kept finished beam of its example (its log-prob can only
  fall, the penalty only grow up to length L).

  Args:
    inputs: [B, L] int32; only the shape is used (no decoder prompts).
    cache: the model cache for batch B, expanded here to B*K like
      `temperature_sample`; `tokens_to_logits` sees rows b*K + k.
    tokens_to_logits: DecodingState -> (logits [B*K, V], new cache).
    eos_id: end-of-sequence id.
    decode_rng: unused; accepted so callers can swap in `temperature_sample`.
    num_decodes: K, beam width (and number of returned decodes).
    alpha: length-penalty exponent; 0 ranks by plain log-prob.

  Returns:
    sequences [B, K, L] int32 (0 after EOS) and scores [B, K] float32, the
    length-penalised log-probs, sorted by increasing score (best last), as T5X.
    If fewer than K distinct sequences exist, the missing slots score NEG_INF.
  """
  del decode_rng
  batch, length = inputs.shape
  k = num_decodes
  cache = flax.core.unfreeze(cache_batch_repeat(cache, k))
  neg = jnp.full((batch, k), NEG_INF, jnp.float32)

  def flat_gather(tree, beam_indices):
    """Selects beams [B, K'] from every batched [B*K, ...] leaf."""
    rows = (jnp.arange(batch)[:, None] * k + beam_indices).reshape(-1)
    return jax.tree.map(lambda x: x[rows] if x.ndim else x, tree)

  def best_possible(state):
    """[B] best score any live beam could still reach."""
    return state['live_logp'][:, 0] / brevity_penalty(alpha, length)

  def cond_fn(state):
    worst_finished = jnp.min(state['fin_score'], axis=-1)
    improvable = best_possible(state) > worst_finished
    return (state['i'] < length) & jnp.any(improvable)

  def body_fn(state):
    i, seqs = state['i'], state['live_seqs']  # seqs [B, K, L+1]
    decoding_state = DecodingState(
        cur_index=jnp.full((batch * k,), i, jnp.int32),
        sequences=seqs.reshape(batch * k, length + 1),
        cur_token=seqs[:, :, i].reshape(batch * k, 1), cache=state['cache'])
    logits, new_cache = tokens_to_logits(decoding_state)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, -1)
    vocab = log_probs.shape[-1]
    # [B, K*V] candidates -> the 2K best.
    cand = (state['live_logp'][:, :, None] + log_probs).reshape(batch, k * vocab)
    top_logp, top_idx = lax.top_k(cand, 2 * k)
    src_beam, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = _gather_beams(seqs, src_beam).at[:, :, i + 1].set(token)

    valid = top_logp > NEG_INF / 2  # not an extension of an unused start beam
    ends = valid & ((token == eos_id) | (i + 1 == length))
    fin_score = jnp.where(ends, top_logp / brevity_penalty(alpha, i + 1), NEG_INF)
    all_seqs = jnp.concatenate([state['fin_seqs'], top_seqs], axis=1)
    all_scores = jnp.concatenate([state['fin_score'], fin_score], axis=1)
    fin_score, fin_idx = lax.top_k(all_scores, k)

    live_logp, live_idx = lax.top_k(jnp.where(ends, NEG_INF, top_logp), k)
    new_cache = flat_gather(flax.core.unfreeze(new_cache),
                            jnp.take_along_axis(src_beam, live_idx, axis=1))
    return dict(i=i + 1, live_seqs=_gather_beams(top_seqs, live_idx),
                live_logp=live_logp, fin_seqs=_gather_beams(all_seqs, fin_idx),
                fin_score=fin_score, cache=new_cache)

  seqs0 = jnp.zeros((batch, k, length + 1), jnp.int32)
  init = dict(i=jnp.array(0, jnp.int32), live_seqs=seqs0,
              # Only beam 0 is live at the start, so the first step expands one prefix.
              live_logp=neg.at[:, 0].set(0.0), fin_seqs=seqs0, fin_score=neg,
              cache=cache)
  final = lax.while_loop(cond_fn, body_fn, init)
  order = jnp.argsort(final['fin_score'], axis=-1)
  return (_gather_beams(final['fin_seqs'], order)[:, :, 1:],
          jnp.take_along_axis(final['fin_score'], order, axis=1))
