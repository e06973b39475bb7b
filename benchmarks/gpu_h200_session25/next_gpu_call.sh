#!/usr/bin/env bash
# Prepared in session 25 for the next session with an NVIDIA GPU; NOT YET RUN ON A GPU.
# One device call (about 6 minutes with a 60-90 s machine start; BUDGET in seconds):
#  1. the bf16 + cuDNN step at 32 pairs with the per-array Adafactor update ('fused', the
#     default) and with arrays of one shape stacked ('grouped'), twice each, alternated: on
#     the H200 the per-array update was 1550 of the step's 2546 kernels (NOTES, session 25);
#  2. jax's bf16 matmul peak in the same call (session 25 had none of its own);
#  3. a profile of the better-looking variant with the GPU-aware tools/profile_step.py (trace
#     and HLO kept; re-read off the device with --from_trace DIR --hlo FILE);
#  4. 'grouped' at 128 pairs.
#   run: OUT=dir bash benchmarks/gpu_h200_session25/next_gpu_call.sh   (carry .whl: gin, clu,
#   ml_collections wheels under .whl/base, as the session 24/25 calls)
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-400}
W=/tmp/next; mkdir -p $W
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/base/gin_config*.whl .whl/base/clu*.whl .whl/base/ml_coll*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONFAULTHANDLER=1 JAX_THREEFRY_GPU_KERNEL_LOWERING=1 PYTHONUNBUFFERED=1
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
pack() { tar -czf $OUT/results.tar.gz -C $W . 2>/dev/null; }
row() { # name batch optimizer_implementation
  local name=$1 b=$2 impl=$3; local l; l=$(left)
  if (( l < 45 )); then echo "SKIP $name (time)"; return; fi
  local lim=$(( l < 90 ? l : 90 ))
  echo "=== $name (limit $lim s)"
  timeout -s ABRT $lim python3 tools/benchmark.py --_worker slic --size small --li 512 --lt 64 \
    --batch $b --steps 10 --warmup 3 --seed 0 --reg_target chosen --logits_dtype float32 \
    --host_malloc reuse --microbatches 1 --dtype bfloat16 --remat none \
    --attention_implementation cudnn --optimizer_implementation $impl >"$W/$name.json" 2>"$W/$name.err"
  echo "rc=$? at $(( $(date +%s) - T0 )) s"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('optimizer_implementation','step_s_median','step_s_min','pairs_per_s','achieved_model_flops_per_s','peak_device_memory_mb','compile_s','final_loss')})" "$W/$name.json" 2>/dev/null || tail -c 800 $W/$name.err
  pack
}
row fused_b32_1 32 fused
row grouped_b32_1 32 grouped
row fused_b32_2 32 fused
row grouped_b32_2 32 grouped
timeout 40 python3 tools/benchmark.py --_worker matmul --matmul_n 8192 --matmul_reps 10 > $W/mm_jax.json 2>$W/mm_jax.err
head -c 400 $W/mm_jax.json; echo; pack
best=$(python3 -c "
import json
r = {}
for n in ('fused_b32_1', 'fused_b32_2', 'grouped_b32_1', 'grouped_b32_2'):
  try: r.setdefault(n.split('_')[0], []).append(json.load(open('$W/' + n + '.json'))['pairs_per_s'])
  except Exception: pass
print(max(r, key=lambda k: max(r[k])) if r else 'fused')")
if (( $(left) > 150 )); then
  echo "=== profile, $best, 32 pairs"
  timeout -s ABRT 140 python3 tools/profile_step.py --size small --batch 32 --li 512 --lt 64 \
    --dtype bfloat16 --logits_dtype float32 --reg_target chosen --attention_implementation cudnn \
    --optimizer_implementation $best --top 30 --top_ops 20 --warmup 3 --trace_dir $W/trace \
    --dump_hlo $W/hlo.txt > $W/profile.txt 2>&1
  echo "rc=$? at $(( $(date +%s) - T0 )) s"; head -c 2500 $W/profile.txt
  gzip -f $W/hlo.txt 2>/dev/null; find $W/trace -name "*.xplane.pb" -delete 2>/dev/null; pack
fi
row grouped_b128 128 grouped
echo "done at $(( $(date +%s) - T0 )) s"; ls -la $OUT
