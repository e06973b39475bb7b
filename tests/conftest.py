"""Test-wide setup: 8 fake CPU devices for sharding tests, quiet TensorFlow.

XLA reads XLA_FLAGS once, when jax first initialises its backends, so this must run
before any test module imports jax.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
