"""The one module every loss, log-probability and score goes through.

:class:`Net` holds the (peft-wrapped) causal LM and its scalar heads, and its ``forward``
does the work a stage asks for by name, so that a wrapper such as accelerate's DDP sees
every forward pass:

* ``lm_loss``: summed next-token cross-entropy over supervised positions, and their count;
* ``logprobs``: per-token log-probabilities of the supervised tokens (temperature applied),
  their per-sequence sums and counts, optionally entropies;
* ``score``: a scalar head read at each row's last real token (a reward);
* ``values``: a scalar head at every position (PPO's value function).

The output head runs only on the positions asked for, chunk by chunk
(:mod:`llamatune._head_loss`), so no ``[tokens, vocab]`` tensor outlives its chunk.
``adapter=`` runs one call with another adapter active (a frozen reference copy, a reward
adapter) or with none (``"base"``), and restores the trainable one afterwards.
"""

from __future__ import annotations

import contextlib

import torch

from llamatune.data.collate import is_pair_batch
from llamatune.model import unwrap_model

__all__ = ["BASE", "Net", "position_ids", "sequence_scores"]

BASE = "base"
"""``adapter=BASE`` runs the bare base model (every adapter disabled)."""


def position_ids(attention_mask):
    """Positions counted over real tokens, so left- and right-padded rows score alike."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Net(torch.nn.Module):
    """A causal LM (bare or with peft adapters) plus named scalar heads.

    Args:
        model: The ``transformers`` causal LM, optionally wrapped by peft.
        heads: Head name to ``ScalarHead`` (see :func:`llamatune.model.add_head`).
        chunked_head: Compute the head and loss chunk by chunk (``model.fused``); ``False``
            applies the head to the supervised positions in one go, as transformers would.
    """

    def __init__(self, model, heads: dict | None = None, chunked_head: bool = True):
        super().__init__()
        self.model = model
        self.heads = torch.nn.ModuleDict(heads or {})
        self.chunked_head = chunked_head
        self.head_by_call = False
        """Call the output head as a module, never read its weight (DeepSpeed ZeRO-3 gathers
        a weight only for its module's own forward and backward)."""

    # -- a launcher's wrapper ---------------------------------------------------------------
    def wrap(self, wrapper) -> None:
        """Send every later call of this net through ``wrapper`` (DDP: see ``llamatune.dist``).

        Stages keep calling the net they hold; each call enters the wrapper's forward (which
        calls back into this module), so gradient synchronization sees every
        forward pass. Held outside the module tree, so it is not a submodule.
        """
        self.__dict__["_wrapper"] = wrapper

    def __call__(self, *args, **kwargs):
        """Call the net (through its wrapper, when it has one)."""
        wrapper = self.__dict__.get("_wrapper")
        if wrapper is None or self.__dict__.get("_inside"):
            return super().__call__(*args, **kwargs)
        self.__dict__["_inside"] = True
        try:
            return wrapper(*args, **kwargs)
        finally:
            self.__dict__["_inside"] = False

    # -- what the ops share ------------------------------------------------------------------
    @property
    def inner(self):
        """The ``transformers`` model under peft (LoRA layers injected)."""
        return unwrap_model(self.model)

    def _hidden(self, batch: dict):
        inner = self.inner
        backbone = getattr(inner, inner.base_model_prefix)
        kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
        mask = batch.get("attention_mask")
        if mask is not None:
            # A 2-D padding mask as 0/1 integers (a float one would read as additive); a 4-D
            # boolean mask (pair rows: see llamatune.data.collate.pair_batch) goes as it is.
            kwargs["attention_mask"] = mask if mask.dim() == 4 else mask.long()
        if "position_ids" in batch:
            kwargs["position_ids"] = batch["position_ids"]
        elif mask is not None and mask.dim() == 2:
            kwargs["position_ids"] = position_ids(mask)
        return backbone(**kwargs).last_hidden_state

    @contextlib.contextmanager
    def using(self, adapter: str | None):
        """Run with adapter ``adapter`` active (``BASE``: none), then restore the active one."""
        m = self.model
        if adapter is None or not hasattr(m, "peft_config"):
            yield
            return
        if adapter == BASE:
            with m.disable_adapter():
                yield
            return
        before = m.active_adapter
        if adapter == before:
            yield
            return
        trains = any(p.requires_grad for n, p in m.named_parameters() if f".{before}." in n)
        m.set_adapter(adapter, inference_mode=True)
        try:
            yield
        finally:
            m.set_adapter(before, inference_mode=not trains)

    # -- the ops -----------------------------------------------------------------------------
    def forward(self, op: str, batch: dict, *, adapter: str | None = None, head: str = "score",
                temperature: float = 1.0, entropy: bool | str = False, values: str | None = None):
        """Run one named op (see the module docstring); ``adapter`` picks the weights.

        ``entropy=True`` with ``logprobs`` also returns each predicted position's entropy
        (detached); ``entropy="grad"`` lets it carry gradients (PPO's entropy bonus).

        ``values=HEAD`` with ``logprobs`` also returns that head's values at every position
        that predicts a token (``[n, T - 1]``, PPO's critic on the policy's hidden states).
        """
        with self.using(adapter):
            if op == "lm_loss":
                return _lm_loss(self, batch)
            if op == "logprobs":
                return _logprobs(self, batch, temperature, entropy, values)
            if op == "score":
                return _score(self, batch, head)
            if op == "values":
                return self.heads[head](self._hidden(batch))
        raise ValueError(f"unknown op {op!r}")


# -- the ops' computations (what Net.forward runs, inside its adapter switch) -------------------
def _plain_head(net: Net):
    """The output head, and whether its weight may be read directly.

    Only a bias-free ``Linear`` that need not be called as a module (ZeRO-3 gathers a weight
    only inside its module's call) is read directly, by the chunked kernels.
    """
    out = net.inner.get_output_embeddings()
    ok = not net.head_by_call and type(out) is torch.nn.Linear and out.bias is None
    return out, ok


def _lm_loss(net: Net, batch: dict):
    """``lm_loss``: summed next-token cross-entropy over supervised positions, and their count."""
    import torch.nn.functional as F

    hidden = net._hidden(batch)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    h = hidden[:, :-1][mask]
    out, plain = _plain_head(net)
    if net.chunked_head and plain:
        from llamatune._head_loss import head_cross_entropy_sum

        loss = head_cross_entropy_sum(h, out.weight, labels[mask])
    else:
        loss = F.cross_entropy(out(h).float(), labels[mask], reduction="sum")
    return loss, mask.sum()


def _predicted(hidden, batch: dict):
    """The hidden states that predict a supervised token, those tokens, the labels and mask.

    Pair rows (see :func:`llamatune.data.collate.pair_batch`) list explicit (position, label,
    side) predictions; other rows predict each next token.
    """
    if is_pair_batch(batch):
        labels = batch["pred_label"]
        mask = labels != -100
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(labels)
        return hidden[rows[mask], batch["pred_pos"][mask]], labels[mask], labels, mask
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    return hidden[:, :-1][mask], labels[mask], labels, mask


def _token_logprobs(net: Net, h, y, temperature: float, entropy: bool | str):
    """Log-probabilities of tokens ``y`` after ``h`` (and entropies, when asked for)."""
    out, plain = _plain_head(net)
    if plain:
        from llamatune._head_loss import head_logprobs

        res = head_logprobs(h, out.weight, y, temperature, entropy=bool(entropy),
                            entropy_grad=entropy == "grad")
        return res if entropy else (res, None)
    logits = out(h).float() / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(1, y[:, None]).squeeze(1)
    ent = -(logsm.exp() * logsm).sum(-1) if entropy else None
    if ent is not None and entropy != "grad":
        ent = ent.detach()
    return logp, ent


def _logprobs(net: Net, batch: dict, temperature: float, entropy: bool | str,
              values: str | None = None) -> dict:
    """``logprobs``: per-token log-probabilities, their per-sequence sums and counts."""
    hidden = net._hidden(batch)
    pairs = is_pair_batch(batch)
    h, y, labels, mask = _predicted(hidden, batch)
    logp, ent = _token_logprobs(net, h, y, temperature, entropy)
    n = labels.shape[0]
    rows = mask.nonzero()[:, 0]
    if pairs:  # per side: chosen rows first, then rejected
        rows = rows + n * batch["pred_side"][mask]
        n = 2 * n
        count = torch.zeros(n, dtype=torch.long, device=logp.device).index_add(
            0, rows, torch.ones_like(rows))
    else:
        count = mask.sum(-1)
    seq = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
    out = {"logp": logp, "seq": seq, "count": count, "mask": mask}
    if ent is not None:
        out["entropy"] = ent
    if values is not None:
        out["values"] = net.heads[values](hidden[:, :-1]).float()
    return out


def _score(net: Net, batch: dict, head: str):
    """``score``: head ``head`` read at each row's last real token (pairs: each answer's)."""
    hidden = net._hidden(batch)
    if is_pair_batch(batch):  # pair rows: each answer's last token, chosen rows first
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        ends = batch["ends"]
        h = torch.cat([hidden[rows, ends[:, 0]], hidden[rows, ends[:, 1]]])
        return net.heads[head](h).float()
    mask = batch["attention_mask"].long()
    steps = torch.arange(mask.shape[1], device=mask.device)
    last = (steps * mask).argmax(-1)
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return net.heads[head](h).float()


def sequence_scores(net: Net, input_ids, attention_mask, head: str = "score",
                    adapter: str | None = None):
    """One scalar per row from head ``head``, read at the row's last real token.

    The last real token is the rightmost position where ``attention_mask`` is 1, so left and
    right padding both work and the pad id is never consulted; positions count real tokens
    only, so a padded row scores exactly as it would alone.

    Returns:
        A float32 tensor of shape ``(batch,)``.
    """
    return net("score", {"input_ids": input_ids, "attention_mask": attention_mask}, head=head,
               adapter=adapter)
