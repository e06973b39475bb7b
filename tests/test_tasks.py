"""Prompt format/fitting and the SeqIO TL;DR task registrations."""

import json
import os
import uuid

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from slic_jax.data import prompts
from slic_jax.feature_converters import PairEncDecFeatureConverter
import tasks.tldr as tldr

VOCAB = seqio.ByteVocabulary()
EOS = 1


def ws_count(s):
  return len(s.split())


# ---------------------------------------------------------------------------
# prompts.


def test_format_prompt_exact():
  assert prompts.format_prompt(subreddit="AskReddit", title="Why?", post="Because.") == (
      "SUBREDDIT: r/AskReddit\n\nTITLE: Why?\n\nPOST: Because.\n\nTL;DR:")


def test_fit_prompt_cuts_at_last_newlines_until_it_fits():
  post = "a b c\nd e  \n\nf g h\ni j k l"
  kw = dict(subreddit="s", title="t")
  full = prompts.format_prompt(post=post, **kw)
  # Fits: unchanged.
  assert prompts.fit_prompt(post=post, max_tokens=ws_count(full), count_tokens=ws_count,
                            **kw) == full
  # One token too many: the last line goes.
  assert prompts.fit_prompt(post=post, max_tokens=ws_count(full) - 1,
                            count_tokens=ws_count, **kw) == prompts.format_prompt(
                                post="a b c\nd e  \n\nf g h", **kw)
  # Cutting "f g h" leaves "a b c\nd e  \n" -> trailing whitespace stripped.
  budget = ws_count(prompts.format_prompt(post="a b c\nd e", **kw))
  assert prompts.fit_prompt(post=post, max_tokens=budget, count_tokens=ws_count,
                            **kw) == prompts.format_prompt(post="a b c\nd e", **kw)
  # Nothing fits: cut down to the first line, then returned as is (still too long).
  assert prompts.fit_prompt(post=post, max_tokens=1, count_tokens=ws_count,
                            **kw) == prompts.format_prompt(post="a b c", **kw)


def test_fit_prompt_without_newline_is_unchanged():
  p = prompts.fit_prompt(subreddit="s", title="t", post="one two three four",
                         max_tokens=2, count_tokens=ws_count)
  assert p == prompts.format_prompt(subreddit="s", title="t", post="one two three four")


def test_fit_formatted_prompt():
  full = prompts.format_prompt(subreddit="s", title="t", post="x y\nz w\nq")
  assert prompts.fit_formatted_prompt(prompt=full, max_tokens=100,
                                      count_tokens=ws_count) == full
  assert prompts.fit_formatted_prompt(
      prompt=full, max_tokens=ws_count(full) - 1, count_tokens=ws_count) == (
          prompts.format_prompt(subreddit="s", title="t", post="x y\nz w"))
  assert prompts.fit_formatted_prompt(prompt=full, max_tokens=1,
                                      count_tokens=ws_count) == (
      prompts.format_prompt(subreddit="s", title="t", post="x y"))
  # No POST ... TL;DR: section: unchanged.
  odd = "Summarize:\nline 1\nline 2"
  assert prompts.fit_formatted_prompt(prompt=odd, max_tokens=1,
                                      count_tokens=ws_count) == odd


# ---------------------------------------------------------------------------
# A small data directory in the real schemas.

LONG_POST = "line one here\nline two here\nline three is the longest of all"
FIT_POST = "line one here\nline two here"


def _cmp(post_id, split, choice, texts, post="short post", title="title"):
  info = {"post": post, "title": title, "subreddit": "sub"}
  if post_id is not None:
    info["id"] = post_id
  return {"info": info, "summaries": [{"text": t, "policy": "p", "note": None}
                                      for t in texts],
          "choice": choice, "worker": "w", "batch": "b", "split": split, "extra": {}}


def _write(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _sft(post_id, summary, post="short post"):
  return {"id": post_id, "subreddit": "sub", "title": "title", "post": post,
          "summary": summary}


@pytest.fixture
def data_dir(tmp_path):
  d = tmp_path / "tldr"
  _write(str(d / "tldr_3_filtered" / "train.jsonl"), [
      _sft("t3_a", " sft ref a"), _sft("t3_b", " sft ref b", post=LONG_POST)])
  _write(str(d / "tldr_3_filtered" / "valid.jsonl"), [_sft("t3_v", " sft ref v")])
  _write(str(d / "tldr_3_filtered" / "test.jsonl"), [_sft("t3_w", " sft ref w")])
  _write(str(d / "comparisons" / "batch3.json"), [
      _cmp("t3_a", "train", 1, [" worse a", " better a"]),
      _cmp("t3_unknown", "train", 0, [" kept u", " dropped u"], post="unseen post"),
      _cmp("t3_v", "valid1", 0, [" chosen v", " rejected v"]),
      _cmp("t3_w", "valid2", 1, [" rejected w", " chosen w"]),
      {"info": {"article": "cnn text", "title": "t", "site": "cnn"},
       "summaries": [{"text": " x"}, {"text": " y"}], "choice": 0, "split": "train"},
  ])
  _write(str(d / "comparisons" / "batch10.json"), [
      # id in the SFT set with the "t3_" prefix only there.
      _cmp("b", "train", 0, [" " + "c" * 40, " short"], post=LONG_POST),
  ])
  _write(str(d / "comparisons" / "cnndm0.json"), ["{this file is never read"])
  return str(d)


def _register(data_dir, **kw):
  suffix = "_test_" + uuid.uuid4().hex[:8]
  names = tldr.register_tldr_tasks(suffix=suffix, vocabulary=VOCAB, data_dir=data_dir,
                                   **kw)
  return names


def _enc(s):
  return list(VOCAB.encode(s))


def _strip0(row):
  row = list(row)
  while row and row[-1] == 0:
    row.pop()
  return row


def _inputs_len(post):
  return len(_enc(prompts.format_prompt(subreddit="sub", title="title", post=post))) + 1


# ---------------------------------------------------------------------------
# tldr_comparisons.


def test_comparisons_task_train(data_dir):
  names = _register(data_dir)
  assert names["comparisons"].startswith("tldr_comparisons_test_")
  task = seqio.get_mixture_or_task(names["comparisons"])
  assert task.output_features["targets"].rank == 2
  li = _inputs_len(FIT_POST)
  ds = task.get_dataset({"inputs": li, "targets": 16}, split="train", shuffle=False)
  assert ds.element_spec["targets"].shape.as_list() == [3, None]
  assert ds.element_spec["targets"].dtype == tf.int32
  out = list(ds.as_numpy_iterator())
  assert len(out) == 3  # the CNN/DM row is skipped

  ex = out[0]
  assert ex["targets"].shape[0] == 3
  assert _strip0(ex["targets"][0]) == _enc("better a") + [EOS]   # chosen
  assert _strip0(ex["targets"][1]) == _enc("worse a") + [EOS]    # rejected
  assert _strip0(ex["targets"][2]) == _enc("sft ref a") + [EOS]  # SFT reference
  prompt = prompts.format_prompt(subreddit="sub", title="title", post="short post")
  assert list(ex["inputs"]) == _enc(prompt) + [EOS]
  assert ex["inputs_pretokenized"].decode() == prompt
  assert [t.decode() for t in ex["targets_pretokenized"]] == [
      "better a", "worse a", "sft ref a"]

  # Unknown post id: the reference falls back to the chosen summary.
  assert _strip0(out[1]["targets"][2]) == _enc("kept u") + [EOS]

  # Long post: cut back at its last newline to fit `inputs` (EOS included);
  # long summary trimmed to Lt - 1 tokens + EOS; id "b" matched "t3_b".
  ex = out[2]
  fitted = prompts.format_prompt(subreddit="sub", title="title", post=FIT_POST)
  assert list(ex["inputs"]) == _enc(fitted) + [EOS]
  assert len(ex["inputs"]) == li
  assert list(ex["targets"][0]) == _enc("c" * 15) + [EOS]
  assert _strip0(ex["targets"][2]) == _enc("sft ref b") + [EOS]


def test_comparisons_task_splits_and_converter(data_dir):
  names = _register(data_dir)
  task = seqio.get_mixture_or_task(names["comparisons"])
  assert sorted(task.splits) == ["test", "train", "validation"]
  lengths = {"inputs": 128, "targets": 12}
  val = list(task.get_dataset(lengths, split="validation", shuffle=False)
             .as_numpy_iterator())
  assert [[_strip0(r) for r in e["targets"]] for e in val] == [
      [_enc("chosen v") + [EOS], _enc("rejected v") + [EOS], _enc("sft ref v") + [EOS]]]
  test = list(task.get_dataset(lengths, split="test", shuffle=False).as_numpy_iterator())
  assert [_strip0(e["targets"][0]) for e in test] == [_enc("chosen w") + [EOS]]

  ds = seqio.get_dataset(names["comparisons"], lengths, dataset_split="train",
                         shuffle=False,
                         feature_converter=PairEncDecFeatureConverter(pack=False))
  spec = ds.element_spec
  assert spec["encoder_input_tokens"].shape == (128,)
  assert spec["decoder_target_tokens"].shape == (3, 12)
  first = next(ds.as_numpy_iterator())
  np.testing.assert_array_equal(first["decoder_target_tokens"][0],
                                _enc("better a") + [EOS] + [0, 0, 0])
  np.testing.assert_array_equal(first["decoder_input_tokens"][0],
                                [0] + _enc("better a") + [EOS, 0, 0])
  np.testing.assert_array_equal(first["decoder_loss_weights"][2],
                                [1] * 10 + [0, 0])  # "sft ref a" + EOS


def test_reference_chosen_via_gin_and_shuffle(data_dir):
  names = _register(data_dir)
  task = seqio.get_mixture_or_task(names["comparisons"])
  scope = "slic_jax_tasks_test"
  with gin.unlock_config():
    gin.bind_parameter(f"{scope}/tldr.tldr_options.reference", "chosen")
  with gin.config_scope(scope):
    ds = task.get_dataset({"inputs": 128, "targets": 16}, split="train", shuffle=False)
  out = list(ds.as_numpy_iterator())
  assert _strip0(out[0]["targets"][2]) == _enc("better a") + [EOS]
  # Shuffled reading yields the same rows.
  ds = task.get_dataset({"inputs": 128, "targets": 16}, split="train", shuffle=True,
                        seed=3)
  got = sorted(bytes(e["targets_pretokenized"][0]) for e in ds.as_numpy_iterator())
  assert got == sorted([b"better a", b"kept u", b"c" * 40])


def test_bad_rows_raise_or_skip(data_dir, monkeypatch):
  path = os.path.join(data_dir, "comparisons", "batch3.json")
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(_cmp("t3_a", "train", 2, [" x", " y"])) + "\n")
  names = _register(data_dir)
  task = seqio.get_mixture_or_task(names["comparisons"])
  lengths = {"inputs": 128, "targets": 16}
  with pytest.raises(Exception, match=r"batch3.json:6: field 'choice'"):
    list(task.get_dataset(lengths, split="train", shuffle=False).as_numpy_iterator())
  monkeypatch.setattr(tldr, "tldr_options",
                      lambda: tldr.TldrOptions(on_error="skip", reference="sft"))
  out = list(task.get_dataset(lengths, split="train", shuffle=False).as_numpy_iterator())
  assert len(out) == 3


def test_preference_mirror_uses_sft_reference_by_prompt(tmp_path):
  d = tmp_path / "mirror"
  _write(str(d / "tldr_3_filtered" / "train.jsonl"), [
      _sft("t3_m", " sft ref m", post=LONG_POST)])
  full = prompts.format_prompt(subreddit="sub", title="title", post=LONG_POST)
  _write(str(d / "preference" / "train.jsonl"), [
      {"prompt": full, "chosen": " good", "rejected": " bad"},
      {"prompt": "no sections here", "chosen": " g2", "rejected": " b2"},
  ])
  names = _register(str(d))
  task = seqio.get_mixture_or_task(names["comparisons"])
  li = _inputs_len(FIT_POST)
  out = list(task.get_dataset({"inputs": li, "targets": 16}, split="train",
                              shuffle=False).as_numpy_iterator())
  fitted = prompts.format_prompt(subreddit="sub", title="title", post=FIT_POST)
  assert list(out[0]["inputs"]) == _enc(fitted) + [EOS]
  assert _strip0(out[0]["targets"][2]) == _enc("sft ref m") + [EOS]
  assert list(out[1]["inputs"]) == _enc("no sections here") + [EOS]
  assert _strip0(out[1]["targets"][2]) == _enc("g2") + [EOS]  # fallback


# ---------------------------------------------------------------------------
# tldr_sft.


def test_sft_task(data_dir):
  names = _register(data_dir)
  task = seqio.get_mixture_or_task(names["sft"])
  assert sorted(task.splits) == ["test", "train", "validation"]
  li = _inputs_len(FIT_POST)
  out = list(task.get_dataset({"inputs": li, "targets": 6}, split="train",
                              shuffle=False).as_numpy_iterator())
  assert len(out) == 2
  assert out[0]["targets"].ndim == 1
  assert list(out[0]["targets"]) == _enc("sft r") + [EOS]  # trimmed to Lt - 1 + EOS
  fitted = prompts.format_prompt(subreddit="sub", title="title", post=FIT_POST)
  assert list(out[1]["inputs"]) == _enc(fitted) + [EOS]
  val = list(task.get_dataset({"inputs": 256, "targets": 32}, split="validation",
                              shuffle=False).as_numpy_iterator())
  assert [list(e["targets"]) for e in val] == [_enc("sft ref v") + [EOS]]


def test_training_stream_starts_without_filling_a_buffer_from_many_passes(tmp_path, monkeypatch):
  """Training reads repeat forever and seqio shuffles after the repeat: a Task buffer
  larger than a small split is filled from pass after pass before the first example.
  Rows are shuffled at the source within each pass, so the Task's buffer is seqio's
  default (1000): 200 rows take 5 passes to fill it (+ what the prefetch reads ahead;
  10 in the first run), not 50."""
  d = tmp_path / "tldr"
  _write(str(d / "tldr_3_filtered" / "train.jsonl"),
         [_sft(f"t3_{i}", f" summary {i}") for i in range(200)])
  passes = []
  real = tldr.readers.read_sft_files
  monkeypatch.setattr(tldr.readers, "read_sft_files",
                      lambda *a, **k: (passes.append(1), real(*a, **k))[1])
  task = seqio.get_mixture_or_task(_register(str(d))["sft"])
  assert task.shuffle_buffer_size == tldr.TASK_SHUFFLE_BUFFER_SIZE == 1000
  ds = task.get_dataset({"inputs": 64, "targets": 8}, split="train", shuffle=True, seed=1,
                        num_epochs=None)
  first = [bytes(e["targets_pretokenized"]) for e in ds.take(200).as_numpy_iterator()]
  assert len(set(first)) > 100  # shuffled across the split, not a handful repeated
  assert 5 <= len(passes) < 25, len(passes)  # a 10_000 buffer: 50 before the first


# ---------------------------------------------------------------------------
# Registration and data directory.


def test_default_registrations_and_idempotent_reregistration(data_dir):
  names = seqio.TaskRegistry.names()
  for n in ("tldr_sft_t5", "tldr_comparisons_t5"):
    assert n in names
  t5_vocab = seqio.get_mixture_or_task("tldr_comparisons_t5").output_features[
      "targets"].vocabulary
  assert isinstance(t5_vocab, seqio.SentencePieceVocabulary)
  assert t5_vocab.sentencepiece_model_file == tldr.T5_SPM_PATH
  suffix = "_test_rereg"
  tldr.register_tldr_tasks(suffix=suffix, vocabulary=VOCAB, data_dir=data_dir)
  tldr.register_tldr_tasks(suffix=suffix, vocabulary=VOCAB, data_dir=data_dir)
  assert "tldr_comparisons" + suffix in seqio.TaskRegistry.names()


def test_tldr_data_dir(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="/nonexistent"):
    tldr.tldr_data_dir(path="/nonexistent")
  monkeypatch.setenv(tldr.ENV_DATA_DIR, str(tmp_path / "missing_env_dir"))
  with pytest.raises(FileNotFoundError, match="missing_env_dir"):
    tldr.tldr_data_dir()
  monkeypatch.setenv(tldr.ENV_DATA_DIR, str(tmp_path))
  assert tldr.tldr_data_dir() == str(tmp_path)
  assert tldr.tldr_data_dir(path=str(tmp_path)) == str(tmp_path)
  # Gin binding of the path.
  scope = "slic_jax_tasks_test_dir"
  with gin.unlock_config():
    gin.bind_parameter(f"{scope}/tldr.tldr_data_dir.path", "/nonexistent/gin/dir")
  with gin.config_scope(scope):
    with pytest.raises(FileNotFoundError, match="/nonexistent/gin/dir"):
      tldr.tldr_data_dir()


def test_missing_user_dir_fails_at_read_time(tmp_path):
  names = _register(str(tmp_path / "not_there"))
  task = seqio.get_mixture_or_task(names["sft"])
  with pytest.raises(FileNotFoundError, match="not_there"):
    task.get_dataset({"inputs": 64, "targets": 8}, split="train", shuffle=False)


def test_tldr_options_validation():
  assert tldr.tldr_options() == tldr.TldrOptions("raise", "sft", 10_000)
  with pytest.raises(ValueError, match="reference"):
    tldr.tldr_options(reference="best")
  with pytest.raises(ValueError, match="on_error"):
    tldr.tldr_options(on_error="ignore")
