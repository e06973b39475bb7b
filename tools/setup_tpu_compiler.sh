#!/usr/bin/env bash
# Installs libtpu, the TPU compiler, for `tools/mesh_step_cost.py --topology`: the update
# step compiled ahead of time for the chips of a TPU slice on this host, without TPUs
# (jax.experimental.topologies).
#
# libtpu is NOT a dependency of slic_jax: it goes into its own folder outside the
# repository (default /tmp/slic_jax_libtpu; override with the first argument or
# $SLIC_JAX_LIBTPU), at the version that the installed jax's `jax[tpu]` extra pins,
# and is found through PYTHONPATH:
#
#   bash tools/setup_tpu_compiler.sh [DIR]
#   PYTHONPATH=DIR .venv/bin/python tools/mesh_step_cost.py --topology v5e:2x4 ...
#
# PYTHON (default .venv/bin/python of this checkout) is the interpreter whose jax decides
# the version.
set -euo pipefail

DIR="${1:-${SLIC_JAX_LIBTPU:-/tmp/slic_jax_libtpu}}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
case "$(cd "$(dirname "$DIR")" 2>/dev/null && pwd)/" in
  "$REPO_ROOT"/*) echo "refusing to install libtpu inside the repo: $DIR" >&2; exit 2;;
esac

PIN="$("$PYTHON" - <<'PY'
import importlib.metadata as md, re
reqs = [r for r in (md.requires("jax") or []) if r.startswith("libtpu") and "tpu" in r]
if not reqs:
  raise SystemExit("setup_tpu_compiler: this jax names no libtpu in its 'tpu' extra")
print(re.split(r"\s*;", reqs[0])[0].replace(" ", ""))
PY
)"
echo "[setup_tpu_compiler] installing $PIN into $DIR (jax $("$PYTHON" -c 'import jax; print(jax.__version__)'))"
"$PYTHON" -m pip install --quiet --no-deps --upgrade --target "$DIR" "$PIN"

# libtpu logs warnings about the missing TPU metadata to stderr: shown only on failure.
LOG="$(mktemp)"
if ! JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH="$DIR" \
    "$PYTHON" - 2>"$LOG" <<'PY'
from jax.experimental import topologies
devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
print(f"[setup_tpu_compiler] ok: {len(devices)} x {devices[0].device_kind} to compile for")
PY
then
  echo "setup_tpu_compiler: $PIN is in $DIR but a v5e:2x2 topology could not be made:" >&2
  tail -n 5 "$LOG" >&2
  rm -f "$LOG"
  exit 1
fi
rm -f "$LOG"
echo "$DIR"
