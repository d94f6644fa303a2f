"""The one place that calls private torch and DeepSpeed code.

Three things llamatune needs have no public API in the libraries it runs on:

* FSDP2 takes the first module to run forward as its root; a PPO rollout calls a decoder
  layer before the net ever runs, so the net is made the root at once (torch's
  ``FSDPState._lazy_init``);
* ZeRO-3 hands its fp32 partitions to the torch optimizer only while it steps, so AdamW's
  state for them is created from the engine's ``fp32_partitioned_groups_flat``;
* resuming writes whole AdamW moments back into the engine's partitions: ZeRO-2 first maps
  each parameter onto its slice (``_lazy_init_hp_params_optimizer_state``), and ZeRO-3's
  parts are copied one by one (``_get_fp32_opt_state_partition``), since DeepSpeed's public
  ``safe_set_full_optimizer_state`` fails on a parameter the processes do not divide evenly.

They are called from here only.
"""

from __future__ import annotations

__all__ = ["fsdp_fix_root", "zero2_map_moments", "zero3_flat_partitions", "zero3_set_moment"]


def fsdp_fix_root(net) -> None:
    """Make ``net`` (already ``fully_shard``-ed) FSDP2's root now, before any unit runs."""
    net._get_fsdp_state()._lazy_init()


def zero3_flat_partitions(zero_optimizer) -> list | None:
    """ZeRO-3's fp32 flat partitions of ``zero_optimizer`` (the engine's), ``None`` under ZeRO-2."""
    return getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)


def zero2_map_moments(zero_optimizer) -> None:
    """Point each ZeRO-2 parameter at its slice of the optimizer moments now.

    ZeRO-2 does it at the first step; the moments already exist (llamatune creates them when
    it wraps), so a checkpoint's moments can be written into them before that step. Nothing
    when ``zero_optimizer`` is not ZeRO-2's.
    """
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def zero3_set_moment(param, value, key: str) -> None:
    """This process's part of a ZeRO-3 parameter's moment ``key``, from its whole ``value``.

    Copies the part and leaves the padding of the last part zero (where DeepSpeed's
    ``safe_set_full_optimizer_state`` fails: a 1-element bias, for one).
    """
    zero = param._z3_optimizer
    part, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                 optim_state_key=key)
    lo = part.numel() * zero._get_param_partition_rank(param)
    piece = value.flatten()[lo : lo + part.numel()]
    part.data.zero_()
    part.data[: piece.numel()].copy_(piece)
