"""Answers of several runs to the same prompts, scored by a reward model.

The pipeline's held-out check uses it: prompts of topics that no stage trained on
(``data.holdout_topics``, read by :func:`llamatune.data.prepare.topic_prompts`), answered
greedily by the SFT run and by the final (PPO) run, each answer scored by the pipeline's own
reward model in that model's template.
"""

from __future__ import annotations

import gc

__all__ = ["compare_runs"]


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
        ``{"answers": {name: [text]}, "scores": {name: [float]}, "mean": {name: float}}``.
    """
    from llamatune.generate import load_for_inference
    from llamatune.score import load_reward_model

    answers = {}
    for name, folder in runs.items():
        bot = load_for_inference(folder)
        answers[name] = [a for a, _ in bot.complete(conversations, max_new_tokens=max_new_tokens,
                                                    temperature=0.0, batch_size=batch_size)]
        del bot
        gc.collect()
    rm = load_reward_model(rm_dir)
    scores = {name: rm.score([c + [{"role": "assistant", "content": a}]
                              for c, a in zip(conversations, texts)], batch_size=batch_size)
              for name, texts in answers.items()}
    del rm
    gc.collect()
    mean = {name: sum(s) / max(len(s), 1) for name, s in scores.items()}
    return {"answers": answers, "scores": scores, "mean": mean}
