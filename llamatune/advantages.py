"""The arithmetic of PPO, RLOO and GRPO on per-token tensors: KL, advantages, losses.

Everything works on ``[sequences, response_tokens]`` tensors with a ``mask`` that is 1 on
real response tokens (responses are right-aligned to their prompts, padded after their end).

* KL against the reference, per token: ``k1 = logp - logp_ref`` (in the reward) and
  ``k3 = exp(ref - logp) - (ref - logp) - 1`` (logged: unbiased, always >= 0);
* :func:`gae`: generalized advantage estimation (Schulman et al., 2016) with ``gamma`` and
  ``lam`` over the real tokens of each response;
* :func:`group_advantages`: RLOO (each completion against the mean of the other ``k - 1`` of
  its prompt; Ahmadian et al., 2024) and GRPO (standardized within the group; Shao et al.,
  2024), one advantage per sequence;
* :func:`whiten`: zero mean, unit variance over the real tokens only;
* :func:`policy_loss` (clipped, with the clip fraction and approximate KL) and
  :func:`value_loss` (clipped around the rollout's values);
* :class:`AdaptiveKL`: the proportional controller of Ziegler et al. (2019).
"""

from __future__ import annotations

import math

import torch

__all__ = ["AdaptiveKL", "gae", "group_advantages", "kl_k3", "masked_mean",
           "policy_loss", "value_loss", "whiten"]


def masked_mean(x, mask, dim=None):
    """Mean of ``x`` over the positions where ``mask`` is 1."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def kl_k3(logp, ref):
    """Per-token ``exp(r) - r - 1`` with ``r = log p_ref - log p`` (>= 0, unbiased)."""
    r = ref - logp
    return torch.expm1(r) - r


def whiten(x, mask):
    """Zero mean and unit variance over the real positions; padding stays 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask.to(x.dtype)


def gae(rewards, values, mask, gamma: float, lam: float):
    """Advantages and returns by GAE over each response's real tokens.

    Args:
        rewards: ``[n, T]`` per-token rewards.
        values: ``[n, T]`` value estimates of the state before each token.
        mask: ``[n, T]`` 1 on real tokens (a prefix of each row).
        gamma: Discount.
        lam: GAE's lambda.

    Returns:
        ``(advantages, returns)``, ``[n, T]``, 0 on padding.
    """
    m = mask.to(values.dtype)
    n, t = rewards.shape
    adv = torch.zeros_like(values)
    last = torch.zeros(n, dtype=values.dtype, device=values.device)
    for i in reversed(range(t)):
        nxt = values[:, i + 1] * m[:, i + 1] if i + 1 < t else torch.zeros_like(last)
        delta = rewards[:, i] + gamma * nxt - values[:, i]
        last = (delta + gamma * lam * last) * m[:, i]
        adv[:, i] = last
    return adv, (adv + values) * m


def group_advantages(scores, k: int, kind: str):
    """One advantage per sequence from the other completions of the same prompt.

    Args:
        scores: ``[n]`` sequence rewards, ``k`` consecutive completions per prompt.
        k: Completions per prompt.
        kind: ``rloo`` (leave-one-out mean baseline) or ``grpo`` (group-standardized).

    Returns:
        ``[n]`` advantages.
    """
    g = scores.view(-1, k)
    if kind == "rloo":
        baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
        return (g - baseline).reshape(-1)
    if kind == "grpo":
        return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(-1)
    raise ValueError(f"unknown group advantage {kind!r}")


def policy_loss(logp, old_logp, advantages, mask, cliprange: float):
    """The clipped surrogate, averaged over real tokens, and its figures.

    Returns:
        ``(loss, clipfrac, approx_kl, ratio_mean)``; only ``loss`` carries gradients.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
        ratio_mean = masked_mean(ratio, mask)
    return loss, float(clipfrac), float(approx_kl), float(ratio_mean)


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """The clipped value loss ``0.5 * max((v - R)^2, (v_clip - R)^2)`` over real tokens."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return masked_mean(loss, mask)


class AdaptiveKL:
    """The KL coefficient of Ziegler et al. (2019): nudged towards a target KL.

    Args:
        coef: Starting coefficient.
        target: Target mean KL per sequence (``None``: the coefficient stays fixed).
        horizon: Sequences over which an error of 100% halves or doubles it.
    """

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        """Move the coefficient after a batch of ``n`` sequences with mean KL ``kl``."""
        if self.target is None or not math.isfinite(kl):
            return
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.coef *= 1.0 + error * n / self.horizon
