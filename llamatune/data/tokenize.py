"""Records to token ids and labels, with the invariants checked on every sample.

Checked before any training starts on every sample as it will be trained (after truncation,
dropped samples left out), counts reported:

* BOS: position 0 holds the template's BOS exactly when the template starts with one
  (:func:`~llamatune.data.templates.bos_token_id`), and no sample starts with two of them;
* end token: every sample that was not truncated has a supervised end token (EOS or the
  template's end-of-turn token) as its last supervised token;
* something to learn: samples without a supervised token are dropped (an error if none
  are left).

Over-long samples are cut on the response side (``truncate``) or dropped (``drop``).
Results are cached on disk keyed by the data, tokenizer, template and length.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llamatune.data.templates import get_template, render, stop_token_ids
from llamatune.errors import UserError

__all__ = ["Stats", "tokenize_conversations", "tokenize_preferences", "tokenize_prompts",
           "tokenizer_fingerprint"]

_CACHE_VERSION = "5"


@dataclass
class Stats:
    """Counts from tokenization, printed before training."""

    records: int = 0
    samples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_unsupervised: int = 0
    bos_ok: int = 0
    end_ok: int = 0
    tokens: int = 0
    supervised: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self, unit: str = "samples") -> str:
        """One line for the console (``unit``: what a sample is, ``samples`` or ``pairs``)."""
        return (
            f"{self.samples}/{self.records} {unit}, {self.tokens:,} tokens "
            f"({self.supervised:,} supervised); BOS ok {self.bos_ok}/{self.samples}, "
            f"end token supervised {self.end_ok}/{self.samples - self.truncated}; "
            f"truncated {self.truncated}, dropped {self.dropped_too_long} too long + "
            f"{self.dropped_unsupervised} with nothing supervised"
        )


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of everything about a tokenizer that changes token ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
                   getattr(tokenizer, "chat_template", None))).encode())
    return h.hexdigest()


def _cache_path(cache_root, kind, records, tokenizer, template, system, max_length, truncation):
    if cache_root is None:
        return None
    tpl = get_template(template)
    h = hashlib.sha256()
    for part in (_CACHE_VERSION, kind, json.dumps(records, sort_keys=True, default=str),
                 tokenizer_fingerprint(tokenizer), repr(tpl), repr(system), str(max_length),
                 truncation):
        h.update(part.encode())
        h.update(b"\0")
    return Path(cache_root) / "tokenized" / f"{kind}-{h.hexdigest()[:24]}.json"


def _load_cache(path):
    if path is not None and path.is_file():
        data = json.loads(path.read_text())
        return data["samples"], Stats(**data["stats"])
    return None


def _save_cache(path, samples, stats):
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"samples": samples, "stats": asdict(stats)}))
    os.replace(tmp, path)


def _check(ids, labels, bos: int | None, truncated: bool, ends: set[int], loc: str,
           stats: Stats) -> tuple[bool, bool]:
    """Check one sample as it will be trained; return ``(bos_ok, end_ok)``.

    ``bos`` is the template's BOS id (``None``: the template starts with none); the end-token
    check applies to samples that were not truncated.
    """
    doubled = bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos
    placed = bos is None or (bool(ids) and ids[0] == bos)
    bos_ok = not doubled and placed
    if not bos_ok:
        stats.problems.append(f"{loc}: {'two BOS tokens' if doubled else 'BOS missing'}")
    sup = [t for t in labels if t != -100]
    end_ok = bool(sup) and sup[-1] in ends
    if sup and not end_ok and not truncated:
        stats.problems.append(f"{loc}: the last supervised token is not an end token")
    return bos_ok, end_ok and not truncated


def _fit(ids, labels, max_length, truncation):
    """``(ids, labels, truncated)`` within ``max_length``; ``(None, None, True)`` when dropped."""
    if len(ids) <= max_length:
        return ids, labels, False
    if truncation == "drop":
        return None, None, True
    return ids[:max_length], labels[:max_length], True


def tokenize_conversations(
    records: list[dict],
    tokenizer,
    template: str,
    *,
    system: str | None = None,
    max_length: int = 512,
    truncation: str = "truncate",
    cache_root: str | os.PathLike | None = None,
) -> tuple[list[dict], Stats]:
    """Tokenize conversation records into ``{"input_ids", "labels"}`` samples.

    Args:
        records: Canonical conversation records (``messages`` + ``loc``).
        tokenizer: The tokenizer.
        template: Template name.
        system: Default system prompt (``None``: the template's).
        max_length: Token budget per sample.
        truncation: ``truncate`` (cut the response side) or ``drop``.
        cache_root: Cache folder; ``None`` disables the cache.

    Returns:
        Samples and the counts.

    Raises:
        UserError: An invariant fails, or no sample has anything to learn.
    """
    msgs_only = [r["messages"] for r in records]
    path = _cache_path(cache_root, "conv", msgs_only, tokenizer, template, system, max_length,
                       truncation)
    ends = set(stop_token_ids(tokenizer, template))

    def one(rec: dict, stats: Stats) -> dict | None:
        r = render(tokenizer, template, rec["messages"], system=system)
        ids, labels, cut = _fit(r.input_ids, r.labels, max_length, truncation)
        if ids is None:
            stats.dropped_too_long += 1
            return None
        n_sup = sum(1 for t in labels if t != -100)
        if n_sup == 0:
            stats.dropped_unsupervised += 1
            return None
        # Counted as trained: after truncation, dropped samples left out.
        bos_ok, end_ok = _check(ids, labels, r.bos_id, cut, ends, rec["loc"], stats)
        stats.samples += 1
        stats.truncated += cut
        stats.bos_ok += bos_ok
        stats.end_ok += end_ok
        stats.tokens += len(ids)
        stats.supervised += n_sup
        return {"input_ids": ids, "labels": labels}

    return _tokenized(path, records, one)


def tokenize_preferences(
    records: list[dict],
    tokenizer,
    template: str,
    *,
    system: str | None = None,
    max_length: int = 512,
    cache_root: str | os.PathLike | None = None,
) -> tuple[list[dict], Stats]:
    """Tokenize preference pairs: each side is the prompt plus that answer, end token last.

    Returns:
        ``{"chosen_ids", "rejected_ids", "chosen_labels", "rejected_labels", "group"}`` samples
        (labels are ``-100`` outside the answer and its end token; pairs where either side
        exceeds ``max_length`` are dropped and counted) and the counts.
    """
    key = [(r["prompt"], r["chosen"], r["rejected"]) for r in records]
    path = _cache_path(cache_root, "pref", key, tokenizer, template, system, max_length, "drop")
    ends = set(stop_token_ids(tokenizer, template))

    def one(rec: dict, stats: Stats) -> dict | None:
        sides = [render(tokenizer, template, rec["prompt"] + rec[side], system=system)
                 for side in ("chosen", "rejected")]
        if max(len(r.input_ids) for r in sides) > max_length:
            stats.dropped_too_long += 1
            return None
        # A pair counts as one sample: both of its sides must pass.
        oks = [_check(r.input_ids, r.labels, r.bos_id, False, ends, rec["loc"], stats)
               for r in sides]
        stats.samples += 1
        stats.bos_ok += all(ok[0] for ok in oks)
        stats.end_ok += all(ok[1] for ok in oks)
        stats.tokens += len(sides[0].input_ids) + len(sides[1].input_ids)
        stats.supervised += sum(t != -100 for r in sides for t in r.labels)
        return {"chosen_ids": sides[0].input_ids, "rejected_ids": sides[1].input_ids,
                "chosen_labels": sides[0].labels, "rejected_labels": sides[1].labels,
                "group": rec.get("group")}

    return _tokenized(path, records, one)


def tokenize_prompts(
    records: list[dict],
    tokenizer,
    template: str,
    *,
    system: str | None = None,
    max_length: int = 512,
    cache_root: str | os.PathLike | None = None,
) -> tuple[list[dict], Stats]:
    """Tokenize prompt records up to the open assistant turn (what generation is fed).

    Returns:
        ``{"input_ids", "messages", "fields"}`` samples (``fields``: the row's other fields,
        for reward functions; prompts longer than ``max_length`` are dropped and counted) and
        the counts.
    """
    key = [(r["messages"], r.get("fields")) for r in records]
    path = _cache_path(cache_root, "prompt", key, tokenizer, template, system, max_length, "drop")

    def one(rec: dict, stats: Stats) -> dict | None:
        r = render(tokenizer, template, rec["messages"], system=system, add_generation_prompt=True)
        if len(r.input_ids) > max_length:
            stats.dropped_too_long += 1
            return None
        bos_ok, _ = _check(r.input_ids, r.labels, r.bos_id, True, set(), rec["loc"], stats)
        stats.samples += 1
        stats.bos_ok += bos_ok
        stats.tokens += len(r.input_ids)
        return {"input_ids": r.input_ids, "messages": rec["messages"],
                "fields": rec.get("fields") or {}, "group": rec.get("group")}

    return _tokenized(path, records, one)


def _tokenized(path, records: list[dict], one) -> tuple[list[dict], Stats]:
    """The samples of ``records`` from the cache at ``path``, or made now and cached.

    ``one(record, stats)`` tokenizes a record (``None``: dropped, counted in ``stats``); the
    template invariants are then checked over every sample before anything is cached.
    """
    hit = _load_cache(path)
    if hit is not None:
        return hit
    stats = Stats(records=len(records))
    samples = [s for rec in records if (s := one(rec, stats)) is not None]
    _finish(stats, "data.path")
    _save_cache(path, samples, stats)
    return samples, stats


def _finish(stats: Stats, key: str) -> None:
    if stats.problems:
        shown = "; ".join(stats.problems[:10])
        raise UserError(
            f"{len(stats.problems)} sample(s) break the template invariants: {shown}. "
            "This is a template/tokenizer mismatch; check data.template against the model."
        )
    if stats.samples == 0:
        raise UserError(
            f"{key}: no usable samples ({stats.dropped_too_long} too long for train.max_length, "
            f"{stats.dropped_unsupervised} with nothing supervised). Raise train.max_length or "
            "use data.truncation=truncate."
        )
