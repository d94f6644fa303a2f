"""Greedy accuracy on held-out additions of a PPO run, merged and loaded by plain transformers.

    python bench/arithmetic_eval.py runs/arithmetic [--max-new-tokens 32]

Merges the run (``llamatune merge``, verified), loads the merged folder with
``AutoModelForCausalLM`` (no peft, no llamatune), renders each held-out prompt of the run's
eval split with the folder's own chat template, decodes greedily for ``--max-new-tokens`` and
scores the answer with the run's rule (the last integer of the response must be the sum). The
starting model (the base, or the base + SFT adapter merged) is scored the same way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def accuracy(folder: str, prompts: list[str], answers: list[str], max_new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamatune.rewards import last_integer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stops = model.generation_config.eos_token_id
    texts = []
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stops, pad_token_id=tok.pad_token_id,
                                 temperature=None, top_p=None, top_k=None)
        texts.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return sum(last_integer(prompts, texts, answer=answers)) / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from llamatune.config import load_config
    from llamatune.data import prepare
    from llamatune.model import load_tokenizer, resolve_model_path

    run = Path(args.run_dir)
    cfg = load_config(run / "config.yaml")
    tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model.path))
    held = prepare(cfg, tok, "prompts", "eval").eval
    prompts = [s["messages"][-1]["content"] for s in held]
    answers = [s["fields"]["answer"] for s in held]
    work = Path(tempfile.mkdtemp(prefix="arith-eval-"))
    llamatune = [sys.executable, "-m", "llamatune"]
    subprocess.run(llamatune + ["merge", str(run), "--out", str(work / "merged")], check=True,
                   cwd=REPO)
    result = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "merged_accuracy": accuracy(str(work / "merged"), prompts, answers,
                                          args.max_new_tokens)}
    start = resolve_model_path(cfg.model.path)
    if cfg.model.adapter:  # the starting model is base + SFT adapter
        subprocess.run(llamatune + ["merge", cfg.model.adapter, "--out", str(work / "start")],
                       check=True, cwd=REPO)
        start = str(work / "start")
    else:  # the base, with the run's chat template
        import shutil

        shutil.copytree(start, work / "start")
        for f in run.glob("*"):
            if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                shutil.copy2(f, work / "start" / f.name)
        start = str(work / "start")
    result["start_accuracy"] = accuracy(start, prompts, answers, args.max_new_tokens)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
