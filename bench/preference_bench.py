"""Preference stages against trl: ``llamatune dpo`` vs ``DPOTrainer``, ``llamatune rm`` vs ``RewardTrainer``.

The same job for every configuration: the built-in SmolLM2-135M-Instruct, a LoRA adapter
(r=16, alpha 32, no dropout, every linear layer of the blocks), the first 75 pairs of
``datasets/preference.jsonl`` from topics outside the held-out ones, one epoch at batch 8
(10 optimizer updates), AdamW at lr 5e-4 with 2 warmup steps and a cosine decay, clip 1.0,
seed 42; for DPO beta 0.1 and the sigmoid loss. Pairs are rendered with the ChatML template
and tokenized by llamatune, and trl is fed those token ids (its own tokenization is skipped),
so every configuration trains on identical ids. The configurations differ only in how they
run (trl's learning rate default, 1e-6 for both trainers, is overridden with the shared one):

  dpo  trl-default   DPOTrainer at its defaults: gradient checkpointing, bf16 autocast where
                     bf16 is fast (fp32 on CPUs that emulate it), reference forward every step
       trl-nogc      no gradient checkpointing
       trl-fast      no gradient checkpointing, reference log-probs precomputed
       llamatune     ``llamatune dpo`` with ``recipes/dpo.yaml``'s settings (precomputed ref)
  rm   trl-default   RewardTrainer at its defaults (gradient checkpointing, bf16 where fast)
       trl-nogc      no gradient checkpointing
       llamatune     ``llamatune rm`` with ``recipes/reward.yaml``'s settings

Each configuration runs in a fresh subprocess, interleaved (a b c a b c ...), medians over
``--runs``. Per run:

  * wall seconds: from the child's first line (before importing torch) to the trained adapter
    on disk: imports, model load, data, training, saving;
  * train seconds: the training loop only; tokens/s: non-padding tokens of the epoch (both
    sides of every pair) over train seconds;
  * peak RSS: ``ru_maxrss`` of the child when training has ended (before the evaluation);
  * held-out accuracy on 25 pairs of 4 topics no configuration trains on, computed after the
    timing: for DPO the implicit reward ``beta * (log p_policy - log p_base)`` of both answers
    (the saved adapter on the base, plain transformers + peft in float32, the same code for
    every configuration); for the reward model its score of both answers (trl's saved
    sequence-classification model through transformers + peft, llamatune's run through
    ``llamatune.score``).

Targets (issue 11), checked on the medians: ``llamatune dpo`` >= 2x trl-default and >= 1.2x
the fastest trl configuration in wall time, peak RSS <= trl's, held-out accuracy within 2
points of trl's or better; ``llamatune rm`` >= 2x trl-default in wall time with peak RSS <=
trl's.

Usage:
    python bench/preference_bench.py --stage dpo --runs 3 --json dpo.json
    python bench/preference_bench.py --stage rm --runs 3
    python bench/preference_bench.py --stage dpo --quick        # 1 run: a smoke test
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the child's wall clock starts before the heavy imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "datasets" / "preference.jsonl"
N_TRAIN, N_HELD = 75, 25
SHARED = {"lr": 5e-4, "warmup_steps": 2, "batch_size": 8, "beta": 0.1, "seed": 42, "r": 16,
          "alpha": 32}
VARIANTS = {
    "dpo": {"trl-default": {}, "trl-nogc": {"gradient_checkpointing": False},
            "trl-fast": {"gradient_checkpointing": False, "precompute_ref_log_probs": True},
            "llamatune": None},
    "rm": {"trl-default": {}, "trl-nogc": {"gradient_checkpointing": False}, "llamatune": None},
}
MIN_RATIO_DEFAULT, MIN_RATIO_FASTEST, ACC_TOL = 2.0, 1.2, 0.02


# -- the job: data split and token ids, the same for everyone --------------------------------

def split_pairs(work: Path) -> tuple[Path, Path]:
    """75 training pairs and 25 held-out pairs from topics kept apart (seeded, deterministic)."""
    rows = [json.loads(x) for x in DATA.read_text().splitlines() if x.strip()]
    topics = sorted({r["topic"] for r in rows})
    random.Random(0).shuffle(topics)
    held_topics = set(topics[:4])  # 4 topics x 8 pairs; the first 25 are scored
    held = [r for r in rows if r["topic"] in held_topics][:N_HELD]
    train = [r for r in rows if r["topic"] not in held_topics][:N_TRAIN]
    paths = work / "train.jsonl", work / "held.jsonl"
    for path, part in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def _cfg(stage: str, train_path: Path, out: Path):
    from llamatune.config import load_config

    recipe = REPO / "recipes" / ("dpo.yaml" if stage == "dpo" else "reward.yaml")
    overrides = [f"data.path={train_path}", "data.eval_split=0", f"output_dir={out}",
                 "overwrite=true", "train.max_steps=0", "train.epochs=1", "train.save_every=0",
                 "train.eval_every=0", "train.progress=false", "lora.dropout=0.0",
                 f"lora.r={SHARED['r']}", f"lora.alpha={SHARED['alpha']}",
                 f"train.lr={SHARED['lr']}", f"train.warmup_steps={SHARED['warmup_steps']}",
                 f"train.batch_size={SHARED['batch_size']}", f"train.seed={SHARED['seed']}",
                 "data.cache=false"]
    if stage == "dpo":
        overrides += [f"dpo.beta={SHARED['beta']}", "dpo.loss=sigmoid"]
    return load_config(recipe, overrides), str(recipe)


def tokenized_pairs(stage: str, path: Path):
    """llamatune's token ids of the pairs in ``path`` (ChatML, answers and end token supervised)."""
    from llamatune.data import prepare
    from llamatune.model import load_tokenizer, resolve_model_path

    cfg, recipe = _cfg(stage, path, Path(tempfile.mkdtemp()))
    tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model.path))
    return prepare(cfg, tok, "pairs", f"llamatune {stage}", recipe).train, tok


def _split(sample, side):
    ids, labels = sample[f"{side}_ids"], sample[f"{side}_labels"]
    first = next(i for i, t in enumerate(labels) if t != -100)
    return ids[:first], ids[first:]


def _fast_bf16() -> bool:
    import torch

    from llamatune.model import cpu_has_fast_bf16

    return torch.cuda.is_available() or cpu_has_fast_bf16()


# -- the children ----------------------------------------------------------------------------

def run_llamatune(stage: str, train_path: Path, out: Path) -> dict:
    from llamatune.recipes import dpo, reward

    cfg, recipe_path = _cfg(stage, train_path, out)
    cfg.stage = stage
    cls = dpo.DPORecipe if stage == "dpo" else reward.RewardRecipe
    t = time.perf_counter()
    r = cls(cfg, recipe_path)
    r.setup()
    t_train = time.perf_counter()
    r.train()
    train_s = time.perf_counter() - t_train
    r.cleanup()
    tokens = sum(len(s["chosen_ids"]) + len(s["rejected_ids"]) for s in r.train_samples)
    return {"load_s": t_train - t, "train_s": train_s, "tokens": tokens, "steps": r.loop.step}


def run_trl(stage: str, variant: dict, train_path: Path, out: Path) -> dict:
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from datasets import Dataset
    from llamatune.model import LLAMA_LINEAR, resolve_model_path

    samples, tok = tokenized_pairs(stage, train_path)
    folder = resolve_model_path("smollm2-135m-instruct")
    t = time.perf_counter()
    common = dict(output_dir=str(out / "trl"), per_device_train_batch_size=SHARED["batch_size"],
                  num_train_epochs=1, learning_rate=SHARED["lr"], lr_scheduler_type="cosine",
                  warmup_steps=SHARED["warmup_steps"], max_grad_norm=1.0, seed=SHARED["seed"],
                  report_to=[], save_strategy="no", logging_steps=1, use_cpu=not torch.cuda.is_available(),
                  bf16=_fast_bf16() and variant.get("bf16", True), max_length=None,
                  dataloader_num_workers=0, **{k: v for k, v in variant.items() if k != "bf16"})
    peft_cfg = LoraConfig(r=SHARED["r"], lora_alpha=SHARED["alpha"], lora_dropout=0.0,
                          target_modules=LLAMA_LINEAR, task_type="CAUSAL_LM" if stage == "dpo"
                          else "SEQ_CLS")
    if stage == "dpo":
        rows = []
        for s in samples:
            prompt, chosen = _split(s, "chosen")
            _, rejected = _split(s, "rejected")
            rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})

        class PreTokenized(trl.DPOTrainer):
            """DPOTrainer fed llamatune's token ids (its own tokenization skipped)."""

            def _prepare_dataset(self, dataset, *args, **kwargs):
                return dataset

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        args = trl.DPOConfig(beta=SHARED["beta"], loss_type=["sigmoid"], **common)
        trainer = PreTokenized(model=model, args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tok, peft_config=peft_cfg)
    else:
        rows = [{"chosen_ids": s["chosen_ids"], "rejected_ids": s["rejected_ids"]} for s in samples]
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1,
                                                                   dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        args = trl.RewardConfig(**common)
        trainer = trl.RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                    processing_class=tok, peft_config=peft_cfg)
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train
    trainer.model.save_pretrained(str(out / "adapter"))
    tokens = sum(len(s["chosen_ids"]) + len(s["rejected_ids"]) for s in samples)
    return {"load_s": t_train - t, "train_s": train_s, "tokens": tokens,
            "steps": trainer.state.global_step}


def held_out_accuracy(stage: str, name: str, out: Path, held_path: Path) -> float:
    """Held-out accuracy of the trained model (after the timing; see the module docstring)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from llamatune.model import resolve_model_path

    held, tok = tokenized_pairs(stage, held_path)
    folder = resolve_model_path("smollm2-135m-instruct")
    adapter = out if name == "llamatune" else out / "adapter"
    if stage == "rm":
        if name == "llamatune":
            from llamatune.score import load_reward_model

            rm = load_reward_model(str(out))
            scores = rm.score_ids([s[f"{side}_ids"] for s in held for side in ("chosen", "rejected")])
        else:
            base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1,
                                                                      dtype=torch.float32)
            base.config.pad_token_id = tok.pad_token_id
            model = PeftModel.from_pretrained(base, str(adapter)).eval()
            with torch.no_grad():
                scores = [float(model(input_ids=torch.tensor([s[f"{side}_ids"]])).logits[0, 0])
                          for s in held for side in ("chosen", "rejected")]
        return sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(held))) / len(held)

    def logp(model, ids, labels):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        lab = torch.tensor(labels[1:])
        keep = lab != -100
        return float(torch.log_softmax(logits, -1)[keep].gather(1, lab[keep][:, None]).sum())

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), str(adapter)).eval()
    right = 0
    for s in held:
        r = {side: logp(policy, s[f"{side}_ids"], s[f"{side}_labels"])
             - logp(base, s[f"{side}_ids"], s[f"{side}_labels"]) for side in ("chosen", "rejected")}
        right += r["chosen"] > r["rejected"]
    return right / len(held)


def child(args) -> None:
    work = Path(args.work)
    out = work / f"{args.child}-{os.getpid()}"
    train_path, held_path = work / "train.jsonl", work / "held.jsonl"
    variant = VARIANTS[args.stage][args.child]
    res = (run_llamatune(args.stage, train_path, out) if variant is None
           else run_trl(args.stage, variant, train_path, out))
    res["wall_s"] = time.perf_counter() - T0
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    res["tokens_per_s"] = res["tokens"] / res["train_s"]
    res["accuracy"] = held_out_accuracy(args.stage, args.child, out, held_path)
    Path(args.result).write_text(json.dumps(res))


# -- the parent ------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=list(VARIANTS), default="dpo")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one run of each configuration")
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    ap.add_argument("--json", default=None, help="write every run and the medians here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    names = args.only.split(",") if args.only else list(VARIANTS[args.stage])
    runs = 1 if args.quick else args.runs
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.stage}-"))
    split_pairs(work)
    results: dict[str, list[dict]] = {n: [] for n in names}
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TOKENIZERS_PARALLELISM="false")
    for i in range(runs):
        for name in names:
            res_file = work / f"{name}-{i}.json"
            cmd = [sys.executable, __file__, "--stage", args.stage, "--child", name, "--work",
                   str(work), "--result", str(res_file)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            res = json.loads(res_file.read_text())
            results[name].append(res)
            print(f"run {i + 1} {name:12s} wall {res['wall_s']:6.1f} s  train {res['train_s']:6.1f} s  "
                  f"{res['tokens_per_s']:6.0f} tok/s  peak RSS {res['peak_rss_gb']:.2f} GB  "
                  f"steps {res['steps']}  held-out accuracy {res['accuracy']:.3f}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    print(f"\nmedians of {runs} interleaved run(s), stage {args.stage}:")
    print(f"{'configuration':14s} {'wall s':>8s} {'train s':>8s} {'tok/s':>7s} {'peak GB':>8s} "
          f"{'accuracy':>9s}")
    for n, m in med.items():
        print(f"{n:14s} {m['wall_s']:8.1f} {m['train_s']:8.1f} {m['tokens_per_s']:7.0f} "
              f"{m['peak_rss_gb']:8.2f} {m['accuracy']:9.3f}")
    if "llamatune" in med and len(med) > 1:
        ours = med["llamatune"]
        peers = {n: m for n, m in med.items() if n != "llamatune"}
        fastest = min(peers, key=lambda n: peers[n]["wall_s"])
        checks = []
        if "trl-default" in peers:
            ratio = peers["trl-default"]["wall_s"] / ours["wall_s"]
            checks.append((f"wall time vs trl-default {ratio:.2f}x (>= {MIN_RATIO_DEFAULT}x)",
                           ratio >= MIN_RATIO_DEFAULT))
        if args.stage == "dpo":
            ratio = peers[fastest]["wall_s"] / ours["wall_s"]
            checks.append((f"wall time vs fastest trl ({fastest}) {ratio:.2f}x "
                           f"(>= {MIN_RATIO_FASTEST}x)", ratio >= MIN_RATIO_FASTEST))
            best = max(m["accuracy"] for m in peers.values())
            checks.append((f"held-out accuracy {ours['accuracy']:.3f} vs trl's best {best:.3f} "
                           f"(within {ACC_TOL:.2f} or better)", ours["accuracy"] >= best - ACC_TOL))
        low = min(m["peak_rss_gb"] for m in peers.values())
        checks.append((f"peak RSS {ours['peak_rss_gb']:.2f} GB vs trl's lowest {low:.2f} GB "
                       "(<=)", ours["peak_rss_gb"] <= low))
        for text, ok in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {text}")
    if args.json:
        Path(args.json).write_text(json.dumps({"stage": args.stage, "runs": results,
                                               "medians": med, "shared": SHARED}, indent=2))


if __name__ == "__main__":
    main()
