"""LoRA adapters on a loaded base: new or copied, a policy and its reference, and saving."""

from __future__ import annotations

from pathlib import Path

from llamatune.config import LoraConfig
from llamatune.errors import UserError
from llamatune.model.base import Loaded
from llamatune.model.unwrap import live_state

# Linear layers of a Llama block; "all-linear" means these (never the output head).
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(cfg: LoraConfig, task_type: str = "CAUSAL_LM"):
    """The peft ``LoraConfig`` for ``lora.*``."""
    from peft import LoraConfig as PeftLoraConfig

    targets = LLAMA_LINEAR if cfg.target_modules == "all-linear" else cfg.target_modules
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
        task_type=task_type,
    )


def add_adapter(loaded: Loaded, name: str, *, lcfg: LoraConfig | None = None,
                source: str | None = None, trainable: bool = True,
                dropout: float | None = None) -> None:
    """Attach a LoRA adapter named ``name``: a new one (``lcfg``) or a copy of ``source``'s.

    Args:
        loaded: The base (adapters already attached stay as they are).
        name: The adapter's name in memory (saved runs always hold it as peft's default).
        lcfg: Shape of a new adapter.
        source: A run directory or adapter folder whose adapter is copied in.
        trainable: Whether it trains (at most one adapter trains).
        dropout: LoRA dropout for the copy (``None`` keeps the source's); a trainable copy
            takes ``lora.dropout`` so the recipe decides.

    Raises:
        UserError: The source does not fit the base (a different model).
    """
    from peft import PeftModel, get_peft_model

    if trainable and loaded.trainable_adapter is not None:
        raise ValueError(f"adapter {loaded.trainable_adapter!r} already trains")
    model = loaded.model
    first = not isinstance(model, PeftModel)
    try:
        if source is None:
            cfg = lora_config(lcfg)
            if first:
                model = get_peft_model(model, cfg, adapter_name=name)
            else:
                model.add_adapter(name, cfg)
        elif first:
            model = PeftModel.from_pretrained(model, str(source), adapter_name=name,
                                              is_trainable=trainable)
        else:
            model.load_adapter(str(source), adapter_name=name, is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"model.adapter {source}: its adapter does not fit model.path (a "
                        f"different base model?): {e}") from None
    if dropout is not None:
        _set_dropout(model, name, dropout)
    loaded.model = model
    loaded.adapters[name] = trainable


def _set_dropout(model, name: str, p: float) -> None:
    """Set one adapter's LoRA dropout (peft builds ``Identity`` for 0, ``Dropout`` above)."""
    import torch
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_dropout:
            module.lora_dropout[name] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()


def add_policy(loaded: Loaded, lcfg: LoraConfig, start: str | None, dropout: float,
               run_dir: Path | None = None) -> str:
    """Attach a trainable policy and its frozen reference, the starting model itself.

    The one rule of DPO and PPO: with a starting adapter (an SFT run's) the policy is a
    trainable copy of it and the reference a frozen copy, read from the run directory's own
    copy (:data:`llamatune.rundir.REFERENCE_DIR`, made here when ``run_dir`` is given, so a
    resume never depends on the SFT run staying where it was); without one the policy is a
    new LoRA of shape ``lcfg`` and the reference is the bare base (no adapter at all).

    Args:
        loaded: The base.
        lcfg: Shape of a new policy adapter.
        start: The starting adapter folder (:func:`llamatune.rundir.starting_adapter`), or
            ``None``.
        dropout: LoRA dropout of the policy (the reference never drops out).
        run_dir: The run directory to keep the starting adapter's copy in.

    Returns:
        The reference's adapter name for :class:`llamatune.net.Net` (``"base"``: none).
    """
    import dataclasses

    from llamatune.net import BASE
    from llamatune.rundir import REFERENCE_DIR, keep_copy

    if start is None:
        add_adapter(loaded, "policy", lcfg=dataclasses.replace(lcfg, dropout=dropout))
        return BASE
    if run_dir is not None:
        start = str(keep_copy(run_dir, start, REFERENCE_DIR))
    add_adapter(loaded, "policy", source=start, dropout=dropout)
    add_adapter(loaded, "reference", source=start, trainable=False, dropout=0.0)
    return "reference"


def reference_text(adapter: str | None) -> str:
    """How the ``model:`` line names the reference of :func:`add_policy`."""
    return f"the SFT adapter {adapter}, frozen" if adapter else "the base"


def save_adapter(model, name: str, folder) -> None:
    """Save adapter ``name`` as peft's default adapter in ``folder`` (safetensors + config).

    Whatever an adapter is called in memory, a saved run holds its trainable adapter at the
    top of the run directory under peft's default name, so ``PeftModel.from_pretrained``,
    ``merge``, ``export`` and ``generate`` read every stage's run alike.
    """
    import copy

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = get_peft_model_state_dict(model, state_dict=live_state(model), adapter_name=name)
    cfg = copy.deepcopy(model.peft_config[name])
    cfg.inference_mode = True
    cfg.save_pretrained(str(folder))
    save_file({k: v.detach().cpu().clone() for k, v in sd.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
