"""A synthetic TL;DR world, written in exactly the schemas of the real release.

No machine in this project can download the Reddit TL;DR data (Stiennon et al. 2020), so this
module builds a small stand-in that a tiny T5 can learn on a CPU in a few thousand steps, and
that has a known right answer (see `slic_jax.data.oracle`).

The world
---------
Every post is built around three hidden **key facts**, one per slot:

* ``who``  -- the other person ("my roommate", "my boss", ...; `WHO`, 14 values),
* ``what`` -- the event ("borrowed money and never paid it back", ...; `WHAT`, 20 values),
* ``ask``  -- what the poster wants ("should i move out", ...; `ASK`, 8 values),

plus 1-3 **distractor details** that are not key facts ("we have a cat", "i am 24f", ...).
Each value has a canonical surface form and one or two paraphrase variants; posts mostly use the
canonical words (so a summariser can copy them) and sometimes a variant (the oracle recognises
all of them). Posts are lower-case paragraphs joined by "\\n": paragraph 1 holds WHO and WHAT,
paragraph 2 holds the ASK, later paragraphs hold distractors and filler (and may be cut by the
loader without losing a key fact).

The canonical good summary is ``" {who} {what}, {ask}?"`` (oracle score 3). The **human
reference writer** (the SFT targets) is systematically imperfect: it always has WHO and WHAT,
has the ASK only with probability 0.4, starts with a filler ("so basically", "long story short",
"tl;dr") with probability 0.3, and swaps in a wrong fact with probability 0.05. Greedy SFT
therefore learns to leave out the ask, and preference training has room to add it.

**Comparisons** pair two summaries from different synthetic "policies":

* ``ref``       the SFT reference of the post (same text as in ``tldr_3_filtered``),
* ``sup_synth`` a fresh draw from the reference writer (an "SFT sample"),
* ``full``      the canonical summary, sometimes with paraphrased facts,
* ``short``     the canonical summary missing one fact (mostly the ask),
* ``padded``    a summary with a filler phrase and/or a distractor detail,
* ``wrong``     a summary with one fact taken from another post.

The preferred side is the one with the higher oracle score (ties broken at random; pair types
are re-drawn a few times to avoid ties), then flipped with probability ``label_noise``
(rater disagreement).

Files written by `generate_world` (schemas of /work/shared/spec/DATA.md)::

    tldr_3_filtered/{train,valid,test}.jsonl    {"id","subreddit","title","post","summary"}
    comparisons/batch3.json ... batchN.json     {"info","summaries","choice","worker","batch",
                                                 "split","extra"}; CNN/DM rows in the last one
    comparisons/cnndm0.json                     CNN/DM-style rows only (loaders skip them)
    preference/{train,validation,test}.jsonl    {"prompt","chosen","rejected"}
    revisions/{train,validation,test}.jsonl     {"prompt","chosen","rejected","revised"} (TLCR:
                                                 "revised" is a minimal edit of "rejected" that
                                                 fixes its faults)
    facts/facts.jsonl                           {"id","who","what","ask","distractors","split"}
    facts/catalogue.json                        every fact value with its surface variants,
                                                 fillers, distractors (read by the oracle)
    world.json                                  seed, counts, label_noise, generator version

Comparison posts of split ``train`` are SFT train posts (same ``info.id``), ``valid1`` posts are
SFT valid posts and ``valid2`` posts are SFT test posts.

Everything is deterministic for a given seed (one `random.Random` per purpose, no set/dict
iteration over hashed strings) and takes about a second for the default sizes.
"""
from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

GENERATOR_VERSION = "tldr_synth_v1"

# SentencePiece model trained by tools/train_vocab.py on the default world (seed 0).
# Unigram, vocab_size = SPM_VOCAB_SIZE, pad_id=0, eos_id=1, unk_id=2, no BOS (seqio ids).
SPM_VOCAB_SIZE = 512
VOCAB_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tldr_synth_spm.model")


def default_vocabulary():
    """`seqio.SentencePieceVocabulary` for the synthetic world (seqio imported lazily)."""
    import seqio  # pylint: disable=g-import-not-at-top
    return seqio.SentencePieceVocabulary(VOCAB_PATH)


# ---------------------------------------------------------------------------------------------
# Catalogue. Each entry: canonical phrase -> paraphrase variants. All lower case, no phrase is a
# word-level substring of a phrase with a different meaning (checked by `check_catalogue`).
# ---------------------------------------------------------------------------------------------
WHO: Dict[str, List[str]] = {
    "my roommate": ["my flatmate"],
    "my boyfriend": ["my bf"],
    "my girlfriend": ["my gf"],
    "my boss": ["my manager"],
    "my best friend": ["my closest friend"],
    "my sister": ["my older sister"],
    "my brother": ["my little brother"],
    "my mom": ["my mother"],
    "my dad": ["my father"],
    "my husband": ["my hubby"],
    "my wife": ["my spouse"],
    "my coworker": ["my colleague"],
    "my landlord": ["my landlady"],
    "my neighbor": ["my neighbour"],
}

WHAT: Dict[str, List[str]] = {
    "borrowed money and never paid it back": ["borrowed cash and never returned it"],
    "forgot my birthday": ["did not remember my birthday"],
    "read my private messages": ["went through my phone"],
    "lied about where they were": ["lied about where they went"],
    "keeps eating my food": ["keeps taking my food"],
    "kept my security deposit": ["refused to return my deposit"],
    "took credit for my work": ["claimed my work as their own"],
    "broke my laptop and refuses to pay": ["broke my laptop and will not pay"],
    "wants me to cosign a car loan": ["asked me to cosign a car loan"],
    "canceled our trip last minute": ["cancelled our trip at the last minute"],
    "invited my ex to the party": ["invited my ex to their party"],
    "told everyone my secret": ["shared my secret with everyone"],
    "posted photos of me without asking": ["posted pictures of me without asking"],
    "cheated on me with a friend": ["cheated on me with my friend"],
    "crashed my car": ["wrecked my car"],
    "stopped talking to me": ["stopped replying to me"],
    "wants to move in together": ["asked to move in together"],
    "quit their job without telling me": ["quit their job behind my back"],
    "keeps showing up without notice": ["keeps coming over unannounced"],
    "did not pay their share of rent": ["skipped their share of rent"],
}

ASK: Dict[str, List[str]] = {
    "should i move out": ["should i find a new place"],
    "how do i bring it up": ["how do i talk to them about it"],
    "am i overreacting": ["am i being dramatic"],
    "should i end things": ["should i break it off"],
    "what should i do": ["what do i do"],
    "can i get my money back": ["how do i get my money back"],
    "should i forgive them": ["should i let it go"],
    "is this normal": ["is this okay"],
}

SLOTS: Tuple[str, ...] = ("who", "what", "ask")
CATALOGUE: Dict[str, Dict[str, List[str]]] = {"who": WHO, "what": WHAT, "ask": ASK}

# Subreddits by event (first one listed is the most common).
SUBREDDITS: Dict[str, List[str]] = {
    "borrowed money and never paid it back": ["personalfinance", "relationships"],
    "forgot my birthday": ["relationships", "relationship_advice"],
    "read my private messages": ["relationships", "relationship_advice"],
    "lied about where they were": ["relationships", "relationship_advice"],
    "keeps eating my food": ["roommates", "relationship_advice"],
    "kept my security deposit": ["legaladvice", "personalfinance"],
    "took credit for my work": ["jobs", "relationship_advice"],
    "broke my laptop and refuses to pay": ["legaladvice", "relationship_advice"],
    "wants me to cosign a car loan": ["personalfinance", "relationships"],
    "canceled our trip last minute": ["relationships", "relationship_advice"],
    "invited my ex to the party": ["relationships", "relationship_advice"],
    "told everyone my secret": ["relationships", "relationship_advice"],
    "posted photos of me without asking": ["relationship_advice", "legaladvice"],
    "cheated on me with a friend": ["relationships", "relationship_advice"],
    "crashed my car": ["legaladvice", "personalfinance"],
    "stopped talking to me": ["relationships", "relationship_advice"],
    "wants to move in together": ["relationships", "relationship_advice"],
    "quit their job without telling me": ["relationships", "personalfinance"],
    "keeps showing up without notice": ["relationship_advice", "roommates"],
    "did not pay their share of rent": ["roommates", "personalfinance", "legaladvice"],
}

# Distractor details (not key facts). Ages ("i am 24f") are distractors too.
DISTRACTORS: List[str] = [
    "we have a cat",
    "i work night shifts",
    "we live in a small apartment",
    "i just started a new job",
    "we met in college",
    "i have exams next week",
    "we have been together for two years",
    "i drive an old car",
    "we share a bathroom",
    "i am saving for a house",
    "we both like hiking",
    "i grew up in a small town",
    "it was a sunday",
    "we split the groceries",
    "i have a dog",
    "i play in a band",
    "we have known each other since school",
    "i moved here last year",
]
AGE_PATTERN = r"i am \d{1,2} ?[fm]"

# Filler phrases: padding when they appear in a summary.
FILLERS: List[str] = [
    "so basically",
    "long story short",
    "tl;dr",
    "anyway",
    "lol",
    "any advice",
    "please help",
    "thanks in advance",
]
REFERENCE_FILLERS: List[str] = ["so basically", "long story short", "tl;dr"]

# Neutral post sentences (no catalogue phrase inside).
NEUTRAL: List[str] = [
    "i did not know what to say",
    "it has been bothering me for days",
    "i tried to stay calm about it",
    "this is not the first time something like this happened",
    "i do not want to make things worse",
    "we usually get along fine",
    "my friends all have different opinions",
    "i have been thinking about it a lot",
    "i feel like i am going crazy",
    "i really do not like conflict",
    "part of me wants to ignore it",
    "i keep going back and forth",
    "it is starting to affect my sleep",
    "things were fine until now",
    "i asked once and got a vague answer",
    "i am not sure who is in the wrong here",
    "i want to handle this the right way",
    "nobody else seems to notice",
    "it made me feel really small",
    "i have never dealt with this before",
]
TIMES: List[str] = ["last week", "yesterday", "a few days ago", "last month", "over the weekend"]
ASK_LEADS: List[str] = [
    "i do not know how to handle this",
    "i need some outside opinions",
    "i am stuck",
    "so here is my question",
    "i could use some advice",
]
TRAILERS: List[str] = [
    "thanks for reading",
    "sorry for the long post, i am on mobile",
    "edit: formatting",
    "any advice is appreciated",
    "throwaway because they know my main account",
]

POLICIES: Tuple[str, ...] = ("ref", "sup_synth", "full", "short", "padded", "wrong")
# (policy_a, policy_b, weight). Many pairs contrast a summary with the ask against one without.
PAIR_TYPES: List[Tuple[str, str, float]] = [
    ("full", "ref", 0.22),
    ("full", "short", 0.12),
    ("full", "sup_synth", 0.10),
    ("ref", "padded", 0.08),
    ("full", "padded", 0.08),
    ("full", "wrong", 0.08),
    ("ref", "wrong", 0.08),
    ("sup_synth", "ref", 0.08),
    ("short", "padded", 0.06),
    ("short", "wrong", 0.05),
    ("padded", "wrong", 0.05),
]

SFT_SPLITS: Tuple[str, ...] = ("train", "valid", "test")
COMPARISON_SPLITS: Tuple[str, ...] = ("train", "valid1", "valid2")
MIRROR_SPLITS: Tuple[str, ...] = ("train", "validation", "test")
FIRST_BATCH = 3
MAX_BATCH_FILES = 6


def make_prompt(subreddit: str, title: str, post: str) -> str:
    """The prompt format of the original work."""
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def catalogue_json() -> Dict[str, Any]:
    """Everything the oracle needs besides the per-post facts."""
    return {
        "version": GENERATOR_VERSION,
        "who": WHO,
        "what": WHAT,
        "ask": ASK,
        "distractors": DISTRACTORS,
        "age_pattern": AGE_PATTERN,
        "fillers": FILLERS,
    }


def check_catalogue() -> List[str]:
    """Returns a list of problems: phrases of different meaning where one contains the other."""
    tagged = []
    for slot in SLOTS:
        for canon, variants in CATALOGUE[slot].items():
            for p in [canon] + variants:
                tagged.append((p, (slot, canon)))
    tagged += [(p, ("distractor", p)) for p in DISTRACTORS]
    tagged += [(p, ("filler", p)) for p in FILLERS]
    problems = []
    phrases = [p for p, _ in tagged]
    if len(set(phrases)) != len(phrases):
        problems.append("duplicate phrases")
    for p, tp in tagged:
        for q, tq in tagged:
            if tp != tq and p != q and f" {p} " in f" {q} ":
                problems.append(f"{p!r} inside {q!r}")
    return problems


# ---------------------------------------------------------------------------------------------
# Summaries as small structures, rendered to text (so revisions can be minimal edits).
# ---------------------------------------------------------------------------------------------
def _summary(who=None, what=None, ask=None, filler=None, extra=None, ask_sep=", ") -> Dict:
    return {"who": who, "what": what, "ask": ask, "filler": filler, "extra": extra,
            "ask_sep": ask_sep}


def render_summary(s: Dict) -> str:
    """Text of a summary structure; starts with a space like the real summaries."""
    core = f"{s['who'] or 'someone'} {s['what'] or 'upset me'}"
    if s["extra"]:
        core = f"{core}, {s['extra']}"
    text = f"{core}{s['ask_sep']}{s['ask']}?" if s["ask"] else f"{core}."
    if s["filler"]:
        text = f"{s['filler']} {text}"
    return " " + text


def canonical_summary(facts: Dict) -> str:
    """The oracle's best summary: " {who} {what}, {ask}?"."""
    return render_summary(_summary(facts["who"], facts["what"], facts["ask"]))


def _surface(rng: random.Random, slot: str, canon: str, p_variant: float,
             seen: Optional[str] = None) -> str:
    """A surface form of `canon`: `seen` (the post's wording, default canonical), or with
    probability `p_variant` another form of the same value."""
    seen = seen or canon
    if rng.random() < p_variant:
        others = [p for p in [canon] + CATALOGUE[slot][canon] if p != seen]
        if others:
            return rng.choice(others)
    return seen


def _other_value(rng: random.Random, slot: str, canon: str, pool: Sequence[Dict]) -> str:
    """A value for `slot` from another post (falls back to the catalogue)."""
    for _ in range(8):
        cand = rng.choice(pool)[slot] if pool else rng.choice(sorted(CATALOGUE[slot]))
        if cand != canon:
            return cand
    return rng.choice([c for c in sorted(CATALOGUE[slot]) if c != canon])


def _reference_writer(rng: random.Random, facts: Dict, pool: Sequence[Dict],
                      seen: Optional[Dict[str, str]] = None, p_ask: float = 0.4,
                      p_filler: float = 0.3, p_wrong: float = 0.05) -> Dict:
    """The human reference writer: WHO and WHAT always, ASK sometimes, filler, rare wrong fact."""
    vals = {slot: facts[slot] for slot in SLOTS}
    include_ask = rng.random() < p_ask
    if rng.random() < p_wrong:
        slot = rng.choice(["who", "what", "ask"] if include_ask else ["who", "what"])
        vals[slot] = _other_value(rng, slot, facts[slot], pool)
    seen = seen or {}

    def surf(slot):  # writers mostly copy the post's wording
        return _surface(rng, slot, vals[slot], 0.1,
                        seen.get(slot) if vals[slot] == facts[slot] else None)

    s = _summary(
        who=surf("who"),
        what=surf("what"),
        ask=surf("ask") if include_ask else None,
        filler=rng.choice(REFERENCE_FILLERS) if rng.random() < p_filler else None,
        ask_sep=". " if rng.random() < 0.2 else ", ")
    return s


def _policy_summary(rng: random.Random, policy: str, post: Dict, pool: Sequence[Dict]) -> Dict:
    facts = post["facts"]
    if policy == "ref":
        return dict(post["ref_struct"])
    if policy == "sup_synth":
        return _reference_writer(rng, facts, pool, post["surface"], p_ask=0.3)
    seen = post["surface"]
    full = _summary(
        who=_surface(rng, "who", facts["who"], 0.2, seen.get("who")),
        what=_surface(rng, "what", facts["what"], 0.2, seen.get("what")),
        ask=_surface(rng, "ask", facts["ask"], 0.2, seen.get("ask")))
    if policy == "full":
        return full
    if policy == "short":
        r = rng.random()
        drop = "ask" if r < 0.6 else ("who" if r < 0.8 else "what")
        full[drop] = None
        return full
    if policy == "padded":
        if rng.random() < 0.5:
            full["ask"] = None
        r = rng.random()
        if r < 0.35 or not facts["distractors"]:
            full["filler"] = rng.choice(FILLERS)
        elif r < 0.7:
            full["extra"] = rng.choice(facts["distractors"])
        else:
            full["filler"] = rng.choice(FILLERS)
            full["extra"] = rng.choice(facts["distractors"])
        return full
    if policy == "wrong":
        if rng.random() < 0.4:
            full["ask"] = None
        slots = ["who", "what"] + (["ask"] if full["ask"] else [])
        slot = rng.choice(slots)
        full[slot] = _other_value(rng, slot, facts[slot], pool)
        return full
    raise ValueError(f"unknown policy {policy!r}")


def _revise(s: Dict, facts: Dict) -> Dict:
    """Minimal edit fixing every fault: wrong facts replaced, missing ones added, padding cut."""
    r = dict(s)
    for slot in SLOTS:
        cur = r[slot]
        ok = cur is not None and (cur == facts[slot] or cur in CATALOGUE[slot][facts[slot]])
        if not ok:
            r[slot] = facts[slot]
    r["filler"] = None
    r["extra"] = None
    return r


# ---------------------------------------------------------------------------------------------
# Posts.
# ---------------------------------------------------------------------------------------------
def _to_base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


def _make_post(rng: random.Random, post_id: str) -> Dict:
    who = rng.choice(sorted(WHO))
    what = rng.choice(sorted(WHAT))
    ask = rng.choice(sorted(ASK))
    age, gender = rng.randint(18, 45), rng.choice("fm")
    age_s = f"i am {age}{gender}"
    n_dis = rng.randint(1, 3)
    pool = list(DISTRACTORS) + [age_s] * 4  # ages are common distractors
    distractors: List[str] = []
    while len(distractors) < n_dis:
        d = rng.choice(pool)
        if d not in distractors:
            distractors.append(d)

    who_s = _surface(rng, "who", who, 0.15)
    what_s = _surface(rng, "what", what, 0.15)
    ask_s = _surface(rng, "ask", ask, 0.15)
    time_s = rng.choice(TIMES)
    dis = list(distractors)

    # Paragraph 1: WHO + WHAT (+ maybe the first distractor).
    t = rng.randrange(4)
    if t == 0:
        p1 = [f"{time_s} {who_s} {what_s}"]
    elif t == 1:
        p1 = [f"so {who_s} {what_s} {time_s}"]
    elif t == 2:
        p1 = [f"this happened {time_s}", f"{who_s} {what_s}"]
    else:
        p1 = [f"i need advice about {who_s}", f"{time_s} they {what_s}"]
    if dis and rng.random() < 0.5:
        p1.insert(0 if rng.random() < 0.5 else len(p1), dis.pop(0))
    if rng.random() < 0.5:
        p1.append(rng.choice(NEUTRAL))
    # Paragraph 2: the ASK (+ maybe a distractor).
    p2 = []
    if dis and rng.random() < 0.5:
        p2.append(dis.pop(0))
    p2.append(rng.choice(NEUTRAL))
    p2.append(rng.choice(ASK_LEADS))
    p2_ask = f"{ask_s}?"
    # Paragraph 3: remaining distractors + neutral filler to reach the target length.
    target = rng.randint(50, 110)
    trailer = rng.choice(TRAILERS) if rng.random() < 0.5 else None
    neutral = [n for n in NEUTRAL if n not in p1 and n not in p2]
    rng.shuffle(neutral)

    def para(sents, q=None):
        text = ". ".join(sents) + "."
        return f"{text} {q}" if q else text

    def n_words(paras):
        return sum(len(p.split()) for p in paras)

    p3 = list(dis)
    fixed = [para(p1), para(p2, p2_ask)] + ([trailer + "."] if trailer else [])
    while neutral and n_words(fixed) + n_words(p3) + len(neutral[0].split()) <= target:
        p3.insert(rng.randint(0, len(p3)), neutral.pop())
    paragraphs = [para(p1), para(p2, p2_ask)]
    if p3:
        paragraphs.append(para(p3))
    if trailer:
        paragraphs.append(trailer + ".")
    post_text = "\n".join(paragraphs)

    r = rng.random()
    if r < 0.45:
        title = f"[{age}{gender}] {who} {what}"
    elif r < 0.7:
        title = f"{who} {what}"
    elif r < 0.85:
        title = f"need advice about {who}"
    else:
        title = f"{who} {what}, {ask}?"
    subreddit = "roommates" if who == "my roommate" and rng.random() < 0.5 else rng.choice(
        SUBREDDITS[what])
    facts = {"id": post_id, "who": who, "what": what, "ask": ask, "distractors": distractors}
    return {"id": post_id, "subreddit": subreddit, "title": title, "post": post_text,
            "facts": facts, "surface": {"who": who_s, "what": what_s, "ask": ask_s}}


# ---------------------------------------------------------------------------------------------
# The world.
# ---------------------------------------------------------------------------------------------
def _jsonl(path: str, rows: Sequence[Dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _cnndm_row(rng: random.Random, i: int, batch: str) -> Dict:
    article = (f"( cnn ) officials said on tuesday that the bridge number {i} will close for "
               "repairs. drivers should expect delays for several weeks.")
    return {
        "info": {"id": f"cnndm_{i:04d}", "article": article, "title": f"bridge {i} to close",
                 "site": "dailymail" if i % 2 else "cnn"},
        "summaries": [{"text": f" bridge {i} will close for repairs.", "policy": "ref",
                       "note": None},
                      {"text": " officials said on tuesday.", "policy": "sup4_cnndm",
                       "note": None}],
        "choice": rng.randint(0, 1), "worker": f"synthetic_rater_{rng.randint(0, 9)}",
        "batch": batch, "split": "valid2", "extra": {"confidence": rng.randint(1, 9)},
    }


def generate_world(out_dir: str, *, seed: int = 0,
                   num_sft: Tuple[int, int, int] = (4000, 500, 500),
                   num_comparisons: Tuple[int, int, int] = (4000, 500, 500),
                   label_noise: float = 0.15, num_cnndm_rows: int = 3) -> Dict[str, Any]:
    """Writes the synthetic world under `out_dir` (see the module docstring for the files).

    Args:
      out_dir: local directory (created).
      seed: everything is a deterministic function of the seed and the sizes.
      num_sft: posts in tldr_3_filtered train / valid / test.
      num_comparisons: comparison rows of split train / valid1 / valid2; they use the posts of
        the matching SFT split (cycled in a seeded order when there are more rows than posts).
      label_noise: probability that a rater's choice is flipped against the oracle.
      num_cnndm_rows: CNN/DM-style rows added to the last batch file (cnndm0.json gets 2 more).

    Returns:
      dict with "counts" (rows per file kind and split), "paths", "tie_rate",
      "noise_flips", "ask_win_pairs" and the arguments.
    """
    if len(num_sft) != 3 or len(num_comparisons) != 3:
        raise ValueError("num_sft and num_comparisons need three sizes each")
    for n_c, n_s in zip(num_comparisons, num_sft):
        if n_c and not n_s:
            raise ValueError("comparisons need posts in the matching SFT split")
    post_rng = random.Random(f"{seed}:posts")
    ref_rng = random.Random(f"{seed}:refs")
    cmp_rng = random.Random(f"{seed}:comparisons")
    misc_rng = random.Random(f"{seed}:misc")

    # Posts and ids.
    total = sum(num_sft)
    used, ids = set(), []
    while len(ids) < total:
        n = post_rng.randrange(36 ** 5, 36 ** 6)
        if n not in used:
            used.add(n)
            ids.append("t3_" + _to_base36(n))
    posts = [_make_post(post_rng, pid) for pid in ids]
    by_split: Dict[str, List[Dict]] = {}
    start = 0
    for split, n in zip(SFT_SPLITS, num_sft):
        by_split[split] = posts[start:start + n]
        for p in by_split[split]:
            p["facts"]["split"] = split
        start += n
    all_facts = [p["facts"] for p in posts]
    for p in posts:
        p["ref_struct"] = _reference_writer(ref_rng, p["facts"], all_facts, p["surface"])
        p["summary"] = render_summary(p["ref_struct"])

    paths: Dict[str, Any] = {"out_dir": out_dir}
    counts: Dict[str, Any] = {"sft": {}, "comparisons": {}, "preference": {}}
    for split in SFT_SPLITS:
        path = os.path.join(out_dir, "tldr_3_filtered", f"{split}.jsonl")
        _jsonl(path, [{k: p[k] for k in ("id", "subreddit", "title", "post", "summary")}
                      for p in by_split[split]])
        paths[f"sft_{split}"] = path
        counts["sft"][split] = len(by_split[split])
    facts_path = os.path.join(out_dir, "facts", "facts.jsonl")
    _jsonl(facts_path, all_facts)
    cat_path = os.path.join(out_dir, "facts", "catalogue.json")
    with open(cat_path, "w", encoding="utf-8") as f:
        json.dump(catalogue_json(), f, indent=1, sort_keys=True)
    paths["facts"], paths["catalogue"] = facts_path, cat_path

    # Comparisons.
    from slic_jax.data.oracle import analyze_summary  # pylint: disable=g-import-not-at-top
    pair_weights = [w for _, _, w in PAIR_TYPES]
    rows, pref, revs = [], {s: [] for s in MIRROR_SPLITS}, {s: [] for s in MIRROR_SPLITS}
    ties = flips = ask_wins = 0
    for sft_split, c_split, m_split, n_rows in zip(SFT_SPLITS, COMPARISON_SPLITS, MIRROR_SPLITS,
                                                   num_comparisons):
        split_posts = by_split[sft_split]
        order = list(range(len(split_posts)))
        for i in range(n_rows):
            if i % len(order) == 0:
                cmp_rng.shuffle(order)
            post = split_posts[order[i % len(order)]]
            facts = post["facts"]
            for _attempt in range(5):
                pa, pb, _ = cmp_rng.choices(PAIR_TYPES, weights=pair_weights)[0]
                sa = _policy_summary(cmp_rng, pa, post, all_facts)
                sb = _policy_summary(cmp_rng, pb, post, all_facts)
                ta, tb = render_summary(sa), render_summary(sb)
                score_a = analyze_summary(facts, ta)["score"]
                score_b = analyze_summary(facts, tb)["score"]
                if ta != tb and abs(score_a - score_b) > 1e-9:
                    break
            if cmp_rng.random() < 0.5:  # random presentation order
                pa, pb, sa, sb, ta, tb, score_a, score_b = (
                    pb, pa, sb, sa, tb, ta, score_b, score_a)
            if abs(score_a - score_b) <= 1e-9:
                ties += 1
                best = cmp_rng.randint(0, 1)
            else:
                best = 0 if score_a > score_b else 1
            flipped = cmp_rng.random() < label_noise
            flips += flipped
            choice = 1 - best if flipped else best
            structs, texts = (sa, sb), (ta, tb)
            if structs[best]["ask"] and not structs[1 - best]["ask"]:
                ask_wins += 1
            conf = min(9, 3 + int(2 * abs(score_a - score_b)) + cmp_rng.randint(0, 2))
            if flipped:
                conf = max(1, conf - 3)
            rows.append({
                "info": {"id": post["id"], "post": post["post"], "title": post["title"],
                         "subreddit": post["subreddit"]},
                "summaries": [{"text": ta, "policy": pa, "note": None},
                              {"text": tb, "policy": pb, "note": None}],
                "choice": choice, "worker": f"synthetic_rater_{cmp_rng.randint(0, 9)}",
                "batch": None, "split": c_split, "extra": {"confidence": conf},
            })
            prompt = make_prompt(post["subreddit"], post["title"], post["post"])
            pref[m_split].append({"prompt": prompt, "chosen": texts[choice],
                                  "rejected": texts[1 - choice]})
            revs[m_split].append({"prompt": prompt, "chosen": texts[choice],
                                  "rejected": texts[1 - choice],
                                  "revised": render_summary(_revise(structs[1 - choice], facts))})
        counts["comparisons"][c_split] = n_rows
        counts["preference"][m_split] = n_rows

    # Batch files (JSON lines, like the real release); CNN/DM rows go to the last one.
    n_files = max(1, min(MAX_BATCH_FILES, len(rows)))
    files: List[List[Dict]] = [[] for _ in range(n_files)]
    for i, row in enumerate(rows):
        k = i * n_files // max(1, len(rows))
        row["batch"] = f"batch{FIRST_BATCH + k}"
        files[k].append(row)
    last = f"batch{FIRST_BATCH + n_files - 1}"
    files[-1].extend(_cnndm_row(misc_rng, i, last) for i in range(num_cnndm_rows))
    paths["comparisons"] = []
    for k, file_rows in enumerate(files):
        path = os.path.join(out_dir, "comparisons", f"batch{FIRST_BATCH + k}.json")
        _jsonl(path, file_rows)
        paths["comparisons"].append(path)
    cnndm_path = os.path.join(out_dir, "comparisons", "cnndm0.json")
    _jsonl(cnndm_path, [_cnndm_row(misc_rng, 1000 + i, "cnndm0") for i in range(2)])
    paths["cnndm"] = cnndm_path
    counts["cnndm_rows"] = num_cnndm_rows + 2
    for m_split in MIRROR_SPLITS:
        path = os.path.join(out_dir, "preference", f"{m_split}.jsonl")
        _jsonl(path, pref[m_split])
        paths[f"preference_{m_split}"] = path
        rpath = os.path.join(out_dir, "revisions", f"{m_split}.jsonl")
        _jsonl(rpath, revs[m_split])
        paths[f"revisions_{m_split}"] = rpath

    n_cmp = max(1, len(rows))
    info = {
        "generator_version": GENERATOR_VERSION, "seed": seed, "label_noise": label_noise,
        "num_sft": list(num_sft), "num_comparisons": list(num_comparisons),
        "num_cnndm_rows": num_cnndm_rows, "counts": counts,
        "tie_rate": round(ties / n_cmp, 4), "noise_flip_rate": round(flips / n_cmp, 4),
        "ask_win_rate": round(ask_wins / n_cmp, 4),
        "policies": list(POLICIES),
    }
    world_path = os.path.join(out_dir, "world.json")
    with open(world_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    paths["world"] = world_path
    return {**info, "paths": paths}
