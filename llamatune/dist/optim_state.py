"""The optimizer's state as one process holds it, under any scheme.

Checkpoints hold the whole AdamW moments, one tensor per parameter, in the one-process
format (``optimizer.state_dict()``'s structure), whatever scheme wrote them and whatever
scheme reads them back: :func:`optimizer_state` makes FSDP2's shards (DTensors) and ZeRO's
flat partitions whole (DeepSpeed's ``safe_get_full_optimizer_state``; never DeepSpeed's
pickled checkpoint files), and :func:`load_optimizer_state` hands each process its part.
:func:`adam_state_now` creates AdamW's state for a DeepSpeed engine as soon as it is made, so
that a checkpoint can be read and written before the first step.
"""

from __future__ import annotations

from llamatune.dist import _private
from llamatune.dist.processes import world

__all__ = ["adam_state_now", "load_optimizer_state", "optimizer_state"]

_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def adam_state_now(optimizer, zero_optimizer) -> None:
    """Create AdamW's state for the engine's flat partitions now, as torch would (zeros).

    torch creates it at the first step, group by group; ZeRO-2 maps each parameter onto its
    moments right after the first group's step, so a second group (biases and norms, without
    weight decay) would be mapped before its moments exist and stay unreadable for
    checkpoints. ZeRO-3 hands its partitions to the optimizer only while it steps, so they are
    asked of it; ZeRO-2's stay in the parameter groups.

    Args:
        optimizer: The torch AdamW the engine steps.
        zero_optimizer: The engine's ZeRO optimizer (``engine.optimizer``).
    """
    import torch

    flats = _private.zero3_flat_partitions(zero_optimizer) or [
        p for g in optimizer.param_groups for p in g["params"]]
    for flat in flats:
        st = optimizer.state[flat]
        if not st:  # as torch.optim.AdamW makes it (not fused, not capturable)
            st["step"] = torch.tensor(0.0)
            for k in _ADAM_MOMENTS:
                st[k] = torch.zeros_like(flat, memory_format=torch.preserve_format)


def _full_state(state):
    """``state`` (nested dicts and lists) with every FSDP2 shard (a DTensor) made whole."""
    if isinstance(state, dict):
        return {k: _full_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_full_state(v) for v in state)
    if hasattr(state, "full_tensor"):
        return state.full_tensor()
    return state


def _local_like(param, full):
    """``full`` (a whole tensor) sharded as ``param`` is: its local part, or ``full`` itself."""
    if not hasattr(param, "device_mesh") or getattr(full, "shape", None) != param.shape:
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None)


def optimizer_state(optimizer, groups: list[list]) -> dict:
    """The optimizer's state as one process would hold it: whole tensors, one per parameter.

    A collective under FSDP2 and ZeRO: every process calls it.

    Args:
        optimizer: The torch AdamW the loop built (under ZeRO, the one the engine steps).
        groups: Its parameter groups as built, before any wrapper saw them.

    Returns:
        ``optimizer.state_dict()``'s structure (``state`` by parameter index, ``param_groups``).
    """
    if world().zero is None:
        return _full_state(optimizer.state_dict())
    from deepspeed.utils import safe_get_full_optimizer_state

    steps = [st["step"] for st in optimizer.state.values() if "step" in st]
    state, param_groups, idx = {}, [], 0
    for group, params in zip(optimizer.param_groups, groups):
        ids = []
        for p in params:
            moments = {k: safe_get_full_optimizer_state(p, k) for k in _ADAM_MOMENTS}
            if steps and all(v is not None for v in moments.values()):
                shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3: the whole shape, not (0,)
                state[idx] = {"step": steps[0].clone(),
                              **{k: v.detach().cpu().reshape(shape) for k, v in moments.items()}}
            ids.append(idx)
            idx += 1
        param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": param_groups}


def load_optimizer_state(optimizer, groups: list[list], sd: dict) -> None:
    """Load what :func:`optimizer_state` returned (a checkpoint) into this process's optimizer."""
    params = [p for g in groups for p in g]
    if world().zero is None:
        # Under FSDP2 each process keeps its shard of the whole moments.
        state = {idx: {k: _local_like(params[idx], v) for k, v in st.items()}
                 for idx, st in sd["state"].items()}
        optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    # ZeRO-2 points each parameter at its slice of the moments at its first step; they
    # exist already (:func:`adam_state_now`), and are written into now.
    _private.zero2_map_moments(getattr(world().engine, "optimizer", None))
    step = None
    for idx, st in sd["state"].items():
        for k in _ADAM_MOMENTS:
            value = st[k].to(params[idx].device)
            if hasattr(params[idx], "ds_id"):
                _private.zero3_set_moment(params[idx], value, k)
            else:
                safe_set_full_optimizer_state(params[idx], value, k)
        step = st["step"]
    for st in optimizer.state.values():
        if step is not None:
            st["step"] = step.clone()
    for group, saved in zip(optimizer.param_groups, sd["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
