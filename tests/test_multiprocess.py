"""Several processes, one jax distributed runtime, on this machine's CPU.

`python -m slic_jax.train` with T5X's multi-host flags (``--multiprocess_gpu
--coordinator_address --process_count --process_index``): two processes of 2 CPU devices
each form one 4-device mesh (gloo collectives), read their own shards of the data, agree
on every batch (`input_pipeline.HostBatchAgreement` over the runtime's key-value store:
the same lengths, the same number of batches) and train one model. Nothing is mocked: these are real
processes talking through jax's coordinator.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from slic_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
             JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def run_processes(args_of, n: int, *, devices: int = 1, timeout: float = 600.0):
  """Starts ``n`` processes (``args_of(i)``: the argv after python) and waits for all."""
  procs = [subprocess.Popen([sys.executable, *args_of(i)], cwd=REPO, env=process_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(n)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
  return outs


AGREE = """
import json, sys
import jax, numpy as np
i, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=i)
from slic_jax import input_pipeline as ip
agree = ip.HostBatchAgreement("test", timeout_s=60)
shapes = []
for b in range(3):  # process 1's prompts and summaries grow longer each batch
  batch = {"encoder_input_tokens": np.zeros((2, 64), np.int32),
           "decoder_target_tokens": np.zeros((2, 16), np.int32),
           "decoder_loss_weights": np.zeros((2, 16), np.float32)}
  batch["encoder_input_tokens"][1, :10 + 20 * i * b] = 7
  batch["decoder_target_tokens"][0, :3 + 3 * i * b] = 5
  own = {k: e for k, (_, e) in ip.sequence_extents(batch).items()}
  out = ip.trim_padding(batch, 4, agree(own))
  shapes.append([out["encoder_input_tokens"].shape[-1], out["decoder_target_tokens"].shape[-1],
                 out["decoder_loss_weights"].shape[-1]])
# Process 0's data ends after 3 batches, process 1's after 4: both see a 4th batch
# (process 1's lengths), then both see the end.
shapes.append(agree(None if i == 0 else {"encoder_": 5, "decoder_": 2}))
shapes.append(agree(None))
# Nothing of the agreement is left in the store once both processes are past the end.
from jax._src import distributed
client = distributed.global_state.client
client.wait_at_barrier("test/both_done", 60000)
shapes.append(client.key_value_dir_get("slic_jax/batch_agreement/test/"))
print("RESULT" + json.dumps(shapes))
"""


def test_processes_agree_on_each_batch():
  port = free_port()
  outs = run_processes(lambda i: ["-c", AGREE, str(i), str(port)], 2, timeout=120)
  results = [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT"))[6:])
             for out in outs]
  # Encoder extents: process 0 always 10 → bucket 16; process 1 10, 30, 50 → 16, 32, 64.
  # Decoder: process 0 always 3; process 1 3, 6, 9 → 8, 8, 16 (L 16, 4 buckets: 8, 16);
  # decoder_loss_weights (all zero) follows its group.
  expected = [[16, 8, 8], [32, 8, 8], [64, 16, 16], {"encoder_": 5, "decoder_": 2}, None, []]
  assert results[0] == expected
  assert results[1] == expected


TINY = [
    "network.T5Config.emb_dim=32", "network.T5Config.num_heads=2",
    "network.T5Config.head_dim=16", "network.T5Config.mlp_dim=64",
    "network.T5Config.num_encoder_layers=1", "network.T5Config.num_decoder_layers=1",
    "TASK_FEATURE_LENGTHS={'inputs':256,'targets':32}", "BATCH_SIZE=16", "EVAL_STEPS=None",
    "TRAIN_STEPS=4", "EVAL_PERIOD=4", "LENGTH_BUCKETS=4",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  data = str(tmp_path_factory.mktemp("world") / "data")
  # 17 validation posts: the two hosts' eval shards hold 9 and 8 (2 and 1 batches of 8).
  synthetic.generate_world(data, seed=3, num_sft=(200, 17, 8), num_comparisons=(8, 8, 8))
  return data


def test_two_processes_train_one_model_with_trimmed_batches_and_uneven_eval_shards(world, tmp_path, monkeypatch):
  monkeypatch.setenv("SLIC_JAX_TLDR_DIR", world)
  model_dir = str(tmp_path / "model")
  port = free_port()
  outs = run_processes(lambda i: [
      "-m", "slic_jax.train", "--gin_file=gin/sft.gin", *[f"--gin.{b}" for b in TINY],
      f"--gin.MODEL_DIR='{model_dir}'", "--multiprocess_gpu",
      f"--coordinator_address=localhost:{port}", "--process_count=2", f"--process_index={i}",
  ], 2, devices=2)

  def lines(out, start):
    return [l for l in out.splitlines() if l.startswith(start)]

  for out in outs:
    assert "mesh {'data': 4, 'model': 1} over 4 devices" in out
  # One global model: both processes report the same losses and eval metrics.
  assert lines(outs[0], "step ") and ([l.split("  ")[:2] for l in lines(outs[0], "step ")] ==
                                      [l.split("  ")[:2] for l in lines(outs[1], "step ")])
  assert lines(outs[0], "eval @ 4") == lines(outs[1], "eval @ 4") != []
  # The whole validation split, each post once: the host whose shard ended first fed an
  # all-padding slice for the other's 2nd batch.
  assert "num_examples 17.0000" in lines(outs[0], "eval @ 4")[0]
  # The same batch shapes, compiled in the same order, some cut below the full lengths.
  compiled = [[l.split("update step compiled for ")[1].split(" (")[0]
               for l in out.splitlines() if "update step compiled for" in l] for out in outs]
  assert compiled[0] == compiled[1] and compiled[0]
  assert any("(16, 256)" not in c for c in compiled[0]), compiled[0]
  # Process 0 alone writes metrics (one record per report) and the checkpoint.
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f]
  assert [(r["step"], r["split"]) for r in records] == [
      (1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "train_eval")]
  assert len(os.listdir(os.path.join(model_dir, "train"))) == 1
  assert os.path.isdir(os.path.join(model_dir, "checkpoint_4"))
