"""Answers of several runs to the same prompts, scored by a reward model.

The pipeline's held-out check uses it: prompts of topics that no stage trained on
(``data.holdout_topics``), answered greedily by the SFT run and by the final (PPO) run, each
answer scored by the pipeline's own reward model in that model's template.
"""

from __future__ import annotations

import gc

from llamatune.config import Config

__all__ = ["compare_runs", "topic_prompts"]


def topic_prompts(cfg: Config, topics: list[str], recipe_path: str | None = None
                  ) -> list[dict]:
    """The prompts of a stage's data rows whose ``topic`` is one of ``topics``.

    Args:
        cfg: A stage config (its ``data.path``, ``data.format``, ``data.fields``).
        topics: The topics to take.
        recipe_path: Relative data paths are also tried next to it.

    Returns:
        ``{"topic", "messages"}`` per distinct prompt, in file order; ``messages`` ends with
        the row's last user turn.
    """
    from llamatune.data.formats import read_records
    from llamatune.data.prepare import resolve_data_path

    d = cfg.data
    wanted, seen, out = set(topics), set(), []
    for r in read_records(resolve_data_path(d.path, recipe_path), d.format, d.fields):
        if r.get("topic") not in wanted:
            continue
        msgs = r["prompt"] if "prompt" in r else r["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if last is None:
            continue
        key = str(msgs[: last + 1])
        if key not in seen:
            seen.add(key)
            out.append({"topic": r["topic"], "messages": msgs[: last + 1]})
    return out


def compare_runs(runs: dict[str, str], rm_dir: str, conversations: list[list[dict]],
                 max_new_tokens: int = 128, batch_size: int = 8) -> dict:
    """Greedy answers of each run to ``conversations``, scored by the reward model ``rm_dir``.

    The runs are loaded one at a time (and let go before the next), then the reward model.

    Args:
        runs: Name to run directory (or model folder).
        rm_dir: A finished ``llamatune rm`` run.
        conversations: Each ends with a user turn.
        max_new_tokens: Longest answer.
        batch_size: Conversations decoded or scored together.

    Returns:
        ``{"answers": {name: [text]}, "ended": {name: [bool]}, "scores": {name: [float]},
        "mean": {name: float}}``.
    """
    from llamatune.generate import load_for_inference
    from llamatune.score import load_reward_model

    answers, ended = {}, {}
    for name, folder in runs.items():
        bot = load_for_inference(folder)
        out = bot.complete(conversations, max_new_tokens=max_new_tokens, temperature=0.0,
                           batch_size=batch_size)
        answers[name], ended[name] = [a for a, _ in out], [e for _, e in out]
        del bot
        gc.collect()
    rm = load_reward_model(rm_dir)
    scores = {name: rm.score([c + [{"role": "assistant", "content": a}]
                              for c, a in zip(conversations, texts)], batch_size=batch_size)
              for name, texts in answers.items()}
    del rm
    gc.collect()
    mean = {name: sum(s) / max(len(s), 1) for name, s in scores.items()}
    return {"answers": answers, "ended": ended, "scores": scores, "mean": mean}
