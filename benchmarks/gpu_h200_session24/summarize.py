"""The table of session 24's GPU rows (benchmarks/NOTES.md, session 24, finding 1).

  python benchmarks/gpu_h200_session24/summarize.py

Reads raw/call1 (run.sh) and raw/call2 (call2.sh: the two bf16 rows again, other order) as
the device returned them. Model TFLOP/s is tools/benchmark.py's FLOP count of the model as
configured over the median step; "of jax bf16 peak" divides it by call 1's jax bf16 × bf16
matmul peak at N = 8192 (best of 10).
"""
import json
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "raw")


def load(call, name):
  path = os.path.join(HERE, call, name + ".json")
  return json.load(open(path)) if os.path.exists(path) else None


def main():
  mm = load("call1", "mm_jax")
  peak = mm["jax_bfloat16_flops_per_s"]
  trl = load("call1", "trl_bf16")
  print(f"jax matmul peaks (call 1, N 8192, best of 10): bf16 {peak / 1e12:.0f}, bf16 -> f32 "
        f"{mm['jax_bf16f32acc_flops_per_s'] / 1e12:.0f}, float32 (TF32) "
        f"{mm['jax_float32_flops_per_s'] / 1e12:.0f} TFLOP/s\n")
  print("| call | framework | dtype | attention | remat / checkpointing | pairs/s | vs TRL default "
        "(call 1) | model TFLOP/s | of jax bf16 peak | peak device MB | loss after 13 steps |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  rows = [("call1", "slic_bf16"), ("call1", "slic_bf16_cudnn"), ("call2", "slic_bf16_cudnn_2"),
          ("call2", "slic_bf16_2"), ("call1", "slic_bf16_remat"),
          ("call1", "slic_bf16_remat_cudnn"), ("call1", "slic_f32")]
  for call, name in rows:
    d = load(call, name)
    if d is None:
      continue
    print(f"| {call[-1]} | slic_jax | {d['dtype']} | {d['attention_implementation']} | "
          f"{d['remat']} | {d['pairs_per_s']:.0f} | "
          f"{d['pairs_per_s'] / trl['pairs_per_s']:.1f}× | "
          f"{d['achieved_model_flops_per_s'] / 1e12:.0f} | "
          f"{d['achieved_model_flops_per_s'] / peak:.0%} | {d['peak_device_memory_mb']:.0f} | "
          f"{d['final_loss']:.2f} |")
  for name in ("trl_bf16", "trl_bf16_nockpt"):
    d = load("call1", name)
    print(f"| 1 | TRL CPOTrainer | bfloat16 autocast | eager (transformers T5) | "
          f"{'on (CPOConfig default)' if d['gradient_checkpointing'] else 'off'} | "
          f"{d['pairs_per_s']:.0f} | {d['pairs_per_s'] / trl['pairs_per_s']:.1f}× | | | "
          f"{d['peak_device_memory_mb']:.0f} | |")


if __name__ == "__main__":
  main()
