r"""Peer benchmark: Hugging Face TRL's CPOTrainer (hinge + cpo_alpha) on a local T5 1.1.

Runs inside the peer venv made by ``tools/setup_peer_env.sh`` (torch 2.13.0 CPU,
transformers 5.23.0, trl 1.16.0), never in slic_jax's venv; ``tools/benchmark.py``
calls it in a subprocess. Prints one JSON line on stdout (and ``--out`` if given).

What is run: ``trl.experimental.cpo.CPOTrainer(...).train()`` — the real, full
Trainer loop — with ``loss_type="hinge"`` (``relu(1 − β·(log π(y⁺) − log π(y⁻)))``,
β = 1/δ = 1) and ``cpo_alpha`` = λ (token-mean NLL on the chosen response; SLiC-HF's
regulariser on y_ref = y⁺), Adafactor (transformers' implementation, constant
lr 1e-4, no relative step), ``max_grad_norm=1.0``, no dropout, on a
``T5ForConditionalGeneration`` built from a ``T5Config`` with slic_jax's dims
(T5 1.1: ``feed_forward_proj="gated-gelu"``, untied embeddings, d_kv 64,
32 relative buckets, max distance 128, dropout 0). ``HF_HUB_OFFLINE=1``; the
tokenizer is a local word-level ``PreTrainedTokenizerFast`` whose words are
``w<id>``, so a prompt of Li random words tokenises to exactly Li ids and each
response to Lt ids (the last one EOS): the same shapes as slic_jax's batch.

What is timed: a ``TrainerCallback`` records ``on_step_begin`` → ``on_step_end``
for every optimizer step (``training_step`` = ``compute_loss`` → TRL's
``concatenated_forward`` + ``cpo_loss``, ``backward``; then gradient clipping,
``optimizer.step()``, scheduler, ``zero_grad``) — ``step_s_median`` is the median
over the steps after ``--warmup``. The ``on_step_end`` → ``on_step_end`` interval
(which adds the data loader / collator and logging) is reported as
``loop_step_s_median``.

How CPOTrainer handles an encoder-decoder (trl 1.16.0, ``concatenated_inputs``):
the chosen and rejected labels are concatenated along the batch and the prompt is
``repeat(2, 1)``-ed, so ONE model call runs the encoder on 2·B prompts (each
prompt is encoded twice, once per response) and the decoder on 2·B sequences.
slic_jax encodes each prompt once and decodes 3 rows (chosen, rejected, y_ref).

``--matmul_only`` instead measures torch's square matmul peak (float32, bfloat16).

``--device cuda`` runs both on the GPU (``use_cpu=False``): the step timer then calls
``torch.cuda.synchronize()`` at each step's begin and end, so a step's time is its
GPU work, and ``peak_device_memory_mb`` is ``torch.cuda.max_memory_allocated()``.
``--tf32`` lets float32 matmuls use TF32 (``torch.backends.cuda.matmul.allow_tf32``;
PyTorch's default is off, XLA:GPU's default precision for float32 dots uses it).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import step_turns  # this file's folder: standard library only

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sync(device: str) -> None:
  if device == "cuda":
    import torch
    torch.cuda.synchronize()


def _device_info(device: str) -> dict:
  import torch
  if device != "cuda":
    return {"device": "cpu"}
  return {"device": "cuda", "device_name": torch.cuda.get_device_name(0),
          "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
          "peak_device_memory_mb": torch.cuda.max_memory_allocated() / 2 ** 20,
          "peak_device_memory_reserved_mb": torch.cuda.max_memory_reserved() / 2 ** 20}


def matmul_peak(n: int, reps: int, device: str = "cpu", budget_s: float = 10.0) -> dict:
  """Square n×n matmul FLOP/s per dtype: best and median of up to `reps` timed calls,
  fewer once they have taken `budget_s` (a CPU without native bf16 runs torch's bf16
  matmul at well under 1 GFLOP/s: a minute per call at n = 2048); the first call
  (warm-up) is not timed. `torch_<dtype>_reps` says how many were timed."""
  import torch
  out = {"n": n, "torch_num_threads": torch.get_num_threads()}
  for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    t0 = time.perf_counter()
    a @ b
    _sync(device)
    warm_s = time.perf_counter() - t0
    ts = []
    for _ in range(reps):
      if ts and (sum(ts) + warm_s > budget_s):
        break
      t0 = time.perf_counter()
      a @ b
      _sync(device)
      ts.append(time.perf_counter() - t0)
    out[f"torch_{name}_reps"] = len(ts)
    out[f"torch_{name}_flops_per_s"] = 2.0 * n ** 3 / min(ts)
    out[f"torch_{name}_flops_per_s_median"] = 2.0 * n ** 3 / statistics.median(ts)
  out["peak_rss_mb"] = _peak_rss_mb()
  out.update(_device_info(device))
  return out


def make_tokenizer(vocab_size: int):
  """Word-level tokenizer: id i <-> 'w<i>'; 0 = <pad>, 1 = </s>, 2 = <unk>."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {f"w{i}": i for i in range(vocab_size)}
  vocab["<pad>"], vocab["</s>"], vocab["<unk>"] = 0, 1, 2
  for i in (0, 1, 2):
    vocab.pop(f"w{i}")
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                 unk_token="<unk>")


def make_dataset(n_rows: int, li: int, lt: int, vocab_size: int, seed: int):
  """Random prompts of Li words and responses of Lt − 1 words + '</s>' (same shapes as slic_jax)."""
  import numpy as np
  from datasets import Dataset
  rng = np.random.default_rng(seed)
  words = lambda ids: " ".join(f"w{i}" for i in ids)
  rows = {"prompt": [], "chosen": [], "rejected": []}
  for _ in range(n_rows):
    rows["prompt"].append(words(rng.integers(3, vocab_size, li)))
    rows["chosen"].append(words(rng.integers(3, vocab_size, lt - 1)) + " </s>")
    rows["rejected"].append(words(rng.integers(3, vocab_size, lt - 1)) + " </s>")
  return Dataset.from_dict(rows)


def run_cpo(args) -> dict:
  import torch
  import transformers
  import trl
  from transformers import T5Config, T5ForConditionalGeneration, TrainerCallback
  from trl.experimental.cpo import CPOConfig, CPOTrainer

  rss_import = _peak_rss_mb()
  torch.manual_seed(args.seed)
  if args.threads:
    torch.set_num_threads(args.threads)
  cfg = T5Config(
      vocab_size=args.vocab_size, d_model=args.d_model, d_kv=args.d_kv, d_ff=args.d_ff,
      num_layers=args.num_layers, num_decoder_layers=args.num_layers,
      num_heads=args.num_heads, relative_attention_num_buckets=32,
      relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, is_encoder_decoder=True, pad_token_id=0, eos_token_id=1,
      decoder_start_token_id=0)
  model = T5ForConditionalGeneration(cfg)
  # transformers 5.x ties T5's lm_head to the shared embedding whatever the config says
  # (T5Config forces tie_word_embeddings=True and only reads False as "do not rescale the
  # decoder output", as T5 1.1 does): 16.4M fewer parameters than T5 1.1 small (77.0M,
  # slic_jax's model), the same FLOPs. 'separate' gives lm_head its own copy, as T5 1.1.
  if args.lm_head == "separate":
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    model._tied_weights_keys = {k: v for k, v in model._tied_weights_keys.items()
                                if k != "lm_head.weight"}
  num_params = sum(p.numel() for p in model.parameters())
  tokenizer = make_tokenizer(args.vocab_size)
  total = args.warmup + args.steps
  ds = make_dataset(args.batch * total, args.li, args.lt, args.vocab_size, args.seed)

  cpo_args = CPOConfig(
      output_dir=args.output_dir, per_device_train_batch_size=args.batch, max_steps=total,
      loss_type="hinge", beta=1.0 / args.delta, cpo_alpha=args.cpo_alpha,
      max_length=args.li + args.lt + 8, max_completion_length=args.lt,
      optim="adafactor", learning_rate=1e-4, lr_scheduler_type="constant",
      max_grad_norm=1.0, weight_decay=0.0, disable_dropout=True,
      logging_steps=10 ** 6, save_strategy="no", report_to=[], disable_tqdm=True,
      dataloader_num_workers=0, remove_unused_columns=False, seed=args.seed,
      bf16=args.bf16, use_cpu=args.device == "cpu", dataset_num_proc=None,
      # CPOConfig's own default is gradient_checkpointing=True (per-layer recompute in the
      # backward pass); 'default' leaves it, as a user who does not set it runs TRL.
      **({} if args.gradient_checkpointing == "default"
         else {"gradient_checkpointing": args.gradient_checkpointing == "on"}))

  turns = step_turns.Turns(args._turns)  # tools/benchmark.py --interleave

  class Timer(TrainerCallback):
    def __init__(self):
      self.begin, self.compute, self.loop, self.last_end = None, [], [], None
      self.faults, self.kernel_s, self.usage = [], [], None

    def on_step_begin(self, *a, **k):
      turns.take()
      _sync(args.device)
      self.begin = time.perf_counter()
      self.usage = resource.getrusage(resource.RUSAGE_SELF)

    def on_step_end(self, *a, **k):
      _sync(args.device)
      now = time.perf_counter()
      u = resource.getrusage(resource.RUSAGE_SELF)
      self.faults.append(u.ru_minflt - self.usage.ru_minflt)
      self.kernel_s.append(u.ru_stime - self.usage.ru_stime)
      self.compute.append(now - self.begin)
      if self.last_end is not None:
        self.loop.append(now - self.last_end)
      self.last_end = now
      turns.give_back()

  timer = Timer()
  t0 = time.perf_counter()
  trainer = CPOTrainer(model=model, args=cpo_args, train_dataset=ds,
                       processing_class=tokenizer, callbacks=[timer])
  setup_s = time.perf_counter() - t0
  # Check the shapes TRL actually feeds the model (one collated batch).
  batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)])
  cat = trainer.concatenated_inputs(batch, is_encoder_decoder=True, padding_value=0)
  shapes = {"encoder_input_ids": list(cat["concatenated_input_ids"].shape),
            "concatenated_labels": list(cat["concatenated_labels"].shape)}
  t0 = time.perf_counter()
  out = trainer.train()
  train_s = time.perf_counter() - t0
  comp = timer.compute[args.warmup:]
  loop = timer.loop[max(args.warmup - 1, 0):]
  med = statistics.median(comp)
  return {
      "framework": "trl_cpo", "size": args.size_name, "dtype": "bfloat16" if args.bf16 else "float32",
      "batch_pairs": args.batch, "li": args.li, "lt": args.lt, "num_params": num_params,
      "lm_head": args.lm_head,
      "lm_head_tied_after_training": model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr(),
      "setup_s": setup_s, "train_s": train_s, "step_times_s": comp, "step_s_median": med,
      "step_s_min": min(comp), "loop_step_s_median": statistics.median(loop) if loop else None,
      "pairs_per_s": args.batch / med, "final_train_loss": out.training_loss,
      "minor_faults_per_step": statistics.median(timer.faults[args.warmup:]),
      "kernel_s_per_step": statistics.median(timer.kernel_s[args.warmup:]),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
      "model_call_shapes": shapes,
      "encoder_passes_per_pair": shapes["encoder_input_ids"][0] // args.batch,
      "decoder_rows_per_pair": shapes["concatenated_labels"][0] // args.batch,
      "gradient_checkpointing": bool(cpo_args.gradient_checkpointing),
      "model_is_gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
      "attn_implementation": getattr(model.config, "_attn_implementation", None),
      "timed": ("CPOTrainer.train(): on_step_begin->on_step_end per optimizer step "
                "(compute_loss/concatenated_forward+cpo_loss, backward, clip, Adafactor step)"),
      "peak_rss_mb": _peak_rss_mb(), "rss_after_imports_mb": rss_import,
      "torch_num_threads": torch.get_num_threads(),
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                   "trl": trl.__version__},
      **_device_info(args.device),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--matmul_only", action="store_true")
  ap.add_argument("--matmul_n", type=int, default=2048)
  ap.add_argument("--matmul_reps", type=int, default=10)
  ap.add_argument("--d_model", type=int, default=512)
  ap.add_argument("--num_heads", type=int, default=6)
  ap.add_argument("--d_kv", type=int, default=64)
  ap.add_argument("--d_ff", type=int, default=1024)
  ap.add_argument("--num_layers", type=int, default=8)
  ap.add_argument("--vocab_size", type=int, default=32128)
  ap.add_argument("--size_name", default="custom")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--li", type=int, default=512)
  ap.add_argument("--lt", type=int, default=64)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--delta", type=float, default=1.0, help="SLiC-HF margin; TRL beta = 1/delta")
  ap.add_argument("--cpo_alpha", type=float, default=0.5, help="NLL weight (SLiC-HF's lambda)")
  ap.add_argument("--bf16", action="store_true")
  ap.add_argument("--gradient_checkpointing", default="default", choices=["default", "on", "off"],
                  help="CPOConfig.gradient_checkpointing ('default': TRL's, which is on)")
  ap.add_argument("--lm_head", default="as_built", choices=["as_built", "separate"],
                  help="as_built: as transformers builds T5 (lm_head tied to the embedding); "
                  "separate: its own weights, as T5 1.1 and slic_jax")
  ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
  ap.add_argument("--tf32", action="store_true", help="float32 matmuls may use TF32 (cuda)")
  ap.add_argument("--output_dir", default="/tmp/slic_jax_peer_trl_out")
  ap.add_argument("--out", default=None, help="also write the JSON here")
  ap.add_argument("--_turns", default=None, help=argparse.SUPPRESS)  # step_turns.Turns
  args = ap.parse_args(argv)
  if args.tf32:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  res = (matmul_peak(args.matmul_n, args.matmul_reps, args.device) if args.matmul_only
         else run_cpo(args))
  line = json.dumps(res)
  if args.out:
    with open(args.out, "w") as f:
      f.write(line + "\n")
  print(line, flush=True)


if __name__ == "__main__":
  sys.exit(main())
