"""Readers for the TL;DR data in its published schemas (see spec/DATA.md).

Two families of files are read:

* SFT rows. ``tldr_3_filtered/{train,valid,test}.jsonl`` with
  ``{id, subreddit, title, post, summary}``, or the common mirrors
  ``{prompt, completion}`` (trl-lib/tldr) and ``{prompt, label}`` (CarperAI),
  which may also sit in ``sft/{train,validation,test}.jsonl``.
  Each row becomes an :class:`SftExample`.
* Comparison rows. The OpenAI "summarize from feedback" files
  ``comparisons/batch*.json`` (one JSON object a line:
  ``{info{id?, post, title, subreddit}, summaries[2]{text, ...}, choice, split,
  extra?}``), or the mirror ``preference/{train,validation,test}.jsonl`` with
  ``{prompt, chosen, rejected}``. Each row becomes a
  :class:`ComparisonExample`. CNN/DM rows of the OpenAI files (``info`` has
  ``article`` and no ``post``) are skipped and counted under the reason
  ``'cnndm'``; they are never an error.

Files are read with ``tf.io.gfile`` (so ``gs://`` paths work), as bytes, one
line at a time; blank lines are skipped. Every problem raises a
:class:`DataError` whose message names the file, the 1-based line, the field
and what was expected, e.g.::

    /d/comparisons/batch3.json:17: field 'choice': expected 0 or 1, got 2

With ``on_error='skip'`` bad rows are dropped instead and counted per reason in
a :class:`SkipCounts`; a one-line summary is logged (absl) at the end of every
file pass, so skipping is never silent. Pass your own ``counts=SkipCounts()``
to the readers to get the totals back.

Text fields are returned as read, except summaries (``summary``, ``chosen``,
``rejected``), which are stripped of surrounding whitespace (the OpenAI texts
start with a space).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import posixpath
import re
from typing import Any, Callable, Iterable, Iterator, List, Mapping, Optional

from absl import logging

__all__ = [
    "DataError",
    "SkipCounts",
    "SftExample",
    "ComparisonExample",
    "ON_ERROR_CHOICES",
    "SFT_SPLITS",
    "COMPARISON_SPLITS",
    "canonical_comparison_split",
    "sft_files",
    "comparison_files",
    "iter_jsonl",
    "parse_sft_row",
    "parse_comparison_row",
    "read_sft",
    "read_sft_files",
    "read_comparisons",
    "read_comparison_files",
]

ON_ERROR_CHOICES = ("raise", "skip")

# Skip reasons (the keys of SkipCounts).
REASON_INVALID_UTF8 = "invalid_utf8"
REASON_MALFORMED_JSON = "malformed_json"
REASON_NOT_AN_OBJECT = "not_an_object"
REASON_UNKNOWN_SCHEMA = "unknown_schema"
REASON_MISSING_FIELD = "missing_field"
REASON_WRONG_TYPE = "wrong_type"
REASON_INVALID_VALUE = "invalid_value"
REASON_EMPTY_SUMMARY = "empty_summary"
REASON_CNNDM = "cnndm"

# SFT split name -> file stems tried, in order.
SFT_SPLITS: Mapping[str, str] = {
    "train": "train",
    "validation": "valid",
    "valid": "valid",
    "test": "test",
}
_SFT_MIRROR_STEMS = {"train": "train", "valid": "validation", "test": "test"}

# Comparison split name -> the OpenAI `split` field value.
COMPARISON_SPLITS: Mapping[str, str] = {
    "train": "train",
    "validation": "valid1",
    "valid1": "valid1",
    "test": "valid2",
    "valid2": "valid2",
}
# OpenAI split value -> mirror file stem.
_PREFERENCE_MIRROR_STEMS = {"train": "train", "valid1": "validation", "valid2": "test"}


class DataError(ValueError):
  """A row of a data file does not follow the expected schema.

  Attributes:
    path: the file.
    line: 1-based line number (0 when the error concerns the whole file).
    field: the offending field (dotted path, e.g. ``'summaries[1].text'``),
      or None for errors of the whole line (invalid UTF-8, malformed JSON).
    reason: a short key, used to count skipped rows (see SkipCounts).
    detail: what was expected and what was found.
  """

  def __init__(
      self,
      path: str,
      line: int,
      field: Optional[str],
      detail: str,
      reason: str = REASON_INVALID_VALUE,
  ):
    self.path = path
    self.line = line
    self.field = field
    self.detail = detail
    self.reason = reason
    where = f"{path}:{line}" if line else str(path)
    if field is None:
      msg = f"{where}: {detail}"
    else:
      msg = f"{where}: field '{field}': {detail}"
    super().__init__(msg)

  def __reduce__(self):
    return (
        DataError,
        (self.path, self.line, self.field, self.detail, self.reason),
    )


class SkipCounts(collections.Counter):
  """Counts of skipped rows per reason (a ``collections.Counter``).

  Keys are the reasons: ``'invalid_utf8'``, ``'malformed_json'``,
  ``'not_an_object'``, ``'unknown_schema'``, ``'missing_field'``,
  ``'wrong_type'``, ``'invalid_value'``, ``'empty_summary'`` and ``'cnndm'``
  (CNN/DM rows in the comparison files; counted in both error modes).
  """

  @property
  def total_skipped(self) -> int:
    return sum(self.values())

  def summary(self) -> str:
    if not self:
      return "none"
    return ", ".join(f"{k}={v}" for k, v in sorted(self.items()))


@dataclasses.dataclass(frozen=True)
class SftExample:
  """One SFT row. ``prompt`` is set only for mirror rows (formatted prompt)."""

  id: str
  subreddit: str
  title: str
  post: str
  prompt: str
  summary: str


@dataclasses.dataclass(frozen=True)
class ComparisonExample:
  """One human comparison: ``chosen`` was preferred over ``rejected``.

  ``prompt`` is set only for mirror rows (where only the formatted prompt
  exists); ``split`` is the OpenAI split name: 'train', 'valid1' or 'valid2'.
  """

  id: str
  subreddit: str
  title: str
  post: str
  prompt: str
  chosen: str
  rejected: str
  split: str


def _check_on_error(on_error: str) -> None:
  if on_error not in ON_ERROR_CHOICES:
    raise ValueError(
        f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}"
    )


def canonical_comparison_split(split: str) -> str:
  """'train'/'validation'/'test' (or 'valid1'/'valid2') -> OpenAI split."""
  try:
    return COMPARISON_SPLITS[split]
  except KeyError:
    raise ValueError(
        f"unknown comparison split {split!r}; expected one of "
        f"{sorted(COMPARISON_SPLITS)}"
    ) from None


def _sft_stem(split: str) -> str:
  try:
    return SFT_SPLITS[split]
  except KeyError:
    raise ValueError(
        f"unknown SFT split {split!r}; expected one of {sorted(SFT_SPLITS)}"
    ) from None


# ---------------------------------------------------------------------------
# File discovery.


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.io.gfile


def _join(*parts: str) -> str:
  if str(parts[0]).startswith(("gs://", "s3://", "hdfs://")):
    return posixpath.join(*parts)
  return os.path.join(*parts)


def _require_dir(data_dir: str) -> None:
  if not _gfile().isdir(str(data_dir)):
    raise FileNotFoundError(f"data directory not found: {data_dir}")


def sft_files(data_dir: str, split: str) -> List[str]:
  """The SFT file(s) for `split` ('train', 'validation' or 'test').

  Looks for ``{data_dir}/tldr_3_filtered/{train,valid,test}.jsonl`` first, then
  the mirror layout ``{data_dir}/sft/{train,validation,test}.jsonl``.

  Raises:
    FileNotFoundError: naming every path looked for.
  """
  data_dir = str(data_dir)
  stem = _sft_stem(split)
  _require_dir(data_dir)
  candidates = [
      _join(data_dir, "tldr_3_filtered", f"{stem}.jsonl"),
      _join(data_dir, "sft", f"{_SFT_MIRROR_STEMS[stem]}.jsonl"),
  ]
  gfile = _gfile()
  for c in candidates:
    if gfile.exists(c):
      return [c]
  raise FileNotFoundError(
      f"no SFT file for split {split!r}; looked for: " + ", ".join(candidates)
  )


def _natural_key(path: str):
  name = posixpath.basename(path)
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def comparison_files(data_dir: str, split: Optional[str] = None) -> List[str]:
  """The comparison files under `data_dir`.

  The OpenAI files ``{data_dir}/comparisons/batch*.json`` (natural order:
  batch3, batch4, ..., batch22; files with 'cnndm' in their name and
  ``edit_*`` files are excluded) are returned if any exist; the split is then
  selected by each row's ``split`` field. Otherwise the mirror files
  ``{data_dir}/preference/{train,validation,test}.jsonl`` are used: only the
  one for `split` if given, else all that exist.

  Raises:
    FileNotFoundError: naming the directory and patterns looked for.
  """
  data_dir = str(data_dir)
  _require_dir(data_dir)
  gfile = _gfile()
  pattern = _join(data_dir, "comparisons", "batch*.json")
  batch = [
      p
      for p in gfile.glob(pattern)
      if "cnndm" not in posixpath.basename(p)
      and not posixpath.basename(p).startswith("edit_")
  ]
  if batch:
    return sorted(batch, key=_natural_key)
  if split is not None:
    stems = [_PREFERENCE_MIRROR_STEMS[canonical_comparison_split(split)]]
  else:
    stems = ["train", "validation", "test"]
  mirror = [_join(data_dir, "preference", f"{s}.jsonl") for s in stems]
  found = [p for p in mirror if gfile.exists(p)]
  if found:
    return found
  raise FileNotFoundError(
      "no comparison files found; looked for: "
      + ", ".join([pattern] + mirror)
  )


# ---------------------------------------------------------------------------
# Line iteration.


_CHUNK_BYTES = 4 << 20


def _iter_lines(path: str) -> Iterator[bytes]:
  """The lines of `path` as bytes (without the newline), read in chunks.

  Reading whole chunks is much faster than GFile's line iteration.
  """
  gfile = _gfile()
  with gfile.GFile(str(path), "rb") as f:
    rest = b""
    while True:
      chunk = f.read(_CHUNK_BYTES)
      if isinstance(chunk, str):  # some filesystems return text
        chunk = chunk.encode("utf-8", "surrogateescape")
      if not chunk:
        break
      lines = (rest + chunk).split(b"\n")
      rest = lines.pop()
      yield from lines
    if rest:
      yield rest


def iter_jsonl(
    path: str,
    *,
    on_error: str = "raise",
    counts: Optional[SkipCounts] = None,
) -> Iterator[tuple]:
  """Yields ``(line_number, obj)`` for each non-blank JSON line of `path`.

  Invalid UTF-8 and malformed JSON raise DataError (or are counted with
  ``on_error='skip'``). `obj` can be any JSON value.
  """
  _check_on_error(on_error)
  for lineno, raw in enumerate(_iter_lines(path), start=1):
    if not raw.strip():
      continue
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      err = DataError(
          path, lineno, None,
          f"invalid UTF-8 at byte {e.start}: {raw[e.start:e.start + 4]!r}",
          REASON_INVALID_UTF8,
      )
      if on_error == "raise":
        raise err from None
      if counts is not None:
        counts[err.reason] += 1
      continue
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      err = DataError(
          path, lineno, None, f"malformed JSON: {e}", REASON_MALFORMED_JSON
      )
      if on_error == "raise":
        raise err from None
      if counts is not None:
        counts[err.reason] += 1
      continue
    yield lineno, obj


# ---------------------------------------------------------------------------
# Row parsing.


class _Row:
  """Field access helpers that raise DataError with file:line:field."""

  def __init__(self, path: str, line: int):
    self.path = path
    self.line = line

  def error(self, field, detail, reason=REASON_INVALID_VALUE) -> DataError:
    return DataError(self.path, self.line, field, detail, reason)

  def obj(self, value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
      raise self.error(
          field, f"expected a JSON object, got {_describe(value)}",
          REASON_WRONG_TYPE if field else REASON_NOT_AN_OBJECT,
      )
    return value

  def string(
      self, d: Mapping[str, Any], key: str, prefix: str = "", *,
      required: bool = True, nonempty: bool = False,
  ) -> str:
    field = prefix + key
    if key not in d or d[key] is None:
      if not required:
        return ""
      raise self.error(
          field, "expected a string, but the field is missing",
          REASON_MISSING_FIELD,
      )
    v = d[key]
    if not isinstance(v, str):
      raise self.error(
          field, f"expected a string, got {_describe(v)}", REASON_WRONG_TYPE
      )
    if nonempty and not v.strip():
      raise self.error(
          field, f"expected a non-empty summary, got {v!r}",
          REASON_EMPTY_SUMMARY,
      )
    return v


def _describe(v: Any) -> str:
  if v is None:
    return "null"
  if isinstance(v, bool):
    return f"{json.dumps(v)} (a boolean)"
  if isinstance(v, str):
    return f"{v!r} (a string)"
  if isinstance(v, (int, float)):
    return repr(v)
  if isinstance(v, list):
    return f"a list of length {len(v)}"
  if isinstance(v, dict):
    return "an object"
  return type(v).__name__


def parse_sft_row(obj: Any, path: str = "<row>", line: int = 0) -> SftExample:
  """One SFT JSON object (any supported schema) -> SftExample."""
  r = _Row(path, line)
  d = r.obj(obj, None)
  if "post" in d or "summary" in d:
    id_ = d.get("id")
    if id_ is not None and not isinstance(id_, (str, int)):
      raise r.error("id", f"expected a string, got {_describe(id_)}",
                    REASON_WRONG_TYPE)
    return SftExample(
        id="" if id_ is None else str(id_),
        subreddit=r.string(d, "subreddit"),
        title=r.string(d, "title"),
        post=r.string(d, "post"),
        prompt="",
        summary=r.string(d, "summary", nonempty=True).strip(),
    )
  if "prompt" in d:
    if "completion" in d:
      summary_key = "completion"
    elif "label" in d:
      summary_key = "label"
    else:
      raise r.error(
          "completion",
          "expected a string (mirror rows need 'completion' or 'label'), "
          "but the field is missing",
          REASON_MISSING_FIELD,
      )
    prompt = r.string(d, "prompt", nonempty=False)
    if not prompt.strip():
      raise r.error("prompt", "expected a non-empty string, got ''")
    id_ = d.get("id")
    return SftExample(
        id="" if id_ is None else str(id_),
        subreddit="",
        title="",
        post="",
        prompt=prompt,
        summary=r.string(d, summary_key, nonempty=True).strip(),
    )
  raise r.error(
      None,
      "unknown SFT schema: expected keys {id, subreddit, title, post, "
      "summary}, {prompt, completion} or {prompt, label}; got keys "
      f"{sorted(d)}",
      REASON_UNKNOWN_SCHEMA,
  )


def _is_cnndm(d: Mapping[str, Any]) -> bool:
  info = d.get("info")
  return isinstance(info, dict) and "article" in info and "post" not in info


def parse_comparison_row(
    obj: Any,
    path: str = "<row>",
    line: int = 0,
    default_split: str = "",
) -> Optional[ComparisonExample]:
  """One comparison JSON object -> ComparisonExample (None for CNN/DM rows).

  Args:
    obj: the decoded JSON value.
    path, line: for error messages.
    default_split: the split of mirror rows (which have no split field),
      as an OpenAI split name.
  """
  r = _Row(path, line)
  d = r.obj(obj, None)
  if "info" in d or "summaries" in d or "choice" in d:
    if _is_cnndm(d):
      return None
    info = r.obj(d.get("info"), "info") if "info" in d else None
    if info is None:
      raise r.error("info", "expected a JSON object, but the field is missing",
                    REASON_MISSING_FIELD)
    id_ = info.get("id")
    if id_ is not None and not isinstance(id_, (str, int)):
      raise r.error("info.id", f"expected a string, got {_describe(id_)}",
                    REASON_WRONG_TYPE)
    post = r.string(info, "post", "info.")
    title = r.string(info, "title", "info.")
    subreddit = r.string(info, "subreddit", "info.")

    if "summaries" not in d:
      raise r.error(
          "summaries", "expected a list of 2 objects, but the field is missing",
          REASON_MISSING_FIELD,
      )
    summaries = d["summaries"]
    if not isinstance(summaries, list) or len(summaries) != 2:
      raise r.error(
          "summaries",
          f"expected a list of 2 objects, got {_describe(summaries)}",
          REASON_WRONG_TYPE if not isinstance(summaries, list)
          else REASON_INVALID_VALUE,
      )
    texts = []
    for i, s in enumerate(summaries):
      s = r.obj(s, f"summaries[{i}]")
      texts.append(
          r.string(s, "text", f"summaries[{i}].", nonempty=True).strip()
      )

    if "choice" not in d:
      raise r.error("choice", "expected 0 or 1, but the field is missing",
                    REASON_MISSING_FIELD)
    choice = d["choice"]
    if isinstance(choice, bool) or not isinstance(choice, int):
      raise r.error("choice", f"expected 0 or 1, got {_describe(choice)}",
                    REASON_WRONG_TYPE)
    if choice not in (0, 1):
      raise r.error("choice", f"expected 0 or 1, got {choice}")

    split = r.string(d, "split")
    if split not in _PREFERENCE_MIRROR_STEMS:
      raise r.error(
          "split", f"expected 'train', 'valid1' or 'valid2', got {split!r}"
      )
    extra = d.get("extra")
    if extra is not None and not isinstance(extra, dict):
      raise r.error("extra", f"expected a JSON object, got {_describe(extra)}",
                    REASON_WRONG_TYPE)
    return ComparisonExample(
        id="" if id_ is None else str(id_),
        subreddit=subreddit,
        title=title,
        post=post,
        prompt="",
        chosen=texts[choice],
        rejected=texts[1 - choice],
        split=split,
    )
  if "chosen" in d or "rejected" in d or "prompt" in d:
    prompt = r.string(d, "prompt")
    if not prompt.strip():
      raise r.error("prompt", "expected a non-empty string, got ''")
    chosen = r.string(d, "chosen", nonempty=True).strip()
    rejected = r.string(d, "rejected", nonempty=True).strip()
    id_ = d.get("id")
    return ComparisonExample(
        id="" if id_ is None else str(id_),
        subreddit="",
        title="",
        post="",
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        split=default_split,
    )
  raise r.error(
      None,
      "unknown comparison schema: expected keys {info, summaries, choice, "
      "split} or {prompt, chosen, rejected}; got keys " + str(sorted(d)),
      REASON_UNKNOWN_SCHEMA,
  )


# ---------------------------------------------------------------------------
# Readers.


def _log_pass(path: str, kind: str, kept: int, file_counts: SkipCounts,
              on_error: str) -> None:
  if file_counts:
    only_cnndm = set(file_counts) == {REASON_CNNDM}
    (logging.info if only_cnndm else logging.warning)(
        "%s: read %d %s rows, skipped %d (%s) [on_error=%s]",
        path, kept, kind, file_counts.total_skipped, file_counts.summary(),
        on_error,
    )
  else:
    logging.info("%s: read %d %s rows, skipped 0", path, kept, kind)


def _read_files(
    paths: Iterable[str],
    kind: str,
    parse: Callable[[Any, str, int], Any],
    *,
    on_error: str,
    counts: Optional[SkipCounts],
    skip_reason: Callable[[Any], Optional[str]] = lambda obj: None,
    keep: Callable[[Any], bool] = lambda ex: True,
) -> Iterator[Any]:
  """``parse(obj, path, lineno)`` of every JSON line of ``paths``, in order.

  A row with a ``skip_reason(obj)`` is a documented skip, counted under that reason
  whatever ``on_error`` is; a DataError raises (on_error 'raise') or is counted under its
  reason ('skip'); a parsed row that ``keep`` rejects (another split) is not read for this
  pass and not counted. Each file's counts are logged (`_log_pass`, as ``kind`` rows) and
  added to ``counts``.
  """
  for path in paths:
    file_counts = SkipCounts()
    kept = 0
    for lineno, obj in iter_jsonl(path, on_error=on_error, counts=file_counts):
      reason = skip_reason(obj)
      if reason is not None:
        file_counts[reason] += 1
        continue
      try:
        ex = parse(obj, path, lineno)
      except DataError as e:
        if on_error == "raise":
          raise
        file_counts[e.reason] += 1
        continue
      if keep(ex):
        kept += 1
        yield ex
    if counts is not None:
      counts.update(file_counts)
    _log_pass(path, kind, kept, file_counts, on_error)


def read_sft_files(
    paths: Iterable[str],
    *,
    on_error: str = "raise",
    counts: Optional[SkipCounts] = None,
) -> Iterator[SftExample]:
  """SftExamples from the given files (see read_sft)."""
  _check_on_error(on_error)
  return _read_files(paths, "SFT", parse_sft_row, on_error=on_error, counts=counts)


def read_sft(
    data_dir: str,
    split: str,
    on_error: str = "raise",
    *,
    counts: Optional[SkipCounts] = None,
) -> Iterator[SftExample]:
  """SFT examples of `split` ('train', 'validation' or 'test').

  Args:
    data_dir: the directory holding ``tldr_3_filtered/`` (or ``sft/``).
    split: 'train', 'validation' (file valid.jsonl) or 'test'.
    on_error: 'raise' (default): the first bad row raises DataError;
      'skip': bad rows are dropped, counted per reason and logged.
    counts: optional SkipCounts updated with the skipped rows.
  """
  _check_on_error(on_error)
  files = sft_files(data_dir, split)  # raise before the first next()
  return read_sft_files(files, on_error=on_error, counts=counts)


def _mirror_split(path: str) -> Optional[str]:
  stem = posixpath.basename(str(path)).split(".")[0]
  parent = posixpath.basename(posixpath.dirname(str(path).replace(os.sep, "/")))
  if parent != "preference":
    return None
  inverse = {v: k for k, v in _PREFERENCE_MIRROR_STEMS.items()}
  return inverse.get(stem, COMPARISON_SPLITS.get(stem))


def read_comparison_files(
    paths: Iterable[str],
    split: Optional[str],
    *,
    on_error: str = "raise",
    counts: Optional[SkipCounts] = None,
) -> Iterator[ComparisonExample]:
  """ComparisonExamples of `split` from the given files (see read_comparisons).

  `split` None keeps every row. Files under a ``preference/`` folder are
  mirror files: their rows take the split of the file name.
  """
  _check_on_error(on_error)
  want = canonical_comparison_split(split) if split is not None else None
  paths = list(paths)
  file_split = {path: _mirror_split(path) or "" for path in paths}
  return _read_files(
      paths, "comparison",
      lambda obj, path, lineno: parse_comparison_row(
          obj, path, lineno, default_split=file_split[path]),
      on_error=on_error, counts=counts,
      skip_reason=lambda obj: (
          REASON_CNNDM if isinstance(obj, dict) and _is_cnndm(obj) else None),
      keep=lambda ex: want is None or not ex.split or ex.split == want)


def read_comparisons(
    data_dir: str,
    split: str,
    on_error: str = "raise",
    *,
    counts: Optional[SkipCounts] = None,
) -> Iterator[ComparisonExample]:
  """Human comparisons of `split`.

  Args:
    data_dir: the directory holding ``comparisons/`` (or ``preference/``).
    split: 'train', 'validation' (= valid1), 'test' (= valid2); 'valid1' and
      'valid2' are accepted too. OpenAI rows are filtered by their ``split``
      field; mirror rows by their file name.
    on_error: 'raise' (default) or 'skip' (bad rows dropped, counted, logged).
    counts: optional SkipCounts updated with skipped rows (including 'cnndm').
  """
  _check_on_error(on_error)
  canonical_comparison_split(split)
  files = comparison_files(data_dir, split)
  return read_comparison_files(files, split, on_error=on_error, counts=counts)
