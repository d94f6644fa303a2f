"""Samples to tensors: padded batches, packed rows, and preference pairs laid out as one row.

Packed rows carry ``position_ids`` that restart at 0 for every sample and no attention
mask; transformers then builds a block-diagonal causal mask from the position resets, so
attention never crosses a sample boundary and each token's loss equals the unpacked one.

A preference pair is one row (:func:`pair_row`, :func:`pair_batch`): the shared prompt once,
then the chosen answer, then the rejected one, blind to the chosen. :data:`PAIR_KEYS` names
the tensors of that layout and :func:`is_pair_batch` tells a pair batch from a plain one;
:class:`llamatune.net.Net` reads both.
"""

from __future__ import annotations

__all__ = ["PAIR_KEYS", "is_pair_batch", "pack", "packed_batch", "pad_batch", "pair_batch",
           "pair_row"]

PAIR_KEYS = ("input_ids", "position_ids", "attention_mask", "ends", "pred_pos", "pred_label",
             "pred_side")
"""The tensors of a pair batch (:func:`pair_batch`)."""


def is_pair_batch(batch: dict) -> bool:
    """Whether ``batch`` is laid out by :func:`pair_batch` (one row per preference pair)."""
    return "pred_side" in batch


def pad_batch(samples: list[dict], pad_id: int, keys=("input_ids", "labels")) -> dict:
    """Right-pad samples into ``input_ids``, ``labels`` (-100 on padding), ``attention_mask``.

    ``n_real`` counts the non-padding tokens.
    """
    import torch

    n = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), n), dtype=torch.long)
    for i, s in enumerate(samples):
        k = len(s["input_ids"])
        ids[i, :k] = torch.tensor(s["input_ids"])
        if "labels" in s:
            labels[i, :k] = torch.tensor(s["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "n_real": mask.sum()}


def pack(samples: list[dict], max_length: int) -> list[list[dict]]:
    """Group samples into rows of at most ``max_length`` tokens (first fit, in order).

    Returns:
        Rows, each a list of samples.
    """
    rows: list[list[dict]] = []
    room: list[int] = []
    for s in samples:
        n = len(s["input_ids"])
        for i, r in enumerate(room):
            if r >= n:
                rows[i].append(s)
                room[i] -= n
                break
        else:
            rows.append([s])
            room.append(max_length - n)
    return rows


def packed_batch(rows: list[list[dict]], pad_id: int, length: int | None = None) -> dict:
    """Concatenate each row's samples; positions restart per sample; no attention mask.

    The first label of every sample is masked: nothing before it in the row may predict it.
    Row tails are padded as one more (unsupervised) sample.
    """
    import torch

    flat = []
    for row in rows:
        ids, labels, pos = [], [], []
        for s in row:
            k = len(s["input_ids"])
            ids += s["input_ids"]
            labels += [-100] + list(s["labels"][1:])
            pos += list(range(k))
        flat.append((ids, labels, pos))
    n = length or max(len(f[0]) for f in flat)
    out_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    out_labels = torch.full((len(rows), n), -100, dtype=torch.long)
    out_pos = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (ids, labels, pos) in enumerate(flat):
        k = len(ids)
        out_ids[i, :k] = torch.tensor(ids)
        out_labels[i, :k] = torch.tensor(labels)
        out_pos[i, :k] = torch.tensor(pos)
        out_pos[i, k:] = torch.arange(n - k)
    n_real = torch.tensor(sum(len(f[0]) for f in flat))
    return {"input_ids": out_ids, "labels": out_labels, "position_ids": out_pos, "n_real": n_real}


def _shared_prefix(sample) -> int:
    """Tokens both sides of a pair share before either answer starts (the prompt)."""
    c, r = sample["chosen_ids"], sample["rejected_ids"]
    limit = min(len(c), len(r)) - 1
    for side in ("chosen", "rejected"):
        labels = sample.get(f"{side}_labels")
        if labels is not None:
            limit = min(limit, next((i for i, t in enumerate(labels) if t != -100), limit))
    n = 0
    while n < limit and c[n] == r[n]:
        n += 1
    return n


def pair_row(sample) -> dict:
    """One preference pair as one row: shared prompt, chosen answer, then rejected answer.

    The prompt is computed once for both answers: the rejected tokens take the positions they
    would have after the prompt alone and attend to the prompt and to each other, never to the
    chosen answer (the mask built by :func:`pair_batch`), so each side's hidden states are
    those of its own ``prompt + answer`` sequence.

    Returns:
        ``input_ids`` and ``position_ids`` (lists), ``split`` (where the rejected part starts),
        ``prefix`` (the shared tokens), the two ``ends`` (each answer's last token), and the
        predicted tokens: ``pred`` as ``(position, label, side)`` triples (side 0 chosen, 1
        rejected), each label predicted from the hidden state at that position.
    """
    c, r = sample["chosen_ids"], sample["rejected_ids"]
    n = _shared_prefix(sample)
    ids = list(c) + list(r[n:])
    pos = list(range(len(c))) + list(range(n, len(r)))
    pred = []
    for side, labels in ((0, sample.get("chosen_labels")), (1, sample.get("rejected_labels"))):
        if labels is None:
            continue
        for j in range(1, len(labels)):
            if labels[j] == -100:
                continue
            if side == 0:
                at = j - 1
            else:  # rejected token j sits at len(c) + j - n; its predictor is the token before
                at = len(c) + j - n - 1 if j > n else n - 1
            pred.append((at, labels[j], side))
    return {"input_ids": ids, "position_ids": pos, "split": len(c), "prefix": n,
            "ends": (len(c) - 1, len(ids) - 1), "pred": pred}


def pair_batch(rows: list[dict], pad_id: int) -> dict:
    """Pair rows (:func:`pair_row`) as one micro-batch, padded to the longest.

    Holds ``input_ids``, ``position_ids``, a boolean ``attention_mask`` ``[n, 1, T, T]``
    (causal, the rejected answer blind to the chosen one, padding masked), ``ends`` ``[n, 2]``
    (the last token of each answer, where a reward is read), ``pred_pos`` / ``pred_label`` /
    ``pred_side`` ``[n, L]`` (``-100`` labels pad) and ``n_real``. Figures computed per side
    come back as ``[2n]``, chosen rows first.
    """
    import torch

    lengths = [len(r["input_ids"]) for r in rows]
    n, t = len(rows), max(lengths)
    width = max(1, max(len(r["pred"]) for r in rows))
    ids = torch.full((n, t), pad_id, dtype=torch.long)
    pos = torch.zeros((n, t), dtype=torch.long)
    mask = torch.zeros((n, 1, t, t), dtype=torch.bool)
    ends = torch.zeros((n, 2), dtype=torch.long)
    pred_pos = torch.zeros((n, width), dtype=torch.long)
    pred_label = torch.full((n, width), -100, dtype=torch.long)
    pred_side = torch.zeros((n, width), dtype=torch.long)
    causal = torch.tril(torch.ones((t, t), dtype=torch.bool))
    for k, row in enumerate(rows):
        m = len(row["input_ids"])
        ids[k, :m] = torch.tensor(row["input_ids"])
        pos[k, :m] = torch.tensor(row["position_ids"])
        mask[k, 0, :m, :m] = causal[:m, :m]
        mask[k, 0, row["split"]:m, row["prefix"]:row["split"]] = False
        mask[k, 0, m:, :].fill_(False)
        mask[k, 0, range(m, t), range(m, t)] = True  # padding attends to itself (no NaN)
        ends[k] = torch.tensor(row["ends"])
        if row["pred"]:
            p = torch.tensor(row["pred"])
            pred_pos[k, : len(p)], pred_label[k, : len(p)], pred_side[k, : len(p)] = p.T
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask, "ends": ends,
            "pred_pos": pred_pos, "pred_label": pred_label, "pred_side": pred_side,
            "n_real": torch.tensor(sum(lengths))}
