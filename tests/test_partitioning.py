"""Mesh, logical-axis shardings, and the sharded train step (slic_jax.partitioning + train)."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from jax.sharding import PartitionSpec as P

from slic_jax import adafactor_kernels
from slic_jax import fused_softmax
from slic_jax import models
from slic_jax import network
from slic_jax import optimizers
from slic_jax import partitioning
from slic_jax import train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))

CFG = network.make_config("tiny", vocab_size=256, emb_dim=128, num_heads=4, head_dim=32,
                          mlp_dim=256, num_encoder_layers=1, num_decoder_layers=1)
VOCAB = seqio.PassThroughVocabulary(size=256, eos_id=1)
B, LI, LT = 8, 16, 8


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tgt = rng.integers(2, 256, (B, 3, LT)).astype(np.int32)
  tgt[:, :, 6:] = 0
  return {
      "encoder_input_tokens": rng.integers(2, 256, (B, LI)).astype(np.int32),
      "decoder_input_tokens": np.concatenate([np.zeros((B, 3, 1), np.int32), tgt[..., :-1]], -1),
      "decoder_target_tokens": tgt,
      "decoder_loss_weights": (tgt > 0).astype(np.int32),
  }


def test_eight_fake_devices_are_available():
  assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before jax starts"


def test_mesh_shapes_and_validation():
  p = partitioning.Partitioner(num_partitions=2)
  assert dict(p.mesh.shape) == {"data": 4, "model": 2}
  assert partitioning.Partitioner(model_parallel_submesh=(1, 1, 1, 4)).mesh.shape["model"] == 4
  assert dict(partitioning.Partitioner(devices=jax.devices()[:1]).mesh.shape) == {"data": 1, "model": 1}
  with pytest.raises(ValueError, match="does not divide"):
    partitioning.Partitioner(num_partitions=3)
  with pytest.raises(ValueError, match="not both"):
    partitioning.Partitioner(num_partitions=2, model_parallel_submesh=(1, 1, 1, 2))


def test_standard_rules_follow_t5x():
  rules = dict(partitioning.standard_logical_axis_rules())
  assert rules["batch"] == "data" and rules["mlp"] == "model" and rules["vocab"] == "model"
  assert rules["heads"] == "model" and rules["joined_kv"] == "model" and rules["embed"] is None
  assert dict(partitioning.standard_logical_axis_rules(parameter_partitioning_dims=2))["embed"] == "data"


def _model(cfg=CFG, optimizer_implementation="fused"):
  return models.SlicHFModel(network.Transformer(cfg), VOCAB, VOCAB,
                            optimizers.create_optimizer(
                                learning_rate=1e-2, implementation=optimizer_implementation),
                            reg_weight=0.1)


def test_params_and_optimizer_state_shardings_from_logical_axes():
  p = partitioning.Partitioner(num_partitions=2)
  model = _model()
  shapes = {k: v.shape for k, v in _batch().items()}
  abstract = jax.eval_shape(lambda r: model.get_initial_variables(r, shapes), jax.random.PRNGKey(0))
  psh = p.params_shardings(abstract["params_axes"])
  mlp = psh["encoder"]["layers_0"]["mlp"]
  assert mlp["wi_0"]["kernel"].spec == P(None, "model")  # ('embed', 'mlp')
  assert mlp["wo"]["kernel"].spec == P("model", None)  # ('mlp', 'embed')
  assert psh["token_embedder"]["embedding"].spec == P("model", None)  # ('vocab', 'embed')
  assert psh["encoder"]["encoder_norm"]["scale"].spec == P(None)

  opt = jax.eval_shape(model.optimizer_def.init, abstract["params"])
  osh = p.optimizer_state_shardings(opt, abstract["params"], psh)
  # Adafactor's factored statistics drop one axis of the param; their specs follow.
  flat = {jax.tree_util.keystr(k): (v.shape, s.spec) for (k, v), s in zip(
      jax.tree_util.tree_flatten_with_path(opt)[0], jax.tree_util.tree_leaves(osh))}
  wi = [(shape, spec) for key, (shape, spec) in flat.items()
        if "'encoder']['layers_0']['mlp']['wi_0']" in key]
  assert ((128,), P(None)) in wi  # v_row: [embed]
  assert ((256,), P("model")) in wi  # v_col: [mlp]


def test_a_model_axis_that_does_not_divide_a_param_is_named():
  """4 heads over a 'model' axis of 8: a ValueError naming the parameter, its logical axis
  and the mesh axis, before anything is placed (jax's own error comes from deep inside the
  first device_put)."""
  model = _model()
  shapes = {k: v.shape for k, v in _batch().items()}
  with pytest.raises(ValueError, match=r"param \S*relpos_bias/rel_embedding \(4, 32\): "
                     r"dimension 0 \('heads', size 4\) is split over mesh axis 'model' of "
                     r"size 8"):
    partitioning.Partitioner(num_partitions=8).train_state_shardings(
        model, model.optimizer_def, shapes)
  abstract, shardings = partitioning.Partitioner(num_partitions=4).train_state_shardings(
      model, model.optimizer_def, shapes)
  wi = abstract.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert wi.shape == (128, 256) and wi.sharding.spec == P(None, "model")
  assert shardings.step.spec == P()


def _run_step(partitioner, batch, num_microbatches=None, cfg=CFG, hlo=None,
              per_device_accumulation=False, optimizer_implementation="fused"):
  """One train step; appends the compiled step's HLO text to `hlo` if given."""
  model = _model(cfg, optimizer_implementation)
  tx = model.optimizer_def
  shapes = {k: v.shape for k, v in batch.items()}
  _, state_sh = partitioner.train_state_shardings(model, tx, shapes)

  def init(rng):
    params = model.get_initial_variables(rng, shapes)["params"]
    return train.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))

  batch_sh = {k: partitioner.batch_sharding(v.ndim) for k, v in batch.items()}
  with partitioner.activation_rules():
    state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(0))
    step = jax.jit(train.make_train_step(model, tx, dropout_seed=1,
                                         num_microbatches=num_microbatches,
                                         per_device_accumulation=per_device_accumulation),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=(0,))
    sharded = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
    compiled = step.lower(state, sharded).compile()
    if hlo is not None:
      hlo.append(compiled.as_text())
    state, metrics = compiled(state, sharded)
  return state, {k: float(v.compute()) for k, v in metrics.items()}


def test_one_device_and_4x2_mesh_give_the_same_step():
  batch = _batch()
  one_state, one_metrics = _run_step(partitioning.Partitioner(devices=jax.devices()[:1]), batch)
  mesh_state, mesh_metrics = _run_step(partitioning.Partitioner(num_partitions=2), batch)
  wi = mesh_state.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert wi.sharding.spec == P(None, "model") and len(wi.sharding.device_set) == 8
  np.testing.assert_allclose(one_metrics["loss"], mesh_metrics["loss"], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(mesh_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  # The step really changed the params (the comparison above is not vacuous).
  assert one_metrics["grad_norm"] > 0


@pytest.mark.parametrize("num_partitions,remat", [(1, "none"), (1, "full"), (2, "none")])
def test_the_embedding_and_position_bias_tables_are_all_reduced_once(num_partitions, remat):
  """The token embedding (read by the encoder's and the decoder's lookups) and each
  stack's relative position bias (added in every layer) cross the 'data' axis once each,
  as their tables' gradients, [V, E] and [H, 32] (`slic_jax.data_shards`): not once per
  lookup, nor as an [H, L, L] bias gradient per layer. The step is the one-device step;
  remat 'full' ties the bias's gradient in each layer's backward (`add_position_bias`)."""
  import dataclasses
  import mesh_step_cost
  cfg = dataclasses.replace(CFG, vocab_size=320, remat_policy=remat)
  batch = _batch(5)
  one_state, one_metrics = _run_step(partitioning.Partitioner(devices=jax.devices()[:1]), batch,
                                     cfg=cfg)
  hlo = []
  mesh_state, mesh_metrics = _run_step(partitioning.Partitioner(num_partitions=num_partitions),
                                       batch, cfg=cfg, hlo=hlo)
  np.testing.assert_allclose(one_metrics["loss"], mesh_metrics["loss"], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(mesh_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  results = [line.split(" all-reduce(")[0] for line in hlo[0].splitlines()
             if " all-reduce(" in line]
  m = num_partitions  # 'vocab' and 'heads' are split over 'model'
  for bias in (f"[{4 // m},{LI},{LI}]", f"[{4 // m},{LT},{LT}]"):
    assert not any(bias in r for r in results), (bias, results)
  if m == 1:  # all-reduces over 'data' only: every float32 gradient once, and scalars
    param_bytes = sum(x.size * 4 for x in jax.tree.leaves(one_state.params))
    sent = sum(c["bytes"] for c in mesh_step_cost.collectives(hlo[0]))
    assert param_bytes <= sent < param_bytes + 2048, (sent, param_bytes)
  else:  # the embedding's [V/2, E] once (the logits kernel's gradient is [E, V/2])
    assert sum(r.count(f"f32[{320 // m},128]") for r in results) == 1, results


def test_microbatches_on_the_mesh_give_the_whole_batch_step():
  """2 microbatches (accumulated gradients) on the (4, 2) mesh = one whole-batch step."""
  batch = _batch(1)
  one_state, one_metrics = _run_step(partitioning.Partitioner(devices=jax.devices()[:1]), batch)
  mb_state, mb_metrics = _run_step(partitioning.Partitioner(num_partitions=2), batch,
                                   num_microbatches=2)
  np.testing.assert_allclose(one_metrics["loss"], mb_metrics["loss"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(one_metrics["grad_norm"], mb_metrics["grad_norm"], rtol=1e-4)
  assert mb_metrics["num_examples"] == one_metrics["num_examples"] == B
  for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(mb_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="microbatches"):
    _run_step(partitioning.Partitioner(devices=jax.devices()[:1]), batch, num_microbatches=3)
  # The trainer's check: each of the 4 data shards' 2 rows splits into 2, not into 4.
  train.check_microbatches(B, 2, 4)
  with pytest.raises(ValueError, match=r"gives 2 rows per device, which do not split into "
                     r"num_microbatches=4 whole microbatches: the batch size must be a "
                     r"multiple of 16"):
    train.check_microbatches(B, 4, 4)
  with pytest.raises(ValueError, match="num_microbatches must be >= 1"):
    train.check_microbatches(B, -1, 1)


@pytest.mark.parametrize("num_partitions", [1, 2])
def test_per_device_accumulation_gives_the_whole_batch_step(num_partitions):
  """2 microbatches accumulated per device (one all-reduce of the gradients, not one per
  microbatch) on 4×1 and 4×2 meshes = one whole-batch step on one device: every
  device's share of every microbatch holds the same number of pairs here."""
  batch = _batch(4)
  one_state, one_metrics = _run_step(partitioning.Partitioner(devices=jax.devices()[:1]), batch)
  hlo = []
  mesh = partitioning.Partitioner(num_partitions=num_partitions,
                                  devices=jax.devices()[:4 * num_partitions])
  mesh_state, mesh_metrics = _run_step(mesh, batch, num_microbatches=2, hlo=hlo,
                                       per_device_accumulation=True)
  for name in ("loss", "grad_norm", "pair_accuracy", "num_examples"):
    np.testing.assert_allclose(one_metrics[name], mesh_metrics[name], rtol=1e-4, err_msg=name)
  for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(mesh_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # The gradients cross the 'data' axis once: nothing all-reduced inside the loop's body
  # over 'data' (on 4×2 the activations' all-reduces over 'model' stay in it).
  import mesh_step_cost
  items = mesh_step_cost.collectives(hlo[0])
  looped = [c for c in items if c["times"] > 1 or "while/body" in c["source"]]
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(one_state.params))
  assert sum(c["bytes"] for c in items if "psum" in c["source"]) >= param_bytes / num_partitions
  if num_partitions == 1:
    assert not looped, looped[:3]
    assert sum(c["bytes"] for c in items) < 1.1 * param_bytes


def test_bfloat16_step_on_the_mesh_matches_one_device():
  """bf16 matmuls (slic_jax.matmul, with its CPU layout transposes) under the (4, 2) mesh."""
  import dataclasses
  cfg = dataclasses.replace(CFG, dtype="bfloat16", logits_dtype="bfloat16")
  batch = _batch(2)
  one_state, one_metrics = _run_step(partitioning.Partitioner(devices=jax.devices()[:1]), batch,
                                     cfg=cfg)
  mesh_state, mesh_metrics = _run_step(partitioning.Partitioner(num_partitions=2), batch, cfg=cfg)
  f32_state, f32_metrics = _run_step(partitioning.Partitioner(devices=jax.devices()[:1]), batch)
  np.testing.assert_allclose(one_metrics["loss"], mesh_metrics["loss"], rtol=1e-3)
  np.testing.assert_allclose(one_metrics["loss"], f32_metrics["loss"], rtol=2e-2)
  np.testing.assert_allclose(one_metrics["grad_norm"], mesh_metrics["grad_norm"], rtol=1e-2)
  # Adafactor's first step moves each parameter by about ±lr (the sign of its gradient);
  # bf16 sums taken in a different order on the mesh can flip the sign of a gradient
  # element that is ~0, so a few parameters may differ by 2·lr. Everything else matches.
  diff = total = 0
  for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(mesh_state.params)):
    assert a.dtype == b.dtype == jnp.float32
    diff += int(np.sum(~np.isclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-3)))
    total += a.size
  assert diff <= 0.01 * total, (diff, total)


@pytest.mark.skipif(not fused_softmax.available(), reason="the fused softmax kernels need a "
                    "C++17 compiler ($CXX, default g++)")
def test_fused_softmax_step_on_the_mesh_runs_the_kernels_per_shard():
  """attention_implementation='fused_softmax' under the (4, 2) mesh: the encoder's kernels
  run on each device's [B/4, H/2, Li, Li] shard, and the step is the one device's."""
  import dataclasses
  cfg = dataclasses.replace(CFG, attention_implementation="fused_softmax")
  batch = _batch(3)
  batch["encoder_input_tokens"][2, 11:] = 0  # padding: the kernels mask keys and queries
  one_state, one_metrics = _run_step(partitioning.Partitioner(devices=jax.devices()[:1]), batch,
                                     cfg=cfg)
  hlo = []
  mesh_state, mesh_metrics = _run_step(partitioning.Partitioner(num_partitions=2), batch,
                                       cfg=cfg, hlo=hlo)
  heads_per_device = CFG.num_heads // 2
  for target in (fused_softmax.FORWARD_TARGETS["float32"],
                 fused_softmax.BACKWARD_TARGETS["float32"]):
    calls = [l for l in hlo[0].splitlines() if f'custom_call_target="{target}"' in l]
    assert len(calls) == CFG.num_encoder_layers, target
    assert all(f"f32[{B // 4},{heads_per_device},{LI},{LI}]" in l for l in calls), calls
  np.testing.assert_allclose(one_metrics["loss"], mesh_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(one_metrics["grad_norm"], mesh_metrics["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(mesh_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  assert one_metrics["grad_norm"] > 0


@pytest.mark.skipif(not adafactor_kernels.available(), reason="the Adafactor kernels need a "
                    "C++17 compiler ($CXX, default g++)")
def test_cpu_kernels_optimizer_on_the_mesh_reduces_each_block():
  """create_optimizer(implementation='cpu_kernels') under the (4, 2) mesh: the kernels
  run on each device's block of a partitioned gradient ([D, F/2] for wi, [F/2, D] for
  wo), and the step is the one device's with the XLA reductions ('fused')."""
  batch = _batch(4)
  one_state, one_metrics = _run_step(partitioning.Partitioner(devices=jax.devices()[:1]), batch)
  hlo = []
  mesh_state, mesh_metrics = _run_step(partitioning.Partitioner(num_partitions=2), batch,
                                       hlo=hlo, optimizer_implementation="cpu_kernels")
  calls = [l for l in hlo[0].splitlines()
           if f'custom_call_target="{adafactor_kernels.SQUARE_SUMS}"' in l]
  assert any(f"f32[{CFG.emb_dim},{CFG.mlp_dim // 2}]" in l for l in calls), calls
  assert any(f"f32[{CFG.mlp_dim // 2},{CFG.emb_dim}]" in l for l in calls), calls
  np.testing.assert_allclose(one_metrics["loss"], mesh_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(one_metrics["grad_norm"], mesh_metrics["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(mesh_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(one_state.opt_state), jax.tree.leaves(mesh_state.opt_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-12)
  assert one_metrics["grad_norm"] > 0


@pytest.mark.skipif(not fused_softmax.available(), reason="the fused softmax kernels need a "
                    "C++17 compiler ($CXX, default g++)")
def test_per_device_accumulation_with_the_kernels():
  """The CPU softmax kernels under per_device_accumulation: on a 4×1 mesh (manual over
  both axes) the step is the one device's; with a 'model' axis of 2 left to the
  partitioner their partitioning rule cannot run, and the error says so."""
  import dataclasses
  cfg = dataclasses.replace(CFG, attention_implementation="fused_softmax")
  batch = _batch(5)
  one_state, one_metrics = _run_step(partitioning.Partitioner(devices=jax.devices()[:1]), batch,
                                     cfg=cfg)
  mesh_state, mesh_metrics = _run_step(partitioning.Partitioner(devices=jax.devices()[:4]),
                                       batch, cfg=cfg, num_microbatches=2,
                                       per_device_accumulation=True)
  np.testing.assert_allclose(one_metrics["loss"], mesh_metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(mesh_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match=r"fused_softmax' inside a shard_map manual over "
                     r"\['data'\] with mesh axes \['model'\] left to the partitioner"):
    _run_step(partitioning.Partitioner(num_partitions=2), batch, cfg=cfg, num_microbatches=2,
              per_device_accumulation=True)
