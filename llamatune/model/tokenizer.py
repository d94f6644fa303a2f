"""The tokenizer of a model, with a pad token distinct from EOS."""

from __future__ import annotations

from pathlib import Path

from llamatune.config import ModelConfig
from llamatune.errors import UserError
from llamatune.model.source import resolve_model_path


def load_tokenizer(cfg: ModelConfig, folder: str | None = None):
    """Load the tokenizer and give it a pad token that is not the EOS token.

    Args:
        cfg: The model section (``model.tokenizer`` overrides where the tokenizer comes from).
        folder: Already-resolved model folder, to avoid resolving twice.

    Returns:
        A ``PreTrainedTokenizerBase`` with ``pad_token_id != eos_token_id`` where possible.
    """
    from transformers import AutoTokenizer

    src = cfg.tokenizer or folder or resolve_model_path(cfg.path)
    if cfg.tokenizer:
        src = resolve_model_path(cfg.tokenizer) if not Path(cfg.tokenizer).is_dir() else src
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        key = "model.tokenizer" if cfg.tokenizer else "model.path"
        raise UserError(f"{key} {src}: no tokenizer could be loaded ({e}).") from None
    set_pad_token(tok)
    return tok


def set_pad_token(tok) -> None:
    """Pick a pad token distinct from EOS, so padding can never be confused with a real EOS.

    llamatune builds labels from explicit masks, so training never depends on the pad id;
    this protects generation and any collator that masks by pad id.
    """
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return
    for cand in ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>", tok.unk_token):
        if cand is None:
            continue
        tid = tok.convert_tokens_to_ids(cand)
        # An unknown string maps to the unk id; only accept unk when it was asked for by name.
        if tid is None or tid == tok.eos_token_id:
            continue
        if tid == tok.unk_token_id and cand != tok.unk_token:
            continue
        tok.pad_token = cand
        return
    # Nothing suitable in the vocabulary: reuse id 0 if it is not EOS (no embedding resize).
    if tok.eos_token_id != 0:
        tok.pad_token = tok.convert_ids_to_tokens(0)
    else:
        tok.pad_token = tok.convert_ids_to_tokens(1)
