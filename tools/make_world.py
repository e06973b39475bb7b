"""Writes the synthetic TL;DR world (see slic_jax/data/synthetic.py) and prints its counts.

    python tools/make_world.py --out_dir=/tmp/tldr_world [--seed=0] \
        [--num_sft_train=4000 --num_sft_valid=500 --num_sft_test=500] \
        [--num_cmp_train=4000 --num_cmp_valid1=500 --num_cmp_valid2=500] \
        [--label_noise=0.15] [--num_cnndm_rows=3]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slic_jax.data import synthetic  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate the synthetic TL;DR world.")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_sft_train", type=int, default=4000)
    p.add_argument("--num_sft_valid", type=int, default=500)
    p.add_argument("--num_sft_test", type=int, default=500)
    p.add_argument("--num_cmp_train", type=int, default=4000)
    p.add_argument("--num_cmp_valid1", type=int, default=500)
    p.add_argument("--num_cmp_valid2", type=int, default=500)
    p.add_argument("--label_noise", type=float, default=0.15)
    p.add_argument("--num_cnndm_rows", type=int, default=3)
    args = p.parse_args(argv)
    start = time.time()
    info = synthetic.generate_world(
        args.out_dir, seed=args.seed,
        num_sft=(args.num_sft_train, args.num_sft_valid, args.num_sft_test),
        num_comparisons=(args.num_cmp_train, args.num_cmp_valid1, args.num_cmp_valid2),
        label_noise=args.label_noise, num_cnndm_rows=args.num_cnndm_rows)
    summary = {k: v for k, v in info.items() if k != "paths"}
    print(json.dumps(summary, indent=1, sort_keys=True))
    print(f"wrote {args.out_dir} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
