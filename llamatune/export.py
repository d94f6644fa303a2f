"""GGUF export for llama.cpp and Ollama, checked by a reader that is not ours.

``llamatune export RUN_OR_MERGED_DIR --gguf OUT.gguf [--type f16|bf16|q8_0]`` writes a
Llama-architecture GGUF (tensors under llama.cpp's names, the rotary halves of the query and
key projections interleaved the way llama.cpp's rope expects them; hyper-parameters and the
tokenizer as metadata; the run's chat template as ``tokenizer.chat_template``), and an Ollama
``Modelfile`` beside it. A run directory is merged first (``llamatune merge``'s verified path).

Nothing appears at ``OUT`` until the file has been read back by transformers' GGUF loader and
compared with the merged model on held-out prompts (the source run's eval split when it is
known, else a fixed set): the GGUF's tokenizer must encode every prompt to the same ids and
carry the same chat template; for ``f16``/``bf16`` the greedy answers must be token for token
those of the merged model with its weights cast to that dtype; for ``q8_0`` the perplexity of
the merged model's own greedy answers must stay within :data:`Q8_PPL_BOUND` of the merged
model's. Where ``llama-cpp-python`` is installed, ``bench/gguf_llamacpp_check.py`` runs the
same comparison through llama.cpp itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llamatune._atomic import WriteError, reason, writing
from llamatune.errors import UserError

__all__ = ["GGUF_TYPES", "Q8_PPL_BOUND", "ExportVerificationError", "export_gguf", "reference_model",
           "run_export", "stop_ids"]

GGUF_TYPES = ("f16", "bf16", "q8_0")
Q8_PPL_BOUND = 0.01
"""q8_0: the largest relative perplexity gap (1%) accepted against the merged model."""

FALLBACK_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about autumn leaves.",
    "How do I boil an egg?",
    "What is 17 + 25?",
    "Translate 'good morning' into Spanish.",
    "Name a mammal that can fly.",
]
"""Prompts for the check when the source run's data is not at hand (a foreign folder)."""

_LAYER = {  # Hugging Face Llama name inside ``model.layers.N.`` -> llama.cpp's inside ``blk.N.``
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


class ExportVerificationError(UserError):
    """The GGUF read back does not reproduce the merged model; nothing was published."""


@dataclass
class Verification:
    """What the read-back check found."""

    gguf_type: str
    prompts: int
    source: str
    tokens_equal: bool
    template_equal: bool
    greedy_equal: int
    ppl_gguf: float
    ppl_merged: float

    @property
    def ppl_gap(self) -> float:
        """Relative perplexity gap of the GGUF against the merged model."""
        return abs(self.ppl_gguf - self.ppl_merged) / self.ppl_merged

    @property
    def passed(self) -> bool:
        """Tokenizer and template equal; greedy equal (f16/bf16) or perplexity within bound."""
        if not (self.tokens_equal and self.template_equal):
            return False
        if self.gguf_type == "q8_0":
            return self.ppl_gap <= Q8_PPL_BOUND
        return self.greedy_equal == self.prompts

    def summary(self) -> str:
        """One line for the terminal."""
        rule = (f"perplexity within {100 * Q8_PPL_BOUND:g}%" if self.gguf_type == "q8_0" else
                "greedy answers identical")
        return (f"verify: read back by transformers' GGUF loader; {self.prompts} prompts "
                f"({self.source}): tokenizer {'same ids' if self.tokens_equal else 'DIFFERS'}, "
                f"chat template {'same' if self.template_equal else 'DIFFERS'}, greedy answers "
                f"identical {self.greedy_equal}/{self.prompts}, perplexity of the merged model's "
                f"answers {self.ppl_gguf:.4f} vs {self.ppl_merged:.4f} "
                f"({100 * self.ppl_gap:.3f}% apart); rule: {rule} -> "
                f"{'PASS' if self.passed else 'FAIL'}")


# -- writing ----------------------------------------------------------------------------------
def _interleave_rope(w, n_head: int):
    """Rows of a q/k projection from rotate-half order to llama.cpp's interleaved pairs."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def _check_architecture(config, folder: Path) -> None:
    problems = []
    if getattr(config, "model_type", None) != "llama":
        problems.append(f"model_type is {getattr(config, 'model_type', None)!r}, not 'llama'")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        problems.append(f"RoPE scaling {rope.get('rope_type')!r} is not written by this exporter")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("biased attention or MLP projections")
    if problems:
        raise UserError(f"{folder}: llamatune export writes plain Llama-architecture GGUFs; this "
                        f"model has {'; '.join(problems)}.")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def _tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """llama.cpp's tokenizer keys for a byte-level BPE (``gpt2``) or sentencepiece (``llama``)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise UserError(f"the tokenizer is a {model['type']} model; llamatune export writes "
                        "byte-level BPE (Llama-3, SmolLM) and sentencepiece BPE (Llama-2) ones.")
    pre = json.dumps(spec.get("pre_tokenizer"))
    byte_level = "ByteLevel" in pre
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    inv = {i: t for t, i in model["vocab"].items()}
    for i, t in added.items():
        inv[i] = t["content"]
    if max(inv) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(inv)} but the model only "
                        f"{vocab_size} embedding rows.")
    tokens, types = [], []
    for i in range(vocab_size):
        tok = inv.get(i)
        if tok is None:  # embedding rows no token uses (vocabularies padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif i in added:
            tokens.append(tok)
            types.append(3 if added[i].get("special") else 4)  # CONTROL / USER_DEFINED
        elif not byte_level and tok.startswith("<0x") and len(tok) == 6:
            tokens.append(tok)
            types.append(6)  # BYTE
        else:
            tokens.append(tok)
            types.append(2 if tok == model.get("unk_token") else 1)  # UNKNOWN / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if byte_level:
        kind = "gpt2"
        if "Split" in pre and "\\p{N}{1,3}" in pre:
            pre_type = "llama-bpe"  # Llama-3's split
        elif "Digits" in pre:
            pre_type = "smollm"
        else:
            pre_type = "gpt-2"  # llama.cpp's name for the GPT-2 split
    else:
        kind, pre_type = "llama", "default"
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    meta = {"model": kind, "pre": pre_type, "tokens": tokens, "types": types, "merges": merges,
            "add_bos": bool(tokenizer.bos_token_id is not None and probe[:1] == [
                tokenizer.bos_token_id]),
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id,
            "chat_template": getattr(tokenizer, "chat_template", None)}
    if kind == "llama":  # sentencepiece scores: earlier pieces merge first
        meta["scores"] = [-float(i) for i in range(vocab_size)]
    return meta


def _gguf_tensor(tensor, gguf_type: str):
    """``(array, raw_dtype)`` for one tensor: norms in f32, matrices in the export type."""
    import gguf
    import numpy as np

    data = tensor.float().numpy()
    if data.ndim == 1:
        return data.astype(np.float32), None
    if gguf_type == "f16":
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if gguf_type == "bf16" else \
        gguf.GGMLQuantizationType.Q8_0
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        return data.astype(np.float16), None  # rows q8_0 cannot block: f16, as llama.cpp does
    return gguf.quants.quantize(data, qtype), qtype


def write_gguf(folder: Path, path: Path, gguf_type: str, name: str) -> None:
    """Write the model folder ``folder`` (plain transformers Llama) as a GGUF at ``path``."""
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(folder))
    _check_architecture(config, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tok = _tokenizer_metadata(tokenizer, config.vocab_size)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise UserError(f"{folder} holds no .safetensors weights to export.")
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in state

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if tok["merges"]:
        w.add_token_merges(tok["merges"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                    ("pad", w.add_pad_token_id), ("unk", w.add_unk_token_id)):
        if tok[key] is not None:
            fn(tok[key])
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(False)
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])

    for hf, t in state.items():
        if hf in _TOP:
            out = _TOP[hf]
            if out == "output.weight" and tied:
                continue
        elif hf.startswith("model.layers."):
            layer, rest = hf[len("model.layers."):].split(".", 1)
            if rest not in _LAYER:
                raise UserError(f"{folder}: tensor {hf} has no place in a Llama GGUF.")
            out = f"blk.{layer}.{_LAYER[rest]}"
            if rest == "self_attn.q_proj.weight":
                t = _interleave_rope(t, n_head)
            elif rest == "self_attn.k_proj.weight":
                t = _interleave_rope(t, n_kv)
        elif hf.endswith("rotary_emb.inv_freq"):
            continue
        else:
            raise UserError(f"{folder}: tensor {hf} has no place in a Llama GGUF.")
        data, raw = _gguf_tensor(t.to(torch.float32), gguf_type)
        w.add_tensor(out, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- checking ---------------------------------------------------------------------------------
def _prompts(folder: Path, tokenizer, n: int) -> tuple[list[str], str]:
    """Rendered prompt texts: the source run's held-out prompts when known, else a fixed set."""
    record = folder / "llamatune_merge.json"
    run_dir = Path(json.loads(record.read_text()).get("run_dir", "")) if record.is_file() \
        else None
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        from llamatune.data import held_out_prompts
        from llamatune.recipes import STAGE_DATA
        from llamatune.rundir import Run

        try:
            run = Run.open(str(run_dir))
            convs, source = held_out_prompts(run.cfg, STAGE_DATA[run.stage], n)
        except (UserError, KeyError):
            convs = []
        if convs:
            return ([tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in convs], f"{source} of {run_dir}")
    if not getattr(tokenizer, "chat_template", None):  # a base model: plain text prompts
        return list(FALLBACK_PROMPTS[:n]), "llamatune's fixed export prompts, as plain text"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True)
             for p in FALLBACK_PROMPTS[:n]]
    return texts, "llamatune's fixed export prompts"


def stop_ids(folder: Path, tokenizer) -> list[int]:
    """The model folder's stop tokens.

    Its generation config's ``eos_token_id`` (a merged run lists the template's end tokens
    there), else the tokenizer's EOS.
    """
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(folder)).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return sorted({i for i in eos if i is not None})


def reference_model(folder: Path, gguf_type: str):
    """The folder's model in float32, its matrices rounded as the export stores them.

    ``f16``/``bf16`` round every matrix to that type; ``q8_0`` leaves full precision (its
    comparison is a bound, not equality).
    """
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if gguf_type in ("f16", "bf16"):
        cast = torch.float16 if gguf_type == "f16" else torch.bfloat16
        with torch.no_grad():
            for p in ref.parameters():
                if p.dim() > 1:
                    p.copy_(p.to(cast).float())
    return ref


def _nll(model, ids: list[int], start: int) -> tuple[float, int]:
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(1, x[0, 1:, None]).squeeze(1)
    return float(-logp[start - 1:].sum()), len(ids) - start


def verify_gguf(folder: Path, path: Path, gguf_type: str, n: int = 8,
                max_new_tokens: int = 32) -> Verification:
    """Read ``path`` back with transformers and compare it with the model folder ``folder``."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamatune.decoding import generate

    tok = AutoTokenizer.from_pretrained(str(folder))
    gtok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts, source = _prompts(folder, tok, n)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    if tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]:
        ids = [i if i[:1] == [tok.bos_token_id] else [tok.bos_token_id] + i for i in ids]
    gids = [gtok(t, add_special_tokens=False)["input_ids"] for t in texts]
    gids = [g if i[:1] != [tok.bos_token_id] or g[:1] == i[:1] else i[:1] + g
            for i, g in zip(ids, gids)]
    tokens_equal = gids == ids
    template_equal = (getattr(gtok, "chat_template", None) or None) == \
        (getattr(tok, "chat_template", None) or None)

    ref = reference_model(folder, gguf_type)
    gmodel = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32).eval()
    stops = stop_ids(folder, tok)
    a = generate(ref, tok, ids, stop_ids=stops, max_new_tokens=max_new_tokens, greedy=True)
    b = generate(gmodel, tok, ids, stop_ids=stops, max_new_tokens=max_new_tokens, greedy=True)
    same = sum(x == y for x, y in zip(a.ids, b.ids))
    nll_r = nll_g = 0.0
    count = 0
    for prompt, answer in zip(ids, a.ids):
        if not answer:
            continue
        full = prompt + answer
        r, c = _nll(ref, full, len(prompt))
        g, _ = _nll(gmodel, full, len(prompt))
        nll_r, nll_g, count = nll_r + r, nll_g + g, count + c
    count = max(count, 1)
    return Verification(gguf_type, len(ids), source, tokens_equal, template_equal, same,
                        math.exp(nll_g / count), math.exp(nll_r / count))


# -- the command ------------------------------------------------------------------------------
_FIX = "choose another --gguf path, on a disk with room for the GGUF."


def _modelfile(gguf_name: str, stops: list[str]) -> str:
    lines = ["# Ollama: ollama create NAME -f THIS_FILE", f"FROM ./{gguf_name}",
             "# The chat template travels inside the GGUF (tokenizer.chat_template); Ollama "
             "reads it from there.", "PARAMETER temperature 0.7"]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def export_gguf(folder: Path, out: Path, gguf_type: str = "f16", verify: bool = True,
                samples: int = 8) -> Verification | None:
    """Write, check and publish a GGUF of the model folder ``folder`` at ``out``.

    Returns:
        The verification (``None`` when ``verify`` is off).

    Raises:
        ExportVerificationError: The read-back differs; nothing is left at ``out``.
    """
    from transformers import AutoTokenizer

    with writing(out.name, out.parent, _FIX):
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".gguf", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp makes it private; the published file is not
    result = None
    modelfile = out.with_suffix(".Modelfile")
    mtmp = modelfile.with_name(f".{modelfile.name}.tmp")
    # Any failure (a full disk, a failed check, Ctrl-C) removes both temporary files; an
    # earlier OUT.gguf and its Modelfile stay as they were.
    with writing(out.name, out.parent, _FIX, temporary=[tmp, mtmp]):
        write_gguf(folder, tmp, gguf_type, out.stem)
        if verify:
            result = verify_gguf(folder, tmp, gguf_type, samples)
            print(result.summary(), flush=True)
            if not result.passed:
                raise ExportVerificationError(
                    f"the GGUF read back does not reproduce {folder}: {result.summary()}. "
                    f"Nothing was written to {out}; report this as a bug.")
        tok = AutoTokenizer.from_pretrained(str(folder))
        stops = [tok.convert_ids_to_tokens(i) for i in stop_ids(folder, tok)]
        mtmp.write_text(_modelfile(out.name, stops))
        os.replace(tmp, out)
        os.replace(mtmp, modelfile)
    return result


def run_export(path: str, gguf: str, gguf_type: str = "f16", verify: bool = True,
               samples: int = 8) -> int:
    """``llamatune export``: a run directory (merged first) or a model folder to GGUF.

    Returns:
        The exit code (0).

    Raises:
        UserError: Bad arguments, a folder that is neither a run nor a Llama model folder, the
            ``gguf`` package missing, or a failed check.
    """
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}.")
    if samples < 1:
        raise UserError(f"--samples must be at least 1 (got {samples}).")
    out = Path(gguf).expanduser()
    if out.suffix != ".gguf":
        raise UserError(f"--gguf {gguf}: the file name must end in .gguf.")
    if out.is_dir():
        raise UserError(f"--gguf {gguf} is a folder; name the .gguf file to write.")
    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise UserError("llamatune export needs the gguf package: pip install "
                        "'llamatune[export]' (or pip install gguf).") from None
    src = Path(path).expanduser()
    work = None
    try:
        if (src / "config.yaml").is_file() and (src / "adapter_config.json").is_file():
            from llamatune.merge import run_merge

            work = Path(tempfile.mkdtemp(prefix="llamatune-export-"))
            print(f"export: merging {src} first", flush=True)
            try:
                run_merge(str(src), str(work / "merged"), verify=verify, samples=samples)
            except WriteError as e:  # the temporary merge, not --out: say where and what to do
                raise WriteError(
                    f"could not write the merged model export builds first in {work}: "
                    f"{reason(e.errno)}. Nothing at --gguf {gguf} was changed. Free space in "
                    "the temporary folder, or point TMPDIR at a disk with room for the merged "
                    "weights.", e.errno) from None
            folder = work / "merged"
        elif (src / "config.json").is_file():
            folder = src
        else:
            raise UserError(f"{path} is neither a llamatune run directory (config.yaml + "
                            "adapter) nor a model folder (config.json).")
        print(f"export: {folder} -> {out} ({gguf_type})", flush=True)
        export_gguf(folder, out, gguf_type, verify, samples)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} and {out.with_suffix('.Modelfile')}; llama.cpp: llama-cli -m {out} "
          f"-cnv; Ollama: ollama create NAME -f {out.with_suffix('.Modelfile')}", flush=True)
    return 0

