"""Side-by-side table of the session-12 H200 runs: python benchmarks/gpu_h200_session12/summarize.py"""
import json
import pathlib

RAW = pathlib.Path(__file__).parent / "raw"
load = lambda name: json.loads((RAW / name).read_text())
mm_jax, mm_torch = load("mm_jax.json"), load("mm_torch.json")
peaks = {"float32": mm_jax["jax_float32_flops_per_s"], "bfloat16": mm_jax["jax_bfloat16_flops_per_s"]}
rows = [  # (pairs, dtype, slic_jax file, TRL file)
    (4, "float32", "small_f32_b4.json", "peer_b4_f32.json"),
    (32, "float32", "small_f32_b32.json", "peer_b32_f32.json"),
    (32, "bfloat16", "small_bf16_b32.json", "peer_b32_bf16.json"),
    (128, "bfloat16", "slic_b128_bf16.json", "peer_b128_bf16.json"),
]
print("| pairs | dtype | slic_jax pairs/s | TRL pairs/s | speed-up | slic_jax model TFLOP/s | "
      "of jax matmul peak | slic_jax peak device MB | TRL peak device MB | slic_jax compile s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for pairs, dtype, s_name, p_name in rows:
  s, p = load(s_name), load(p_name)
  assert s["batch_pairs"] == pairs and s["dtype"] == dtype and s["device_kind"] == p["device_name"]
  fl = s["achieved_model_flops_per_s"]
  print(f"| {pairs} | {dtype}{' (TRL: TF32)' if dtype == 'float32' else ' (TRL: autocast)'} | "
        f"{s['pairs_per_s']:.0f} | {p['pairs_per_s']:.0f} | {s['pairs_per_s'] / p['pairs_per_s']:.2f}x | "
        f"{fl / 1e12:.0f} | {100 * fl / peaks[dtype]:.0f}% | {s['peak_device_memory_mb']:.0f} | "
        f"{p['peak_device_memory_mb']:.0f} | {s['compile_s']:.0f} |")
print()
print(f"Matmul peaks at N={mm_jax['n']} ({mm_jax['device_kind']}): jax float32 (XLA default, TF32) "
      f"{mm_jax['jax_float32_flops_per_s'] / 1e12:.0f}, float32 HIGHEST "
      f"{mm_jax['jax_float32highest_flops_per_s'] / 1e12:.0f}, bf16 {mm_jax['jax_bfloat16_flops_per_s'] / 1e12:.0f}; "
      f"torch float32 TF32 {mm_torch['torch_float32_flops_per_s'] / 1e12:.0f}, bf16 "
      f"{mm_torch['torch_bfloat16_flops_per_s'] / 1e12:.0f} TFLOP/s.")
