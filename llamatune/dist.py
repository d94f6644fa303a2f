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
* :func:`prepare` -- the net wrapped for the launcher's scheme: DDP (every call of the net then
  goes through the wrapper, :meth:`llamatune.net.Net.wrap`) or FSDP2 (torch's ``fully_shard``
  on each decoder layer and on the net, in place);
* :func:`full_params`, :func:`full_state`, :func:`local_like` -- under FSDP2, whole weights for
  what runs outside the net's forward (generation, saving) and whole optimizer state in
  checkpoints.

**FSDP2 on accelerate's configs.** accelerate's own FSDP path runs on GPUs only (its CPU state
never becomes ``FSDP``), so a CPU could not test it. llamatune therefore reads the launcher's
``fsdp_config`` (``FSDP_*`` variables), lets accelerate set up the processes as for DDP, and
applies torch's FSDP2 ``fully_shard`` itself: one code path on GPUs and CPUs (gloo), the one
the tests run. The per-parameter sharding of FSDP2 takes a 4-bit base as bitsandbytes stores
it in the compute dtype (``bnb_4bit_quant_storage``; see :mod:`llamatune.model`) beside
float32 LoRA matrices: the gathered groups hold whole parameters, and only trainable ones
(all float32) have gradients to reduce.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from llamatune.errors import UserError

__all__ = ["LAUNCH_DIR", "Fsdp", "World", "all_sum", "barrier", "full_params", "full_state",
           "gather", "launch", "launch_config", "launch_configs", "launched", "local_like", "mean",
           "no_sync", "on_main", "prepare", "shard", "world"]

_LAUNCH_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
LAUNCH_DIR = Path(__file__).resolve().parent / "launch"
"""The packaged accelerate configs (``llamatune ls --accelerate``)."""


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

    @property
    def main(self) -> bool:
        """Whether this is the process that writes the run directory and prints."""
        return self.rank == 0

    @property
    def scheme(self) -> str:
        """``single``, ``ddp`` or ``fsdp2`` (DeepSpeed is refused when the world is made)."""
        if self.fsdp is not None:
            return "fsdp2"
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
    fsdp = None
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        fsdp = _fsdp_settings(os.environ)
        # llamatune shards the net itself (module docstring); accelerate sets up the processes.
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


def prepare(net):
    """Wrap ``net`` for the launcher's scheme and route every call of it through the wrapper.

    Returns:
        The DDP wrapper, ``net`` itself sharded in place (FSDP2), or ``net`` when alone.
        ``net`` stays the object stages hold: its ``model``, ``heads`` and ops are unchanged,
        and its calls reach the wrapper's forward (gradient synchronization).
    """
    w = world()
    if w.accelerator is None:
        return net
    if w.fsdp is not None:
        return _fully_shard(net, w.fsdp)
    wrapped = w.accelerator.prepare_model(net)
    if wrapped is not net:
        net.wrap(wrapped)
    return wrapped


def _fully_shard(net, fsdp: Fsdp):
    """FSDP2 on ``net``: each decoder layer one unit, the rest (embeddings, head) the root's."""
    import torch
    from torch.distributed.fsdp import fully_shard

    # Every process must shard the same weights: the base comes from the same files, and
    # the trainable ones (seeded LoRA, heads) are made equal here, as DDP would at wrapping.
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                torch.distributed.broadcast(p.data, src=0)
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
    # layer before the net ever runs, so fix the net as the root now (torch 2.6 to 2.13).
    net._get_fsdp_state()._lazy_init()
    return net


def _fsdp_modules(module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2: nothing can be sharded
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_params(module):
    """Whole parameters in ``module`` for the body, on every process (FSDP2); else nothing.

    For what reads weights outside the net's forward, or calls only part of it: generation
    (each process a different number of decoding steps, so no layer may gather again), and
    saving the trainable weights. Every process must enter it together.
    """
    mods = _fsdp_modules(module)
    if not mods:
        yield
        return
    after = (world().fsdp or Fsdp()).reshard_after_forward
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


def full_state(state):
    """``state`` (nested dicts and lists) with every sharded tensor made whole (FSDP2).

    A collective: every process calls it with the same structure. Plain tensors and other
    values are returned as they are.
    """
    if isinstance(state, dict):
        return {k: full_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(full_state(v) for v in state)
    if hasattr(state, "full_tensor"):
        return state.full_tensor()
    return state


def local_like(param, full):
    """``full`` (a whole tensor) sharded as ``param`` is: its local part, or ``full`` itself."""
    if not hasattr(param, "device_mesh") or getattr(full, "shape", None) != param.shape:
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None)


def no_sync(wrapped, enabled: bool = True):
    """A context in which backward passes accumulate without synchronizing gradients.

    ``enabled=False`` (the last backward of an accumulation window) synchronizes as usual.
    """
    if not enabled:
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
