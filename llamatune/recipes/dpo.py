"""Direct preference optimization: ``llamatune dpo RECIPE``.

The offline alternative to RM + PPO (Rafailov et al., 2023). Reads top to bottom: ``setup``
checks everything cheap and tokenizes the pairs (the shared :func:`~llamatune.training.start`),
loads one base with two adapters: the **policy** (a trainable copy of the SFT run's adapter
named by ``model.adapter``, or a new LoRA) and the **reference**, the starting model itself:
a frozen copy of that same adapter, or the bare base when there is none (disabling the
policy's adapter would give the base, not the SFT model). The shared
:class:`~llamatune.training.Loop` trains the policy; ``cleanup`` writes it as the run's
adapter (peft's default, applying to the base alone).

Per pair, with ``s = log p(answer | prompt)`` summed over the answer's tokens and its end
token, and ``delta = (s_policy(chosen) - s_ref(chosen)) - (s_policy(rejected) -
s_ref(rejected))``:

* ``sigmoid``: ``-log sigmoid(beta * delta)``; with ``dpo.label_smoothing = e`` (conservative
  DPO) ``-(1 - e) log sigmoid(beta * delta) - e log sigmoid(-beta * delta)``;
* ``ipo``: ``(delta' - 1 / (2 beta))**2`` with the log-ratios averaged per answer token;
* ``hinge``: ``max(0, 1 - beta * delta)``.

The implicit rewards ``beta * (s_policy - s_ref)`` of both answers are logged, with their
margin and how often the chosen one is higher. ``dpo.precompute_ref`` computes the
reference log-probs once before training.
"""

from __future__ import annotations

from llamatune import training
from llamatune.config import Config
from llamatune.recipes import BatchStage

__all__ = ["DPORecipe", "dpo_loss", "main"]



def dpo_loss(policy, reference, counts, beta: float, loss: str, label_smoothing: float = 0.0):
    """Summed DPO loss of a batch of pairs, and the figures logged for it (summed over pairs).

    Args:
        policy: ``[2n]`` policy log-probs of the answers, chosen rows first.
        reference: ``[2n]`` reference log-probs of the same answers.
        counts: ``[2n]`` answer tokens per row (IPO averages per token).
        beta: ``dpo.beta``.
        loss: ``sigmoid``, ``ipo`` or ``hinge``.
        label_smoothing: Conservative DPO's flip probability (``sigmoid``).

    Returns:
        ``(loss_sum, figures)``.
    """
    import torch
    import torch.nn.functional as F

    n = policy.shape[0] // 2
    ratios = policy - reference
    delta = ratios[:n] - ratios[n:]
    if loss == "sigmoid":
        per = -F.logsigmoid(beta * delta)
        if label_smoothing:
            per = per * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss == "ipo":
        avg = ratios / counts.clamp(min=1).to(ratios.dtype)
        per = (avg[:n] - avg[n:] - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        per = torch.relu(1 - beta * delta)
    else:
        raise ValueError(f"unknown dpo.loss {loss!r}")
    rewards = beta * ratios.detach()
    chosen, rejected = rewards[:n], rewards[n:]
    figures = {"rewards_chosen": float(chosen.sum()), "rewards_rejected": float(rejected.sum()),
               "reward_margin": float((chosen - rejected).sum()),
               "reward_accuracy": float((chosen > rejected).sum()),
               "logps_chosen": float(policy[:n].detach().sum()),
               "logps_rejected": float(policy[n:].detach().sum())}
    return per.sum(), figures


class DPORecipe(BatchStage):
    """DPO of a LoRA policy against its starting model, on preference pairs."""

    name = "dpo"
    saved = "the DPO policy adapter"

    def __init__(self, cfg: Config, recipe_path: str | None = None):
        self.cfg = cfg
        self.recipe_path = recipe_path

    def setup(self) -> None:
        """Validate inputs, tokenize, load policy and reference on one base, resume if asked."""
        from llamatune import model as loader
        from llamatune.health import pair_context
        from llamatune.rundir import REFERENCE_DIR, starting_adapter

        cfg = self.cfg
        start = starting_adapter(cfg, "llamatune dpo", REFERENCE_DIR)
        begun = training.start(cfg, "pairs", "llamatune dpo", self.recipe_path)
        self.run_dir, data = begun.run_dir, begun.data
        self.train_samples, self.eval_samples = data.train, data.eval
        self.alarm_context = pair_context(data.train, data.eval, cfg.train.max_length)
        self.loaded = loader.load_base(cfg.model, trainable=True, seed=cfg.train.seed)
        self.reference = loader.add_policy(self.loaded, cfg.lora, start, cfg.lora.dropout,
                                           self.run_dir)
        self.net = loader.finish(self.loaded)
        self.tokenizer, self.device = self.loaded.tokenizer, self.loaded.device
        self.pad_id = self.tokenizer.pad_token_id
        self.ref = {}  # split -> [pairs, 2] reference log-probs, when precomputed
        if cfg.dpo.precompute_ref:
            self._precompute_reference()
        self.loop = training.Loop(cfg, self, self.loaded, begun, has_eval=bool(self.eval_samples))
        ref = f" (reference: {loader.reference_text(start and cfg.model.adapter)})"
        print(loader.model_line(cfg.model.path, self.loaded, ref), flush=True)

    def _precompute_reference(self) -> None:
        """Score every pair once with the reference: ``self.ref`` then holds the log-probs."""
        import dataclasses

        import torch

        # No gradients: twice the training batch, in length order (little padding).
        tc = dataclasses.replace(self.cfg.train, batch_size=2 * self.cfg.train.batch_size)
        self.net.eval()
        with torch.no_grad():
            for split, samples in (("train", self.train_samples), ("eval", self.eval_samples)):
                ref = torch.zeros((len(samples), 2), dtype=torch.float64)
                order = sorted(range(len(samples)), key=lambda i: max(
                    len(samples[i]["chosen_ids"]), len(samples[i]["rejected_ids"])))
                for i in range(0, len(order), tc.batch_size):
                    part = order[i : i + tc.batch_size]
                    b = training.pair_batches([samples[k] for k in part], tc, 0, self.pad_id,
                                              shuffle=False)[0]
                    seq = self._logprobs(b, self.reference)["seq"].tolist()
                    for j, k in enumerate(part):
                        ref[k] = torch.tensor([seq[j], seq[len(part) + j]], dtype=torch.float64)
                self.ref[split] = ref
        self.net.train()

    # -- what the shared loop asks of this stage --------------------------------------------
    def batches(self, epoch: int) -> list[dict]:
        """The epoch's micro-batches: both sides of each pair, chosen rows first."""
        return self._with_reference(training.pair_batches(
            self.train_samples, self.cfg.train, epoch, self.pad_id), "train")

    def _with_reference(self, batches: list[dict], split: str) -> list[dict]:
        """Give ``batches`` their precomputed ``ref_logp`` (``[2n]``, chosen rows first)."""
        import torch

        ref = self.ref.get(split)
        if ref is not None:
            for b in batches:
                b["ref_logp"] = torch.cat([ref[b["index"], 0], ref[b["index"], 1]])
        return batches

    def count(self, batch: dict) -> int:
        """Pairs."""
        return training.n_pairs(batch)

    def _logprobs(self, batch: dict, adapter: str | None = None) -> dict:
        from llamatune.data.collate import PAIR_KEYS

        b = {k: batch[k].to(self.device) for k in PAIR_KEYS}
        return self.net("logprobs", b, adapter=adapter)

    def loss(self, batch: dict):
        """Summed DPO loss of the micro-batch's pairs, and the implicit-reward figures."""
        import torch

        d = self.cfg.dpo
        policy = self._logprobs(batch)
        if "ref_logp" in batch:  # precomputed (dpo.precompute_ref)
            reference = batch["ref_logp"].to(policy["seq"])
        else:
            with torch.no_grad():
                reference = self._logprobs(batch, self.reference)["seq"]
        return dpo_loss(policy["seq"], reference, policy["count"], d.beta, d.loss,
                        d.label_smoothing)

    def evaluate(self) -> dict:
        """The loss and implicit-reward figures over the held-out pairs (per pair)."""
        sums, pairs = {}, 0
        for batch in self._with_reference(training.pair_batches(
                self.eval_samples, self.cfg.train, 0, self.pad_id, shuffle=False), "eval"):
            loss, figures = self.loss(batch)
            for k, v in {"loss": loss.item(), **figures}.items():
                sums[k] = sums.get(k, 0.0) + v
            pairs += self.count(batch)
        return {f"eval_{k}": v / max(pairs, 1) for k, v in sums.items()}


def main(cfg: Config, recipe_path: str | None = None) -> int:
    """Run the whole stage.

    Returns:
        The process exit code.
    """
    return training.run_stage(DPORecipe(cfg, recipe_path))
