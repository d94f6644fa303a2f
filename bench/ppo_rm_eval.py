"""The reward model's mean score of greedy answers to a PPO run's held-out prompts, before and
after: the starting model (its SFT adapter, or the base) vs the trained policy.

    python bench/ppo_rm_eval.py runs/ppo [--json FILE]

Both models answer through ``llamatune generate``'s loader (the run directory as a user would
load it: base + the saved adapter), greedily, at the run's ``ppo.max_new_tokens``; the reward
model named by the run's ``ppo.reward_model`` scores each conversation in its own template
(``llamatune score``'s loader). This recomputes the run's ``eval_reward`` rows from the saved
files, outside the training process.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from llamatune.config import load_config
    from llamatune.data import prepare
    from llamatune.generate import load_for_inference
    from llamatune.model import load_tokenizer, resolve_model_path
    from llamatune.score import load_reward_model

    run = Path(args.run_dir)
    cfg = load_config(run / "config.yaml")
    if not cfg.ppo.reward_model:
        raise SystemExit(f"{run} was trained against a rule; use bench/arithmetic_eval.py")
    tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model.path))
    held = prepare(cfg, tok, "prompts", "eval").eval
    convs = [s["messages"] for s in held]
    start = cfg.model.adapter or resolve_model_path(cfg.model.path)
    answers = {}
    for name, path in (("start", start), ("ppo", str(run))):
        bot = load_for_inference(path)
        answers[name] = [a for a, _ in bot.complete(convs, cfg.ppo.max_new_tokens)]
        del bot
    rm = load_reward_model(cfg.ppo.reward_model)
    result = {"prompts": len(convs), "max_new_tokens": cfg.ppo.max_new_tokens}
    for name, texts in answers.items():
        scores = rm.score([c + [{"role": "assistant", "content": t}]
                           for c, t in zip(convs, texts)])
        result[f"{name}_mean_score"] = statistics.fmean(scores)
        result[f"{name}_mean_words"] = statistics.fmean(len(t.split()) for t in texts)
    result["examples"] = [{"prompt": c[-1]["content"], "start": a, "ppo": b}
                          for c, a, b in list(zip(convs, answers["start"], answers["ppo"]))[:3]]
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
