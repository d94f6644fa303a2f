"""llamatune: fine-tune Llama-family models the Llama-2-Chat way (SFT, reward model, PPO).

Heavy dependencies (torch, transformers, peft) are imported lazily by the modules that
need them, so ``import llamatune`` and ``llamatune --help`` stay instant.
"""

__version__ = "0.1.0"

__all__ = ["UserError", "__version__"]

from llamatune.errors import UserError
