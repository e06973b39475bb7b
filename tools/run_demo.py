r"""The main job on the embedded default: SFT, then SLiC-HF-direct, then a held-out table.

    python tools/run_demo.py [--work_dir=/tmp/slic_jax_demo]

1. writes the synthetic TL;DR world (real file schemas) to ``{work_dir}/data``;
2. ``python -m slic_jax.train --gin_file=gin/sft.gin`` (tiny T5, SFT on the references);
3. ``python -m slic_jax.train --gin_file=gin/slic_hf.gin`` from the SFT checkpoint
   (SLiC-HF-direct on the human-style comparisons);
4. scores both final checkpoints on held-out data the training never saw:
   - pair accuracy on the valid2 ('test') comparisons: mean[log π(y+|x) > log π(y−|x)];
   - oracle win rate of the greedy summary against the human reference summary on
     the SFT test posts (the oracle knows each post's hidden facts; ties count ½);
   - mean summary length in words, and mean oracle score;
and prints the table (also written to ``{work_dir}/results.json`` and ``.md``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def run_trainer(gin_file: str, bindings: dict[str, str], env: dict[str, str], log_path: str) -> None:
  cmd = [sys.executable, "-m", "slic_jax.train", f"--gin_file={gin_file}"]
  cmd += [f"--gin.{k}={v}" for k, v in bindings.items()]
  print("$ " + " ".join(cmd), flush=True)
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.wait()
  with open(log_path) as log:
    lines = log.read().splitlines()
  progress = [l for l in lines if l.startswith(("step ", "eval @"))]
  for line in progress[-4:]:
    print("   " + line)
  if proc.returncode:
    print("\n".join(lines[-40:]), file=sys.stderr)
    raise SystemExit(f"trainer failed ({proc.returncode}); full log: {log_path}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--work_dir", default="/tmp/slic_jax_demo")
  ap.add_argument("--sft_steps", type=int, default=400)
  ap.add_argument("--slic_steps", type=int, default=300)
  ap.add_argument("--eval_posts", type=int, default=500)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--fresh", action="store_true", help="delete previous runs in work_dir first")
  args = ap.parse_args()

  import shutil

  from slic_jax.data import synthetic

  t0 = time.time()
  work = os.path.abspath(args.work_dir)
  data_dir = os.path.join(work, "data")
  if args.fresh and os.path.isdir(work):
    shutil.rmtree(work)
  os.makedirs(work, exist_ok=True)
  if not os.path.isdir(data_dir):
    counts = synthetic.generate_world(data_dir, seed=args.seed)
    print(f"synthetic TL;DR world → {data_dir}: {counts['counts']}")
  env = dict(os.environ, SLIC_JAX_TLDR_DIR=data_dir)
  os.environ["SLIC_JAX_TLDR_DIR"] = data_dir

  sft_dir, slic_dir = os.path.join(work, "sft"), os.path.join(work, "slic_hf")
  print(f"[1/3] SFT, {args.sft_steps} steps")
  run_trainer("gin/sft.gin", {
      "MODEL_DIR": repr(sft_dir), "TRAIN_STEPS": str(args.sft_steps),
      "RANDOM_SEED": str(args.seed)}, env, os.path.join(work, "sft.log"))
  print(f"[2/3] SLiC-HF-direct from the SFT checkpoint, {args.slic_steps} steps")
  run_trainer("gin/slic_hf.gin", {
      "MODEL_DIR": repr(slic_dir), "INITIAL_CHECKPOINT_PATH": repr(sft_dir),
      "TRAIN_STEPS": str(args.sft_steps + args.slic_steps),
      "RANDOM_SEED": str(args.seed)}, env, os.path.join(work, "slic_hf.log"))

  print("[3/3] held-out evaluation")
  from slic_jax import tldr_eval

  rows = tldr_eval.evaluate_runs(
      gin_file="gin/slic_hf.gin", data_dir=data_dir,
      runs={"SFT": sft_dir, "SLiC-HF-direct": slic_dir}, eval_posts=args.eval_posts,
  )
  table = tldr_eval.format_table(rows)
  print(table)
  with open(os.path.join(work, "results.json"), "w") as f:
    json.dump(rows, f, indent=2)
  with open(os.path.join(work, "results.md"), "w") as f:
    f.write(table + "\n")
  print(f"total {time.time() - t0:.0f}s; results in {work}/results.{{json,md}}")


if __name__ == "__main__":
  main()
