"""Reinforcement learning from a reward: ``llamatune ppo RECIPE`` (PPO, RLOO or GRPO).

The third stage of the Llama-2-Chat recipe. One base in memory serves everything: the
**policy** is a trainable LoRA adapter (a copy of the SFT run's adapter named by
``model.adapter``, or a new one); the **reference** is the starting model itself, a frozen copy
of that adapter or the bare base when there is none; PPO's **value function** is a scalar head
on the policy's last hidden states (initialized from the reward model's head when widths
match); a **reward model** (``ppo.reward_model``) on the same base is one more frozen adapter
and its head, stacked (on another base it loads on its own); a Python reward
(``ppo.reward_fn``) scores verifiable tasks instead. Dropout is off everywhere.

One **iteration** (a step of the shared :class:`~llamatune.training.Loop`; ``train.max_steps``
counts them): ``ppo.rollout_batch`` prompts, ``ppo.k`` completions each, sampled with the KV
cache at ``ppo.temperature`` / ``ppo.top_p`` and cut at the template's end token; the policy's
log-probs (at the same temperature), the reference's and the values scored in mini-batches of
``train.batch_size``, in the very partition the first PPO epoch uses (so its first ratios are
exactly 1); the reward (penalized, clipped, normalized as asked) with the per-token KL penalty
``-kl_coef * (logp - logp_ref)``; advantages by GAE (whitened over real response tokens) or,
critic-free, RLOO / GRPO over each prompt's completions; then ``ppo.epochs`` passes of the
clipped policy loss (and the clipped value loss), mini-batches skipped when their mean ratio
exceeds ``ppo.ratio_threshold``. ``metrics.jsonl`` has one row per iteration; held-out
prompts are answered greedily at the start, on ``train.eval_every`` and at the end
(``eval_accuracy`` for a 0/1 rule reward, ``eval_reward`` otherwise).
"""

from __future__ import annotations

import json
import time

from llamatune import dist, training
from llamatune.advantages import AdaptiveKL
from llamatune.config import Config
from llamatune.errors import UserError
from llamatune.experience import (
    RewardNorm,
    Rollout,
    Scored,
    advantages_of,
    dense,
    minibatch,
    partition,
    response_batch,
    score,
    shape_scores,
)
from llamatune.recipes import IterativeStage, StepResult

__all__ = ["PPORecipe", "main"]



class PPORecipe(IterativeStage):
    """PPO (or RLOO/GRPO) of a LoRA policy against its starting model, from prompts."""

    name = "ppo"
    eval_at_start = True

    @property
    def saved(self) -> str:
        """What the final files hold."""
        return "the PPO policy adapter" + (" and value head" if self.gae else "")

    def __init__(self, cfg: Config, recipe_path: str | None = None):
        self.cfg = cfg
        self.recipe_path = recipe_path

    # -- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        """Validate inputs, tokenize the prompts, load policy, reference, value and reward."""
        from llamatune import model as loader
        from llamatune.data.templates import stop_token_ids
        from llamatune.rundir import REFERENCE_DIR, starting_adapter

        cfg, p = self.cfg, self.cfg.ppo
        start = starting_adapter(cfg, "llamatune ppo", REFERENCE_DIR)
        self.reward_fn = _reward_fn(cfg)
        begun = training.start(cfg, "prompts", "llamatune ppo", self.recipe_path)
        self.run_dir, data = begun.run_dir, begun.data
        self.train_samples, self.eval_samples = data.train, data.eval
        self.alarm_context = {"max_new_tokens": p.max_new_tokens}  # llamatune.health
        self.loaded = loader.load_base(cfg.model, trainable=True, seed=cfg.train.seed)
        self.reference = loader.add_policy(self.loaded, cfg.lora, start, 0.0,
                                           self.run_dir)
        self.rm = _reward_model(cfg, self.loaded) if p.reward_model else None
        self.gae = p.advantage == "gae"
        if self.gae:
            _value_head(self.loaded, self.rm)
        self.net = loader.finish(self.loaded)
        if self.rm is not None and self.rm.net is None:
            self.rm.net = self.net  # stacked on this base
        _no_dropout(self.net)
        self.tokenizer, self.device = self.loaded.tokenizer, self.loaded.device
        self.pad_id = self.tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(self.tokenizer, cfg.data.template)
        self.kl = AdaptiveKL(p.kl_coef, p.kl_target, p.kl_horizon)
        self.norm = RewardNorm()  # ppo.reward_norm's running statistics
        self.loop = training.Loop(cfg, self, self.loaded, begun, has_eval=bool(self.eval_samples))
        ref = loader.reference_text(start and cfg.model.adapter)
        reward = (f"reward model {p.reward_model} ({'stacked' if self.rm.adapter else 'own copy'})"
                  if self.rm else f"reward {p.reward_fn}")
        print(loader.model_line(cfg.model.path, self.loaded, f" (reference: {ref}; {reward}; "
                                f"{p.advantage})"), flush=True)

    # -- what the shared loop asks of this stage --------------------------------------------
    def batches(self, epoch: int) -> list[dict]:
        """The epoch's rollout batches: ``ppo.rollout_batch`` prompt indices each, seeded."""
        import dataclasses

        tc = dataclasses.replace(self.cfg.train, batch_size=self.cfg.ppo.rollout_batch,
                                 group_by_length=False)
        # Per process: under a launcher each process rolls out its own prompts; a short last
        # batch would leave one without, so it is dropped there.
        groups = training.batch_groups([len(s["input_ids"]) for s in self.train_samples], tc,
                                       epoch, drop_last=dist.world().size > 1)
        return [{"idx": g} for g in groups]

    def batch_text(self, tc) -> str:
        """Prompts a process rolls out per iteration."""
        return f"{self.cfg.ppo.rollout_batch} prompts"

    def iteration(self, step: int, batch: dict, updates) -> StepResult:
        """One rollout batch and its PPO epochs (see the module docstring)."""
        import torch

        p, tc = self.cfg.ppo, self.cfg.train
        rows = [self.train_samples[i] for i in batch["idx"] for _ in range(p.k)]
        t0 = time.perf_counter()
        torch.manual_seed(tc.seed * 1_000_003 + step)  # sampling, resumable
        roll = _rollout(self, rows)
        parts = partition(len(rows), tc.batch_size, seed=tc.seed * 7919 + step)
        one_pass = self._one_pass(len(parts))
        scored = self._score(roll, parts, one_pass)
        rollout_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        figures, loss, grad_norm = _update(self, updates, roll, scored, parts, one_pass)
        if one_pass and scored.ref is not None:
            scored.kl = (scored.old - scored.ref) * roll.mask
        figures.update(_rollout_figures(roll, scored, None if self.gae else p.k),
                       rollout_s=round(rollout_s, 3), update_s=round(time.perf_counter() - t1, 3),
                       kl_coef=self.kl.coef, tokens=int(roll.mask.sum()), loss=loss)
        figures = dist.mean(figures)  # every process then adapts and stops alike
        tokens, loss = int(figures.pop("tokens") * dist.world().size), figures.pop("loss")
        if "kl" in figures:
            self.kl.update(figures["kl"], len(rows))
        if p.sample_every and (step + 1) % p.sample_every == 0 and dist.world().main:
            _write_samples(self.run_dir, step + 1, roll, scored)
        if p.max_kl is not None and not figures.get("kl", 0.0) <= p.max_kl:
            raise training.TrainingDiverged(
                f"ppo.max_kl: the mean KL to the reference reached {figures['kl']:.3g} at "
                f"iteration {step + 1} (bound {p.max_kl}); the run stopped before its next "
                "update. Lower train.lr or raise ppo.kl_coef, and resume from the last checkpoint.")
        return StepResult(loss, figures, tokens, grad_norm)

    def _one_pass(self, n_parts: int) -> bool:
        """Whether the update's own forward can stand in for the scoring pass of the policy.

        True for RLOO/GRPO with no KL in the reward, one PPO epoch and one optimizer step per
        iteration: every mini-batch is then scored by the very weights that sampled it, so
        the old log-probs *are* the update's (detached; the ratios are exactly 1) and nothing
        else needs them first. The reference is then run only to measure the KL for
        ``ppo.max_kl`` (skipped without a bound) or for the KL anchor ``ppo.kl_loss_coef``.
        """
        p = self.cfg.ppo
        return (not self.gae and p.epochs == 1 and p.kl_coef == 0 and p.kl_target is None
                and n_parts <= self.cfg.train.grad_accum)

    def _score(self, roll: Rollout, parts, one_pass: bool = False) -> Scored:
        """Old and reference log-probs, values and rewards of a rollout, in the update's parts.

        With ``one_pass`` (see :meth:`_one_pass`) the policy is not scored here: the update
        fills ``old`` and ``entropy`` from its own forward; the reference runs only when
        ``ppo.max_kl`` or ``ppo.kl_loss_coef`` needs it (``ref`` is ``None`` otherwise).
        """
        p = self.cfg.ppo
        need_ref = not one_pass or p.max_kl is not None or p.kl_loss_coef > 0
        logps = score(self.net, roll, parts, temperature=p.temperature, reference=self.reference,
                      value_head="value" if self.gae else None, policy=not one_pass,
                      need_ref=need_ref, device=self.device)
        raw, shaped = shape_scores(_rewards(self, roll.rows, roll.text), roll.ended, p, self.norm)
        return advantages_of(logps, raw, shaped, roll.mask, p, self.kl.coef, self.gae, need_ref)

    def evaluate(self) -> dict:
        """Greedy answers to the held-out prompts, scored by the reward."""
        resp = _generate(self, [s["input_ids"] for s in self.eval_samples], greedy=True,
                         batch_size=max(self.cfg.train.batch_size, 8))
        scores = _rewards(self, self.eval_samples, resp.text)
        n = max(len(scores), 1)
        out = {"eval_reward": sum(scores) / n}
        if self.rm is None:  # a rule: the share of answers that earn the full reward
            out["eval_accuracy"] = sum(s >= 1.0 for s in scores) / n
        return out

    # -- what a checkpoint keeps ---------------------------------------------------------------
    def state(self) -> dict:
        """The KL coefficient and the reward statistics."""
        return {"kl_coef": self.kl.coef, "reward_stats": self.norm.stats}

    def load_state(self, state: dict) -> None:
        """Restore :meth:`state` from a checkpoint."""
        self.kl.coef, self.norm = state["kl_coef"], RewardNorm(state["reward_stats"])


def _generate(r: PPORecipe, prompts, **kw):
    """The policy's responses to ``prompts`` (see :func:`llamatune.decoding.generate`).

    Under FSDP2 from whole weights (each process decodes its own number of steps); under
    ZeRO-3 every process decodes in step, its layers gathering inside their forward.
    """
    from llamatune.decoding import generate

    with dist.full_params(r.net):
        return generate(r.net.model, r.tokenizer, prompts, stop_ids=r.stop_ids,
                        max_new_tokens=r.cfg.ppo.max_new_tokens,
                        synced=dist.world().zero == 3, **kw)


def _rollout(r: PPORecipe, rows) -> Rollout:
    """The policy's sampled answers to ``rows`` (at ``ppo.temperature`` / ``top_p``)."""
    p = r.cfg.ppo
    prompts = [s["input_ids"] for s in rows]
    resp = _generate(r, prompts, temperature=p.temperature, top_p=p.top_p)
    batch = response_batch(prompts, resp.ids, r.pad_id)
    return Rollout(rows, batch, batch["labels"][:, 1:] != -100, resp.text, resp.ids,
                   resp.ended)


def _reward_model(cfg: Config, loaded):
    """The reward model: stacked on this base when it shares it, else its own copy."""
    from llamatune.rundir import Run
    from llamatune.score import attach_reward, load_reward_model

    rm_cfg = Run.open(cfg.ppo.reward_model, stages=("rm",), use="ppo.reward_model").cfg
    m, r = cfg.model, rm_cfg.model
    if (r.path, r.quantization, r.dtype) == (m.path, m.quantization, m.dtype):
        return attach_reward(loaded, cfg.ppo.reward_model)
    return load_reward_model(cfg.ppo.reward_model, device=m.device)


def _value_head(loaded, rm) -> None:
    """PPO's critic: a scalar head on the policy's hidden states, from the RM's if it fits."""
    import torch

    from llamatune import model as loader

    head = loader.add_head(loaded, "value", bias=True)
    source = None
    if rm is not None:
        source = loaded.heads.get(rm.head) if rm.adapter else rm.net.heads[rm.head]
    if source is not None and source.linear.weight.shape == head.linear.weight.shape:
        with torch.no_grad():
            head.linear.weight.copy_(source.linear.weight)


def _rewards(r: PPORecipe, rows, text) -> list[float]:
    """The reward of each response: the reward model's score, or ``ppo.reward_fn``'s."""
    if r.rm is not None:
        convs = [s["messages"] + [{"role": "assistant", "content": t}]
                 for s, t in zip(rows, text)]
        return r.rm.score(convs, batch_size=r.cfg.train.batch_size)
    prompts = [s["messages"][-1]["content"] for s in rows]
    keys = sorted({k for s in rows for k in s["fields"]})
    fields = {k: [s["fields"].get(k) for s in rows] for k in keys}
    out = r.reward_fn(prompts, text, **fields)
    if len(out) != len(text) or not all(isinstance(x, (int, float)) for x in out):
        raise UserError(f"ppo.reward_fn {r.cfg.ppo.reward_fn} returned {len(out)} "
                        f"values for {len(text)} responses; it must return one number each.")
    return [float(x) for x in out]


def _update(r: PPORecipe, updates, roll: Rollout, scored: Scored, parts,
            one_pass: bool) -> tuple[dict, float, float | None]:
    """``ppo.epochs`` passes of clipped PPO over the rollout, ``train.grad_accum`` parts a step."""
    p, tc = r.cfg.ppo, r.cfg.train
    sums = dict.fromkeys(("policy_loss", "value_loss", "clipfrac", "approx_kl", "ratio_mean",
                          "kl_loss", "entropy_bonus"), 0.0)
    done = skipped = pending = 0
    grad_norm, loss_acc = None, 0.0
    for epoch in range(p.epochs):
        order = parts if epoch == 0 else partition(len(roll.mask), tc.batch_size,
                                                   seed=tc.seed + epoch)
        for idx in order:
            loss, figures, ratio = _minibatch_loss(r, roll, scored, idx, one_pass)
            # NaN included: nothing learns from it (on any process: their steps stay in step)
            if dist.all_sum([0.0 if ratio <= p.ratio_threshold else 1.0])[0] > 0:
                skipped += 1
                continue
            updates.backward(loss / tc.grad_accum, boundary=pending + 1 == tc.grad_accum)
            loss_acc += float(loss.detach())
            pending += 1
            done += 1
            for k, v in figures.items():
                sums[k] += v
            if pending == tc.grad_accum:
                grad_norm = updates.apply(loss_acc / pending)
                pending, loss_acc = 0, 0.0
    if pending:
        grad_norm = updates.apply(loss_acc / pending)
    figures = {k: v / max(done, 1) for k, v in sums.items()}
    figures["skipped"] = skipped
    if not r.gae:
        figures.pop("value_loss")
    for key, coef in (("kl_loss", p.kl_loss_coef), ("entropy_bonus", p.entropy_coef)):
        if coef == 0:
            figures.pop(key)
    loss = (figures["policy_loss"] + p.vf_coef * figures.get("value_loss", 0.0)
            + p.kl_loss_coef * figures.get("kl_loss", 0.0)
            - p.entropy_coef * figures.get("entropy_bonus", 0.0))
    return figures, loss, grad_norm


def _minibatch_loss(r: PPORecipe, roll: Rollout, scored: Scored, idx, one_pass: bool):
    """One mini-batch's PPO loss (policy, KL anchor, entropy bonus, value), figures, mean ratio."""
    import torch

    from llamatune.advantages import kl_k3, masked_mean, policy_loss, value_loss

    p = r.cfg.ppo
    mb, w = minibatch(roll.batch, idx, r.device)
    m = roll.mask[idx, :w].to(r.device)

    def part(t):
        return t[idx, :w].to(r.device)

    out = r.net("logprobs", mb, temperature=p.temperature,
                entropy="grad" if p.entropy_coef > 0 else one_pass,
                values="value" if r.gae else None)
    logp = dense(out["logp"].float(), m)
    if one_pass:  # the weights that sampled this mini-batch score it
        scored.old[idx, :w] = logp.detach().cpu()
        scored.entropy[idx, :w] = dense(out["entropy"].float(), m).detach().cpu()
    pg, clipfrac, approx_kl, ratio = policy_loss(logp, part(scored.old), part(scored.adv), m,
                                                 p.cliprange)
    loss = pg
    kl_term = ent_term = vf = torch.zeros(())
    if p.kl_loss_coef > 0:
        kl_term = masked_mean(kl_k3(logp, part(scored.ref)), m)
        loss = loss + p.kl_loss_coef * kl_term
    if p.entropy_coef > 0:
        ent_term = masked_mean(dense(out["entropy"].float(), m), m)
        loss = loss - p.entropy_coef * ent_term
    if r.gae:
        vf = value_loss(out["values"] * m, part(scored.values), part(scored.returns), m,
                        p.cliprange_value)
        loss = loss + p.vf_coef * vf
    figures = {"policy_loss": float(pg.detach()), "value_loss": float(vf.detach()),
               "clipfrac": clipfrac, "approx_kl": approx_kl, "ratio_mean": ratio,
               "kl_loss": float(kl_term.detach()), "entropy_bonus": float(ent_term.detach())}
    return loss, figures, ratio


def _rollout_figures(roll: Rollout, scored: Scored, k: int | None) -> dict:
    """The rollout's row figures; ``k`` (critic-free): answers a prompt, for ``flat_groups``."""
    from llamatune.advantages import kl_k3, masked_mean

    mask, scores = roll.mask, scored.scores
    out = {"reward_mean": float(scores.mean()),
           "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
           "entropy": float(masked_mean(scored.entropy, mask)),
           "response_len": float(mask.sum(-1).float().mean()),
           "no_eos_frac": float(1 - sum(roll.ended) / len(roll.ended))}
    if k is not None:  # prompts whose answers all scored alike teach nothing (advantage 0)
        groups = scored.shaped.view(-1, k)
        out["flat_groups"] = float((groups.max(1).values == groups.min(1).values).float().mean())
    if scored.ref is not None:  # measured unless nothing asks for it (see _one_pass)
        out["kl"] = float(scored.kl.sum(-1).mean())
        out["kl_k3"] = float((kl_k3(scored.old, scored.ref) * mask).sum(-1).mean())
    return out


def _write_samples(run_dir, step: int, roll: Rollout, scored: Scored) -> None:
    from llamatune._atomic import append_text, writing

    lines = [json.dumps({"step": step, "prompt": s["messages"][-1]["content"],
                         "response": text, "reward": round(score, 4)}) + "\n"
             for s, text, score in list(zip(roll.rows, roll.text, scored.scores.tolist()))[:4]]
    with writing("samples.jsonl", run_dir, "choose another output_dir, then "
                 "continue with resume=true."):
        append_text(run_dir / "samples.jsonl", "".join(lines))


def _no_dropout(net) -> None:
    """Dropout off everywhere (LoRA dropout was set to 0 when the adapters were attached)."""
    import torch

    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = net.inner.config
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop"):
        if hasattr(cfg, key):
            setattr(cfg, key, 0.0)


def _reward_fn(cfg: Config):
    if cfg.ppo.reward_fn is None:
        return None
    from llamatune.rewards import load_reward_fn

    return load_reward_fn(cfg.ppo.reward_fn)


def main(cfg: Config, recipe_path: str | None = None) -> int:
    """Run the whole stage.

    Returns:
        The process exit code.
    """
    return training.run_stage(PPORecipe(cfg, recipe_path))
