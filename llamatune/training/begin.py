"""How every stage opens: the cheap checks, the data, the resume point, the run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llamatune import dist
from llamatune.config import Config
from llamatune.errors import UserError
from llamatune.training.checkpoint import data_order, resume_checkpoint
from llamatune.training.optim import set_seed

__all__ = ["Start", "start"]


@dataclass
class Start:
    """What :func:`start` hands a stage: the run directory, tokenizer and data, resume point."""

    run_dir: Path
    tokenizer: object
    data: object
    """The :class:`~llamatune.data.prepare.Prepared` data."""
    data_order: dict
    resume_from: Path | None
    """The checkpoint to resume from (``resume=true``), already checked against the data order."""


def _check_scheme(cfg: Config) -> None:
    """Refuse what the launcher's scheme cannot run, before anything loads.

    Under ZeRO-3 ``model.fused`` is turned off (said on the console): its kernels keep LoRA
    and head weights for their backward pass, which ZeRO-3 has partitioned again by then.

    Raises:
        UserError: A quantized base under a scheme that shards parameters and does not take
            it (ZeRO-3 with 4-bit is unsupported upstream; 8-bit is not sharded by FSDP2 or
            ZeRO-3).
    """
    scheme, q = dist.world().scheme, cfg.model.quantization
    if scheme == "zero3" and q != "none":
        raise UserError(f"model.quantization: a {q} base cannot run under DeepSpeed ZeRO-3 "
                        "(ZeRO-3 does not shard bitsandbytes' quantized weights upstream); use "
                        "the fsdp2 config (QLoRA shards there), zero2 or ddp.")
    if scheme == "fsdp2" and q == "8bit":
        raise UserError("model.quantization: an 8bit base is not sharded by FSDP2 here; use 4bit "
                        "with fsdp2, or the ddp config.")
    if scheme == "zero3" and cfg.model.fused:
        cfg.model.fused = False
        print("model.fused: off under DeepSpeed ZeRO-3 (its kernels read weights ZeRO-3 "
              "gathers only inside each layer's own forward and backward)", flush=True)


def start(cfg: Config, kind: str, command: str, recipe_path: str | None = None) -> Start:
    """Open a stage: check cheap things first, tokenize, check the resume, create the run dir.

    Nothing is written until the data and the resume point are known good; the model is not
    loaded (nor a GGUF converted) before a bad recipe key or data row has been reported.

    Args:
        cfg: The stage's config (its paths are written back absolute).
        kind: The data kind (``conversations``, ``pairs``, ``prompts``).
        command: The stage command, for messages (``llamatune rm``).
        recipe_path: The recipe file.

    Returns:
        A :class:`Start`.
    """
    from llamatune import rundir
    from llamatune.data import prepare
    from llamatune.data.prepare import check
    from llamatune.model import load_tokenizer, resolve_model_path

    run_dir = rundir.prepare_output_dir(cfg)
    check(cfg, kind, command)
    _check_scheme(cfg)
    if cfg.train.trackers:
        from llamatune.trackers import check_installed

        check_installed(cfg.train.trackers)
    with dist.on_main() as main:  # a built-in model is converted once, by one process
        if main:
            resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model, resolve_model_path(cfg.model.path))
    data = prepare(cfg, tokenizer, kind, command, recipe_path)
    print(f"data: {data.summary()}", flush=True)
    order = data_order(cfg, data.train)
    ckpt = resume_checkpoint(cfg, run_dir, order) if cfg.resume else None
    dist.barrier()  # every process has checked output_dir before one writes to it
    with dist.on_main() as main:
        if main:
            rundir.create_output_dir(cfg, run_dir)
            rundir.write_run_files(run_dir, rundir.absolute_config(cfg, recipe_path), tokenizer)
    set_seed(cfg.train.seed)
    return Start(run_dir, tokenizer, data, order, ckpt)
