"""Reward modelling: ``llamatune rm RECIPE`` and ``llamatune score RM_DIR --data FILE``.

Reads top to bottom like the SFT stage: ``setup`` checks everything cheap (data, output
folder, the SFT run to start from) before the model loads, tokenizes both sides of every
pair with the recipe's chat template, loads the base with a scalar score head, merges an
SFT adapter into it when ``model.adapter`` names one, adds the reward LoRA adapter (the
head is trained in full, the base stays frozen) and resumes if asked; ``train`` runs the
loop; ``save_checkpoint`` writes a complete checkpoint; ``cleanup`` writes the adapter and
head into the run directory beside the config, tokenizer and template.

The reward of a sequence is the score head applied to the final hidden state of its last
real token (the template's end token), located from the attention mask: never from the pad
id, which may equal a real token, and correct for left and right padding alike.

Loss, per pair: ``-log sigmoid(r_chosen - r_rejected - reward.margin)``, plus
``reward.center_coef * mean(r)**2`` over the rewards of each micro-batch. With gradient
accumulation each pair weighs the same whatever micro-batch it landed in.

A finished run loads with :func:`load_reward_model`; its :meth:`RewardModel.score` is what
``llamatune score`` and the PPO stage call.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from llamatune import training
from llamatune._cache import cache_dir
from llamatune.config import Config
from llamatune.data import read_records, split_records, tokenize_preferences
from llamatune.data.templates import get_template
from llamatune.errors import UserError
from llamatune.recipes.sft import CONVERSATION_FORMATS, resolve_data_path, save_trainable

__all__ = [
    "RewardModel",
    "RewardRecipe",
    "load_reward_model",
    "main",
    "pair_batches",
    "prepare_pairs",
    "run_score",
    "sequence_rewards",
]

SFT_ADAPTER_DIR = "sft_adapter"
"""Where a reward run keeps a copy of the SFT adapter merged into its base (self-contained)."""


def prepare_pairs(cfg: Config, tokenizer, recipe_path: str | None = None):
    """Read, validate, split and tokenize the preference pairs.

    Both sides of a pair are the prompt plus that answer, rendered with ``data.template``
    and ending with the template's end token. ``data.eval_group_by`` holds out whole groups
    (for example topics), so evaluation measures unseen groups.

    Returns:
        ``(train_samples, eval_samples, stats)``; samples are
        ``{"chosen_ids", "rejected_ids", "group"}``.

    Raises:
        UserError: The data is not preference pairs, or a row or sample is bad.
    """
    d = cfg.data
    if d.format != "preference":
        raise UserError(
            f"data.format {d.format!r} does not hold preference pairs; llamatune rm takes "
            "data.format=preference (prompt, chosen, rejected)."
        )
    if cfg.train.packing:
        raise UserError(
            "train.packing=true does not apply to the reward model: each pair is scored as two "
            "whole sequences. Set train.packing=false."
        )
    get_template(d.template)
    path = resolve_data_path(d.path, recipe_path)
    records = read_records(path, d.format, d.fields, d.eval_group_by)
    if d.eval_path:
        train_recs = records
        eval_recs = read_records(resolve_data_path(d.eval_path, recipe_path), d.format, d.fields,
                                 d.eval_group_by, key="data.eval_path")
    else:
        train_recs, eval_recs = split_records(records, d.eval_split, cfg.train.seed,
                                              group_by=bool(d.eval_group_by))
    if d.max_samples:
        train_recs = train_recs[: d.max_samples]
    root = cache_dir() if d.cache else None
    kw = dict(system=d.system, max_length=cfg.train.max_length, cache_root=root)
    train, stats = tokenize_preferences(train_recs, tokenizer, d.template, **kw)
    evals = tokenize_preferences(eval_recs, tokenizer, d.template, **kw)[0] if eval_recs else []
    return train, evals, stats


def pair_batches(samples: list[dict], tcfg, epoch: int, pad_id: int,
                 shuffle: bool = True) -> list[dict]:
    """The micro-batches of one epoch: ``batch_size`` pairs, chosen sides first, then rejected.

    The order is seeded like :func:`llamatune.training.epoch_batches` (it depends only on the
    seed and the epoch), so a resumed run sees the same batches; with ``group_by_length``
    a batch holds pairs of similar length (both sides share one padded tensor, so a pair's
    longer side is what counts).

    Returns:
        Dicts with ``input_ids``, ``attention_mask`` (right padding) and ``n_real``; rows
        ``i`` and ``i + n`` of a batch of ``2n`` rows are the two sides of one pair.
    """
    from llamatune.data.collate import pad_batch

    def longer(i: int) -> int:
        return max(len(samples[i]["chosen_ids"]), len(samples[i]["rejected_ids"]))

    order = list(range(len(samples)))
    rng = random.Random(tcfg.seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    bs = tcfg.batch_size
    groups = [order[i : i + bs] for i in range(0, len(order), bs)]
    if shuffle and tcfg.group_by_length:
        # Sort within chunks of 64 batches so each batch holds similar lengths (little padding),
        # then shuffle the batches so the order still looks random to the optimizer.
        chunk = 64 * bs
        groups = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c : c + chunk], key=longer)
            groups += [part[i : i + bs] for i in range(0, len(part), bs)]
        rng.shuffle(groups)
    out = []
    for g in groups:
        rows = ([{"input_ids": samples[i]["chosen_ids"]} for i in g]
                + [{"input_ids": samples[i]["rejected_ids"]} for i in g])
        b = pad_batch(rows, pad_id)
        out.append({k: b[k] for k in ("input_ids", "attention_mask", "n_real")})
    return out


def sequence_rewards(model, input_ids, attention_mask):
    """One scalar reward per row, read at the row's last real token.

    The last real token is the rightmost position where ``attention_mask`` is 1, so left
    and right padding both work and the pad id is never consulted. Positions are counted
    over real tokens only, so a left-padded row is scored exactly as it would be alone.
    The score head runs on those positions only.

    Args:
        model: A ``*ForSequenceClassification`` model, bare or wrapped by peft.
        input_ids: ``(batch, length)`` token ids.
        attention_mask: ``(batch, length)``, 1 on real tokens.

    Returns:
        A float32 tensor of shape ``(batch,)``.
    """
    import torch

    from llamatune.model import unwrap_model

    inner = unwrap_model(model)
    backbone = getattr(inner, inner.base_model_prefix)
    mask = attention_mask.long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
    steps = torch.arange(mask.shape[1], device=mask.device)
    last = (steps * mask).argmax(-1)
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    head = inner.score
    # The head trains in float32 (the dtype policy) while the backbone may run in bf16. peft's
    # wrapper of a trained head forwards `.weight` to the copy that actually runs.
    h = h.to(head.weight.dtype)
    return head(h).squeeze(-1).float()


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


def _adapter_task(folder: str) -> str | None:
    import json

    return json.loads((Path(folder) / "adapter_config.json").read_text()).get("task_type")


def _merge_adapter(model, folder: str, key: str = "model.adapter"):
    """Merge a causal-LM LoRA adapter (an SFT run) into a sequence-classification base.

    The SFT adapter only touches the transformer blocks, whose module paths are the same
    under ``*ForCausalLM`` and ``*ForSequenceClassification``, so it loads onto the reward
    model's backbone directly and merges there. Its task type is dropped so peft does not
    wrap the model for generation or add a second copy of the score head.
    """
    from peft import PeftConfig, PeftModel

    pcfg = PeftConfig.from_pretrained(folder)
    pcfg.task_type = None
    pcfg.inference_mode = True
    try:
        merged = PeftModel.from_pretrained(model, folder, config=pcfg, is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(
            f"{key} {folder}: its adapter does not fit model.path (a different base model?): "
            f"{e}. Use the model.path the SFT run was trained on."
        ) from None
    return merged.merge_and_unload()


class RewardRecipe:
    """A LoRA reward model (scalar score head trained in full) on preference pairs."""

    def __init__(self, cfg: Config, recipe_path: str | None = None):
        self.cfg = cfg
        self.recipe_path = recipe_path
        self.step = 0
        self.epoch = 0
        self.micro = 0  # micro-batches of the current epoch already consumed

    def setup(self) -> None:
        """Validate inputs, tokenize, load the model and optimizer, resume if asked."""
        from llamatune.model import load_model, load_tokenizer, lora_config, resolve_model_path

        cfg = self.cfg
        self.run_dir = training.prepare_output_dir(cfg)
        get_template(cfg.data.template)  # before the model is resolved (maybe converted)
        sft = self._init_adapter()
        if not cfg.lora.enabled and cfg.model.quantization != "none":
            raise UserError(
                f"lora.enabled=false trains every weight, which a {cfg.model.quantization} base "
                "cannot do; set lora.enabled=true or model.quantization=none."
            )
        folder = resolve_model_path(cfg.model.path)
        tokenizer = load_tokenizer(cfg.model, folder)
        self.train_samples, self.eval_samples, stats = prepare_pairs(cfg, tokenizer,
                                                                     self.recipe_path)
        print(f"data: {stats.summary()}; eval {len(self.eval_samples)} pairs", flush=True)
        self.data_order = training.data_order(cfg, self.train_samples)
        ckpt = training.resume_checkpoint(cfg, self.run_dir, self.data_order) if cfg.resume else None

        training.create_output_dir(cfg, self.run_dir)
        training.set_seed(cfg.train.seed)
        # The base comes without an adapter so that an SFT adapter can be merged into it
        # first; the reward adapter then trains on top of the SFT model's weights.
        loaded = load_model(cfg.model, None, task="reward", trainable=True, seed=cfg.train.seed,
                            full=not cfg.lora.enabled)
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        self._keep_sft_copy(sft)
        if sft is not None:
            self.model = _merge_adapter(self.model, sft)
        if cfg.lora.enabled:
            from peft import get_peft_model

            self.model = get_peft_model(
                self.model, lora_config(cfg.lora, "SEQ_CLS", modules_to_save=["score"]))
        else:
            for p in self.model.parameters():
                p.requires_grad_(True)
        self.pad_id = self.tokenizer.pad_token_id
        n_micro = len(pair_batches(self.train_samples, cfg.train, 0, self.pad_id))
        self.steps_per_epoch = max(1, math.ceil(n_micro / cfg.train.grad_accum))
        self.total_steps = cfg.train.step_cap or math.ceil(cfg.train.epochs * self.steps_per_epoch)
        self.optimizer = training.build_optimizer(self.model, cfg.train)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        print(f"model: {cfg.model.path}{' + SFT ' + sft if sft else ''} on {self.device}, "
              f"{n_all:,} parameters, {n_train:,} trainable "
              f"({100 * n_train / max(n_all, 1):.2f}%); {loaded.describe(self.model)}",
              flush=True)
        self.scheduler = training.build_scheduler(self.optimizer, cfg.train, self.total_steps)
        resume_step = None
        if ckpt is not None:
            self._load_trainable(ckpt)
            state = training.load_checkpoint(ckpt, self.optimizer, self.scheduler, cfg.train.lr)
            self.step, self.epoch, self.micro = state["step"], state["epoch"], state["micro"]
            resume_step = self.step
            print(f"resumed from {ckpt} (step {self.step})", flush=True)
        self.metrics = training.MetricsWriter(self.run_dir / "metrics.jsonl", resume_step)
        training.write_run_files(self.run_dir, cfg, self.tokenizer, cfg.data.template)

    def _init_adapter(self) -> str | None:
        """The SFT adapter to merge into the base (checked before anything is written)."""
        cfg = self.cfg
        if cfg.model.adapter is None:
            return None
        kept = Path(cfg.output_dir).expanduser() / SFT_ADAPTER_DIR
        if cfg.resume and (kept / "adapter_config.json").is_file():
            return str(kept)  # the copy this run made, even if the SFT run has moved since
        from llamatune.recipes import resolve_adapter_dir

        folder = resolve_adapter_dir(cfg.model.adapter)
        task = _adapter_task(folder)
        if task not in (None, "CAUSAL_LM"):
            raise UserError(
                f"model.adapter {cfg.model.adapter} holds a {task} adapter; llamatune rm starts "
                "from an SFT run (a causal-LM adapter). To continue a reward run, use "
                "resume=true with its output_dir."
            )
        return folder

    def _keep_sft_copy(self, sft: str | None) -> None:
        """Copy the SFT adapter into the run, so the reward model loads from its folder alone."""
        import shutil

        dest = self.run_dir / SFT_ADAPTER_DIR
        if sft is not None and Path(sft).resolve() == dest.resolve():
            return
        # Also clears a copy left by an overwritten run that started from another base.
        shutil.rmtree(dest, ignore_errors=True)
        if sft is None:
            return
        tmp = self.run_dir / f".{SFT_ADAPTER_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
            if (Path(sft) / name).is_file():
                shutil.copy2(Path(sft) / name, tmp / name)
        tmp.rename(dest)

    def _load_trainable(self, ckpt: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        f = ckpt / "adapter_model.safetensors"
        if f.exists():
            set_peft_model_state_dict(self.model, load_file(str(f)))
        else:
            sd = load_file(str(ckpt / "model.safetensors"))
            self.model.load_state_dict(sd, strict=False)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def evaluate(self) -> dict:
        """Loss, pairwise accuracy and mean reward margin over the eval pairs."""
        import torch

        rc = self.cfg.reward
        self.model.eval()
        total, pairs, correct, margin = 0.0, 0, 0, 0.0
        with torch.no_grad():
            for batch in pair_batches(self.eval_samples, self.cfg.train, 0, self.pad_id,
                                      shuffle=False):
                b = self._to_device(batch)
                rewards = sequence_rewards(self.model, b["input_ids"], b["attention_mask"])
                loss, n, ok, m = _pair_loss(rewards, rc.center_coef, rc.margin)
                total += loss.item()
                pairs += n
                correct += ok
                margin += m
        self.model.train()
        pairs = max(pairs, 1)
        return {"eval_loss": total / pairs, "eval_accuracy": correct / pairs,
                "eval_margin": margin / pairs}

    def train(self) -> None:
        """Run the optimizer steps, logging, evaluating and checkpointing on schedule."""
        import torch

        tc, rc = self.cfg.train, self.cfg.reward
        self.model.train()
        bar = training.Progress(self.total_steps, self.step, tc.progress, "rm")
        batches = pair_batches(self.train_samples, tc, self.epoch, self.pad_id)
        params = [p for p in self.model.parameters() if p.requires_grad]
        t_log, tokens_log = time.perf_counter(), 0
        while self.step < self.total_steps:
            window = []
            while len(window) < tc.grad_accum:
                if self.micro >= len(batches):
                    self.epoch += 1
                    self.micro = 0
                    batches = pair_batches(self.train_samples, tc, self.epoch, self.pad_id)
                window.append(batches[self.micro])
                self.micro += 1
            n_pairs = sum(b["input_ids"].shape[0] // 2 for b in window)
            step_loss, step_correct = 0.0, 0
            for b in window:
                b = self._to_device(b)
                rewards = sequence_rewards(self.model, b["input_ids"], b["attention_mask"])
                loss_sum, _, ok, _ = _pair_loss(rewards, rc.center_coef, rc.margin)
                (loss_sum / n_pairs).backward()
                step_loss += loss_sum.item()
                step_correct += ok
                tokens_log += int(b["n_real"])
            grad_norm = None
            if tc.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm))
            loss = step_loss / n_pairs
            accuracy = step_correct / n_pairs
            training.check_finite(self.step + 1, loss, grad_norm, self.run_dir)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=False)
            self.step += 1
            if self.step % tc.log_every == 0 or self.step == self.total_steps:
                dt = time.perf_counter() - t_log
                row = {"step": self.step, "epoch": round(self.epoch + self.micro / len(batches), 4),
                       "loss": round(loss, 6), "lr": lr, "tokens_per_s": round(tokens_log / dt, 2),
                       "accuracy": round(accuracy, 4)}
                if grad_norm is not None:
                    row["grad_norm"] = round(grad_norm, 6)
                self.metrics.write(row)
                bar.update(loss=loss, acc=accuracy, tok_s=round(tokens_log / dt))
                t_log, tokens_log = time.perf_counter(), 0
            else:
                bar.update(loss=loss, acc=accuracy)
            if self.eval_samples and tc.eval_every and self.step % tc.eval_every == 0:
                self._log_eval(bar)
            if tc.save_every and self.step % tc.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        # The last step's scheduled evaluation already measured the final model.
        if self.eval_samples and not (tc.eval_every and self.step % tc.eval_every == 0):
            self._log_eval(None)

    def _log_eval(self, bar) -> None:
        ev = self.evaluate()
        self.metrics.write({"step": self.step, **{k: round(v, 6) for k, v in ev.items()}})
        msg = (f"step {self.step}: eval_loss {ev['eval_loss']:.4f}, eval_accuracy "
               f"{ev['eval_accuracy']:.3f}, eval_margin {ev['eval_margin']:.3f}")
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-STEP/`` (adapter + head, optimizer, scheduler, RNG, loop position)."""
        return training.save_checkpoint(
            self.run_dir, self.step, self.model, self.optimizer, self.scheduler,
            {"epoch": self.epoch, "micro": self.micro, "data_order": self.data_order},
            self.cfg.train.keep_checkpoints,
            save_trainable,
        )

    def cleanup(self) -> None:
        """Write the final adapter and score head beside the config, tokenizer and template."""
        import os
        import shutil

        tmp = self.run_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_trainable(self.model, tmp)
        for f in tmp.iterdir():
            os.replace(f, self.run_dir / f.name)
        tmp.rmdir()
        what = "reward adapter, score head" if self.cfg.lora.enabled else "reward model"
        print(f"saved {what}, tokenizer and config to {self.run_dir}", flush=True)


def main(cfg: Config, recipe_path: str | None = None) -> int:
    """Run the whole stage.

    Returns:
        The process exit code.
    """
    recipe = RewardRecipe(cfg, recipe_path)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return 0


@dataclass
class RewardModel:
    """A trained reward model with the template, system prompt and tokenizer it was trained with."""

    model: object
    tokenizer: object
    template: str
    system: str | None
    device: str

    def score(self, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
        """Score conversations, each ending with the assistant answer to judge.

        Conversations are rendered exactly like the training pairs, batched by length (so
        little padding is computed) and the scores returned in the order given.

        Args:
            conversations: Lists of ``{"role", "content"}`` messages.
            batch_size: Conversations per forward pass.

        Returns:
            One float per conversation.

        Raises:
            UserError: A conversation does not end with an assistant turn.
        """
        import torch

        from llamatune.data.collate import pad_batch
        from llamatune.data.templates import render

        seqs = []
        for i, conv in enumerate(conversations):
            if not conv or conv[-1].get("role") != "assistant":
                raise UserError(
                    f"conversation {i + 1} does not end with an assistant turn; the reward "
                    "model scores the last assistant answer."
                )
            seqs.append(render(self.tokenizer, self.template, conv, system=self.system).input_ids)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        scores = [0.0] * len(seqs)
        pad_id = self.tokenizer.pad_token_id
        with torch.no_grad():
            for k in range(0, len(order), max(1, batch_size)):
                idx = order[k : k + max(1, batch_size)]
                b = pad_batch([{"input_ids": seqs[i]} for i in idx], pad_id)
                r = sequence_rewards(self.model, b["input_ids"].to(self.device),
                                     b["attention_mask"].to(self.device))
                for i, v in zip(idx, r.tolist()):
                    scores[i] = v
        return scores


def load_reward_model(rm_dir: str, device: str = "auto") -> RewardModel:
    """Load a finished ``llamatune rm`` run for scoring.

    The run directory is self-contained: base model from its config, the SFT adapter it
    started from (merged into the base, as in training), then its reward adapter and head.

    Args:
        rm_dir: The reward-model run directory.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        A :class:`RewardModel` in eval mode.

    Raises:
        UserError: The folder is not a finished reward-model run.
    """
    import dataclasses

    from llamatune.config import ConfigError, load_config
    from llamatune.model import load_model

    p = Path(rm_dir).expanduser()
    has_adapter = (p / "adapter_config.json").is_file()
    full = (p / "model.safetensors").is_file() and (p / "config.json").is_file()
    if not (p / "config.yaml").is_file() or not (has_adapter or full):
        raise UserError(
            f"{rm_dir} is not a finished reward-model run (config.yaml plus the saved adapter); "
            "train one with `llamatune rm RECIPE`."
        )
    if has_adapter and _adapter_task(str(p)) != "SEQ_CLS":
        raise UserError(
            f"{rm_dir} holds a {_adapter_task(str(p))} adapter, not a reward model; "
            "point at the output_dir of `llamatune rm`."
        )
    try:
        cfg = load_config(p / "config.yaml")
    except ConfigError as e:
        raise UserError(f"{p}/config.yaml is not a valid run config: {e}") from None
    mcfg = dataclasses.replace(cfg.model, device=device if device != "auto" else cfg.model.device,
                               gradient_checkpointing=False, tokenizer=str(p), adapter=None)
    if not has_adapter:
        # Full fine-tuning saved the whole sequence-classification model into the run.
        mcfg = dataclasses.replace(mcfg, path=str(p), quantization="none")
        loaded = load_model(mcfg, None, task="reward", trainable=False)
        model = loaded.model
    else:
        from peft import PeftModel

        loaded = load_model(mcfg, None, task="reward", trainable=False)
        model = loaded.model
        sft = p / SFT_ADAPTER_DIR
        if cfg.model.adapter is not None:
            if not (sft / "adapter_config.json").is_file():
                raise UserError(f"{rm_dir} started from an SFT run but lacks its copy in "
                                f"{SFT_ADAPTER_DIR}/; the run directory is incomplete.")
            model = _merge_adapter(model, str(sft), key=f"{rm_dir}/{SFT_ADAPTER_DIR}")
        model = PeftModel.from_pretrained(model, str(p), is_trainable=False)
        model.eval()
    return RewardModel(model, loaded.tokenizer, cfg.data.template, cfg.data.system,
                       loaded.device)


def run_score(rm_dir: str, data: str, fmt: str = "messages", as_json: bool = False,
              batch_size: int = 8) -> int:
    """Print one score per conversation of ``data``, in row order (``llamatune score``).

    Returns:
        The exit code.

    Raises:
        UserError: Bad rows, a format without conversations, or not a reward-model run.
    """
    import json

    if fmt not in CONVERSATION_FORMATS:
        raise UserError(f"--format {fmt!r}: llamatune score reads conversations ending with the "
                        f"answer to score; use {', '.join(CONVERSATION_FORMATS)}.")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}.")
    records = read_records(data, fmt, key="--data")
    rm = load_reward_model(rm_dir)
    scores = rm.score([r["messages"] for r in records], batch_size=batch_size)
    for s in scores:
        print(json.dumps({"score": round(s, 6)}) if as_json else f"{s:.6f}")
    return 0
