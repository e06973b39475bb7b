#!/usr/bin/env bash
# Creates the PyTorch/TRL peer's own virtual environment for tools/bench_peer_trl.py.
#
# The peer is NOT a dependency of slic_jax: it lives outside the repository
# (default /tmp/slic_jax_peer_env; override with the first argument or
# $SLIC_JAX_PEER_ENV) and is only used by tools/benchmark.py for a side-by-side
# comparison with Hugging Face TRL's CPOTrainer (loss_type="hinge" + cpo_alpha).
#
# Versions (shared/spec/INSTALL.md): torch==2.13.0 (CPU wheel found on disk by
# pip's configured find-links), trl==1.16.0, transformers==5.23.0.
#
# Usage: bash tools/setup_peer_env.sh [ENV_DIR]
set -euo pipefail

ENV_DIR="${1:-${SLIC_JAX_PEER_ENV:-/tmp/slic_jax_peer_env}}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "$(cd "$(dirname "$ENV_DIR")" 2>/dev/null && pwd)/" in
  "$REPO_ROOT"/*) echo "refusing to create the peer env inside the repo: $ENV_DIR" >&2; exit 2;;
esac

if [ ! -x "$ENV_DIR/bin/python" ]; then
  echo "[setup_peer_env] creating venv at $ENV_DIR with $PYTHON"
  "$PYTHON" -m venv "$ENV_DIR"
fi
"$ENV_DIR/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
echo "[setup_peer_env] installing torch==2.13.0 trl==1.16.0 transformers==5.23.0"
"$ENV_DIR/bin/python" -m pip install \
  "torch==2.13.0" "trl==1.16.0" "transformers==5.23.0" psutil numpy

"$ENV_DIR/bin/python" - <<'PY'
import torch, transformers, trl
from trl.experimental.cpo import CPOTrainer, CPOConfig  # noqa: F401
print(f"[setup_peer_env] ok: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
echo "$ENV_DIR"
