"""Reward scoring: ``llamatune score RM_DIR --data FILE`` and the API stages build on.

A reward-model run (``llamatune rm``) holds a LoRA adapter that applies to the base alone and
a scalar head (``score_head.safetensors``). :func:`load_reward_model` loads base + adapter +
head for inference; :meth:`RewardModel.score` renders conversations exactly as the training
pairs were rendered (the run's template and system prompt) and reads the head at each
conversation's last real token. PPO uses the same pieces, either on a copy loaded here or
stacked on its own base (:func:`attach_reward`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from llamatune.errors import UserError

__all__ = ["RewardModel", "attach_reward", "load_reward_model", "run_score"]


@dataclass
class RewardModel:
    """A trained reward model with the template, system prompt and tokenizer it was trained with."""

    net: object
    tokenizer: object
    template: str
    system: str | None
    device: str
    adapter: str | None = None
    """The adapter that holds the reward model (when it shares a base with other adapters)."""
    head: str = "score"

    def encode(self, conversations: list[list[dict]]) -> list[list[int]]:
        """Token ids of conversations rendered as the reward model was trained.

        Raises:
            UserError: A conversation does not end with an assistant turn.
        """
        from llamatune.data.templates import render

        seqs = []
        for i, conv in enumerate(conversations):
            if not conv or conv[-1].get("role") != "assistant":
                raise UserError(
                    f"conversation {i + 1} does not end with an assistant turn; the reward "
                    "model scores the last assistant answer."
                )
            seqs.append(render(self.tokenizer, self.template, conv, system=self.system).input_ids)
        return seqs

    def score_ids(self, seqs: list[list[int]], batch_size: int = 8) -> list[float]:
        """Scores of token-id sequences, batched by length, returned in the order given."""
        import torch

        from llamatune.data.collate import pad_batch
        from llamatune.net import sequence_scores

        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        scores = [0.0] * len(seqs)
        pad_id = self.tokenizer.pad_token_id
        step = max(1, batch_size)
        with torch.no_grad():
            for k in range(0, len(order), step):
                idx = order[k : k + step]
                b = pad_batch([{"input_ids": seqs[i]} for i in idx], pad_id)
                r = sequence_scores(self.net, b["input_ids"].to(self.device),
                                    b["attention_mask"].to(self.device), self.head, self.adapter)
                for i, v in zip(idx, r.tolist()):
                    scores[i] = v
        return scores

    def score(self, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
        """Score conversations, each ending with the assistant answer to judge.

        Args:
            conversations: Lists of ``{"role", "content"}`` messages.
            batch_size: Conversations per forward pass.

        Returns:
            One float per conversation, in the order given.

        Raises:
            UserError: A conversation does not end with an assistant turn.
        """
        return self.score_ids(self.encode(conversations), batch_size)


def _open(rm_dir: str):
    from llamatune.rundir import Run, is_finished

    if not is_finished(rm_dir):
        raise UserError(f"{rm_dir} is not a finished reward-model run (config.yaml, adapter and "
                        "score head); train one with `llamatune rm RECIPE`.")
    run = Run.open(rm_dir, stages=("rm",), use="scoring")
    if run.head("score") is None:
        if (run.path / "adapter_config.json").is_file() and json.loads(
                (run.path / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS":
            raise UserError(f"{rm_dir} was written by an older llamatune (a sequence-"
                            "classification reward model); train it again with llamatune rm.")
        raise UserError(f"{rm_dir} is not a finished reward-model run: score_head.safetensors is "
                        "missing.")
    return run


def load_reward_model(rm_dir: str, device: str = "auto") -> RewardModel:
    """Load a finished ``llamatune rm`` run for scoring (its own copy of the base).

    Args:
        rm_dir: The reward-model run directory.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        A :class:`RewardModel` in eval mode.

    Raises:
        UserError: The folder is not a finished reward-model run.
    """
    from llamatune import model as loader

    run = _open(rm_dir)
    cfg = run.cfg
    mcfg = dataclasses.replace(cfg.model, device=device if device != "auto" else cfg.model.device,
                               gradient_checkpointing=False, tokenizer=str(run.path), adapter=None)
    if run.has_adapter:
        loaded = loader.load_base(mcfg, trainable=False)
        loader.add_adapter(loaded, "reward", source=str(run.path), trainable=False)
    else:  # a full fine-tune saved the whole backbone into the run
        mcfg = dataclasses.replace(mcfg, path=str(run.path), quantization="none")
        loaded = loader.load_base(mcfg, trainable=False)
    loader.add_head(loaded, "score", source=str(run.head("score")), trainable=False)
    net = loader.finish(loaded)
    return RewardModel(net, loaded.tokenizer, cfg.data.template, cfg.data.system, loaded.device)


def attach_reward(loaded, rm_dir: str, name: str = "reward") -> RewardModel:
    """Stack a reward-model run on a base already in memory: its adapter plus its head.

    One copy of the base serves the policy, its reference and the reward model. Call before
    :func:`llamatune.model.finish`.

    Raises:
        UserError: Not a reward-model run, or trained on another base model.
    """
    from llamatune import model as loader
    from llamatune.model import load_tokenizer

    run = _open(rm_dir)
    if not run.has_adapter:
        raise UserError(f"{rm_dir} is a fully fine-tuned reward model; it cannot share a base, "
                        "load it on its own.")
    loader.add_adapter(loaded, name, source=str(run.path), trainable=False)
    loader.add_head(loaded, name, source=str(run.head("score")), trainable=False)
    tok = load_tokenizer(dataclasses.replace(run.cfg.model, tokenizer=str(run.path)))
    return RewardModel(None, tok, run.cfg.data.template, run.cfg.data.system, loaded.device,
                       adapter=name, head=name)


def run_score(rm_dir: str, data: str, fmt: str = "messages", as_json: bool = False,
              batch_size: int = 8) -> int:
    """Print one score per conversation of ``data``, in row order (``llamatune score``).

    Returns:
        The exit code.

    Raises:
        UserError: Bad rows, a format without conversations, or not a reward-model run.
    """
    from llamatune.data import KINDS, read_records

    if fmt not in KINDS["conversations"]:
        raise UserError(f"--format {fmt!r}: llamatune score reads conversations ending with the "
                        f"answer to score; use {', '.join(KINDS['conversations'])}.")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}.")
    records = read_records(data, fmt, key="--data")
    rm = load_reward_model(rm_dir)
    scores = rm.score([r["messages"] for r in records], batch_size=batch_size)
    for s in scores:
        print(json.dumps({"score": round(s, 6)}) if as_json else f"{s:.6f}")
    return 0
