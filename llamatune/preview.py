"""``llamatune preview``: what the model will be trained on, token by token.

Loads only the tokenizer. The human view marks supervised text with ``[[...]]`` and prints
the invariant counts; ``--json`` prints one object per sample per line with ``text``,
``input_ids`` and ``labels`` (-100 where unsupervised). The recipe's ``stage:`` says which
stage's data to show (conversations, preference pairs or prompts).
"""

from __future__ import annotations

import json

__all__ = ["marked_text", "run_preview"]


def marked_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The sample's text with supervised spans wrapped in ``[[`` ``]]``."""
    out, span, sup = [], [], False
    for tid, lab in zip(input_ids, labels):
        s = lab != -100
        if s != sup and span:
            text = tokenizer.decode(span, skip_special_tokens=False)
            out.append(f"[[{text}]]" if sup else text)
            span = []
        sup = s
        span.append(tid)
    if span:
        text = tokenizer.decode(span, skip_special_tokens=False)
        out.append(f"[[{text}]]" if sup else text)
    return "".join(out)


def _rows(prepared, n: int) -> list[dict]:
    if prepared.kind == "conversations":
        return [dict(s) for s in prepared.train[:n]]
    if prepared.kind == "prompts":
        return [{"input_ids": s["input_ids"], "labels": [-100] * len(s["input_ids"])}
                for s in prepared.train[:n]]
    return [{"side": side, "input_ids": s[f"{side}_ids"], "labels": s[f"{side}_labels"]}
            for s in prepared.train[:n] for side in ("chosen", "rejected")]


def run_preview(cfg, recipe_path: str | None, n: int = 3, as_json: bool = False) -> int:
    """Print ``n`` rendered training samples of a recipe.

    Returns:
        The exit code.
    """
    from llamatune.data import prepare
    from llamatune.model import load_tokenizer, resolve_model_path
    from llamatune.recipes import stage_data

    kind, command = stage_data(cfg, recipe_path)
    tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model.path))
    prepared = prepare(cfg, tok, kind, command, recipe_path)
    for i, row in enumerate(_rows(prepared, n)):
        text = tok.decode(row["input_ids"], skip_special_tokens=False)
        if as_json:
            print(json.dumps({"text": text, "input_ids": row["input_ids"],
                              "labels": row["labels"]}))
            continue
        n_sup = sum(1 for t in row["labels"] if t != -100)
        side = f" ({row['side']})" if "side" in row else ""
        print(f"--- sample {i + 1}{side}: {len(row['input_ids'])} tokens, {n_sup} supervised "
              f"[[marked]] ---")
        print(marked_text(tok, row["input_ids"], row["labels"]))
    if not as_json:
        print(f"--- template {cfg.data.template}; {prepared.summary()}")
    return 0
