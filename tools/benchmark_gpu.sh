#!/usr/bin/env bash
# SLiC-HF side by side on one GPU: slic_jax (jax[cuda]) vs TRL CPOTrainer (torch CUDA).
#
#   bash tools/benchmark_gpu.sh OUT_DIR ["BATCH ..."] [more tools/benchmark.py flags]
#
# Needs ONE python ($PYTHON, default python3) that has jax with its CUDA plugin, flax,
# optax, gin-config, clu (slic_jax's step) and torch (CUDA), transformers, trl, datasets
# (the peer): tools/benchmark.py runs slic_jax's step workers with it on jax's default
# backend and the peer with --peer_python set to it and --peer_device cuda. For each
# batch (default "32 4") it writes OUT_DIR/b<batch>/results.{json,md}: T5 1.1 small,
# prompt 512, target 64, slic_jax float32, bf16 and bf16 with cuDNN's fused attention
# (network.T5Config.attention_implementation='cudnn'; 2 decoded rows, TRL CPO's loss) vs
# TRL float32 and bf16 autocast, matmul peaks of both libraries at N=8192 on the GPU.
# float32: XLA:GPU's default precision for float32 dots may use TF32, so TRL runs with
# TF32 allowed too (--peer_tf32); the report's matmul table shows jax's float32 at its
# default and at precision HIGHEST.
# Time: on an H200 each slic_jax worker of T5 1.1 small took 43-65 s in session 14 (jitted
# state init 9-14 s with the threefry setting below, step compile 34-46 s, then the timed
# steps; session 12, without it: 110-155 s), each TRL run 20-30 s. For remat and
# gradient-checkpointing-off rows add e.g. --rows slic_jax_2row_bf16,slic_jax_2row_bf16_remat
# --peer_no_checkpointing (benchmarks/gpu_h200_session14/run.sh ran them one by one).
set -u
# The jitted parameter initialisation's threefry as one CUDA kernel (same bits): session 12's workers
# spent 68-80 s compiling it with XLA's unrolled rounds, session 14's 9-14 s.
export JAX_THREEFRY_GPU_KERNEL_LOWERING=${JAX_THREEFRY_GPU_KERNEL_LOWERING:-1}
PY=${PYTHON:-python3}
OUT_DIR=${1:?usage: benchmark_gpu.sh OUT_DIR [\"BATCH ...\"] [benchmark.py flags]}
BATCHES=${2:-32 4}
shift $(( $# < 2 ? $# : 2 ))
cd "$(dirname "$0")/.."
status=0
for b in $BATCHES; do
  timeout "${RUN_TIMEOUT:-900}" "$PY" tools/benchmark.py --sizes small --batch "$b" \
    --li 512 --lt 64 --rows slic_jax_2row,slic_jax_2row_bf16,slic_jax_2row_bf16_cudnn \
    --peer_bf16 --sweep '' \
    --steps 10 --warmup 3 --peer_steps 10 --peer_warmup 3 --matmul_n 8192 --matmul_reps 10 \
    --peer_python "$(command -v "$PY")" --peer_device cuda --peer_tf32 --timeout 400 \
    --out_dir "$OUT_DIR/b$b" "$@" 2>&1 | grep -v '^|' || status=1
done
exit $status
