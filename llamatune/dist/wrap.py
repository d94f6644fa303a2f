"""The net wrapped for the launcher's scheme, and what a wrapped net needs around it.

* :func:`prepare` -- DDP (every call of the net then goes through the wrapper,
  :meth:`llamatune.net.Net.wrap`), FSDP2 (torch's ``fully_shard`` on each decoder layer and
  on the net, in place) or DeepSpeed's engine (ZeRO-2, ZeRO-3);
* :func:`full_params` -- whole weights for generation (FSDP2);
* :func:`whole_trainables`, :func:`whole` -- whole trainable weights for saving (FSDP2,
  ZeRO-3), held by the :class:`~llamatune.dist.World`;
* :func:`backward`, :func:`step`, :func:`no_sync` -- a backward pass, an optimizer step and
  an accumulation window, which DeepSpeed's engine takes over under ZeRO.
"""

from __future__ import annotations

import contextlib

from llamatune.dist import _private
from llamatune.dist.optim_state import adam_state_now
from llamatune.dist.processes import Fsdp, World, current, world
from llamatune.errors import UserError

__all__ = ["backward", "full_params", "no_sync", "prepare", "step", "whole", "whole_trainables"]


def prepare(net, optimizer=None, *, batch_size: int = 1, max_grad_norm: float = 0.0):
    """Wrap ``net`` for the launcher's scheme and route every call of it through the wrapper.

    Args:
        net: The :class:`llamatune.net.Net`.
        optimizer: Under DeepSpeed, the optimizer the engine takes over (built before this
            call); otherwise ``None``, and the optimizer is built after, on the wrapped
            parameters (FSDP2 replaces them with shards).
        batch_size: The engine's micro-batch (``train.batch_size``; DeepSpeed only).
        max_grad_norm: The engine's gradient clipping (``train.max_grad_norm``; DeepSpeed).

    Returns:
        The DDP wrapper, the DeepSpeed engine, ``net`` itself sharded in place (FSDP2), or
        ``net`` when alone. ``net`` stays the object stages hold: its ``model``, ``heads`` and
        ops are unchanged, and its calls reach the wrapper's forward.
    """
    w = world()
    if w.accelerator is None:
        return net
    if w.fsdp is not None:
        return _fully_shard(net, w.fsdp)
    if w.zero is not None:
        return _deepspeed(net, optimizer, w, batch_size, max_grad_norm)
    wrapped = w.accelerator.prepare_model(net)
    if wrapped is not net:
        net.wrap(wrapped)
    return wrapped


def _same_trainables(net) -> None:
    """Make every process's trainable weights rank 0's (as DDP does when it wraps).

    Sharding keeps each process's own slice, so the processes must start from the same
    weights: the base comes from the same files, the trainable ones (seeded LoRA, heads)
    are made equal here.
    """
    import torch

    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                torch.distributed.broadcast(p.data, src=0)


def _deepspeed(net, optimizer, w: World, batch_size: int, max_grad_norm: float):
    """The DeepSpeed engine over ``net`` and ``optimizer``, every call of the net through it."""
    if optimizer is None:
        raise ValueError("DeepSpeed needs the optimizer at prepare time")
    from llamatune import fused

    _same_trainables(net)
    fused.cache_casts(False)  # the engine copies updated weights in without a version bump
    config = w.accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = int(batch_size)
    config["gradient_accumulation_steps"] = 1  # llamatune's loop accumulates (see llamatune.dist)
    config["train_batch_size"] = int(batch_size) * w.size
    config["gradient_clipping"] = float(max_grad_norm)
    # ZeRO-3 gathers a weight for its module's forward and backward only; the chunked head
    # reads the output head's weight outside it, so the head is called as a module instead.
    net.head_by_call = w.zero == 3
    engine, _ = w.accelerator.prepare(net, optimizer)
    net.wrap(engine)
    w.engine = engine
    adam_state_now(optimizer, engine.optimizer)
    return engine


def _fully_shard(net, fsdp: Fsdp):
    """FSDP2 on ``net``: each decoder layer one unit, the rest (embeddings, head) the root's."""
    from torch.distributed.fsdp import fully_shard

    from llamatune import fused

    _same_trainables(net)
    fused.cache_casts(False)
    names = set(getattr(net.inner, "_no_split_modules", None) or () if fsdp.layers is None
                else fsdp.layers)
    units = [m for m in net.modules() if type(m).__name__ in names]
    if fsdp.layers and not units:
        found = sorted({type(m).__name__ for m in net.modules() if "Layer" in type(m).__name__})
        raise UserError(f"the accelerate config's fsdp_transformer_layer_cls_to_wrap: no "
                        f"{', '.join(sorted(names))} in this model (its layers: "
                        f"{', '.join(found) or 'none'}).")
    for m in units:
        fully_shard(m, reshard_after_forward=fsdp.reshard_after_forward)
    fully_shard(net, reshard_after_forward=fsdp.reshard_after_forward)
    # FSDP2 takes the first module to run forward as its root; a rollout calls a decoder
    # layer before the net ever runs, so fix the net as the root now.
    _private.fsdp_fix_root(net)
    return net


def _fsdp_modules(module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_params(module):
    """Whole parameters in ``module`` for the body, on every process (FSDP2); else nothing.

    For what calls only part of the net, outside its forward: generation (each process a
    different number of decoding steps, so no layer may gather again). Every process must
    enter it together. (Saving needs only :func:`whole_trainables`. Under ZeRO-3, the other
    scheme that shards weights, PPO's processes decode in step instead, each layer gathering
    inside its forward, so it needs nothing here.)
    """
    mods = _fsdp_modules(module)
    if not mods:
        yield
        return
    after = world().fsdp.reshard_after_forward
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            # As :func:`_fully_shard` left them; the root (the net) keeps its weights from
            # forward to backward, as FSDP2 sets a root.
            m.set_reshard_after_forward(after and m is not module, recurse=False)


@contextlib.contextmanager
def whole_trainables(module):
    """Whole copies of ``module``'s trainable parameters for the body, on every process.

    For saving (adapters, heads, checkpoints): :func:`whole` then returns a sharded trainable
    parameter's whole copy. Only what trains is gathered, so a sharded frozen base stays
    sharded. A collective under FSDP2 and ZeRO-3: every process must enter it together.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    w = world()
    copies = {}
    if w.zero == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            copies = {id(p): p.detach().clone() for p in params}
    elif w.fsdp is not None:
        copies = {id(p): p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
                  for p in params}
    w.whole_copies.update(copies)
    try:
        yield
    finally:
        for k in copies:
            w.whole_copies.pop(k, None)


def whole(param):
    """``param``'s whole copy inside :func:`whole_trainables`, else ``param`` itself."""
    w = current()  # never sets the world up: saving alone needs none
    return param if w is None else w.whole_copies.get(id(param), param)


def backward(wrapped, loss, boundary: bool = True) -> None:
    """``loss.backward()``, or the DeepSpeed engine's backward.

    Args:
        wrapped: What :func:`prepare` returned.
        loss: A scalar already normalized for the whole step (no further scaling).
        boundary: Whether this is the last backward before the optimizer step (ZeRO-2
            reduces the window's gradients there).
    """
    w = world()
    if w.zero is None:
        loss.backward()
        return
    wrapped.set_gradient_accumulation_boundary(boundary)
    wrapped.backward(loss, scale_wrt_gas=False)
    w.open_window = not boundary


def step(wrapped, params: list) -> float | None:
    """The DeepSpeed engine's optimizer step (clipping included); returns the gradient norm.

    A window whose last backward was not marked (a PPO window cut short by skipped parts) is
    closed first with a zero-valued backward, so ZeRO-2 reduces what it accumulated.
    """
    w = world()
    if w.open_window and w.zero == 2:
        backward(wrapped, sum((p * 0).sum() for p in params), boundary=True)
    w.open_window = False
    wrapped.set_gradient_accumulation_boundary(True)
    wrapped.step()
    norm = wrapped.get_global_grad_norm()
    return None if norm is None else float(norm)


def no_sync(wrapped, enabled: bool = True):
    """A context in which backward passes accumulate without synchronizing gradients.

    ``enabled=False`` (the last backward of an accumulation window) synchronizes as usual.
    """
    if not enabled or world().zero is not None:  # ZeRO: the window's boundary (see backward)
        return contextlib.nullcontext()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(wrapped)
    if not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
