"""The processes of a run and the distributed schemes it trains under.

A stage launched by ``accelerate launch`` (or ``torchrun``) runs once per process; this package
is the only place that knows. Without a launcher it stays out of the way (a notebook or a
plain ``llamatune sft`` never imports accelerate). One module a job:

* :mod:`~llamatune.dist.processes` -- :func:`world` (rank, process count, the accelerator
  or ``None``, the scheme), set up from the launcher's environment, and the few collectives
  the loop needs: :func:`shard` (this process's slice of a global micro-batch),
  :func:`all_sum`, :func:`mean`, :func:`gather`, :func:`barrier`, :func:`on_main` (only the
  main process writes the run directory);
* :mod:`~llamatune.dist.wrap` -- :func:`prepare` (the net wrapped for the launcher's scheme:
  DDP, FSDP2 or DeepSpeed's engine), :func:`full_params` (whole weights for generation,
  FSDP2), :func:`whole_trainables` and :func:`whole` (whole trainable weights for saving,
  FSDP2 and ZeRO-3), :func:`backward`, :func:`step` and :func:`no_sync`, which DeepSpeed's
  engine takes over under ZeRO;
* :mod:`~llamatune.dist.optim_state` -- :func:`optimizer_state` and
  :func:`load_optimizer_state`: whole optimizer state in checkpoints, in the one-process
  format (FSDP2, ZeRO);
* :mod:`~llamatune.dist._private` -- the only calls of private torch and DeepSpeed code,
  behind a version fence: outside the versions it was tested with (its ``TESTED``), FSDP2
  and ZeRO are refused before any model loads.

Starting the launcher itself is the CLI's (:mod:`llamatune.launcher`); its names are
re-exported here for older callers.

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

from llamatune.dist.optim_state import load_optimizer_state, optimizer_state
from llamatune.dist.processes import (Fsdp, World, all_sum, barrier, gather, launched, mean,
                                      on_main, shard, world)
from llamatune.dist.wrap import (backward, full_params, no_sync, prepare, step, whole,
                                 whole_trainables)
from llamatune.launcher import LAUNCH_DIR, launch, launch_config, launch_configs

__all__ = ["LAUNCH_DIR", "Fsdp", "World", "all_sum", "backward", "barrier", "full_params",
           "gather", "launch", "launch_config", "launch_configs", "launched",
           "load_optimizer_state", "mean", "no_sync", "on_main", "optimizer_state", "prepare",
           "shard", "step", "whole", "whole_trainables", "world"]
