"""The project's XLA:CPU kernels (`slic_jax/csrc/*.cc`): built on first use, cached, registered.

Each source file is one shared library of `jax.ffi` custom calls. It is compiled on first
use with the C++ compiler in `$CXX` (default `g++`) for the host CPU (`-march=native`, or
`$SLIC_JAX_KERNEL_ARCH_FLAGS`) into `$SLIC_JAX_KERNEL_CACHE` (default
`~/.cache/slic_jax/kernels`), keyed by the source and the headers beside it, jaxlib's
version, the compiler, its flags and the CPU, and registered with XLA as CPU custom
calls. A build marks its use (mtime) each time it is loaded; each new build of a source
removes that source's builds unused for `UNUSED_DAYS` days (other source versions,
jaxlibs, compilers; unused builds of still-used environments come back on their next use)
and temporary files left by interrupted builds.

Users: `slic_jax.fused_softmax` (attention's softmax passes) and
`slic_jax.adafactor_kernels` (the Adafactor statistics).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jaxlib
from jax.sharding import NamedSharding

CSRC = Path(__file__).parent / "csrc"
_FLAGS = ("-O3", "-fPIC", "-shared", "-std=c++17")
UNUSED_DAYS = 30  # a new build removes its source's builds not loaded for this long


class KernelUnavailable(RuntimeError):
  """A kernel library cannot be built or loaded on this machine."""


def _cpu_signature() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags", "Features"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def _cache_dir() -> Path:
  return Path(os.environ.get("SLIC_JAX_KERNEL_CACHE",
                             Path.home() / ".cache" / "slic_jax" / "kernels"))


def _prefix(source: Path) -> str:
  return f"{source.stem}-"


def library_path(source: Path, feature: str) -> Path:
  """Builds `source`'s shared library if needed; returns its path.

  `feature` names what needs the kernels in the errors. Raises `KernelUnavailable`
  (naming the compiler or the source file and the compiler's message) when there is no
  compiler, the cache cannot be written or the build fails.
  """
  cxx = os.environ.get("CXX", "g++")
  compiler = shutil.which(cxx)
  if compiler is None:
    raise KernelUnavailable(
        f"{feature} compiles {source} on first use and needs a C++17 compiler: {cxx!r} "
        f"(from $CXX, default g++) is not on PATH")
  flags = _FLAGS + tuple(os.environ.get("SLIC_JAX_KERNEL_ARCH_FLAGS", "-march=native").split())
  key = hashlib.sha256()
  for part in (source.read_bytes(), *(h.read_bytes() for h in sorted(source.parent.glob("*.h"))),
               jaxlib.__version__.encode(), compiler.encode(), " ".join(flags).encode(),
               _cpu_signature().encode(), platform.machine().encode()):
    key.update(part)
  out = _cache_dir() / f"{_prefix(source)}{key.hexdigest()[:20]}.so"
  try:
    os.utime(out)  # marks the use; a build pruned meanwhile is rebuilt below
    return out
  except FileNotFoundError:
    pass
  except OSError:  # a read-only cache (shared): use it as it is
    if out.exists():
      return out
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  except OSError as e:
    raise KernelUnavailable(
        f"cannot write the kernel cache {out.parent} ({e}); set $SLIC_JAX_KERNEL_CACHE to a "
        f"writable directory") from e
  os.close(fd)
  cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise KernelUnavailable(
          f"building {source} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    os.replace(tmp, out)  # atomic: concurrent builders each leave a whole library
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  prune_cache(out.parent, keep=out, prefix=_prefix(source))
  return out


def prune_cache(directory: Path, keep: Path, prefix: str,
                unused_days: float = UNUSED_DAYS) -> list[Path]:
  """Removes the builds named `prefix`* in `directory` not used (loaded or built) for
  `unused_days` days, and temporary files of builds interrupted a day or more ago;
  never `keep`. Returns the removed paths. Files that vanish or cannot be removed
  meanwhile (another process, a read-only cache) are left alone."""
  now = time.time()
  removed = []
  for path in directory.iterdir():
    if path == keep or path.suffix != ".so":
      continue
    if path.name.startswith(prefix):
      age = unused_days * 86400.0
    elif path.name.startswith("tmp"):  # tempfile.mkstemp's names above
      age = 86400.0
    else:
      continue
    try:
      if now - path.stat().st_mtime > age:
        path.unlink()
        removed.append(path)
    except OSError:
      continue
  return removed


@functools.lru_cache(maxsize=None)
def register(source: Path, targets: tuple[str, ...], feature: str) -> Path:
  """Builds (once per machine) `source` and registers its custom calls `targets` for the
  CPU; idempotent per process."""
  path = library_path(source, feature)
  lib = ctypes.CDLL(str(path))
  for name in targets:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
  return path


def builds(register_fn) -> bool:
  """True if `register_fn()` (a module's `register`) builds and loads its kernels here."""
  try:
    register_fn()
  except KernelUnavailable:
    return False
  return True


def leading_mesh_axes(sharding) -> tuple:
  """The mesh axes of an operand's first two dimensions under a `NamedSharding` (None for a
  dimension not partitioned; (None, None) for any other sharding): what the kernels'
  partitioning rules keep or sum over."""
  if not isinstance(sharding, NamedSharding):
    return None, None
  spec = tuple(sharding.spec) + (None, None)
  return spec[0], spec[1]
