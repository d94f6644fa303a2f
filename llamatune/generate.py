"""Talk to a trained run (base + adapter) or a model folder, in the run's own template.

``llamatune generate RUN_DIR --prompt TEXT`` prints one completion;
``llamatune chat RUN_DIR`` keeps a conversation going. A run directory carries its config
(base model, quantization, template, system prompt) and tokenizer, so nothing else is
needed. A plain model folder (for example a merged model) is used with its tokenizer's
own chat template.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from llamatune.errors import UserError

__all__ = ["Chatbot", "load_for_inference"]


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
        import torch

        from llamatune.data.templates import render, stop_token_ids

        r = render(self.tokenizer, self.template, messages, system=self.system,
                   add_generation_prompt=True)
        ids = torch.tensor([r.input_ids], device=self.device)
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(
            self.tokenizer, self.template), pad_token_id=self.tokenizer.pad_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


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
