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
import math
import time

from llamatune import dist, training
from llamatune.config import Config
from llamatune.errors import UserError
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
        from llamatune.rundir import REFERENCE_DIR, keep_copy, starting_adapter

        cfg, p = self.cfg, self.cfg.ppo
        start = starting_adapter(cfg, "llamatune ppo", REFERENCE_DIR)
        self.reward_fn = _reward_fn(cfg)
        begun = training.start(cfg, "prompts", "llamatune ppo", self.recipe_path)
        self.run_dir, data = begun.run_dir, begun.data
        self.train_samples, self.eval_samples = data.train, data.eval
        self.alarm_context = {"max_new_tokens": p.max_new_tokens}  # llamatune.health
        self.loaded = loader.load_base(cfg.model, trainable=True, seed=cfg.train.seed)
        if start is not None:
            start = str(keep_copy(self.run_dir, start, REFERENCE_DIR))
        self.reference = loader.add_policy(self.loaded, cfg.lora, start, dropout=0.0)
        self.rm = self._reward_model() if p.reward_model else None
        self.gae = p.advantage == "gae"
        if self.gae:
            self._value_head()
        self.net = loader.finish(self.loaded)
        if self.rm is not None and self.rm.net is None:
            self.rm.net = self.net  # stacked on this base
        _no_dropout(self.net)
        self.tokenizer, self.device = self.loaded.tokenizer, self.loaded.device
        self.pad_id = self.tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(self.tokenizer, cfg.data.template)
        self.kl = _adaptive_kl(p)
        self.reward_stats = [0.0, 0.0, 0.0]  # count, mean, M2 (Welford) for ppo.reward_norm
        self.loop = training.Loop(cfg, self, self.loaded, begun, has_eval=bool(self.eval_samples))
        ref = f"the SFT adapter {cfg.model.adapter}, frozen" if start else "the base"
        reward = (f"reward model {p.reward_model} ({'stacked' if self.rm.adapter else 'own copy'})"
                  if self.rm else f"reward {p.reward_fn}")
        print(loader.model_line(cfg.model.path, self.loaded, f" (reference: {ref}; {reward}; "
                                f"{p.advantage})"), flush=True)

    def _reward_model(self):
        """The reward model: stacked on this base when it shares it, else its own copy."""
        from llamatune.rundir import Run
        from llamatune.score import attach_reward, load_reward_model

        rm_cfg = Run.open(self.cfg.ppo.reward_model, stages=("rm",), use="ppo.reward_model").cfg
        m, r = self.cfg.model, rm_cfg.model
        if (r.path, r.quantization, r.dtype) == (m.path, m.quantization, m.dtype):
            return attach_reward(self.loaded, self.cfg.ppo.reward_model)
        return load_reward_model(self.cfg.ppo.reward_model, device=m.device)

    def _value_head(self) -> None:
        """PPO's critic: a scalar head on the policy's hidden states, from the RM's if it fits."""
        import torch

        from llamatune import model as loader

        head = loader.add_head(self.loaded, "value", bias=True)
        source = None
        if self.rm is not None:
            source = (self.loaded.heads.get(self.rm.head) if self.rm.adapter else
                      self.rm.net.heads[self.rm.head])
        if source is not None and source.linear.weight.shape == head.linear.weight.shape:
            with torch.no_grad():
                head.linear.weight.copy_(source.linear.weight)

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

        p = self.cfg.ppo
        rows = [self.train_samples[i] for i in batch["idx"] for _ in range(p.k)]
        t0 = time.perf_counter()
        torch.manual_seed(self.cfg.train.seed * 1_000_003 + step)  # sampling, resumable
        roll = self._rollout(rows)
        parts = _partition(len(rows), self.cfg.train.batch_size, seed=self.cfg.train.seed
                           * 7919 + step)
        one_pass = self._one_pass(len(parts))
        scored = self._score(roll, parts, one_pass)
        rollout_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        figures, loss, grad_norm = self._update(updates, roll, scored, parts, one_pass)
        if one_pass and scored["ref"] is not None:
            scored["kl"] = (scored["old"] - scored["ref"]) * roll["mask"]
        figures.update(self._rollout_figures(roll, scored), rollout_s=round(rollout_s, 3),
                       update_s=round(time.perf_counter() - t1, 3), kl_coef=self.kl.coef,
                       tokens=int(roll["mask"].sum()), loss=loss)
        figures = dist.mean(figures)  # every process then adapts and stops alike
        tokens, loss = int(figures.pop("tokens") * dist.world().size), figures.pop("loss")
        if "kl" in figures:
            self.kl.update(figures["kl"], len(rows))
        if p.sample_every and (step + 1) % p.sample_every == 0 and dist.world().main:
            self._write_samples(step + 1, rows, roll, scored)
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
        ``ppo.max_kl`` (skipped without a bound).
        """
        p = self.cfg.ppo
        return (not self.gae and p.epochs == 1 and p.kl_coef == 0 and p.kl_target is None
                and n_parts <= self.cfg.train.grad_accum)

    def _generate(self, prompts, **kw):
        """The policy's responses to ``prompts`` (see :func:`llamatune.rollout.generate`).

        Under FSDP2 from whole weights (each process decodes its own number of steps); under
        ZeRO-3 every process decodes in step, its layers gathering inside their forward.
        """
        from llamatune.rollout import generate

        with dist.full_params(self.net):
            return generate(self.net.model, self.tokenizer, prompts, stop_ids=self.stop_ids,
                            max_new_tokens=self.cfg.ppo.max_new_tokens,
                            synced=dist.world().zero == 3, **kw)

    def _rollout(self, rows) -> dict:
        from llamatune.rollout import response_batch

        p = self.cfg.ppo
        prompts = [s["input_ids"] for s in rows]
        resp = self._generate(prompts, temperature=p.temperature, top_p=p.top_p)
        batch = response_batch(prompts, resp.ids, self.pad_id)
        return {"batch": batch, "mask": batch["labels"][:, 1:] != -100, "text": resp.text,
                "ids": resp.ids, "ended": resp.ended, "rows": rows}

    def _score(self, roll, parts, one_pass: bool = False) -> dict:
        """Old and reference log-probs, values and rewards of a rollout, in the update's parts.

        With ``one_pass`` (see :meth:`_one_pass`) the policy is not scored here: the update
        fills ``old`` and ``entropy`` from its own forward; the reference runs only when
        ``ppo.max_kl`` needs the KL (``ref`` is ``None`` otherwise).
        """
        import torch

        from llamatune.rollout import dense

        p, b, mask = self.cfg.ppo, roll["batch"], roll["mask"]
        n, t = mask.shape
        old, ref = torch.zeros(n, t), torch.zeros(n, t)
        values, entropy = torch.zeros(n, t), torch.zeros(n, t)
        need_ref = not one_pass or p.max_kl is not None or p.kl_loss_coef > 0
        with torch.no_grad():
            for idx in parts:
                mb, w = self._sub(b, idx)
                m = mask[idx, :w]
                if not one_pass:
                    out = self.net("logprobs", mb, temperature=p.temperature, entropy=True,
                                   values="value" if self.gae else None)
                    old[idx, :w] = dense(out["logp"].float().cpu(), m)
                    entropy[idx, :w] = dense(out["entropy"].float().cpu(), m)
                    if self.gae:
                        values[idx, :w] = out["values"].float().cpu() * m
                if need_ref:
                    r = self.net("logprobs", mb, adapter=self.reference,
                                 temperature=p.temperature)
                    ref[idx, :w] = dense(r["logp"].float().cpu(), m)
        scores = torch.tensor(self._rewards(roll), dtype=torch.float32)
        raw = scores.clone()
        if p.missing_eos_penalty is not None:
            scores = scores + p.missing_eos_penalty * (~torch.tensor(roll["ended"])).float()
        if p.reward_clip is not None:
            scores = scores.clamp(-p.reward_clip, p.reward_clip)
        if p.reward_norm:
            scores = self._normalize(scores)
        kl = (old - ref) * mask
        if self.gae:
            from llamatune.advantages import gae, whiten

            rewards = -self.kl.coef * kl
            last = mask.float().cumsum(-1).argmax(-1)  # each response's last token
            rewards[torch.arange(n), last] += scores
            adv, returns = gae(rewards, values, mask, p.gamma, p.lam)
            adv = whiten(adv, mask)
        else:
            from llamatune.advantages import group_advantages

            seq = scores - self.kl.coef * kl.sum(-1)
            adv = group_advantages(seq, p.k, p.advantage)[:, None] * mask
            returns = torch.zeros_like(adv)
        return {"old": old, "ref": ref if need_ref else None, "values": values,
                "entropy": entropy, "adv": adv, "returns": returns, "scores": raw,
                "shaped": scores, "kl": kl}

    def _rewards(self, roll) -> list[float]:
        rows, text = roll["rows"], roll["text"]
        if self.rm is not None:
            convs = [s["messages"] + [{"role": "assistant", "content": r}]
                     for s, r in zip(rows, text)]
            return self.rm.score(convs, batch_size=self.cfg.train.batch_size)
        prompts = [s["messages"][-1]["content"] for s in rows]
        keys = sorted({k for s in rows for k in s["fields"]})
        fields = {k: [s["fields"].get(k) for s in rows] for k in keys}
        out = self.reward_fn(prompts, text, **fields)
        if len(out) != len(text) or not all(isinstance(x, (int, float)) for x in out):
            raise UserError(f"ppo.reward_fn {self.cfg.ppo.reward_fn} returned {len(out)} "
                            f"values for {len(text)} responses; it must return one number each.")
        return [float(x) for x in out]

    def _normalize(self, scores):
        n, mean, m2 = self.reward_stats
        for x in scores.tolist():
            n += 1
            d = x - mean
            mean += d / n
            m2 += d * (x - mean)
        self.reward_stats = [n, mean, m2]
        std = math.sqrt(m2 / max(n - 1, 1)) if n > 1 else 1.0
        return (scores - mean) / (std + 1e-6)

    def _update(self, updates, roll, scored, parts,
                one_pass: bool = False) -> tuple[dict, float, float | None]:
        """``ppo.epochs`` passes of clipped PPO over the rollout, ``train.grad_accum`` parts a step."""
        import torch

        from llamatune.advantages import kl_k3, masked_mean, policy_loss, value_loss
        from llamatune.rollout import dense

        p, tc = self.cfg.ppo, self.cfg.train
        mask, b = roll["mask"], roll["batch"]
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0,
                "ratio_mean": 0.0, "kl_loss": 0.0, "entropy_bonus": 0.0}
        ent_mode = "grad" if p.entropy_coef > 0 else one_pass
        done = skipped = pending = 0
        grad_norm, loss_acc = None, 0.0
        for epoch in range(p.epochs):
            order = parts if epoch == 0 else _partition(len(mask), tc.batch_size,
                                                        seed=self.cfg.train.seed + epoch)
            for idx in order:
                mb, w = self._sub(b, idx)
                m = mask[idx, :w].to(self.device)

                def part(key, idx=idx, w=w):
                    return scored[key][idx, :w].to(self.device)

                out = self.net("logprobs", mb, temperature=p.temperature, entropy=ent_mode,
                               values="value" if self.gae else None)
                logp = dense(out["logp"].float(), m)
                if one_pass:  # the weights that sampled this mini-batch score it
                    scored["old"][idx, :w] = logp.detach().cpu()
                    scored["entropy"][idx, :w] = dense(out["entropy"].float(), m).detach().cpu()
                pg, clipfrac, approx_kl, ratio = policy_loss(logp, part("old"), part("adv"), m,
                                                             p.cliprange)
                loss = pg
                kl_term = ent_term = torch.zeros(())
                if p.kl_loss_coef > 0:
                    kl_term = masked_mean(kl_k3(logp, part("ref")), m)
                    loss = loss + p.kl_loss_coef * kl_term
                if p.entropy_coef > 0:
                    ent_term = masked_mean(dense(out["entropy"].float(), m), m)
                    loss = loss - p.entropy_coef * ent_term
                vf = torch.zeros(())
                if self.gae:
                    vf = value_loss(out["values"] * m, part("values"), part("returns"), m,
                                    p.cliprange_value)
                    loss = loss + p.vf_coef * vf
                # NaN included: nothing learns from it (on any process: their steps stay in step)
                if dist.all_sum([0.0 if ratio <= p.ratio_threshold else 1.0])[0] > 0:
                    skipped += 1
                    continue
                updates.backward(loss / tc.grad_accum, boundary=pending + 1 == tc.grad_accum)
                loss_acc += float(loss.detach())
                pending += 1
                done += 1
                for k, v in (("policy_loss", float(pg.detach())), ("value_loss", float(vf.detach())),
                             ("clipfrac", clipfrac), ("approx_kl", approx_kl), ("ratio_mean", ratio),
                             ("kl_loss", float(kl_term.detach())),
                             ("entropy_bonus", float(ent_term.detach()))):
                    sums[k] += v
                if pending == tc.grad_accum:
                    grad_norm = updates.apply(loss_acc / pending)
                    pending, loss_acc = 0, 0.0
        if pending:
            grad_norm = updates.apply(loss_acc / pending)
        figures = {k: v / max(done, 1) for k, v in sums.items()}
        figures["skipped"] = skipped
        if not self.gae:
            figures.pop("value_loss")
        for key, coef in (("kl_loss", p.kl_loss_coef), ("entropy_bonus", p.entropy_coef)):
            if coef == 0:
                figures.pop(key)
        loss = (figures["policy_loss"] + p.vf_coef * figures.get("value_loss", 0.0)
                + p.kl_loss_coef * figures.get("kl_loss", 0.0)
                - p.entropy_coef * figures.get("entropy_bonus", 0.0))
        return figures, loss, grad_norm

    def _rollout_figures(self, roll, scored) -> dict:
        from llamatune.advantages import kl_k3, masked_mean

        mask = roll["mask"]
        scores = scored["scores"]
        out = {"reward_mean": float(scores.mean()),
               "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
               "entropy": float(masked_mean(scored["entropy"], mask)),
               "response_len": float(mask.sum(-1).float().mean()),
               "no_eos_frac": float(1 - sum(roll["ended"]) / len(roll["ended"]))}
        if not self.gae:  # prompts whose answers all scored alike teach nothing (advantage 0)
            groups = scored["shaped"].view(-1, self.cfg.ppo.k)
            out["flat_groups"] = float((groups.max(1).values == groups.min(1).values)
                                       .float().mean())
        if scored["ref"] is not None:  # measured unless nothing asks for it (see _one_pass)
            out["kl"] = float(scored["kl"].sum(-1).mean())
            out["kl_k3"] = float((kl_k3(scored["old"], scored["ref"]) * mask).sum(-1).mean())
        return out

    def _sub(self, batch: dict, idx) -> tuple[dict, int]:
        """Rows ``idx`` of a rollout batch, cut to their longest row, on the device.

        Returns:
            The mini-batch and the width of its per-token tensors (its length minus one).
        """
        width = int(batch["attention_mask"][idx].sum(-1).max())
        return {k: v[idx][:, :width].to(self.device) for k, v in batch.items()
                if k in ("input_ids", "attention_mask", "labels")}, width - 1

    def evaluate(self) -> dict:
        """Greedy answers to the held-out prompts, scored by the reward."""
        resp = self._generate([s["input_ids"] for s in self.eval_samples], greedy=True,
                              batch_size=max(self.cfg.train.batch_size, 8))
        scores = self._rewards({"rows": self.eval_samples, "text": resp.text})
        n = max(len(scores), 1)
        out = {"eval_reward": sum(scores) / n}
        if self.rm is None:  # a rule: the share of answers that earn the full reward
            out["eval_accuracy"] = sum(s >= 1.0 for s in scores) / n
        return out

    # -- what a checkpoint keeps ---------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint keeps of this stage: the KL coefficient and reward statistics."""
        return {"kl_coef": self.kl.coef, "reward_stats": self.reward_stats}

    def load_state(self, state: dict) -> None:
        """Restore :meth:`state` from a checkpoint."""
        self.kl.coef, self.reward_stats = state["kl_coef"], list(state["reward_stats"])

    def _write_samples(self, step: int, rows, roll, scored) -> None:
        from llamatune._atomic import append_text, writing

        lines = [json.dumps({"step": step, "prompt": s["messages"][-1]["content"],
                             "response": text, "reward": round(score, 4)}) + "\n"
                 for s, text, score in list(zip(rows, roll["text"],
                                                scored["scores"].tolist()))[:4]]
        with writing("samples.jsonl", self.run_dir, "choose another output_dir, then "
                     "continue with resume=true."):
            append_text(self.run_dir / "samples.jsonl", "".join(lines))



def _partition(n: int, size: int, seed: int) -> list[list[int]]:
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [sorted(order[i : i + size]) for i in range(0, n, size)]


def _adaptive_kl(p):
    from llamatune.advantages import AdaptiveKL

    return AdaptiveKL(p.kl_coef, p.kl_target, p.kl_horizon)


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
