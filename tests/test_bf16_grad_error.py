"""tools/bf16_grad_error.py: bf16 gradients against float32's, relative errors."""
import importlib.util
import os

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                     "bf16_grad_error.py")
_spec = importlib.util.spec_from_file_location("slic_jax_tools_bf16_grad_error", _TOOL)
bf16_grad_error = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bf16_grad_error)


def test_relative_errors_are_bf16_sized():
  errs = bf16_grad_error.relative_errors('tiny', li=16, lt=8, batch=2, vocab=64)
  assert set(errs) == {"['encoder']['relpos_bias']['rel_embedding']",
                       "['decoder']['relpos_bias']['rel_embedding']", 'all parameters'}
  # Rounding to bf16 (8 significant bits) leaves errors of a few 2^-9 relative: not 0 (the
  # bf16 model does round), far below 1 (it computes the same function).
  for name, err in errs.items():
    assert 1e-4 < err < 0.1, (name, err)
