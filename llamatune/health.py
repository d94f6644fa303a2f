"""Training-health alarms: the silent failures of a run, said once, when they appear.

A stage's ``metrics.jsonl`` rows are watched as they are written (:class:`Monitor`, hooked
into :class:`~llamatune.training.MetricsWriter`); :func:`check_rows` runs the very same
rules over the rows of a finished run (``python -m llamatune.health RUN_DIR``). An alarm
trips at most once per run: one line on the main process's output, and one row in
``metrics.jsonl``: ``{"step": N, "alarm": NAME, "message": TEXT, "figures": {...}}`` (no
``loss`` and no top-level numbers, so readers of the figures pass over it). Every process
evaluates the rules on the same rows (the loop's figures are reduced across processes), so
they agree; only the main process prints and writes. ``train.alarms: false`` turns them off.

Every rule reads a smoothed figure, never one row: the mean of the last :data:`WINDOW`
logged rows (:data:`DPO_WINDOW` for DPO's noisier per-batch figures) against the mean of the
first rows of the run, or a run of consecutive evaluations. The rules and their thresholds
(the module constants below are the one place they are set):

=====================  =====  ============================================================
alarm                  stage  trips when
=====================  =====  ============================================================
``negative_kl``        ppo    mean ``kl`` (the k1 estimate) over the last WINDOW
                              iterations < KL_NEGATIVE
``entropy_collapse``   ppo    mean ``entropy`` < ENTROPY_FLOOR nats, or < ENTROPY_FRACTION
                              of its starting mean
``response_collapse``  ppo    mean ``response_len`` <= LEN_ZERO tokens, from more than
                              twice that at the start
``response_at_limit``  ppo    mean ``response_len`` >= LEN_LIMIT of ``ppo.max_new_tokens``,
                              from below LEN_LIMIT_START of it at the start
``no_eos_rising``      ppo    mean ``no_eos_frac`` > NO_EOS_HIGH and at least NO_EOS_RISE
                              above its starting mean
``chosen_falling``     dpo    mean ``rewards_chosen`` fell by >= DPO_CHOSEN_DROP (reward
                              units: beta x log-prob) while ``reward_margin`` rose
``dpo_chance``         dpo    from step DPO_CHANCE_MIN_STEP, mean ``reward_accuracy`` over
                              the last DPO_CHANCE_WINDOW rows within CHANCE_BAND of 0.5
``rm_chance``          rm     at the end, the last ``eval_accuracy`` within CHANCE_BAND of
                              0.5 (over at least RM_MIN_EVAL_PAIRS pairs, where known)
``rm_below_chance``    rm     at the end, the last ``eval_accuracy`` <= 0.5 - RM_BELOW
``eval_loss_rising``   sft    ``eval_loss`` rose SFT_RISES evaluations in a row, each time
                              by more than SFT_MIN_RISE of the previous value
=====================  =====  ============================================================

A stage may give the monitor a ``context`` dict: ``max_new_tokens`` (PPO), ``eval_pairs``,
``pairs``, ``identical_pairs`` and ``max_length`` (RM: the pairs whose chosen and rejected
token ids are identical after truncation, counted from the data at setup).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["Monitor", "alarm_line", "announce", "check_rows", "pair_context", "recorded",
           "replay"]

WINDOW = 3
"""PPO: iterations averaged for the current (last rows) and starting (first rows) figures."""
KL_NEGATIVE = -0.1
"""PPO: a mean k1 KL estimate below this is not estimator noise (a true KL is >= 0)."""
ENTROPY_FLOOR = 0.02
"""PPO: mean token entropy (nats) below which sampling is all but greedy."""
ENTROPY_FRACTION = 0.05
"""PPO: entropy fallen to this fraction of its starting mean counts as collapsed."""
LEN_ZERO = 1.0
"""PPO: mean response length (tokens) at or below which answers have collapsed to nothing."""
LEN_LIMIT = 0.95
"""PPO: mean response length at this fraction of ``ppo.max_new_tokens`` is at the limit."""
LEN_LIMIT_START = 0.8
"""PPO: ...when it started below this fraction (a run that starts at the limit is another
matter, left to ``no_eos_frac``)."""
NO_EOS_HIGH = 0.5
"""PPO: share of answers cut at the limit (no end token) above which it alarms..."""
NO_EOS_RISE = 0.25
"""PPO: ...when it also rose this much above its starting mean."""
DPO_WINDOW = 5
"""DPO: rows averaged for the current and starting figures (per-batch figures are noisy)."""
DPO_CHOSEN_DROP = 1.0
"""DPO: fall of the mean chosen implicit reward, in reward units (beta x summed log-prob)."""
DPO_CHANCE_MIN_STEP = 20
"""DPO: steps before reward accuracy at chance means anything."""
DPO_CHANCE_WINDOW = 10
"""DPO: rows the reward accuracy is averaged over for the chance rule."""
CHANCE_BAND = 0.05
"""DPO and RM: accuracy within this of 0.5 is at chance."""
RM_MIN_EVAL_PAIRS = 20
"""RM: fewer held-out pairs than this cannot tell chance from a weak model (when known)."""
RM_BELOW = 0.15
"""RM: held-out accuracy this far below 0.5 is worse than chance: labels the other way round."""
SFT_RISES = 3
"""SFT: consecutive rises of the eval loss."""
SFT_MIN_RISE = 1e-4
"""SFT: a rise counts when above this fraction of the previous eval loss (not rounding)."""


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _both(s: dict, key: str, window: int) -> tuple[float, float] | None:
    """``(start, now)``: the means of a figure's first and last ``window`` rows, apart."""
    xs = s.get(key, [])
    if len(xs) < 2 * window:
        return None
    return _mean(xs[:window]), _mean(xs[-window:])


# -- the rules: each returns (message, figures) when it trips, else None ---------------------

def _negative_kl(s, ctx):
    xs = s.get("kl", [])
    if len(xs) < WINDOW or (now := _mean(xs[-WINDOW:])) >= KL_NEGATIVE:
        return None
    return (f"the mean KL estimate to the reference (k1) averaged {now:.3f} over the last "
            f"{WINDOW} iterations (alarm below {KL_NEGATIVE}); a true KL is never negative, "
            "so the answers were not sampled from the policy that scores them. Likely: "
            "sampling filters the distribution (ppo.top_p < 1, or a temperature other than "
            "the one log-probs use), or a log-prob bug. Try ppo.top_p=1.0 and compare kl_k3 "
            "(never negative)."), {"kl": round(now, 6)}


def _entropy_collapse(s, ctx):
    both = _both(s, "entropy", WINDOW)
    if both is None:
        return None
    start, now = both
    if not (now < ENTROPY_FLOOR or now < ENTROPY_FRACTION * start):
        return None
    return (f"mean token entropy fell to {now:.4f} nats over the last {WINDOW} iterations, "
            f"from {start:.4f} at the start (alarm below {ENTROPY_FLOOR} or below "
            f"{ENTROPY_FRACTION:.0%} of the start): the policy samples almost one answer and "
            "has stopped exploring. Likely: train.lr too high, too little KL (ppo.kl_coef), "
            "a reward one fixed answer maximizes. Try a lower train.lr, a higher ppo.kl_coef "
            "or ppo.temperature."), {"entropy": round(now, 6), "entropy_start": round(start, 6)}


def _response_collapse(s, ctx):
    both = _both(s, "response_len", WINDOW)
    if both is None or not (both[1] <= LEN_ZERO < both[0] / 2):
        return None
    start, now = both
    return (f"answers collapsed to {now:.2f} tokens on average over the last {WINDOW} "
            f"iterations, from {start:.1f} at the start: the policy learned to say (almost) "
            "nothing. Likely: a reward that pays for short or empty answers (or penalizes "
            "length), a KL penalty cheapest when the answer is empty. Try a reward that scores "
            "empty answers low, a higher ppo.kl_coef, a lower train.lr; read samples.jsonl."), \
        {"response_len": round(now, 4), "response_len_start": round(start, 4)}


def _response_at_limit(s, ctx):
    limit = ctx.get("max_new_tokens")
    both = _both(s, "response_len", WINDOW)
    if not limit or both is None:
        return None
    start, now = both
    if not (now >= LEN_LIMIT * limit and start < LEN_LIMIT_START * limit):
        return None
    return (f"answers grew to the ppo.max_new_tokens limit ({now:.1f} of {limit} tokens on "
            f"average over the last {WINDOW} iterations, from {start:.1f} at the start), so "
            "they are cut and scored unfinished. Likely: a reward (model) that pays for "
            "length, the end token unlearned. Try a length penalty in the reward, a higher "
            "ppo.kl_coef, a lower train.lr; read samples.jsonl."), \
        {"response_len": round(now, 4), "response_len_start": round(start, 4), "limit": limit}


def _no_eos_rising(s, ctx):
    both = _both(s, "no_eos_frac", WINDOW)
    if both is None:
        return None
    start, now = both
    if not (now > NO_EOS_HIGH and now - start >= NO_EOS_RISE):
        return None
    return (f"{now:.0%} of answers end without the end token (mean over the last {WINDOW} "
            f"iterations, from {start:.0%} at the start; alarm above {NO_EOS_HIGH:.0%} and "
            f"{NO_EOS_RISE:.0%} above the start): the policy is unlearning to stop. Likely: "
            "a reward that pays for length or never sees the end, too little KL. Try a higher "
            "ppo.kl_coef, a penalty for unfinished answers, a lower train.lr."), \
        {"no_eos_frac": round(now, 4), "no_eos_frac_start": round(start, 4)}


def _chosen_falling(s, ctx):
    chosen, margin = _both(s, "rewards_chosen", DPO_WINDOW), _both(s, "reward_margin", DPO_WINDOW)
    if chosen is None or margin is None:
        return None
    if not (chosen[0] - chosen[1] >= DPO_CHOSEN_DROP and margin[1] > margin[0]):
        return None
    return (f"the chosen answers' implicit reward fell from {chosen[0]:.3f} to {chosen[1]:.3f} "
            f"(means of {DPO_WINDOW} rows) while the margin rose from {margin[0]:.3f} to "
            f"{margin[1]:.3f}: both answers lose likelihood and the rejected ones faster "
            "(likelihood displacement), so the policy may drift from the chosen answers too. "
            "Likely: train.lr too high, chosen and rejected answers too alike (they share most "
            "tokens). Try a lower train.lr or fewer steps, dpo.loss=ipo, or a stronger SFT "
            "start (model.adapter)."), \
        {"rewards_chosen": round(chosen[1], 6), "rewards_chosen_start": round(chosen[0], 6),
         "reward_margin": round(margin[1], 6), "reward_margin_start": round(margin[0], 6)}


def _dpo_chance(s, ctx):
    xs, steps = s.get("reward_accuracy", []), s.get("reward_accuracy@step", [])
    if len(xs) < DPO_CHANCE_WINDOW or steps[-1] < DPO_CHANCE_MIN_STEP:
        return None
    now = _mean(xs[-DPO_CHANCE_WINDOW:])
    if abs(now - 0.5) > CHANCE_BAND:
        return None
    return (f"reward accuracy is at chance after {steps[-1]} steps ({now:.3f}, the mean of the "
            f"last {DPO_CHANCE_WINDOW} rows; alarm within {CHANCE_BAND} of 0.5): the policy "
            "does not prefer the chosen answers. Likely: chosen and rejected swapped in part of "
            f"the data, {_identical(ctx)}, train.lr too low (or too high: check the loss). "
            "Try `llamatune preview` on the data, a higher train.max_length, another train.lr."), \
        {"reward_accuracy": round(now, 6)}


def _rm_end(s, ctx):
    xs = s.get("eval_accuracy", [])
    pairs = ctx.get("eval_pairs")
    if not xs or (pairs is not None and pairs < RM_MIN_EVAL_PAIRS):
        return None
    acc = xs[-1]
    if abs(acc - 0.5) <= CHANCE_BAND:
        name, what = "rm_chance", (f"within {CHANCE_BAND} of chance (0.5): the reward model "
                                   "does not tell chosen from rejected")
    elif acc <= 0.5 - RM_BELOW:
        name, what = "rm_below_chance", (f"{RM_BELOW} or more below chance: the reward model "
                                         "prefers the rejected answers")
    else:
        return None
    over = f" over {pairs} held-out pairs" if pairs else ""
    return name, (f"the final held-out accuracy is {acc:.3f}{over}, {what}. Likely: labels "
                  f"swapped (chosen and rejected the other way round, in all or part of the "
                  f"data), {_identical(ctx)}, too few steps or train.lr off. Try checking a "
                  "few pairs with `llamatune preview`, raising train.max_length, more steps."), \
        {"eval_accuracy": acc, **({"eval_pairs": pairs} if pairs else {})}


def _identical(ctx) -> str:
    n, total, length = ctx.get("identical_pairs"), ctx.get("pairs"), ctx.get("max_length")
    if n is None or not total:
        return "pairs identical after train.max_length truncation (not counted here)"
    return (f"pairs identical after truncation ({n} of {total} training pairs have the same "
            f"chosen and rejected token ids at train.max_length={length})")


def pair_context(train: list[dict], held_out: list[dict], max_length: int) -> dict:
    """The context a preference stage gives its monitor: pair counts, identical pairs.

    Args:
        train: Tokenized training pairs (``chosen_ids``, ``rejected_ids``), truncated.
        held_out: Tokenized held-out pairs.
        max_length: ``train.max_length`` (named in the message).
    """
    same = sum(list(p["chosen_ids"]) == list(p["rejected_ids"]) for p in train)
    return {"pairs": len(train), "identical_pairs": same, "eval_pairs": len(held_out),
            "max_length": max_length}


def _eval_loss_rising(s, ctx):
    xs, steps = s.get("eval_loss", []), s.get("eval_loss@step", [])
    last = xs[-(SFT_RISES + 1):]
    if len(last) < SFT_RISES + 1:
        return None
    if not all(b - a > SFT_MIN_RISE * abs(a) for a, b in zip(last, last[1:])):
        return None
    path = " -> ".join(f"{v:.4f}" for v in last)
    at = ", ".join(str(x) for x in steps[-(SFT_RISES + 1):])
    return (f"the eval loss rose {SFT_RISES} evaluations in a row ({path} at steps {at}): the "
            "model is overfitting the training data or the step is too large. Likely: too "
            "many train.epochs for the data, train.lr too high. Try fewer steps (keep a "
            "checkpoint from before the rise: train.save_every), a lower train.lr, more data "
            "or lora.dropout."), {"eval_loss": last[-1], "eval_loss_before": last[0]}


RULES = {
    "ppo": {"negative_kl": _negative_kl, "entropy_collapse": _entropy_collapse,
            "response_collapse": _response_collapse, "response_at_limit": _response_at_limit,
            "no_eos_rising": _no_eos_rising},
    "dpo": {"chosen_falling": _chosen_falling, "dpo_chance": _dpo_chance},
    "sft": {"eval_loss_rising": _eval_loss_rising},
}
"""Per stage, the rules checked after every row: ``name -> rule(series, context)``."""
END_RULES = {"rm": _rm_end}
"""Per stage, the rule checked once at the end of the run (it names its alarm)."""


class Monitor:
    """The alarms of one run, fed its metrics rows in order.

    Args:
        stage: ``sft``, ``rm``, ``dpo`` or ``ppo`` (another stage has no rules).
        context: What the stage knows that the rows do not (see the module docstring).
    """

    def __init__(self, stage: str | None, context: dict | None = None):
        self.stage, self.context = stage, dict(context or {})
        self.series: dict[str, list] = {}
        self.fired: set[str] = set()

    def resume(self, path: Path, step: int) -> None:
        """Take in the rows up to ``step`` of a resumed run (alarms already said stay said)."""
        for row in _read(path):
            if row.get("step", 0) > step:
                continue
            if "alarm" in row:
                self.fired.add(row["alarm"])
            else:
                self._add(row)

    def _add(self, row: dict) -> None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.series.setdefault(k, []).append(float(v))
                self.series.setdefault(f"{k}@step", []).append(int(row.get("step", 0)))

    def observe(self, row: dict) -> list[dict]:
        """Add a row; return the alarm rows that trip now (each alarm once per run)."""
        if "alarm" in row:
            return []
        self._add(row)
        out = []
        for name, rule in RULES.get(self.stage, {}).items():
            if name not in self.fired and (hit := rule(self.series, self.context)):
                out.append(self._fire(name, row.get("step", 0), *hit))
        return out

    def finish(self) -> list[dict]:
        """The end-of-run alarms (the rows are all in)."""
        rule = END_RULES.get(self.stage)
        hit = rule(self.series, self.context) if rule else None
        if not hit or hit[0] in self.fired:
            return []
        steps = [v for k, vs in self.series.items() if k.endswith("@step") for v in vs]
        return [self._fire(hit[0], max(steps, default=0), *hit[1:])]

    def _fire(self, name: str, step: int, message: str, figures: dict) -> dict:
        self.fired.add(name)
        return {"step": step, "alarm": name, "message": message, "figures": figures}


def check_rows(rows: list[dict], stage: str | None, context: dict | None = None,
               finished: bool = True) -> list[dict]:
    """The alarms a run's metrics rows trip, each at the step it first trips (a pure function).

    The live monitor's rules, replayed row by row; alarm rows already in ``rows`` are skipped
    (they are recomputed).

    Args:
        rows: ``metrics.jsonl`` rows, in order.
        stage: The run's stage.
        context: As the stage gives it (see the module docstring); without it the PPO length
            limit rule is skipped and the RM rules apply whatever the eval pair count.
        finished: Apply the end-of-run rules (the rows are the whole run).

    Returns:
        Alarm rows ``{"step", "alarm", "message", "figures"}``.
    """
    monitor = Monitor(stage, context)
    out = [a for row in rows for a in monitor.observe(row)]
    return out + (monitor.finish() if finished else [])


def _read(path: Path) -> list[dict]:
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a torn last line, from a kill
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def recorded(run_dir: str | Path) -> list[dict]:
    """The alarm rows a run recorded in its ``metrics.jsonl``."""
    return [r for r in _read(Path(run_dir) / "metrics.jsonl") if "alarm" in r]


def replay(run_dir: str | Path) -> list[dict]:
    """:func:`check_rows` over a run directory's ``metrics.jsonl``.

    The stage and ``ppo.max_new_tokens`` are read from its ``config.yaml``; the RM context
    derived from the data (pair counts) is not recomputed. The end-of-run rules apply when
    the run finished (its adapter is written).
    """
    from llamatune.rundir import read_run_config

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir) or {}
    stage = cfg.get("stage")
    context = {}
    if stage == "ppo":
        ppo = cfg.get("ppo")
        context["max_new_tokens"] = ppo.get("max_new_tokens") if isinstance(ppo, dict) else None
    finished = (run_dir / "adapter_model.safetensors").is_file()
    return check_rows(_read(run_dir / "metrics.jsonl"), stage, context, finished)


def alarm_line(alarm: dict) -> str:
    """The one line an alarm prints."""
    return f"ALARM {alarm['alarm']} at step {alarm['step']}: {alarm['message']}"


def announce(alarm: dict) -> None:
    """Print an alarm's line without breaking a progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(alarm_line(alarm), file=sys.stdout)
    sys.stdout.flush()


def _main(argv: list[str]) -> int:
    """``python -m llamatune.health RUN_DIR [--json]``: replay the alarms over a run."""
    as_json = "--json" in argv
    dirs = [a for a in argv if a != "--json"]
    if len(dirs) != 1 or not (Path(dirs[0]) / "metrics.jsonl").is_file():
        print("usage: python -m llamatune.health RUN_DIR [--json]  (a folder with "
              "metrics.jsonl and config.yaml)", file=sys.stderr)
        return 2
    found = replay(dirs[0])
    if as_json:
        print(json.dumps(found, indent=2))
    else:
        print("\n".join(alarm_line(a) for a in found) or f"{dirs[0]}: no alarm")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
