#!/usr/bin/env bash
# session 24, one device call on an NVIDIA H200: the SLiC-HF step at 32 pairs (T5 1.1 small,
# Li 512, Lt 64, TRL's 2-row loss) at this session's code, with the new cuDNN fused attention
# (network.T5Config.attention_implementation='cudnn') against the default attention, TRL
# CPOTrainer as configured by default and without gradient checkpointing, the matmul peaks,
# the GPU test of the cuDNN path, and a jax.profiler trace + optimized HLO of the bf16 step
# (analysed off the device). Everything lands in $OUT/results.tar.gz (re-packed after each
# row, so a call cut short still returns what it finished) and $OUT/log.txt.
#   run: OUT=dir bash benchmarks/gpu_h200_session24/run.sh
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-530}
PY=${PY:-python3}; PEER_PY=${PEER_PY:-python3}
W=/tmp/s24; mkdir -p $W
[ -n "${SKIP_PIP:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/base/*.whl .whl/ds/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONFAULTHANDLER=1 JAX_THREEFRY_GPU_KERNEL_LOWERING=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
"$PY" -c "import jax, flax, optax, torch, transformers, trl; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
echo "setup $(( $(date +%s) - T0 )) s"
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
pack() { tar -czf $OUT/results.tar.gz -C $W . 2>/dev/null; }
slic() { # name limit args...
  local name=$1 lim=$2; shift 2; local l; l=$(left)
  if (( l < 45 )); then echo "SKIP $name (time)"; return; fi
  (( lim > l )) && lim=$l
  echo "=== $name (limit $lim s)"
  timeout -s ABRT "$lim" "$PY" tools/benchmark.py --_worker slic --size small --li 512 --lt 64 \
    --batch 32 --steps 10 --warmup 3 --seed 0 --reg_target chosen --logits_dtype float32 \
    --host_malloc reuse --microbatches 1 "$@" >"$W/$name.json" 2>"$W/$name.err"
  echo "rc=$? at $(( $(date +%s) - T0 )) s"; grep -v "step [0-9]*:" "$W/$name.err" | tail -c 1500
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('step_s_median','step_s_min','pairs_per_s','achieved_model_flops_per_s','peak_device_memory_mb','compile_s','final_loss')})" "$W/$name.json" 2>/dev/null
  pack
}
trl() { # name args...
  local name=$1; shift; local l; l=$(left)
  if (( l < 30 )); then echo "SKIP $name (time)"; return; fi
  echo "=== $name"
  timeout -s ABRT $(( l < 90 ? l : 90 )) "$PEER_PY" tools/bench_peer_trl.py --device cuda --tf32 --size_name small \
    --li 512 --lt 64 --batch 32 --steps 10 --warmup 3 --lm_head separate "$@" --out "$W/$name.json" >"$W/$name.log" 2>&1
  echo "rc=$? at $(( $(date +%s) - T0 )) s"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('step_s_median','pairs_per_s','peak_device_memory_mb','num_params','gradient_checkpointing','final_train_loss')})" "$W/$name.json" 2>/dev/null || tail -5 "$W/$name.log"
  pack
}
slic slic_bf16 120 --dtype bfloat16 --remat none
slic slic_bf16_cudnn 120 --dtype bfloat16 --remat none --attention_implementation cudnn
trl trl_bf16 --bf16
echo "=== cuDNN attention test"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_attention.py > $W/pytest_fused_attention.txt 2>&1
echo "rc=$? at $(( $(date +%s) - T0 )) s"; tail -5 $W/pytest_fused_attention.txt; pack
if (( $(left) > 40 )); then
  timeout 40 "$PY" tools/benchmark.py --_worker matmul --matmul_n 8192 --matmul_reps 10 > $W/mm_jax.json 2>$W/mm_jax.err
  timeout 30 "$PEER_PY" tools/bench_peer_trl.py --matmul_only --matmul_n 8192 --matmul_reps 10 --device cuda --tf32 > $W/mm_torch.json 2>&1
  echo "matmul done at $(( $(date +%s) - T0 )) s"; head -c 700 $W/mm_jax.json; echo; pack
fi
slic slic_bf16_remat 120 --dtype bfloat16 --remat full
slic slic_bf16_remat_cudnn 120 --dtype bfloat16 --remat full --attention_implementation cudnn
if (( $(left) > 70 )); then
  echo "=== profile bf16"
  timeout -s ABRT $(( $(left) < 100 ? $(left) - 10 : 90 )) "$PY" tools/profile_step.py --size small --batch 32 --li 512 --lt 64 \
    --dtype bfloat16 --logits_dtype float32 --reg_target chosen --top 25 --top_ops 25 \
    --trace_dir $W/trace_bf16 --dump_hlo $W/hlo_bf16.txt > $W/profile_bf16.txt 2>&1
  echo "rc=$? at $(( $(date +%s) - T0 )) s"; head -c 2500 $W/profile_bf16.txt; pack
fi
trl trl_bf16_nockpt --bf16 --gradient_checkpointing off
slic slic_f32 120 --dtype float32 --remat none
echo "done at $(( $(date +%s) - T0 )) s"; pack; ls -la $OUT
