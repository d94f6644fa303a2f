"""Samples to tensors: padded batches, and packed rows whose samples never see each other.

Packed rows carry ``position_ids`` that restart at 0 for every sample and no attention
mask; transformers then builds a block-diagonal causal mask from the position resets, so
attention never crosses a sample boundary and each token's loss equals the unpacked one.
"""

from __future__ import annotations

__all__ = ["pack", "pad_batch", "packed_batch"]


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
