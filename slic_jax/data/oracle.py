"""The oracle of the synthetic TL;DR world: scores any summary against a post's hidden facts.

Every post of the world (`slic_jax.data.synthetic`) has three key facts (who / what / ask) and a
few distractor details, stored in ``facts/facts.jsonl``; the catalogue of every fact value with
its surface variants, the filler phrases and the distractor phrases is in
``facts/catalogue.json`` (the module's catalogue is used when that file is absent).

A summary is lower-cased, every character other than ``a-z 0-9 ; '`` becomes a space, and
catalogue phrases are matched as whole words (longest phrase first, non-overlapping):

* ``covered``: how many of the post's 3 key facts appear (any surface variant), 0..3;
* ``wrong``:   occurrences of catalogue fact phrases that are NOT this post's key facts
               (e.g. "my boss" in a summary of a post about "my roommate");
* ``padding``: occurrences of filler phrases ("so basically", "tl;dr", "lol", ...) and of
               distractor details (any catalogue distractor, or an age such as "i am 24f");
* ``words``:   number of words after normalisation.

``score = covered - 1.0 * wrong - 0.5 * padding``. The canonical summary
``" {who} {what}, {ask}?"`` scores 3; a reference without the ask scores 2.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple  # noqa: F401

WRONG_WEIGHT = 1.0
PADDING_WEIGHT = 0.5
_EPS = 1e-9
_NON_WORD = re.compile(r"[^a-z0-9;']+")


def normalize(text: str) -> str:
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


class _Matcher:
    """Whole-word matcher of every catalogue phrase, longest first."""

    def __init__(self, catalogue: Dict[str, Any]):
        self.tags: Dict[str, Tuple[str, str]] = {}
        for slot in ("who", "what", "ask"):
            for canon in sorted(catalogue[slot]):
                for phrase in [canon] + list(catalogue[slot][canon]):
                    self.tags[normalize(phrase)] = (slot, canon)
        for phrase in catalogue["distractors"]:
            self.tags[normalize(phrase)] = ("padding", phrase)
        for phrase in catalogue["fillers"]:
            self.tags[normalize(phrase)] = ("padding", phrase)
        self.age = re.compile(catalogue.get("age_pattern", r"i am \d{1,2} ?[fm]"))
        alts = sorted(self.tags, key=lambda p: (-len(p), p))
        pattern = "|".join([re.escape(p) for p in alts] + [self.age.pattern])
        self.regex = re.compile(rf"(?<![a-z0-9;'])(?:{pattern})(?![a-z0-9;'])")

    def find(self, text: str) -> List[Tuple[str, str]]:
        out = []
        for m in self.regex.finditer(text):
            phrase = m.group(0)
            tag = self.tags.get(phrase)
            if tag is None:  # age pattern
                tag = ("padding", phrase)
            out.append(tag)
        return out


@functools.lru_cache(maxsize=1)
def _default_matcher() -> _Matcher:
    from slic_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return _Matcher(synthetic.catalogue_json())


def analyze_summary(facts: Dict[str, Any], text: str, matcher: Optional[_Matcher] = None
                    ) -> Dict[str, Any]:
    """Oracle analysis of `text` for a post whose facts are `facts` (keys who/what/ask)."""
    matcher = matcher or _default_matcher()
    norm = normalize(text)
    covered, wrong, padding = set(), 0, 0
    for kind, value in matcher.find(norm):
        if kind == "padding":
            padding += 1
        elif facts.get(kind) == value:
            covered.add(kind)
        else:
            wrong += 1
    score = len(covered) - WRONG_WEIGHT * wrong - PADDING_WEIGHT * padding
    return {"covered": len(covered), "wrong": wrong, "padding": padding,
            "words": len(norm.split()), "score": float(score)}


class Oracle:
    """Knows every post's hidden facts; scores summaries (see the module docstring)."""

    def __init__(self, facts: Iterable[Dict[str, Any]], catalogue: Optional[Dict] = None):
        self.facts: Dict[str, Dict[str, Any]] = {f["id"]: f for f in facts}
        self._matcher = _Matcher(catalogue) if catalogue is not None else _default_matcher()

    @classmethod
    def load(cls, data_dir: str) -> "Oracle":
        """Reads `data_dir`/facts/facts.jsonl (and facts/catalogue.json when present)."""
        facts_path = os.path.join(data_dir, "facts", "facts.jsonl")
        with open(facts_path, encoding="utf-8") as f:
            facts = [json.loads(line) for line in f if line.strip()]
        cat_path = os.path.join(data_dir, "facts", "catalogue.json")
        catalogue = None
        if os.path.exists(cat_path):
            with open(cat_path, encoding="utf-8") as f:
                catalogue = json.load(f)
        return cls(facts, catalogue)

    def __contains__(self, post_id: str) -> bool:
        return post_id in self.facts

    def canonical(self, post_id: str) -> str:
        """The best summary of a post: " {who} {what}, {ask}?" (score 3)."""
        f = self.facts[post_id]
        return f" {f['who']} {f['what']}, {f['ask']}?"

    def analyze(self, post_id: str, text: str) -> Dict[str, Any]:
        """dict(covered=int, wrong=int, padding=int, words=int, score=float)."""
        return analyze_summary(self.facts[post_id], text, self._matcher)

    def score(self, post_id: str, text: str) -> float:
        return self.analyze(post_id, text)["score"]

    def prefers(self, post_id: str, a: str, b: str) -> Optional[int]:
        """0 if `a` scores higher, 1 if `b` does, None on a tie."""
        sa, sb = self.score(post_id, a), self.score(post_id, b)
        if abs(sa - sb) <= _EPS:
            return None
        return 0 if sa > sb else 1

    def win_rate(self, post_ids: Sequence[str], candidates: Sequence[str],
                 references: Sequence[str]) -> float:
        """(wins + 0.5 * ties) / n of candidates[i] against references[i] on post_ids[i]."""
        if not (len(post_ids) == len(candidates) == len(references)):
            raise ValueError("post_ids, candidates and references must have the same length")
        if not post_ids:
            return float("nan")
        total = 0.0
        for pid, c, r in zip(post_ids, candidates, references):
            p = self.prefers(pid, c, r)
            total += 0.5 if p is None else (1.0 if p == 0 else 0.0)
        return total / len(post_ids)


def prompt_index(data_dir: str) -> Dict[str, str]:
    """Maps every SFT prompt ("SUBREDDIT: r/... TL;DR:") of the world to its post id, for
    scoring rows that carry no id (e.g. the preference mirror)."""
    from slic_jax.data.synthetic import make_prompt  # pylint: disable=g-import-not-at-top
    index = {}
    for split in ("train", "valid", "test"):
        path = os.path.join(data_dir, "tldr_3_filtered", f"{split}.jsonl")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    index[make_prompt(r["subreddit"], r["title"], r["post"])] = r["id"]
    return index
