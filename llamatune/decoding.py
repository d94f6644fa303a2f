"""The decoder: batched sampling or greedy decoding with the KV cache.

One decoder serves ``generate``, ``chat``, ``export``'s check and PPO's rollouts.
:func:`generate` left-pads the prompts, samples (or decodes greedily) with the KV cache on,
even when training uses gradient checkpointing (the model is put in eval mode for it), and
cuts every response after its first stop token (the template's end token(s)): a response
that reaches ``max_new_tokens`` without one is *not ended* (PPO can penalize it). What PPO
then makes of the responses is :mod:`llamatune.experience`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Responses", "generate", "sample_next"]


@dataclass
class Responses:
    """What :func:`generate` returns, one entry per prompt row, in order."""

    ids: list[list[int]]
    """Response token ids, the stop token included when there is one."""
    ended: list[bool]
    """Whether the response ended with a stop token (within ``max_new_tokens``)."""
    text: list[str]
    """The responses decoded, stop and special tokens dropped, stripped."""


def sample_next(logits, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False):
    """Pick one token per row from ``[n, vocab]`` logits.

    Greedy, or sampled at ``temperature`` within the ``top_p`` nucleus by inverse CDF: one
    uniform draw a row from torch's global generator, where ``torch.multinomial`` draws one per
    vocabulary entry.
    """
    import torch

    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        sorted_p = sorted_p.masked_fill(cum - sorted_p > top_p, 0.0)  # keep the top-p nucleus
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def generate(model, tokenizer, prompts: list[list[int]], *, stop_ids: list[int],
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             greedy: bool = False, batch_size: int | None = None,
             synced: bool = False) -> Responses:
    """Sample (or greedily decode) one response per prompt, with the KV cache.

    A plain decoding loop over the model's forward (positions counted over real tokens, the
    head applied to the last position only), so sampling is the cheap inverse-CDF draw of
    :func:`sample_next` rather than a random number per vocabulary entry.

    Args:
        model: The causal LM (peft-wrapped: its active adapter generates).
        tokenizer: Its tokenizer (for the pad id).
        prompts: Prompt token ids (ending with the open assistant turn).
        stop_ids: Token ids that end a response.
        max_new_tokens: Longest response.
        temperature: Sampling temperature (ignored when ``greedy``).
        top_p: Nucleus sampling (ignored when ``greedy``).
        greedy: Decode greedily.
        batch_size: Prompts per decoding batch (``None``: all at once).
        synced: Decode until every process's batch is done, so each process runs the same
            number of forward passes (DeepSpeed ZeRO-3 gathers each layer's weights from all
            processes inside its forward). Every process must call with as many prompts.

    Returns:
        The :class:`Responses`, in the order of ``prompts``. Sampling draws from torch's
        global generator: seed it for reproducible rollouts.
    """
    import torch

    from llamatune.model import unwrap_model

    pad = tokenizer.pad_token_id
    if pad is None:  # a bare tokenizer: padding is masked out, any id will do
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    was_training = model.training
    model.eval()
    ids_out, ended_out = [], []
    step = batch_size or len(prompts)
    device = next(model.parameters()).device
    stops = torch.tensor(list(stop_ids), device=device)
    inner = unwrap_model(model)
    decoder, head = getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()
    try:
        for start in range(0, len(prompts), step):
            with torch.no_grad():
                tokens = _decode(decoder, head, prompts[start : start + step], pad, stops,
                                 max_new_tokens, (temperature, top_p, greedy), synced)
            for row in tokens.tolist():
                cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
                ids_out.append(row[: cut + 1] if cut is not None else row)
                ended_out.append(cut is not None)
    finally:
        model.train(was_training)
    text = [tokenizer.decode([t for t in r if t not in stop_ids], skip_special_tokens=True).strip()
            for r in ids_out]
    return Responses(ids_out, ended_out, text)


def _decode(decoder, head, part: list[list[int]], pad: int, stops, max_new_tokens: int,
            sampling: tuple, synced: bool):
    """``[n, steps]`` new tokens for one batch of prompts (pad after a row's stop token).

    Args:
        decoder: The model's decoder stack (its ``base_model_prefix`` module).
        head: Its output embeddings.
        part: The prompts, left-padded here.
        pad: The pad id.
        stops: The stop ids, as a tensor on the device.
        max_new_tokens: Longest response.
        sampling: ``(temperature, top_p, greedy)`` for :func:`sample_next`.
        synced: Decode until every process's batch is done (see :func:`generate`).
    """
    import torch

    from llamatune import dist

    device = stops.device
    width = max(len(p) for p in part)
    ids = torch.full((len(part), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(part), width), dtype=torch.long, device=device)
    for i, p in enumerate(part):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    done = torch.zeros(len(part), dtype=torch.bool, device=device)
    out_tokens = []
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    # transformers renamed the cache ``past_key_values`` -> ``cache`` (5.2x): pass it back
    # under the name this version returned it by.
    name = "cache" if "cache" in out.keys() else "past_key_values"
    for _ in range(max_new_tokens):
        # The head on the last position only (a contiguous [n, d]: a strided slice sends
        # torch's linear down a batched path that copies the head per row).
        logits = head(out.last_hidden_state[:, -1].contiguous())
        nxt = sample_next(logits, *sampling)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out_tokens.append(nxt)
        done |= torch.isin(nxt, stops)
        if len(out_tokens) == max_new_tokens:
            break
        if synced:  # stop when every process's batch is done
            if dist.all_sum([float(not bool(done.all()))])[0] == 0:
                break
        elif bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = decoder(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                      use_cache=True, **{name: out[name]})
    return torch.stack(out_tokens, dim=1)
