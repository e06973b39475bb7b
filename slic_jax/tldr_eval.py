"""Held-out TL;DR evaluation of trained runs against the synthetic world's oracle.

For each run (a MODEL_DIR with orbax checkpoints) it reports
  pair_accuracy   mean[log π(y+|x) > log π(y−|x)] on the 'test' (valid2) comparisons;
  oracle_win_rate P(oracle prefers the greedy summary over the human reference), ties ½,
                  on the SFT 'test' posts;
  oracle_score    mean oracle score of the greedy summaries (reference: `reference_score`);
  mean_words      mean summary length in words.
"""
from __future__ import annotations

import itertools
from typing import Mapping

import gin
import jax
import numpy as np

from slic_jax import checkpointing
from slic_jax import evaluation
from slic_jax import feature_converters
from slic_jax import input_pipeline


def model_from_gin(gin_file: str, bindings: tuple[str, ...] = ()):
  """Parses an experiment gin file (as `slic_jax.train` would) and builds ``%MODEL``."""
  from slic_jax import train as train_module

  gin.clear_config()
  train_module.parse_experiment([gin_file], bindings)
  return gin.query_parameter("%MODEL").scoped_configurable_fn()


def load_params(model, run_dir: str, input_shapes: Mapping[str, tuple[int, ...]]):
  """Latest params of a run, on the default device."""
  template = jax.eval_shape(
      lambda r: model.get_initial_variables(r, input_shapes)["params"], jax.random.PRNGKey(0))
  template = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), template)
  params, step = checkpointing.restore_params(run_dir, template)
  return params, step


def evaluate_runs(*, gin_file: str, data_dir: str, runs: Mapping[str, str],
                  eval_posts: int = 500, batch_size: int = 64) -> list[dict]:
  from slic_jax.data import oracle as oracle_lib
  from slic_jax.data import readers

  model = model_from_gin(gin_file)
  lengths = dict(gin.query_parameter("%TASK_FEATURE_LENGTHS"))
  li, lt = lengths["inputs"], lengths["targets"]
  pair_cfg = input_pipeline.DatasetConfig(
      mixture_or_task_name="tldr_comparisons", task_feature_lengths=lengths, split="test",
      batch_size=batch_size, shuffle=False, seed=0)
  pair_batches = [
      input_pipeline.pad_batch(b, batch_size)
      for b in input_pipeline.get_dataset(
          pair_cfg, feature_converters.PairEncDecFeatureConverter, num_epochs=1
      ).as_numpy_iterator()
  ]
  posts = list(itertools.islice(readers.read_sft(data_dir, "test"), eval_posts))
  enc = evaluation.encode_prompts(model.input_vocabulary, posts, max_input_tokens=li)
  oracle = oracle_lib.Oracle.load(data_dir)
  ids = [p.id for p in posts]
  refs = [p.summary for p in posts]
  ref_score = float(np.mean([oracle.score(i, r) for i, r in zip(ids, refs)]))

  rows = []
  shapes = {"encoder_input_tokens": (1, li), "decoder_input_tokens": (1, lt)}
  for name, run_dir in runs.items():
    params, step = load_params(model, run_dir, shapes)
    acc = evaluation.pair_accuracy(model, params, pair_batches)
    summaries = evaluation.decode_summaries(
        model, params, enc, max_target_tokens=lt, batch_size=batch_size,
        decoder_params={"temperature": 0.0})
    rows.append({
        "model": name,
        "step": step,
        "pair_accuracy": acc["pair_accuracy"],
        "num_pairs": acc["num_pairs"],
        "oracle_win_rate": oracle.win_rate(ids, summaries, refs),
        "oracle_score": float(np.mean([oracle.score(i, s) for i, s in zip(ids, summaries)])),
        "reference_score": ref_score,
        "mean_words": float(np.mean([len(s.split()) for s in summaries])),
        "num_posts": len(posts),
        "example": summaries[0],
    })
  return rows


def format_table(rows: list[dict]) -> str:
  head = ("| model | step | held-out pair accuracy | oracle win rate vs reference "
          "| oracle score (reference) | mean words |")
  lines = [head, "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['step']} | {r['pair_accuracy']:.3f} ({r['num_pairs']} pairs) "
        f"| {r['oracle_win_rate']:.3f} ({r['num_posts']} posts) "
        f"| {r['oracle_score']:.2f} ({r['reference_score']:.2f}) | {r['mean_words']:.1f} |")
  return "\n".join(lines)
