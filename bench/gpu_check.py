"""One-GPU check: LoRA SFT of a random Llama-2-7B-shaped model, against HF Trainer + PEFT.

Runs in one go on one GPU with only torch, transformers, peft and accelerate installed (plus
bitsandbytes for the QLoRA part, when a copy was carried; it is skipped otherwise) and no
network. ``bash bench/gpu_check.sh`` runs it; ``--shape tiny --device cpu`` runs the same
steps on a small model on the CPU (how the script itself is tested before a GPU is lent).

What it measures, each part on its own so one failure does not hide the rest:

1. ``llamatune``: :class:`~llamatune.recipes.sft.SFTRecipe`, LoRA r=16 on every linear layer
   of a bf16 base, batch 2 x 2048 tokens (every token supervised but the short prompt):
   tokens/s over the steps after the first two, and peak GPU memory
   (``torch.cuda.max_memory_allocated``) against ``llamatune estimate`` for the same job.
2. ``hf``: transformers ``Trainer`` + PEFT on the same model, adapter, token ids, batch and
   optimizer (AdamW, bf16 weights, fp32 adapters): tokens/s and peak memory the same way.
3. ``qlora``: llamatune with a 4-bit base, if bitsandbytes imports: tokens/s and peak memory
   against the QLoRA estimate.
4. ``fsdp``: a one-process ``accelerate launch`` of ``llamatune sft`` with the packaged
   ``fsdp2`` config on a small model (FSDP2 over NCCL): exit code and the loss rows.

Prints one JSON object (also written to ``--out/gpu_check.json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# The checkout's datasets/ folder (data files, no __init__.py) passes for the `datasets` package
# as a namespace package where that is not installed; transformers then counts `datasets` as
# available and Trainer fails on it ("module 'datasets' has no attribute 'Dataset'").
import importlib.util  # noqa: E402

_ds = importlib.util.find_spec("datasets")
if _ds is not None and _ds.origin is None:
    sys.modules["datasets"] = None  # find_spec now answers None: not installed

SHAPES = {
    # Llama-2-7B: 32 layers, hidden 4096, 32 heads (no GQA), MLP 11008, 32k vocabulary.
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=32000),
}


def build_model(folder: Path, shape: str, device: str) -> dict:
    """A seeded random Llama of ``shape`` in bf16 with a word-level tokenizer, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **SHAPES[shape])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 where it runs: no fp32 copy
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)  # transformers' own init (normal, std 0.02)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(str(folder), safe_serialization=True)
    del model
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(cfg.vocab_size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return cfg.to_dict()


def write_data(path: Path, rows: int, words: int, vocab: int) -> Path:
    """Alpaca rows whose answers are longer than ``max_length`` words (one token each)."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            out = " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(words))
            f.write(json.dumps({"instruction": "w1 w2 w3", "input": "", "output": out}) + "\n")
    return path


def _peak_reset(device):
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def run_llamatune(model_dir: Path, data: Path, out: Path, args, quant: str = "none") -> dict:
    """LoRA (or QLoRA) SFT through llamatune's own stage; tokens/s after two warm-up steps."""
    from llamatune.config import load_config
    from llamatune.params import estimate_memory
    from llamatune.recipes.sft import SFTRecipe

    recipe = out / f"llamatune_{quant}.yaml"
    import yaml

    cfg = {"stage": "sft", "output_dir": str(out / f"run_{quant}"), "overwrite": True,
           "model": {"path": str(model_dir), "dtype": "bfloat16", "quantization": quant,
                     "device": args.device, "gradient_checkpointing": args.checkpointing},
           "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
           "data": {"path": str(data), "format": "alpaca", "template": "alpaca", "eval_split": 0},
           "train": {"max_steps": args.steps, "batch_size": 2, "max_length": args.seq,
                     "lr": 2e-4, "group_by_length": False, "progress": False, "log_every": 1}}
    recipe.write_text(yaml.safe_dump(cfg))
    _peak_reset(args.device)
    r = SFTRecipe(load_config(str(recipe)), str(recipe))
    t0 = time.perf_counter()
    r.setup()
    setup_s = time.perf_counter() - t0
    r.train()
    peak = _peak(args.device)
    rows = [json.loads(x) for x in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text()
            .splitlines()]
    steady = [x["tokens_per_s"] for x in rows if "tokens_per_s" in x][2:]
    config = json.loads((model_dir / "config.json").read_text())
    est = estimate_memory(config, "qlora" if quant == "4bit" else "lora", 2, args.seq,
                          args.checkpointing, lora_r=16, device="cuda")
    del r
    _peak_reset(args.device)
    return {"tokens_per_s": sum(steady) / max(len(steady), 1), "setup_s": round(setup_s, 1),
            "peak_bytes": peak, "estimate_bytes": est.total,
            "peak_over_estimate": round(peak / est.total, 3) if peak else None,
            "losses": [x["loss"] for x in rows if "loss" in x]}


def run_hf(model_dir: Path, args) -> dict:
    """transformers Trainer + PEFT LoRA on the same shape of job (2 x seq tokens a step)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    _peak_reset(args.device)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).to(
        args.device)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows = []
    for _ in range(2 * args.steps):
        ids = torch.randint(4, vocab, (args.seq,), generator=g)
        labels = ids.clone()
        labels[:8] = -100  # the prompt, as llamatune's rows have one
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    targs = TrainingArguments(output_dir=str(args.work / "hf"), per_device_train_batch_size=2,
                              max_steps=args.steps, learning_rate=2e-4, logging_steps=1,
                              report_to=[], save_strategy="no", bf16=args.device == "cuda",
                              use_cpu=args.device == "cpu", dataloader_num_workers=0,
                              remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Clock()])
    trainer.train()
    if args.device == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter())
    peak = _peak(args.device)
    steps = [b - a for a, b in zip(times, times[1:])][2:]
    del trainer, model
    _peak_reset(args.device)
    return {"tokens_per_s": 2 * args.seq / (sum(steps) / max(len(steps), 1)),
            "peak_bytes": peak}


def run_fsdp(model_dir: Path, data: Path, args) -> dict:
    """One process under the packaged fsdp2 config, a few steps: exit code and last words."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "llamatune" / "launch" / "fsdp2.yaml"), "--num_processes", "1",
           "-m", "llamatune", "sft", str(REPO / "recipes" / "alpaca.yaml"),
           f"model.path={model_dir}", f"data.path={data}", "data.eval_split=0",
           "train.max_steps=3", "train.batch_size=1", "train.max_length=256",
           f"output_dir={args.work / 'run_fsdp'}", "overwrite=true", "train.progress=false"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    text = p.stdout + p.stderr
    said = [ln for ln in text.splitlines() if "llamatune sft: error" in ln or "Error" in ln]
    metrics = args.work / "run_fsdp" / "metrics.jsonl"
    rows = ([json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file()
            else [])
    return {"rc": p.returncode, "said": said[:3], "losses": [r["loss"] for r in rows if "loss" in r],
            "fsdp2_line": [ln for ln in text.splitlines() if "(fsdp2)" in ln][:1],
            "tail": text[-400:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--parts", default="llamatune,hf,qlora,fsdp")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamatune_gpu_check"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    res: dict = {"shape": args.shape, "device": args.device, "seq": args.seq, "batch": 2,
                 "steps": args.steps, "gradient_checkpointing": args.checkpointing,
                 "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    t0 = time.perf_counter()
    model_dir = args.work / f"llama_{args.shape}"
    config = build_model(model_dir, args.shape, args.device)
    res["build_s"] = round(time.perf_counter() - t0, 1)
    data = write_data(args.work / "data.jsonl", 2 * args.steps + 4, args.seq + 64,
                      config["vocab_size"])
    parts = args.parts.split(",")
    for name, fn in (("llamatune", lambda: run_llamatune(model_dir, data, args.work, args)),
                     ("hf", lambda: run_hf(model_dir, args)),
                     ("qlora", lambda: run_llamatune(model_dir, data, args.work, args, "4bit")),
                     ("fsdp", lambda: run_fsdp(model_dir, data, args))):
        if name not in parts:
            continue
        if name == "qlora":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as e:
                res[name] = {"skipped": f"bitsandbytes not importable ({e})"}
                continue
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - one part failing must not hide the others
            res[name] = {"error": f"{type(e).__name__}: {e}"[:800]}
        res[name]["wall_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps({name: res[name]}), flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(res, indent=1))  # kept if cut short
    if "tokens_per_s" in res.get("llamatune", {}) and "tokens_per_s" in res.get("hf", {}):
        res["speedup_vs_hf"] = round(res["llamatune"]["tokens_per_s"] / res["hf"]["tokens_per_s"], 3)
        if res["llamatune"]["peak_bytes"] and res["hf"]["peak_bytes"]:
            res["memory_vs_hf"] = round(res["llamatune"]["peak_bytes"] / res["hf"]["peak_bytes"], 3)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
