r"""SFT examples per second with and without packing, from slic_jax.train's own metrics.

Runs ``python -m slic_jax.train --gin_file=gin/sft.gin`` once with
``pack = False`` (one example per row, the experiment's setting) and once with
``pack = True`` (T5X's default: seqio packs examples into rows), same steps, batch and
lengths, each in its own process, and reads each run's ``metrics.jsonl``: per report
window, examples/s = the window's ``num_examples`` (examples, not rows, when packed) ×
``timing/steps_per_second`` / steps in the window. The first window (compiles) is left
out; the median of the others is reported, with rows/s (``timing/seqs_per_second``)
beside it. ``--repeats N`` alternates the two N times (padded, packed, padded, ...) and
compares the medians over the runs of each (this VM's speed drifts between processes).

``--variant NAME=BINDING[;BINDING...]`` (repeatable) adds a configuration beside the
experiment's own ('default'): each round runs every variant padded and packed in turn,
and the result has each variant's medians and its examples/s against 'default' at the
same packing (e.g. the CPU softmax kernels with
``--variant "kernels=network.T5Config.attention_implementation='fused_softmax'"``).

    .venv/bin/python tools/bench_packing.py --steps 60 --stats_period 6 --repeats 2 \
        [--world_dir DIR] [--gin 'BINDING' ...] [--variant NAME=BINDINGS ...] [--out results.json]

Without ``--world_dir`` it writes the synthetic world (default sizes) to a temporary
directory. How much packing gains depends on how much of each row an example fills: the
synthetic posts are short, real TL;DR posts fill far more of 512 input tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = "default"  # the experiment as configured (with --gin), no variant bindings


def examples_per_second(records: list[dict], stats_period: int) -> dict:
  """Median examples/s and rows/s over the train windows after the first."""
  train = [r for r in records if r["split"] == "train"][1:]
  if not train:
    raise ValueError("no train report after the first window: raise --steps")
  ex = [r["num_examples"] * r["timing/steps_per_second"] / stats_period for r in train]
  rows = [r["timing/seqs_per_second"] for r in train]
  return {"examples_per_second": statistics.median(ex), "rows_per_second": statistics.median(rows),
          "examples_per_row": statistics.median(
              r["num_examples"] / (r["timing/seqs_per_second"] / r["timing/steps_per_second"]
                                   * stats_period) for r in train),
          "windows": len(train)}


def parse_variant(text: str) -> tuple[str, list[str]]:
  """'NAME=B1;B2' -> ('NAME', ['B1', 'B2']); a clear error otherwise."""
  name, sep, bindings = text.partition("=")
  name = name.strip()
  bound = [b.strip() for b in bindings.split(";") if b.strip()]
  if not sep or not name or not bound or name == DEFAULT:
    raise argparse.ArgumentTypeError(
        f"--variant {text!r}: expected NAME=BINDING[;BINDING...] with a NAME other than "
        f"{DEFAULT!r}, e.g. \"kernels=network.T5Config.attention_implementation='fused_softmax'\"")
  return name, bound


def summarize(runs: list[dict]) -> dict:
  """Medians over the runs of each (variant, pack), and each variant's examples/s against
  'default' at the same packing and packed against padded."""
  keys = ("examples_per_second", "rows_per_second", "examples_per_row")
  variants = list(dict.fromkeys(r.get("variant", DEFAULT) for r in runs))
  med = {}
  for v in variants:
    for pack in (False, True):
      mine = [r for r in runs if r.get("variant", DEFAULT) == v and r["pack"] == pack]
      if mine:
        med[(v, pack)] = {k: statistics.median(r[k] for r in mine) for k in keys}
  out = {"median_over_runs": {}, "packed_vs_padded": {}, "vs_default": {}}
  for (v, pack), m in med.items():
    name = f"pack_{pack}" if v == DEFAULT else f"{v}/pack_{pack}"
    out["median_over_runs"][name] = m
    if v != DEFAULT and (DEFAULT, pack) in med:
      out["vs_default"][f"{v}/pack_{pack}"] = (
          m["examples_per_second"] / med[(DEFAULT, pack)]["examples_per_second"])
  for v in variants:
    if (v, False) in med and (v, True) in med:
      out["packed_vs_padded"][v] = (med[(v, True)]["examples_per_second"]
                                    / med[(v, False)]["examples_per_second"])
  return out


def run(pack: bool, args, workdir: str, repeat: int, variant: str = DEFAULT,
        bindings: tuple[str, ...] = ()) -> dict:
  model_dir = os.path.join(workdir, f"pack_{pack}_{repeat}" if variant == DEFAULT
                           else f"{variant}_pack_{pack}_{repeat}")
  cmd = [sys.executable, "-m", "slic_jax.train", "--gin_file=gin/sft.gin",
         f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={args.steps}",
         f"--gin.EVAL_PERIOD={args.steps}", f"--gin.EVAL_STEPS=1",
         f"--gin.train.stats_period={args.stats_period}",
         f"--gin.train/input_pipeline.DatasetConfig.pack={pack}",
         f"--gin.CHECKPOINT_PERIOD={args.steps}",
         *[f"--gin_bindings={b}" for b in (*args.gin, *bindings)]]
  env = dict(os.environ, SLIC_JAX_TLDR_DIR=args.world_dir)
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {"pack": pack, "repeat": repeat, "variant": variant,
          **examples_per_second(records, args.stats_period)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--stats_period", type=int, default=6)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--world_dir", default=None)
  p.add_argument("--gin", action="append", default=[], help="extra gin binding")
  p.add_argument("--variant", action="append", default=[], type=parse_variant,
                 help="NAME=BINDING[;BINDING...]: also run with these bindings (repeatable)")
  p.add_argument("--out", default=None)
  p.add_argument("--workdir", default=None,
                 help="keep the runs' model dirs (and the world) here (default: a temporary "
                      "directory, removed at the end)")
  args = p.parse_args(argv)
  if args.workdir is None:
    with tempfile.TemporaryDirectory(prefix="bench_packing_") as workdir:
      return _bench(args, workdir)
  os.makedirs(args.workdir, exist_ok=True)
  return _bench(args, args.workdir)


def _bench(args, workdir):
  if args.world_dir is None:
    sys.path.insert(0, REPO)
    from slic_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    args.world_dir = os.path.join(workdir, "world")
    synthetic.generate_world(args.world_dir)
  variants = [(DEFAULT, [])] + list(args.variant)
  if len({name for name, _ in variants}) != len(variants):
    raise SystemExit(f"--variant names must differ: {[name for name, _ in variants]}")
  runs = [run(pack, args, workdir, r, name, tuple(bindings))
          for r in range(args.repeats) for name, bindings in variants for pack in (False, True)]
  result = {"command": shlex.join(sys.argv),
            "variants": {name: bindings for name, bindings in variants}, "runs": runs,
            **summarize(runs)}
  result["ratio_examples_per_second"] = result["packed_vs_padded"][DEFAULT]
  for r in runs:
    print(f"{r['variant']:>10} pack={r['pack']!s:5} run {r['repeat']}  "
          f"{r['examples_per_second']:8.1f} examples/s  {r['rows_per_second']:8.1f} rows/s  "
          f"{r['examples_per_row']:.2f} examples/row")
  for name, ratio in result["packed_vs_padded"].items():
    print(f"{name}: packed / padded examples/s (medians over runs): {ratio:.2f}x")
  for name, ratio in result["vs_default"].items():
    print(f"{name} / default examples/s (medians over runs): {ratio:.2f}x")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
