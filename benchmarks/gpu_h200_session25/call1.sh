#!/usr/bin/env bash
# session 25, first device call on an NVIDIA H200: (1) tests/test_fused_attention.py on the GPU,
# including the cuDNN-under-remat case added after session 24's device time was spent; (2) a
# jax.profiler trace and the optimized HLO of the bf16 + cuDNN step at 32 pairs (T5 1.1 small,
# Li 512, Lt 64, TRL's 2-row loss), kept raw for the analysis off the device (session 24's
# profile was killed at its 90 s limit while compiling: 200 s here); (3) the same step at 64
# and 128 pairs (how the rate grows with the batch). Everything lands in $OUT/results.tar.gz
# (re-packed after each part) and the log.
#   run: OUT=dir bash benchmarks/gpu_h200_session25/call1.sh
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-420}
W=/tmp/s25; mkdir -p $W
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/base/gin_config*.whl .whl/base/clu*.whl .whl/base/ml_coll*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONFAULTHANDLER=1 JAX_THREEFRY_GPU_KERNEL_LOWERING=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
pack() { tar -czf $OUT/results.tar.gz -C $W . 2>/dev/null; }
echo "=== cuDNN attention test on the GPU"
CUDA_VISIBLE_DEVICES=0 JAX_DEFAULT_MATMUL_PRECISION=highest timeout 110 python3 -m pytest -q -rs -p no:cacheprovider tests/test_fused_attention.py > $W/pytest_gpu.txt 2>&1
echo "rc=$? at $(( $(date +%s) - T0 )) s"; tail -8 $W/pytest_gpu.txt; pack
echo "=== profile bf16 cudnn, 32 pairs"
timeout -s ABRT 200 python3 tools/profile_step.py --size small --batch 32 --li 512 --lt 64 \
  --dtype bfloat16 --logits_dtype float32 --reg_target chosen --attention_implementation cudnn \
  --top 30 --top_ops 30 --warmup 3 --trace_dir $W/trace --dump_hlo $W/hlo.txt > $W/profile.txt 2>&1
echo "rc=$? at $(( $(date +%s) - T0 )) s"; head -c 3000 $W/profile.txt
gzip -f $W/hlo.txt 2>/dev/null; find $W/trace -name "*.xplane.pb" -delete 2>/dev/null; ls -laR $W/trace | tail -5; pack
for b in 128 64; do
  l=$(left); if (( l < 50 )); then echo "SKIP b$b (time)"; continue; fi
  name=slic_bf16_cudnn_b$b; lim=$(( l < 100 ? l : 100 ))
  echo "=== $name (limit $lim s)"
  timeout -s ABRT $lim python3 tools/benchmark.py --_worker slic --size small --li 512 --lt 64 \
    --batch $b --steps 10 --warmup 3 --seed 0 --reg_target chosen --logits_dtype float32 \
    --host_malloc reuse --microbatches 1 --dtype bfloat16 --remat none --attention_implementation cudnn >"$W/$name.json" 2>"$W/$name.err"
  echo "rc=$? at $(( $(date +%s) - T0 )) s"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('step_s_median','step_s_min','pairs_per_s','achieved_model_flops_per_s','peak_device_memory_mb','compile_s','final_loss')})" "$W/$name.json" 2>/dev/null || tail -c 800 $W/$name.err
  pack
done
echo "done at $(( $(date +%s) - T0 )) s"; ls -la $OUT
