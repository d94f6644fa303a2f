"""The processes of a run: who am I, how many are we, and the few collectives the loop needs.

A stage launched by ``accelerate launch`` (or ``torchrun``) runs once per process. This
module is the only place that knows: it creates accelerate's ``Accelerator`` when the
launcher's environment says there is more than one process (or FSDP / DeepSpeed was chosen),
and otherwise stays out of the way, so a notebook or a plain ``llamatune sft`` never imports
accelerate. Without a GPU the processes talk over gloo (accelerate's ``MULTI_CPU``).

What the rest of the package asks of it:

* :func:`world` -- rank, process count, the accelerator (or ``None``);
* :func:`shard` -- this process's slice of a global micro-batch;
* :func:`all_sum` -- sums of a few numbers over the processes (normalizers, metrics);
* :func:`barrier`, :func:`on_main` -- only the main process writes the run directory;
* :func:`prepare` -- the net wrapped for the launcher's scheme (DDP, FSDP2), with every call
  of the net then going through the wrapper (:meth:`llamatune.net.Net.wrap`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from llamatune.errors import UserError

__all__ = ["LAUNCH_DIR", "World", "all_sum", "barrier", "gather", "launch", "launch_config",
           "launch_configs", "launched", "mean", "no_sync", "on_main", "prepare", "shard", "world"]

_LAUNCH_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
LAUNCH_DIR = Path(__file__).resolve().parent / "launch"
"""The packaged accelerate configs (``llamatune ls --accelerate``)."""


@dataclass
class World:
    """This process's place in the run."""

    rank: int = 0
    size: int = 1
    accelerator: object = None
    """accelerate's ``Accelerator`` when launched with more than one process, else ``None``."""

    @property
    def main(self) -> bool:
        """Whether this is the process that writes the run directory and prints."""
        return self.rank == 0

    @property
    def scheme(self) -> str:
        """``single`` or ``ddp`` (FSDP and DeepSpeed are refused when the world is made)."""
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


def _make_world() -> World:
    if not launched():
        return World()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage3 = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
        raise UserError("DeepSpeed (the zero2/zero3 accelerate configs) is not run by llamatune's "
                        "loop yet" + (" (and ZeRO-3 cannot shard a 4-bit base: bitsandbytes' "
                                      "quantized weights are not supported by ZeRO-3 upstream)"
                                      if stage3 else "") +
                        "; use the ddp config (`llamatune ls --accelerate`).")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise UserError("FSDP (the fsdp2 accelerate config) is not run by llamatune's loop yet; "
                        "use the ddp config (`llamatune ls --accelerate`).")
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Buffers (RoPE tables) are the same on every process; broadcasting them before each
    # forward would also make a no-grad forward on one process (a rollout, an evaluation)
    # wait for the others.
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    return World(acc.process_index, acc.num_processes, acc)


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


def prepare(net):
    """Wrap ``net`` for the launcher's scheme and route every call of it through the wrapper.

    Returns:
        The DDP wrapper, or ``net`` itself when alone. ``net`` stays the object stages hold:
        its ``model``, ``heads`` and ops are unchanged, and its calls reach the wrapper's
        forward (gradient synchronization).
    """
    w = world()
    if w.accelerator is None:
        return net
    wrapped = w.accelerator.prepare_model(net)
    if wrapped is not net:
        net.wrap(wrapped)
    return wrapped


def no_sync(wrapped, enabled: bool = True):
    """A context in which backward passes accumulate without synchronizing gradients.

    ``enabled=False`` (the last backward of an accumulation window) synchronizes as usual.
    """
    if not enabled or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def launch_configs() -> dict[str, Path]:
    """Packaged accelerate config name to file."""
    return {p.stem: p for p in sorted(LAUNCH_DIR.glob("*.yaml"))}


def launch_config(name: str) -> Path:
    """A packaged config by name, or a config file by path.

    Raises:
        UserError: Neither.
    """
    configs = launch_configs()
    if name in configs:
        return configs[name]
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise UserError(f"--accelerate_config {name}: no such file and not a packaged config "
                    f"({', '.join(configs)}; `llamatune ls --accelerate`).")


def launch(config: str, num_processes: int | None, argv: list[str]) -> int:
    """Run ``accelerate launch --config_file CONFIG -m llamatune ARGV`` and wait for it.

    Args:
        config: A packaged config name or a config file.
        num_processes: Overrides the config's process count.
        argv: The llamatune command line to run in every process (``sft RECIPE k=v ...``).

    Returns:
        The launcher's exit code.
    """
    import subprocess

    path = launch_config(config)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    cmd += ["-m", "llamatune", *argv]
    print("launching: accelerate launch " + " ".join(cmd[4:]), flush=True)
    return subprocess.run(cmd, check=False).returncode
