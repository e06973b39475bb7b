#!/usr/bin/env bash
# session 14, one device call on an NVIDIA H200 (or H100): SLiC-HF step at 32 pairs, T5 1.1
# small, Li 512, Lt 64, TRL's 2-row loss, after session 12's findings 3-4 and session 13's
# fused optimizer: slic_jax bf16 and float32 with and without remat 'full' against TRL
# CPOTrainer with and without its gradient checkpointing (lm_head separate: the same
# 77.0M-parameter model), and the matmul peaks of both libraries.
# JAX_THREEFRY_GPU_KERNEL_LOWERING=1: the parameter initialisation's threefry runs as one
# CUDA kernel instead of XLA's unrolled rounds (same bits; session 12's workers spent 68-80 s
# compiling the jitted init).
#   run: OUT=dir bash benchmarks/gpu_h200_session14/run.sh   (device: $OUT is given)
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-545}
PY=${PY:-python3}; PEER_PY=${PEER_PY:-python3}; DEV=${DEV:-cuda}
SIZE=${SIZE:-small}; BATCH=${BATCH:-32}; LI=${LI:-512}; MM_N=${MM_N:-8192}
[ -n "${SKIP_PIP:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/base/*.whl .whl/ds52/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONFAULTHANDLER=1 JAX_THREEFRY_GPU_KERNEL_LOWERING=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
"$PY" -c "import jax; print(jax.__version__, jax.devices())"
echo "setup $(( $(date +%s) - T0 )) s"
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
slic() { # name limit args...
  local name=$1 lim=$2; shift 2; local l; l=$(left)
  if (( l < 45 )); then echo "SKIP $name (time)"; return; fi
  (( lim > l )) && lim=$l
  echo "=== $name (limit $lim s)"
  timeout -s ABRT "$lim" "$PY" tools/benchmark.py --_worker slic --size $SIZE --li $LI --lt 64 \
    --batch $BATCH --steps 10 --warmup 3 --seed 0 --reg_target chosen --logits_dtype float32 \
    --host_malloc reuse "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"
  echo "rc=$? at $(( $(date +%s) - T0 )) s"; grep -v "step [0-9]*:" "$OUT/$name.err" | tail -c 1200
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('step_s_median','pairs_per_s','peak_device_memory_mb','compile_s','final_loss')})" "$OUT/$name.json" 2>/dev/null
}
trl() { # name args...
  local name=$1; shift; local l; l=$(left)
  if (( l < 30 )); then echo "SKIP $name (time)"; return; fi
  echo "=== $name"
  timeout -s ABRT $(( l < 90 ? l : 90 )) "$PEER_PY" tools/bench_peer_trl.py --device $DEV --tf32 --size_name small \
    --li $LI --lt 64 --batch $BATCH --steps 10 --warmup 3 --lm_head separate "$@" --out "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  echo "rc=$? at $(( $(date +%s) - T0 )) s"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('step_s_median','pairs_per_s','peak_device_memory_mb','num_params','gradient_checkpointing','final_train_loss')})" "$OUT/$name.json" 2>/dev/null || tail -5 "$OUT/$name.log"
}
slic slic_bf16 150 --dtype bfloat16 --remat none --microbatches 1
slic slic_bf16_remat 150 --dtype bfloat16 --remat full --microbatches 1
trl trl_bf16 --bf16
trl trl_bf16_nockpt --bf16 --gradient_checkpointing off
if (( $(left) > 40 )); then
  timeout 40 "$PY" tools/benchmark.py --_worker matmul --matmul_n $MM_N --matmul_reps 10 > $OUT/mm_jax.json 2>$OUT/mm_jax.err
  timeout 30 "$PEER_PY" tools/bench_peer_trl.py --matmul_only --matmul_n $MM_N --matmul_reps 10 --device $DEV --tf32 > $OUT/mm_torch.json 2>&1
  echo "matmul done at $(( $(date +%s) - T0 )) s"; cat $OUT/mm_jax.json | head -c 600; echo
fi
slic slic_f32_remat 150 --dtype float32 --remat full --microbatches 1
trl trl_f32
trl trl_f32_nockpt --gradient_checkpointing off
slic slic_f32 150 --dtype float32 --remat none --microbatches 1
slic slic_bf16_mb4 150 --dtype bfloat16 --remat none --microbatches 4
echo "done at $(( $(date +%s) - T0 )) s"
