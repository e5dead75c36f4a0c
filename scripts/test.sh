#!/usr/bin/env bash
# Every test: unit tests, notebook execution under nbval (solutions included), the browser test.
set -euo pipefail
cd "$(dirname "$0")/.."

# The real-browser widget test drives Debian's Chromium; install it when we can (as root).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# Two pytest workers on two cores: one thread each, so they never oversubscribe the CPU.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -n 2 --dist loadfile -p no:cacheprovider tests notebooks --nbval-lax "$@"
