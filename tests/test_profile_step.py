"""tools/profile_step.py: matmul FLOPs read back from optimized HLO, and the grouping."""
import importlib.util
import os
import re
import sys

import jax
import jax.numpy as jnp

_TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, _TOOLS)
_spec = importlib.util.spec_from_file_location("slic_jax_tools_profile_step",
                                               os.path.join(_TOOLS, "profile_step.py"))
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)


def test_dot_flops_from_optimized_hlo():
  f = lambda a, b, c: (jnp.tanh(a @ b), jnp.einsum("bqd,bkd->bqk", c, c))
  a, b, c = jnp.ones((8, 16)), jnp.ones((16, 4)), jnp.ones((3, 5, 7))
  text = jax.jit(f).lower(a, b, c).compile().as_text()
  comps, insts, shapes = profile_step.parse_hlo(text)
  entry = re.search(r"ENTRY %(\S+)", text).group(1)  # the ops a trace shows
  total = sum(profile_step.op_flops(name, comps, insts, shapes)
              for name, (comp, _) in insts.items() if comp == entry)
  assert total == 2 * 8 * 16 * 4 + 2 * 3 * 5 * 5 * 7


def test_grouping_folds_layers_and_splits_parts():
  src = "jit(train_step)/transpose(jvp(Transformer.encode))/encoder/layers_3/mlp/wo/dot_general"
  assert profile_step.fold(src) == "transpose(jvp(Transformer.encode))/encoder/L/mlp/wo/dot_general"
  assert profile_step.coarse(src) == "encoder backward MLP"
  assert profile_step.coarse("jit(train_step)/jvp(Transformer.decode)/decoder/layers_0/"
                             "encoder_decoder_attention/bqhd,bkhd->bhqk/dot_general") == (
                                 "decoder forward attention core")
  assert profile_step.coarse("jit(train_step)/jvp(_target_log_softmax)/reduce_max") == (
      "logits / loss / embeddings")
  assert profile_step.coarse("(no source: optimizer / runtime)") == "optimizer / other"
