"""Reward modelling: ``llamatune rm RECIPE``.

Reads top to bottom like the SFT stage: ``setup`` checks everything cheap and tokenizes both
sides of every pair with the recipe's chat template (the shared
:func:`~llamatune.training.start`), loads the causal-LM base with a reward adapter (a new
LoRA, or a trainable copy of the SFT run's adapter named by ``model.adapter``, so training
starts from the SFT model) and a scalar score head on the last hidden state (trained in
full, in float32); the shared :class:`~llamatune.training.Loop` trains them; ``cleanup``
writes the adapter (as peft's default, applying to the base alone) and
``score_head.safetensors`` beside the config, tokenizer and template.

The reward of a sequence is the head applied to the final hidden state of its last real
token (the template's end token), located from the attention mask: never from the pad id,
which may equal a real token, and correct for left and right padding alike.

Loss, per pair: ``-log sigmoid(r_chosen - r_rejected - reward.margin)``, plus
``reward.center_coef * mean(r)**2`` over the rewards of each micro-batch; the loop divides
by the pairs of the whole accumulation window, so each pair weighs the same.

A finished run loads with :func:`llamatune.score.load_reward_model`.
"""

from __future__ import annotations

from llamatune import training
from llamatune.config import Config
from llamatune.recipes import BatchStage

__all__ = ["RewardRecipe", "main"]


def _pair_loss(rewards, center_coef: float, margin: float):
    """Summed pairwise loss (with the centring term scaled by the pair count) and figures.

    Returns:
        ``(loss_sum, n_pairs, n_correct, margin_sum)``; ``loss_sum`` is a tensor.
    """
    import torch.nn.functional as F

    n = rewards.shape[0] // 2
    diff = rewards[:n] - rewards[n:]
    loss = -F.logsigmoid(diff - margin).sum()
    if center_coef:
        # Weighted by the pairs, so accumulated micro-batches average their penalties.
        loss = loss + center_coef * n * rewards.mean() ** 2
    return loss, n, int((diff > 0).sum()), float(diff.detach().sum())


class RewardRecipe(BatchStage):
    """A LoRA reward model with a scalar score head, on preference pairs."""

    name = "rm"

    @property
    def saved(self) -> str:
        """What the final files hold."""
        return "reward adapter, score head" if self.cfg.lora.enabled else "reward model"

    def __init__(self, cfg: Config, recipe_path: str | None = None):
        self.cfg = cfg
        self.recipe_path = recipe_path

    def setup(self) -> None:
        """Validate inputs, tokenize, load the model and optimizer, resume if asked."""
        from llamatune import model as loader
        from llamatune.health import pair_context
        from llamatune.rundir import starting_adapter

        cfg = self.cfg
        sft = starting_adapter(cfg, "llamatune rm")
        begun = training.start(cfg, "pairs", "llamatune rm", self.recipe_path)
        self.run_dir, data = begun.run_dir, begun.data
        self.train_samples, self.eval_samples = data.train, data.eval
        self.alarm_context = pair_context(data.train, data.eval, cfg.train.max_length)
        full = not cfg.lora.enabled
        self.loaded = loader.load_base(cfg.model, trainable=True, full=full, seed=cfg.train.seed)
        if sft is not None:
            loader.add_adapter(self.loaded, "reward", source=sft, dropout=cfg.lora.dropout)
        elif cfg.lora.enabled:
            loader.add_adapter(self.loaded, "reward", lcfg=cfg.lora)
        loader.add_head(self.loaded, "score")
        self.net = loader.finish(self.loaded, full=full)
        self.tokenizer, self.device = self.loaded.tokenizer, self.loaded.device
        self.pad_id = self.tokenizer.pad_token_id
        self.loop = training.Loop(cfg, self, self.loaded, begun, has_eval=bool(self.eval_samples))
        print(loader.model_line(cfg.model.path, self.loaded, f" + SFT {sft}" if sft else ""),
              flush=True)

    # -- what the shared loop asks of this stage --------------------------------------------
    def batches(self, epoch: int) -> list[dict]:
        """The epoch's micro-batches: both sides of each pair, chosen rows first."""
        return training.pair_batches(self.train_samples, self.cfg.train, epoch, self.pad_id)

    def count(self, batch: dict) -> int:
        """Pairs."""
        return training.n_pairs(batch)

    def _rewards(self, batch: dict):
        return self.net("score", {k: v.to(self.device) for k, v in batch.items()})

    def loss(self, batch: dict):
        """Summed pairwise loss, and the pairs ranked right (``accuracy``)."""
        rc = self.cfg.reward
        loss_sum, _, correct, _ = _pair_loss(self._rewards(batch), rc.center_coef, rc.margin)
        return loss_sum, {"accuracy": correct}

    def evaluate(self) -> dict:
        """Loss, pairwise accuracy and mean reward margin over the eval pairs."""
        rc = self.cfg.reward
        total, pairs, correct, margin = 0.0, 0, 0, 0.0
        for batch in training.pair_batches(self.eval_samples, self.cfg.train, 0, self.pad_id,
                                           shuffle=False):
            loss, n, ok, m = _pair_loss(self._rewards(batch), rc.center_coef, rc.margin)
            total, pairs, correct, margin = total + loss.item(), pairs + n, correct + ok, margin + m
        pairs = max(pairs, 1)
        return {"eval_loss": total / pairs, "eval_accuracy": correct / pairs,
                "eval_margin": margin / pairs}


def main(cfg: Config, recipe_path: str | None = None) -> int:
    """Run the whole stage.

    Returns:
        The process exit code.
    """
    return training.run_stage(RewardRecipe(cfg, recipe_path))
