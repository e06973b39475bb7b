"""Table of the session-14 H200 runs: python benchmarks/gpu_h200_session14/summarize.py

raw/call1: `OUT=... bash benchmarks/gpu_h200_session14/run.sh` (32 pairs; the device returned
its log, the matmul peaks and two rows' JSON: each row's figures are read from the dict the
script printed after it). raw/call2: 128 pairs, slic_jax bf16 remat 'full' and TRL bf16 (same
flags as run.sh's rows, --batch 128 --steps 6 --warmup 2). raw/call3: the four TRL rows and
slic_jax bf16 remat again, 32 pairs, same flags (a second sample on the same warm machine).
"""
import ast
import json
import pathlib
import re

RAW = pathlib.Path(__file__).parent / "raw"
load = lambda p: json.loads((RAW / p).read_text())


def call1_rows():
  rows, name = {}, None
  for line in (RAW / "call1" / "log.txt").read_text().splitlines():
    m = re.match(r"=== (\S+)", line)
    if m:
      name = m.group(1)
    elif line.startswith("{'") and name:
      rows[name] = ast.literal_eval(line)
  return rows


mm = load("call1/mm_jax.json")
torch_mm = load("call1/mm_torch.json")
peak = {"float32": mm["jax_float32_flops_per_s"], "bfloat16": mm["jax_bf16f32acc_flops_per_s"]}
flops32 = load("call1/slic_bf16.json")["model_flops_per_step"]  # 32 pairs, model as configured
flops128 = load("call2/slic_bf16_remat_b128.json")["model_flops_per_step"]
c1 = call1_rows()
c3 = {p.stem: load(f"call3/{p.name}") for p in sorted((RAW / "call3").glob("*.json"))}
c2 = {p.stem: load(f"call2/{p.name}") for p in sorted((RAW / "call2").glob("*.json"))}

SLIC = [("slic_bf16", "bfloat16", "none", 1), ("slic_bf16_remat", "bfloat16", "full", 1),
        ("slic_bf16_mb4", "bfloat16", "none", 4), ("slic_f32", "float32", "none", 1),
        ("slic_f32_remat", "float32", "full", 1)]
TRL = [("trl_bf16", "bfloat16", "on (CPOConfig default)"), ("trl_bf16_nockpt", "bfloat16", "off"),
       ("trl_f32", "float32", "on (CPOConfig default)"), ("trl_f32_nockpt", "float32", "off")]


def fmt(v, spec="{:.0f}"):
  return "–" if v is None else spec.format(v)


print("| pairs | framework | dtype | remat / checkpointing | microbatches | pairs/s (call 1 / call 3) "
      "| model TFLOP/s | of jax matmul peak | peak device MB |")
print("|---|---|---|---|---|---|---|---|---|")
for name, dtype, remat, mb in SLIC:
  r = c1[name]
  again = c3.get(name)
  ps = fmt(r["pairs_per_s"]) + (" / " + fmt(again["pairs_per_s"]) if again else "")
  fl = flops32 / r["step_s_median"]
  print(f"| 32 | slic_jax | {dtype} | {remat} | {mb} | {ps} | {fl / 1e12:.0f} | "
        f"{100 * fl / peak[dtype]:.0f}% | {r['peak_device_memory_mb']:.0f} |")
for name, dtype, ckpt in TRL:
  r, again = c1[name], c3[name]
  assert again["num_params"] == 76961152 and again["lm_head"] == "separate"
  print(f"| 32 | TRL CPOTrainer | {dtype}{' (TF32)' if dtype == 'float32' else ' autocast'} | {ckpt} | "
        f"1 | {fmt(r['pairs_per_s'])} / {fmt(again['pairs_per_s'])} | | | "
        f"{r['peak_device_memory_mb']:.0f} / {again['peak_device_memory_mb']:.0f} |")
s, t = c2["slic_bf16_remat_b128"], c2["trl_bf16_b128"]
fl = flops128 / s["step_s_median"]
print(f"| 128 | slic_jax | bfloat16 | full | 1 | {s['pairs_per_s']:.0f} | {fl / 1e12:.0f} | "
      f"{100 * fl / peak['bfloat16']:.0f}% | {s['peak_device_memory_mb']:.0f} |")
print(f"| 128 | TRL CPOTrainer | bfloat16 autocast | on (CPOConfig default) | 1 | {t['pairs_per_s']:.0f} "
      f"| | | {t['peak_device_memory_mb']:.0f} |")
INIT_S = re.findall(r"\+([0-9.]+)s\] state initialised", (RAW / "call1" / "log.txt").read_text())
print()
print(f"Matmul peaks at N={mm['n']} ({mm['device_kind']}, call 1): jax float32 (XLA default, TF32) "
      f"{mm['jax_float32_flops_per_s'] / 1e12:.0f}, bf16 x bf16 -> f32 "
      f"{mm['jax_bf16f32acc_flops_per_s'] / 1e12:.0f}, float32 HIGHEST "
      f"{mm['jax_float32highest_flops_per_s'] / 1e12:.0f}; torch float32 TF32 "
      f"{torch_mm['torch_float32_flops_per_s'] / 1e12:.0f}, bf16 "
      f"{torch_mm['torch_bfloat16_flops_per_s'] / 1e12:.0f} TFLOP/s. TRL: T5 with its own lm_head "
      f"(77.0M parameters, as slic_jax). slic_jax state initialisation "
      f"{', '.join(INIT_S)} s "
      f"(JAX_THREEFRY_GPU_KERNEL_LOWERING=1).")
