#!/usr/bin/env bash
# Set everything up from python3 alone, then run the test suite. Extra arguments go to pytest.
# Two pytest-xdist workers (LADIC_TEST_WORKERS; 0 runs in this process), one test module per worker at a
# time (--dist loadscope), so a module's expensive fixtures (a trained model, a built dataset) are made once.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
exec python -m pytest -n "${LADIC_TEST_WORKERS:-2}" --dist loadscope tests "$@"
