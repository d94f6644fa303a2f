"""Batch order: one epoch's micro-batches, seeded by the epoch, sharded under a launcher.

The order depends only on ``train.seed`` and the epoch, so a resumed run sees the very
batches it would have seen; under a launcher each process keeps its slice of every *global*
micro-batch (:func:`llamatune.dist.shard`), so N processes see the batches one process would.
"""

from __future__ import annotations

import random

from llamatune import dist
from llamatune.config import TrainConfig

__all__ = ["Part", "batch_groups", "epoch_batches", "n_pairs", "pair_batches"]


class Part(list):
    """One process's sample indices of a global micro-batch (a list).

    ``dummy``: this process's share of a short last micro-batch was empty, so the part holds
    one sample of the batch only to keep the processes' forward and backward passes in step;
    the loop gives it no weight.
    """

    dummy = False


def _global_batch(tcfg: TrainConfig, shard: bool) -> int:
    """Samples a micro-batch spans: over every process when training batches are sharded."""
    return tcfg.batch_size * (dist.world().size if shard else 1)


def _parts(groups: list[list[int]], shard: bool) -> list[Part]:
    out = []
    for g in groups:
        part = Part(dist.shard(g) if shard else g)
        if not part:
            part, part.dummy = Part(g[:1]), True
        out.append(part)
    return out


def batch_groups(lengths: list[int], tcfg: TrainConfig, epoch: int,
                 shuffle: bool = True, shard: bool | None = None,
                 drop_last: bool = False) -> list[Part]:
    """Sample indices of one epoch's micro-batches, in a seeded order that depends only on the epoch.

    With ``group_by_length``, samples are sorted by length within chunks of 64 batches, so
    each batch holds similar lengths (little padding), and the batches are then shuffled so
    the order still looks random to the optimizer.

    Under a launcher the groups are *global* micro-batches of ``batch_size`` x processes
    samples, formed exactly as one process would form them at that batch size, and each
    process keeps its slice (:func:`llamatune.dist.shard`): N processes see the same global
    batches as one. ``shard`` (default: ``shuffle``, i.e. training batches) turns that off
    for evaluation, which every process runs whole. ``drop_last`` drops a short last (global)
    micro-batch instead of splitting it.
    """
    shard = shuffle if shard is None else shard
    order = list(range(len(lengths)))
    rng = random.Random(tcfg.seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    bs = _global_batch(tcfg, shard)
    groups = [order[i : i + bs] for i in range(0, len(order), bs)]
    if shuffle and tcfg.group_by_length:
        chunk = 64 * bs
        groups = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c : c + chunk], key=lambda i: lengths[i])
            groups += [part[i : i + bs] for i in range(0, len(part), bs)]
        rng.shuffle(groups)
    if drop_last:
        groups = [g for g in groups if len(g) == bs]
    return _parts(groups, shard)


def _mark(batch: dict, part: Part) -> dict:
    """Flag a dummy part's batch (see :class:`Part`) with a tensor, as stages move every value."""
    if part.dummy:
        import torch

        batch["dummy"] = torch.tensor(True)
    return batch


def epoch_batches(
    samples: list[dict], tcfg: TrainConfig, epoch: int, pad_id: int, shuffle: bool = True
) -> list[dict]:
    """The micro-batches of one epoch of conversation samples (see :func:`batch_groups`).

    Without packing, each micro-batch holds ``batch_size`` samples padded to the longest.
    With packing, samples are packed into ``max_length`` rows, ``batch_size`` rows a batch.
    """
    from llamatune.data.collate import pack, packed_batch, pad_batch

    if tcfg.packing:
        order = list(range(len(samples)))
        rng = random.Random(tcfg.seed * 1_000_003 + epoch)
        if shuffle:
            rng.shuffle(order)
        bs = _global_batch(tcfg, shuffle)
        rows = pack([samples[i] for i in order], tcfg.max_length)
        parts = _parts([list(range(i, min(i + bs, len(rows)))) for i in range(0, len(rows), bs)],
                       shuffle)
        return [_mark(packed_batch([rows[i] for i in g], pad_id), g) for g in parts]
    lengths = [len(s["input_ids"]) for s in samples]
    return [_mark(pad_batch([samples[i] for i in g], pad_id), g)
            for g in batch_groups(lengths, tcfg, epoch, shuffle)]


def pair_batches(samples: list[dict], tcfg: TrainConfig, epoch: int, pad_id: int,
                 shuffle: bool = True) -> list[dict]:
    """The micro-batches of one epoch of preference pairs, one row per pair.

    Laid out by :func:`llamatune.data.collate.pair_batch`, with ``index`` (the pairs' indices
    in ``samples``); ordered like :func:`epoch_batches` (by the pair row's length), so a
    resumed run sees the same batches.
    """
    import torch

    from llamatune.data.collate import pair_batch, pair_row

    rows = [pair_row(s) for s in samples]
    lengths = [len(r["input_ids"]) for r in rows]
    out = []
    for g in batch_groups(lengths, tcfg, epoch, shuffle):
        batch = pair_batch([rows[i] for i in g], pad_id)
        batch["index"] = torch.tensor(list(g), dtype=torch.long)
        out.append(_mark(batch, g))
    return out


def n_pairs(batch: dict) -> int:
    """Preference pairs in a :func:`pair_batches` micro-batch (one row each)."""
    return batch["input_ids"].shape[0]
