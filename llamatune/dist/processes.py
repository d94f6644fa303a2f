"""The processes of a run: who am I, how many are we, and the few collectives the loop needs.

A stage launched by ``accelerate launch`` (or ``torchrun``) runs once per process. This
module creates accelerate's ``Accelerator`` when the launcher's environment says there is
more than one process (or FSDP / DeepSpeed was chosen), and otherwise stays out of the way,
so a notebook or a plain ``llamatune sft`` never imports accelerate. Without a GPU the
processes talk over gloo (accelerate's ``MULTI_CPU``). The launcher's FSDP and DeepSpeed
settings are read (and what llamatune does not run refused) here, and so is the version
fence of the sharded schemes (:func:`llamatune.dist._private.check`), before any model loads.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from llamatune.dist import _private
from llamatune.errors import UserError

__all__ = ["Fsdp", "World", "all_sum", "barrier", "current", "gather", "launched", "mean",
           "on_main", "shard", "world"]

_LAUNCH_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")


@dataclass(frozen=True)
class Fsdp:
    """How FSDP2 shards the net, read from the accelerate config's ``fsdp_config``."""

    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward (``fsdp_reshard_after_forward``)."""
    layers: tuple[str, ...] | None = None
    """Module class names sharded as units (``fsdp_transformer_layer_cls_to_wrap``); ``None``:
    the model's own ``_no_split_modules`` (its decoder layer); empty: none (``NO_WRAP``)."""


@dataclass
class World:
    """This process's place in the run."""

    rank: int = 0
    size: int = 1
    accelerator: object = None
    """accelerate's ``Accelerator`` when launched with more than one process, else ``None``."""
    fsdp: Fsdp | None = None
    """FSDP2's settings when the launcher's config asks for FSDP, else ``None``."""
    zero: int | None = None
    """The DeepSpeed ZeRO stage (2 or 3) when the launcher's config asks for DeepSpeed."""
    engine: object = None
    """The DeepSpeed engine :func:`llamatune.dist.prepare` made (its ZeRO optimizer holds the
    shards)."""
    whole_copies: dict = field(default_factory=dict, repr=False, compare=False)
    """Parameter id to its whole copy, inside :func:`llamatune.dist.whole_trainables`."""
    open_window: bool = field(default=False, repr=False, compare=False)
    """Whether the last DeepSpeed backward pass was not marked as its window's last
    (:func:`llamatune.dist.step` closes it)."""

    @property
    def main(self) -> bool:
        """Whether this is the process that writes the run directory and prints."""
        return self.rank == 0

    @property
    def scheme(self) -> str:
        """``single``, ``ddp``, ``fsdp2``, ``zero2`` or ``zero3``."""
        if self.fsdp is not None:
            return "fsdp2"
        if self.zero is not None:
            return f"zero{self.zero}"
        return "ddp" if self.size > 1 else "single"


_WORLD: World | None = None


def launched() -> bool:
    """Whether a launcher started this process as one of several (or asked for FSDP/DeepSpeed)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return True
    return any(os.environ.get(k, "").lower() == "true" for k in _LAUNCH_ENV)


def world() -> World:
    """This process's :class:`World`, set up on first use."""
    global _WORLD
    if _WORLD is None:
        _WORLD = _make_world()
    return _WORLD


def current() -> World | None:
    """This process's :class:`World` if :func:`world` has set it up, else ``None``."""
    return _WORLD


def _make_world() -> World:
    if not launched():
        return World()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = _zero_stage(os.environ)
        _private.check(f"zero{stage}", "the accelerate config's deepspeed_config")
        return _deepspeed_world(stage)
    fsdp = None
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        fsdp = _fsdp_settings(os.environ)
        _private.check("fsdp2", "the accelerate config's fsdp_config")
        # llamatune shards the net itself (see llamatune.dist); accelerate sets up the processes.
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Buffers (RoPE tables) are the same on every process; broadcasting them before each
    # forward would also make a no-grad forward on one process (a rollout, an evaluation)
    # wait for the others.
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    if fsdp is not None and not torch.distributed.is_initialized():  # one process, FSDP asked
        torch.distributed.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1,
            init_method=f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:"
                        f"{os.environ.get('MASTER_PORT', '29500')}")
    return World(acc.process_index, acc.num_processes, acc, fsdp)


def _deepspeed_world(stage: int) -> World:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # Without a GPU, accelerate leaves DeepSpeed's backend unnamed and then counts one
    # process on every rank; naming gloo gives it the real rank and size.
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    acc = Accelerator(kwargs_handlers=handlers)
    return World(acc.process_index, acc.num_processes, acc, zero=stage)


def _zero_stage(env) -> int:
    """The ZeRO stage the launcher's DeepSpeed config asks for, or a clear refusal.

    Raises:
        UserError: DeepSpeed is not installed, or a setting llamatune does not run (ZeRO-0/1,
            offloading).
    """
    import importlib.util

    where = "the accelerate config's deepspeed_config"
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"{where}: DeepSpeed is not installed; `pip install deepspeed` (or use the "
                        "ddp or fsdp2 config: `llamatune ls --accelerate`).")
    stage = str(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")).strip()
    offload = {k: env.get(f"ACCELERATE_DEEPSPEED_{k.upper()}_DEVICE", "none")
               for k in ("offload_optimizer", "offload_param")}
    config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if config_file and os.path.isfile(config_file):
        import json

        try:
            zero = json.loads(Path(config_file).read_text()).get("zero_optimization", {})
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f"{config_file}: not a DeepSpeed JSON config ({e}).") from None
        where = config_file
        stage = stage or str(zero.get("stage", ""))
        offload = {k: (zero.get(k) or {}).get("device", "none") for k in offload}
    if stage not in ("2", "3"):
        raise UserError(f"{where}: zero_stage {stage or '(none)'}; llamatune runs ZeRO stages 2 "
                        "and 3 (the zero2 and zero3 configs); for plain data parallelism use ddp.")
    for name, device in offload.items():
        if str(device).strip().lower() not in ("none", ""):
            raise UserError(f"{where}: {name}_device {device} is not supported; set it to none.")
    return int(stage)


def _true(env, key: str, default: str = "false") -> bool:
    return str(env.get(key, default)).strip().lower() in ("true", "1", "yes")


def _fsdp_settings(env) -> Fsdp:
    """The FSDP2 settings from the launcher's ``FSDP_*`` variables, or a clear refusal.

    Raises:
        UserError: An FSDP setting llamatune does not run (FSDP1, offloading, FSDP's own
            activation checkpointing, size-based wrapping).
    """
    where = "the accelerate config's fsdp_config"
    version = str(env.get("FSDP_VERSION", "1")).strip()
    if version != "2":
        raise UserError(f"{where}: fsdp_version {version}; llamatune runs FSDP2 only "
                        "(fsdp_version: 2, as in the packaged fsdp2 config).")
    if _true(env, "FSDP_OFFLOAD_PARAMS"):
        raise UserError(f"{where}: fsdp_offload_params: true is not supported; set it to false.")
    if _true(env, "FSDP_ACTIVATION_CHECKPOINTING"):
        raise UserError(f"{where}: fsdp_activation_checkpointing: true is not used by llamatune; "
                        "set it to false and use the recipe key train.gradient_checkpointing.")
    policy = str(env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")).strip().upper()
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP", ""):
        raise UserError(f"{where}: fsdp_auto_wrap_policy {policy} is not supported; use "
                        "TRANSFORMER_BASED_WRAP (each decoder layer is one unit) or NO_WRAP.")
    layers = tuple(c.strip() for c in str(env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")).split(",")
                   if c.strip())
    return Fsdp(_true(env, "FSDP_RESHARD_AFTER_FORWARD", "true"),
                () if policy == "NO_WRAP" else layers or None)


def shard(items: list, rank: int | None = None, size: int | None = None) -> list:
    """This process's part of a global micro-batch: contiguous, as even as possible.

    ``items`` is the global micro-batch (``train.batch_size`` x processes samples); process
    ``r`` of ``n`` takes the ``r``-th of ``n`` near-equal contiguous slices, so the processes
    together see exactly the samples one process would at the same global batch. A slice may
    be empty when the last micro-batch of an epoch is short.
    """
    w = world()
    rank = w.rank if rank is None else rank
    size = w.size if size is None else size
    if size == 1:
        return list(items)
    q, extra = divmod(len(items), size)
    lo = rank * q + min(rank, extra)
    return list(items[lo : lo + q + (rank < extra)])


def all_sum(values: list[float]) -> list[float]:
    """``values`` summed element-wise over the processes (float64), or as given alone."""
    w = world()
    if w.size == 1:
        return [float(v) for v in values]
    import torch

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=w.accelerator.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def mean(figures: dict) -> dict:
    """Numeric figures averaged over the processes (the same keys on each), or as given alone."""
    if world().size == 1:
        return figures
    keys = sorted(figures)
    size = world().size
    return {k: v / size for k, v in zip(keys, all_sum([figures[k] for k in keys]))}


def gather(obj) -> list | None:
    """Every process's ``obj`` on the main process (in rank order); ``None`` elsewhere."""
    w = world()
    if w.size == 1:
        return [obj]
    import torch

    out = [None] * w.size if w.main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    """Wait for every process (nothing when alone)."""
    w = world()
    if w.size > 1:
        w.accelerator.wait_for_everyone()


@contextlib.contextmanager
def on_main():
    """Run the body on the main process only; every process leaves together.

    An error on the main process is raised there; the others then stop at the next
    collective, and the launcher ends them.
    """
    w = world()
    try:
        yield w.main
    finally:
        if w.size > 1:
            w.accelerator.wait_for_everyone()
