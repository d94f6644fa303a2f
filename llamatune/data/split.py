"""Deterministic train/eval splits, by row or by whole groups."""

from __future__ import annotations

import random

__all__ = ["split_records"]


def split_records(
    records: list[dict], eval_split: float, seed: int, group_by: bool = False
) -> tuple[list[dict], list[dict]]:
    """Hold out a fraction (``< 1``) or a count (``>= 1``) of records for evaluation.

    Args:
        records: Canonical records (each may carry ``group``).
        eval_split: Fraction or count; 0 holds out nothing.
        seed: The split depends only on this seed and the records.
        group_by: Hold out whole groups (records sharing ``group``), so evaluation measures
            generalization to unseen groups (topics, prompts) rather than seen ones.

    Returns:
        ``(train, eval)``, each in original file order.
    """
    if eval_split <= 0 or len(records) < 2:
        return list(records), []
    rng = random.Random(seed)
    if group_by:
        groups = sorted({r["group"] for r in records}, key=str)
        rng.shuffle(groups)
        n = _count(eval_split, len(groups))
        held = set(groups[:n])
        return ([r for r in records if r["group"] not in held],
                [r for r in records if r["group"] in held])
    idx = list(range(len(records)))
    rng.shuffle(idx)
    held = set(idx[: _count(eval_split, len(records))])
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def _count(split: float, n: int) -> int:
    k = int(round(split * n)) if split < 1 else int(split)
    return max(1, min(k, n - 1))
