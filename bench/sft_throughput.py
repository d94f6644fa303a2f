"""SFT training throughput: trl ``SFTTrainer`` (defaults, fastest settings) against llamatune.

Every configuration trains the same model on the same token ids for one epoch with the same
LoRA adapter (r=16, alpha 32, dropout 0.05 on q,k,v,o,gate,up,down) and the same optimization
(AdamW, lr 5e-4, 5 warmup steps, cosine, clip 1.0, seed 42: the shipped ``recipes/alpaca.yaml``;
trl gets llamatune's schedule, whose warmup starts at lr/5 where transformers' starts at 0),
so the configurations differ only in how fast and how lean they run:

  a  trl-default    SFTTrainer at its defaults: gradient checkpointing, padded batches in random
                    order, bf16 autocast where bf16 is fast (on CPUs without native bf16 trl's
                    default bf16 is emulated, ~100x slower matmuls, so ``a`` runs fp32 there)
  b  trl-fp32-pad   fp32, padded, no gradient checkpointing
     trl-fp32-pf    fp32, padding_free (one flattened row per batch), no gradient checkpointing
     trl-bf16-pf    bf16 autocast, padding_free, no gradient checkpointing (fast bf16 only)
  c  llamatune      ``SFTRecipe`` with the shipped recipe's settings

The ``b`` runs are fed llamatune's batches (its length-grouped epoch order, through a sequential
sampler): the least padding a padded run can have, and the same samples in every step, so their
per-step losses track llamatune's and the final-loss check compares like with like. (With
different batch orders the final loss moves by about 2% with the data order alone.)

``trl-fp32-pack`` (packing into max_length rows: fewer, larger optimizer steps, so not the same
training) can be added with ``--only``. Configurations run interleaved (a b c a b c ...), each
in its own fresh subprocess, and the medians over ``--runs`` are reported.

Data: the first ``--rows`` rows of ``datasets/alpaca.jsonl``, rendered with the Alpaca template
and tokenized by llamatune (``llamatune.recipes.sft.prepare_data``). trl gets those token ids
pre-tokenized (``input_ids`` + ``completion_mask``, ``completion_only_loss=True``), so every
configuration trains on identical ids with the loss on the same answer tokens; the script
checks that the token counts agree.

What is measured, per run:
  * train seconds: the ``train()`` call only (model load, tokenization and trainer set-up are
    reported separately as load seconds);
  * non-padding tokens/s: the sum of the sample lengths of the epoch / train seconds, the same
    token count for every configuration;
  * peak RSS: ``ru_maxrss`` of the child at the end of training (whole process: imports, load
    and training), and the training-phase peak (VmHWM reset just before ``train()``);
  * losses: the mean of the last quarter of the logged per-step training losses (the
    "final window"; trl-default sees other batches), and the loss of the trained
    adapter on the first ``--eval-rows`` training rows, computed by the same code for every
    configuration (eval mode, no dropout), which is what the 2% loss target is checked on;
  * model FLOP/s as a fraction of a matrix-multiply peak measured in the same run (best of a
    large square ``torch.mm``, fp32, and bf16 when a configuration uses it). Model FLOPs are the
    matmul FLOPs the LoRA training step really needs, recomputation not counted:
      - frozen linear weights (P per token): forward 2P + input-gradient 2P, no weight-gradient;
      - LoRA A and B (R = r * (d_in + d_out) per adapted layer): forward 2R, input-gradient 2R,
        weight-gradient 2R;
      - attention scores and values: the causal triangle within each sample, forward
        4 * q_dim per query-key pair and layer, backward twice that;
      - output head (frozen, tied): forward + input-gradient 4 * hidden * vocab per position it
        is applied to, counting only non-padding positions the method computes: llamatune's
        supervised positions; trl on CPU every position that has a next token (its chunked head
        scores every position); trl with Triton (CUDA) the supervised positions;
      - all of this on non-padding tokens only (padding is waste, not model work).

Usage:
    python bench/sft_throughput.py                        # both models, 3 runs: the measurement
    python bench/sft_throughput.py --quick                # 16 rows, 1 run: a smoke test
    python bench/sft_throughput.py --model small --only a,c --runs 5 --json out.json
    python bench/sft_throughput.py --device cuda          # GPU: bf16 variants run too
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import reset_peak_rss, status_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "alpaca.yaml"
DATA = REPO / "datasets" / "alpaca.jsonl"
DEFAULT_MODEL = "smollm2-135m-instruct"
# The small random Llama: few thin layers under the default model's 49,152-token vocabulary,
# so the output head dominates the step.
SMALL = {"num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 6,
         "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 1024}
SMALL_SEED = 0
SMALL_VERSION = 1

# Targets from the issue, checked on the medians of the same run.
MIN_RATIO_DEFAULT = 2.0  # llamatune tokens/s over trl-default
MIN_RATIO_FASTEST = 1.2  # llamatune tokens/s over the fastest trl variant
MIN_MFU = 0.40  # llamatune model FLOP/s over the measured matmul peak
LOSS_TOL = 0.02  # llamatune final loss against trl-fp32-pad

# Each variant: the SFTConfig knobs it sets on top of the shared ones ("bf16": "auto" follows
# the hardware, True needs fast bf16), whether it is fed llamatune's batches ("same_batches":
# the same samples in every step, in the same order, which is also the least padding a padded
# run can have, and makes its losses comparable step for step), its group letter and a
# one-line description.
VARIANTS = {
    "trl-default": {"group": "a", "bf16": "auto", "trl": {}, "same_batches": False,
                    "about": "trl defaults: grad checkpointing, padding, random order"},
    "trl-fp32-pad": {"group": "b", "bf16": False, "same_batches": True,
                     "trl": {"gradient_checkpointing": False},
                     "about": "fp32, padded, llamatune's length-grouped batches, no checkpointing"},
    "trl-fp32-pf": {"group": "b", "bf16": False, "same_batches": True,
                    "trl": {"gradient_checkpointing": False, "padding_free": True},
                    "about": "fp32, padding_free, llamatune's batches, no checkpointing"},
    "trl-bf16-pf": {"group": "b", "bf16": True, "same_batches": True,
                    "trl": {"gradient_checkpointing": False, "padding_free": True},
                    "about": "bf16 autocast, padding_free, llamatune's batches, no checkpointing"},
    "trl-fp32-pack": {"group": "x", "bf16": False, "same_batches": False,
                      "trl": {"gradient_checkpointing": False, "packing": True},
                      "about": "fp32, packed max_length rows (fewer, larger steps)"},
    "llamatune": {"group": "c", "bf16": None, "trl": None, "same_batches": True,
                  "about": "llamatune SFTRecipe, recipes/alpaca.yaml settings"},
}
DEFAULT_SET = ["trl-default", "trl-fp32-pad", "trl-fp32-pf", "trl-bf16-pf", "llamatune"]
PAD_REFERENCE = "trl-fp32-pad"


# ----------------------------------------------------------------------------------------
# Child side: one configuration (or the peak probe, or the small-model builder) per process.
# ----------------------------------------------------------------------------------------


def _max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _recipe_config(spec: dict, out_dir: str):
    """The shipped Alpaca recipe with only data, model, length and bookkeeping overridden."""
    from llamatune.config import load_config

    overrides = [
        f"model.path={spec['model_path']}",
        f"model.device={spec['device']}",
        f"data.path={spec['data_path']}",
        "data.eval_split=0",
        "train.max_steps=0",
        "train.epochs=1",
        f"train.batch_size={spec['batch']}",
        f"train.max_length={spec['max_length']}",
        "train.save_every=0",
        "train.eval_every=0",
        "train.progress=false",
        f"output_dir={out_dir}",
    ]
    return load_config(RECIPE, overrides)


def model_flops(mc: dict, lengths: list[int], head_positions: int, r: int) -> dict:
    """Matmul FLOPs of one LoRA training pass over samples of the given lengths.

    Args:
        mc: The model's ``config.json`` as a dict (Llama layout).
        lengths: Non-padding length of every sample.
        head_positions: Positions the output head is applied to (forward + input-gradient).
        r: LoRA rank (every linear layer of the blocks adapted).

    Returns:
        FLOPs by part and their ``total``.
    """
    h, nl, vocab = mc["hidden_size"], mc["num_hidden_layers"], mc["vocab_size"]
    hd = mc.get("head_dim") or h // mc["num_attention_heads"]
    q = mc["num_attention_heads"] * hd
    kv = mc.get("num_key_value_heads", mc["num_attention_heads"]) * hd
    inter = mc["intermediate_size"]
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    frozen = nl * sum(a * b for a, b in shapes)
    lora = nl * r * sum(a + b for a, b in shapes)
    n = sum(lengths)
    pairs = sum(k * (k + 1) // 2 for k in lengths)  # causal query-key pairs within samples
    out = {
        "frozen_linear": 4 * frozen * n,
        "lora": 6 * lora * n,
        "attention": 3 * 4 * q * pairs * nl,
        "head": 4 * h * vocab * head_positions,
    }
    out["total"] = sum(out.values())
    return out


def _fixed_loss(model, samples: list[dict], pad_id: int, device: str, batch: int) -> float:
    """Mean next-token loss over the supervised tokens of ``samples`` (eval mode, no grad)."""
    import torch

    from llamatune.data.collate import pad_batch
    from llamatune.net import Net

    net = model if isinstance(model, Net) else Net(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            b = pad_batch(samples[i : i + batch], pad_id)
            b = {k: v.to(device) for k, v in b.items()}
            loss, n = net("lm_loss", b)
            total += float(loss)
            count += int(n)
    model.train(was_training)
    return total / max(count, 1)


def _common_result(spec: dict, samples: list[dict], mc: dict, head_positions: int,
                   positions: int, losses: list[float], train_s: float, load_s: float,
                   rss_before: int, hwm_ok: bool, dtype: str) -> dict:
    lengths = [len(s["input_ids"]) for s in samples]
    n_sup = sum(sum(1 for t in s["labels"][1:] if t != -100) for s in samples)
    window = max(1, len(losses) // 4)
    res = {
        "config": spec["config"], "model": spec["model"], "run": spec["run"],
        "dtype": dtype, "train_s": train_s, "load_s": load_s,
        "samples": len(samples), "tokens": sum(lengths), "supervised": n_sup,
        "positions": positions, "head_positions": head_positions,
        "tokens_per_s": sum(lengths) / train_s,
        "steps": len(losses), "losses": losses,
        "final_window_loss": statistics.fmean(losses[-window:]) if losses else None,
        "final_window_steps": window, "eval_rows": min(spec["eval_rows"], len(samples)),
        "peak_rss": _max_rss_bytes(), "rss_before_train": rss_before,
        "train_peak_rss": status_bytes("VmHWM") if hwm_ok else None,
        "flops": model_flops(mc, lengths, head_positions, spec["lora_r"]),
    }
    if spec["device"].startswith("cuda"):
        import torch

        res["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return res


def child_llamatune(spec: dict, t_start: float) -> dict:
    """Drive ``SFTRecipe`` in-process and time its ``train()``."""
    import torch

    from llamatune import training
    from llamatune.recipes.sft import SFTRecipe

    with tempfile.TemporaryDirectory(prefix="bench-llamatune-") as tmp:
        cfg = _recipe_config(spec, str(Path(tmp) / "run"))
        recipe = SFTRecipe(cfg)
        recipe.setup()
        samples = recipe.train_samples
        # The batches train() will build for epoch 0 (padding shows in the position count).
        batches = training.epoch_batches(samples, cfg.train, 0, recipe.pad_id)
        positions = sum(int(b["input_ids"].numel()) for b in batches)
        keys = [_batch_key(row[: int(m.sum())].tolist() for row, m in
                           zip(b["input_ids"], b["attention_mask"])) for b in batches]
        del batches
        mc = recipe.model.config.to_dict() if hasattr(recipe.model.config, "to_dict") else {}
        dtype = str(next(recipe.model.parameters()).dtype).replace("torch.", "")
        rss_before = status_bytes("VmRSS")
        hwm_ok = reset_peak_rss()
        if spec["device"].startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        load_s = time.perf_counter() - t_start
        _sync(spec["device"])
        t0 = time.perf_counter()
        recipe.train()
        _sync(spec["device"])
        train_s = time.perf_counter() - t0
        rows = [json.loads(ln) for ln in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        lrs = [r["lr"] for r in rows if "lr" in r]
        n_sup = sum(sum(1 for t in s["labels"][1:] if t != -100) for s in samples)
        res = _common_result(spec, samples, mc, n_sup, positions, losses, train_s, load_s,
                             rss_before, hwm_ok, dtype)
        res["lrs"] = lrs
        res["batch_keys"] = keys
        res["eval_loss"] = _fixed_loss(recipe.model, samples[: spec["eval_rows"]], recipe.pad_id,
                                       recipe.device, spec["batch"])
        res["settings"] = {"lr": cfg.train.lr, "schedule": cfg.train.schedule,
                           "warmup_steps": cfg.train.warmup_steps,
                           "group_by_length": cfg.train.group_by_length,
                           "gradient_checkpointing": cfg.model.gradient_checkpointing,
                           "packing": cfg.train.packing}
    return res


def _llamatune_order(samples: list[dict], tc, pad_id: int) -> list[int] | None:
    """Sample indices in the order llamatune's epoch-0 batches hold them.

    Fed to a sequential sampler with the same batch size, they give trl llamatune's batches.

    Returns:
        The order, or ``None`` when a batch other than the last is short (then consecutive
        groups of ``batch_size`` would not reproduce the batches).
    """
    from llamatune import training

    where: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        where.setdefault(tuple(s["input_ids"]), []).append(i)
    batches = training.epoch_batches(samples, tc, 0, pad_id)
    order = []
    for k, b in enumerate(batches):
        if k < len(batches) - 1 and b["input_ids"].shape[0] != tc.batch_size:
            return None
        for row, mask in zip(b["input_ids"], b["attention_mask"]):
            order.append(where[tuple(row[: int(mask.sum())].tolist())].pop())
    return order


def _batch_key(seqs) -> str:
    """A short fingerprint of the samples in one batch (order within the batch ignored)."""
    import hashlib

    return hashlib.sha1(repr(sorted(tuple(x) for x in seqs)).encode()).hexdigest()[:12]


class _CountingCollator:
    """Wraps trl's collator to count the positions (padding included) and fingerprint batches."""

    def __init__(self, inner):
        self.inner = inner
        self.positions = 0
        self.keys: list[str] = []

    def __call__(self, examples):
        out = self.inner(examples)
        self.positions += int(out["input_ids"].numel())
        self.keys.append(_batch_key(e["input_ids"] for e in examples))
        return out


def child_trl(spec: dict, t_start: float) -> dict:
    """Run ``SFTTrainer`` on llamatune's token ids and time its ``train()``."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.kernels.chunked_logprob import _use_triton

    from datasets import Dataset
    from llamatune import training
    from llamatune.model import load_tokenizer, lora_config, resolve_model_path
    from llamatune.recipes.sft import prepare_data

    variant = VARIANTS[spec["config"]]
    device = spec["device"]
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        cfg = _recipe_config(spec, str(Path(tmp) / "run"))
        tc = cfg.train
        folder = resolve_model_path(cfg.model.path)
        tokenizer = load_tokenizer(cfg.model, folder)
        samples, _, _ = prepare_data(cfg, tokenizer)
        knobs = dict(variant["trl"])
        order = None
        if variant["same_batches"]:
            order = _llamatune_order(samples, tc, tokenizer.pad_token_id)
            if order is None:
                print("llamatune's batches are not consecutive groups here; trl groups by length",
                      flush=True)
                if not knobs.get("padding_free"):
                    knobs["train_sampling_strategy"] = "group_by_length"
            else:
                knobs["train_sampling_strategy"] = "sequential"
        fed = samples if order is None else [samples[i] for i in order]
        ds = Dataset.from_dict({
            "input_ids": [s["input_ids"] for s in fed],
            "completion_mask": [[int(t != -100) for t in s["labels"]] for s in fed],
        })
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=cfg.model.attn_implementation
        )
        bf16 = spec["bf16"]
        max_length = tc.max_length
        if knobs.get("padding_free") and not knobs.get("packing"):
            # trl refuses padding_free with a max_length it cannot enforce; llamatune's
            # tokenization has already cut every sample to train.max_length.
            max_length = None
        args = SFTConfig(
            output_dir=str(Path(tmp) / "trl"),
            # The same optimization as the recipe, so losses compare.
            num_train_epochs=1,
            per_device_train_batch_size=tc.batch_size,
            gradient_accumulation_steps=tc.grad_accum,
            learning_rate=tc.lr,
            lr_scheduler_type=tc.schedule,
            warmup_steps=tc.warmup_steps,
            weight_decay=tc.weight_decay,
            max_grad_norm=tc.max_grad_norm,
            seed=tc.seed,
            max_length=max_length,
            completion_only_loss=True,
            # Measurement plumbing: a loss every step, nothing saved, no bars, no trackers.
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=not device.startswith("cuda"),
            bf16=bf16,
            **knobs,
        )
        class SameScheduleSFTTrainer(SFTTrainer):
            """SFTTrainer with the recipe's warmup + cosine schedule.

            transformers' warmup starts at lr 0 (step s gets s/warmup), llamatune's at
            1/warmup ((s+1)/warmup); over 20 steps that shifts the loss by more than the 2%
            being checked, so trl gets llamatune's schedule. Speed is unaffected.
            """

            def create_scheduler(self, num_training_steps, optimizer=None):
                if self.lr_scheduler is None:
                    self.lr_scheduler = training.build_scheduler(
                        optimizer or self.optimizer, tc, num_training_steps)
                return self.lr_scheduler

        torch.manual_seed(tc.seed)  # adapter initialization
        trainer = SameScheduleSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                             peft_config=lora_config(cfg.lora))
        counter = _CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        # trl's dataset after its own preparation (truncation, filtering): what it trains on.
        trained = trainer.train_dataset
        if "seq_lengths" in trained.column_names:  # packed rows: recover the samples
            lengths = [n for row in trained["seq_lengths"] for n in row]
        else:
            lengths = [len(x) for x in trained["input_ids"]]
        n_sup_trl = sum(sum(1 for t in lab[1:] if t != -100) for lab in trained["labels"])
        mc = trainer.model.get_base_model().config.to_dict()
        rss_before = status_bytes("VmRSS")
        hwm_ok = reset_peak_rss()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        load_s = time.perf_counter() - t_start
        _sync(device)
        t0 = time.perf_counter()
        trainer.train()
        _sync(device)
        train_s = time.perf_counter() - t0
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        compact = _use_triton(torch.device(device))
        # trl's chunked head scores only supervised positions with Triton, else every position.
        n_sup = sum(sum(1 for t in s["labels"][1:] if t != -100) for s in samples)
        head_positions = n_sup if compact else sum(n - 1 for n in lengths)
        res = _common_result(spec, samples, mc, head_positions, counter.positions, losses,
                             train_s, load_s, rss_before, hwm_ok, "bfloat16" if bf16 else "float32")
        res["batch_keys"] = counter.keys
        res["trl_tokens"] = sum(lengths)
        res["trl_supervised"] = n_sup_trl
        res["eval_loss"] = _fixed_loss(trainer.model, samples[: spec["eval_rows"]],
                                       tokenizer.pad_token_id, device, spec["batch"])
        res["settings"] = {k: getattr(args, k) for k in (
            "learning_rate", "warmup_steps", "gradient_checkpointing", "bf16", "padding_free",
            "packing", "train_sampling_strategy", "optim")}
        res["settings"]["lr_scheduler"] = f"llamatune {tc.schedule}"
        res["settings"]["batches"] = "llamatune's" if order is not None else "trl's sampler"
        res["lrs"] = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
        res["settings"] = {k: v if isinstance(v, (bool, int, float)) else str(getattr(v, "value", v))
                           for k, v in res["settings"].items()}
    return res


def child_probe(spec: dict) -> dict:
    """Hardware facts and the measured matmul peak (best of repeated large ``torch.mm``)."""
    import platform

    import torch

    from llamatune.model import cpu_has_fast_bf16

    device = spec["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        fast_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(0)
        n = 8192
    else:
        fast_bf16 = cpu_has_fast_bf16()
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        n = 2048
    peaks = {}
    dtypes = [torch.float32] + ([torch.bfloat16] if fast_bf16 else [])
    for dt in dtypes:
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        c = torch.empty(n, n, device=device, dtype=dt)
        for _ in range(2):
            torch.mm(a, b, out=c)
        _sync(device)
        best, t_end = float("inf"), time.perf_counter() + spec["probe_s"]
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        peaks[str(dt).replace("torch.", "")] = 2 * n**3 / best
    import peft
    import transformers
    import trl

    return {"device": device, "device_name": name, "fast_bf16": fast_bf16, "peaks": peaks,
            "matmul_n": n, "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": trl.__version__, "peft": peft.__version__}}


def child_make_small(spec: dict) -> dict:
    """Save the seeded small random Llama with the default model's tokenizer."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = spec["default_path"]
    out = Path(spec["out"])
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    config = AutoConfig.from_pretrained(src)
    for k, v in SMALL.items():
        setattr(config, k, v)
    torch.manual_seed(SMALL_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"path": str(out), "parameters": sum(p.numel() for p in model.parameters())}


def child_main(spec_json: str) -> int:
    """Entry point of a child process: run one job, write its JSON result."""
    t_start = time.perf_counter()
    spec = json.loads(spec_json)
    sys.path.insert(0, str(REPO))
    kind = spec["kind"]
    if kind == "probe":
        res = child_probe(spec)
    elif kind == "make_small":
        res = child_make_small(spec)
    elif spec["config"] == "llamatune":
        res = child_llamatune(spec, t_start)
    else:
        res = child_trl(spec, t_start)
    Path(spec["result"]).write_text(json.dumps(res))
    return 0


# ----------------------------------------------------------------------------------------
# Parent side: plan, interleave, collect, report.
# ----------------------------------------------------------------------------------------


def _run_child(spec: dict, workdir: Path, tag: str) -> dict:
    """Run one child; return its result, or ``{"error": ...}`` with the log tail."""
    result = workdir / f"{tag}.json"
    log = workdir / f"{tag}.log"
    spec = dict(spec, result=str(result))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if proc.returncode or not result.is_file():
        tail = log.read_text()[-2500:]
        return {"error": f"exit {proc.returncode}; log {log}:\n{tail}"}
    return json.loads(result.read_text())


def _select(only: str | None) -> list[str]:
    if not only:
        return list(DEFAULT_SET)
    names: list[str] = []
    for item in only.split(","):
        item = item.strip()
        if item in ("a", "b", "c"):
            names += [n for n in DEFAULT_SET if VARIANTS[n]["group"] == item]
        elif item in VARIANTS:
            names.append(item)
        elif item:
            raise SystemExit(f"--only: unknown configuration {item!r}; use a, b, c or one of "
                             f"{', '.join(VARIANTS)}")
    return [n for n in VARIANTS if n in names]  # a b c order, no duplicates


def _write_rows(rows: int, out: Path) -> None:
    lines = [ln for ln in DATA.read_text().splitlines() if ln.strip()]
    if len(lines) < rows:
        raise SystemExit(f"--rows {rows}: {DATA} has only {len(lines)} rows")
    out.write_text("\n".join(lines[:rows]) + "\n")


def _small_model_path(default_path: str, workdir: Path) -> str:
    from llamatune.model import cache_dir

    dims = "-".join(f"{k}{v}" for k, v in SMALL.items())
    out = cache_dir() / "bench" / f"small-llama-v{SMALL_VERSION}-seed{SMALL_SEED}-{dims}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = _run_child({"kind": "make_small", "default_path": default_path, "out": str(out)},
                     workdir, "make-small")
    if "error" in res:
        raise SystemExit(f"could not build the small model: {res['error']}")
    print(f"built the small random Llama ({res['parameters']:,} parameters) at {out}", flush=True)
    return str(out)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _summarize(results: list[dict], peaks: dict) -> dict:
    """Medians per configuration (over runs that finished)."""
    ok = [r for r in results if "error" not in r]
    first = ok[0] if ok else {}
    summary = {}
    for name in dict.fromkeys(r["config"] for r in results):
        rs = [r for r in ok if r["config"] == name]
        errs = [r for r in results if r["config"] == name and "error" in r]
        if not rs:
            summary[name] = {"error": errs[0]["error"] if errs else "no result"}
            continue
        tps = [r["tokens_per_s"] for r in rs]
        train_s = _median([r["train_s"] for r in rs])
        flops = rs[0]["flops"]["total"]
        peak = peaks.get(rs[0]["dtype"]) or peaks.get("float32")
        summary[name] = {
            "runs": len(rs), "failed_runs": len(errs), "dtype": rs[0]["dtype"],
            "train_s": train_s, "load_s": _median([r["load_s"] for r in rs]),
            "tokens_per_s": _median(tps), "tokens_per_s_min": min(tps),
            "tokens_per_s_max": max(tps),
            "peak_rss": _median([r["peak_rss"] for r in rs]),
            "cuda_peak": _median([r.get("cuda_peak_bytes") for r in rs]),
            "train_peak_rss": _median([r["train_peak_rss"] for r in rs]),
            "final_window_loss": _median([r["final_window_loss"] for r in rs]),
            "eval_loss": _median([r["eval_loss"] for r in rs]),
            "tokens": rs[0]["tokens"], "supervised": rs[0]["supervised"],
            "samples": rs[0]["samples"], "steps": rs[0]["steps"],
            "trl_tokens": rs[0].get("trl_tokens"), "trl_supervised": rs[0].get("trl_supervised"),
            "lrs": rs[0].get("lrs"), "batch_keys": rs[0].get("batch_keys"),
            "eval_rows": rs[0]["eval_rows"],
            "pad_fraction": 1 - rs[0]["tokens"] / rs[0]["positions"] if rs[0]["positions"] else 0,
            "model_flops": flops, "flops_per_s": flops / train_s,
            "mfu": flops / train_s / peak if peak else None,
            "peak_used": peak,
        }
    if first:
        summary["_tokens"] = {"tokens": first["tokens"], "supervised": first["supervised"]}
    return summary


def _fmt_gb(b) -> str:
    return f"{b / 2**30:.2f}" if b else "-"


def _print_table(model: str, summary: dict, names: list[str]) -> None:
    lt = summary.get("llamatune", {})
    lt_tps = lt.get("tokens_per_s")
    gpu = any(s.get("cuda_peak") for n, s in summary.items() if not n.startswith("_"))
    head = (f"{'config':<15}{'train s':>9}{'load s':>8}{'tokens/s (min-max)':>24}{'pad%':>6}"
            f"{'RSS GB':>8}{'train GB':>9}{'win loss':>9}{'eval loss':>10}{'c/x':>7}{'MFU%':>7}"
            + (f"{'GPU GB':>8}" if gpu else ""))
    print(f"\n== {model}: medians over runs ==")
    print(head)
    print("-" * len(head))
    for name in names:
        s = summary.get(name)
        if s is None:
            continue
        if "error" in s:
            print(f"{name:<15}  FAILED: {s['error'].splitlines()[0]}")
            continue
        ratio = f"{lt_tps / s['tokens_per_s']:.2f}" if lt_tps else "-"
        tps = f"{s['tokens_per_s']:,.0f} ({s['tokens_per_s_min']:,.0f}-{s['tokens_per_s_max']:,.0f})"
        mfu = f"{100 * s['mfu']:.1f}" if s["mfu"] is not None else "-"
        print(f"{name:<15}{s['train_s']:>9.1f}{s['load_s']:>8.1f}{tps:>24}"
              f"{100 * s['pad_fraction']:>6.1f}{_fmt_gb(s['peak_rss']):>8}"
              f"{_fmt_gb(s['train_peak_rss']):>9}{s['final_window_loss']:>9.4f}"
              f"{s['eval_loss']:>10.4f}{ratio:>7}{mfu:>7}"
              + (f"{_fmt_gb(s['cuda_peak']):>8}" if gpu else ""))


def _checks(model: str, summary: dict, names: list[str]) -> list[tuple[str, bool | None, str]]:
    """The issue's targets as (name, passed, detail); passed is None when not measurable."""
    out = []
    ok = {n: s for n, s in summary.items() if not n.startswith("_") and "error" not in s}
    lt = ok.get("llamatune")
    # Token counts: every configuration trains on the same samples and supervised tokens.
    counts = {n: (s["tokens"], s["supervised"], s["trl_tokens"] or s["tokens"],
                  s["trl_supervised"] or s["supervised"]) for n, s in ok.items()}
    ref = next(iter(counts.values()), None)
    same = all(c[:2] == ref[:2] and c[2] == c[0] and c[3] == c[1] for c in counts.values())
    if ref:
        out.append(("same tokens", same,
                    f"{ref[0]:,} non-padding tokens, {ref[1]:,} supervised in every configuration"
                    if same else "differ: " + "; ".join(f"{n} {c}" for n, c in counts.items())))
    # The same learning rate at every step (packing runs fewer steps and is left out).
    lrs = {n: s["lrs"] for n, s in ok.items() if VARIANTS[n]["group"] != "x" and s["lrs"]}
    if len(lrs) > 1:
        first = next(iter(lrs.values()))
        same_lr = all(len(v) == len(first) and all(abs(x - y) <= 1e-9 + 1e-6 * abs(y)
                                                   for x, y in zip(v, first)) for v in lrs.values())
        out.append(("same schedule", same_lr,
                    f"{len(first)} steps, lr {first[0]:.3g} -> max {max(first):.3g} -> "
                    f"{first[-1]:.3g} in every configuration" if same_lr else
                    "differ: " + "; ".join(f"{n} {[round(x, 8) for x in v]}" for n, v in lrs.items())))
    if lt is None:
        out.append(("llamatune", None, "llamatune did not run; no targets to check"))
        return out
    same = [n for n in ok if VARIANTS[n]["same_batches"] and n != "llamatune"]
    if same:
        bad = [n for n in same if ok[n]["batch_keys"] != lt["batch_keys"]]
        out.append(("same batches", not bad,
                    f"{', '.join(same)} trained on llamatune's {len(lt['batch_keys'])} batches in "
                    "llamatune's order" if not bad else f"{', '.join(bad)} saw other batches"))
    a = ok.get("trl-default")
    if a:
        ratio = lt["tokens_per_s"] / a["tokens_per_s"]
        out.append(("vs trl defaults", ratio >= MIN_RATIO_DEFAULT,
                    f"{lt['tokens_per_s']:,.0f} / {a['tokens_per_s']:,.0f} tokens/s = {ratio:.2f}x "
                    f"(target >= {MIN_RATIO_DEFAULT}x)"))
        out.append(("peak RSS", lt["peak_rss"] <= a["peak_rss"],
                    f"{_fmt_gb(lt['peak_rss'])} GB vs trl-default {_fmt_gb(a['peak_rss'])} GB "
                    "(target: no higher)"))
    bs = {n: s for n, s in ok.items() if VARIANTS[n]["group"] == "b"}
    if bs:
        fastest = max(bs, key=lambda n: bs[n]["tokens_per_s"])
        ratio = lt["tokens_per_s"] / bs[fastest]["tokens_per_s"]
        out.append(("vs trl fastest", ratio >= MIN_RATIO_FASTEST,
                    f"{lt['tokens_per_s']:,.0f} / {bs[fastest]['tokens_per_s']:,.0f} tokens/s "
                    f"({fastest}) = {ratio:.2f}x (target >= {MIN_RATIO_FASTEST}x)"))
    if lt["mfu"] is not None:
        out.append(("MFU", lt["mfu"] >= MIN_MFU,
                    f"{lt['flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * lt['mfu']:.1f}% of the measured "
                    f"{lt['dtype']} matmul peak {lt['peak_used'] / 1e9:.1f} GFLOP/s "
                    f"(target >= {100 * MIN_MFU:.0f}%)"))
    p = ok.get(PAD_REFERENCE)
    if p:
        rel = lt["eval_loss"] / p["eval_loss"] - 1
        window = f"last {max(1, lt['steps'] // 4)} steps"
        if p["batch_keys"] != lt["batch_keys"]:
            window += ", other batches"
        out.append(("final loss", abs(rel) <= LOSS_TOL,
                    f"{lt['eval_loss']:.4f} vs {PAD_REFERENCE} {p['eval_loss']:.4f} "
                    f"({100 * rel:+.2f}%, limit {100 * LOSS_TOL:.0f}%) after training, on the first "
                    f"{lt['eval_rows']} rows; final-window train losses "
                    f"{lt['final_window_loss']:.4f} vs {p['final_window_loss']:.4f} ({window})"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="configurations:\n" + "\n".join(
                                     f"  {n:<15}({v['group']}) {v['about']}"
                                     for n, v in VARIANTS.items()))
    ap.add_argument("--model", choices=["default", "small", "both"], default="both")
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs per configuration")
    ap.add_argument("--rows", type=int, default=160, help="first N rows of datasets/alpaca.jsonl")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--eval-rows", type=int, default=64,
                    help="rows the trained adapter's loss is measured on (first N training rows)")
    ap.add_argument("--only", help="comma list: a, b, c and/or configuration names")
    ap.add_argument("--quick", action="store_true", help="smoke test: 16 rows, 1 run")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--probe-seconds", type=float, default=3.0,
                    help="seconds spent timing the matmul peak per dtype and round")
    ap.add_argument("--json", metavar="OUT", help="write every run and the summary here")
    ap.add_argument("--child", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child)
    if args.quick:
        args.rows, args.runs = min(args.rows, 16), 1
    eval_rows = min(args.eval_rows, args.rows)
    names = _select(args.only)
    models = ["default", "small"] if args.model == "both" else [args.model]

    sys.path.insert(0, str(REPO))
    from llamatune.model import resolve_model_path

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as work:
        workdir = Path(work)
        probe = _run_child({"kind": "probe", "device": args.device, "probe_s": args.probe_seconds},
                           workdir, "probe-0")
        if "error" in probe:
            print(probe["error"], file=sys.stderr)
            return 1
        device = probe["device"]
        peaks = dict(probe["peaks"])
        print(f"device: {device} ({probe['device_name']}), {probe['threads']} threads; "
              f"fast bf16: {probe['fast_bf16']}; "
              + ", ".join(f"{k} {v}" for k, v in probe["versions"].items()), flush=True)
        plan = []
        for name in names:
            want = VARIANTS[name]["bf16"]
            if want is True and not probe["fast_bf16"]:
                print(f"skip {name}: bf16 matmuls are not fast on this {device} (no AVX512-BF16/AMX "
                      "or no bf16 GPU); emulated bf16 runs ~100x slower than fp32", flush=True)
                continue
            plan.append(name)
        if "trl-default" in plan and not probe["fast_bf16"]:
            print("note trl-default: trl turns bf16 on by default; that bf16 is emulated on this "
                  f"{device} (~100x slower), so trl-default runs fp32, as a user here would have to",
                  flush=True)
        data_path = workdir / f"alpaca-{args.rows}.jsonl"
        _write_rows(args.rows, data_path)
        default_path = resolve_model_path(DEFAULT_MODEL)
        paths = {"default": default_path}
        if "small" in models:
            paths["small"] = _small_model_path(default_path, workdir)
        print(f"plan: models {', '.join(models)}; {args.runs} interleaved run(s) of "
              f"{', '.join(plan)}; {args.rows} rows, batch {args.batch}, max length "
              f"{args.max_length}", flush=True)

        results: list[dict] = []
        probes = [probe]
        total = len(models) * args.runs * len(plan)
        done = 0
        for model in models:
            for run in range(args.runs):
                if run or model != models[0]:
                    p = _run_child({"kind": "probe", "device": device,
                                    "probe_s": args.probe_seconds}, workdir, f"probe-{len(probes)}")
                    if "error" not in p:
                        probes.append(p)
                        for k, v in p["peaks"].items():
                            peaks[k] = max(peaks.get(k, 0.0), v)
                for name in plan:
                    spec = {"kind": "train", "config": name, "model": model, "run": run,
                            "model_path": paths[model], "data_path": str(data_path),
                            "device": device, "batch": args.batch, "max_length": args.max_length,
                            "eval_rows": eval_rows, "lora_r": 16,
                            "bf16": (probe["fast_bf16"] if VARIANTS[name]["bf16"] == "auto"
                                     else VARIANTS[name]["bf16"])}
                    t0 = time.perf_counter()
                    res = _run_child(spec, workdir, f"{model}-{name}-{run}")
                    done += 1
                    res.setdefault("config", name)
                    res.setdefault("model", model)
                    res.setdefault("run", run)
                    results.append(res)
                    if "error" in res:
                        print(f"[{done}/{total}] {model} {name} run {run + 1}: FAILED\n{res['error']}",
                              flush=True)
                        continue
                    gpu = (f" (GPU {_fmt_gb(res['cuda_peak_bytes'])} GB)"
                           if "cuda_peak_bytes" in res else "")
                    print(f"[{done}/{total}] {model} {name} run {run + 1}: train "
                          f"{res['train_s']:.1f} s, {res['tokens_per_s']:,.0f} tokens/s, "
                          f"{res['steps']} steps, peak RSS {_fmt_gb(res['peak_rss'])} GB{gpu}, "
                          f"eval loss {res['eval_loss']:.4f} (load {res['load_s']:.1f} s, "
                          f"wall {time.perf_counter() - t0:.0f} s)", flush=True)

        print(f"\nmatmul peak (best of {len(probes)} probe(s), {probe['matmul_n']}^2 torch.mm): "
              + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
        report = {"settings": {**vars(args), "eval_rows": eval_rows, "configs": plan,
                               "models": models, "device": device},
                  "probe": probe, "peaks": peaks, "results": results, "summary": {},
                  "checks": {}, "wall_s": None}
        for model in models:
            summary = _summarize([r for r in results if r["model"] == model], peaks)
            report["summary"][model] = summary
            _print_table(model, summary, plan)
            checks = _checks(model, summary, plan)
            report["checks"][model] = [{"check": c, "passed": p, "detail": d} for c, p, d in checks]
            print()
            for c, p, d in checks:
                word = "PASS" if p else ("FAIL" if p is False else "n/a ")
                print(f"{word} {model} {c}: {d}")
        report["wall_s"] = time.perf_counter() - t_all
        print(f"\nwall time {report['wall_s'] / 60:.1f} min")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
            print(f"wrote {args.json}")
    # Targets not met are reported above, not turned into an exit code; a run that failed is.
    return 2 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
