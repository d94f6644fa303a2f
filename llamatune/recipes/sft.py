"""Supervised fine-tuning: ``llamatune sft RECIPE``.

Reads top to bottom: ``setup`` checks everything cheap (data, output folder) before the
model loads, tokenizes with invariant checks, loads the model and optimizer (and resumes
if asked); ``train`` runs the loop; ``save_checkpoint`` writes a complete checkpoint;
``cleanup`` writes the final adapter, tokenizer and template into the run directory.

Loss: next-token cross-entropy on supervised tokens only (answers and their end tokens).
With gradient accumulation the summed loss of every micro-batch is divided by the number
of supervised tokens in the whole accumulation window, so each token weighs the same
whatever micro-batch it landed in.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from llamatune import training
from llamatune._cache import cache_dir
from llamatune.config import Config
from llamatune.data import read_records, split_records, tokenize_conversations
from llamatune.data.templates import get_template
from llamatune.errors import UserError

__all__ = ["SFTRecipe", "main", "prepare_data", "save_trainable"]

CONVERSATION_FORMATS = ("alpaca", "sharegpt", "messages")


def resolve_data_path(path: str, recipe_path: str | None) -> str:
    """Find a data path: as given, else next to the recipe file, else among the shipped sets.

    Relative paths are tried against the working directory first.
    """
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return str(p)
    candidates = []
    if recipe_path:
        rp = Path(recipe_path).resolve().parent
        candidates += [rp / path, rp.parent / path]
    from llamatune.shipped import shipped_datasets_dir

    shipped = shipped_datasets_dir()
    if shipped is not None:
        candidates.append(shipped / Path(path).name)
    for c in candidates:
        if c.exists():
            return str(c)
    return path


def prepare_data(cfg: Config, tokenizer, recipe_path: str | None = None):
    """Read, validate, split and tokenize the conversation data.

    Returns:
        ``(train_samples, eval_samples, stats)``.
    """
    d = cfg.data
    if d.format not in CONVERSATION_FORMATS:
        raise UserError(
            f"data.format {d.format!r} does not hold conversations; llamatune sft takes "
            f"{', '.join(CONVERSATION_FORMATS)}."
        )
    get_template(d.template)
    path = resolve_data_path(d.path, recipe_path)
    records = read_records(path, d.format, d.fields, d.eval_group_by)
    if d.eval_path:
        train_recs = records
        eval_recs = read_records(resolve_data_path(d.eval_path, recipe_path), d.format, d.fields,
                                 key="data.eval_path")
    else:
        train_recs, eval_recs = split_records(records, d.eval_split, cfg.train.seed,
                                              group_by=bool(d.eval_group_by))
    if d.max_samples:
        train_recs = train_recs[: d.max_samples]
    root = cache_dir() if d.cache else None
    kw = dict(system=d.system, max_length=cfg.train.max_length, truncation=d.truncation,
              cache_root=root)
    train, stats = tokenize_conversations(train_recs, tokenizer, d.template, **kw)
    evals = tokenize_conversations(eval_recs, tokenizer, d.template, **kw)[0] if eval_recs else []
    return train, evals, stats


def save_trainable(model, folder: Path) -> None:
    """Save the adapter (peft) or, for full fine-tuning, the whole model, as safetensors."""
    model.save_pretrained(str(folder), safe_serialization=True)


class SFTRecipe:
    """Supervised fine-tuning of a LoRA adapter (or the full model) on conversations."""

    def __init__(self, cfg: Config, recipe_path: str | None = None):
        self.cfg = cfg
        self.recipe_path = recipe_path
        self.step = 0
        self.epoch = 0
        self.micro = 0  # micro-batches of the current epoch already consumed

    def setup(self) -> None:
        """Validate inputs, tokenize, load the model and optimizer, resume if asked."""
        from llamatune.model import load_model, load_tokenizer, resolve_model_path

        cfg = self.cfg
        self.run_dir = training.prepare_output_dir(cfg)
        get_template(cfg.data.template)  # before the model is resolved (maybe converted)
        folder = resolve_model_path(cfg.model.path)
        tokenizer = load_tokenizer(cfg.model, folder)
        self.train_samples, self.eval_samples, stats = prepare_data(cfg, tokenizer,
                                                                    self.recipe_path)
        print(f"data: {stats.summary()}; eval {len(self.eval_samples)} samples", flush=True)
        self.data_order = training.data_order(cfg, self.train_samples)
        ckpt = training.resume_checkpoint(cfg, self.run_dir, self.data_order) if cfg.resume else None

        training.create_output_dir(cfg, self.run_dir)
        training.set_seed(cfg.train.seed)
        loaded = load_model(cfg.model, cfg.lora, adapter=self._init_adapter(), trainable=True,
                            seed=cfg.train.seed, full=not cfg.lora.enabled and cfg.model.adapter is None)
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        if not cfg.lora.enabled and cfg.model.adapter is None:
            for p in self.model.parameters():
                p.requires_grad_(True)
        self.pad_id = self.tokenizer.pad_token_id
        n_micro = len(training.epoch_batches(self.train_samples, cfg.train, 0, self.pad_id))
        self.steps_per_epoch = max(1, math.ceil(n_micro / cfg.train.grad_accum))
        self.total_steps = cfg.train.step_cap or math.ceil(cfg.train.epochs * self.steps_per_epoch)
        self.optimizer = training.build_optimizer(self.model, cfg.train)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        print(f"model: {cfg.model.path} on {self.device}, {n_all:,} parameters, "
              f"{n_train:,} trainable ({100 * n_train / max(n_all, 1):.2f}%); "
              f"{loaded.describe(self.model)}", flush=True)
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

    def _init_adapter(self):
        if self.cfg.model.adapter is None:
            return None
        from llamatune.recipes import resolve_adapter_dir

        return resolve_adapter_dir(self.cfg.model.adapter)

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

    def evaluate(self) -> float:
        """Mean next-token loss over the supervised tokens of the eval set."""
        import torch

        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in training.epoch_batches(self.eval_samples, self.cfg.train, 0, self.pad_id,
                                                shuffle=False):
                loss, n = training.lm_loss_sum(self.model, self._to_device(batch), self.cfg.model.fused)
                total += loss.item()
                count += int(n)
        self.model.train()
        return total / max(count, 1)

    def train(self) -> None:
        """Run the optimizer steps, logging, evaluating and checkpointing on schedule."""
        import torch

        tc = self.cfg.train
        self.model.train()
        bar = training.Progress(self.total_steps, self.step, tc.progress, "sft")
        batches = training.epoch_batches(self.train_samples, tc, self.epoch, self.pad_id)
        params = [p for p in self.model.parameters() if p.requires_grad]
        t_log, tokens_log = time.perf_counter(), 0
        while self.step < self.total_steps:
            window = []
            while len(window) < tc.grad_accum:
                if self.micro >= len(batches):
                    self.epoch += 1
                    self.micro = 0
                    batches = training.epoch_batches(self.train_samples, tc, self.epoch,
                                                     self.pad_id)
                window.append(batches[self.micro])
                self.micro += 1
            n_sup = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
            step_loss = 0.0
            for b in window:
                loss_sum, _ = training.lm_loss_sum(self.model, self._to_device(b), self.cfg.model.fused)
                (loss_sum / n_sup).backward()
                step_loss += loss_sum.item()
                tokens_log += int(b["n_real"])
            grad_norm = None
            if tc.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm))
            loss = step_loss / n_sup
            training.check_finite(self.step + 1, loss, grad_norm, self.run_dir)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=False)
            self.step += 1
            if self.step % tc.log_every == 0 or self.step == self.total_steps:
                dt = time.perf_counter() - t_log
                row = {"step": self.step, "epoch": round(self.epoch + self.micro / len(batches), 4),
                       "loss": round(loss, 6), "lr": lr, "tokens_per_s": round(tokens_log / dt, 2)}
                if grad_norm is not None:
                    row["grad_norm"] = round(grad_norm, 6)
                self.metrics.write(row)
                bar.update(loss=loss, tok_s=round(tokens_log / dt))
                t_log, tokens_log = time.perf_counter(), 0
            else:
                bar.update(loss=loss)
            if self.eval_samples and tc.eval_every and self.step % tc.eval_every == 0:
                self._log_eval(bar)
            if tc.save_every and self.step % tc.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        # The last step's scheduled evaluation already measured the final model.
        if self.eval_samples and not (tc.eval_every and self.step % tc.eval_every == 0):
            self._log_eval(None)

    def _log_eval(self, bar) -> None:
        eval_loss = self.evaluate()
        self.metrics.write({"step": self.step, "eval_loss": round(eval_loss, 6)})
        msg = f"step {self.step}: eval_loss {eval_loss:.4f}"
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-STEP/`` (adapter, optimizer, scheduler, RNG, loop position)."""
        return training.save_checkpoint(
            self.run_dir, self.step, self.model, self.optimizer, self.scheduler,
            {"epoch": self.epoch, "micro": self.micro, "data_order": self.data_order},
            self.cfg.train.keep_checkpoints,
            save_trainable,
        )

    def cleanup(self) -> None:
        """Write the final adapter beside the config, tokenizer and template."""
        import os
        import shutil

        tmp = self.run_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_trainable(self.model, tmp)
        for f in tmp.iterdir():
            os.replace(f, self.run_dir / f.name)
        tmp.rmdir()
        print(f"saved adapter, tokenizer and config to {self.run_dir}", flush=True)


def main(cfg: Config, recipe_path: str | None = None) -> int:
    """Run the whole stage.

    Returns:
        The process exit code.
    """
    recipe = SFTRecipe(cfg, recipe_path)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return 0
