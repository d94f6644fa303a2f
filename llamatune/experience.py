"""PPO's experience: a rollout, what scoring it gives, and the tensors both are laid out in.

A :class:`Rollout` is what the policy sampled for one iteration's prompts, laid out by
:func:`response_batch` (prompt + response right-padded, the response tokens supervised, so
:class:`llamatune.net.Net`'s ``logprobs`` scores every token as it was sampled: positions
count real tokens). :func:`score` runs the policy (old log-probs, entropy, values) and the
reference over it in the update's own mini-batches; :func:`shape_scores` turns the raw
rewards into the ones trained on; :func:`advantages_of` makes the :class:`Scored` experience
(GAE with a value head, or RLOO / GRPO over each prompt's answers: :mod:`llamatune.advantages`).
Every per-token tensor is ``[sequences, response_tokens]``, zero off the response.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["Rollout", "RewardNorm", "Scored", "advantages_of", "dense", "minibatch",
           "partition", "response_batch", "score", "shape_scores"]


@dataclass
class Rollout:
    """What the policy sampled for one iteration, one row per answer."""

    rows: list[dict]
    """The prompt samples answered (each prompt ``ppo.k`` times in a row)."""
    batch: dict
    """:func:`response_batch` of prompts and responses."""
    mask: object
    """``[n, T]`` bool: the response tokens (``labels[:, 1:] != -100``)."""
    text: list[str]
    """The responses decoded."""
    ids: list[list[int]]
    """The response token ids."""
    ended: list[bool]
    """Whether each response ended with a stop token."""


@dataclass
class Scored:
    """A rollout scored: the tensors the PPO update reads, ``[n, T]`` unless said."""

    old: object
    """The sampling policy's log-probs (filled by the update itself in one-pass mode)."""
    ref: object | None
    """The reference's log-probs (``None`` when nothing needs them)."""
    values: object
    """The value head's estimates (GAE; zeros otherwise)."""
    entropy: object
    """The policy's per-token entropy."""
    adv: object
    """Advantages."""
    returns: object
    """Value targets (GAE; zeros otherwise)."""
    scores: object
    """``[n]`` the raw rewards."""
    shaped: object
    """``[n]`` the rewards trained on (penalized, clipped, normalized)."""
    kl: object
    """``old - ref`` on the response tokens."""


def response_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """Right-padded ``prompt + response`` rows, the response tokens supervised.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (``-100`` but on response tokens) and
        ``n_real``; rows in the order given.
    """
    from llamatune.data.collate import pad_batch

    rows = [{"input_ids": p + r, "labels": [-100] * len(p) + list(r)}
            for p, r in zip(prompts, responses)]
    return pad_batch(rows, pad_id)


def dense(flat, mask):
    """Per-token values in the order :class:`~llamatune.net.Net` returns them, as ``[n, T]``.

    Args:
        flat: ``[tokens]`` values of the supervised positions, row-major.
        mask: ``[n, T]`` the supervised positions (``labels[:, 1:] != -100``).

    Returns:
        ``[n, T]`` with zeros elsewhere.
    """
    import torch

    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out[mask] = flat
    return out


def partition(n: int, size: int, seed: int) -> list[list[int]]:
    """``n`` rows in seeded mini-batches of ``size`` (each sorted), the update's partition."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [sorted(order[i : i + size]) for i in range(0, n, size)]


def minibatch(batch: dict, idx, device) -> tuple[dict, int]:
    """Rows ``idx`` of a rollout batch, cut to their longest row, on ``device``.

    Returns:
        The mini-batch and the width of its per-token tensors (its length minus one).
    """
    width = int(batch["attention_mask"][idx].sum(-1).max())
    return {k: v[idx][:, :width].to(device) for k, v in batch.items()
            if k in ("input_ids", "attention_mask", "labels")}, width - 1


def score(net, roll: Rollout, parts, *, temperature: float, reference: str | None,
          value_head: str | None, policy: bool, need_ref: bool, device) -> dict:
    """The policy's and the reference's log-probs over a rollout, in the update's parts.

    Args:
        net: The :class:`~llamatune.net.Net`.
        roll: The rollout.
        parts: Its mini-batches (:func:`partition`).
        temperature: The sampling temperature (log-probs are of the tempered policy).
        reference: The reference adapter (``None``: the base).
        value_head: The value head to read (GAE), or ``None``.
        policy: Score the policy (not in one-pass mode, where the update does).
        need_ref: Score the reference.
        device: Where the net runs.

    Returns:
        ``old``, ``ref``, ``values`` and ``entropy``, ``[n, T]`` on the CPU (zeros where not
        scored).
    """
    import torch

    mask = roll.mask
    n, t = mask.shape
    out = {k: torch.zeros(n, t) for k in ("old", "ref", "values", "entropy")}
    with torch.no_grad():
        for idx in parts:
            mb, w = minibatch(roll.batch, idx, device)
            m = mask[idx, :w]
            if policy:
                o = net("logprobs", mb, temperature=temperature, entropy=True, values=value_head)
                out["old"][idx, :w] = dense(o["logp"].float().cpu(), m)
                out["entropy"][idx, :w] = dense(o["entropy"].float().cpu(), m)
                if value_head is not None:
                    out["values"][idx, :w] = o["values"].float().cpu() * m
            if need_ref:
                r = net("logprobs", mb, adapter=reference, temperature=temperature)
                out["ref"][idx, :w] = dense(r["logp"].float().cpu(), m)
    return out


class RewardNorm:
    """Running mean and spread of every reward seen (Welford), for ``ppo.reward_norm``.

    Args:
        stats: ``[count, mean, M2]`` to continue from (a checkpoint's).
    """

    def __init__(self, stats: list[float] | None = None):
        self.stats = list(stats) if stats is not None else [0.0, 0.0, 0.0]

    def __call__(self, scores):
        """``scores`` standardized by the statistics of every reward so far, these included."""
        n, mean, m2 = self.stats
        for x in scores.tolist():
            n += 1
            d = x - mean
            mean += d / n
            m2 += d * (x - mean)
        self.stats = [n, mean, m2]
        std = math.sqrt(m2 / max(n - 1, 1)) if n > 1 else 1.0
        return (scores - mean) / (std + 1e-6)


def shape_scores(raw: list[float], ended: list[bool], p, norm: RewardNorm):
    """The rewards trained on: ``ppo.missing_eos_penalty``, ``reward_clip``, ``reward_norm``.

    Returns:
        ``(raw, shaped)`` as ``[n]`` float32 tensors.
    """
    import torch

    scores = torch.tensor(raw, dtype=torch.float32)
    raw_t = scores.clone()
    if p.missing_eos_penalty is not None:
        scores = scores + p.missing_eos_penalty * (~torch.tensor(ended)).float()
    if p.reward_clip is not None:
        scores = scores.clamp(-p.reward_clip, p.reward_clip)
    if p.reward_norm:
        scores = norm(scores)
    return raw_t, scores


def advantages_of(logps: dict, raw, shaped, mask, p, kl_coef: float, gae: bool,
                  need_ref: bool) -> Scored:
    """The :class:`Scored` experience: KL penalty in the reward, advantages and returns.

    Args:
        logps: :func:`score`'s tensors.
        raw: ``[n]`` raw rewards.
        shaped: ``[n]`` rewards trained on.
        mask: ``[n, T]`` response tokens.
        p: ``ppo.*``.
        kl_coef: The KL penalty's coefficient now (adaptive or fixed).
        gae: GAE with the value head; else RLOO / GRPO (``ppo.advantage``) over ``ppo.k``.
        need_ref: Whether the reference was scored.
    """
    import torch

    old, ref, values = logps["old"], logps["ref"], logps["values"]
    n = mask.shape[0]
    kl = (old - ref) * mask
    if gae:
        from llamatune.advantages import gae as gae_fn
        from llamatune.advantages import whiten

        rewards = -kl_coef * kl
        last = mask.float().cumsum(-1).argmax(-1)  # each response's last token
        rewards[torch.arange(n), last] += shaped
        adv, returns = gae_fn(rewards, values, mask, p.gamma, p.lam)
        adv = whiten(adv, mask)
    else:
        from llamatune.advantages import group_advantages

        seq = shaped - kl_coef * kl.sum(-1)
        adv = group_advantages(seq, p.k, p.advantage)[:, None] * mask
        returns = torch.zeros_like(adv)
    return Scored(old=old, ref=ref if need_ref else None, values=values,
                  entropy=logps["entropy"], adv=adv, returns=returns, scores=raw,
                  shaped=shaped, kl=kl)
