"""Data preparation for every stage and command: find, read, validate, split, tokenize.

One place turns a recipe's ``data.*`` keys into token ids, whatever uses them: the training
stages, ``validate``, ``preview`` and ``merge`` (which verifies a run on its own data). What
a stage trains on is one of three kinds:

* ``conversations`` (``alpaca``, ``sharegpt``, ``messages``): ``{"input_ids", "labels"}``,
  answers and their end tokens supervised (SFT);
* ``pairs`` (``preference``): ``{"chosen_ids", "rejected_ids", "chosen_labels",
  "rejected_labels", "group"}``, each side the prompt plus that answer (reward model, DPO);
* ``prompts`` (``prompts``): ``{"input_ids", "fields"}``, the prompt rendered up to the open
  assistant turn, with the row's other fields (such as ``answer``) for reward functions (PPO).

:func:`check` runs the cheap checks (format, template, settings that do not apply) before
anything heavy is loaded; :func:`prepare` does the rest. Knows no model, loop or stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llamatune._cache import cache_dir
from llamatune.data.formats import read_records
from llamatune.data.split import split_records
from llamatune.data.templates import get_template, render
from llamatune.data.tokenize import (
    Stats,
    tokenize_conversations,
    tokenize_preferences,
    tokenize_prompts,
)
from llamatune.errors import UserError

__all__ = ["KINDS", "Prepared", "check", "held_out_prompts", "prepare", "resolve_data_path",
           "topic_prompts", "verification_samples"]

KINDS = {
    "conversations": ("alpaca", "sharegpt", "messages"),
    "pairs": ("preference",),
    "prompts": ("prompts",),
}
"""Record formats each kind of stage data accepts."""

_WHAT = {"conversations": "conversations", "pairs": "preference pairs (prompt, chosen, rejected)",
         "prompts": "prompts"}


@dataclass
class Prepared:
    """A stage's tokenized data."""

    train: list[dict]
    eval: list[dict]
    stats: Stats
    kind: str
    held_out: int = 0
    """Rows set aside by ``data.holdout_topics``."""
    topics: list[str] | None = None
    """``data.holdout_topics``."""

    def summary(self) -> str:
        """The ``data:`` line printed before training."""
        held = (f"; {self.held_out} rows of held-out topics ({', '.join(self.topics)}) set aside"
                if self.topics else "")
        if self.kind == "prompts":
            s = self.stats
            return (f"{s.samples}/{s.records} prompts, {s.tokens:,} tokens; BOS ok "
                    f"{s.bos_ok}/{s.samples}; dropped {s.dropped_too_long} too long for "
                    f"train.max_length; eval {len(self.eval)} prompts{held}")
        unit = "pairs" if self.kind == "pairs" else "samples"
        return f"{self.stats.summary(unit)}; eval {len(self.eval)} {unit}{held}"


def resolve_data_path(path: str, recipe_path: str | None) -> str:
    """Find a data path: as given, else next to the recipe file, else among the shipped sets.

    Relative paths are tried against the working directory first. The result is absolute
    when the file was found, so a run directory's config works from any directory.
    """
    p = Path(path).expanduser()
    if p.exists():
        return str(p.resolve())
    if p.is_absolute():
        return str(p)
    candidates = []
    if recipe_path:
        rp = Path(recipe_path).resolve().parent
        candidates += [rp / path, rp.parent / path]
    from llamatune.shipped import shipped_datasets_dir

    shipped = shipped_datasets_dir()
    if shipped is not None:
        candidates.append(shipped / Path(path).name)
    for c in candidates:
        if c.exists():
            return str(c.resolve())
    return path


def check(cfg, kind: str, command: str) -> None:
    """The cheap checks, before the model is resolved (or converted) and anything written.

    Args:
        cfg: The recipe config.
        kind: ``conversations``, ``pairs`` or ``prompts``.
        command: The stage command, for messages (``llamatune rm``).

    Raises:
        UserError: The data format does not fit the stage, the template is unknown, or a
            setting does not apply to this kind of data.
    """
    d = cfg.data
    formats = KINDS[kind]
    if d.format not in formats:
        raise UserError(
            f"data.format {d.format!r} does not hold {_WHAT[kind]}; {command} takes "
            + (f"data.format={formats[0]}" if len(formats) == 1 else ", ".join(formats)) + ".")
    get_template(d.template)
    if kind != "conversations" and cfg.train.packing:
        raise UserError(
            f"train.packing=true does not apply to {command}: each sequence is scored whole. "
            "Set train.packing=false.")


def _without_topics(records: list[dict], topics: list[str], key: str, path: str) -> list[dict]:
    """``records`` less those of ``topics`` (``data.holdout_topics``)."""
    if not topics:
        return records
    if not any("topic" in r for r in records):
        raise UserError(f"data.holdout_topics: the rows of {key} {path} have no `topic` field, "
                        "so no row can be held out by topic; add one, or drop "
                        "data.holdout_topics.")
    held = set(topics)
    return [r for r in records if r.get("topic") not in held]


def _records(cfg, recipe_path, kind):
    d = cfg.data
    path = resolve_data_path(d.path, recipe_path)
    everything = read_records(path, d.format, d.fields, d.eval_group_by)
    records = _without_topics(everything, d.holdout_topics, "data.path", path)
    held = len(everything) - len(records)
    if d.eval_path:
        epath = resolve_data_path(d.eval_path, recipe_path)
        evals = _without_topics(read_records(epath, d.format, d.fields, d.eval_group_by,
                                             key="data.eval_path"),
                                d.holdout_topics, "data.eval_path", epath)
        train = records
    else:
        train, evals = split_records(records, d.eval_split, cfg.train.seed,
                                     group_by=bool(d.eval_group_by))
    if d.max_samples:
        train = train[: d.max_samples]
    return train, evals, held


def _tokenize(kind, records, tokenizer, cfg):
    d = cfg.data
    kw = dict(system=d.system, max_length=cfg.train.max_length,
              cache_root=cache_dir() if d.cache else None)
    if kind == "conversations":
        return tokenize_conversations(records, tokenizer, d.template, truncation=d.truncation,
                                      **kw)
    if kind == "pairs":
        return tokenize_preferences(records, tokenizer, d.template, **kw)
    return tokenize_prompts(records, tokenizer, d.template, **kw)


def prepare(cfg, tokenizer, kind: str, command: str, recipe_path: str | None = None) -> Prepared:
    """Read, validate, split and tokenize a stage's data.

    Args:
        cfg: The recipe config (``data.*``, ``train.max_length``, ``train.seed``).
        tokenizer: The tokenizer the model uses.
        kind: ``conversations``, ``pairs`` or ``prompts``.
        command: The stage command, for messages.
        recipe_path: The recipe file (relative data paths are also tried next to it).

    Returns:
        The train and eval samples and the invariant counts of the training samples.

    Raises:
        UserError: Bad rows (file, line, field), broken invariants, or nothing to train on.
    """
    check(cfg, kind, command)
    train_recs, eval_recs, held = _records(cfg, recipe_path, kind)
    train, stats = _tokenize(kind, train_recs, tokenizer, cfg)
    evals = _tokenize(kind, eval_recs, tokenizer, cfg)[0] if eval_recs else []
    return Prepared(train, evals, stats, kind, held, list(cfg.data.holdout_topics))


def verification_samples(cfg, tokenizer, kind: str, n: int) -> tuple[list[dict], str]:
    """Up to ``n`` ``{"input_ids", "labels"}`` samples of a run's own data, for ``merge``.

    Held out where the run held any out. Pairs give their chosen side (prompt plus the
    preferred answer, the answer supervised); prompts give the prompt itself, every next
    token scored (there is no answer to score).

    Returns:
        ``(samples, source)``; ``source`` says where they came from.
    """
    train_recs, eval_recs, _ = _records(cfg, None, kind)
    recs, source = ((eval_recs, "eval split") if eval_recs else
                    (train_recs, "training samples: the run held out no eval split"))
    recs = recs[: max(n * 2, n + 4)]  # a few spare for samples dropped as too long
    d = cfg.data
    if kind == "conversations":
        samples = _tokenize(kind, recs, tokenizer, cfg)[0]
    elif kind == "pairs":
        convs = [dict(r, messages=r["prompt"] + r["chosen"]) for r in recs]
        samples = tokenize_conversations(convs, tokenizer, d.template, system=d.system,
                                         max_length=cfg.train.max_length)[0]
    else:
        samples = []
        for r in recs:
            ids = render(tokenizer, d.template, r["messages"], system=d.system,
                         add_generation_prompt=True).input_ids[: cfg.train.max_length]
            samples.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return samples[:n], source


def held_out_prompts(cfg, kind: str, n: int) -> tuple[list[list[dict]], str]:
    """Up to ``n`` conversations of a run's own data, cut after their last user turn.

    Held out where the run held any out; for checking an exported model on prompts it was
    not trained on.

    Returns:
        ``(conversations, source)``; ``source`` says where they came from.
    """
    train_recs, eval_recs, _ = _records(cfg, None, kind)
    recs, source = (eval_recs, "eval split") if eval_recs else (train_recs, "training samples")
    return [c for c in map(_asked, recs[:n]) if c is not None], source


def topic_prompts(cfg, topics: list[str], recipe_path: str | None = None) -> list[dict]:
    """The distinct prompts of the ``data.path`` rows whose ``topic`` is one of ``topics``.

    What ``data.holdout_topics`` set aside, for asking a trained model about it afterwards.

    Returns:
        ``{"topic", "messages"}`` per distinct prompt, in file order; ``messages`` ends with
        the row's last user turn.
    """
    d = cfg.data
    wanted, seen, out = set(topics), set(), []
    for r in read_records(resolve_data_path(d.path, recipe_path), d.format, d.fields):
        msgs = _asked(r) if r.get("topic") in wanted else None
        if msgs is not None and str(msgs) not in seen:
            seen.add(str(msgs))
            out.append({"topic": r["topic"], "messages": msgs})
    return out


def _asked(rec: dict) -> list[dict] | None:
    """A record's conversation up to its last user turn (``None`` without one)."""
    msgs = rec["prompt"] if "prompt" in rec else rec["messages"]  # pairs keep the prompt apart
    last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
    return None if last is None else msgs[: last + 1]
