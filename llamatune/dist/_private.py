"""The one place that calls private torch and DeepSpeed code, behind a version fence.

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

These internals were read and tested with the library versions of :data:`TESTED`. Outside
them :func:`check` refuses the scheme that needs them (``fsdp2`` on torch, ``zero2`` and
``zero3`` on DeepSpeed) with a :class:`~llamatune.errors.UserError` naming the tested and
the installed versions, when the processes are set up and before any model loads; none of
the three has a public path to fall back to. One process and DDP call none of this. Each function here checks the
fence again, so no caller reaches an internal outside it.
"""

from __future__ import annotations

import functools

from llamatune.errors import UserError

__all__ = ["TESTED", "check", "fsdp_fix_root", "tested", "zero2_map_moments",
           "zero3_flat_partitions", "zero3_set_moment"]

TESTED = {"torch": ("2.13", "2.14"), "deepspeed": ("0.19", "0.20")}
"""Library versions (``[low, high)``) whose internals this module was written and tested
against; outside them the schemes that need them are refused (:func:`check`)."""

_NEEDS = {"fsdp2": "torch", "zero2": "deepspeed", "zero3": "deepspeed"}
"""The library whose internals each scheme calls."""
_USERS = {"torch": "fsdp2", "deepspeed": "zero2 and zero3"}


@functools.lru_cache(maxsize=None)
def _installed(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def tested(pkg: str) -> bool:
    """Whether the installed ``pkg`` (``torch`` or ``deepspeed``) is within :data:`TESTED`."""
    from packaging.version import Version

    low, high = TESTED[pkg]
    return Version(low) <= Version(_installed(pkg)) < Version(high)


def _refusal(pkg: str, scheme: str) -> str:
    low, high = TESTED[pkg]
    return (f"llamatune runs {scheme} on {pkg} internals tested with {pkg} >={low},<{high}; "
            f"this is {pkg} {_installed(pkg)}. Install a tested version (`pip install "
            f"'{pkg}>={low},<{high}'`), or use the ddp config (`llamatune ls --accelerate`).")


def check(scheme: str, where: str) -> None:
    """Refuse ``scheme`` when the library whose internals it calls is outside :data:`TESTED`.

    Args:
        scheme: ``single``, ``ddp``, ``fsdp2``, ``zero2`` or ``zero3``
            (:attr:`llamatune.dist.World.scheme`); the first two always pass.
        where: What asked for the scheme, for the message (the accelerate config's section).

    Raises:
        UserError: The installed torch (FSDP2) or DeepSpeed (ZeRO) is outside :data:`TESTED`.
    """
    pkg = _NEEDS.get(scheme)
    if pkg is not None and not tested(pkg):
        raise UserError(f"{where}: {_refusal(pkg, scheme)}")


def _require(pkg: str) -> None:
    if not tested(pkg):
        raise UserError(_refusal(pkg, _USERS[pkg]))


def fsdp_fix_root(net) -> None:
    """Make ``net`` (already ``fully_shard``-ed) FSDP2's root now, before any unit runs.

    Raises:
        UserError: torch is outside :data:`TESTED`.
    """
    _require("torch")
    net._get_fsdp_state()._lazy_init()


def zero3_flat_partitions(zero_optimizer) -> list | None:
    """ZeRO-3's fp32 flat partitions of ``zero_optimizer`` (the engine's), ``None`` under ZeRO-2.

    Raises:
        UserError: DeepSpeed is outside :data:`TESTED`.
    """
    _require("deepspeed")
    return getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)


def zero2_map_moments(zero_optimizer) -> None:
    """Point each ZeRO-2 parameter at its slice of the optimizer moments now.

    ZeRO-2 does it at the first step; the moments already exist (llamatune creates them when
    it wraps), so a checkpoint's moments can be written into them before that step. Nothing
    when ``zero_optimizer`` is not ZeRO-2's.

    Raises:
        UserError: DeepSpeed is outside :data:`TESTED`.
    """
    _require("deepspeed")
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def zero3_set_moment(param, value, key: str) -> None:
    """This process's part of a ZeRO-3 parameter's moment ``key``, from its whole ``value``.

    Copies the part and leaves the padding of the last part zero (where DeepSpeed's
    ``safe_set_full_optimizer_state`` fails: a 1-element bias, for one).

    Raises:
        UserError: DeepSpeed is outside :data:`TESTED`.
    """
    _require("deepspeed")
    zero = param._z3_optimizer
    part, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                 optim_state_key=key)
    lo = part.numel() * zero._get_param_partition_rank(param)
    piece = value.flatten()[lo : lo + part.numel()]
    part.data.zero_()
    part.data[: piece.numel()].copy_(piece)
