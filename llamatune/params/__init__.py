"""Exact parameter counts and first-principles memory estimates for Llama-family models.

Everything here is arithmetic on a Hugging Face ``config.json``-style dict, so this package
imports without torch; ``llamatune params`` and ``llamatune estimate`` answer in milliseconds
for architectures far too large for the machine they run on. One job a module:

* :mod:`~llamatune.params.architectures`: the built-in architectures and the sizes of a config;
* :mod:`~llamatune.params.resolve`: a name, model folder, ``config.json``, ``.gguf`` or recipe
  turned into a config;
* :mod:`~llamatune.params.counts`: exact parameter counts, LoRA adapters included;
* :mod:`~llamatune.params.activations`: what the autograd graph saves, tensor by tensor;
* :mod:`~llamatune.params.memory`: the training-step peak and 4-bit inference estimate;
* :mod:`~llamatune.params.commands`: the two commands and what they print.
"""

from llamatune.params.architectures import ARCHITECTURES, LINEAR_MODULES
from llamatune.params.commands import run_estimate, run_params
from llamatune.params.counts import ParamBreakdown, count_parameters, lora_parameters
from llamatune.params.memory import (
    GB,
    PUBLISHED_4BIT_INFERENCE_GB,
    MemoryEstimate,
    estimate_memory,
)
from llamatune.params.resolve import resolve_architecture

__all__ = [
    "ARCHITECTURES",
    "GB",
    "LINEAR_MODULES",
    "PUBLISHED_4BIT_INFERENCE_GB",
    "MemoryEstimate",
    "ParamBreakdown",
    "count_parameters",
    "estimate_memory",
    "lora_parameters",
    "resolve_architecture",
    "run_estimate",
    "run_params",
]
