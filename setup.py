"""slic_jax: SLiC-HF and TLCR preference training for T5 in JAX.

Pinned to a set of versions seen working together on Python 3.11 / CPU
(see ../shared/spec/INSTALL.md); TPU and GPU users swap jax[tpu] / jax[cuda] in.
"""
import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "gin-config==0.5.0",
    "sentencepiece==0.2.3",
    "clu==0.0.12",
    "tensorboard",
    "numpy>=2.0",
]

setuptools.setup(
    name="slic_jax",
    version="0.1.0",
    description="SLiC-HF and TLCR preference training for T5 encoder-decoders in JAX",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["slic_jax", "slic_jax.*", "tasks", "tasks.*"]),
    package_data={"slic_jax": ["assets/*", "csrc/*.cc", "csrc/*.h"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3"]},
)
