"""RL against trl: ``llamatune ppo`` (GRPO mode) vs trl 1.16's ``GRPOTrainer``, and PPO's memory
against SFT's.

The same job for both: the built-in SmolLM2-135M-Instruct with a LoRA adapter (r=16, alpha 32,
no dropout, every linear layer of the blocks), the prompts of ``datasets/arithmetic.jsonl``
(rendered with the ChatML template by llamatune; trl gets that text, so both sample from the
same prompt tokens), the rule reward ``llamatune.rewards:last_integer`` (1 for the right sum
as the response's last integer), 2 prompts x 8 completions of at most 32 tokens per update,
temperature 1, AdamW at lr 1e-4 (constant), no KL penalty (trl's default ``beta=0``: no
reference model; llamatune's ``ppo.kl_coef=0`` and no ``ppo.max_kl`` guard, so neither runs the
reference), ``--updates`` updates. Both then score each rollout with the weights that sampled
it in the update's own forward (one epoch, one optimizer step per rollout). trl runs at its
defaults otherwise (gradient checkpointing, bf16 where bf16 is fast). Each runs in a fresh
subprocess, interleaved over ``--runs``; medians reported.

Per run: seconds per update (the training call's wall time / updates), peak RSS (``ru_maxrss``),
and the sampled reward of the first and the last fifth of the updates. A third child runs
``llamatune sft recipes/alpaca.yaml`` for ``--sft-steps`` steps, a fourth ``llamatune ppo
recipes/ppo.yaml`` (PPO with a value head, the SFT run's adapter as policy and reference, the
reward model stacked; it needs ``runs/alpaca`` and ``runs/reward``) for ``--ppo-steps``
iterations; both report peak RSS: the issue's memory target is PPO's peak <= 1.5x SFT's on the
same model.

Targets (issue 12): llamatune >= 2x trl per update, peak RSS <= trl's; PPO peak <= 1.5x SFT.

Usage:
    python bench/ppo_bench.py --updates 20 --runs 1
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "ppo_arithmetic.yaml"
SHARED = ["ppo.advantage=grpo", "ppo.rollout_batch=2", "ppo.k=8", "ppo.max_new_tokens=32",
          "ppo.temperature=1.0", "ppo.kl_coef=0.0", "ppo.max_kl=null",
          "ppo.missing_eos_penalty=null",
          "train.lr=1e-4", "train.warmup_steps=0", "train.schedule=constant",
          "train.batch_size=16", "train.grad_accum=1", "data.eval_split=0",
          "ppo.sample_every=0", "lora.r=16",
          "lora.alpha=32", "lora.dropout=0.0"]
MIN_RATIO, MAX_PPO_OVER_SFT = 2.0, 1.5


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def _fifths(rewards: list[float]) -> tuple[float, float]:
    k = max(1, len(rewards) // 5)
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


QUIET = ["overwrite=true", "train.eval_every=0", "train.save_every=0", "train.progress=false"]


def _run_recipe(recipe: Path, overrides: list[str], steps: int, out: Path) -> float:
    """Run a llamatune stage recipe for ``steps`` steps in this process; training seconds."""
    from llamatune.config import load_config
    from llamatune.recipes import ppo, sft

    cfg = load_config(recipe, overrides + QUIET + [f"train.max_steps={steps}",
                                                   f"output_dir={out}"])
    r = (ppo.PPORecipe if cfg.stage == "ppo" else sft.SFTRecipe)(cfg, str(recipe))
    r.setup()
    t = time.perf_counter()
    r.train()
    return time.perf_counter() - t


def run_llamatune(updates: int, out: Path) -> dict:
    secs = _run_recipe(RECIPE, SHARED, updates, out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [x["reward_mean"] for x in rows if "reward_mean" in x]
    return {"s_per_update": secs / updates, "rewards": rewards}


def run_trl(updates: int, out: Path) -> dict:
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from datasets import Dataset
    from llamatune.config import load_config
    from llamatune.data import prepare
    from llamatune.model import LLAMA_LINEAR, cpu_has_fast_bf16, load_tokenizer, resolve_model_path
    from llamatune.rewards import last_integer

    cfg = load_config(RECIPE, SHARED + [f"output_dir={out}"])
    folder = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(cfg.model, folder)
    data = prepare(cfg, tok, "prompts", "bench", str(RECIPE))
    rows = [{"prompt": tok.decode(s["input_ids"]), "answer": s["fields"]["answer"]}
            for s in data.train]

    def reward(prompts, completions, answer, **kwargs):
        return last_integer(prompts, completions, answer=answer)

    args = trl.GRPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=16, num_generations=8,
        max_completion_length=32, learning_rate=1e-4, lr_scheduler_type="constant",
        warmup_steps=0, max_steps=updates, temperature=1.0, beta=0.0, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() or cpu_has_fast_bf16(), seed=42, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tok, peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                     target_modules=LLAMA_LINEAR,
                                                     task_type="CAUSAL_LM"))
    t = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"s_per_update": secs / updates, "rewards": rewards}


def run_sft(steps: int, out: Path) -> dict:
    _run_recipe(REPO / "recipes" / "alpaca.yaml", ["data.eval_split=0"], steps, out)
    return {}


def run_ppo(steps: int, out: Path) -> dict:
    """``recipes/ppo.yaml``: PPO with a value head against the stacked reward model."""
    secs = _run_recipe(REPO / "recipes" / "ppo.yaml", ["ppo.sample_every=0"], steps, out)
    return {"s_per_update": secs / steps}


def child(args) -> None:
    out = Path(args.work) / f"{args.child}-{os.getpid()}"
    fn = {"llamatune": run_llamatune, "trl": run_trl, "sft": run_sft, "ppo": run_ppo}[args.child]
    steps = {"sft": args.sft_steps, "ppo": args.ppo_steps}.get(args.child, args.updates)
    res = fn(steps, out)
    res["peak_rss_gb"] = _peak_gb()
    res["wall_s"] = time.perf_counter() - T0
    Path(args.result).write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--sft-steps", type=int, default=10)
    ap.add_argument("--ppo-steps", type=int, default=4)
    ap.add_argument("--only", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    names = args.only.split(",") if args.only else ["trl", "llamatune", "ppo", "sft"]
    if "ppo" in names and not ((REPO / "runs" / "alpaca").is_dir()
                               and (REPO / "runs" / "reward").is_dir()):
        sys.exit("the ppo child runs recipes/ppo.yaml: first `llamatune sft recipes/alpaca.yaml` "
                 "and `llamatune rm recipes/reward.yaml` (or pass --only trl,llamatune,sft)")
    work = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TOKENIZERS_PARALLELISM="false")
    results: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(args.runs):
        for name in names:
            res_file = work / f"{name}-{i}.json"
            cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--result",
                   str(res_file), "--updates", str(args.updates), "--sft-steps",
                   str(args.sft_steps), "--ppo-steps", str(args.ppo_steps)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            res = json.loads(res_file.read_text())
            results[name].append(res)
            extra = ""
            if "rewards" in res:
                a, b = _fifths(res["rewards"])
                extra = (f"  {res['s_per_update']:.2f} s/update  reward first fifth {a:.3f} -> "
                         f"last fifth {b:.3f}")
            print(f"run {i + 1} {name:10s} peak RSS {res['peak_rss_gb']:.2f} GB{extra}", flush=True)
    med = {n: {"peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in rs),
               **({"s_per_update": statistics.median(r["s_per_update"] for r in rs)}
                  if "s_per_update" in rs[0] else {})} for n, rs in results.items()}
    print(f"\nmedians of {args.runs} run(s), {args.updates} updates:")
    for n, m in med.items():
        print(f"{n:10s} " + "  ".join(f"{k} {v:.2f}" for k, v in m.items()))
    if {"trl", "llamatune"} <= set(med):
        ratio = med["trl"]["s_per_update"] / med["llamatune"]["s_per_update"]
        print(f"{'PASS' if ratio >= MIN_RATIO else 'FAIL'}  per update vs trl GRPOTrainer "
              f"{ratio:.2f}x (>= {MIN_RATIO}x)")
        ok = med["llamatune"]["peak_rss_gb"] <= med["trl"]["peak_rss_gb"]
        print(f"{'PASS' if ok else 'FAIL'}  peak RSS {med['llamatune']['peak_rss_gb']:.2f} vs "
              f"trl {med['trl']['peak_rss_gb']:.2f} GB (<=)")
    for name, what in (("ppo", "PPO (recipes/ppo.yaml)"), ("llamatune", "GRPO (arithmetic)")):
        if {"sft", name} <= set(med):
            ratio = med[name]["peak_rss_gb"] / med["sft"]["peak_rss_gb"]
            print(f"{'PASS' if ratio <= MAX_PPO_OVER_SFT else 'FAIL'}  {what} peak RSS / SFT "
                  f"(recipes/alpaca.yaml) peak RSS {ratio:.2f} (<= {MAX_PPO_OVER_SFT})")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "medians": med}, indent=2))


if __name__ == "__main__":
    main()
