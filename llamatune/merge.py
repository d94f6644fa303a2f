"""Merge a run's LoRA adapter into standalone weights, and prove the merge right.

``llamatune merge RUN_DIR --out DIR`` writes a folder that plain ``transformers`` loads
with ``AutoModelForCausalLM.from_pretrained(DIR)`` (no peft, no llamatune): merged
weights as ``model.safetensors``, a ``config.json`` without any quantization entry, the
run's tokenizer and chat template, and a ``generation_config.json`` whose
``eos_token_id`` lists the template's stop tokens.

Which weights the adapter is added to (``--base``):

* runs on a full-precision base: the original weights (``auto`` and ``original``);
* runs on a 4-bit or 8-bit base (QLoRA): by default (``auto`` = ``dequantized``) the
  *dequantized* quantized weights, which are the weights the adapter was trained
  against. ``original`` adds the adapter to the full-precision original instead; that
  model is usually close, but it is not the model that was trained.

The merge itself is peft's ``merge_and_unload`` on a float32, non-quantized copy of the
base (``W + scale * B @ A`` in float32), whatever the training precision. The result is
saved in the dtype the base checkpoint stores its weights in (a float32 base stays float32,
even when training ran the frozen base in bf16), or in ``--dtype``.

Verification (on by default) loads the saved folder back and compares it, on held-out
samples of the run's own data, with base + adapter (the 4-bit base for QLoRA runs), both
computing in float32 at least, whatever precision the run trained in: it checks the merge,
not the training precision. It prints the largest absolute logit difference and both
perplexities over supervised tokens, and fails, leaving nothing at ``--out``, when:

* full-precision base, float32 on both sides: any logit differs by more than ``1e-4``.
  Both models are evaluated in float64 for this (the saved float32 weights upcast
  exactly), because in float32 the evaluation order alone moves the default model's
  logits by about that much (measured: 1.08e-4 after the shipped 30-step Alpaca recipe),
  which would fail correct merges. In float64 what is left is the float32 rounding of
  the merged weights (2.0e-5 on the same run), so anything near ``1e-4`` is a real error;
* quantized base merged into its dequantized weights: the perplexities differ by more
  than 0.5% (relative) for 4-bit, 3% for 8-bit. The unmerged 4-bit model multiplies by
  the same dequantized weights, but on the fly and in a different order, so logits agree
  closely without being bit-exact (about 1e-4 on the default model); the logit
  difference is printed, not judged. 8-bit (LLM.int8) also rounds the *activations* to
  int8 (via float16) at run time, which the merged model rightly does not: on the
  default model that alone moved perplexity by 1.4% (the merged model being the better
  one) and logits by up to 4, hence the wider bound;
* saved below float32 (``--dtype``, or a bf16/fp16 base checkpoint): rounding every weight
  to the lower precision moves logits by far more than ``1e-4``, so the check becomes a
  perplexity one with room for that rounding: +1% for float16, +2% for bfloat16 (added to
  the bound of a quantized base);
* ``--base original`` on a quantized run: never fails, only prints the numbers and warns
  about the perplexity gap. The adapter was trained against the dequantized weights, so
  a gap there measures quantization error, not a broken merge.

The folder is written under a temporary name next to ``--out`` and renamed only when
complete and verified, so a failure (or Ctrl-C) never leaves a folder that looks usable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from llamatune._atomic import writing
from llamatune._merge_check import (
    Check,
    Verification,
    check_plain,
    compare_models,
    drop_lora_dropout,
    evaluation_setup,
    pinned_float32,
    plain_reference,
)
from llamatune.errors import UserError

__all__ = [
    "Check",
    "MergeVerificationError",
    "Verification",
    "build_merged_model",
    "chat_template_problem",
    "choose_check",
    "compare_models",
    "dequantize_weight",
    "held_out_samples",
    "run_merge",
    "write_model_folder",
]

BASES = ("auto", "dequantized", "original")
DTYPES = ("float32", "bfloat16", "float16")

# Max logit difference (evaluated in float64) of a float32 merge into a full-precision base.
EXACT_LOGIT_TOL = 1e-4
# Relative perplexity gap allowed for a quantized base merged into its dequantized weights.
QUANTIZED_PPL_TOL = {"4bit": 0.005, "8bit": 0.03}
# Extra relative perplexity gap allowed when either side runs below float32.
DTYPE_PPL_SLACK = {"float32": 0.0, "float16": 0.01, "bfloat16": 0.02}


class MergeVerificationError(UserError):
    """The merged model does not reproduce base + adapter within tolerance."""


def choose_check(quantization: str, base: str, reference_dtype: str, out_dtype: str) -> Check:
    """The verification rule for a merge (see the module docstring for the reasoning).

    Args:
        quantization: The run's ``model.quantization`` (``none``, ``8bit``, ``4bit``).
        base: ``dequantized`` or ``original`` (``auto`` already resolved).
        reference_dtype: Precision base + adapter computes in (``model.dtype``, or
            ``model.compute_dtype`` of a quantized base when lower).
        out_dtype: Precision the merged model is saved and checked in.

    Returns:
        The :class:`Check` to apply.
    """
    if quantization != "none" and base == "original":
        return Check("report", 0.0, f"{quantization} run merged into the full-precision "
                     "original, which the adapter was not trained against")
    low = [d for d in (reference_dtype, out_dtype) if d != "float32"]
    slack = max((DTYPE_PPL_SLACK[d] for d in low), default=0.0)
    if quantization != "none":
        why = f"{quantization} base merged into its dequantized weights"
        if low:
            why += f", {' and '.join(sorted(set(low)))} rounding"
        return Check("perplexity", QUANTIZED_PPL_TOL[quantization] + slack, why)
    if low:
        return Check("perplexity", slack, f"{' and '.join(sorted(set(low)))} rounding")
    return Check("logits", EXACT_LOGIT_TOL, "float32 merge into a full-precision base")


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


MERGEABLE = ("sft", "dpo", "ppo")
"""Stages whose runs hold a causal-LM adapter that applies to the base alone."""


def _open_run(run_dir):
    from llamatune.rundir import Run

    p = Path(run_dir).expanduser()
    if (p / "config.yaml").is_file() and (p / "model.safetensors").is_file() \
            and not (p / "adapter_config.json").is_file():
        raise UserError(f"{run_dir} holds a full fine-tune (model.safetensors, no adapter): it is "
                        "already standalone weights, so there is nothing to merge.")
    run = Run.open(run_dir, stages=MERGEABLE, use="merge (it writes causal language models)")
    try:
        json.loads((run.path / "adapter_config.json").read_text()).get("task_type")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{run.path}/adapter_config.json is not a peft adapter config (not a "
                        "JSON object); the run's final save may have been interrupted.") from None
    return run


def _check_out(out) -> Path:
    path = Path(out).expanduser()
    if path.exists() or path.is_symlink():
        raise UserError(f"--out {out} already exists; merge never writes into an existing path. "
                        "Choose a new folder, or remove this one first.")
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} cannot be created: {probe} is not a writable folder.")
    return path


def _resolve_base(base: str, quantization: str) -> str:
    if base not in BASES:
        raise UserError(f"--base {base!r} is not one of {', '.join(BASES)}.")
    if quantization == "none":
        if base == "dequantized":
            print("note: the run's base was not quantized, so --base dequantized is the "
                  "original weights", flush=True)
        return "original"
    return "dequantized" if base == "auto" else base


@dataclass
class Reference:
    """Base + adapter for verification, and how it was built (printed and recorded)."""

    model: object
    device: str
    how: str


def _load_reference(cfg, run: Path, folder: str) -> Reference:
    """Base + adapter, computing in float32 (float64 for the exact check), LoRA dropout off.

    Verification checks the merge, not the training precision, whatever the run trained in.
    A full-precision base is loaded exactly as the merged model's base is (plain
    ``transformers``, then peft's LoRA layers): not through llamatune's loader, so neither its
    dtype policy nor its kernels can make the two sides differ. A quantized base needs the
    loader (bitsandbytes); its 4-bit layers take bitsandbytes' standard path (the packed CPU
    inference kernel computes in bf16).
    """
    if cfg.model.quantization == "none":
        model = plain_reference(folder, run, model_cfg=cfg.model,
                                attn_implementation=cfg.model.attn_implementation)
        return Reference(model, "cpu", "plain transformers base from its float32 weights + "
                         "peft LoRA layers (unmerged, dropout off)")
    from llamatune.model import load_model

    mcfg = dataclasses.replace(cfg.model, gradient_checkpointing=False, tokenizer=str(run),
                               adapter=None, dtype="float32", compute_dtype="float32")
    loaded = load_model(mcfg, None, adapter=str(run), trainable=False, cpu_4bit_packing=False)
    drop_lora_dropout(loaded.model)
    loaded.model.eval()
    return Reference(loaded.model, loaded.device, f"{cfg.model.quantization} base through "
                     f"llamatune's loader ({loaded.kernels or 'bitsandbytes'}) + peft LoRA "
                     "layers (unmerged, dropout off)")


def dequantize_weight(module):
    """The float32 weight a bitsandbytes layer multiplies by.

    Args:
        module: A ``bitsandbytes.nn.Linear4bit`` or ``Linear8bitLt``.

    Returns:
        A float32 tensor ``[out_features, in_features]`` on the module's device.

    Raises:
        TypeError: Not a bitsandbytes linear layer.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    w = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        # The row scales live on the parameter until the first forward moves them to the state.
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return bnbf.int8_vectorwise_dequant(w.data, scb).float()
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes linear layer")


def _quantized_layers(model) -> list[tuple[str, object]]:
    """``(name in the plain model, bnb layer)`` for every quantized linear layer."""
    import bitsandbytes as bnb

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            # peft wraps a quantized layer and keeps it as `.base_layer`.
            out.append((name.replace(".base_layer", ""), mod))
    return out


def build_merged_model(cfg, run: Path, folder: str, base: str, reference=None):
    """A plain float32 model on the CPU with the run's adapter merged in.

    Args:
        cfg: The run's config.
        run: The run directory (its adapter is loaded from there).
        folder: The resolved base-model folder.
        base: ``original`` or ``dequantized``.
        reference: The quantized base + adapter (a :class:`Reference`, needed
            for ``dequantized``): its quantized layers supply the dequantized weights, so they
            are bit for bit those training used.

    Returns:
        A ``transformers`` model without LoRA layers.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llamatune.model import unwrap_model

    # The full-precision original: every weight the quantizer does not touch (embeddings,
    # norms, the head) comes from here, and all of it for --base original.
    plain = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation)
    if base == "dequantized":
        layers = _quantized_layers(unwrap_model(reference.model))
        if not layers:
            raise RuntimeError("a quantized run's base loaded without quantized layers")
        with torch.no_grad():
            for name, mod in layers:
                target = plain.get_submodule(name).weight
                target.copy_(dequantize_weight(mod).to(target.device).reshape(target.shape))
    # peft on a float32 nn.Linear base: W + scale * B @ A in float32, DoRA/rsLoRA included.
    model = PeftModel.from_pretrained(plain, str(run), is_trainable=False)
    try:
        return model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # safe_merge found NaN/inf in a merged weight
        raise UserError(f"the adapter in {run} is broken: {e}. Retrain it; a lower train.lr "
                        "usually helps.") from None


def write_model_folder(folder: Path, model, tokenizer, template: str, dtype) -> None:
    """Save a merged model so plain ``transformers`` loads it and chats in the run's template.

    Args:
        folder: Where to write (created).
        model: The merged ``transformers`` model.
        tokenizer: The run's tokenizer (pad token and chat template set).
        template: The run's template name; its stop tokens become ``eos_token_id``.
        dtype: The torch dtype to save in.
    """
    from transformers import GenerationConfig

    from llamatune.data.templates import stop_token_ids

    model.to(dtype)
    config = model.config
    # A loader that sees quantization_config re-quantizes (or demands bitsandbytes).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    config.use_cache = True
    gen = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(config)
    gen.eos_token_id = stop_token_ids(tokenizer, template)
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    model.generation_config = gen
    folder.mkdir(parents=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def chat_template_problem(tokenizer, template: str, system: str | None) -> str | None:
    """Check that ``apply_chat_template`` renders the prompt training rendered.

    Returns:
        ``None`` when it does, else a sentence saying how the two differ.
    """
    from llamatune.data.templates import render

    probe = [{"role": "user", "content": "Hello"}]
    want = render(tokenizer, template, probe, system=system, add_generation_prompt=True).text
    try:
        got = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - any template failure is the finding
        return f"the run's chat template fails to render ({e})"
    if got == want:
        return None
    return (f"the run's chat template renders {got!r} for a one-line user turn, but training "
            f"rendered {want!r}")


def held_out_samples(cfg, tokenizer, n: int, stage: str = "sft") -> tuple[list[dict], str]:
    """Up to ``n`` tokenized samples of the run's own data, held out where the run held any out.

    Works for every mergeable stage: SFT conversations, a DPO run's preference pairs (their
    chosen side), a PPO run's prompts.

    Returns:
        ``(samples, source)``; ``source`` says where they came from.

    Raises:
        UserError: The run's data cannot be read from here.
    """
    from llamatune.data import verification_samples
    from llamatune.recipes import STAGE_DATA

    try:
        return verification_samples(cfg, tokenizer, STAGE_DATA[stage], n)
    except UserError as e:
        raise UserError(
            f"verification needs the run's data (data.path {cfg.data.path}), which failed to "
            f"load: {e} Restore the file, or skip the check with --no-verify."
        ) from None


def _verify(folder: Path, reference: Reference, cfg, check: Check, data) -> Verification:
    """Load the saved folder with plain transformers and compare it with base + adapter.

    Both sides run in the same dtype, as plain library modules in eval mode (checked), on the
    same samples, one at a time, in this process's thread setting; the result says so.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from llamatune.model import dtype_name

    samples, source = data
    # Saved bf16/fp16 weights upcast exactly, so the comparison runs in float32 at least.
    dtype = torch.float32
    if check.kind == "logits":
        # float32 evaluation noise is as large as the bound; float64 leaves only the merge.
        dtype = torch.float64
    if cfg.model.quantization == "none":
        reference.model.to(dtype)  # exact: float32 weights upcast
    merged = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    merged.eval()
    check_plain(merged, dtype, "the merged model")
    check_plain(reference.model, dtype, "base + adapter")
    setup = evaluation_setup(merged, reference.model, reference.how, samples)
    diff, ppl_m, ppl_r, tokens, worst = compare_models(merged, reference.model, samples,
                                                       reference.device)
    setup["worst"] = list(worst)
    return Verification(check, dtype_name(dtype), len(samples), source, tokens, diff, ppl_m,
                        ppl_r, setup)


def _saved_dtype(folder: str, dtype: str | None) -> tuple[str, str]:
    """The precision to save in and why: ``--dtype``, else the base checkpoint's own."""
    if dtype is not None:
        return dtype, "--dtype"
    from llamatune.model import stored_dtype

    stored = stored_dtype(folder)
    if stored not in DTYPES:
        return "float32", f"the base checkpoint stores {stored}"
    return stored, "the base checkpoint's dtype"


_FIX = "choose another --out, on a disk with room for the merged weights."


def _tmp_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.merging-{os.getpid()}")


def run_merge(run_dir, out, base: str = "auto", dtype: str | None = None, verify: bool = True,
              samples: int = 8) -> int:
    """Merge a run's adapter into standalone weights at ``out`` (``llamatune merge``).

    Args:
        run_dir: A finished SFT run directory (config.yaml + adapter + tokenizer).
        out: The folder to create; must not exist.
        base: ``auto`` (dequantized weights for quantized runs, else the original),
            ``dequantized`` or ``original``.
        dtype: Saved precision (``float32``, ``bfloat16``, ``float16``); ``None``: the dtype
            the base checkpoint stores its weights in.
        verify: Compare the saved model with base + adapter before publishing it.
        samples: How many held-out samples verification uses.

    Returns:
        The exit code (0).

    Raises:
        UserError: Bad arguments or run directory, ``out`` exists, or the data for
            verification is missing.
        MergeVerificationError: The merged model failed verification; nothing is at ``out``.
    """
    import gc

    from llamatune.model import resolve_model_path

    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    if verify and samples < 1:
        raise UserError(f"--samples must be at least 1 (got {samples}); use --no-verify to skip "
                        "the check.")
    opened = _open_run(run_dir)
    run, cfg = opened.path, opened.cfg
    out_path = _check_out(out)
    q = cfg.model.quantization
    mode = _resolve_base(base, q)
    folder = resolve_model_path(cfg.model.path)
    out_dtype, dtype_why = _saved_dtype(folder, dtype)
    print(f"merge: {run} ({cfg.model.path}, quantization {q}) into the "
          f"{'dequantized ' + q if mode == 'dequantized' else 'original'} weights, "
          f"saved as {out_dtype} ({dtype_why})", flush=True)
    if q != "none" and mode == "original":
        print(f"warning: the adapter was trained against the {q} weights; merging it into the "
              "full-precision original gives a model that was never trained as such. "
              "Verification reports the gap but does not fail on it.", file=sys.stderr, flush=True)

    tokenizer = _run_tokenizer(cfg, run, folder)
    # Read the data before any heavy work, so a missing file fails in seconds.
    data = held_out_samples(cfg, tokenizer, samples, opened.stage) if verify else None
    reference = _load_reference(cfg, run, folder) if (verify or mode == "dequantized") else None
    tmp = _tmp_name(out_path)
    shutil.rmtree(tmp, ignore_errors=True)
    # Any failure (a full disk, a failed check, Ctrl-C) removes the temporary folder.
    with writing("the merged model", out_path, _FIX, temporary=[tmp]):
        with pinned_float32():
            merged = build_merged_model(cfg, run, folder, mode, reference)
        write_model_folder(tmp, merged, tokenizer, cfg.data.template, _torch_dtype(out_dtype))
        del merged
        gc.collect()
        record = {"run_dir": str(run.resolve()), "base_model": cfg.model.path,
                  "quantization": q, "base": mode, "dtype": out_dtype}
        if verify:
            check = choose_check(q, mode, "float32", out_dtype)
            record["verification"] = _verified(tmp, reference, cfg, check, data, run, out)
        (tmp / "llamatune_merge.json").write_text(json.dumps(record, indent=2) + "\n")
        if out_path.exists():
            raise UserError(f"--out {out} appeared while merging; the merged model is not "
                            "written over it.")
        os.replace(tmp, out_path)
    print(f"merged model written to {out_path}; it loads with "
          f"AutoModelForCausalLM.from_pretrained({str(out_path)!r})", flush=True)
    return 0


def _run_tokenizer(cfg, run: Path, folder: Path):
    """The run's tokenizer with its chat template; warns when the template cannot match training."""
    from llamatune.data.jinja import to_jinja
    from llamatune.model import load_tokenizer

    tokenizer = load_tokenizer(dataclasses.replace(cfg.model, tokenizer=str(run)), folder)
    if not getattr(tokenizer, "chat_template", None):
        # Run folders written by llamatune always carry one; rebuild it for older runs.
        tokenizer.chat_template = to_jinja(tokenizer, cfg.data.template, cfg.data.system)
    problem = chat_template_problem(tokenizer, cfg.data.template, cfg.data.system)
    if problem:
        print(f"warning: {problem}; chat through apply_chat_template will not match training "
              "(pass the system prompt as a system message to get it).", file=sys.stderr,
              flush=True)
    return tokenizer


def _verified(tmp: Path, reference, cfg, check, data, run: Path, out) -> dict:
    """Check the merged folder ``tmp`` against base + adapter; its figures, or the error.

    Raises:
        MergeVerificationError: The merged model does not reproduce the run.
    """
    result = _verify(tmp, reference, cfg, check, data)
    print(result.summary(), flush=True)
    if not result.passed:
        raise MergeVerificationError(
            f"the merged model does not reproduce {run} (base + adapter): "
            f"max logit difference {result.max_logit_diff:.3g}, perplexity "
            f"{result.ppl_merged:.4f} vs {result.ppl_reference:.4f} "
            f"({100 * result.ppl_gap:.3f}% apart); the rule is {check.kind} within "
            f"{check.tolerance:g} ({check.why}). Nothing was written to {out}. If "
            "you changed the base model files since training, merge against the "
            "originals; otherwise report this as a bug."
        )
    if check.kind == "report":
        print(f"warning: perplexity gap {100 * result.ppl_gap:.3f}% against the model "
              "the adapter was trained with (not judged: --base original).",
              file=sys.stderr, flush=True)
    return result.as_dict()
