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

__all__ = ["head_cross_entropy_sum", "head_logprobs"]

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


class _HeadLogprobs(torch.autograd.Function):
    """Per-row ``log softmax(hidden @ weight.T / T)[label]``, chunked, with lean gradients.

    d logp_i / d h_i = ((onehot(y_i) - p_i) / T) @ W is a ``[d]`` vector per row, so it is
    made in the forward pass chunk by chunk and kept (``[n, d]``, the size of the hidden
    states); the backward pass scales it by the incoming per-row gradient. When the head
    weight trains too, its gradient is rebuilt chunk by chunk in the backward pass.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk, want_entropy, entropy_grad):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        acc = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        entropy = torch.empty(n, dtype=acc, device=hidden.device) if want_entropy else None
        grad_h = torch.empty_like(hidden) if need_h else None
        ent_h = torch.empty_like(hidden) if need_h and entropy_grad else None
        for i in range(0, n, chunk):
            h, y = hidden[i : i + chunk], labels[i : i + chunk]
            z = (h @ weight.t()).to(acc)
            if temperature != 1.0:
                z.div_(temperature)
            top = z.amax(dim=1, keepdim=True)
            target = z.gather(1, y[:, None]).squeeze(1)
            p = (z - top).exp_()
            norm = p.sum(dim=1)
            lse = top.squeeze(1) + norm.log()
            logp[i : i + chunk] = target - lse
            p.div_(norm[:, None])
            if entropy is not None:
                ent = lse - (p * z).sum(dim=1)
                entropy[i : i + chunk] = ent
                if ent_h is not None:
                    # d H / d z = -p (log p + H) / T, with log p = z - lse.
                    d = z.sub_(lse[:, None]).add_(ent[:, None]).mul_(p).neg_()
                    if temperature != 1.0:
                        d.div_(temperature)
                    torch.mm(d.to(hidden.dtype), weight, out=ent_h[i : i + chunk])
            if need_h:
                # d logp / d z = (onehot - p) / T, built in place in p.
                p.neg_()
                p[torch.arange(len(y), device=p.device), y] += 1
                if temperature != 1.0:
                    p.div_(temperature)
                torch.mm(p.to(hidden.dtype), weight, out=grad_h[i : i + chunk])
        keep_w = need_w
        ctx.save_for_backward(grad_h, ent_h, hidden if keep_w else None,
                              weight if keep_w else None, labels if keep_w else None,
                              entropy if keep_w and entropy_grad else None)
        ctx.temperature, ctx.chunk, ctx.weight_dtype = temperature, chunk, weight.dtype
        if entropy is None:
            return logp, logp.new_zeros(0)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        grad_h, ent_h, hidden, weight, labels, entropy = ctx.saved_tensors
        gh = grad_h * grad_logp[:, None].to(grad_h.dtype) if grad_h is not None else None
        if ent_h is not None and grad_entropy is not None and grad_entropy.numel():
            gh = gh + ent_h * grad_entropy[:, None].to(ent_h.dtype)
        gw = None
        if weight is not None:
            acc = torch.promote_types(hidden.dtype, torch.float32)
            gw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            t = ctx.temperature
            for i in range(0, hidden.shape[0], ctx.chunk):
                h, y = hidden[i : i + ctx.chunk], labels[i : i + ctx.chunk]
                z = (h @ weight.t()).to(acc) / t
                logsm = torch.log_softmax(z, dim=1)
                p = logsm.exp()
                g = -p
                g[torch.arange(len(y), device=p.device), y] += 1
                g.mul_(grad_logp[i : i + ctx.chunk, None].to(acc) / t)
                if entropy is not None and grad_entropy is not None and grad_entropy.numel():
                    ent = entropy[i : i + ctx.chunk, None].to(acc)
                    ge = grad_entropy[i : i + ctx.chunk, None].to(acc)
                    g.sub_(p * (logsm + ent) * ge / t)
                gw.addmm_(g.t(), h.to(acc))
            gw = gw.to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None


def head_logprobs(hidden, weight, labels, temperature: float = 1.0, entropy: bool = False,
                  entropy_grad: bool = False):
    """Per-row log-probabilities of ``labels`` under ``softmax(hidden @ weight.T / temperature)``.

    Never makes an ``[n, vocab]`` tensor beyond one chunk (about 64 MiB of fp32 logits).

    Args:
        hidden: ``[n, d]`` hidden states of the positions that predict ``labels``.
        weight: ``[vocab, d]`` output-head weight (no bias).
        labels: ``[n]`` token ids.
        temperature: Divides the logits (sampling temperature; PPO trains at it too).
        entropy: Also return each row's entropy (no gradient unless ``entropy_grad``).
        entropy_grad: Let the entropies carry gradients (an entropy bonus in a loss); costs
            one more ``[n, d]`` tensor and one more head product per chunk.

    Returns:
        ``logp`` (``[n]``, float32 at least, differentiable), and with ``entropy`` the
        ``[n]`` entropies.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    chunk = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    logp, ent = _HeadLogprobs.apply(hidden, weight, labels, float(temperature), chunk,
                                    entropy or entropy_grad, entropy_grad)
    entropy = entropy or entropy_grad
    return (logp, ent) if entropy else logp
