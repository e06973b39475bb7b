"""tools/mesh_step_cost.py: collectives read from compiled HLO, and what the sharded step
sends (8 fake CPU devices, tests/conftest.py)."""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import mesh_step_cost  # noqa: E402

import benchmark  # noqa: E402

from slic_jax import matmul  # noqa: E402
from slic_jax import network  # noqa: E402
from slic_jax import partitioning  # noqa: E402


def test_shape_bytes_reads_arrays_tuples_and_scalars():
  assert mesh_step_cost.shape_bytes("f32[4,8]{1,0}") == 128
  assert mesh_step_cost.shape_bytes("(f32[2]{0}, bf16[3]{0})") == 14
  assert mesh_step_cost.shape_bytes("f32[]") == 4
  assert mesh_step_cost.shape_bytes("pred[5]") == 5
  with pytest.raises(ValueError, match="unknown HLO element type 'q7'"):
    mesh_step_cost.shape_bytes("q7[2]")


def test_collectives_by_kind_and_source():
  hlo = "\n".join([
      '  %all-reduce.1 = (f32[128,64]{1,0}, f32[64]{0}) all-reduce(%a, %b), channel_id=1, '
      'replica_groups={{0,1}}, to_apply=%add, metadata={op_name="jit(train_step)/'
      'transpose(jvp(Transformer.encode))/encoder/layers_3/mlp/wo/dot_general"}',
      '  %all-gather.2 = bf16[8,4]{1,0} all-gather(%c), dimensions={1}',
      '  ROOT %all-gather-start.3 = ((f32[2]{0}), f32[4]{0}) all-gather-start(%d), '
      'dimensions={0}',
      '  %all-gather-done.3 = f32[4]{0} all-gather-done(%all-gather-start.3)',
      '  %add.4 = f32[4]{0} add(%e, %f)',
  ])
  items = mesh_step_cost.collectives(hlo)
  assert [(c["kind"], c["bytes"]) for c in items] == [
      ("all-reduce", 128 * 64 * 4 + 64 * 4), ("all-gather", 64), ("all-gather", 16)]
  assert items[0]["source"] == "transpose(jvp(Transformer.encode))/encoder/L/mlp/wo/dot_general"
  assert items[1]["source"] == "(no source)"
  kinds = mesh_step_cost.by_kind(items)
  assert list(kinds) == ["all-reduce", "all-gather"]
  assert kinds["all-gather"] == {"count": 2, "mb": 80 / 1e6}
  top = mesh_step_cost.largest(items, 1)
  assert top == [{"kind": "all-reduce", "source": items[0]["source"], "count": 1,
                  "mb": items[0]["bytes"] / 1e6}]


LOOP_HLO = """\
%fused_dot (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (b: (s32[], f32[4,8], f32[8,2])) -> (s32[], f32[4,8], f32[8,2]) {
  %f = f32[4,2]{1,0} fusion(%x, %y), kind=kOutput, calls=%fused_dot
  %all-reduce.7 = f32[8,2]{1,0} all-reduce(%y), replica_groups={{0,1}}, to_apply=%add
}

%cond (c: (s32[], f32[4,8], f32[8,2])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[4,8], w: f32[8,2]) -> f32[4,2] {
  %d = f32[4,2]{1,0} dot(%a, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %all-reduce.1 = f32[8,2]{1,0} all-reduce(%w), replica_groups={{0,1}}, to_apply=%add
  %while.2 = (s32[], f32[4,8], f32[8,2]) while(%t), condition=%cond, body=%body, \
backend_config={"known_trip_count":{"n":"3"}}
}
"""


def test_a_loop_body_counts_once_per_trip():
  mult = mesh_step_cost.computation_multipliers(LOOP_HLO)
  assert mult["main"] == 1 and mult["body"] == 3 and mult["cond"] == 4
  assert mult["fused_dot"] == 3  # called from the body
  assert mesh_step_cost.matmul_flops(LOOP_HLO) == (1 + 3) * 2 * 4 * 2 * 8
  items = mesh_step_cost.collectives(LOOP_HLO)
  assert [(c["bytes"], c["times"]) for c in items] == [(64, 3), (64, 1)]
  assert mesh_step_cost.by_kind(items) == {"all-reduce": {"count": 4, "mb": 4 * 64 / 1e6}}


def test_a_loop_without_a_known_trip_count_counts_its_conditions_bound():
  """libtpu's programs carry no known_trip_count: `lax.scan`'s condition, counter <
  constant(N), gives the trips; a condition of any other form leaves the body once."""
  text = LOOP_HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', "").replace(
      "  ROOT %lt = pred[] compare(%i, %n), direction=LT",
      "  %n = s32[]{:T(128)} constant(3)\n  ROOT %lt = pred[] compare(%i, %n), direction=LT")
  assert "known_trip_count" not in text and "constant(3)" in text
  mult = mesh_step_cost.computation_multipliers(text)
  assert mult["body"] == 3 and mult["cond"] == 4 and mult["fused_dot"] == 3
  assert mesh_step_cost.matmul_flops(text) == (1 + 3) * 2 * 4 * 2 * 8
  other = text.replace("direction=LT", "direction=NE")
  assert mesh_step_cost.computation_multipliers(other)["body"] == 1


def test_parse_mesh():
  assert mesh_step_cost.parse_mesh("4x2") == (4, 2)
  assert mesh_step_cost.parse_mesh("8×1") == (8, 1)
  for bad in ("4", "0x8", "4x2x1"):
    with pytest.raises(argparse.ArgumentTypeError, match="DATAxMODEL"):
      mesh_step_cost.parse_mesh(bad)


def _all_gathered_bytes(fn, v):
  text = jax.jit(fn).lower(v).compile().as_text()
  return sum(c["bytes"] for c in mesh_step_cost.collectives(text) if c["kind"] == "all-gather")


def test_first_element_takes_no_shard_from_other_devices():
  """matmul.first_element under a mesh reads v[0, ..., 0] from its device; the flattening
  form it uses on one device gathers every shard of an array split on an inner axis."""
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
  x = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8) + 3.0
  v = jax.device_put(x, NamedSharding(mesh, P(None, None, "model")))
  with jax.set_mesh(mesh):
    assert float(jax.jit(matmul.first_element)(v)) == 3.0
    assert _all_gathered_bytes(matmul.first_element, v) == 0
    assert _all_gathered_bytes(lambda a: a.reshape(-1)[0], v) >= x.size * 4 // 2
  one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  with jax.set_mesh(one):
    assert float(jax.jit(matmul.first_element)(jnp.asarray(x))) == 3.0


@pytest.mark.filterwarnings("ignore:.*context manager has been deprecated")
def test_the_position_bias_gradient_is_tied_without_a_gather_under_any_mesh():
  """network.add_position_bias ties the values' cotangent to the bias gradient [1, H, L, L]
  through one element. The heads, split over 'model', are that array's leading axis, so even the
  flattening form (which T5X's legacy ``with mesh:`` context keeps) takes the element
  without a gather; a layout that split an inner axis would gather the whole gradient."""
  from slic_jax import network
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
  rng = np.random.default_rng(0)
  logits = jax.device_put(rng.normal(size=(4, 4, 8, 8)).astype(np.float32),
                          NamedSharding(mesh, P("data", "model")))
  bias = jax.device_put(rng.normal(size=(1, 4, 8, 8)).astype(np.float32),
                        NamedSharding(mesh, P(None, "model")))
  value = jax.device_put(rng.normal(size=(4, 8, 4, 2)).astype(np.float32),
                         NamedSharding(mesh, P("data", None, "model")))

  def loss(lg, b, v):
    s, v = network.add_position_bias(lg, None, b, v)
    return jnp.sum(s ** 2) + jnp.sum(v)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  for context in (jax.set_mesh(mesh), mesh):
    with context:
      text = grad.lower(logits, bias, value).compile().as_text()
    gathered = [c for c in mesh_step_cost.collectives(text) if c["kind"] == "all-gather"]
    assert not gathered, gathered
  d_logits, d_bias, d_value = grad(logits, bias, value)
  np.testing.assert_array_equal(np.asarray(d_value), 1.0)
  x = np.asarray(logits) + np.asarray(bias)
  np.testing.assert_allclose(np.asarray(d_logits), 2 * x, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(d_bias), 2 * x.sum(0, keepdims=True), rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_meshes():
  """The tool's rows for a tiny SLiC-HF step: one device, 8×1 and 4×2."""
  args = argparse.Namespace(size="tiny", dtype="float32", attention_implementation="default",
                            vocab_size=None, model="slic_hf", batch=8, li=32, lt=8, pack=1, remat="none",
                            reg_target="reference")
  _, model, tx, batch = mesh_step_cost.build(args)
  rows = {"1x1": mesh_step_cost.mesh_row(mesh_step_cost.compile_step(
      model, tx, batch, partitioning.Partitioner(devices=jax.devices()[:1])), 1, None, 5)}
  for d, m, k in ((8, 1, 1), (4, 2, 1), (4, 1, 2)):
    compiled = mesh_step_cost.compile_step(
        model, tx, batch, partitioning.Partitioner(num_partitions=m,
                                                   devices=jax.devices()[:d * m]), k)
    rows[f"{d}x{m}" + (f" k={k}" if k > 1 else "")] = mesh_step_cost.mesh_row(
        compiled, d * m, rows["1x1"]["matmul_flops_per_device"], 5)
  rows["4x1"] = mesh_step_cost.mesh_row(mesh_step_cost.compile_step(
      model, tx, batch, partitioning.Partitioner(devices=jax.devices()[:4])), 4,
      rows["1x1"]["matmul_flops_per_device"], 5)
  abstract, _ = partitioning.Partitioner(devices=jax.devices()[:1]).train_state_shardings(
      model, tx, {k: v.shape for k, v in batch.items()})
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.params))
  return rows, param_bytes


def test_the_mesh_divides_the_step_and_sends_gradients_once(tiny_meshes):
  rows, param_bytes = tiny_meshes
  assert rows["1x1"]["collectives"] == {} and rows["1x1"]["collective_mb"] == 0
  # The matmuls read from the program are the model's (tools/benchmark.py's count).
  model_flops = benchmark.config_flops(network.make_config("tiny"), 8, 32, 8)["train_step"]
  assert 0.97 < rows["1x1"]["matmul_flops_per_device"] / model_flops < 1.05
  for name in ("8x1", "4x2", "4x1 k=2"):
    # Every device does 1/8 of the work, give or take what all repeat (the optimizer's
    # update of replicated parameters, norms): an unpartitioned step would be 8.
    assert 0.95 < rows[name]["compute_overhead"] < 1.1, (name, rows[name])
  # Data parallelism: every gradient is summed over the 8 devices once, the shared
  # embedding's (two lookups) and the position biases' (every layer) included
  # (`slic_jax.data_shards`; before, 8% more here), and a few scalars.
  dp = rows["8x1"]["collectives"]
  assert list(dp) == ["all-reduce"]
  assert param_bytes <= dp["all-reduce"]["mb"] * 1e6 < param_bytes + 4096
  # Model parallelism over 'model' = 2: the state is split (half the arguments) and no
  # activation or gradient is gathered whole (only scalars and vectors of Adafactor's
  # factored statistics). The flattening form of matmul.first_element gathered them.
  mp = rows["4x2"]
  assert mp["argument_mb"] < 0.6 * rows["8x1"]["argument_mb"]
  assert mp["collectives"].get("all-gather", {"mb": 0})["mb"] < 0.01 * param_bytes / 1e6
  assert mp["collective_mb"] < 2 * param_bytes / 1e6
  # 2 microbatches: the same matmuls (the loop's body counted per trip), and every
  # gradient all-reduced once per microbatch: twice the data-parallel traffic.
  mb, whole = rows["4x1 k=2"], rows["4x1"]
  assert mb["matmul_flops_per_device"] == pytest.approx(whole["matmul_flops_per_device"],
                                                        rel=0.02)
  ratio = mb["collectives"]["all-reduce"]["mb"] / whole["collectives"]["all-reduce"]["mb"]
  assert 1.9 < ratio < 2.1, ratio
  with pytest.raises(ValueError, match="do not split into num_microbatches=4"):
    mesh_step_cost.compile_step(None, None, {"x": np.zeros((8, 2))},
                                partitioning.Partitioner(devices=jax.devices()[:4]), 4)


def test_report_and_a_mesh_the_model_cannot_use(tiny_meshes, tmp_path):
  rows, _ = tiny_meshes
  res = {"command": "python tools/mesh_step_cost.py", "backend": "cpu", "device_kind": "cpu",
         "experiment": {"model": "slic_hf", "size": "tiny", "dtype": "float32", "batch": 8,
                        "li": 32, "lt": 8, "model_gflops": 1.0}, "meshes": rows}
  md = mesh_step_cost.to_markdown(res)
  line = next(l for l in md.splitlines() if l.startswith("| 8x1 |"))
  assert f"{rows['8x1']['collectives']['all-reduce']['count']} all-reduce" in line
  assert "| 1x1 | " in md and "| 4x2 | " in md and "Largest collectives, 4x2:" in md
  # 4 heads over a 'model' axis of 8: refused before anything compiles, the param named.
  with pytest.raises(SystemExit, match=r"mesh 1x8: param .*'heads', size 4"):
    mesh_step_cost.main(["--mesh", "1x8", "--li", "16", "--lt", "8", "--fake_cpu_devices", "0",
                         "--out", str(tmp_path / "r.json")])
  assert not (tmp_path / "r.json").exists()


def test_two_dimensional_parameter_partitioning_splits_the_state(tmp_path):
  """--parameter_partitioning_dims 2 (T5X's rules for T5-XXL: 'embed' over 'data' too):
  on 8×1 every device holds about an eighth of the state, and the weights are gathered
  where they are used (FSDP's pattern), which 1-D data parallelism never does."""
  import json
  out = tmp_path / "r.json"
  mesh_step_cost.main(["--mesh", "8x1", "--li", "16", "--lt", "8", "--fake_cpu_devices", "0",
                       "--parameter_partitioning_dims", "2", "--top", "3", "--out", str(out)])
  res = json.loads(out.read_text())
  one, dp = res["meshes"]["1x1"], res["meshes"]["8x1"]
  assert res["experiment"]["parameter_partitioning_dims"] == 2
  assert dp["argument_mb"] < 0.25 * one["argument_mb"]
  assert dp["collectives"]["all-gather"]["mb"] > 0.5 * one["argument_mb"] / 4  # weights
  assert 0.95 < dp["compute_overhead"] < 1.1


def test_topology_without_libtpu_names_the_setup_step(monkeypatch):
  import importlib.util
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  with pytest.raises(SystemExit, match="setup_tpu_compiler.sh"):
    mesh_step_cost.main(["--topology", "v5e:2x4"])


LIBTPU_DIR = os.environ.get("SLIC_JAX_LIBTPU", "/tmp/slic_jax_libtpu")


@pytest.mark.skipif(not os.path.isdir(os.path.join(LIBTPU_DIR, "libtpu")),
                    reason=f"libtpu (the TPU compiler) not in {LIBTPU_DIR}: "
                           "bash tools/setup_tpu_compiler.sh (not a project dependency)")
def test_the_step_compiled_for_a_tpu_slice(tmp_path):
  """`--topology v5e:2x4`: the tiny step compiled by libtpu for 8 TPU v5e chips on this
  host (no TPU). The TPU program takes the TPU's code paths (no `dot`: libtpu's matmuls
  are convolutions, counted by XLA), divides the work, gathers nothing on 4×2, and its
  data-parallel step all-reduces the gradients once (as XLA:CPU's,
  `test_the_mesh_divides_the_step_and_sends_gradients_once`). With 2 microbatches
  the loop's all-reduces move after the loop (the accumulation from zeros in
  `update_step.make_train_step`; the embedding's and the position biases' too, each one
  all-reduce of its table's gradient, `slic_jax.data_shards`): the whole-batch step's
  bytes, where XLA:CPU's program sends twice as much."""
  import json
  import subprocess
  env = {**os.environ, "PYTHONPATH": LIBTPU_DIR}
  env.pop("XLA_FLAGS", None)
  tool = os.path.join(benchmark.REPO, "tools", "mesh_step_cost.py")
  common = ["--topology", "v5e:2x4", "--size", "tiny", "--batch", "8", "--li", "32",
            "--lt", "8"]
  runs = {"whole": ["--mesh", "8x1", "--mesh", "4x2", "--mesh", "4x1"],
          "mb2": ["--mesh", "4x1", "--microbatches", "2"]}
  res = {}
  for name, flags in runs.items():
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, tool, *common, *flags, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res[name] = json.loads(out.read_text())
  whole = res["whole"]
  assert whole["backend"] == "tpu" and "TPU" in whole["device_kind"]
  one = whole["meshes"]["1x1"]
  assert one["flops_source"] == "xla" and not one["collectives"]
  assert 0.95 < one["matmul_flops_per_device"] / 1e9 / whole["experiment"]["model_gflops"] < 1.1
  params_mb = one["argument_mb"]  # the state (parameters, Adafactor's factored moments)
  dp = whole["meshes"]["8x1"]
  assert 0.95 < dp["compute_overhead"] < 1.15
  assert set(dp["collectives"]) == {"all-reduce"}
  assert dp["collectives"]["all-reduce"]["count"] <= 4  # combined: the gradients, the loss
  assert 0.9 * params_mb < dp["collective_mb"] < 1.02 * params_mb
  assert "all-gather" not in whole["meshes"]["4x2"]["collectives"]
  micro = res["mb2"]["meshes"]["4x1"]
  for flags, message in ((["--topology", "v9z:2x2"], "--topology 'v9z:2x2': "),
                         (["--topology", "v5e:2x2", "--mesh", "8x1"],
                          "mesh of 8 devices but v5e:2x2 has 4")):
    proc = subprocess.run([sys.executable, tool, *flags], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
  assert micro["collective_mb"] < 1.01 * whole["meshes"]["4x1"]["collective_mb"]
  assert micro["compute_overhead"] is None  # XLA's count takes the loop body once
