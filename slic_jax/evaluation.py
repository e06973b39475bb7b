"""Held-out evaluation of a trained policy: pair accuracy and decoded summaries.

- `pair_accuracy`: over comparison batches (`PairEncDecFeatureConverter` features),
  the fraction of pairs with ``log π(y+|x) > log π(y−|x)``.
- `decode_summaries`: greedy (or sampled) summaries for prompts, as text, for an
  external judge (the synthetic world's oracle, or a ranker).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slic_jax.data import prompts


def pair_accuracy(model, params, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
  """Pair accuracy and mean margin over pair batches (rows with no chosen tokens are padding).

  Returns ``{'pair_accuracy', 'margin', 'num_pairs'}`` with
  ``pair_accuracy = mean[ log π(y+|x) > log π(y−|x) ]``.
  """
  score = jax.jit(model.score_batch)
  wins, margins, n = 0.0, 0.0, 0
  for batch in batches:
    logps = np.asarray(score(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    real = np.asarray(batch["decoder_target_tokens"])[:, 0].any(axis=-1)
    diff = (logps[:, 0] - logps[:, 1])[real]
    wins += float((diff > 0).sum())
    margins += float(diff.sum())
    n += int(real.sum())
  if n == 0:
    raise ValueError("pair_accuracy: no comparison pairs in the evaluation data")
  return {"pair_accuracy": wins / n, "margin": margins / n, "num_pairs": n}


def encode_prompts(
    vocabulary, examples: Sequence, *, max_input_tokens: int
) -> np.ndarray:
  """``[N, Li]`` int32 prompt tokens (+EOS), the post cut at newlines to fit (as the tasks do)."""
  count = lambda text: len(vocabulary.encode(text)) + 1
  rows = np.zeros((len(examples), max_input_tokens), np.int32)
  for i, ex in enumerate(examples):
    if ex.post:
      text = prompts.fit_prompt(subreddit=ex.subreddit, title=ex.title, post=ex.post,
                                max_tokens=max_input_tokens, count_tokens=count)
    else:
      text = prompts.fit_formatted_prompt(prompt=ex.prompt, max_tokens=max_input_tokens,
                                          count_tokens=count)
    ids = list(vocabulary.encode(text))[: max_input_tokens - 1] + [vocabulary.eos_id]
    rows[i, : len(ids)] = ids
  return rows


def decode_summaries(
    model, params, encoder_tokens: np.ndarray, *, max_target_tokens: int, batch_size: int = 64,
    decoder_params: Mapping | None = None, seed: int = 0,
) -> list[str]:
  """Decodes one summary per prompt row and returns the texts (EOS and padding dropped)."""
  predict = jax.jit(
      lambda p, b, r: model.predict_batch_with_aux(p, b, rng=r, decoder_params=decoder_params)[0]
  )
  vocab = model.output_vocabulary
  texts: list[str] = []
  n = encoder_tokens.shape[0]
  for start in range(0, n, batch_size):
    chunk = encoder_tokens[start:start + batch_size]
    real = chunk.shape[0]
    if real < batch_size:  # keep one compiled shape
      chunk = np.pad(chunk, [(0, batch_size - real), (0, 0)])
    batch = {
        "encoder_input_tokens": jnp.asarray(chunk),
        "decoder_input_tokens": jnp.zeros((batch_size, max_target_tokens), jnp.int32),
    }
    out = np.asarray(predict(params, batch, jax.random.PRNGKey(seed + start)))[:real]
    for row in out:
      ids = [int(t) for t in row]
      if vocab.eos_id in ids:
        ids = ids[: ids.index(vocab.eos_id)]
      texts.append(vocab.decode([t for t in ids if t > 0]))
  return texts
