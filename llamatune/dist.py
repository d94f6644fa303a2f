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
* :func:`full_params`, :func:`whole_trainables`, :func:`optimizer_state`,
  :func:`load_optimizer_state` -- whole weights for generation (FSDP2), whole trainable
  weights for saving (FSDP2, ZeRO-3), whole optimizer state in checkpoints in the
  one-process format (FSDP2, ZeRO);
* :func:`backward`, :func:`step` -- a backward pass and an optimizer step, which DeepSpeed's
  engine takes over under ZeRO.

**FSDP2 on accelerate's configs.** accelerate's own FSDP path runs on GPUs only (its CPU state
never becomes ``FSDP``), so a CPU could not test it. llamatune therefore reads the launcher's
``fsdp_config`` (``FSDP_*`` variables), lets accelerate set up the processes as for DDP, and
applies torch's FSDP2 ``fully_shard`` itself: one code path on GPUs and CPUs (gloo), the one
the tests run. The per-parameter sharding of FSDP2 takes a 4-bit base as bitsandbytes stores
it in the compute dtype (``bnb_4bit_quant_storage``; see :mod:`llamatune.model`) beside
float32 LoRA matrices: the gathered groups hold whole parameters, and only trainable ones
(all float32) have gradients to reduce.

**DeepSpeed ZeRO-2 and ZeRO-3** run through accelerate (``accelerator.prepare`` of the net and
the optimizer), with llamatune's loop still in charge of batches and accumulation: the
engine's micro-batch is ``train.batch_size``, its own accumulation is off (one window's
boundary is set explicitly, on its last backward), and its gradient clipping is
``train.max_grad_norm``. The engine takes the optimizer step; llamatune's schedule sets the
learning rate on the same parameter groups. Checkpoints hold the whole AdamW moments
(DeepSpeed's ``safe_get_full_optimizer_state``), never DeepSpeed's pickled checkpoint files.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from llamatune.errors import UserError
from llamatune.launcher import LAUNCH_DIR, launch, launch_config, launch_configs

__all__ = ["LAUNCH_DIR", "Fsdp", "World", "all_sum", "backward", "barrier", "full_params",
           "gather", "launch", "launch_config", "launch_configs", "launched",
           "load_optimizer_state", "mean", "no_sync", "on_main", "optimizer_state", "prepare",
           "shard", "step", "whole", "whole_trainables", "world"]

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
    """The DeepSpeed engine :func:`prepare` made (its ZeRO optimizer holds the shards)."""

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


def _make_world() -> World:
    if not launched():
        return World()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return _deepspeed_world(_zero_stage(os.environ))
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
    config["gradient_accumulation_steps"] = 1  # llamatune's loop accumulates (module docstring)
    config["train_batch_size"] = int(batch_size) * w.size
    config["gradient_clipping"] = float(max_grad_norm)
    # ZeRO-3 gathers a weight for its module's forward and backward only; the chunked head
    # reads the output head's weight outside it, so the head is called as a module instead.
    net.head_by_call = w.zero == 3
    engine, _ = w.accelerator.prepare(net, optimizer)
    net.wrap(engine)
    w.engine = engine
    _adam_state_now(optimizer, engine.optimizer)
    return engine


def _adam_state_now(optimizer, zero_optimizer) -> None:
    """Create AdamW's state for the engine's flat partitions now, as torch would (zeros).

    torch creates it at the first step, group by group; ZeRO-2 maps each parameter onto its
    moments right after the first group's step, so a second group (biases and norms, without
    weight decay) would be mapped before its moments exist and stay unreadable for
    checkpoints. ZeRO-3 hands its partitions to the optimizer only while it steps, so they are
    asked of it; ZeRO-2's stay in the parameter groups.
    """
    import torch

    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or [
        p for g in optimizer.param_groups for p in g["params"]]
    for flat in flats:
        st = optimizer.state[flat]
        if not st:  # as torch.optim.AdamW makes it (not fused, not capturable)
            st["step"] = torch.tensor(0.0)
            for k in _ADAM_MOMENTS:
                st[k] = torch.zeros_like(flat, memory_format=torch.preserve_format)


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
    # layer before the net ever runs, so fix the net as the root now (private; torch 2.13).
    net._get_fsdp_state()._lazy_init()
    return net


def _fsdp_modules(module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_params(module):
    """Whole parameters in ``module`` for the body, on every process (FSDP2); else nothing.

    For what calls only part of the net, outside its forward: generation (each process a
    different number of decoding steps, so no layer may gather again). Every process must
    enter it together. (Saving needs only :func:`whole_trainables`; ZeRO-3, the other scheme
    that shards weights, refuses ppo, the one stage that generates while training.)
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


_WHOLE: dict[int, object] = {}
"""Parameter id to its whole copy, inside :func:`whole_trainables`."""


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
    _WHOLE.update(copies)
    try:
        yield
    finally:
        for k in copies:
            _WHOLE.pop(k, None)


def whole(param):
    """``param``'s whole copy inside :func:`whole_trainables`, else ``param`` itself."""
    return _WHOLE.get(id(param), param)


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


_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


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

    zero_optimizer = getattr(world().engine, "optimizer", None)
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-2 points each parameter at its slice of the moments at its first step; they
        # exist already (:func:`_adam_state_now`), and are written into now.
        zero_optimizer._lazy_init_hp_params_optimizer_state()
    step = None
    for idx, st in sd["state"].items():
        for k in _ADAM_MOMENTS:
            value = st[k].to(params[idx].device)
            if hasattr(params[idx], "ds_id"):
                _z3_set_moment(params[idx], value, k)
            else:
                safe_set_full_optimizer_state(params[idx], value, k)
        step = st["step"]
    for st in optimizer.state.values():
        if step is not None:
            st["step"] = step.clone()
    for group, saved in zip(optimizer.param_groups, sd["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})


def _z3_set_moment(param, value, key: str) -> None:
    """This process's part of a ZeRO-3 parameter's moment ``key``, from its whole ``value``.

    DeepSpeed's ``safe_set_full_optimizer_state`` fails on a parameter whose size the
    processes do not divide (the last part is padded: a 1-element bias, for one); this copies
    the part and leaves the padding zero. (DeepSpeed 0.19's stage-3 internals.)
    """
    zero = param._z3_optimizer
    part, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                 optim_state_key=key)
    lo = part.numel() * zero._get_param_partition_rank(param)
    piece = value.flatten()[lo : lo + part.numel()]
    part.data.zero_()
    part.data[: piece.numel()].copy_(piece)


_OPEN_WINDOW = False
"""Whether the last DeepSpeed backward pass was not marked as its window's last."""


def backward(wrapped, loss, boundary: bool = True) -> None:
    """``loss.backward()``, or the DeepSpeed engine's backward.

    Args:
        wrapped: What :func:`prepare` returned.
        loss: A scalar already normalized for the whole step (no further scaling).
        boundary: Whether this is the last backward before the optimizer step (ZeRO-2
            reduces the window's gradients there).
    """
    global _OPEN_WINDOW
    if world().zero is None:
        loss.backward()
        return
    wrapped.set_gradient_accumulation_boundary(boundary)
    wrapped.backward(loss, scale_wrt_gas=False)
    _OPEN_WINDOW = not boundary


def step(wrapped, params: list) -> float | None:
    """The DeepSpeed engine's optimizer step (clipping included); returns the gradient norm.

    A window whose last backward was not marked (a PPO window cut short by skipped parts) is
    closed first with a zero-valued backward, so ZeRO-2 reduces what it accumulated.
    """
    global _OPEN_WINDOW
    if _OPEN_WINDOW and world().zero == 2:
        backward(wrapped, sum((p * 0).sum() for p in params), boundary=True)
    _OPEN_WINDOW = False
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
