"""Tests of the synthetic TL;DR world, its oracle and its vocabulary."""
import glob
import json
import os
import re
import statistics

import pytest

from slic_jax.data import synthetic
from slic_jax.data.oracle import Oracle, analyze_summary

LABEL_NOISE = 0.15


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _comparison_rows(world):
    rows = []
    for path in sorted(glob.glob(os.path.join(world, "comparisons", "batch*.json")),
                       key=lambda p: int(re.findall(r"\d+", os.path.basename(p))[0])):
        for row in _read_jsonl(path):
            rows.append((os.path.splitext(os.path.basename(path))[0], row))
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    info = synthetic.generate_world(out, seed=0, num_sft=(2000, 300, 300),
                                    num_comparisons=(2500, 300, 300), label_noise=LABEL_NOISE)
    return out, info


@pytest.fixture(scope="module")
def oracle(world):
    return Oracle.load(world[0])


def test_catalogue_has_no_ambiguous_phrases():
    assert synthetic.check_catalogue() == []
    assert len(synthetic.WHO) >= 12 and len(synthetic.WHAT) >= 20 and len(synthetic.ASK) >= 8


def test_sft_schema(world):
    out, info = world
    all_ids = []
    for split, n in zip(("train", "valid", "test"), (2000, 300, 300)):
        rows = _read_jsonl(os.path.join(out, "tldr_3_filtered", f"{split}.jsonl"))
        assert len(rows) == n == info["counts"]["sft"][split]
        for r in rows:
            assert set(r) == {"id", "subreddit", "title", "post", "summary"}
            assert all(isinstance(v, str) and v for v in r.values())
            assert re.fullmatch(r"t3_[0-9a-z]+", r["id"])
            assert r["summary"].startswith(" ") and not r["summary"].startswith("  ")
            assert "\n" in r["post"] and r["post"] == r["post"].strip()
            assert 35 <= len(r["post"].split()) <= 120
        all_ids += [r["id"] for r in rows]
    assert len(all_ids) == len(set(all_ids))


def test_key_facts_come_early(world, oracle):
    rows = _read_jsonl(os.path.join(world[0], "tldr_3_filtered", "train.jsonl"))
    for r in rows[:300]:
        paragraphs = r["post"].split("\n")
        first_two = " ".join(paragraphs[:2])
        a = analyze_summary(oracle.facts[r["id"]], first_two)
        assert a["covered"] == 3 and a["wrong"] == 0, (r["post"], oracle.facts[r["id"]])


def test_comparisons_schema(world):
    out, info = world
    sft_ids = {}
    sft_rows = {}
    for split, c_split in zip(("train", "valid", "test"), ("train", "valid1", "valid2")):
        rows = _read_jsonl(os.path.join(out, "tldr_3_filtered", f"{split}.jsonl"))
        sft_ids[c_split] = {r["id"] for r in rows}
        sft_rows.update({r["id"]: r for r in rows})
    rows = _comparison_rows(out)
    assert len({b for b, _ in rows}) > 1  # split over several batch files
    counts = {"train": 0, "valid1": 0, "valid2": 0}
    n_cnndm = 0
    for batch, row in rows:
        assert set(row) == {"info", "summaries", "choice", "worker", "batch", "split", "extra"}
        assert row["batch"] == batch
        assert row["choice"] in (0, 1) and isinstance(row["choice"], int)
        assert row["split"] in counts
        assert isinstance(row["worker"], str) and row["worker"].startswith("synthetic_rater_")
        assert isinstance(row["extra"]["confidence"], int) and 1 <= row["extra"]["confidence"] <= 9
        assert len(row["summaries"]) == 2
        for s in row["summaries"]:
            assert set(s) == {"text", "policy", "note"} and s["note"] is None
            assert isinstance(s["text"], str) and s["text"].startswith(" ")
        if "post" not in row["info"]:
            assert {"article", "site"} <= set(row["info"])
            n_cnndm += 1
            continue
        assert set(row["info"]) == {"id", "post", "title", "subreddit"}
        assert row["summaries"][0]["policy"] != row["summaries"][1]["policy"]
        assert all(s["policy"] in synthetic.POLICIES for s in row["summaries"])
        assert row["summaries"][0]["text"] != row["summaries"][1]["text"]
        pid = row["info"]["id"]
        assert pid in sft_ids[row["split"]]
        sft = sft_rows[pid]
        assert (row["info"]["post"], row["info"]["title"], row["info"]["subreddit"]) == (
            sft["post"], sft["title"], sft["subreddit"])
        for s in row["summaries"]:
            if s["policy"] == "ref":
                assert s["text"] == sft["summary"]
        counts[row["split"]] += 1
    assert counts == {"train": 2500, "valid1": 300, "valid2": 300}
    assert n_cnndm == 3
    cnndm = _read_jsonl(os.path.join(out, "comparisons", "cnndm0.json"))
    assert cnndm and all("post" not in r["info"] and "article" in r["info"] for r in cnndm)
    assert all(r["batch"] == "cnndm0" for r in cnndm)


def test_preference_and_revision_mirrors(world, oracle):
    out, _ = world
    rows = [r for _, r in _comparison_rows(out) if "post" in r["info"]]
    by_split = {"train": [], "valid1": [], "valid2": []}
    for r in rows:
        by_split[r["split"]].append(r)
    for c_split, m_split in zip(("train", "valid1", "valid2"), ("train", "validation", "test")):
        pref = _read_jsonl(os.path.join(out, "preference", f"{m_split}.jsonl"))
        revs = _read_jsonl(os.path.join(out, "revisions", f"{m_split}.jsonl"))
        assert len(pref) == len(revs) == len(by_split[c_split])
        for p, v, r in zip(pref, revs, by_split[c_split]):
            assert set(p) == {"prompt", "chosen", "rejected"}
            assert set(v) == {"prompt", "chosen", "rejected", "revised"}
            info = r["info"]
            assert p["prompt"] == (f"SUBREDDIT: r/{info['subreddit']}\n\nTITLE: {info['title']}"
                                   f"\n\nPOST: {info['post']}\n\nTL;DR:")
            assert p["chosen"] == r["summaries"][r["choice"]]["text"]
            assert p["rejected"] == r["summaries"][1 - r["choice"]]["text"]
            assert (v["prompt"], v["chosen"], v["rejected"]) == (
                p["prompt"], p["chosen"], p["rejected"])
            assert v["revised"].startswith(" ")
            assert oracle.score(info["id"], v["revised"]) == 3.0


def test_facts_and_world_json(world):
    out, info = world
    facts = _read_jsonl(os.path.join(out, "facts", "facts.jsonl"))
    assert len(facts) == 2600 and len({f["id"] for f in facts}) == 2600
    for f in facts:
        assert {"id", "who", "what", "ask", "distractors"} <= set(f)
        assert f["who"] in synthetic.WHO and f["what"] in synthetic.WHAT
        assert f["ask"] in synthetic.ASK
        assert 1 <= len(f["distractors"]) <= 3
    w = json.load(open(os.path.join(out, "world.json")))
    assert w["seed"] == 0 and w["label_noise"] == LABEL_NOISE
    assert w["generator_version"] == synthetic.GENERATOR_VERSION
    assert w["counts"]["sft"] == {"train": 2000, "valid": 300, "test": 300}
    assert w["tie_rate"] < 0.01


def _all_bytes(d):
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, d)] = f.read()
    return out


def test_determinism(tmp_path):
    kw = dict(num_sft=(60, 20, 20), num_comparisons=(80, 20, 20))
    synthetic.generate_world(str(tmp_path / "a"), seed=1, **kw)
    synthetic.generate_world(str(tmp_path / "b"), seed=1, **kw)
    synthetic.generate_world(str(tmp_path / "c"), seed=2, **kw)
    a, b, c = (_all_bytes(str(tmp_path / x)) for x in "abc")
    assert a == b
    assert set(a) == set(c)
    assert a["tldr_3_filtered/train.jsonl"] != c["tldr_3_filtered/train.jsonl"]
    assert a["comparisons/batch3.json"] != c["comparisons/batch3.json"]


def test_oracle_scores(oracle):
    pid = sorted(oracle.facts)[0]
    f = oracle.facts[pid]
    canon = f" {f['who']} {f['what']}, {f['ask']}?"
    assert oracle.canonical(pid) == canon
    a = oracle.analyze(pid, canon)
    assert a == {"covered": 3, "wrong": 0, "padding": 0, "words": len(canon.split()),
                 "score": 3.0}
    assert isinstance(a["score"], float)
    # Reference without the ask.
    assert oracle.score(pid, f" {f['who']} {f['what']}.") == 2.0
    # Surface variants are recognised.
    variant = " {} {}, {}?".format(synthetic.WHO[f["who"]][0], synthetic.WHAT[f["what"]][0],
                                   synthetic.ASK[f["ask"]][0])
    assert oracle.score(pid, variant) == 3.0
    # A wrong fact lowers the score: covered 2, wrong 1.
    other_who = next(w for w in sorted(synthetic.WHO) if w != f["who"])
    wrong = f" {other_who} {f['what']}, {f['ask']}?"
    assert oracle.analyze(pid, wrong)["wrong"] == 1
    assert oracle.score(pid, wrong) == 1.0 < oracle.score(pid, canon)
    # Padding lowers it: filler, distractors, ages.
    assert oracle.score(pid, " so basically" + canon) == 2.5
    assert oracle.score(pid, f" {f['who']} {f['what']}, we have a cat, {f['ask']}?") == 2.5
    padded = f" tl;dr i am 24f and {f['who']} {f['what']} lol, {f['ask']}?"
    assert oracle.analyze(pid, padded)["padding"] == 3
    assert oracle.score(pid, padded) == 1.5
    # Case and punctuation do not matter; empty text scores 0.
    assert oracle.score(pid, canon.upper().replace(",", " ;")) == 3.0
    assert oracle.analyze(pid, "")["score"] == 0.0


def test_oracle_prefers_and_win_rate(oracle):
    pid = sorted(oracle.facts)[1]
    f = oracle.facts[pid]
    full = oracle.canonical(pid)
    no_ask = f" {f['who']} {f['what']}."
    padded = " long story short" + no_ask
    assert oracle.prefers(pid, full, no_ask) == 0
    assert oracle.prefers(pid, no_ask, full) == 1
    assert oracle.prefers(pid, no_ask, no_ask + " ") is None
    # win, loss, tie, win -> (2 + 0.5) / 4.
    ids = [pid] * 4
    cands = [full, padded, no_ask, no_ask]
    refs = [no_ask, no_ask, no_ask, padded]
    assert oracle.win_rate(ids, cands, refs) == pytest.approx(0.625)
    assert oracle.win_rate(ids[:1], [full], [full]) == 0.5


def test_labels_follow_oracle_with_noise(world, oracle):
    rows = [r for _, r in _comparison_rows(world[0]) if "post" in r["info"]]
    agree = disagree = ties = ask_pairs = 0
    for r in rows:
        a, b = (s["text"] for s in r["summaries"])
        p = oracle.prefers(r["info"]["id"], a, b)
        if p is None:
            ties += 1
            continue
        agree += p == r["choice"]
        disagree += p != r["choice"]
        wa, wb = (oracle.analyze(r["info"]["id"], t) for t in (a, b))
        win, lose = (wa, wb) if p == 0 else (wb, wa)
        ask_pairs += win["covered"] > lose["covered"] and win["wrong"] == lose["wrong"]
    n = len(rows)
    assert ties / n < 0.01
    assert agree / (agree + disagree) >= 1 - LABEL_NOISE - 0.05
    assert abs(disagree / (agree + disagree) - LABEL_NOISE) <= 0.05
    assert ask_pairs / n >= 0.3  # many pairs where covering more facts (mostly the ask) wins


def test_reference_writer_statistics(world, oracle):
    rows = _read_jsonl(os.path.join(world[0], "tldr_3_filtered", "train.jsonl"))
    analyses = [oracle.analyze(r["id"], r["summary"]) for r in rows]
    n = len(rows)
    full = sum(a["covered"] == 3 for a in analyses) / n
    filler = sum(r["summary"].startswith(tuple(" " + x for x in synthetic.REFERENCE_FILLERS))
                 for r in rows) / n
    wrong = sum(a["wrong"] > 0 for a in analyses) / n
    assert 0.3 <= full <= 0.45
    assert 0.25 <= filler <= 0.35
    assert 0.02 <= wrong <= 0.08
    assert statistics.mean(a["score"] for a in analyses) < 2.5


def test_vocabulary(world):
    assert os.path.isabs(synthetic.VOCAB_PATH) and os.path.exists(synthetic.VOCAB_PATH)
    vocab = synthetic.default_vocabulary()
    assert vocab.vocab_size == synthetic.SPM_VOCAB_SIZE <= 512
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    sp = vocab.tokenizer
    assert sp.bos_id() == -1
    rows = _read_jsonl(os.path.join(world[0], "tldr_3_filtered", "train.jsonl"))[:500]
    cmp_texts = [s["text"] for _, r in _comparison_rows(world[0])[:500]
                 for s in r["summaries"]]
    prompts = [synthetic.make_prompt(r["subreddit"], r["title"], r["post"]) for r in rows]
    extra = ["[CONTEXT] a post [SUMMARY A] one [SUMMARY B] two", "A", "B", "Good", "Bad",
             "[CONTEXT] x [SUMMARY] y", "<|Start Of Modified Response|>"]
    for text in prompts + [r["summary"] for r in rows] + cmp_texts + extra:
        ids = vocab.encode(text)
        assert 2 not in ids, text
        assert vocab.decode(ids) == " ".join(text.split())
    lengths = [len(vocab.encode(p)) for p in prompts]
    assert statistics.mean(lengths) < 160
    assert max(len(vocab.encode(r["summary"])) for r in rows) < 32


def test_prompt_index(world, oracle):
    from slic_jax.data.oracle import prompt_index
    index = prompt_index(world[0])
    assert len(index) == 2600
    pref = _read_jsonl(os.path.join(world[0], "preference", "test.jsonl"))
    for p in pref[:50]:
        pid = index[p["prompt"]]
        assert oracle.facts[pid]["split"] == "test"
