r"""SLiC-HF training throughput: slic_jax side by side with the PyTorch/TRL peer.

Run (one command measures everything and writes benchmarks/results.{json,md})::

  bash tools/setup_peer_env.sh                 # once: peer venv in /tmp/slic_jax_peer_env
  TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=0 \
    .venv/bin/python tools/benchmark.py --batch 4 --li 512 --lt 64 \
        --sizes small,mini --sweep 128,256,512,1024 --sweep_peer --levers --trainers

Every measurement runs in its own subprocess (``--_worker ...``), so peak
resident memory (``ru_maxrss`` of that process) is per run, and one run's
compile caches / allocator state do not leak into the next:

* ``slic``   : slic_jax's own update step, ``slic_jax.update_step.make_train_step`` on
  `models.SlicHFModel` with `optimizers.create_optimizer` (Adafactor, clip 1.0),
  jitted with ``donate_argnums=(0,)`` and `slic_jax.compiler_options` exactly as
  ``slic_jax.train.train`` does. Run twice per model: ``--reg_target reference`` (the
  paper's SLiC-HF-direct: 3 decoded rows, y_ref = SFT summary) and ``--reg_target
  chosen`` (y_ref = y⁺, 2 decoded rows: exactly TRL CPO's hinge + NLL-on-chosen loss,
  the same work as the peer). The step process never imports SeqIO/TensorFlow.
  Steady-state time = median of ``--steps`` timed steps after ``--warmup``
  steps (each ``block_until_ready``); compile time is reported separately. Like the
  trainer, the worker first calls ``host_memory.reuse_freed_memory()``, which applies its
  glibc settings only where the step runs on the CPU (``--host_malloc default``: never;
  the side-by-side's "glibc default" rows), and it records minor page faults and kernel
  time per step (``getrusage``), as the peer script does. It logs each phase (init,
  compile, every step) on stderr; a worker that times out returns that log's tail.
* ``matmul`` : peak matmul rate of this machine in the same run: a square float32
  (and bfloat16) ``jnp.dot`` of ``--matmul_n`` (2048) repeated, plus numpy's.
  torch's is measured by the peer script (``--matmul_only``).
* ``peer``   : ``tools/bench_peer_trl.py`` in the peer venv (TRL CPOTrainer,
  hinge + cpo_alpha, same dims/batch/lengths); see that file for what it times.
  ``--peer_reuse_malloc`` also runs it with the same glibc settings (``GLIBC_TUNABLES``).
* ``--interleave``: the side by side's processes of a round start at once and take turns
  step by step (`step_turns`: one step runs while every other process waits, the order
  reversed every cycle), each still timing its own steps in its own process; the report
  adds TRL's step over slic_jax's per cycle (`interleaved_cycles`): two frameworks
  compared seconds apart rather than minutes, on a VM whose speed drifts. The sweep's
  lengths take turns the same way, and the report adds each length's cost per model FLOP
  over the next shorter length's per cycle (`sweep_cycles`).
* on a GPU (``tools/benchmark_gpu.sh``): slic_jax's workers run on jax's default backend
  (the accelerator), the peer with ``--peer_device cuda`` (``--peer_python``: one
  interpreter that has both stacks), the matmul peaks are the accelerator's, and the
  report adds peak device memory (jax's ``peak_bytes_in_use``,
  ``torch.cuda.max_memory_allocated``).
* ``--trainers``: ``python -m slic_jax.train`` vs ``python -m t5x.train`` on the same
  gin experiment, each trainer's own ``timing/seqs_per_second``
  (``tools/bench_trainers.py``; needs the throw-away T5X env, ``--t5x_python``).

Model FLOPs (``model_flops``) — matmul FLOPs only, 2 per multiply-add, of the
model *as configured and as slic_jax runs it*, for B prompts, encoder length
Li, target length Lt, n target rows per prompt (SLiC-HF: chosen, rejected,
reference → n = 3), D = emb_dim, A = num_heads·head_dim, F = mlp_dim,
G = number of ``wi`` branches (2 for gated-GELU), V = vocab, Le/Ld = layers::

  enc_per_token   = 2·(4·D·A)            # q, k, v, out projections
                  + 2·(G+1)·D·F          # gated MLP
                  + 2·2·Li·A             # q·kᵀ and weights·v over Li keys
  encoder         = E · Li · Le · enc_per_token          E = B (encoder once per prompt)

  dec_per_seq_per_layer =
        Lt·[2·4·D·A + 2·2·Lt·A]          # causal self-attention (full Lt×Lt computed)
      + Lt·[2·2·D·A]                     # cross-attention q and out projections
      + Lt·[2·2·Li·A]                    # cross-attention q·kᵀ and weights·v
      + Lt·[2·(G+1)·D·F]                 # gated MLP
  cross_kv        = C · Ld · Li·[2·2·D·A]   # cross-attention k, v of the encoder output
  decoder         = S · Ld · dec_per_seq_per_layer + cross_kv    S = n·B decoded sequences
  logits          = S · Lt · 2·D·V
  forward         = encoder + decoder + logits
  train_step      = 3 · forward          # backward = 2 × forward

The cross-attention k/v projections are counted once per prompt for slic_jax
(C = B: its grouped cross-attention projects a prompt's encoder output once for
all n rows) and once per decoded sequence for the peer (C = S: Hugging Face's T5
projects the encoder output in every row). Embedding
gathers, norms, softmax, GELU, loss and optimizer updates are not matmuls and
are left out; remat recomputation is not counted either (this is "model
FLOPs", as in MFU; XLA's ``cost_analysis`` counts what is executed, so it is
higher with remat and slightly higher always — reported beside it).
The TRL peer's count uses the same formula with E = 2·B (CPOTrainer runs
the encoder once for chosen and once for rejected) and S = 2·B.

Achieved model FLOP/s = train_step FLOPs / median step time, compared with the
float32 matmul peak measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_turns  # noqa: E402  (standard library only)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PEER_ENV = os.environ.get("SLIC_JAX_PEER_ENV", "/tmp/slic_jax_peer_env")
T5X_ENV = "/tmp/t5x_env"
SLIC_ROWS = ("slic_jax", "slic_jax_2row", "slic_jax_2row_mb4", "slic_jax_bf16",
             "slic_jax_2row_bf16", "slic_jax_2row_bf16_mb4", "slic_jax_2row_bf16_remat",
             "slic_jax_2row_remat", "slic_jax_2row_glibc", "slic_jax_2row_bf16_glibc",
             "slic_jax_2row_bf16_cudnn", "slic_jax_2row_bf16_remat_cudnn",
             "slic_jax_2row_bf16_fused_softmax", "slic_jax_2row_fused_softmax",
             "slic_jax_2row_bf16_mixed_dots", "slic_jax_2row_bf16_widen_all",
             "slic_jax_2row_cpu_kernels", "slic_jax_2row_bf16_cpu_kernels")
# TRL's rows: as configured by default, with bf16 autocast, with slic_jax's malloc settings,
# without gradient checkpointing (float32, bf16 autocast).
PEER_ROWS = ("trl", "trl_bf16", "trl_reuse", "trl_nockpt", "trl_bf16_nockpt")
DEFAULT_ROWS = ("slic_jax", "slic_jax_2row", "slic_jax_bf16", "slic_jax_2row_bf16",
                "slic_jax_2row_bf16_mb4", "slic_jax_2row_bf16_remat", "slic_jax_2row_glibc",
                "slic_jax_2row_bf16_glibc")
# side-by-side rows: key -> (reg_target, num_microbatches, dtype, remat policy); bfloat16
# rows compute every matmul (vocabulary projection included) in bf16 with f32 accumulation.
SLIC_CONFIGS = {"slic_jax": ("reference", 1, "float32", "none"),
                "slic_jax_2row": ("chosen", 1, "float32", "none"),
                "slic_jax_2row_mb4": ("chosen", 4, "float32", "none"),
                "slic_jax_bf16": ("reference", 1, "bfloat16", "none"),
                "slic_jax_2row_bf16": ("chosen", 1, "bfloat16", "none"),
                "slic_jax_2row_bf16_mb4": ("chosen", 4, "bfloat16", "none"),
                "slic_jax_2row_bf16_remat": ("chosen", 1, "bfloat16", "full"),
                "slic_jax_2row_remat": ("chosen", 1, "float32", "full"),
                "slic_jax_2row_glibc": ("chosen", 1, "float32", "none"),
                "slic_jax_2row_bf16_glibc": ("chosen", 1, "bfloat16", "none"),
                "slic_jax_2row_bf16_cudnn": ("chosen", 1, "bfloat16", "none"),
                "slic_jax_2row_bf16_remat_cudnn": ("chosen", 1, "bfloat16", "full"),
                "slic_jax_2row_bf16_fused_softmax": ("chosen", 1, "bfloat16", "none"),
                "slic_jax_2row_fused_softmax": ("chosen", 1, "float32", "none"),
                "slic_jax_2row_bf16_mixed_dots": ("chosen", 1, "bfloat16", "none"),
                "slic_jax_2row_bf16_widen_all": ("chosen", 1, "bfloat16", "none"),
                "slic_jax_2row_cpu_kernels": ("chosen", 1, "float32", "none"),
                "slic_jax_2row_bf16_cpu_kernels": ("chosen", 1, "bfloat16", "none")}
# rows whose step process keeps glibc's default malloc (`--host_malloc default`); all
# others call `host_memory.reuse_freed_memory()` first, as slic_jax.train does.
GLIBC_DEFAULT_ROWS = ("slic_jax_2row_glibc", "slic_jax_2row_bf16_glibc")
# rows with cuDNN's fused attention (`network.T5Config.attention_implementation='cudnn'`;
# NVIDIA GPUs only, e.g. `tools/benchmark_gpu.sh`); all others use the default attention.
CUDNN_ROWS = ("slic_jax_2row_bf16_cudnn", "slic_jax_2row_bf16_remat_cudnn")
# rows with the CPU softmax kernels (`attention_implementation='fused_softmax'`).
FUSED_SOFTMAX_ROWS = ("slic_jax_2row_bf16_fused_softmax", "slic_jax_2row_fused_softmax")
# rows whose bf16 dots run as XLA's mixed bf16 × bf16 → f32 dot whatever the CPU
# (`$SLIC_JAX_CPU_LOW_PRECISION_DOTS=native`); the others as `platforms.cpu_low_precision_dots`
# decides for this CPU (widened to float32 where it has no bf16 dot instruction).
MIXED_DOTS_ROWS = ("slic_jax_2row_bf16_mixed_dots",)
# rows whose step widens every bf16 dot where bf16 dots are not native, whatever its FLOPs
# per operand element (`--widen_min_flops_per_element 0`; the others keep
# `matmul.WIDEN_MIN_FLOPS_PER_ELEMENT`): session 38's rule.
WIDEN_ALL_ROWS = ("slic_jax_2row_bf16_widen_all",)
# rows whose optimizer takes Adafactor's reductions from the CPU kernels
# (`optimizers.create_optimizer(implementation='cpu_kernels')`); the others 'fused'.
CPU_KERNELS_OPTIMIZER_ROWS = ("slic_jax_2row_cpu_kernels", "slic_jax_2row_bf16_cpu_kernels")


def row_attention(key: str) -> str:
  """The attention_implementation of a side-by-side row."""
  return ("cudnn" if key in CUDNN_ROWS else
          "fused_softmax" if key in FUSED_SOFTMAX_ROWS else "default")
LABELS = {"slic_jax": "slic_jax (3 rows: y⁺, y⁻, SFT ref)",
          "slic_jax_2row": "slic_jax (2 rows: y⁺, y⁻; NLL on y⁺ as TRL)",
          "slic_jax_2row_mb4": "slic_jax (2 rows, 4 microbatches)",
          "slic_jax_bf16": "slic_jax bf16 (3 rows)",
          "slic_jax_2row_bf16": "slic_jax bf16 (2 rows, as TRL)",
          "slic_jax_2row_bf16_mb4": "slic_jax bf16 (2 rows, 4 microbatches)",
          "slic_jax_2row_bf16_remat": "slic_jax bf16 (2 rows, remat 'full')",
          "slic_jax_2row_remat": "slic_jax (2 rows, remat 'full')",
          "slic_jax_2row_glibc": "slic_jax (2 rows), glibc's default malloc",
          "slic_jax_2row_bf16_glibc": "slic_jax bf16 (2 rows), glibc's default malloc",
          "slic_jax_2row_bf16_cudnn": "slic_jax bf16 (2 rows), cuDNN attention",
          "slic_jax_2row_bf16_remat_cudnn": "slic_jax bf16 (2 rows, remat 'full'), cuDNN attention",
          "slic_jax_2row_bf16_fused_softmax": "slic_jax bf16 (2 rows), fused softmax kernels",
          "slic_jax_2row_fused_softmax": "slic_jax (2 rows), fused softmax kernels",
          "slic_jax_2row_bf16_mixed_dots": "slic_jax bf16 (2 rows), XLA's mixed bf16 dots "
                                           "(`SLIC_JAX_CPU_LOW_PRECISION_DOTS=native`)",
          "slic_jax_2row_bf16_widen_all": "slic_jax bf16 (2 rows), every bf16 dot widened "
                                          "(`--widen_min_flops_per_element 0`)",
          "slic_jax_2row_cpu_kernels": "slic_jax (2 rows), Adafactor's reductions as CPU "
                                       "kernels (`--optimizer_implementation cpu_kernels`)",
          "slic_jax_2row_bf16_cpu_kernels": "slic_jax bf16 (2 rows), Adafactor's reductions as "
                                            "CPU kernels (`--optimizer_implementation "
                                            "cpu_kernels`)",
          "trl": "TRL CPOTrainer (hinge + NLL on y⁺; CPOConfig defaults: gradient checkpointing on)",
          "trl_nockpt": "TRL CPOTrainer, gradient_checkpointing=False (`--peer_no_checkpointing`)",
          "trl_bf16": "TRL CPOTrainer, bf16 autocast (`--peer_bf16`)",
          "trl_bf16_nockpt": "TRL CPOTrainer, bf16 autocast, gradient_checkpointing=False "
                             "(`--peer_bf16 --peer_no_checkpointing`)",
          "trl_reuse": "TRL CPOTrainer, slic_jax's malloc settings (`--peer_reuse_malloc`)"}
VOCAB = 32128

# name -> (emb_dim, num_heads, head_dim, layers (enc = dec), mlp_dim, vocab)
SIZES = {
    "small": (512, 6, 64, 8, 1024, VOCAB),   # T5 1.1 small
    "mini": (256, 4, 64, 4, 512, VOCAB),     # a smaller T5 1.1-shaped model
    "tiny": (128, 4, 32, 2, 256, 512),       # network.make_config('tiny'), for tests
}


# ----------------------------------------------------------------------------- FLOPs
def model_flops(*, emb_dim: int, num_heads: int, head_dim: int, mlp_dim: int,
                num_encoder_layers: int, num_decoder_layers: int, vocab_size: int,
                batch: int, li: int, lt: int, n_targets: int = 3,
                encoder_passes_per_prompt: int = 1, num_wi: int = 2,
                cross_kv_per_prompt: bool = True) -> dict:
  """Analytic matmul FLOPs of one training step (see the module docstring).

  Returns a dict with ``encoder``, ``decoder``, ``logits``, ``forward`` and
  ``train_step`` (= 3·forward) FLOPs, plus ``cross_kv`` (the decoder's
  cross-attention k/v projections, a part of ``decoder``).
  """
  d, a, f, v = emb_dim, num_heads * head_dim, mlp_dim, vocab_size
  mlp = 2 * (num_wi + 1) * d * f
  enc_tok = 2 * 4 * d * a + mlp + 2 * 2 * li * a
  e = batch * encoder_passes_per_prompt
  encoder = e * li * num_encoder_layers * enc_tok
  s = batch * n_targets
  self_attn = lt * (2 * 4 * d * a + 2 * 2 * lt * a)
  cross_qo = lt * 2 * 2 * d * a
  cross_kv = li * 2 * 2 * d * a
  cross_scores = lt * 2 * 2 * li * a
  dec_layer = self_attn + cross_qo + cross_scores + lt * mlp
  kv_rows = e if cross_kv_per_prompt else s
  decoder = s * num_decoder_layers * dec_layer + kv_rows * num_decoder_layers * cross_kv
  logits = s * lt * 2 * d * v
  forward = encoder + decoder + logits
  return {
      "encoder": float(encoder), "decoder": float(decoder), "logits": float(logits),
      "cross_kv": float(kv_rows * num_decoder_layers * cross_kv),
      "forward": float(forward), "train_step": float(3 * forward),
  }


def size_dims(size: str) -> dict:
  d, h, k, layers, f, v = SIZES[size]
  return dict(emb_dim=d, num_heads=h, head_dim=k, mlp_dim=f, num_encoder_layers=layers,
              num_decoder_layers=layers, vocab_size=v)


def config_flops(cfg, batch: int, li: int, lt: int, n_targets: int = 3, **kw) -> dict:
  """`model_flops` for a `slic_jax.network.T5Config`."""
  return model_flops(emb_dim=cfg.emb_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                     mlp_dim=cfg.mlp_dim, num_encoder_layers=cfg.num_encoder_layers,
                     num_decoder_layers=cfg.num_decoder_layers, vocab_size=cfg.vocab_size,
                     batch=batch, li=li, lt=lt, n_targets=n_targets,
                     num_wi=len(cfg.mlp_activations), **kw)


# ----------------------------------------------------------------------------- slic_jax side
def make_config(size: str, dtype: str = "float32", remat: str = "none",
                logits_dtype: str = "float32", weight_grad_first: str = "auto",
                attention_block_bytes: int = 0, attention_implementation: str = "default",
                logits_weight_grad_first: str = "off"):
  from slic_jax import network
  first = {"auto": None, "on": True, "off": False}[weight_grad_first]
  return network.T5Config(**size_dims(size), dtype=dtype, remat_policy=remat,
                          logits_dtype=logits_dtype, weight_grad_first=first,
                          logits_weight_grad_first=logits_weight_grad_first == "on",
                          attention_block_bytes=attention_block_bytes,
                          attention_implementation=attention_implementation)


def random_pair_batch(batch: int, li: int, lt: int, vocab: int, seed: int = 0, n: int = 3):
  """Random SLiC-HF pair batch (numpy): full-length prompts, targets ending in EOS (1)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (batch, li), dtype=np.int32)
  tgt = rng.integers(2, vocab, (batch, n, lt), dtype=np.int32)
  tgt[..., -1] = 1
  dec_in = np.concatenate([np.zeros((batch, n, 1), np.int32), tgt[..., :-1]], axis=-1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": tgt, "decoder_loss_weights": np.ones_like(tgt)}


class _EosOnlyVocabulary:
  """What the model reads from a vocabulary in the step: ``eos_id`` (no SeqIO import)."""
  eos_id = 1


def make_optimizer(name: str = "adafactor", implementation: str = "fused"):
  """The benchmark's optimizer: `optimizers.create_optimizer` (clip 1.0, lr 1e-4);
  ``implementation`` 'fused' (`optimizers.clipped_adafactor`, the default), 'grouped',
  'cpu_kernels' or 'optax' (`optimizers.create_optimizer`)."""
  from slic_jax import optimizers
  return optimizers.create_optimizer(name=name, learning_rate=1e-4, clip_norm=1.0,
                                     implementation=implementation)


def step_options(xla_default: bool = False, xla_options: dict | None = None):
  """The step's compiler options: slic_jax's (`slic_jax.compiler_options`) with
  ``xla_options`` merged over them, or None (XLA's defaults) when ``xla_default``."""
  from slic_jax import compiler_options
  return None if xla_default else compiler_options.step_compiler_options(overrides=xla_options)


def random_sft_batch(batch: int, li: int, lt: int, vocab: int, seed: int = 0, pack: int = 1):
  """Random SFT batch (numpy) as seqio's `EncDecFeatureConverter` gives it: rows full to
  [Li] inputs and [Lt] targets, each holding `pack` examples.

  pack = 1: one example per row, no segment features (an unpacked batch of full-length
  examples). pack = N > 1: N examples per row with random lengths (each at least one
  token) that fill the row, `*_segment_ids` 1..N and `*_positions` restarting at 0 per
  example; the decoder's inputs are each example's targets shifted right within it (0
  first), as the converter packs them.
  """
  import numpy as np
  rng = np.random.default_rng(seed)
  if pack < 1 or pack > min(li, lt):
    raise ValueError(f"pack must be 1..min(li, lt) = {min(li, lt)} examples per row, got {pack}")
  enc = rng.integers(2, vocab, (batch, li), dtype=np.int32)
  tgt = rng.integers(2, vocab, (batch, lt), dtype=np.int32)
  out = {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
         "decoder_loss_weights": np.ones_like(tgt)}

  def segments(length):  # [batch, length] ids 1..pack, positions from 0 in each
    ids = np.empty((batch, length), np.int32)
    pos = np.empty((batch, length), np.int32)
    for b in range(batch):
      cuts = np.sort(rng.choice(np.arange(1, length), pack - 1, replace=False))
      for s, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, length])):
        ids[b, lo:hi], pos[b, lo:hi] = s + 1, np.arange(hi - lo)
    return ids, pos

  enc_ids, enc_pos = segments(li)
  dec_ids, dec_pos = segments(lt)
  last = np.append(dec_ids[:, 1:] != dec_ids[:, :-1], np.ones((batch, 1), bool), axis=1)
  tgt[last] = 1  # each example's targets end in EOS
  shifted = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=-1)
  out["decoder_input_tokens"] = np.where(dec_pos == 0, 0, shifted).astype(np.int32)
  if pack > 1:  # unpacked batches carry no segment features
    out.update(encoder_segment_ids=enc_ids, encoder_positions=enc_pos,
               decoder_segment_ids=dec_ids, decoder_positions=dec_pos)
  return out


def make_model(cfg, model: str = "slic_hf", reg_target: str = "reference",
               optimizer: str = "adafactor", optimizer_implementation: str = "fused"):
  """(model, optimizer) as slic_jax.train gets them from gin: `models.SlicHFModel`
  ('slic_hf', pair batches) or `models.EncoderDecoderModel` ('sft') on `cfg`'s network,
  with `make_optimizer`'s optimizer as its ``optimizer_def``."""
  from slic_jax import models, network
  vocab = _EosOnlyVocabulary()
  tx = make_optimizer(optimizer, optimizer_implementation)
  if model == "sft":
    return models.EncoderDecoderModel(network.Transformer(cfg), vocab, vocab, tx), tx
  if model == "slic_hf":
    return models.SlicHFModel(network.Transformer(cfg), vocab, vocab, tx,
                              reg_target=reg_target), tx
  raise ValueError(f"model must be 'slic_hf' or 'sft', got {model!r}")


def random_batch(model: str, batch: int, li: int, lt: int, vocab: int, pack: int = 1,
                 seed: int = 0):
  """The step's random batch (numpy) for `make_model`'s ``model``: 'sft' rows of
  `random_sft_batch` (``pack`` examples each), else 'slic_hf' pairs of
  `random_pair_batch` (``pack`` must be 1: pair batches are never packed)."""
  if model == "sft":
    return random_sft_batch(batch, li, lt, vocab, seed=seed, pack=pack)
  if pack != 1:
    raise ValueError(f"pack={pack} needs model 'sft' (pair batches are never packed)")
  return random_pair_batch(batch, li, lt, vocab, seed=seed)


def build_step(cfg, batch_shapes: dict, seed: int = 0, optimizer: str = "adafactor",
               reg_target: str = "reference", xla_default: bool = False,
               num_microbatches: int | None = None, xla_options: dict | None = None,
               optimizer_implementation: str = "fused", model: str = "slic_hf"):
  """(jitted train_step, init_state_fn) exactly as slic_jax.train builds them.

  Same model class (`model`: 'slic_hf', `models.SlicHFModel` on pair batches, or 'sft',
  `models.EncoderDecoderModel` on `random_sft_batch`'s), optimizer, update step
  (`slic_jax.update_step`) and compiler options (`slic_jax.compiler_options`;
  ``xla_default=True``: none, XLA's defaults; ``xla_options``: merged over them as gin's
  ``step_compiler_options.overrides``).
  Nothing here imports SeqIO/TensorFlow; the peak-RSS figure is the step's.
  """
  import jax
  import jax.numpy as jnp
  from slic_jax import update_step

  model, tx = make_model(cfg, model, reg_target, optimizer, optimizer_implementation)

  def init_state(rng):
    params = model.get_initial_variables(rng, batch_shapes)["params"]
    return update_step.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))

  options = step_options(xla_default, xla_options)
  step = jax.jit(update_step.make_train_step(model, tx, dropout_seed=seed + 1,
                                             num_microbatches=num_microbatches),
                 donate_argnums=(0,), compiler_options=options)
  return step, init_state


def in_turn(items: list, rnd: int) -> list:
  """The processes of round ``rnd`` (0-based) of a run in turn: ``items`` in even rounds,
  reversed in odd ones, so that no process always runs first or right after the same
  neighbour."""
  return list(items) if rnd % 2 == 0 else list(items)[::-1]


def add_xla_option_flag(ap) -> None:
  ap.add_argument("--xla_option", action="append", default=[], metavar="KEY=VALUE",
                  help="step worker: an XLA compiler option merged over slic_jax's "
                       "(compiler_options.step_compiler_options overrides; VALUE '' "
                       "leaves XLA's default); repeatable")


def parse_xla_options(items) -> dict | None:
  """['key=value', ...] -> {key: value} (None when empty); a clear error otherwise."""
  out = {}
  for item in items or ():
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise SystemExit(f"--xla_option {item!r}: expected KEY=VALUE")
    out[key] = value
  return out or None


def xla_cost_flops(compiled) -> float | None:
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pragma: no cover - backend without cost analysis
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float | None:
  """Resident memory now (Linux /proc/self/statm), to tell compile-time from step-time peaks."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
  except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
    return None


def _progress(t_start: float, msg: str) -> None:
  """One line on stderr per phase, so a worker that times out says where it was."""
  print(f"[worker +{time.perf_counter() - t_start:.1f}s] {msg}", file=sys.stderr, flush=True)


def apply_host_malloc(host_malloc: str) -> bool:
  """``host_memory.reuse_freed_memory`` as slic_jax.train calls it; whether it applied.

  'reuse': the glibc settings only where the step runs on the CPU
  (`host_memory.step_runs_on_cpu`; on a GPU or TPU host the step's temporaries are the
  device's); 'reuse_arenas': the same without one arena for all threads
  (``single_arena=False``); 'default': never. Call it before jax starts its backend.
  """
  from slic_jax import host_memory
  if host_malloc == "default":
    return host_memory.reuse_freed_memory(enabled=False)
  return host_memory.reuse_freed_memory(enabled=None, single_arena=host_malloc == "reuse")


# `slic_jax.matmul`'s module-level settings that a step worker flag replaces: {name: flag}.
MATMUL_TUNABLES = {"WIDEN_MIN_FLOPS_PER_ELEMENT": "widen_min_flops_per_element",
                   "ROW_MAX_LEVEL": "row_max_level"}


def compile_slic_step(args, t_start: float) -> dict:
  """The step worker's SLiC-HF step for ``args`` (`parse_args`'s worker flags), compiled and
  with its initial state, as `slic_jax.train` builds them (`build_step`), on one device.

  Call `apply_host_malloc` first. ``--widen_min_flops_per_element`` and
  ``--row_max_level`` replace `matmul.WIDEN_MIN_FLOPS_PER_ELEMENT` and
  `matmul.ROW_MAX_LEVEL` before the step is traced (the caller restores them where
  several steps share the process: `MATMUL_TUNABLES`). Returns {compiled, state, batch,
  cfg, compile_s, xla_flops, mem (XLA's memory analysis, MB), rss_compiled, peak_compiled}.
  """
  import jax
  from slic_jax import host_memory, matmul, partitioning
  for name, flag in MATMUL_TUNABLES.items():
    if getattr(args, flag) is not None:
      setattr(matmul, name, getattr(args, flag))
  cfg = make_config(args.size, args.dtype, args.remat, args.logits_dtype,
                    args.weight_grad_first, args.attention_block_bytes,
                    args.attention_implementation, args.logits_weight_grad_first)
  np_batch = random_pair_batch(args.batch, args.li, args.lt, cfg.vocab_size, args.seed)
  shapes = {k: v.shape for k, v in np_batch.items()}
  p = partitioning.Partitioner(devices=jax.devices()[:1])
  with p.activation_rules():
    step, init_state = build_step(cfg, shapes, args.seed, reg_target=args.reg_target,
                                  xla_default=args.xla_default,
                                  num_microbatches=args.microbatches,
                                  xla_options=parse_xla_options(args.xla_option),
                                  optimizer_implementation=args.optimizer_implementation)
    state = jax.jit(init_state)(jax.random.PRNGKey(args.seed))
    jax.block_until_ready(state)
    _progress(t_start, "state initialised; compiling the step")
    del init_state  # as slic_jax.train: free the init executable before compiling the step
    gc.collect()
    host_memory.trim()
    batch = jax.device_put(np_batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
  _progress(t_start, f"step compiled in {compile_s:.1f} s")
  host_memory.trim()  # as slic_jax.train
  out = dict(compiled=compiled, state=state, batch=batch, cfg=cfg, compile_s=compile_s,
             rss_compiled=_current_rss_mb(), peak_compiled=_peak_rss_mb(),
             xla_flops=xla_cost_flops(compiled), mem={})
  try:
    ma = compiled.memory_analysis()
    for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes"):
      if hasattr(ma, k):
        out["mem"][k.replace("_in_bytes", "_mb")] = getattr(ma, k) / 2 ** 20
  except Exception:  # pragma: no cover
    pass
  return out


def timed_step(compiled, state, batch):
  """One step, waited for: (state, metrics, wall s, minor page faults, kernel CPU s)."""
  import jax
  u0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  t1, u1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
  return state, metrics, t1 - t0, u1.ru_minflt - u0.ru_minflt, u1.ru_stime - u0.ru_stime


def final_loss(metrics) -> float:
  """The step's reported loss (its metrics' ``loss``) as a Python float."""
  import numpy as np
  return float(np.asarray(metrics["loss"].compute()))


def worker_slic(args) -> dict:
  t_start = time.perf_counter()
  reuse = apply_host_malloc(args.host_malloc)  # first, before jax starts its backend
  import jax
  import numpy as np
  from slic_jax import matmul, platforms  # (no SeqIO/TF here: see build_step)

  rss_import = _peak_rss_mb()
  _progress(t_start, f"backend {jax.default_backend()}, glibc reuse settings {reuse}")
  c = compile_slic_step(args, t_start)
  compiled, state, batch, cfg = c["compiled"], c["state"], c["batch"], c["cfg"]
  turns = step_turns.Turns(args._turns)  # --interleave: each step in its turn
  times, faults, kernel_s = [], [], []
  for i in range(args.warmup + args.steps):
    turns.take()
    state, metrics, dt, flt, ks = timed_step(compiled, state, batch)
    turns.give_back()
    _progress(t_start, f"step {i}: {dt:.3f} s")
    if i >= args.warmup:
      times.append(dt)
      faults.append(flt)
      kernel_s.append(ks)
  loss = final_loss(metrics)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  n_rows = 2 if args.reg_target == "chosen" else 3
  flops = config_flops(cfg, args.batch, args.li, args.lt, n_targets=n_rows)
  med = statistics.median(times)
  return {
      "framework": "slic_jax", "size": args.size, "dtype": args.dtype,
      "logits_dtype": args.logits_dtype, "remat": args.remat,
      "attention_implementation": args.attention_implementation,
      "optimizer_implementation": args.optimizer_implementation,
      "reg_target": args.reg_target, "decoded_rows": n_rows, "microbatches": args.microbatches,
      "xla_options": ("xla_default" if args.xla_default else
                      "slic_jax" + "".join(f" {o}" for o in args.xla_option)),
      "tensorflow_loaded": "tensorflow" in sys.modules,
      "cpu_low_precision_dots": (platforms.cpu_low_precision_dots()
                                 if jax.default_backend() == "cpu" else None),
      "widen_min_flops_per_element": matmul.WIDEN_MIN_FLOPS_PER_ELEMENT,
      "row_max_level": matmul.ROW_MAX_LEVEL,
      "batch_pairs": args.batch, "li": args.li, "lt": args.lt, "num_params": num_params,
      "compile_s": c["compile_s"], "step_times_s": times, "step_s_median": med,
      "step_s_min": min(times), "pairs_per_s": args.batch / med,
      "host_malloc": args.host_malloc if reuse else "glibc default",
      "minor_faults_per_step": statistics.median(faults),
      "kernel_s_per_step": statistics.median(kernel_s),
      "model_flops_per_step": flops["train_step"], "flops_breakdown": flops,
      "xla_cost_analysis_flops": c["xla_flops"], "xla_memory_analysis": c["mem"],
      "achieved_model_flops_per_s": flops["train_step"] / med,
      "final_loss": loss, "peak_rss_mb": _peak_rss_mb(), "rss_after_imports_mb": rss_import,
      "peak_rss_through_compile_mb": c["peak_compiled"], "rss_after_compile_mb": c["rss_compiled"],
      "rss_after_steps_mb": _current_rss_mb(),
      "jax_backend": jax.default_backend(), "jax_devices": len(jax.devices()),
      **_jax_device_info(),
  }


def _jax_device_info() -> dict:
  """The accelerator's name and, where its runtime keeps them (GPU, TPU), peak bytes in use."""
  import jax
  d = jax.devices()[0]
  out = {"device_kind": d.device_kind}
  try:
    stats = d.memory_stats() or {}
  except Exception:  # pragma: no cover - backend without memory stats
    stats = {}
  if "peak_bytes_in_use" in stats:
    out["peak_device_memory_mb"] = stats["peak_bytes_in_use"] / 2 ** 20
  return out


def worker_matmul(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  n, reps = args.matmul_n, args.matmul_reps
  out = {"n": n}
  flops = 2.0 * n ** 3

  def rate(key, fn, *xs):
    """Best and median FLOP/s of ``fn(*xs)`` over ``reps`` calls after one warm-up."""
    jax.block_until_ready(fn(*xs))
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*xs))
      ts.append(time.perf_counter() - t0)
    out[f"{key}_flops_per_s"] = flops / min(ts)
    out[f"{key}_flops_per_s_median"] = flops / statistics.median(ts)

  for dt in ("float32", "bfloat16"):
    x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dt)
    y = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dt)
    rate(f"jax_{dt}", jax.jit(jnp.dot), x, y)
  # bf16 operands, float32 accumulation and result: what slic_jax.matmul runs for
  # dtype='bfloat16' (`matmul.accumulate`: XLA:CPU gives the mixed dot to YNNPACK, AMX
  # where the CPU has it; on a CPU without a bf16 dot instruction the operands are
  # widened to float32 first, `platforms.cpu_low_precision_dots`) ...
  from slic_jax import matmul, platforms
  rate("jax_bf16f32acc", jax.jit(lambda a, b: matmul.accumulate("mk,kn->mn", a, b)), x, y)
  out["cpu_low_precision_dots"] = (platforms.cpu_low_precision_dots()
                                   if jax.default_backend() == "cpu" else None)
  # ... and XLA's mixed dot as written, whatever the CPU.
  rate("jax_bf16f32acc_native",
       jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32)), x, y)
  # float32 with every bit of precision (XLA:GPU's default precision for float32 dots
  # may use TF32 on the tensor cores; on CPU the two are the same).
  rate("jax_float32highest",
       jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)),
       x.astype(jnp.float32), y.astype(jnp.float32))
  if jax.default_backend() == "cpu":
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    rate("numpy_float32", np.matmul, a, b)
  out["peak_rss_mb"] = _peak_rss_mb()
  out.update(jax_backend=jax.default_backend(), **_jax_device_info())
  return out


# ----------------------------------------------------------------------------- orchestration
def _worker_env(env=None) -> dict:
  """A worker subprocess's environment: this one's, quiet, offline, one real CPU device."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0",
         "HF_HUB_OFFLINE": "1", **(env or {})}
  env.pop("XLA_FLAGS", None)  # one real CPU device, not the tests' fake 8
  return env


def _parse_worker(cmd: list[str], returncode, stdout: str, stderr: str, wall: float) -> dict:
  """A worker's result: its last stdout line that is JSON, with ``wall_s``; or an error."""
  lines = [l for l in stdout.strip().splitlines() if l.startswith("{")]
  if returncode or not lines:
    return {"error": f"exit {returncode}", "stderr_tail": stderr[-3000:], "cmd": cmd}
  res = json.loads(lines[-1])
  res["wall_s"] = wall
  return res


def _run_json(cmd: list[str], timeout: float, env=None, cwd: str = REPO) -> dict:
  """Runs one worker subprocess (in ``cwd``); returns its last stdout line as JSON (or an
  error)."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  t0 = time.perf_counter()
  print("[benchmark] $", " ".join(cmd), file=sys.stderr, flush=True)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=_worker_env(env), cwd=cwd)
  except subprocess.TimeoutExpired as e:
    tail = e.stderr or b""
    tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
    print(f"[benchmark]   -> TIMEOUT after {timeout}s; stderr tail:\n{tail[-1500:]}",
          file=sys.stderr, flush=True)
    return {"error": f"timeout after {timeout}s", "stderr_tail": tail[-3000:], "cmd": cmd}
  after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  res = _parse_worker(cmd, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)
  # RUSAGE_CHILDREN is a max over all children so far: it confirms the worker's own
  # figure only when this child set a new maximum.
  if after > before and "error" not in res:
    res["rusage_children_maxrss_mb"] = after / 1024.0
  print("[benchmark]   ->", _brief(res), file=sys.stderr, flush=True)
  return res


def _run_in_turns(cmds: dict, timeout: float) -> dict:
  """`step_turns.run_in_turns` over {key: (cmd, env)}: every process at once, their steps
  in turn; {key: the worker's result (as `_run_json`) with its ``turns``}."""
  for cmd, _ in cmds.values():
    print("[benchmark] $ (in turns)", " ".join(cmd), file=sys.stderr, flush=True)
  out = step_turns.run_in_turns({k: (c, _worker_env(e)) for k, (c, e) in cmds.items()},
                                timeout, cwd=REPO)
  res = {}
  for key, o in out.items():
    r = ({"error": o["error"], "stderr_tail": o["stderr"][-3000:], "cmd": cmds[key][0]}
         if "error" in o else
         _parse_worker(cmds[key][0], o["returncode"], o["stdout"], o["stderr"], o["wall_s"]))
    r["turns"] = o["turns"]
    print("[benchmark]   ->", _brief(r), file=sys.stderr, flush=True)
    res[key] = r
  return res


def _brief(r: dict) -> str:
  if "error" in r:
    return "ERROR " + r["error"]
  if "pairs_per_s" in r:
    return (f"{r.get('framework')} {r.get('size')} Li={r.get('li')} {r.get('dtype', '')} "
            f"{r.get('remat', '')}: {r['step_s_median']:.2f} s/step, "
            f"{r['pairs_per_s']:.3f} pairs/s, rss {r['peak_rss_mb']:.0f} MB")
  return json.dumps(r)[:200]


def slic_cmd(args, size, li, dtype="float32", remat="none", batch=None,
             reg_target="reference", xla_default=False, microbatches=1,
             logits_dtype=None, host_malloc="reuse",
             attention_implementation="default", widen_min=None,
             optimizer_implementation="fused") -> list[str]:
  cmd = [sys.executable, os.path.abspath(__file__), "--_worker", "slic", "--size", size,
         "--li", str(li), "--lt", str(args.lt), "--batch", str(batch or args.batch),
         "--dtype", dtype, "--remat", remat, "--steps", str(args.steps),
         "--warmup", str(args.warmup), "--seed", str(args.seed), "--reg_target", reg_target,
         "--microbatches", str(microbatches), "--logits_dtype", logits_dtype or dtype,
         "--host_malloc", host_malloc, "--attention_implementation", attention_implementation,
         "--optimizer_implementation", optimizer_implementation]
  return (cmd + (["--xla_default"] if xla_default else [])
          + ([] if widen_min is None else ["--widen_min_flops_per_element", str(widen_min)]))


def peer_python(args) -> str:
  """The peer's interpreter: ``--peer_python``, else the peer venv's (``--peer_env``)."""
  return args.peer_python or os.path.join(args.peer_env, "bin", "python")


def peer_cmd(args, size, li, matmul_only=False, bf16=False,
             checkpointing: str = "default") -> list[str] | None:
  py = peer_python(args)
  if not os.path.exists(py):
    return None
  script = os.path.join(REPO, "tools", "bench_peer_trl.py")
  device = ["--device", args.peer_device] + ["--tf32"] * args.peer_tf32
  if matmul_only:
    return [py, script, "--matmul_only", "--matmul_n", str(args.matmul_n),
            "--matmul_reps", str(args.matmul_reps)] + device
  d = size_dims(size)
  return ([py, script, "--d_model", str(d["emb_dim"]), "--num_heads", str(d["num_heads"]),
          "--d_kv", str(d["head_dim"]), "--d_ff", str(d["mlp_dim"]),
          "--num_layers", str(d["num_encoder_layers"]), "--vocab_size", str(d["vocab_size"]),
          "--batch", str(args.batch), "--li", str(li), "--lt", str(args.lt),
          "--steps", str(args.peer_steps), "--warmup", str(args.peer_warmup),
          "--seed", str(args.seed), "--size_name", size,
          "--gradient_checkpointing", checkpointing, "--lm_head", args.peer_lm_head]
          + (["--bf16"] if bf16 else []) + device)


def peer_flops(size, batch, li, lt) -> dict:
  return model_flops(**size_dims(size), batch=batch, li=li, lt=lt, n_targets=2,
                     encoder_passes_per_prompt=2, cross_kv_per_prompt=False)


def _versions(args) -> dict:
  import importlib.metadata as md
  v = {"python": platform.python_version()}
  for pkg in ("jax", "jaxlib", "flax", "optax", "numpy"):
    try:
      v[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  py = peer_python(args)
  if os.path.exists(py):
    try:
      out = subprocess.run([py, "-c", "import importlib.metadata as m, json; print(json.dumps("
                            "{p: m.version(p) for p in ('torch','transformers','trl')}))"],
                           capture_output=True, text=True, timeout=120).stdout
      v["peer"] = json.loads(out.strip().splitlines()[-1])
    except Exception as e:  # pragma: no cover
      v["peer"] = f"unknown ({e})"
  return v


def _machine() -> dict:
  info = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          info["cpu_model"] = line.split(":", 1)[1].strip()
          break
    info["loadavg_at_start"] = os.getloadavg()
    with open("/proc/meminfo") as f:
      info["mem_total_gb"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
  except OSError:
    pass
  return info


def _fastest(runs: list) -> dict:
  """The run with the lowest median step (the first run where none has one), with every
  run's median, best step, peak RSS and error under "runs" (and its step times and turns,
  where it has them: `interleaved_cycles`)."""
  ok = [r for r in runs if "step_s_median" in r]
  out = dict(min(ok, key=lambda r: r["step_s_median"]) if ok else runs[0])
  out["runs"] = [{**{k: r.get(k) for k in ("step_s_median", "step_s_min", "peak_rss_mb", "error")},
                  **{k: r[k] for k in ("step_times_s", "turns") if k in r}} for r in runs]
  return out


def orchestrate(args) -> dict:
  from slic_jax import host_memory
  sizes = [s for s in args.sizes.split(",") if s]
  res = {
      "command": shlex.join([os.path.relpath(sys.executable, REPO)] + sys.argv),
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "machine": _machine(), "versions": _versions(args),
      "settings": {"batch_pairs": args.batch, "li": args.li, "lt": args.lt,
                   "steps": args.steps, "warmup": args.warmup, "peer_steps": args.peer_steps,
                   "peer_warmup": args.peer_warmup, "seed": args.seed, "repeats": args.repeats,
                   "sweep_dtype": args.sweep_dtype, "sweep_attention": args.sweep_attention},
      "matmul": {}, "comparison": [], "sweep": [], "levers": [],
      "t5x": {"status": "not run", "note": "--trainers not given"},
  }
  t = args.timeout
  res["matmul"].update(measure_matmul_peaks(args, t))
  _write(args, res)

  def add_peak(r):
    _add_peak_fractions(r, run_matmul_peaks(res["matmul"])[0])

  # Side-by-side comparison at the main setting.
  # slic_jax twice: the paper's SLiC-HF-direct (3 decoded rows: y_ref = SFT summary) and
  # TRL CPO's exact loss (2 rows: NLL on y+), then the peer.
  # With --repeats R the processes run R times in turn, the order reversed every other
  # round (A B C, C B A, A B C, ...), and each framework's row is its run with the lowest
  # median step time; all runs are kept in the JSON ("runs"). This VM's speed drifts over
  # minutes, which a single run can catch, and a fixed order would put any effect of the
  # position (the process right after another one, or first after a pause) on one row
  # alone: in session 40's A/B of two commits (`tools/ab_commits.py`, the order swapped
  # every other round) the second process of each round was the faster in all 4 rounds,
  # whichever commit it ran; the A/A run after it did not show that (`benchmarks/NOTES.md`,
  # session 40, finding 2), but a fixed order could not have told them apart.
  # With --interleave a round's processes start at once and take turns step by step
  # (`step_turns`; the order reversed every cycle), so each cycle has one step of every
  # row within seconds, and `interleaved_cycles` pairs them; the peer then runs as many
  # warm-up and timed steps as slic_jax (--warmup, --steps) so that the cycles align.
  if args.interleave:
    args.peer_steps, args.peer_warmup = args.steps, args.warmup
    res["settings"].update(interleave=True, peer_steps=args.steps, peer_warmup=args.warmup)
  for size in sizes:
    row = {"size": size}
    keys = [k for k in SLIC_ROWS if k in args.rows.split(",")]
    peers = (["trl"] + ["trl_bf16"] * args.peer_bf16 + ["trl_reuse"] * args.peer_reuse_malloc
             + ["trl_nockpt"] * args.peer_no_checkpointing
             + ["trl_bf16_nockpt"] * (args.peer_bf16 and args.peer_no_checkpointing))
    runs = {**{k: [] for k in keys}, **{k: [] for k in peers}}

    def row_cmd(key, size=size):
      """(the command of the row's process or None where the peer is skipped, its env)."""
      if key in peers:
        pc = None if args.no_peer else peer_cmd(
            args, size, args.li, bf16=key.startswith("trl_bf16"),
            checkpointing="off" if key.endswith("_nockpt") else "default")
        return pc, {"GLIBC_TUNABLES": host_memory.GLIBC_TUNABLES} if key == "trl_reuse" else None
      reg_target, micro, dtype, remat = SLIC_CONFIGS[key]
      return (slic_cmd(args, size, args.li, dtype=dtype, remat=remat, reg_target=reg_target,
                       microbatches=micro,
                       host_malloc="default" if key in GLIBC_DEFAULT_ROWS else "reuse",
                       attention_implementation=row_attention(key),
                       widen_min=0 if key in WIDEN_ALL_ROWS else None,
                       optimizer_implementation="cpu_kernels"
                       if key in CPU_KERNELS_OPTIMIZER_ROWS else "fused"),
              {"SLIC_JAX_CPU_LOW_PRECISION_DOTS": "native"} if key in MIXED_DOTS_ROWS else None)

    def add_run(key, r, size=size):
      if key in peers and "step_s_median" in r:
        pf = peer_flops(size, args.batch, args.li, args.lt)
        r["model_flops_per_step"] = pf["train_step"]
        r["achieved_model_flops_per_s"] = pf["train_step"] / r["step_s_median"]
      runs[key].append(r)

    skipped = {"error": "peer skipped or env missing"}
    for rnd in range(max(args.repeats, 1)):
      cmds = {key: row_cmd(key) for key in in_turn(keys + peers, rnd)}
      if args.interleave:
        done = _run_in_turns({k: c for k, c in cmds.items() if c[0]}, t * len(cmds))
        for key, (cmd, _) in cmds.items():
          add_run(key, done[key] if cmd else dict(skipped))
        continue
      for key, (cmd, env) in cmds.items():
        add_run(key, _run_json(cmd, t, env) if cmd else dict(skipped))
    for key, rs in runs.items():
      row[key] = _fastest(rs)
      add_peak(row[key])
    peer = row["trl"]
    for key in keys:
      if "pairs_per_s" in row[key] and "pairs_per_s" in peer:
        row[key]["speedup_pairs_per_s"] = row[key]["pairs_per_s"] / peer["pairs_per_s"]
        row[key]["speedup_best"] = peer["step_s_min"] / row[key]["step_s_min"]
      for pkey in ("trl_bf16", "trl_bf16_nockpt"):
        pb = row.get(pkey, {})
        if "pairs_per_s" in row[key] and "pairs_per_s" in pb:
          row[key][f"speedup_vs_{pkey}"] = row[key]["pairs_per_s"] / pb["pairs_per_s"]
    res["comparison"].append(row)
    _write(args, res)

  # Input-length sweep. With --repeats R the lengths' processes run R times in turn, the
  # order reversed every other round (128 256 512 1024 1024 512 256 128 128 ...), so the
  # VM's drift and the position in the round reach every length alike; each
  # length shows its fastest run (`_fastest`), and the report also compares each length
  # with the other lengths of the same round (`sweep_rounds`). The side by side's run of
  # the same size and length is reused (already the fastest of its R).
  lengths = [int(x) for x in args.sweep.split(",") if x]
  size = args.sweep_size
  frameworks = ["slic_jax"] + ["trl"] * (args.sweep_peer and not args.no_peer)

  # With --interleave a round's lengths start at once and take turns step by step, as the
  # side by side's rows do, and `sweep_cycles` compares each length with the next shorter
  # one cycle by cycle.
  sweep_runs = {(li, fw): [] for li in lengths for fw in frameworks}
  for rnd in range(max(args.repeats, 1)) if lengths else ():
    cmds = {}  # {(li, framework): the process's command, None where the peer is missing}
    for li in in_turn(lengths, rnd):
      for fw in frameworks:
        if _side_by_side_row(res, size, li, fw) is None:
          cmds[(li, fw)] = (slic_cmd(args, size, li, dtype=args.sweep_dtype,
                                     attention_implementation=args.sweep_attention)
                            if fw == "slic_jax" else peer_cmd(args, size, li))
    missing = {"error": "peer env missing"}
    if args.interleave:
      names = {f"{fw}_{li}": (li, fw) for (li, fw), c in cmds.items() if c}
      done = _run_in_turns({n: (cmds[k], None) for n, k in names.items()}, t * len(names))
      done = {names[n]: r for n, r in done.items()}
      for key in cmds:
        sweep_runs[key].append(done.get(key, missing))
      continue
    for key, cmd in cmds.items():
      sweep_runs[key].append(_run_json(cmd, t) if cmd else dict(missing))
  for li in lengths:
    row = {"size": size, "li": li}
    for fw in frameworks:
      reused = _side_by_side_row(res, size, li, fw)
      row[fw] = reused if reused is not None else _fastest(sweep_runs[(li, fw)])
      if fw == "slic_jax":
        add_peak(row[fw])
    res["sweep"].append(row)
  _write(args, res)

  # Levers: dtype x remat (and batch) on the lever size.
  if args.levers:
    combos = [("float32", "none", False, 1), ("float32", "none", True, 1),
              ("float32", "full", False, 1)]
    combos += [("bfloat16", "none", False, 1), ("float32", "minimal", False, 1)] * args.all_levers
    combos += [("float32", "none", False, int(m)) for m in args.lever_microbatches.split(",") if m]
    for dtype, remat, xla_default, micro in combos:
      r = next((c.get("slic_jax") for c in res["comparison"] if c["size"] == args.lever_size),
               None) if (dtype, remat, xla_default, micro) == ("float32", "none", False, 1) else None
      if r is None:
        r = _run_json(slic_cmd(args, args.lever_size, args.li, dtype, remat,
                               xla_default=xla_default, microbatches=micro), t)
      add_peak(r)
      res["levers"].append(r)
      _write(args, res)
    for b in [int(x) for x in args.lever_batches.split(",") if x]:
      r = _run_json(slic_cmd(args, args.lever_size, args.li, batch=b), t)
      add_peak(r)
      res["levers"].append(r)
      _write(args, res)
  # The matmul peaks once more: this VM's speed drifts, and a peak measured in a slow
  # phase would flatter every "% of peak" (`run_matmul_peaks` takes the higher of the two).
  timed = _timed_rows(res)
  if timed:
    res["matmul"]["end_of_run"] = measure_matmul_peaks(args, t)
    for r in timed:
      add_peak(r)
    _write(args, res)
  # slic_jax.train vs t5x.train on the same gin experiment (where T5X is installed).
  if args.trainers:
    res["t5x"] = run_trainers(args)
  _write(args, res)
  return res


def measure_matmul_peaks(args, timeout: float) -> dict:
  """{'jax_numpy': the matmul worker's rates, 'torch': the peer's (or an error)}."""
  pc = peer_cmd(args, None, None, matmul_only=True)
  return {
      "jax_numpy": _run_json(
          [sys.executable, os.path.abspath(__file__), "--_worker", "matmul",
           "--matmul_n", str(args.matmul_n), "--matmul_reps", str(args.matmul_reps)],
          timeout),
      "torch": _run_json(pc, timeout) if pc else {"error": "peer env missing"},
  }


def run_matmul_peaks(matmul: dict) -> tuple[dict, dict]:
  """(jax/numpy, torch) peaks of a run: each rate the higher of its measurement at the
  start and at the end of the run (``matmul['end_of_run']``, where the run timed steps)."""
  end = matmul.get("end_of_run", {})
  out = []
  for key in ("jax_numpy", "torch"):
    start, again = matmul.get(key, {}), end.get(key, {})
    merged = dict(start)
    for k, v in again.items():
      if "_flops_per_s" in k and isinstance(v, (int, float)):
        merged[k] = max(v, start.get(k) or 0.0)
    out.append(merged)
  return out[0], out[1]


def _add_peak_fractions(r: dict, mm: dict) -> None:
  """A timed row's achieved model FLOP/s against the jax float32 (and, for bf16 rows, the
  bf16 × bf16 → float32) matmul peak ``mm``."""
  peak, peak_bf16 = mm.get("jax_float32_flops_per_s"), mm.get("jax_bf16f32acc_flops_per_s")
  if peak and "achieved_model_flops_per_s" in r:
    r["fraction_of_jax_f32_matmul_peak"] = r["achieved_model_flops_per_s"] / peak
  if peak_bf16 and "achieved_model_flops_per_s" in r and r.get("dtype") == "bfloat16":
    r["fraction_of_jax_bf16_matmul_peak"] = r["achieved_model_flops_per_s"] / peak_bf16


def _timed_rows(res: dict) -> list[dict]:
  """The rows that get a fraction of the matmul peak: the side by side's (every
  framework), the sweep's slic_jax rows and the levers."""
  rows = [r for c in res["comparison"] for r in c.values() if isinstance(r, dict)]
  rows += [c["slic_jax"] for c in res["sweep"] if isinstance(c.get("slic_jax"), dict)]
  return rows + [r for r in res["levers"] if isinstance(r, dict)]


def run_trainers(args) -> dict:
  """`bench_trainers.compare_trainers` with this run's --trainer_* settings."""
  import bench_trainers  # tools/, beside this file
  if not os.path.exists(args.t5x_python):
    return {"status": "not run", "note": f"{args.t5x_python} not present (T5X not installed)"}
  try:
    result = bench_trainers.compare_trainers(
        t5x_python=args.t5x_python, steps=args.trainer_steps, batch=args.trainer_batch,
        inputs_len=args.trainer_inputs, targets_len=args.trainer_targets,
        model_gin=args.trainer_model, stats_period=args.trainer_stats_period,
        workdir=args.trainer_workdir, timeout=args.timeout)
  except (bench_trainers.TrainerError, ValueError) as e:
    return {"status": "error", "note": str(e)[-2000:]}
  return {"status": "run", "note": f"{args.t5x_python}", "result": result}


# ----------------------------------------------------------------------------- reporting
def _g(x, scale=1.0, fmt="{:.2f}"):
  return "–" if x is None else fmt.format(x / scale)


def _parameter_line(res: dict) -> list[str]:
  """One line: each framework's parameter count per model size (TRL's lm_head setting)."""
  seen = {}
  for c in res.get("comparison", []):
    for fw, r in c.items():
      if isinstance(r, dict) and "num_params" in r:
        name = "TRL" if fw.startswith("trl") else "slic_jax"
        extra = f", lm_head {r['lm_head']}" if r.get("lm_head") else ""
        seen[(c["size"], name)] = f"{c['size']} {name} {r['num_params'] / 1e6:.1f}M{extra}"
  return [f"- parameters: {'; '.join(seen.values())}"] if seen else []


def to_markdown(res: dict) -> str:
  m, s = res["machine"], res["settings"]
  mm, tm = run_matmul_peaks(res["matmul"])
  peak = mm.get("jax_float32_flops_per_s")
  mm0, tm0 = res["matmul"].get("jax_numpy", {}), res["matmul"].get("torch", {})
  end = res["matmul"].get("end_of_run", {})
  mm1, tm1 = end.get("jax_numpy", {}), end.get("torch", {})
  lines = [
      "# SLiC-HF training benchmark: slic_jax vs TRL CPOTrainer (PyTorch)", "",
      f"- command: `{res['command']}`",
      f"- date: {res['date']}",
      f"- machine: {m.get('cpu_count')} CPU cores ({m.get('cpu_model', '?')}), "
      f"{m.get('mem_total_gb', '?')} GB RAM, load average at start {m.get('loadavg_at_start')}",
      *([f"- accelerator: {mm['device_kind']} (jax backend '{mm.get('jax_backend')}'; "
         f"slic_jax runs there, TRL on '{tm.get('device', 'cpu')}'"
         f"{', TF32 allowed' if tm.get('tf32') else ''})"]
        if mm.get("jax_backend", "cpu") != "cpu" else []),
      f"- versions: {json.dumps(res['versions'])}",
      f"- setting: {s['batch_pairs']} pairs/step, prompt Li={s['li']}, target Lt={s['lt']}, "
      f"median of {s['steps']} steps after {s['warmup']} warm-up steps (TRL: {s.get('peer_steps')} "
      f"after {s.get('peer_warmup')}), float32 unless noted; side by side: the fastest of "
      f"{s.get('repeats', 1)} process run(s) per framework, "
      + ("each round's processes at once, their steps in turns (`--interleave`), the rows' "
         "order reversed every other round and every cycle" if s.get("interleave") else
         "run in turn, the order reversed every other round")
      + " (all in results.json)",
      *_parameter_line(res),
      f"- t5x: {res['t5x']['status']} ({res['t5x']['note']})", "",
      "## Matmul peak (same run, square N×N)", "",
      *(["Measured at the start of the run and again at its end; the \"% of matmul peak\" "
         "columns below use the higher best of the two.", ""] if end else []),
      "| library | dtype | GFLOP/s (best) | GFLOP/s (median) |"
      + (" end of run: best | median |" if end else ""),
      "|---|---|---|---|" + ("---|---|" if end else ""),
  ]
  widened = mm0.get("cpu_low_precision_dots") == "float32"
  dt_names = {"float32": "float32", "bfloat16": "bfloat16", "bf16f32acc":
              "bfloat16 × bfloat16 → float32 (slic_jax's bf16 matmuls"
              + (": operands widened to float32 on this CPU)" if widened else ")"),
              "bf16f32acc_native": "bfloat16 × bfloat16 → float32, XLA's mixed dot",
              "float32highest": "float32, precision HIGHEST"}
  for lib, key, src, again in (
      ("jax", "jax_float32", mm0, mm1), ("jax", "jax_float32highest", mm0, mm1),
      ("jax", "jax_bfloat16", mm0, mm1), ("jax", "jax_bf16f32acc", mm0, mm1),
      ("jax", "jax_bf16f32acc_native", mm0, mm1),
      ("numpy", "numpy_float32", mm0, mm1), ("torch", "torch_float32", tm0, tm1),
      ("torch", "torch_bfloat16", tm0, tm1)):
    if f"{key}_flops_per_s" in src:
      lines.append(f"| {lib} | {dt_names[key.split('_', 1)[1]]} | "
                   f"{_g(src[f'{key}_flops_per_s'], 1e9, '{:.1f}')}"
                   f" | {_g(src.get(f'{key}_flops_per_s_median'), 1e9, '{:.1f}')} |"
                   + (f" {_g(again.get(f'{key}_flops_per_s'), 1e9, '{:.1f}')}"
                      f" | {_g(again.get(f'{key}_flops_per_s_median'), 1e9, '{:.1f}')} |"
                      if end else ""))
  if res["comparison"]:  # (none in a sweep-only run: --sizes '')
    lines += ["", "## Side by side", "",
              "| model | framework | s/step (median) | s/step (best) | pairs/s (median) | speed-up "
              "(median / best) | model GFLOP/step | XLA GFLOP/step | model GFLOP/s (median / best) | "
              "% of matmul peak of its dtype (median / best) | peak used | peak RSS MB | "
              "peak device MB | compile s | page faults / step | kernel s / step |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for c in res["comparison"]:
    for fw in SLIC_ROWS + PEER_ROWS:
      r = c.get(fw)
      if r is None:
        continue
      if "error" in r:
        lines.append(f"| {c['size']} | {LABELS[fw]} | error: {r['error']} | | | | | | | | | | | | | |")
        continue
      sp = ""
      if "speedup_pairs_per_s" in r:
        sp = f"{r['speedup_pairs_per_s']:.2f}× / {r['speedup_best']:.2f}×"
      fl = r.get("model_flops_per_step")
      # Each row against the matmul peak of the precision it computes in.
      if r.get("dtype") == "bfloat16" and fw.startswith("trl_bf16"):
        pk, pk_name = tm.get("torch_bfloat16_flops_per_s"), "torch bf16"
      elif r.get("dtype") == "bfloat16":
        pk, pk_name = mm.get("jax_bf16f32acc_flops_per_s"), "jax bf16→f32"
      else:
        pk, pk_name = peak, "jax f32"
      lines.append(
          f"| {c['size']} | {LABELS[fw]} | {r['step_s_median']:.2f} | {r['step_s_min']:.2f} | "
          f"{r['pairs_per_s']:.3f} | {sp} | {_g(fl, 1e9, '{:.0f}')} | "
          f"{_g(r.get('xla_cost_analysis_flops'), 1e9, '{:.0f}')} | "
          f"{_g(r.get('achieved_model_flops_per_s'), 1e9, '{:.1f}')} / "
          f"{_g(fl and fl / r['step_s_min'], 1e9, '{:.1f}')} | "
          f"{_g(fl and pk and fl / r['step_s_median'] / pk, 0.01, '{:.0f}%')} / "
          f"{_g(fl and pk and fl / r['step_s_min'] / pk, 0.01, '{:.0f}%')} | {pk_name} | "
          f"{r['peak_rss_mb']:.0f} | {_g(r.get('peak_device_memory_mb'), 1, '{:.0f}')} | "
          f"{_g(r.get('compile_s'), 1, '{:.1f}')} | "
          f"{_g(r.get('minor_faults_per_step'), 1, '{:.0f}')} | "
          f"{_g(r.get('kernel_s_per_step'), 1, '{:.2f}')} |")
  lines += _side_by_side_rounds_markdown(res)
  lines += _interleaved_cycles_markdown(res)
  if res["sweep"]:
    repeats = s.get("repeats") or 1
    order = ("; each round's lengths at once, their steps in turns" if s.get("interleave")
             else " in turn" if repeats > 1 else "")
    lines += ["", f"## Input-length sweep (Lt={s['lt']}, {s['batch_pairs']} pairs, slic_jax "
              f"{s.get('sweep_dtype', 'float32')}"
              f"{'' if s.get('sweep_attention', 'default') == 'default' else ', attention_implementation=' + repr(s['sweep_attention'])}"
              f"{f'; each length the fastest of {repeats} runs' if repeats > 1 else ''}"
              f"{order})",
              "",
              "| model | Li | framework | s/step (median) | s/step (best) | model GFLOP/step | "
              "s per model TFLOP (median / best) | against the cheapest Li (median / best) | "
              "model GFLOP/s (median) | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    def cost(row, fw):  # (model FLOPs per step, s per model TFLOP: median, best)
      r = row[fw]
      fl = r.get("model_flops_per_step") or peer_flops(
          row["size"], s["batch_pairs"], row["li"], s["lt"])["train_step"]
      return fl, r["step_s_median"] / fl * 1e12, r["step_s_min"] / fl * 1e12

    measured = [(row, fw) for row in res["sweep"] for fw in ("slic_jax", "trl")
                if fw in row and "error" not in row[fw]]
    cheapest = {}  # (size, framework) -> (median, best) s per model TFLOP, lowest over Li
    for row, fw in measured:
      _, med, best = cost(row, fw)
      low = cheapest.get((row["size"], fw), (med, best))
      cheapest[(row["size"], fw)] = (min(low[0], med), min(low[1], best))
    for row in res["sweep"]:
      for fw in ("slic_jax", "trl"):
        r = row.get(fw)
        if r is None:
          continue
        if "error" in r:
          lines.append(f"| {row['size']} | {row['li']} | {fw} | error: {r['error']} | | | | | | |")
          continue
        fl, med, best = cost(row, fw)
        low = cheapest[(row["size"], fw)]
        lines.append(f"| {row['size']} | {row['li']} | {fw} | {r['step_s_median']:.2f} | "
                     f"{r['step_s_min']:.2f} | {fl / 1e9:.0f} | {med:.2f} / {best:.2f} | "
                     f"{100 * (med / low[0] - 1):+.1f}% / {100 * (best / low[1] - 1):+.1f}% | "
                     f"{fl / r['step_s_median'] / 1e9:.1f} | {r['peak_rss_mb']:.0f} |")
    lines += _sweep_rounds_markdown(res)
    lines += _sweep_cycles_markdown(res)
  if res["levers"]:
    lines += ["", "## Levers (slic_jax)", "",
              "| model | dtype | remat | XLA options | pairs | microbatches | s/step (median) | s/step (best) | "
              "pairs/s (median) | model GFLOP/s (median) | XLA GFLOP/step | XLA temp MB | "
              "peak RSS MB | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["levers"]:
      if "error" in r:
        lines.append(f"| | | | | | | error: {r['error']} | | | | | | | |")
        continue
      lines.append(f"| {r['size']} | {r['dtype']} | {r['remat']} | "
                   f"{r.get('xla_options', 'xla_default')} | {r['batch_pairs']} | "
                   f"{r.get('microbatches', 1)} | "
                   f"{r['step_s_median']:.2f} | {r['step_s_min']:.2f} | {r['pairs_per_s']:.3f} | "
                   f"{r['achieved_model_flops_per_s'] / 1e9:.1f} | "
                   f"{_g(r.get('xla_cost_analysis_flops'), 1e9, '{:.0f}')} | "
                   f"{_g(r.get('xla_memory_analysis', {}).get('temp_size_mb'), 1, '{:.0f}')} | "
                   f"{r['peak_rss_mb']:.0f} | {r['compile_s']:.1f} |")
  if res.get("t5x", {}).get("result"):
    import bench_trainers  # tools/, beside this file
    lines += ["", "## Trainers: `python -m slic_jax.train` vs `python -m t5x.train`", "",
              "Each trainer's own `timing/seqs_per_second` on the same gin experiment "
              "(`tools/bench_trainers.py`; one sequence = one prompt with its target rows).", "",
              bench_trainers.markdown_table(res["t5x"]["result"])]
  for c in res["comparison"]:
    for pkey, what in (("trl_bf16", "TRL with bf16 autocast"),
                       ("trl_bf16_nockpt", "TRL with bf16 autocast, no gradient checkpointing")):
      vs = [f"{LABELS[k]} {c[k][f'speedup_vs_{pkey}']:.2f}×" for k in SLIC_ROWS
            if f"speedup_vs_{pkey}" in c.get(k, {})]
      if vs:
        lines += ["", f"{c['size']}, pairs/s against {what}: " + "; ".join(vs) + "."]
  lines += ["", "bfloat16 rows (`network.T5Config.dtype = logits_dtype = 'bfloat16'`): every "
            "matmul rounds its operands to bf16 and accumulates in float32, backward pass "
            "included (`slic_jax/matmul.py`); log-softmax, losses, norms, softmax and the "
            "optimizer stay float32; parameters are float32. Speed-ups are against TRL in "
            "float32 unless stated."]
  one_after = ("the processes of a round at once, one step at a time in turns (each "
               "process's own peak RSS)" if s.get("interleave") else "one after the other")
  lines += ["", "Model FLOPs: matmul FLOPs of forward + backward (= 3 × forward) as defined in "
            "`tools/benchmark.py`'s docstring; slic_jax encodes each prompt once and decodes 3 "
            "rows (chosen, rejected, SFT reference) or 2 (chosen, rejected; the regulariser on "
            "the chosen row, which is TRL CPO's loss), TRL's CPOTrainer encodes the prompt twice "
            "(chosen and rejected rows concatenated) and decodes 2 rows. Every row ran in its own "
            f"process, {one_after}; see the load average above. Peak RSS of slic_jax is "
            "that of the step process, which does not import SeqIO/TensorFlow "
            "(`python -m slic_jax.train` does, for its input pipeline: about +0.6 GB).", ""]
  return "\n".join(lines)


def _side_by_side_row(res: dict, size: str, li: int, framework: str) -> dict | None:
  """The side by side's row that the sweep reuses for this size, length and framework
  ('slic_jax' in the sweep's dtype, or 'trl'), or None where it ran none."""
  s = res["settings"]
  key = {"slic_jax": ("slic_jax" if s.get("sweep_dtype", "float32") == "float32"
                      else "slic_jax_bf16"), "trl": "trl"}[framework]
  if li != s.get("li") or s.get("sweep_attention", "default") != "default":
    return None
  return next((c[key] for c in res["comparison"] if c.get("size") == size and key in c), None)


def _swept_runs(res: dict) -> dict:
  """{(size, framework): {li: (model FLOPs per step, the length's runs)}} of the sweep's
  lengths that ran in its rounds (not those reused from the side by side)."""
  out = {}
  for row in res["sweep"]:
    for fw in ("slic_jax", "trl"):
      r = row.get(fw)
      if (r and r.get("model_flops_per_step") and r.get("runs")
          and _side_by_side_row(res, row["size"], row["li"], fw) is None):
        out.setdefault((row["size"], fw), {})[row["li"]] = (r["model_flops_per_step"], r["runs"])
  return out


def sweep_rounds(res: dict) -> dict:
  """Each sweep length's cost per FLOP in each round, against that round's cheapest length.

  With --repeats R the sweep runs its lengths in turn R times (round k: every length's
  k-th run), so a length's run is compared with the other lengths' runs of minutes
  before and after it rather than with their fastest runs, which the VM's drift may have
  put in another phase. Returns {(size, framework): {li: [s per model FLOP of the round's
  median step / the round's lowest − 1, one per round]}}, None in a round where some
  length of that size and framework has no median step (a failed run); lengths whose row
  is reused from the side by side (not run in the rounds) are left out, and so is a size
  and framework with fewer than two complete rounds or two lengths.
  """
  runs = {key: {li: [(fl, x.get("step_s_median")) for x in rs] for li, (fl, rs) in by_li.items()}
          for key, by_li in _swept_runs(res).items()}  # {li: [(model FLOPs, median step)]}
  out = {}
  for key, by_li in runs.items():
    n = min(len(v) for v in by_li.values())
    rounds = [k for k in range(n) if all(v[k][1] for v in by_li.values())]
    if len(rounds) < 2 or len(by_li) < 2:
      continue
    rel = {li: [None] * n for li in by_li}
    for k in rounds:
      cost = {li: v[k][1] / v[k][0] for li, v in by_li.items()}
      low = min(cost.values())
      for li in by_li:
        rel[li][k] = cost[li] / low - 1
    out[key] = rel
  return out


def _sweep_rounds_markdown(res: dict) -> list[str]:
  """The table of `sweep_rounds`, or nothing where it is empty."""
  table = sweep_rounds(res)
  if not table:
    return []
  n = max(len(v) for rel in table.values() for v in rel.values())
  when = ("ran at once, their steps in turns" if res.get("settings", {}).get("interleave")
          else "ran in turn")
  lines = ["", f"Per round (the lengths {when}; each length's s per model TFLOP by its "
           "median step, against the cheapest length of the same round; –: a run of that "
           "round failed):", "",
           "| model | framework | Li | " + " | ".join(f"round {k + 1}" for k in range(n))
           + " | median over rounds |", "|---|---|---|" + "---|" * (n + 1)]
  for (size, fw), rel in table.items():
    for li in sorted(rel):
      done = [x for x in rel[li] if x is not None]
      cells = ([f"{100 * x:+.1f}%" if x is not None else "–" for x in rel[li]]
               + [""] * (n - len(rel[li])))
      lines.append(f"| {size} | {fw} | {li} | " + " | ".join(cells)
                   + f" | {100 * statistics.median(done):+.1f}% |")
  return lines


def sweep_cycles(res: dict) -> dict:
  """Each sweep length's cost per FLOP against the next shorter length's, step by step.

  With --interleave a round's lengths run at once and take turns step by step, so every
  length's k-th timed step ran in the same cycle, seconds from the others'. Returns
  {(size, framework): {li: (the next shorter length, ratios, marginal)}}, one value per
  cycle in each list, the rounds one after the other:

      ratio    = (t_li / F_li) / (t_li0 / F_li0)        (cost per model FLOP, li over li0)
      marginal = (t_li − t_li0) / (F_li − F_li0)        (s per model TFLOP of the FLOPs added)

  (t a cycle's steps, F the model FLOPs per step). The ratio is the target's measure; it
  also moves with the share of the work that does not grow with Li (the vocabulary
  projection and loss, the decoder), whose cost per FLOP differs from the rest. The
  marginal cost leaves that work out: the cost of what lengthening the input adds,
  comparable from one doubling to the next. Over the rounds where both processes ran in
  turns and finished; lengths reused from the side by side and pairs with no such cycle
  are left out.
  """
  out = {}
  for key, by_li in _swept_runs(res).items():
    items = [(li, *by_li[li]) for li in sorted(by_li)]  # [(li, model FLOPs, runs)]
    rel = {}
    for (li0, fl0, runs0), (li, fl, runs) in zip(items, items[1:]):
      steps = [(ta, tb) for a, b in zip(runs0, runs)
               if all("turns" in x and "step_times_s" in x for x in (a, b))
               for ta, tb in zip(a["step_times_s"], b["step_times_s"])]
      if steps:
        rel[li] = (li0, [(tb / fl) / (ta / fl0) for ta, tb in steps],
                   [(tb - ta) / (fl - fl0) * 1e12 for ta, tb in steps])
    if rel:
      out[key] = rel
  return out


def _sweep_cycles_markdown(res: dict) -> list[str]:
  """The summary of `sweep_cycles`, or nothing where it is empty."""
  table = sweep_cycles(res)
  if not table:
    return []
  lines = ["", "Cost per FLOP step by step (`--interleave`: each round's lengths ran at once, "
           "one step at a time in turns, the order reversed every cycle; per cycle a "
           "length's s per model FLOP over the next shorter length's, seconds apart; the "
           "marginal cost: the step time added over the model FLOPs added, in s per TFLOP, "
           "which leaves out the work that does not grow with the input):", "",
           "| model | framework | Li | against Li | cycles | median | quartiles | cycles dearer "
           "| marginal s/TFLOP | its quartiles |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for (size, fw), rel in table.items():
    for li, (li0, ratios, marginal) in sorted(rel.items()):
      q, qm = _quartiles(ratios), _quartiles(marginal)
      lines.append(f"| {size} | {fw} | {li} | {li0} | {len(ratios)} | "
                   f"{100 * (statistics.median(ratios) - 1):+.1f}% | "
                   f"{100 * (q[0] - 1):+.1f}% to {100 * (q[2] - 1):+.1f}% | "
                   f"{sum(r > 1 for r in ratios)} of {len(ratios)} | "
                   f"{statistics.median(marginal):.2f} | {qm[0]:.2f} to {qm[2]:.2f} |")
  return lines


def side_by_side_rounds(res: dict) -> dict:
  """Each slic_jax row's speed-up over each TRL row, round by round.

  The side-by-side table compares each framework's fastest process, which the VM's drift
  may have put in different phases. With --repeats R round k holds every row's k-th
  process, run minutes apart, so the ratio of two rows' median steps in one round
  compares them in the same phase. Returns {(size, slic_jax row, TRL row): [TRL's median
  step / slic_jax's, one per round, None where either run of that round has no median
  step]}: every slic_jax row against TRL's float32 rows, its bfloat16 rows also against
  TRL's bf16 autocast rows; left out where a pair has fewer than two complete rounds.
  """
  out = {}
  for c in res["comparison"]:
    runs = {k: [x.get("step_s_median") for x in c[k].get("runs", ())]
            for k in SLIC_ROWS + PEER_ROWS if k in c}
    for key, pkey in _compared_pairs(c, runs):
      n = min(len(runs[key]), len(runs[pkey]))
      ratios = [p / m if p and m else None for m, p in zip(runs[key][:n], runs[pkey][:n])]
      if sum(r is not None for r in ratios) >= 2:
        out[(c["size"], key, pkey)] = ratios
  return out


def _side_by_side_rounds_markdown(res: dict) -> list[str]:
  """The table of `side_by_side_rounds`, or nothing where it is empty."""
  table = side_by_side_rounds(res)
  if not table:
    return []
  n = max(len(v) for v in table.values())
  when = ("run at once, their steps in turns" if res.get("settings", {}).get("interleave")
          else "run in turn minutes apart")
  lines = ["", f"Speed-up per round (round k: every row's k-th process, {when}; "
           "TRL's median step over slic_jax's in that round; –: a run of that round "
           "failed). The median over rounds compares the two in the same phase of the "
           "machine, where the table above takes each framework's fastest process:", "",
           "| model | slic_jax | against | " + " | ".join(f"round {k + 1}" for k in range(n))
           + " | median over rounds |", "|---|---|---|" + "---|" * (n + 1)]
  for (size, key, pkey), ratios in table.items():
    done = [x for x in ratios if x is not None]
    cells = [f"{x:.2f}×" if x is not None else "–" for x in ratios] + [""] * (n - len(ratios))
    lines.append(f"| {size} | {LABELS[key]} | {LABELS[pkey]} | " + " | ".join(cells)
                 + f" | {statistics.median(done):.2f}× |")
  return lines


def _compared_pairs(c: dict, runs: dict):
  """(slic_jax row, TRL row) pairs of a comparison row that `side_by_side_rounds` and
  `interleaved_cycles` compare: float32 rows against TRL's float32 rows, bf16 rows also
  against TRL's bf16 autocast rows."""
  for key in (k for k in SLIC_ROWS if k in runs):
    bf16 = SLIC_CONFIGS[key][2] == "bfloat16"
    for pkey in (k for k in PEER_ROWS if k in runs and (bf16 or "bf16" not in k)):
      yield key, pkey


def interleaved_cycles(res: dict) -> dict:
  """Each slic_jax row's speed-up over each TRL row, step by step (--interleave).

  In an interleaved round every process's k-th timed step ran in the same cycle of turns,
  seconds from the others' (`step_turns`). Returns {(size, slic_jax row, TRL row): [TRL's
  step / slic_jax's, one per cycle, the rounds one after the other]} over the rounds
  where both processes ran in turns and finished; left out where there is none.
  """
  out = {}
  for c in res["comparison"]:
    runs = {k: c[k].get("runs", ()) for k in SLIC_ROWS + PEER_ROWS if k in c}
    for key, pkey in _compared_pairs(c, runs):
      ratios = []
      for m, p in zip(runs[key], runs[pkey]):
        if "turns" in m and "turns" in p and "step_times_s" in m and "step_times_s" in p:
          ratios += [tp / tm for tm, tp in zip(m["step_times_s"], p["step_times_s"])]
      if ratios:
        out[(c["size"], key, pkey)] = ratios
  return out


def _quartiles(xs: list) -> list:
  """[first quartile, median, third quartile] of xs (inclusive method; one value: itself)."""
  return statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3


def _interleaved_cycles_markdown(res: dict) -> list[str]:
  """The summary of `interleaved_cycles`, or nothing where it is empty."""
  table = interleaved_cycles(res)
  if not table:
    return []
  lines = ["", "Speed-up step by step (`--interleave`: each round's processes ran at once, "
           "one step at a time in turns, the order reversed every cycle; per cycle TRL's "
           "step over slic_jax's, seconds apart):", "",
           "| model | slic_jax | against | cycles | median | quartiles | cycles at 2× or more |",
           "|---|---|---|---|---|---|---|"]
  for (size, key, pkey), ratios in table.items():
    q = _quartiles(ratios)
    lines.append(f"| {size} | {LABELS[key]} | {LABELS[pkey]} | {len(ratios)} | "
                 f"{statistics.median(ratios):.2f}× | {q[0]:.2f}–{q[2]:.2f}× | "
                 f"{sum(r >= 2.0 for r in ratios)} of {len(ratios)} |")
  return lines


def _write(args, res):
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "results.json"), "w") as f:
    json.dump(res, f, indent=1)
  with open(os.path.join(args.out_dir, "results.md"), "w") as f:
    f.write(to_markdown(res))


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--_worker", choices=["slic", "matmul"], help=argparse.SUPPRESS)
  ap.add_argument("--_turns", default=None, help=argparse.SUPPRESS)  # step_turns.Turns
  ap.add_argument("--size", default="small", choices=sorted(SIZES))
  ap.add_argument("--sizes", default="small,mini", help="models for the side-by-side")
  ap.add_argument("--batch", type=int, default=4, help="pairs (prompts) per step")
  ap.add_argument("--li", type=int, default=512)
  ap.add_argument("--lt", type=int, default=64)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--weight_grad_first", default="auto", choices=["auto", "on", "off"],
                  help="step worker: network.T5Config.weight_grad_first (auto: on with remat "
                       "or on the CPU)")
  ap.add_argument("--logits_weight_grad_first", default="off", choices=["on", "off"],
                  help="step worker: network.T5Config.logits_weight_grad_first")
  ap.add_argument("--attention_block_bytes", type=int, default=0,
                  help="step worker: network.T5Config.attention_block_bytes (0: unblocked)")
  ap.add_argument("--attention_implementation", default="default",
                  choices=["default", "cudnn", "xla", "fused_softmax"],
                  help="step worker only: network.T5Config.attention_implementation "
                       "('cudnn': cuDNN fused attention, NVIDIA GPUs, bfloat16); side by "
                       "side, the *_cudnn rows")
  ap.add_argument("--widen_min_flops_per_element", type=float, default=None,
                  help="step worker: replaces matmul.WIDEN_MIN_FLOPS_PER_ELEMENT (0: every "
                       "bf16 dot widened where bf16 dots are not native)")
  ap.add_argument("--row_max_level", type=int, default=None,
                  help="step worker: replaces matmul.ROW_MAX_LEVEL (0: the softmax maxima "
                       "as one jnp.max each)")
  ap.add_argument("--logits_dtype", default="float32", choices=["float32", "bfloat16"],
                  help="compute dtype of the vocabulary projection (network.T5Config)")
  ap.add_argument("--remat", default="none", choices=["none", "full", "minimal"])
  ap.add_argument("--optimizer_implementation", default="fused",
                  choices=["fused", "grouped", "cpu_kernels", "optax"],
                  help="step worker: optimizers.create_optimizer(implementation=...): "
                       "Adafactor + clipping as one update (fused), the same with arrays of one "
                       "shape stacked (grouped) or with the CPU reduction kernels "
                       "(cpu_kernels), or as the optax chain")
  ap.add_argument("--reg_target", default="reference", choices=["reference", "chosen"],
                  help="SlicHFModel.reg_target: 'reference' decodes 3 rows (paper: y_ref = SFT "
                       "summary), 'chosen' 2 rows (y_ref = y+, TRL CPO's NLL term)")
  ap.add_argument("--microbatches", type=int, default=1,
                  help="update_step num_microbatches (gradient accumulation)")
  ap.add_argument("--xla_default", action="store_true",
                  help="compile without slic_jax.compiler_options (XLA's defaults)")
  add_xla_option_flag(ap)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--peer_steps", type=int, default=3, help="timed TRL steps (they are slow)")
  ap.add_argument("--peer_bf16", action="store_true",
                  help="also run TRL with bf16 autocast (torch's AMX / AVX512-BF16 path); "
                       "with --peer_no_checkpointing also without gradient checkpointing")
  ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                  help="slic_jax rows of the side-by-side (" + ", ".join(SLIC_ROWS) + ")")
  ap.add_argument("--repeats", type=int, default=1,
                  help="side-by-side processes per framework (and the sweep's per length), run "
                       "in turn, the order reversed every other round; the fastest is shown")
  ap.add_argument("--peer_warmup", type=int, default=1)
  ap.add_argument("--interleave", action="store_true",
                  help="side by side and sweep: each round's processes start at once and "
                       "take turns step by step, the order reversed every cycle "
                       "(tools/step_turns.py); TRL then runs --warmup and --steps steps too, "
                       "and the report pairs the steps of each cycle (the sweep: each length "
                       "against the next shorter one)")
  ap.add_argument("--peer_reuse_malloc", action="store_true",
                  help="also run TRL (float32) with slic_jax's glibc malloc settings "
                       "(GLIBC_TUNABLES = host_memory.GLIBC_TUNABLES)")
  ap.add_argument("--peer_no_checkpointing", action="store_true",
                  help="also run TRL (float32; with --peer_bf16 also bf16 autocast) with "
                       "gradient_checkpointing=False (TRL's CPOConfig turns it on by default)")
  ap.add_argument("--host_malloc", default="reuse", choices=["reuse", "reuse_arenas", "default"],
                  help="step worker: host_memory.reuse_freed_memory() first (as "
                       "slic_jax.train), the same with single_arena=False, or glibc's "
                       "default malloc")
  ap.add_argument("--sweep", default="128,256,512,1024", help="input lengths ('' = none)")
  ap.add_argument("--sweep_size", default="mini")
  ap.add_argument("--sweep_peer", action="store_true", help="also sweep the TRL peer")
  ap.add_argument("--sweep_attention", default="default",
                  choices=["default", "fused_softmax"],
                  help="network.T5Config.attention_implementation of the sweep's runs")
  ap.add_argument("--sweep_dtype", default="float32", choices=["float32", "bfloat16"],
                  help="slic_jax's compute dtype in the sweep (bfloat16: logits too)")
  ap.add_argument("--levers", action="store_true", help="dtype/remat/batch variants")
  ap.add_argument("--lever_size", default="mini")
  ap.add_argument("--all_levers", action="store_true", help="also bfloat16 and remat 'minimal'")
  ap.add_argument("--lever_batches", default="8", help="extra batch sizes for the levers")
  ap.add_argument("--lever_microbatches", default="2,4", help="microbatch counts for the levers")
  ap.add_argument("--matmul_n", type=int, default=2048)
  ap.add_argument("--matmul_reps", type=int, default=10)
  ap.add_argument("--peer_env", default=DEFAULT_PEER_ENV)
  ap.add_argument("--peer_python", default=None,
                  help="the peer's python (torch, transformers, trl); default: --peer_env's")
  ap.add_argument("--peer_device", default="cpu", choices=["cpu", "cuda"],
                  help="where TRL runs (bench_peer_trl.py --device); slic_jax runs on jax's "
                       "default backend")
  ap.add_argument("--peer_lm_head", default="separate", choices=["separate", "as_built"],
                  help="TRL's T5 output layer (bench_peer_trl.py --lm_head): 'separate' "
                       "weights as T5 1.1 and slic_jax (77.0M parameters in T5 1.1 small); "
                       "'as_built': tied to the embedding, as transformers 5.x builds "
                       "T5ForConditionalGeneration whatever tie_word_embeddings says (60.5M; "
                       "every TRL row before session 14)")
  ap.add_argument("--peer_tf32", action="store_true",
                  help="TRL's float32 matmuls may use TF32 (cuda; XLA:GPU's default does)")
  ap.add_argument("--no_peer", action="store_true")
  ap.add_argument("--timeout", type=float, default=1800)
  ap.add_argument("--trainers", action="store_true",
                  help="also time python -m slic_jax.train vs python -m t5x.train")
  ap.add_argument("--t5x_python", default=os.path.join(T5X_ENV, "bin", "python"))
  ap.add_argument("--trainer_model", default="tiny")
  ap.add_argument("--trainer_workdir", default="/tmp/slic_jax_bench_trainers")
  ap.add_argument("--trainer_steps", type=int, default=60)
  ap.add_argument("--trainer_stats_period", type=int, default=10)
  ap.add_argument("--trainer_batch", type=int, default=32)
  ap.add_argument("--trainer_inputs", type=int, default=128)
  ap.add_argument("--trainer_targets", type=int, default=32)
  ap.add_argument("--out_dir", default=os.path.join(REPO, "benchmarks"))
  ap.add_argument("--render", default=None, help="only re-render results.md from this JSON")
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  sys.path.insert(0, REPO)
  if args.attention_implementation != "default" and not args._worker:
    raise SystemExit("--attention_implementation is a step worker's flag; side by side, "
                     f"add the rows {', '.join(CUDNN_ROWS + FUSED_SOFTMAX_ROWS)} to --rows"
                     "; in the sweep, --sweep_attention")
  if args._worker:
    fn = {"slic": worker_slic, "matmul": worker_matmul}[args._worker]
    print(json.dumps(fn(args)), flush=True)
    return
  if args.render:
    with open(args.render) as f:
      res = json.load(f)
    _write(args, res)
    print(to_markdown(res))
    return
  res = orchestrate(args)
  print(to_markdown(res))


if __name__ == "__main__":
  main()
