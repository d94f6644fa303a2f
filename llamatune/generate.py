"""Talk to a trained run (base + adapter) or a model folder, in the run's own template.

``llamatune generate RUN_DIR --prompt TEXT`` prints one completion;
``llamatune generate RUN_DIR --data FILE --out FILE`` answers every row of a prompts file (one
JSON line out per row, in order); ``llamatune chat RUN_DIR`` keeps a conversation going. All of
them decode with :mod:`llamatune.decoding` (batched, left-padded, KV cache), as PPO does.
A run directory carries its config (base model, quantization, template, system prompt) and
tokenizer, so nothing else is needed. A plain model folder (for example a merged model) is
used with its tokenizer's own chat template.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from llamatune.errors import UserError

__all__ = ["Chatbot", "generate_file", "load_for_inference", "read_prompts"]


@dataclass
class Chatbot:
    """A model ready to answer, with the template and stop tokens it was trained with."""

    model: object
    tokenizer: object
    template: str
    system: str | None
    device: str

    def reply(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
              top_p: float = 1.0) -> str:
        """Generate the next assistant turn for a conversation ending with a user turn."""
        return self.complete([messages], max_new_tokens, temperature, top_p)[0][0]

    def complete(self, conversations: list[list[dict]], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0,
                 batch_size: int = 8) -> list[tuple[str, bool]]:
        """Answer many conversations in batches, with the decoder PPO samples with.

        Args:
            conversations: Each ends with a user turn.
            max_new_tokens: Longest answer.
            temperature: 0 decodes greedily; above 0 samples (seed torch for repeatability).
            top_p: Nucleus for sampling.
            batch_size: Conversations decoded together (left-padded, with the KV cache).

        Returns:
            ``(answer, ended)`` per conversation, in order; ``ended`` is False when the answer
            reached ``max_new_tokens`` without the template's end token.
        """
        from llamatune.data.templates import render, stop_token_ids
        from llamatune.decoding import generate

        stops = stop_token_ids(self.tokenizer, self.template)
        prompts = [render(self.tokenizer, self.template, m, system=self.system,
                          add_generation_prompt=True).input_ids for m in conversations]
        out = generate(self.model, self.tokenizer, prompts, stop_ids=stops,
                       max_new_tokens=max_new_tokens, temperature=temperature or 1.0,
                       top_p=top_p, greedy=temperature <= 0, batch_size=batch_size)
        return list(zip(out.text, out.ended))


def load_for_inference(path: str, device: str = "auto") -> Chatbot:
    """Load a run directory (base + adapter) or a model folder for generation.

    Raises:
        UserError: The folder is neither a run directory nor a model folder.
    """
    from llamatune.config import ModelConfig
    from llamatune.model import load_model

    p = Path(path).expanduser()
    if (p / "config.yaml").is_file() and (p / "adapter_config.json").is_file():
        from llamatune.rundir import Run

        run = Run.open(path)
        if run.stage == "rm":
            raise UserError(f"{path} is a reward model (llamatune rm); score answers with "
                            "`llamatune score`, it does not generate.")
        cfg = run.cfg
        mcfg = dataclasses.replace(cfg.model, device=device if device != "auto" else
                                   cfg.model.device, gradient_checkpointing=False,
                                   tokenizer=str(run.path), adapter=None)
        loaded = load_model(mcfg, None, adapter=str(run.path), trainable=False)
        if loaded.kernels:
            print(f"note: {loaded.kernels}", file=sys.stderr, flush=True)
        return Chatbot(loaded.model, loaded.tokenizer, cfg.data.template, cfg.data.system,
                       loaded.device)
    if (p / "config.json").is_file() or p.suffix == ".gguf" or not p.exists():
        loaded = load_model(ModelConfig(path=str(path), device=device), None, trainable=False)
        return Chatbot(loaded.model, loaded.tokenizer, "tokenizer", None, loaded.device)
    raise UserError(
        f"{path} is neither a llamatune run directory (config.yaml + adapter) nor a model "
        "folder (config.json)."
    )


def chat_loop(bot: Chatbot, max_new_tokens: int, temperature: float) -> None:
    """Read user lines from stdin and print replies; ``/reset`` clears, ``/exit`` quits."""
    history: list[dict] = []
    print("Chatting. /reset clears the conversation, /exit (or Ctrl-D) quits.", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        answer = bot.reply(history, max_new_tokens=max_new_tokens, temperature=temperature)
        history.append({"role": "assistant", "content": answer})
        print(f"bot> {answer}", flush=True)


def read_prompts(data: str, field: str = "prompt") -> list[dict]:
    """Read a prompts file for :func:`generate_file` (the ``prompts`` data format).

    Rows are JSON objects whose ``field`` is a user message or a list of ``role``/``content``
    turns ending with a user turn; every other field is kept.

    Raises:
        UserError: The file is missing or empty, or rows are malformed (naming file and line).
    """
    from llamatune.data.formats import read_records

    return read_records(data, "prompts", {"prompt": field}, key="--data",
                        hint="Fix the rows, or name the prompt field with --field.")


def generate_file(bot: Chatbot, records: list[dict], out: str, *, max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8,
                  seed: int = 0, field: str = "prompt") -> int:
    """Answer every prompt record and write one JSON line per record, in order.

    Each output row is the input row (its ``field`` and every other field) plus ``response``
    and ``ended`` (False when the answer hit ``max_new_tokens`` without the end token). The
    file is written under a temporary name and renamed when complete, so an interrupted run
    leaves nothing behind.

    Args:
        bot: The model, from :func:`load_for_inference`.
        records: From :func:`read_prompts`.
        out: The JSONL file to write.
        max_new_tokens: Longest answer.
        temperature: 0 decodes greedily.
        top_p: Nucleus for sampling.
        batch_size: Prompts decoded together.
        seed: Seeds torch before sampling.
        field: The prompt field's name in the output rows.

    Returns:
        The number of rows written.
    """
    import json
    import os
    import tempfile

    import torch

    dst = Path(out).expanduser()
    torch.manual_seed(seed)
    answers = bot.complete([r["messages"] for r in records], max_new_tokens, temperature, top_p,
                           batch_size)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec, (text, ended) in zip(records, answers):
                msgs = rec["messages"]
                prompt = msgs if len(msgs) > 1 else msgs[0]["content"]
                row = {field: prompt, **rec["fields"], "response": text, "ended": ended}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(records)
