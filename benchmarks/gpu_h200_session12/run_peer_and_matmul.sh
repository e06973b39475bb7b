#!/usr/bin/env bash
# session 12, second and third device calls (same warm H200, after run_workers.sh):
# TRL CPOTrainer(hinge) on CUDA at 32 pairs (float32+TF32, bf16 autocast) and 4 pairs, the
# matmul peaks of jax and torch at N=8192, then 128 pairs bf16 of both.
export PYTHONPATH=/tmp/site:$PWD PYTHONFAULTHANDLER=1
for spec in "b32_f32 --batch 32" "b32_bf16 --batch 32 --bf16" "b4_f32 --batch 4"; do
  set -- $spec; n=$1; shift
  timeout 100 python3 tools/bench_peer_trl.py --device cuda --tf32 --size_name small --li 512 --lt 64 \
    --steps 10 --warmup 3 "$@" --out $OUT/peer_$n.json > $OUT/peer_$n.log 2>&1
done
timeout 60 python3 tools/benchmark.py --_worker matmul --matmul_n 8192 --matmul_reps 10 > $OUT/mm_jax.json 2>$OUT/mm_jax.err
timeout 60 python3 tools/bench_peer_trl.py --matmul_only --matmul_n 8192 --matmul_reps 10 --device cuda --tf32 > $OUT/mm_torch.json 2>&1
# third call
timeout -s ABRT 75 python3 tools/bench_peer_trl.py --device cuda --tf32 --bf16 --size_name small --li 512 --lt 64 \
  --steps 6 --warmup 2 --batch 128 --out $OUT/peer_b128_bf16.json > $OUT/peer_b128.log 2>&1
timeout -s ABRT 170 python3 tools/benchmark.py --_worker slic --size small --li 512 --lt 64 --batch 128 \
  --dtype bfloat16 --logits_dtype float32 --steps 6 --warmup 2 --seed 0 --reg_target chosen --microbatches 1 \
  --remat none --host_malloc reuse > $OUT/slic_b128_bf16.json 2>$OUT/slic_b128.err
