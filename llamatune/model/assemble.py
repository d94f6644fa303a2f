"""A loaded base made ready (:func:`finish`), the one-call :func:`load_model`, the ``model:`` line."""

from __future__ import annotations

from llamatune.config import LoraConfig, ModelConfig
from llamatune.model.adapters import add_adapter
from llamatune.model.base import Loaded, load_base


def finish(loaded: Loaded, *, full: bool = False):
    """Make the adapters and heads ready, install the lean kernels, and build the net.

    The trainable adapter (if any) is made active; frozen ones are activated only inside
    ``Net(adapter=...)`` calls. The fused kernels are installed last, once every adapter
    exists, so they cover every stage's layers.

    Args:
        loaded: The base with its adapters and heads.
        full: Full fine-tuning: every base weight trains.

    Returns:
        The :class:`llamatune.net.Net`, also kept as ``loaded.net``.
    """
    from llamatune.net import Net

    model = loaded.model
    train = loaded.trainable_adapter
    if train is not None:
        model.set_adapter(train)
    elif loaded.adapters:
        model.set_adapter(next(iter(loaded.adapters)), inference_mode=True)
    for p in model.parameters():
        p.requires_grad_(False)
    if loaded.trainable:
        if full:
            for p in model.parameters():
                p.requires_grad_(True)
        elif train is not None:
            for n, p in model.named_parameters():
                if f".{train}." in n or n.endswith(f".{train}"):
                    p.requires_grad_(True)
    for head in loaded.heads.values():
        head.requires_grad_(loaded.trainable and any(p.requires_grad for p in head.parameters()))
    if loaded.trainable and loaded.fused:
        from llamatune.fused import install

        install(model)
    net = Net(model, loaded.heads, chunked_head=loaded.fused)
    if not loaded.trainable:
        net.eval()
        net.requires_grad_(False)
    loaded.net = net
    return net


def load_model(
    mcfg: ModelConfig,
    lcfg: LoraConfig | None = None,
    *,
    adapter: str | None = None,
    trainable: bool = True,
    seed: int | None = None,
    full: bool = False,
    cpu_4bit_packing: bool = True,
) -> Loaded:
    """Base + tokenizer with at most one adapter: the common case, in one call.

    Args:
        mcfg: The model section.
        lcfg: The LoRA section; ``None`` or ``enabled: false`` adds no new adapter.
        adapter: A run directory (or adapter folder) whose adapter is loaded onto the base
            (trainable when ``trainable``).
        trainable: Prepare for training (see :func:`load_base`).
        seed: Seeds adapter initialization.
        full: Full fine-tuning (every weight trains, float32).
        cpu_4bit_packing: See :func:`load_base`.

    Returns:
        A finished :class:`Loaded` (``.net`` built).
    """
    loaded = load_base(mcfg, trainable=trainable, full=full, cpu_4bit_packing=cpu_4bit_packing,
                       seed=seed)
    if adapter is not None:
        add_adapter(loaded, "default", source=adapter, trainable=trainable)
    elif lcfg is not None and lcfg.enabled:
        add_adapter(loaded, "default", lcfg=lcfg, trainable=trainable)
    finish(loaded, full=full)
    return loaded


def model_line(path: str, loaded: Loaded, extra: str = "") -> str:
    """The ``model:`` line a stage prints: size, what trains, dtypes and why, 4-bit path."""
    net = loaded.net
    # ds_numel: a parameter ZeRO-3 has partitioned holds none of its elements here.
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in net.parameters() if p.requires_grad)
    n_all = sum(getattr(p, "ds_numel", p.numel()) for p in net.parameters())
    return (f"model: {path}{extra} on {loaded.device}, {n_all:,} parameters, {n_train:,} "
            f"trainable ({100 * n_train / max(n_all, 1):.2f}%); {loaded.describe()}")
