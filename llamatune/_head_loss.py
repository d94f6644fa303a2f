"""Summed next-token cross-entropy through a frozen output head, chunk by chunk.

The usual ``F.cross_entropy(head(h), y)`` keeps an ``[n, vocab]`` fp32 log-softmax for the
backward pass and makes two more of that size when it runs (the loss gradient and the logits
gradient). Here the gradient with respect to ``h`` (and the head weight, when it trains) is
computed in the forward pass, ``chunk`` positions at a time, so no ``[n, vocab]`` tensor
outlives its chunk, and the backward pass only scales the stored gradient. Same FLOPs, fewer
passes over the logits, and the loss is the same to rounding.
"""

from __future__ import annotations

import torch

__all__ = ["head_cross_entropy_sum"]

# Positions per chunk: about 2**24 fp32 logits (64 MiB) at a time.
_CHUNK_ELEMENTS = 1 << 24


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        acc = torch.promote_types(hidden.dtype, torch.float32)  # logits in fp32 at least
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            h, y = hidden[i : i + chunk], labels[i : i + chunk]
            z = (h @ weight.t()).to(acc)
            target = z.gather(1, y[:, None]).squeeze(1)
            top = z.amax(dim=1, keepdim=True)
            z.sub_(top).exp_()
            norm = z.sum(dim=1)
            total += (top.squeeze(1) + norm.log() - target).sum()
            if need_h or need_w:
                # d(sum of losses)/d(logits) = softmax - one_hot(label), built in place.
                z.div_(norm[:, None])
                z[torch.arange(len(y), device=z.device), y] -= 1
                g = z.to(hidden.dtype)
                if need_h:
                    torch.mm(g, weight, out=grad_h[i : i + chunk])
                if need_w:
                    grad_w.addmm_(g.t().to(acc), h.to(acc))
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def head_cross_entropy_sum(hidden, weight, labels):
    """``F.cross_entropy(hidden @ weight.T, labels, reduction="sum")`` without ``[n, vocab]`` tensors.

    Args:
        hidden: ``[n, d]`` hidden states of the supervised positions.
        weight: ``[vocab, d]`` output-head weight (no bias).
        labels: ``[n]`` next-token ids (no ``-100``: select the positions first).

    Returns:
        The summed loss, a scalar in float32 (float64 for float64 inputs).
    """
    chunk = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    return _HeadCrossEntropy.apply(hidden, weight, labels, chunk)
