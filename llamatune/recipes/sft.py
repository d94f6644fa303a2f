"""Supervised fine-tuning: ``llamatune sft RECIPE``.

Reads top to bottom: ``setup`` checks everything cheap and tokenizes (the shared
:func:`~llamatune.training.start`), loads the model with a new LoRA adapter (or a trainable
copy of ``model.adapter``'s, or every weight with ``lora.enabled: false``) and hands the
shared :class:`~llamatune.training.Loop` what is particular to SFT; ``train`` runs it;
``save_checkpoint`` writes a complete checkpoint; ``cleanup`` writes the final adapter.

Loss: next-token cross-entropy on supervised tokens only (answers and their end tokens),
summed per micro-batch; the loop divides it by the supervised tokens of the whole
accumulation window, so each token weighs the same whatever micro-batch it landed in.
"""

from __future__ import annotations

from llamatune import training
from llamatune.config import Config
from llamatune.recipes import BatchStage

__all__ = ["SFTRecipe", "main"]


class SFTRecipe(BatchStage):
    """Supervised fine-tuning of a LoRA adapter (or the full model) on conversations."""

    name = "sft"

    def __init__(self, cfg: Config, recipe_path: str | None = None):
        self.cfg = cfg
        self.recipe_path = recipe_path

    def setup(self) -> None:
        """Validate inputs, tokenize, load the model and optimizer, resume if asked."""
        from llamatune import model as loader
        from llamatune.rundir import adapter_dir

        cfg = self.cfg
        begun = training.start(cfg, "conversations", "llamatune sft", self.recipe_path)
        self.run_dir, data = begun.run_dir, begun.data
        self.train_samples, self.eval_samples = data.train, data.eval
        full = not cfg.lora.enabled and cfg.model.adapter is None
        self.loaded = loader.load_base(cfg.model, trainable=True, full=full, seed=cfg.train.seed)
        if cfg.model.adapter is not None:
            loader.add_adapter(self.loaded, "default", source=adapter_dir(cfg.model.adapter),
                               dropout=cfg.lora.dropout)
        elif cfg.lora.enabled:
            loader.add_adapter(self.loaded, "default", lcfg=cfg.lora)
        self.net = loader.finish(self.loaded, full=full)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.device, self.pad_id = self.loaded.device, self.tokenizer.pad_token_id
        self.loop = training.Loop(cfg, self, self.loaded, begun, has_eval=bool(self.eval_samples))
        print(loader.model_line(cfg.model.path, self.loaded), flush=True)

    # -- what the shared loop asks of this stage --------------------------------------------
    def batches(self, epoch: int) -> list[dict]:
        """The epoch's micro-batches of conversations (padded, or packed)."""
        return training.epoch_batches(self.train_samples, self.cfg.train, epoch, self.pad_id)

    def count(self, batch: dict) -> int:
        """Supervised tokens (each predicts a next token)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, batch: dict):
        """Summed next-token cross-entropy over the supervised tokens."""
        loss_sum, _ = self.net("lm_loss", self._to_device(batch))
        return loss_sum, {}

    def evaluate(self) -> dict:
        """Mean next-token loss over the supervised tokens of the eval set."""
        total, count = 0.0, 0
        for batch in training.epoch_batches(self.eval_samples, self.cfg.train, 0, self.pad_id,
                                            shuffle=False):
            loss, n = self.net("lm_loss", self._to_device(batch))
            total += loss.item()
            count += int(n)
        return {"eval_loss": total / max(count, 1)}

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}


def main(cfg: Config, recipe_path: str | None = None) -> int:
    """Run the whole stage.

    Returns:
        The process exit code.
    """
    return training.run_stage(SFTRecipe(cfg, recipe_path))
