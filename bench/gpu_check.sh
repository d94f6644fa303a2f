#!/usr/bin/env bash
# The one-GPU check (bench/gpu_check.py): LoRA SFT of a random Llama-2-7B-shaped model in bf16
# at batch 2 x 2048 against HF Trainer + PEFT, peak memory against `llamatune estimate`, QLoRA
# when bitsandbytes imports, and a one-process FSDP launch. Needs only torch, transformers,
# peft and accelerate (no network, no install of llamatune: it runs from this checkout).
# A trimmed bitsandbytes copy, if one travels with the tree, goes on PYTHONPATH from
# .gpu_extra/ (see bench/README.md). Results: $OUT/gpu_check.json (or bench/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -d .gpu_extra ] && export PYTHONPATH="$PWD/.gpu_extra:$PYTHONPATH"
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the GPU image may have no `python`
"$PY" - <<'PY' || exit 1
import importlib.util as u
missing = [m for m in ("torch", "transformers", "peft", "accelerate", "yaml", "safetensors",
                       "tokenizers") if u.find_spec(m) is None]
assert not missing, f"missing: {missing}"
import torch
assert torch.cuda.is_available(), "no GPU visible"
print("gpu:", torch.cuda.get_device_name(), torch.__version__)
PY
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>/dev/null || true
exec timeout 560 "$PY" bench/gpu_check.py "$@"
