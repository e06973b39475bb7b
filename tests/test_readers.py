"""Readers of the TL;DR files in their published schemas (spec/DATA.md)."""

import json
import logging
import os

import pytest

from slic_jax.data import readers
from slic_jax.data.readers import ComparisonExample, DataError, SftExample, SkipCounts


# ---------------------------------------------------------------------------
# Helpers writing rows in the real schemas.


def cmp_row(post_id="t3_a", split="train", choice=1, texts=(" first", " second"),
            post="my post", title="a title", subreddit="relationships", extra=None):
  info = {"post": post, "title": title, "subreddit": subreddit}
  if post_id is not None:
    info["id"] = post_id
  return {
      "info": info,
      "summaries": [{"text": t, "policy": "ref", "note": None} for t in texts],
      "choice": choice, "worker": "w1", "batch": "batch3", "split": split,
      "extra": {"confidence": 8} if extra is None else extra,
  }


def cnndm_row(split="valid2"):
  return {
      "info": {"id": "cnn_1", "article": "( cnn ) text", "title": "t", "site": "cnn"},
      "summaries": [{"text": " a", "policy": "ref", "note": None},
                    {"text": " b", "policy": "x", "note": None}],
      "choice": 0, "worker": "w", "batch": "batch9", "split": split, "extra": {},
  }


def sft_row(post_id="t3_a", summary=" a summary", post="my post"):
  return {"id": post_id, "subreddit": "relationships", "title": "a title",
          "post": post, "summary": summary}


def write_lines(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    for line in lines:
      if isinstance(line, (dict, list, int, str)) and not isinstance(line, bytes):
        line = line if isinstance(line, str) else json.dumps(line)
        line = line.encode("utf-8")
      f.write(line + b"\n")
  return path


# ---------------------------------------------------------------------------
# Comparisons: OpenAI schema.


def test_comparison_files_order_and_exclusions(tmp_path):
  d = tmp_path / "data"
  for name in ["batch10.json", "batch3.json", "batch22.json", "batch0_cnndm.json",
               "cnndm0.json", "cnndm2.json", "edit_b2_eval_test.json"]:
    write_lines(str(d / "comparisons" / name), [cmp_row()])
  files = readers.comparison_files(str(d))
  assert [os.path.basename(f) for f in files] == [
      "batch3.json", "batch10.json", "batch22.json"]


def test_read_comparisons_values_and_split_filter(tmp_path):
  d = tmp_path / "data"
  write_lines(str(d / "comparisons" / "batch3.json"), [
      cmp_row("t3_a", "train", choice=1, texts=(" worse", " better")),
      "",  # blank lines are skipped
      cmp_row("t3_b", "valid1", choice=0),
      cnndm_row("valid2"),
      cmp_row(None, "valid2", choice=0, texts=(" keep ", " drop"), extra={}),
  ])
  write_lines(str(d / "comparisons" / "batch4.json"), [cmp_row("t3_c", "train", 0)])

  train = list(readers.read_comparisons(str(d), "train"))
  assert train == [
      ComparisonExample(id="t3_a", subreddit="relationships", title="a title",
                        post="my post", prompt="", chosen="better", rejected="worse",
                        split="train"),
      ComparisonExample(id="t3_c", subreddit="relationships", title="a title",
                        post="my post", prompt="", chosen="first", rejected="second",
                        split="train"),
  ]
  assert [e.id for e in readers.read_comparisons(str(d), "validation")] == ["t3_b"]
  assert [e.id for e in readers.read_comparisons(str(d), "valid1")] == ["t3_b"]
  counts = SkipCounts()
  test = list(readers.read_comparisons(str(d), "test", counts=counts))
  # info.id missing -> ''; extra {} is fine; the CNN/DM row is counted, not an error.
  assert [(e.id, e.chosen, e.rejected, e.split) for e in test] == [
      ("", "keep", "drop", "valid2")]
  assert counts == {"cnndm": 1}
  assert [e.id for e in readers.read_comparisons(str(d), "valid2")] == [""]
  with pytest.raises(ValueError, match="unknown comparison split"):
    readers.read_comparisons(str(d), "dev")


def _bad_case(tmp_path, bad_line):
  path = write_lines(str(tmp_path / "d" / "comparisons" / "batch3.json"),
                     [cmp_row("t3_ok"), bad_line])
  return str(tmp_path / "d"), path


def _with(**changes):
  row = cmp_row("t3_bad")
  for k, v in changes.items():
    if k == "drop_post":
      del row["info"]["post"]
    else:
      row[k] = v
  return row


BAD_CASES = [
    # (bad line, expected substrings after "{path}:2: ", skip reason)
    (b'{"info": {"post": "x"', ["malformed JSON"], "malformed_json"),
    (b'{"info": \xff\xfe}', ["invalid UTF-8"], "invalid_utf8"),
    (_with(drop_post=True), ["field 'info.post'", "missing"], "missing_field"),
    (_with(choice=2), ["field 'choice': expected 0 or 1, got 2"], "invalid_value"),
    (_with(choice="1"), ["field 'choice'", "expected 0 or 1", "'1' (a string)"],
     "wrong_type"),
    (_with(choice=True), ["field 'choice'", "boolean"], "wrong_type"),
    (_with(summaries=[{"text": " a"}, {"text": "   "}]),
     ["field 'summaries[1].text'", "non-empty"], "empty_summary"),
    (_with(summaries=[{"text": " a"}]), ["field 'summaries'", "list of 2"],
     "invalid_value"),
    (_with(info="not an object"), ["field 'info'", "JSON object"], "wrong_type"),
    ([1, 2], ["JSON object"], "not_an_object"),
    ({"foo": 1}, ["unknown comparison schema"], "unknown_schema"),
]


@pytest.mark.parametrize("bad_line,expected,reason", BAD_CASES)
def test_comparison_errors_name_file_line_field(tmp_path, bad_line, expected, reason):
  d, path = _bad_case(tmp_path, bad_line)
  with pytest.raises(DataError) as ei:
    list(readers.read_comparisons(d, "train"))
  msg = str(ei.value)
  assert msg.startswith(f"{path}:2: "), msg
  for s in expected:
    assert s in msg, msg
  assert ei.value.line == 2 and ei.value.path == path
  assert ei.value.reason == reason
  # The same file with on_error='skip': the good row survives, the bad one is counted.
  counts = SkipCounts()
  rows = list(readers.read_comparisons(d, "train", on_error="skip", counts=counts))
  assert [r.id for r in rows] == ["t3_ok"]
  assert counts == {reason: 1}


def test_choice_error_message_exact(tmp_path):
  d, path = _bad_case(tmp_path, _with(choice=2))
  with pytest.raises(DataError) as ei:
    list(readers.read_comparisons(d, "train"))
  assert str(ei.value) == f"{path}:2: field 'choice': expected 0 or 1, got 2"
  assert ei.value.field == "choice"


def test_skip_counts_per_reason_and_log(tmp_path, caplog):
  d = tmp_path / "d"
  path = write_lines(str(d / "comparisons" / "batch5.json"), [
      cmp_row("t3_1"),
      _with(choice=2),
      _with(choice=3),
      b"{not json",
      cnndm_row("train"),
      _with(summaries=[{"text": ""}, {"text": "x"}]),
      cmp_row("t3_2"),
  ])
  counts = SkipCounts()
  with caplog.at_level(logging.INFO):
    rows = list(readers.read_comparisons(str(d), "train", on_error="skip",
                                         counts=counts))
  assert [r.id for r in rows] == ["t3_1", "t3_2"]
  assert dict(counts) == {"invalid_value": 2, "malformed_json": 1, "cnndm": 1,
                          "empty_summary": 1}
  assert counts.total_skipped == 5
  summary = [r.getMessage() for r in caplog.records if path in r.getMessage()]
  assert len(summary) == 1, [r.getMessage() for r in caplog.records]
  assert "read 2 comparison rows, skipped 5" in summary[0]
  assert "invalid_value=2" in summary[0] and "cnndm=1" in summary[0]


def test_bad_on_error_value(tmp_path):
  with pytest.raises(ValueError, match="on_error"):
    readers.read_comparisons(str(tmp_path), "train", on_error="ignore")


def test_missing_dir_and_files(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope"):
    readers.comparison_files(missing)
  with pytest.raises(FileNotFoundError, match="nope"):
    readers.read_comparisons(missing, "train")
  with pytest.raises(FileNotFoundError, match="nope"):
    readers.read_sft(missing, "train")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError) as ei:
    readers.comparison_files(str(empty), "validation")
  msg = str(ei.value)
  assert os.path.join(str(empty), "comparisons", "batch*.json") in msg
  assert os.path.join(str(empty), "preference", "validation.jsonl") in msg
  with pytest.raises(FileNotFoundError) as ei:
    readers.sft_files(str(empty), "validation")
  assert os.path.join(str(empty), "tldr_3_filtered", "valid.jsonl") in str(ei.value)


# ---------------------------------------------------------------------------
# Comparisons: prompt/chosen/rejected mirror.


def test_preference_mirror(tmp_path):
  d = tmp_path / "d"
  write_lines(str(d / "preference" / "train.jsonl"), [
      {"prompt": "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: p\n\nTL;DR:",
       "chosen": " good", "rejected": " bad"},
  ])
  write_lines(str(d / "preference" / "validation.jsonl"), [
      {"prompt": "P2", "chosen": "c2", "rejected": "r2"},
      {"prompt": "P3", "chosen": "c3", "rejected": ""},
  ])
  assert [os.path.basename(f) for f in readers.comparison_files(str(d))] == [
      "train.jsonl", "validation.jsonl"]
  (ex,) = readers.read_comparisons(str(d), "train")
  assert ex == ComparisonExample(
      id="", subreddit="", title="", post="",
      prompt="SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: p\n\nTL;DR:",
      chosen="good", rejected="bad", split="train")
  with pytest.raises(DataError, match=r"validation.jsonl:2: field 'rejected'"):
    list(readers.read_comparisons(str(d), "validation"))
  counts = SkipCounts()
  rows = list(readers.read_comparisons(str(d), "valid1", on_error="skip", counts=counts))
  assert [(r.prompt, r.split) for r in rows] == [("P2", "valid1")]
  assert counts == {"empty_summary": 1}
  with pytest.raises(FileNotFoundError, match="test.jsonl"):
    readers.read_comparisons(str(d), "test")


# ---------------------------------------------------------------------------
# SFT rows.


def test_read_sft_schemas(tmp_path):
  d = tmp_path / "d"
  write_lines(str(d / "tldr_3_filtered" / "valid.jsonl"), [
      sft_row("t3_x", " the summary "),
      {"prompt": "PROMPT A", "completion": " comp"},
      {"prompt": "PROMPT B", "label": "lab"},
  ])
  rows = list(readers.read_sft(str(d), "validation"))
  assert rows == [
      SftExample(id="t3_x", subreddit="relationships", title="a title",
                 post="my post", prompt="", summary="the summary"),
      SftExample(id="", subreddit="", title="", post="", prompt="PROMPT A",
                 summary="comp"),
      SftExample(id="", subreddit="", title="", post="", prompt="PROMPT B",
                 summary="lab"),
  ]
  assert readers.sft_files(str(d), "validation") == [
      os.path.join(str(d), "tldr_3_filtered", "valid.jsonl")]
  with pytest.raises(FileNotFoundError, match="train.jsonl"):
    readers.read_sft(str(d), "train")


@pytest.mark.parametrize("bad,expected,reason", [
    (sft_row(summary="  "), "field 'summary': expected a non-empty summary",
     "empty_summary"),
    ({"id": "t3_b", "subreddit": "s", "post": "p", "summary": "s"},
     "field 'title': expected a string, but the field is missing", "missing_field"),
    ({"prompt": "P", "completion": ""}, "field 'completion'", "empty_summary"),
    ({"prompt": "P"}, "field 'completion'", "missing_field"),
    (dict(sft_row(), post=3), "field 'post': expected a string, got 3", "wrong_type"),
])
def test_sft_errors(tmp_path, bad, expected, reason):
  d = tmp_path / "d"
  path = write_lines(str(d / "tldr_3_filtered" / "train.jsonl"), [sft_row(), bad])
  with pytest.raises(DataError) as ei:
    list(readers.read_sft(str(d), "train"))
  assert str(ei.value).startswith(f"{path}:2: {expected}"), str(ei.value)
  counts = SkipCounts()
  assert len(list(readers.read_sft(str(d), "train", "skip", counts=counts))) == 1
  assert counts == {reason: 1}


def test_data_error_is_value_error_and_picklable():
  import pickle
  e = DataError("/x/f.json", 3, "choice", "expected 0 or 1, got 2")
  assert isinstance(e, ValueError)
  e2 = pickle.loads(pickle.dumps(e))
  assert str(e2) == str(e) == "/x/f.json:3: field 'choice': expected 0 or 1, got 2"


def test_chunked_reading_keeps_line_numbers(tmp_path, monkeypatch):
  monkeypatch.setattr(readers, "_CHUNK_BYTES", 7)  # lines span many chunks
  path = str(tmp_path / "d" / "comparisons" / "batch3.json")
  os.makedirs(os.path.dirname(path))
  with open(path, "wb") as f:
    f.write(json.dumps(cmp_row("t3_1")).encode() + b"\r\n\n")
    f.write(json.dumps(cmp_row("t3_2")).encode() + b"\n")
    f.write(json.dumps(_with(choice=2)).encode())  # line 4, no final newline
  with pytest.raises(DataError, match=r"batch3.json:4: field 'choice'"):
    list(readers.read_comparisons(str(tmp_path / "d"), "train"))
  rows = list(readers.read_comparisons(str(tmp_path / "d"), "train", on_error="skip"))
  assert [r.id for r in rows] == ["t3_1", "t3_2"]
