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

    .venv/bin/python tools/bench_packing.py --steps 60 --stats_period 6 --repeats 2 \
        [--world_dir DIR] [--gin 'BINDING' ...] [--out results.json]

Without ``--world_dir`` it writes the synthetic world (default sizes) to a temporary
directory. How much packing gains depends on how much of each row an example fills: the
synthetic posts are short, real TL;DR posts fill far more of 512 input tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def run(pack: bool, args, workdir: str, repeat: int) -> dict:
  model_dir = os.path.join(workdir, f"pack_{pack}_{repeat}")
  cmd = [sys.executable, "-m", "slic_jax.train", "--gin_file=gin/sft.gin",
         f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={args.steps}",
         f"--gin.EVAL_PERIOD={args.steps}", f"--gin.EVAL_STEPS=1",
         f"--gin.train.stats_period={args.stats_period}",
         f"--gin.train/input_pipeline.DatasetConfig.pack={pack}",
         f"--gin.CHECKPOINT_PERIOD={args.steps}",
         *[f"--gin_bindings={b}" for b in args.gin]]
  env = dict(os.environ, SLIC_JAX_TLDR_DIR=args.world_dir)
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {"pack": pack, "repeat": repeat, **examples_per_second(records, args.stats_period)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--stats_period", type=int, default=6)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--world_dir", default=None)
  p.add_argument("--gin", action="append", default=[], help="extra gin binding")
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
  runs = [run(pack, args, workdir, r) for r in range(args.repeats) for pack in (False, True)]
  summary = {}
  for pack in (False, True):
    mine = [r for r in runs if r["pack"] == pack]
    summary[pack] = {k: statistics.median(r[k] for r in mine)
                     for k in ("examples_per_second", "rows_per_second", "examples_per_row")}
  result = {"command": " ".join(sys.argv), "runs": runs,
            "median_over_runs": {f"pack_{k}": v for k, v in summary.items()},
            "ratio_examples_per_second": (summary[True]["examples_per_second"]
                                          / summary[False]["examples_per_second"])}
  for r in runs:
    print(f"pack={r['pack']!s:5} run {r['repeat']}  {r['examples_per_second']:8.1f} examples/s  "
          f"{r['rows_per_second']:8.1f} rows/s  {r['examples_per_row']:.2f} examples/row")
  print(f"packed / padded examples/s (medians over runs): "
        f"{result['ratio_examples_per_second']:.2f}x")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
