"""Golden rows: short seeded fp32 runs of every stage on the tiny Llama give the very
``metrics.jsonl`` rows recorded in ``tests/golden/rows.json``.

A refactor of the training core must not change what a run computes: on the CPU kind the
rows were recorded on they must be equal bit for bit; on another CPU kind (its fp32 kernels
round differently) within a relative 1e-3. Timings are left out. To record again after a
change that is *meant* to change the numbers, run
``LLAMATUNE_GOLDEN_RECORD=1 pytest tests/test_golden.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import pytest
import yaml
from conftest import WORDS, write_jsonl

from llamatune.cli import main as cli

GOLDEN = Path(__file__).parent / "golden" / "rows.json"
# Figures that measure time or the machine, not the computation.
_CLOCK = ("tokens_per_s", "tok_s", "rollout_s", "update_s", "wall_s", "elapsed_s", "eta_s",
          "step_s", "peak_rss_mb", "peak_mem_mb", "seconds")


def machine() -> str:
    """The CPU kind, as far as it changes fp32 results: model name and vector extensions."""
    name, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name":
                name = val.strip()
            elif key.strip() == "flags":
                flags = set(val.split())
    except OSError:
        pass
    import torch

    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} [{' '.join(have)}] torch {torch.__version__}"


def _timeless(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in _CLOCK and not k.endswith("_s")}


def _stage_runs(tmp_path: Path, model_dir: Path, alpaca: Path) -> dict[str, list[str]]:
    """Each golden case: the CLI arguments that run it (recipes written here)."""
    pairs = [{"prompt": f"tell me about {w}", "chosen": f"the {w} is nice thanks",
              "rejected": f"the {w} is bad"} for w in WORDS[:16]]
    pref = write_jsonl(tmp_path / "pref.jsonl", pairs)
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"tell me about {w}"} for w in WORDS[:24]])
    reward = tmp_path / "toy_reward.py"
    reward.write_text("def count_t(prompts, responses, **fields):\n"
                      "    return [r.count('t') / 10 for r in responses]\n")
    common = {"model": {"path": str(model_dir), "dtype": "float32"},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "train": {"batch_size": 4, "max_length": 128, "lr": 1e-2, "progress": False,
                        "seed": 7, "eval_every": 2, "max_steps": 4}}
    cases = {
        "sft": {"stage": "sft",
                "data": {"path": str(alpaca), "format": "alpaca", "template": "alpaca",
                         "eval_split": 4},
                "lora": {"dropout": 0.1}, "train": {"grad_accum": 2}},
        "rm": {"stage": "rm",
               "data": {"path": str(pref), "format": "preference", "template": "chatml",
                        "eval_split": 4}},
        "dpo": {"stage": "dpo",
                "data": {"path": str(pref), "format": "preference", "template": "chatml",
                         "eval_split": 4}},
        "ppo_gae": {"stage": "ppo",
                    "data": {"path": str(prompts), "format": "prompts", "template": "chatml",
                             "eval_split": 4},
                    "ppo": {"advantage": "gae", "reward_fn": f"{reward}:count_t",
                            "rollout_batch": 4, "k": 1, "epochs": 2, "max_new_tokens": 6,
                            "sample_every": 0}},
        "ppo_grpo": {"stage": "ppo",
                     "data": {"path": str(prompts), "format": "prompts", "template": "chatml",
                              "eval_split": 4},
                     "ppo": {"advantage": "grpo", "reward_fn": f"{reward}:count_t",
                             "rollout_batch": 2, "k": 4, "kl_coef": 0.0, "max_kl": 50.0,
                             "max_new_tokens": 6, "sample_every": 0},
                     "train": {"batch_size": 4, "grad_accum": 2}},
        "pipeline": {"stage": "pipeline", "data": {"template": "chatml"},
                     "train": {"max_steps": 2},
                     "stages": {
                         "sft": {"data": {"path": str(alpaca), "format": "alpaca",
                                          "eval_split": 4}},
                         "rm": {"data": {"path": str(pref), "format": "preference",
                                         "eval_split": 4}},
                         "ppo": {"data": {"path": str(prompts), "format": "prompts",
                                          "eval_split": 4},
                                 "ppo": {"rollout_batch": 4, "max_new_tokens": 5,
                                         "sample_every": 0}}},
                     "merge": {"samples": 2}},
    }
    out = {}
    for name, extra in cases.items():
        cfg = json.loads(json.dumps(common))
        for key, val in extra.items():
            if isinstance(val, dict):
                cfg.setdefault(key, {}).update(val)
            else:
                cfg[key] = val
        cfg["output_dir"] = str(tmp_path / name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out[name] = [cfg["stage"], str(path)]
    return out


def _rows_of(folder: Path) -> list[dict]:
    return [_timeless(json.loads(x)) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _collect(tmp_path: Path, name: str) -> dict[str, list[dict]]:
    out = tmp_path / name
    if (out / "metrics.jsonl").exists():
        return {name: _rows_of(out)}
    return {f"{name}/{d.name}": _rows_of(d) for d in sorted(out.iterdir())
            if (d / "metrics.jsonl").exists()}


def _close(a, b, rel: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=rel, abs_tol=rel * 1e-3)
    return a == b


def test_every_stage_gives_the_golden_rows(tmp_path, tiny_model_dir, alpaca_file):
    got = {}
    for name, args in _stage_runs(tmp_path, tiny_model_dir, alpaca_file).items():
        assert cli(args) == 0, name
        got.update(_collect(tmp_path, name))
    here = machine()
    if os.environ.get("LLAMATUNE_GOLDEN_RECORD") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"machine": here, "rows": got}, indent=1) + "\n")
        pytest.skip(f"recorded {GOLDEN} on {here}")
    want = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(want["rows"])
    for name in want["rows"]:
        assert [sorted(r) for r in got[name]] == [sorted(r) for r in want["rows"][name]], name
        if want["machine"] == here:
            assert got[name] == want["rows"][name], name
        else:  # another CPU kind: its fp32 kernels round differently
            assert _close(got[name], want["rows"][name], 1e-3), (name, want["machine"], here)
