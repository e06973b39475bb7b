#!/usr/bin/env bash
# session 12: slic_jax step worker alone on the GPU, phases logged; SIGABRT dumps Python stacks.
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/base/*.whl .whl/ds52/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONFAULTHANDLER=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c "import jax; print(jax.__version__, jax.devices())"
echo "setup $(( $(date +%s) - T0 )) s"
run() { # name limit args...
  local name=$1 lim=$2; shift 2
  local left=$(( 470 - ($(date +%s) - T0) ))
  if (( left < 30 )); then echo "SKIP $name (time)"; return; fi
  (( lim > left )) && lim=$left
  echo "=== $name (limit $lim s)"
  timeout -s ABRT "$lim" python3 tools/benchmark.py --_worker slic "$@" --seed 0 --reg_target chosen --microbatches 1 --remat none --host_malloc reuse >"$OUT/$name.json" 2>"$OUT/$name.err"
  echo "rc=$? at $(( $(date +%s) - T0 )) s"; tail -c 1500 "$OUT/$name.err"; echo; head -c 900 "$OUT/$name.json"; echo
}
run tiny 100 --size tiny --li 128 --lt 32 --batch 4 --dtype float32 --logits_dtype float32 --steps 5 --warmup 2
run small_f32_b4 150 --size small --li 512 --lt 64 --batch 4 --dtype float32 --logits_dtype float32 --steps 10 --warmup 3
run small_bf16_b32 150 --size small --li 512 --lt 64 --batch 32 --dtype bfloat16 --logits_dtype float32 --steps 10 --warmup 3
run small_f32_b32 150 --size small --li 512 --lt 64 --batch 32 --dtype float32 --logits_dtype float32 --steps 10 --warmup 3
