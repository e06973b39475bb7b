"""Trains the SentencePiece vocabulary of the synthetic TL;DR world.

    python tools/train_vocab.py [--out_prefix=slic_jax/assets/tldr_synth_spm] [--vocab_size=512]

Generates the default world (seed 0) in a temporary directory, collects its text (posts split at
newlines, titles, SFT and comparison summaries, revisions) plus the scaffolding strings of the
project's prompts ("SUBREDDIT: r/", "TITLE:", "POST:", "TL;DR:", the ranker's "[CONTEXT]",
"[SUMMARY A]", "[SUMMARY B]", targets "A"/"B"/"Good"/"Bad", the TLCR marker, every ASCII
character) and a lexicon of all its words (see `world_sentences`), and trains a
unigram model with seqio's ids: pad_id=0, eos_id=1, unk_id=2, no BOS; vocab_size 512 (the
model's vocab_size is 512), character_coverage 1.0, one thread (deterministic).
Writes <out_prefix>.model and <out_prefix>.vocab.
"""
import argparse
import glob
import json
import os
import string
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slic_jax.data import synthetic  # noqa: E402

SCAFFOLDING = [
    "SUBREDDIT: r/relationships TITLE: POST: TL;DR:",
    "[CONTEXT] [SUMMARY A] [SUMMARY B] A B",
    "[CONTEXT] [SUMMARY] Good Bad",
    "<|Start Of Modified Response|>",
    string.ascii_uppercase,
    string.ascii_lowercase,
    string.digits,
    "! \" # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~",
]


def world_sentences(data_dir):
    out = []
    for path in sorted(glob.glob(os.path.join(data_dir, "tldr_3_filtered", "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                out.append(f"SUBREDDIT: r/{row['subreddit']}")
                out.append(f"TITLE: {row['title']}")
                out.extend(f"POST: {p}" if i == 0 else p
                           for i, p in enumerate(row["post"].split("\n")))
                out.append(f"TL;DR:{row['summary']}")
    for path in sorted(glob.glob(os.path.join(data_dir, "comparisons", "*.json"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                out.extend(s["text"] for s in row["summaries"])
    for path in sorted(glob.glob(os.path.join(data_dir, "revisions", "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                out.append(json.loads(line)["revised"])
    # Scaffolding, repeated so that its words become pieces.
    out.extend(SCAFFOLDING * 200)
    out = [s.strip() for s in out if s.strip()]
    # A lexicon: every distinct word once as its own sentence. The unigram trainer only takes
    # seed pieces that are right-maximal substrings; in this world most words ("my", "should")
    # are always followed by a space, so without the lexicon they never become pieces and get
    # split into characters.
    return out + sorted({w for s in out for w in s.split()})


def main(argv=None):
    default_prefix = os.path.splitext(synthetic.VOCAB_PATH)[0]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--out_prefix", default=default_prefix)
    parser.add_argument("--vocab_size", type=int, default=synthetic.SPM_VOCAB_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.generate_world(tmp, seed=args.seed)
        sentences = world_sentences(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(args.out_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=args.out_prefix,
        model_type="unigram",
        vocab_size=args.vocab_size,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    print(f"wrote {args.out_prefix}.model ({args.vocab_size} pieces, "
          f"{len(sentences)} training sentences)")


if __name__ == "__main__":
    main()
