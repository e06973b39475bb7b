"""SeqIO tasks for Reddit TL;DR: SFT and human comparisons (SLiC-HF direct).

Importing this module registers (idempotently):

* ``tldr_sft``: features ``inputs`` [Li], ``targets`` [Lt] (int32, rank 1);
  splits 'train', 'validation', 'test' (``tldr_3_filtered`` train/valid/test).
* ``tldr_comparisons``: features ``inputs`` [Li] and ``targets`` [3, Lt]
  whose rows are (chosen, rejected, reference); splits 'train',
  'validation' (= OpenAI valid1) and 'test' (= valid2). Feed it to the model
  with `slic_jax.feature_converters.PairEncDecFeatureConverter`.

both with the project's synthetic-world vocabulary
(`slic_jax.data.synthetic.default_vocabulary()`), and ``tldr_sft_t5`` /
``tldr_comparisons_t5`` with the standard T5 vocabulary
(gs://t5-data/vocabs/cc_all.32000, 100 extra ids), for real data.
`register_tldr_tasks(suffix=..., vocabulary=...)` registers the pair under
other names (tests use it with a ByteVocabulary).

Data directory (resolved when a dataset is built, not at import):
``tldr_data_dir(path)`` gin parameter (``tldr.tldr_data_dir.path``), else the
environment variable ``SLIC_JAX_TLDR_DIR``, else the synthetic world in
``~/.cache/slic_jax/synthetic_tldr`` (generated there on first use).
Behaviour options: ``tldr.tldr_options.on_error`` ('raise' | 'skip') and
``tldr.tldr_options.reference`` ('sft' | 'chosen') -- where the regulariser's
reference summary (targets row 2) comes from: 'sft' is the SFT summary of the
same post (matched by post id, else by the formatted prompt) from
``tldr_3_filtered``, falling back to the chosen summary when the post is
unknown (counted and logged); 'chosen' is the chosen summary.

Prompts: the original work's format (`slic_jax.data.prompts`), the post cut
back at newlines until the prompt, EOS included, fits
``sequence_length['inputs']`` tokens of the inputs vocabulary; a prompt that
still does not fit is truncated by the tokenizer trim. Every targets row is
trimmed to ``Lt - 1`` tokens and ends in EOS.

Note on rank-2 targets: seqio's final `Task` trim slices the FIRST dimension
of `targets` with an int ``sequence_length['targets']``; that is a no-op as
long as the number of rows (3) is at most Lt. The rows themselves are trimmed
by `append_eos_after_trim` (which slices the innermost axis).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import random
import shutil
import tempfile
from typing import Callable, Dict, Iterator, Mapping, Optional

from absl import logging
import gin
import seqio
import tensorflow as tf

from slic_jax.data import prompts
from slic_jax.data import readers

ENV_DATA_DIR = "SLIC_JAX_TLDR_DIR"
DEFAULT_SYNTHETIC_DIR = os.path.join("~", ".cache", "slic_jax", "synthetic_tldr")
T5_SPM_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
T5_EXTRA_IDS = 100

SFT_SPLITS = ("train", "validation", "test")
COMPARISON_SPLITS = ("train", "validation", "test")
REFERENCE_CHOICES = ("sft", "chosen")

SFT_TASK = "tldr_sft"
COMPARISONS_TASK = "tldr_comparisons"


# ---------------------------------------------------------------------------
# Gin-configurable options.


@gin.configurable(module="tldr")
def tldr_data_dir(path: Optional[str] = None) -> str:
  """The TL;DR data directory: `path`, else $SLIC_JAX_TLDR_DIR, else synthetic.

  The default synthetic world (``~/.cache/slic_jax/synthetic_tldr``) is
  generated on first use with ``slic_jax.data.synthetic.generate_world(path,
  seed=0)``. A given path (argument or environment) that does not exist raises
  FileNotFoundError naming it.
  """
  gfile = tf.io.gfile
  if path:
    path = os.path.expanduser(str(path))
    if not gfile.isdir(path):
      raise FileNotFoundError(
          f"TL;DR data directory not found: {path} (from tldr_data_dir(path=...)"
          " / gin tldr.tldr_data_dir.path)"
      )
    return path
  env = os.environ.get(ENV_DATA_DIR)
  if env:
    env = os.path.expanduser(env)
    if not gfile.isdir(env):
      raise FileNotFoundError(
          f"TL;DR data directory not found: {env} (from ${ENV_DATA_DIR})"
      )
    return env
  default = os.path.expanduser(DEFAULT_SYNTHETIC_DIR)
  if not os.path.isdir(default):
    _generate_synthetic(default)
  return default


def _generate_synthetic(target: str) -> None:
  """Generates the synthetic world into `target` atomically (tmp + rename)."""
  from slic_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  logging.info(
      "No TL;DR data directory given (tldr.tldr_data_dir.path or $%s); "
      "generating the synthetic world in %s (seed 0)", ENV_DATA_DIR, target,
  )
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".synthetic_tldr.", dir=parent)
  try:
    synthetic.generate_world(tmp, seed=0)
    try:
      os.rename(tmp, target)
    except OSError:
      if not os.path.isdir(target):  # not a lost race with another process
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class TldrOptions:
  on_error: str = "raise"
  reference: str = "sft"
  shuffle_buffer_size: int = 10_000


@gin.configurable(module="tldr")
def tldr_options(
    on_error: str = "raise",
    reference: str = "sft",
    shuffle_buffer_size: int = 10_000,
) -> TldrOptions:
  """Reading options for the TL;DR tasks.

  Args:
    on_error: 'raise' (default): a bad row raises readers.DataError naming
      file:line and field; 'skip': bad rows are dropped, counted per reason
      and logged at the end of every file pass.
    reference: the regulariser's reference summary (targets row 2) of
      tldr_comparisons: 'sft' (default; the SFT target of the same post, the
      paper's y_ref, falling back to the chosen summary -- counted and logged
      -- when the post is not in tldr_3_filtered) or 'chosen'.
    shuffle_buffer_size: rows shuffled at the source when shuffle_files.
  """
  if on_error not in readers.ON_ERROR_CHOICES:
    raise ValueError(
        f"tldr_options.on_error must be one of {readers.ON_ERROR_CHOICES}, "
        f"got {on_error!r}"
    )
  if reference not in REFERENCE_CHOICES:
    raise ValueError(
        f"tldr_options.reference must be one of {REFERENCE_CHOICES}, "
        f"got {reference!r}"
    )
  return TldrOptions(on_error, reference, int(shuffle_buffer_size))


# ---------------------------------------------------------------------------
# Sources.

_STRING = tf.TensorSpec(shape=(), dtype=tf.string)
_SFT_FIELDS = ("id", "subreddit", "title", "post", "prompt", "summary")
_CMP_FIELDS = (
    "id", "subreddit", "title", "post", "prompt", "chosen", "rejected",
    "reference",
)


def _resolve_dir(data_dir: Optional[str]) -> str:
  return tldr_data_dir(data_dir) if data_dir else tldr_data_dir()


def _shuffled(paths, shuffle: bool, seed: Optional[int]):
  paths = list(paths)
  if shuffle:
    random.Random(seed).shuffle(paths)
  return paths


def _from_rows(
    make_rows: Callable[[], Iterator[Mapping[str, str]]],
    fields,
    shuffle: bool,
    seed: Optional[int],
    buffer_size: int,
) -> tf.data.Dataset:
  def gen():
    for row in make_rows():
      yield {k: row[k].encode("utf-8") for k in fields}

  ds = tf.data.Dataset.from_generator(
      gen, output_signature={k: _STRING for k in fields}
  )
  if shuffle and buffer_size > 1:
    ds = ds.shuffle(buffer_size, seed=seed)
  return ds


def _sft_dataset_fn(
    split: str,
    shuffle_files: bool,
    seed: Optional[int] = None,
    *,
    data_dir: Optional[str] = None,
) -> tf.data.Dataset:
  opts = tldr_options()
  d = _resolve_dir(data_dir)
  files = _shuffled(readers.sft_files(d, split), shuffle_files, seed)

  def rows():
    for ex in readers.read_sft_files(files, on_error=opts.on_error):
      yield dataclasses.asdict(ex)

  return _from_rows(rows, _SFT_FIELDS, shuffle_files, seed,
                    opts.shuffle_buffer_size)


def _prompt_key(prompt: str) -> bytes:
  return hashlib.sha1(prompt.strip().encode("utf-8")).digest()


def _id_keys(id_: str):
  if not id_:
    return []
  bare = id_[3:] if id_.startswith("t3_") else id_
  return [id_, bare, "t3_" + bare]


def _example_prompt(ex) -> str:
  if ex.prompt:
    return ex.prompt
  return prompts.format_prompt(
      subreddit=ex.subreddit, title=ex.title, post=ex.post
  )


def _files_signature(files):
  sig = []
  for f in files:
    try:
      st = tf.io.gfile.stat(f)
      sig.append((f, st.length, st.mtime_nsec))
    except tf.errors.OpError:
      sig.append((f, -1, -1))
  return tuple(sig)


@functools.lru_cache(maxsize=4)
def _sft_index_cached(signature, on_error: str):
  by_id: Dict[str, str] = {}
  by_prompt: Dict[bytes, str] = {}
  files = [s[0] for s in signature]
  for ex in readers.read_sft_files(files, on_error=on_error):
    for k in _id_keys(ex.id):
      by_id.setdefault(k, ex.summary)
    by_prompt.setdefault(_prompt_key(_example_prompt(ex)), ex.summary)
  return by_id, by_prompt


def sft_reference_index(data_dir: str, on_error: str = "raise"):
  """(by_id, by_prompt_hash) -> SFT summary, over all SFT splits; or None."""
  files = []
  for split in SFT_SPLITS:
    try:
      files.extend(readers.sft_files(data_dir, split))
    except FileNotFoundError:
      pass
  if not files:
    return None
  return _sft_index_cached(_files_signature(files), on_error)


def _comparisons_dataset_fn(
    split: str,
    shuffle_files: bool,
    seed: Optional[int] = None,
    *,
    data_dir: Optional[str] = None,
) -> tf.data.Dataset:
  opts = tldr_options()
  readers.canonical_comparison_split(split)
  d = _resolve_dir(data_dir)
  files = _shuffled(readers.comparison_files(d, split), shuffle_files, seed)

  def rows():
    index = None
    if opts.reference == "sft":
      index = sft_reference_index(d, opts.on_error)
      if index is None:
        logging.warning(
            "tldr_comparisons[%s]: reference='sft' but no SFT files in %s; "
            "using the chosen summary as the reference for every row",
            split, d,
        )
    n_sft = n_fallback = 0
    for ex in readers.read_comparison_files(
        files, split, on_error=opts.on_error
    ):
      reference = None
      if index is not None:
        by_id, by_prompt = index
        for k in _id_keys(ex.id):
          if k in by_id:
            reference = by_id[k]
            break
        if reference is None:
          reference = by_prompt.get(_prompt_key(_example_prompt(ex)))
        if reference is None:
          n_fallback += 1
        else:
          n_sft += 1
      if reference is None:
        reference = ex.chosen
      row = dataclasses.asdict(ex)
      row["reference"] = reference
      yield row
    if opts.reference == "sft":
      log = logging.warning if n_fallback else logging.info
      log(
          "tldr_comparisons[%s]: reference = SFT summary for %d rows; post "
          "unknown in tldr_3_filtered, fell back to the chosen summary for "
          "%d rows", split, n_sft, n_fallback,
      )

  return _from_rows(rows, _CMP_FIELDS, shuffle_files, seed,
                    opts.shuffle_buffer_size)


# ---------------------------------------------------------------------------
# Preprocessors.


def _token_counter(feature: seqio.Feature) -> Callable[[str], int]:
  vocab = feature.vocabulary
  extra = 1 if feature.add_eos else 0
  return lambda s: len(vocab.encode(s)) + extra


def build_prompt(
    dataset: tf.data.Dataset,
    sequence_length: Optional[Mapping[str, int]],
    output_features: Mapping[str, seqio.Feature],
) -> tf.data.Dataset:
  """Adds `inputs`: the formatted prompt fitted to sequence_length['inputs'].

  Raw rows (empty `prompt`) are formatted from subreddit/title/post with
  prompts.fit_prompt; mirror rows (non-empty `prompt`) are fitted with
  prompts.fit_formatted_prompt. Tokens are counted with the `inputs`
  vocabulary, EOS included. Without a length the prompt is not cut.
  """
  max_tokens = None
  if sequence_length is not None:
    max_tokens = sequence_length.get("inputs")
  count = _token_counter(output_features["inputs"])

  def fit(subreddit, title, post, prompt):
    subreddit, title, post, prompt = (
        x.decode("utf-8") for x in (subreddit, title, post, prompt)
    )
    if prompt:
      if max_tokens is None:
        out = prompt
      else:
        out = prompts.fit_formatted_prompt(
            prompt=prompt, max_tokens=max_tokens, count_tokens=count
        )
    elif max_tokens is None:
      out = prompts.format_prompt(subreddit=subreddit, title=title, post=post)
    else:
      out = prompts.fit_prompt(
          subreddit=subreddit, title=title, post=post,
          max_tokens=max_tokens, count_tokens=count,
      )
    return out.encode("utf-8")

  @seqio.map_over_dataset
  def _map(ex):
    inputs = tf.numpy_function(
        fit,
        [ex["subreddit"], ex["title"], ex["post"], ex["prompt"]],
        tf.string,
        stateful=False,
    )
    inputs.set_shape([])
    out = dict(ex)
    out["inputs"] = inputs
    return out

  return _map(dataset)


@seqio.map_over_dataset
def sft_targets(ex):
  """Keeps `inputs`; `targets` = the SFT summary."""
  return {"inputs": ex["inputs"], "targets": ex["summary"]}


@seqio.map_over_dataset
def comparison_targets(ex):
  """Keeps `inputs`; `targets` = [chosen, rejected, reference] (strings)."""
  targets = tf.stack([ex["chosen"], ex["rejected"], ex["reference"]])
  targets.set_shape([3])
  return {"inputs": ex["inputs"], "targets": targets}


def tokenize_rows(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    copy_pretokenized: bool = True,
) -> tf.data.Dataset:
  """seqio.preprocessors.tokenize, also for rank-1 string features.

  A scalar string becomes int32 [L]; a string vector [n] becomes a ragged
  int32 [n, None] (each row encoded on its own, which every vocabulary
  supports; seqio.ByteVocabulary cannot encode a vector of strings of
  different lengths at once). No EOS is added here.
  """

  def encode(vocab, v):
    if v.shape.rank == 0:
      return vocab.encode_tf(v)
    return tf.map_fn(
        vocab.encode_tf, v,
        fn_output_signature=tf.RaggedTensorSpec([None], tf.int32),
    )

  @seqio.map_over_dataset
  def _map(ex):
    out = {}
    for k, v in ex.items():
      if k in output_features and v.dtype == tf.string:
        if copy_pretokenized:
          out[f"{k}_pretokenized"] = v
        v = encode(output_features[k].vocabulary, v)
        if v.dtype != tf.int32:
          v = tf.cast(v, tf.int32)
      out[k] = v
    return out

  return _map(dataset)


def densify_rows(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
) -> tf.data.Dataset:
  """Ragged rank-2 output features -> dense int32 [n, max_len], 0-padded."""

  @seqio.map_over_dataset
  def _map(ex):
    out = dict(ex)
    for k in output_features:
      v = ex.get(k)
      if isinstance(v, tf.RaggedTensor):
        out[k] = v.to_tensor(default_value=0)
    return out

  return _map(dataset)


# ---------------------------------------------------------------------------
# Registration.


def _output_features(vocabulary, targets_rank: int):
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True,
                              dtype=tf.int32),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True,
                               dtype=tf.int32, rank=targets_rank),
  }


# The Task's own shuffle buffer (seqio applies it after `repeat`, on tokenized examples).
# Rows are already shuffled at the source, within each pass over the files
# (`tldr_options.shuffle_buffer_size`, files in a seeded order), so this one only mixes
# across pass boundaries, and it is seqio's default size. A buffer larger than the split
# must be filled from several passes before the first batch: 10_000 on a 200-row train
# split tokenized 50 passes, about 24 s before a trainer's first step (session 20).
TASK_SHUFFLE_BUFFER_SIZE = seqio.SHUFFLE_BUFFER_SIZE


def _add(name, **kwargs):
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, **kwargs)


def register_tldr_tasks(
    *,
    suffix: str = "",
    vocabulary: seqio.Vocabulary,
    data_dir: Optional[str] = None,
) -> Dict[str, str]:
  """Registers tldr_sft{suffix} and tldr_comparisons{suffix}; re-registers.

  Args:
    suffix: appended to the task names.
    vocabulary: for both features.
    data_dir: fixed data directory; None resolves tldr_data_dir() (gin /
      $SLIC_JAX_TLDR_DIR / synthetic) whenever a dataset is built.

  Returns:
    {'sft': name, 'comparisons': name}.
  """
  sft_name = SFT_TASK + suffix
  cmp_name = COMPARISONS_TASK + suffix
  _add(
      sft_name,
      source=seqio.FunctionDataSource(
          dataset_fn=functools.partial(_sft_dataset_fn, data_dir=data_dir),
          splits=SFT_SPLITS,
      ),
      preprocessors=[
          build_prompt,
          sft_targets,
          tokenize_rows,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=_output_features(vocabulary, 1),
      shuffle_buffer_size=TASK_SHUFFLE_BUFFER_SIZE,
  )
  _add(
      cmp_name,
      source=seqio.FunctionDataSource(
          dataset_fn=functools.partial(
              _comparisons_dataset_fn, data_dir=data_dir
          ),
          splits=COMPARISON_SPLITS,
      ),
      preprocessors=[
          build_prompt,
          comparison_targets,
          tokenize_rows,
          seqio.preprocessors.append_eos_after_trim,
          densify_rows,
      ],
      output_features=_output_features(vocabulary, 2),
      shuffle_buffer_size=TASK_SHUFFLE_BUFFER_SIZE,
  )
  return {"sft": sft_name, "comparisons": cmp_name}


def t5_vocabulary() -> seqio.Vocabulary:
  """The standard T5 vocabulary (loaded lazily, on first use)."""
  return seqio.SentencePieceVocabulary(T5_SPM_PATH, extra_ids=T5_EXTRA_IDS)


def _register_defaults() -> None:
  try:
    from slic_jax.data import synthetic  # pylint: disable=g-import-not-at-top

    vocab = synthetic.default_vocabulary()
  except (ImportError, AttributeError, OSError) as e:
    logging.warning(
        "tasks.tldr: slic_jax.data.synthetic.default_vocabulary() is not "
        "available (%s); '%s' and '%s' are not registered",
        e, SFT_TASK, COMPARISONS_TASK,
    )
  else:
    register_tldr_tasks(suffix="", vocabulary=vocab)
  register_tldr_tasks(suffix="_t5", vocabulary=t5_vocabulary())


_register_defaults()
