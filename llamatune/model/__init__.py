"""The shared loader: one place that turns ``model.*`` and ``lora.*`` into a model.

Every model llamatune runs starts from :func:`load_base` (and its tokenizer from
:func:`load_tokenizer`), so quantization, dtype and device rules are the same everywhere.
The stages (SFT, reward model, DPO, PPO) and scoring build theirs piece by piece:
:func:`load_base`, then :func:`add_adapter` or :func:`add_policy`, :func:`add_head`, and
:func:`finish`; merge and generate (chat) load through :func:`load_model`, which does the
same in one call. Where ``model.path`` can point is :func:`resolve_model_path`'s business.

The dtype policy, the same on every machine:

* the **frozen base** runs in ``model.dtype``; ``auto`` is bfloat16 on GPUs with bf16 and on
  CPUs that compute bf16 natively (AVX512-BF16, AMX), float32 elsewhere (emulated bf16 is
  about 100x slower than fp32). ``LLAMATUNE_CPU_BF16=1|0`` forces either CPU path anywhere;
* **trainable parameters** (LoRA matrices, score and value heads, every weight in full
  fine-tuning) always have float32 master weights and float32 AdamW state, whatever the base
  runs in (:func:`fp32_trainable`, applied when the optimizer is built); full fine-tuning
  with ``auto`` therefore loads the base in float32;
* a 4-bit base computes in ``model.compute_dtype`` (``auto``: as ``model.dtype``).

Every stage prints the choice and the reason on its ``model:`` line (:func:`model_line`).

One job a module:

* :mod:`~llamatune.model.source`: ``model.path`` to a local folder (built-in names, GGUF
  files converted once and cached, local folders, the offline hub cache);
* :mod:`~llamatune.model.dtypes`: the device and the dtype policy above;
* :mod:`~llamatune.model.tokenizer`: the tokenizer and its pad token;
* :mod:`~llamatune.model.base`: :class:`Loaded` and :func:`load_base` (fp32, bf16, 8- or 4-bit);
* :mod:`~llamatune.model.adapters`: LoRA adapters (new, copied, a policy and its reference);
* :mod:`~llamatune.model.heads`: scalar heads (score, value), saved and loaded;
* :mod:`~llamatune.model.assemble`: :func:`finish`, :func:`load_model`, :func:`model_line`;
* :mod:`~llamatune.model.trainable`: what trains, written and read back (final save, checkpoints);
* :mod:`~llamatune.model.unwrap`: the model under peft (:func:`unwrap_model`), whole parameters.
"""

from llamatune._cache import cache_dir
from llamatune.model.adapters import (
    LLAMA_LINEAR,
    add_adapter,
    add_policy,
    lora_config,
    reference_text,
    save_adapter,
)
from llamatune.model.assemble import finish, load_model, model_line
from llamatune.model.base import Loaded, bnb_config, load_base
from llamatune.model.dtypes import (
    CPU_BF16_ENV,
    cpu_bf16_choice,
    cpu_has_fast_bf16,
    dtype_choice,
    dtype_name,
    dtype_summary,
    fp32_trainable,
    resolve_device,
    resolve_dtype,
    stored_dtype,
)
from llamatune.model.heads import add_head, load_head, save_head, scalar_head_class
from llamatune.model.source import BUILTIN_MODELS, resolve_model_path
from llamatune.model.tokenizer import load_tokenizer, set_pad_token
from llamatune.model.trainable import load_trainable, save_trainable
from llamatune.model.unwrap import unwrap_model

__all__ = [
    "BUILTIN_MODELS",
    "CPU_BF16_ENV",
    "LLAMA_LINEAR",
    "Loaded",
    "add_adapter",
    "add_head",
    "add_policy",
    "bnb_config",
    "cache_dir",
    "cpu_bf16_choice",
    "cpu_has_fast_bf16",
    "dtype_choice",
    "dtype_name",
    "dtype_summary",
    "finish",
    "fp32_trainable",
    "load_base",
    "load_head",
    "load_model",
    "load_tokenizer",
    "load_trainable",
    "lora_config",
    "model_line",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
    "reference_text",
    "save_adapter",
    "save_head",
    "save_trainable",
    "scalar_head_class",
    "set_pad_token",
    "stored_dtype",
    "unwrap_model",
]
