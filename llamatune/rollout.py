"""Rollouts: batched generation from prompts, and the batches that score what was generated.

:func:`generate` left-pads the prompts, samples (or decodes greedily) with the KV cache on,
even when training uses gradient checkpointing (the model is put in eval mode for it), and
cuts every response after its first stop token (the template's end token(s)): a response
that reaches ``max_new_tokens`` without one is *not ended* (PPO can penalize it).

:func:`response_batch` lays prompt + response out right-padded, the response tokens
supervised, for :class:`llamatune.net.Net`'s ``logprobs`` (and values): positions are
counted over real tokens, so every token scores as it did when it was sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Responses", "dense", "generate", "response_batch"]


@dataclass
class Responses:
    """What :func:`generate` returns, one entry per prompt row, in order."""

    ids: list[list[int]]
    """Response token ids, the stop token included when there is one."""
    ended: list[bool]
    """Whether the response ended with a stop token (within ``max_new_tokens``)."""


def generate(model, tokenizer, prompts: list[list[int]], *, stop_ids: list[int],
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             greedy: bool = False, batch_size: int | None = None) -> Responses:
    """Sample (or greedily decode) one response per prompt.

    Args:
        model: The causal LM (peft-wrapped: its active adapter generates).
        tokenizer: Its tokenizer (for the pad id).
        prompts: Prompt token ids (ending with the open assistant turn).
        stop_ids: Token ids that end a response.
        max_new_tokens: Longest response.
        temperature: Sampling temperature (ignored when ``greedy``).
        top_p: Nucleus sampling (ignored when ``greedy``).
        greedy: Decode greedily.
        batch_size: Prompts per ``generate`` call (``None``: all at once).

    Returns:
        The :class:`Responses`, in the order of ``prompts``. Sampling draws from torch's
        global generator: seed it for reproducible rollouts.
    """
    import torch

    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    ids_out, ended_out = [], []
    step = batch_size or len(prompts)
    try:
        for start in range(0, len(prompts), step):
            part = prompts[start : start + step]
            width = max(len(p) for p in part)
            ids = torch.full((len(part), width), pad, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, p in enumerate(part):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            device = next(model.parameters()).device
            kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
                          pad_token_id=pad, use_cache=True)
            if greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     **kwargs)
            for row in out[:, width:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
                ids_out.append(row[: cut + 1] if cut is not None else row[:max_new_tokens])
                ended_out.append(cut is not None)
    finally:
        model.train(was_training)
    return Responses(ids_out, ended_out)


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
