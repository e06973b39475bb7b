"""The CPU softmax kernels (`slic_jax.fused_softmax`) against the attention they replace."""
import os
import platform
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from slic_jax import fused_softmax, network

needs_kernels = pytest.mark.skipif(
    not fused_softmax.available(),
    reason="the fused softmax kernels need a C++17 compiler ($CXX, default g++)")


def _reference_probs(logits, diag, key_segments, query_segments):
  """softmax of logits + bias[h, k − q] over the keys of each query's segment, uniform for
  padding rows (segment 0) and rows with no key in their segment."""
  b, h, q, k = logits.shape
  rel = np.arange(k)[None, :] - np.arange(q)[:, None] + q - 1
  x = logits + diag[:, rel][None]
  same = key_segments[:, None, :] == query_segments[:, :, None]  # [B, Q, K]
  x = np.where(same[:, None], x, -np.inf)
  empty = ~same.any(-1)[:, None, :, None] | (query_segments[:, None, :, None] == 0)
  x = np.where(empty, 0.0, x)
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  p = e / e.sum(-1, keepdims=True)
  return np.where(empty, 1.0 / k, p)


def _inputs(q, k, seed=0):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(3, 2, q, k)) * 4).astype(np.float32)
  diag = rng.normal(size=(2, q + k - 1)).astype(np.float32)
  key_valid = np.ones((3, k), np.float32)
  key_valid[1, k - 7:] = 0
  key_valid[2, 3:] = 0
  query_valid = np.ones((3, q), np.float32)
  query_valid[1, q - 5:] = 0
  query_valid[2, :2] = 0
  return logits, diag, key_valid, query_valid


@needs_kernels
@pytest.mark.parametrize("dtype,rtol", [(jnp.bfloat16, 2 ** -8), (jnp.float32, 2e-6)])
@pytest.mark.parametrize("q,k", [(37, 37), (20, 53), (64, 32)])
def test_forward_kernel_is_the_masked_softmax_with_the_diagonal_bias(q, k, dtype, rtol):
  logits, diag, key_valid, query_valid = _inputs(q, k)
  got = jax.jit(fused_softmax.probabilities, static_argnums=4)(
      logits, diag, key_valid, query_valid, dtype)
  assert got.dtype == dtype
  got = np.asarray(got, np.float32)
  want = _reference_probs(logits, diag, key_valid, query_valid)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-7)
  assert np.all(got[1, :, :q - 5, k - 7:] == 0)  # masked keys get exactly 0
  np.testing.assert_array_equal(got[2, :, :2], np.float32(jnp.asarray(1.0 / k, dtype)))
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=k * rtol)


@needs_kernels
@pytest.mark.parametrize("dtype,rtol", [(jnp.bfloat16, 2 ** -8), (jnp.float32, 2e-6)])
def test_forward_kernel_keeps_each_packed_segment_to_itself(dtype, rtol):
  """Packed rows (SeqIO segment ids 1, 2, 3, then padding 0): a query attends to its own
  segment's keys only, and a padding query is uniform."""
  q = 40
  logits, diag, _, _ = _inputs(q, q, seed=4)
  segments = np.zeros((3, q), np.float32)
  segments[0, :12], segments[0, 12:30], segments[0, 30:37] = 1, 2, 3
  segments[1, :] = 1
  segments[2, :5], segments[2, 5:6] = 1, 2  # a one-token segment, then padding
  got = np.asarray(jax.jit(fused_softmax.probabilities, static_argnums=4)(
      logits, diag, segments, segments, dtype), np.float32)
  want = _reference_probs(logits, diag, segments, segments)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-7)
  assert np.all(got[0, :, :12, 12:] == 0) and np.all(got[0, :, 12:30, :12] == 0)
  assert np.all(got[0, :, 12:30, 30:] == 0)
  np.testing.assert_array_equal(got[2, :, 5, 5], 1.0)  # its own segment's only key
  np.testing.assert_array_equal(got[2, :, 6:], np.float32(jnp.asarray(1.0 / q, dtype)))


@needs_kernels
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_backward_kernel_rounds_like_xla_and_sums_each_diagonal(dtype):
  q, k = 29, 45
  rng = np.random.default_rng(1)
  probs = jnp.asarray(rng.random((3, 2, q, k)), dtype)
  dp = rng.normal(size=(3, 2, q, k)).astype(np.float32)
  row = rng.normal(size=(3, 2, q)).astype(np.float32)
  dlogits, ddiag = jax.jit(fused_softmax.probabilities_grad)(dp, probs, row)
  assert dlogits.dtype == dtype
  want = (probs.astype(jnp.float32) * (dp - row[..., None])).astype(dtype)
  np.testing.assert_array_equal(np.asarray(dlogits, np.float32), np.asarray(want, np.float32))
  rel = (np.arange(k)[None, :] - np.arange(q)[:, None] + q - 1).ravel()
  want_diag = np.zeros((2, q + k - 1))
  summed = np.asarray(want, np.float64).sum(0).reshape(2, -1)
  for h in range(2):
    np.add.at(want_diag[h], rel, summed[h])
  np.testing.assert_allclose(np.asarray(ddiag), want_diag, rtol=1e-5, atol=1e-5)


def _tiny_loss_and_grads(impl, tokens, targets, params=None, dtype="bfloat16"):
  cfg = network.make_config("tiny", dtype=dtype, attention_implementation=impl)
  model = network.Transformer(cfg)
  if params is None:
    params = model.init(jax.random.PRNGKey(0), tokens, targets, targets,
                        enable_dropout=False)["params"]

  def loss(params):
    logits = model.apply({"params": params}, tokens, targets, targets, enable_dropout=False)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    return -jnp.sum(lp * (targets > 0))

  return params, jax.jit(jax.value_and_grad(loss))(params)


@needs_kernels
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_model_with_fused_softmax_matches_default_attention_with_padding(dtype):
  rng = np.random.default_rng(2)
  tokens = rng.integers(1, 500, size=(3, 45))
  tokens[1, 30:] = 0
  tokens[2, 5:] = 0
  targets = rng.integers(1, 500, size=(3, 9))
  targets[0, 6:] = 0
  params, (loss_d, grads_d) = _tiny_loss_and_grads("default", tokens, targets, dtype=dtype)
  _, (loss_f, grads_f) = _tiny_loss_and_grads("fused_softmax", tokens, targets, params, dtype)
  np.testing.assert_allclose(float(loss_f), float(loss_d), rtol=1e-5)
  for (path, gd), gf in zip(jax.tree_util.tree_leaves_with_path(grads_d),
                            jax.tree.leaves(grads_f)):
    err = float(jnp.linalg.norm(gf - gd) / jnp.linalg.norm(gd))
    assert err < 1e-4, (jax.tree_util.keystr(path), err)
  # The encoder's position bias gets a gradient through the kernels' diagonal sums.
  assert float(jnp.abs(grads_f["encoder"]["relpos_bias"]["rel_embedding"]).sum()) > 0


@needs_kernels
def test_model_with_fused_softmax_matches_default_attention_on_packed_inputs():
  """Two examples packed per row (encoder and decoder segment ids and positions, as
  SeqIO's packing feature converters give them): loss and gradients as the default
  attention's."""
  rng = np.random.default_rng(5)
  tokens = rng.integers(2, 500, size=(2, 30))
  enc_seg = np.zeros((2, 30), np.int32)
  enc_seg[0, :13], enc_seg[0, 13:27] = 1, 2
  enc_seg[1, :20], enc_seg[1, 20:22] = 1, 2
  tokens[enc_seg == 0] = 0
  targets = rng.integers(2, 500, size=(2, 10))
  dec_seg = np.zeros((2, 10), np.int32)
  dec_seg[0, :4], dec_seg[0, 4:9] = 1, 2
  dec_seg[1, :6], dec_seg[1, 6:8] = 1, 2
  targets[dec_seg == 0] = 0
  dec_pos = np.zeros_like(dec_seg)
  for r in range(2):
    for sid in (1, 2):
      idx = np.flatnonzero(dec_seg[r] == sid)
      dec_pos[r, idx] = np.arange(len(idx))
  inputs = np.where(dec_pos == 0, 0, np.roll(targets, 1, axis=1))

  def run(impl, params=None):
    cfg = network.make_config("tiny", dtype="float32", attention_implementation=impl)
    model = network.Transformer(cfg)
    args = (tokens, inputs, targets, enc_seg, dec_seg, None, dec_pos)
    if params is None:
      params = model.init(jax.random.PRNGKey(0), *args, enable_dropout=False)["params"]

    def loss(params):
      logits = model.apply({"params": params}, *args, enable_dropout=False)
      lp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
      return -jnp.sum(lp * (targets > 0))

    return params, jax.jit(jax.value_and_grad(loss))(params)

  params, (loss_d, grads_d) = run("default")
  _, (loss_f, grads_f) = run("fused_softmax", params)
  np.testing.assert_allclose(float(loss_f), float(loss_d), rtol=1e-5)
  for (path, gd), gf in zip(jax.tree_util.tree_leaves_with_path(grads_d),
                            jax.tree.leaves(grads_f)):
    err = float(jnp.linalg.norm(gf - gd) / jnp.linalg.norm(gd))
    assert err < 1e-4, (jax.tree_util.keystr(path), err)


@needs_kernels
def test_fused_softmax_runs_the_kernels_in_the_encoder_only():
  cfg = network.make_config("tiny", dtype="bfloat16", attention_implementation="fused_softmax")
  model = network.Transformer(cfg)
  tokens = jnp.ones((2, 16), jnp.int32)
  targets = jnp.ones((2, 8), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), tokens, targets, targets,
                      enable_dropout=False)["params"]
  grad = jax.grad(lambda p: model.apply({"params": p}, tokens, targets, targets,
                                        enable_dropout=False).sum())
  hlo = jax.jit(grad).lower(params).as_text()
  assert hlo.count(fused_softmax.FORWARD_TARGETS["bfloat16"]) == cfg.num_encoder_layers
  assert hlo.count(fused_softmax.BACKWARD_TARGETS["bfloat16"]) == cfg.num_encoder_layers
  # Packed inputs (segment ids) run the kernels too.
  packed = jax.jit(lambda p: model.apply(
      {"params": p}, tokens, targets, targets, jnp.ones_like(tokens), jnp.ones_like(targets),
      enable_dropout=False)).lower(params).as_text()
  assert packed.count(fused_softmax.FORWARD_TARGETS["bfloat16"]) == cfg.num_encoder_layers


def _custom_call_shapes(hlo, target):
  """The result types of the compiled HLO's custom calls to `target`."""
  return re.findall(r"= \(?([a-z0-9]+\[[0-9,]*\])[^\n]*custom_call_target=\"%s\"" % target,
                    hlo)


@needs_kernels
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_run_on_each_devices_shard_of_the_batch_and_heads(dtype):
  """On a ('data', 'model') mesh of 4 × 2 fake CPU devices, batch over 'data' and heads
  over 'model': each device runs both kernels on its [B/4, H/2, Q, K] shard (nothing is
  gathered), and the output and every gradient are the single device's (the bias
  gradient summed over the batch's devices)."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  b, h, q, d = 8, 4, 24, 8
  rng = np.random.default_rng(3)
  logits = (rng.normal(size=(b, h, q, q)) * 3).astype(np.float32)
  value = rng.normal(size=(b, q, h, d)).astype(np.float32)
  diag = rng.normal(size=(h, 2 * q - 1)).astype(np.float32)
  valid = np.ones((b, q), np.float32)
  valid[1, 17:] = 0
  valid[6, 5:] = 0
  weight = rng.normal(size=(b, q, h, d)).astype(np.float32)

  def loss(logits, value, diag, valid, weight):
    o = fused_softmax.softmax_weighted_values(logits, value, diag, valid, valid, dtype)
    return jnp.sum(o.astype(jnp.float32) * weight)

  step = jax.value_and_grad(loss, argnums=(0, 1, 2))
  args = (logits, value, diag, valid, weight)
  want = jax.jit(step)(*args)
  specs = (P("data", "model"), P("data", None, "model"), P("model"), P("data"),
           P("data", None, "model"))
  sharded = jax.jit(step, in_shardings=tuple(NamedSharding(mesh, s) for s in specs))
  hlo = sharded.lower(*args).compile().as_text()
  kind = jnp.dtype(dtype).name
  shard = "%s[2,2,%d,%d]" % ({"bfloat16": "bf16", "float32": "f32"}[kind], q, q)
  assert _custom_call_shapes(hlo, fused_softmax.FORWARD_TARGETS[kind]) == [shard]
  assert _custom_call_shapes(hlo, fused_softmax.BACKWARD_TARGETS[kind]) == [shard]
  # No [B, H, Q, K] array is gathered (the kernels' operands and results stay shards).
  gathered = re.findall(r"= ([a-z0-9]+\[[0-9,]*\])[^\n]* all-gather\(", hlo)
  assert not [t for t in gathered if t.endswith(",%d,%d]" % (q, q))], gathered
  got = sharded(*args)
  assert got[1][0].sharding.spec[:2] == ("data", "model")  # dlogits stay sharded
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=1e-5, atol=1e-5)


def test_fused_softmax_needs_bfloat16_or_float32_and_float32_logits():
  with pytest.raises(ValueError, match="fused_softmax.*dtype=float16"):
    network.make_config("tiny", dtype="float16", attention_implementation="fused_softmax")
  with pytest.raises(ValueError, match="float32_attention_logits=False"):
    network.make_config("tiny", dtype="bfloat16", float32_attention_logits=False,
                        attention_implementation="fused_softmax")


def test_missing_compiler_is_named(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  monkeypatch.setenv("SLIC_JAX_KERNEL_CACHE", str(tmp_path))
  with pytest.raises(fused_softmax.KernelUnavailable, match="'no-such-compiler-here'.*not on PATH"):
    fused_softmax.library_path()
  assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_is_named(monkeypatch, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv("SLIC_JAX_KERNEL_CACHE", str(blocker / "kernels"))
  monkeypatch.setenv("CXX", sys.executable)  # any program on PATH: never reached
  with pytest.raises(fused_softmax.KernelUnavailable, match="cannot write the kernel cache"):
    fused_softmax.library_path()


def _fake_compiler(tmp_path):
  """A 'compiler' that writes its -o file: library_path's build and cache without g++."""
  script = tmp_path / "fake-cxx"
  script.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\necho built > "$2"\n')
  script.chmod(0o755)
  return str(script)


def test_a_new_build_prunes_builds_unused_for_a_month(monkeypatch, tmp_path):
  cache = tmp_path / "kernels"
  cache.mkdir()
  month_ago = time.time() - 31 * 86400
  stale = cache / "fused_softmax-00000000000000000000.so"  # another source / jaxlib
  recent = cache / "fused_softmax-11111111111111111111.so"  # used last week: kept
  crashed = cache / "tmpabc123.so"  # an interrupted build, two days old
  building = cache / "tmpdef456.so"  # another process building now: kept
  other = cache / "notes.txt"  # not ours: kept
  for path in (stale, recent, crashed, building, other):
    path.write_text("x")
  os.utime(stale, (month_ago, month_ago))
  os.utime(recent, (time.time() - 7 * 86400,) * 2)
  os.utime(crashed, (time.time() - 2 * 86400,) * 2)
  os.utime(other, (month_ago, month_ago))
  monkeypatch.setenv("SLIC_JAX_KERNEL_CACHE", str(cache))
  monkeypatch.setenv("CXX", _fake_compiler(tmp_path))
  built = fused_softmax.library_path()
  assert built.read_text() == "built\n"
  assert sorted(p.name for p in cache.iterdir()) == sorted(
      [built.name, recent.name, building.name, other.name])


def test_loading_a_cached_build_marks_its_use(monkeypatch, tmp_path):
  monkeypatch.setenv("SLIC_JAX_KERNEL_CACHE", str(tmp_path / "kernels"))
  monkeypatch.setenv("CXX", _fake_compiler(tmp_path))
  built = fused_softmax.library_path()
  month_ago = time.time() - 31 * 86400
  os.utime(built, (month_ago, month_ago))
  built.write_text("cached")  # not rebuilt on the next call
  os.utime(built, (month_ago, month_ago))
  assert fused_softmax.library_path() == built
  assert built.read_text() == "cached"
  assert time.time() - built.stat().st_mtime < 60
  # Its mark keeps it when another build prunes the cache.
  assert fused_softmax.prune_cache(built.parent, keep=tmp_path / "other.so") == []
  os.utime(built, (month_ago, month_ago))
  assert fused_softmax.prune_cache(built.parent, keep=tmp_path / "other.so") == [built]


_PORTABLE_CHECK = """
import numpy as np, jax, jax.numpy as jnp, sys
sys.path.insert(0, {tests!r})
from test_fused_softmax import _inputs, _reference_probs
from slic_jax import fused_softmax
logits, diag, kv, qv = _inputs(37, 37)
packed = np.zeros((3, 37), np.float32)
packed[:, :10], packed[:, 10:25], packed[1, 25:] = 1, 2, 3
for dtype, rtol in ((jnp.bfloat16, 2 ** -8), (jnp.float32, 2e-6)):
  for ks, qs in ((kv, qv), (packed, packed)):
    got = np.asarray(fused_softmax.probabilities(logits, diag, ks, qs, dtype), np.float32)
    np.testing.assert_allclose(got, _reference_probs(logits, diag, ks, qs), rtol=rtol, atol=1e-7)
  probs = jnp.asarray(_reference_probs(logits, diag, kv, qv), dtype)
  dl, _ = fused_softmax.probabilities_grad(logits, probs, logits[..., 0])
  want = (probs.astype(jnp.float32) * (logits - logits[..., :1])).astype(dtype)
  np.testing.assert_array_equal(np.asarray(dl, np.float32), np.asarray(want, np.float32))
print(fused_softmax.register())
"""


@needs_kernels
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 target flags")
def test_portable_loops_without_avx512_give_the_same_results(tmp_path):
  """The plain loops (a CPU without AVX-512 BF16), built with -march=x86-64-v3: padded
  and packed rows, both dtypes."""
  env = {**os.environ, "SLIC_JAX_KERNEL_ARCH_FLAGS": "-march=x86-64-v3",
         "SLIC_JAX_KERNEL_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
      [sys.executable, "-c", _PORTABLE_CHECK.format(tests=os.path.dirname(__file__))],
      env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert str(tmp_path) in out.stdout  # built with the flags above, not the shared cache
