"""Two processes on the CPU (gloo), launched by accelerate: the same run as one process.

At the same global batch (``train.batch_size`` x processes), N processes must write the loss
rows one process writes (fp32), one copy of every file, and resume exactly after a kill.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import WORDS, make_recipe, metrics_rows, write_jsonl
from test_reward import _cfg_sections, _pairs

from llamatune import dist, launcher
from llamatune.dist import _private, processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path):
    env = dict(os.environ, LLAMATUNE_CACHE=str(tmp_path / "cache"), LLAMATUNE_CPU_BF16="0",
               OMP_NUM_THREADS="1", MASTER_PORT=str(_port()), HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


def _launch_cmd(n, argv, config=None):
    """``argv`` alone (n=1), or under ``accelerate launch`` (DDP, or a packaged ``config``)."""
    if n == 1 and config is None:
        return [sys.executable, "-m", "llamatune", *argv]
    if config is not None:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(launcher.launch_config(config)), "--num_processes", str(n), "-m", "llamatune",
                *argv]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "llamatune", *argv]


def _run(tmp_path, n, argv, config=None):
    proc = subprocess.run(_launch_cmd(n, argv, config), cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _sft_data(tmp_path, n=33):
    """33 rows: with a global batch of 8 an epoch ends on a batch of 1 (one process idles)."""
    rng = random.Random(5)
    rows = [{"instruction": f"tell me about {rng.choice(WORDS)}", "input": "",
             "output": f"sure {rng.choice(WORDS)} is {rng.choice(WORDS)} " * rng.randint(1, 4)}
            for _ in range(n)]
    return write_jsonl(tmp_path / "alpaca.jsonl", rows)


def _same_rows(one, two, keys):
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)


def _one_copy_of_everything(run):
    assert not list(run.glob(".*tmp")), "no temporary folder left behind"
    rows = metrics_rows(run)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)), "one metrics row per step"
    assert (run / "adapter_model.safetensors").is_file()


def _stop_after(run, step):
    """Make a finished run look stopped after ``step``: no final files, rows up to ``step``."""
    import shutil

    for f in run.iterdir():
        if f.name.startswith("adapter_") or f.name.endswith("_head.safetensors"):
            f.unlink()
    rows = [r for r in metrics_rows(run) if r["step"] <= step]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.rmtree(run / "plots", ignore_errors=True)


def _one_process(tmp_path, model_dir, data, sections, argv):
    """The run directory of one process running ``argv`` on this recipe, run once per session
    for identical recipes (several tests compare their launches with the same reference)."""
    import hashlib

    key = json.dumps([str(model_dir), hashlib.sha256(Path(data).read_bytes()).hexdigest(),
                      sections, argv], sort_keys=True, default=str)
    if key not in _ONE:
        recipe = make_recipe(tmp_path / "one", model_dir, data, **sections)
        _run(tmp_path, 1, [argv[0], str(recipe), *argv[1:]])
        _ONE[key] = tmp_path / "one" / "run"
    return _ONE[key]


_ONE: dict = {}


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _zero3_sharding_everything(tmp_path):
    """The zero3 config, but with every parameter partitioned (tiny ones too), as a file."""
    import yaml

    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "train_batch_size": "auto"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    acc = yaml.safe_load(launcher.launch_config("zero3").read_text())
    acc["deepspeed_config"] = {"deepspeed_config_file": str(tmp_path / "ds.json"),
                               "zero3_init_flag": False}
    acc.pop("mixed_precision", None)  # accelerate refuses it beside a DeepSpeed file
    path = tmp_path / "zero3_all.yaml"
    path.write_text(yaml.safe_dump(acc))
    return str(path)


def _config(tmp_path, name):
    """A packaged config by name; ``zero3_all``: ZeRO-3 partitioning every weight (a file)."""
    if name is not None and name.startswith("zero"):
        pytest.importorskip("deepspeed")
        if name == "zero3_all":
            return _zero3_sharding_everything(tmp_path)
    return name


def test_shard_splits_a_global_batch_as_one_process_sees_it():
    items = list(range(7))
    parts = [dist.shard(items, r, 2) for r in range(2)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6]]
    assert [dist.shard([9], r, 2) for r in range(2)] == [[9], []]
    assert dist.shard(items) == items  # one process: everything


def test_each_process_trains_on_its_own_slice_of_the_global_batches(monkeypatch):
    from llamatune import training
    from llamatune.config import TrainConfig

    lengths = [random.Random(i).randint(3, 40) for i in range(33)]
    one = training.batch_groups(lengths, TrainConfig(batch_size=8), epoch=1)
    parts = []
    for rank in range(2):
        monkeypatch.setattr(processes, "_WORLD", dist.World(rank=rank, size=2))
        parts.append(training.batch_groups(lengths, TrainConfig(batch_size=4), epoch=1))
    assert len(parts[0]) == len(parts[1]) == len(one) == 5
    for g, a, b in zip(one, *parts):
        if b.dummy:  # the short last batch: all on rank 0, rank 1 idles on a weightless copy
            assert list(a) == g and len(b) == 1 and not a.dummy
        else:
            assert list(a) + list(b) == g and set(a).isdisjoint(b)
    assert sum(p.dummy for p in parts[1]) == 1
    # Evaluation is not sharded: every process scores all of it.
    assert training.batch_groups(lengths, TrainConfig(batch_size=4), 0, shuffle=False) == \
        [list(range(i, min(i + 4, 33))) for i in range(0, 33, 4)]


@pytest.mark.parametrize("batch,accum", [(8, 1), (4, 2)])
def test_sft_two_processes_give_the_loss_rows_of_one(batch, accum, tmp_path, tiny_model_dir):
    """2 processes at train.batch_size=B/2 write the rows of 1 process at B (the must-show)."""
    data = _sft_data(tmp_path)
    common = dict(model={"dtype": "float32"}, data={"eval_split": 0.1},
                  train={"max_steps": 6, "grad_accum": accum, "lr": 1e-2, "eval_every": 3})
    one = make_recipe(tmp_path / "one", tiny_model_dir, data, **common)
    two = make_recipe(tmp_path / "two", tiny_model_dir, data, **common)
    _run(tmp_path, 1, ["sft", str(one), f"train.batch_size={batch}"])
    proc = _run(tmp_path, 2, ["sft", str(two), f"train.batch_size={batch // 2}"])
    assert (f"2 processes (ddp): global batch {batch // 2} x {accum} accumulation x 2 processes"
            in proc.stdout)
    assert proc.stdout.count("data: ") == 1, "only the main process prints"
    a, b = metrics_rows(tmp_path / "one" / "run"), metrics_rows(tmp_path / "two" / "run")
    assert len([r for r in b if "loss" in r]) == 6
    _same_rows(a, b, ["loss", "grad_norm", "eval_loss"])
    _one_copy_of_everything(tmp_path / "two" / "run")


@pytest.mark.parametrize("stage,config", [("dpo", "ddp"), ("rm", "fsdp2"), ("dpo", "zero2"),
                                          ("rm", "zero3_all")])
def test_preference_stages_two_processes_give_the_loss_rows_of_one(stage, config, tmp_path,
                                                                   tiny_model_dir):
    """Pair rows, DPO's reference pass (adapter off) and a score head in the root unit
    (FSDP2) or gathered by ZeRO-3."""
    if config.startswith("zero"):
        config = _config(tmp_path, config)
    data = write_jsonl(tmp_path / "pref.jsonl", _pairs())
    sections = _cfg_sections(stage=stage, model={"dtype": "float32"}, lora={"dropout": 0.0},
                             train={"max_steps": 5, "lr": 1e-2, "eval_every": 5})
    ref = _one_process(tmp_path, tiny_model_dir, data, sections, [stage, "train.batch_size=6"])
    two = make_recipe(tmp_path / "two", tiny_model_dir, data, **sections)
    # Through llamatune's own launcher (a packaged config, or a file).
    _run(tmp_path, 1, [stage, str(two), "--accelerate_config", config, "--num_processes", "2",
                       "train.batch_size=3"])  # overrides may follow the options
    a, b = metrics_rows(ref), metrics_rows(tmp_path / "two" / "run")
    assert len([r for r in b if "loss" in r]) == 5
    keys = {"rm": ["accuracy", "eval_accuracy"],
            "dpo": ["reward_accuracy", "reward_margin", "eval_reward_margin"]}[stage]
    _same_rows(a, b, ["loss", "grad_norm", "eval_loss", *keys])
    _one_copy_of_everything(tmp_path / "two" / "run")
    if stage == "rm":
        want = _tensors(ref / "score_head.safetensors")
        got = _tensors(tmp_path / "two" / "run" / "score_head.safetensors")
        assert all(got[k].sub(want[k]).abs().max() < 1e-4 for k in want)


def test_ppo_runs_under_two_processes(tmp_path, tiny_model_dir):
    from test_ppo import _prompts, _reward_file

    reward = f"{_reward_file(tmp_path)}:cat_count"
    recipe = make_recipe(tmp_path, tiny_model_dir, _prompts(tmp_path), stage="ppo",
                         model={"dtype": "float32"},
                         data={"format": "prompts", "template": "chatml", "eval_split": 4},
                         ppo={"reward_fn": reward, "rollout_batch": 2, "k": 2,
                              "max_new_tokens": 6, "sample_every": 1, "advantage": "gae"},
                         train={"max_steps": 3, "batch_size": 2, "eval_every": 0,
                                "save_every": 2})
    proc = _run(tmp_path, 2, ["ppo", str(recipe)])
    assert "global batch 2 prompts x 2 processes" in proc.stdout
    run = tmp_path / "run"
    rows = [r for r in metrics_rows(run) if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    _one_copy_of_everything(run)
    assert (run / "value_head.safetensors").is_file()
    samples = (run / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 4, "four samples an iteration, written once"


def test_kill_under_two_processes_then_resume_continues_exactly(tmp_path, tiny_model_dir):
    """DDP; the sharded schemes resume from a stopped run (PPO, below: cheaper than a kill)."""
    data = _sft_data(tmp_path)
    common = dict(model={"dtype": "float32"}, data={"eval_split": 0},
                  train={"max_steps": 24, "batch_size": 2, "save_every": 1,
                         "keep_checkpoints": 2, "lr": 1e-2})
    straight = make_recipe(tmp_path / "straight", tiny_model_dir, data, **common)
    _run(tmp_path, 2, ["sft", str(straight)])
    want = [r for r in metrics_rows(tmp_path / "straight" / "run") if "loss" in r]

    recipe = make_recipe(tmp_path / "killed", tiny_model_dir, data, **common)
    run = tmp_path / "killed" / "run"
    proc = subprocess.Popen(_launch_cmd(2, ["sft", str(recipe)]), cwd=REPO, env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"loss"') >= 8:
            break
        time.sleep(0.002)
    # The launcher and every process it started (torch's elastic agent puts its workers in
    # sessions of their own, so the process group is not enough).
    import psutil

    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in reversed(family):
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    err = proc.communicate()[1].decode()
    assert not (run / "adapter_model.safetensors").exists(), f"the run ended first: {err[-2000:]}"
    _run(tmp_path, 2, ["sft", str(recipe), "resume=true"])
    got = [r for r in metrics_rows(run) if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, 25))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-6)
    _one_copy_of_everything(run)
    assert not list(run.glob(".checkpoint-*")), "a torn checkpoint is cleaned up"


def test_ls_accelerate_lists_the_packaged_configs(capsys):
    from llamatune.cli import main as cli

    assert cli(["ls", "--accelerate"]) == 0
    out = capsys.readouterr().out
    for name in ("single", "ddp", "fsdp2", "zero2", "zero3"):
        assert name in out


def test_unknown_accelerate_config_is_a_one_paragraph_error(tmp_path, tiny_model_dir, capsys):
    from llamatune.cli import main as cli

    recipe = make_recipe(tmp_path, tiny_model_dir, _sft_data(tmp_path))
    assert cli(["sft", str(recipe), "--accelerate_config", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--accelerate_config nope" in err and "ddp" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_each_launched_process_takes_its_own_gpu(monkeypatch):
    import torch

    from llamatune.model import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"  # alone: the current GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == "cuda:1" and resolve_device("cuda") == "cuda:1"
    assert resolve_device("cuda:0") == "cuda:0"  # an explicit GPU is kept


@pytest.mark.parametrize("config", [None, "fsdp2", "zero2"])
def test_qlora_under_two_processes_gives_the_loss_rows_of_one(config, tmp_path,
                                                              tiny_wide_model_dir):
    """A 4-bit (nf4) base, stored in the compute dtype, under DDP, FSDP2 and ZeRO-2:
    bitsandbytes' CPU kernels, the same rows as one process."""
    pytest.importorskip("bitsandbytes")
    config = _config(tmp_path, config)
    data = _sft_data(tmp_path)
    common = dict(model={"dtype": "float32", "quantization": "4bit"}, data={"eval_split": 0},
                  train={"max_steps": 3, "lr": 1e-2, "group_by_length": False})
    ref = _one_process(tmp_path, tiny_wide_model_dir, data, common, ["sft", "train.batch_size=4"])
    two = make_recipe(tmp_path / "two", tiny_wide_model_dir, data, **common)
    _run(tmp_path, 2, ["sft", str(two), "train.batch_size=2"], config)
    a, b = metrics_rows(ref), metrics_rows(tmp_path / "two" / "run")
    assert len(b) == 3
    _same_rows(a, b, ["loss", "grad_norm"])
    _one_copy_of_everything(tmp_path / "two" / "run")


@pytest.mark.parametrize("config", ["fsdp2", "zero2"])
def test_a_bf16_base_beside_float32_adapters_trains_as_one_process(config, tmp_path,
                                                                   tiny_model_dir):
    """The usual GPU job: frozen bf16 weights and float32 LoRA (FSDP2 asks only that the
    trainable ones in a unit share a dtype). Close to one process (bf16 GEMMs of other
    shapes), and the adapter saved in float32. (This caught a stale bf16 copy of the LoRA
    weights under FSDP2: the losses drifted 10% from one process's by the third step.)"""
    config = _config(tmp_path, config)
    data = _sft_data(tmp_path)
    common = dict(model={"dtype": "bfloat16"}, data={"eval_split": 0},
                  train={"max_steps": 3, "lr": 1e-2, "group_by_length": False})
    ref = _one_process(tmp_path, tiny_model_dir, data, common, ["sft", "train.batch_size=4"])
    two = make_recipe(tmp_path / "two", tiny_model_dir, data, **common)
    proc = _run(tmp_path, 2, ["sft", str(two), "train.batch_size=2"], config)
    assert "base bfloat16" in proc.stdout and "trainable float32" in proc.stdout
    a, b = metrics_rows(ref), metrics_rows(tmp_path / "two" / "run")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=2e-2)
    adapter = _tensors(tmp_path / "two" / "run" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {__import__("torch").float32}


@pytest.mark.parametrize("env,words", [
    ({"FSDP_VERSION": "1"}, "fsdp_version 1"),
    ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
    ({"FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"},
     "train.gradient_checkpointing"),
    ({"FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "SIZE_BASED_WRAP"),
])
def test_fsdp_settings_llamatune_does_not_run_are_refused(env, words):
    from llamatune.errors import UserError

    with pytest.raises(UserError, match=words):
        processes._fsdp_settings(env)


def test_fsdp_settings_from_the_packaged_config():
    env = {"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
           "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
           "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"}
    assert processes._fsdp_settings(env) == dist.Fsdp(False, ("LlamaDecoderLayer",))
    assert processes._fsdp_settings({"FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}).layers == ()
    assert processes._fsdp_settings({"FSDP_VERSION": "2"}).layers is None


def test_private_internals_are_refused_outside_the_tested_versions(monkeypatch):
    """The fence: FSDP2 and ZeRO call torch and DeepSpeed internals only at the versions
    ``_private.TESTED`` names; outside them the scheme is refused, naming both versions,
    when the processes are set up (before any model loads). One process and DDP pass."""
    from llamatune.errors import UserError

    monkeypatch.setattr(_private, "_installed", lambda pkg: "99.0")
    for scheme in ("single", "ddp"):
        _private.check(scheme, "here")
    with pytest.raises(UserError, match=r"here: .*fsdp2.*torch >=2\.\d+,<2\.\d+.*torch 99\.0"):
        _private.check("fsdp2", "here")
    with pytest.raises(UserError, match=r"zero3.*deepspeed >=0\.\d+,<0\.\d+.*deepspeed 99\.0"):
        _private.check("zero3", "here")
    with pytest.raises(UserError, match="torch 99.0"):
        _private.fsdp_fix_root(object())  # refused before it touches the object
    monkeypatch.setattr(processes, "_WORLD", None)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match="the accelerate config's fsdp_config: .*torch 99.0"):
        dist.world()
    assert processes.current() is None


def test_whole_copies_are_the_worlds_and_whole_sets_up_no_world(monkeypatch):
    import torch

    monkeypatch.setattr(processes, "_WORLD", None)
    p = torch.nn.Parameter(torch.ones(2))
    assert dist.whole(p) is p and processes.current() is None
    monkeypatch.setattr(processes, "_WORLD", dist.World())
    with dist.whole_trainables(torch.nn.Linear(2, 2)):  # alone: nothing gathered
        assert processes.current().whole_copies == {}
    processes.current().whole_copies[id(p)] = "whole"
    assert dist.whole(p) == "whole"


@pytest.mark.parametrize("config", ["fsdp2", "zero2", "zero3_all"])
def test_sharded_two_processes_give_the_loss_rows_and_files_of_one(config, tmp_path,
                                                                   tiny_model_dir):
    """FSDP2, ZeRO-2 and ZeRO-3 (every weight partitioned): accumulation, clipping, eval;
    the same rows, and the same whole adapter and checkpoint moments, as one process."""
    config = _config(tmp_path, config)
    data = _sft_data(tmp_path)
    common = dict(model={"dtype": "float32"}, data={"eval_split": 0.1},
                  train={"max_steps": 6, "grad_accum": 2, "lr": 1e-2, "eval_every": 3,
                         "save_every": 3, "max_grad_norm": 0.05})  # clipping bites
    ref = _one_process(tmp_path, tiny_model_dir, data, common, ["sft", "train.batch_size=4"])
    two = make_recipe(tmp_path / "two", tiny_model_dir, data, **common)
    proc = _run(tmp_path, 1, ["sft", str(two), "--accelerate_config", config,
                              "--num_processes", "2", "train.batch_size=2"])
    scheme = "zero3" if config.endswith(".yaml") else config
    assert f"2 processes ({scheme}): global batch 2 x 2 accumulation x 2 processes" in proc.stdout
    a, b = metrics_rows(ref), metrics_rows(tmp_path / "two" / "run")
    assert len([r for r in b if "loss" in r]) == 6
    assert all(r["grad_norm"] > 0.05 for r in a if "grad_norm" in r), "the norm is clipped"
    _same_rows(a, b, ["loss", "grad_norm", "eval_loss"])
    _one_copy_of_everything(tmp_path / "two" / "run")
    for name in ("adapter_model.safetensors", "checkpoint-3/adapter_model.safetensors",
                 "checkpoint-3/optimizer.safetensors"):
        want = _tensors(ref / name)
        got = _tensors(tmp_path / "two" / "run" / name)
        assert sorted(want) == sorted(got), name
        for k in want:
            assert got[k].shape == want[k].shape, (name, k)
            assert got[k].float().sub(want[k].float()).abs().max() <= 1e-4 * (
                1 + want[k].float().abs().max()), (name, k)


@pytest.mark.parametrize("config", ["fsdp2", "zero2", "zero3_all"])
def test_ppo_under_sharded_schemes(config, tmp_path, tiny_model_dir):
    """GAE with a value head, two PPO epochs, accumulation windows cut by the rollout's end,
    a checkpoint; rollouts of different lengths per process: FSDP2 decodes from whole
    weights, ZeRO-3 in step on every process (its layers gather inside their forward)."""
    from test_ppo import _prompts, _reward_file

    config = _config(tmp_path, config)
    reward = f"{_reward_file(tmp_path)}:cat_count"
    recipe = make_recipe(tmp_path, tiny_model_dir, _prompts(tmp_path), stage="ppo",
                         model={"dtype": "float32"},
                         data={"format": "prompts", "template": "chatml", "eval_split": 4},
                         ppo={"reward_fn": reward, "rollout_batch": 2, "k": 2,
                              "max_new_tokens": 6, "advantage": "gae", "epochs": 2},
                         train={"max_steps": 2, "batch_size": 1, "grad_accum": 3,
                                "eval_every": 2, "save_every": 1})
    proc = _run(tmp_path, 2, ["ppo", str(recipe)], config)
    scheme = "zero3" if config.endswith(".yaml") else config
    assert f"2 processes ({scheme})" in proc.stdout
    run = tmp_path / "run"
    want = metrics_rows(run)
    assert [r["step"] for r in want if "reward_mean" in r] == [1, 2]
    assert [r["step"] for r in want if "eval_reward" in r] == [0, 2]
    _one_copy_of_everything(run)
    assert (run / "value_head.safetensors").is_file()
    # Stopped after iteration 1, resumed from checkpoint-1: the value head's bias puts a
    # second group (no weight decay) in the optimizer, whose moments go back too; the
    # final weights (after an update that used them) are those of the straight run.
    final = {f: _tensors(run / f) for f in ("adapter_model.safetensors", "value_head.safetensors")}
    _stop_after(run, 1)
    _run(tmp_path, 2, ["ppo", str(recipe), "resume=true"], config)
    got = metrics_rows(run)
    for key in ("reward_mean", "loss", "value_loss", "grad_norm", "eval_reward"):
        assert [r.get(key) for r in got] == pytest.approx([r.get(key) for r in want],
                                                          abs=1e-5), key
    for f, tensors in final.items():
        again = _tensors(run / f)
        assert all(again[k].sub(t).abs().max() < 1e-6 for k, t in tensors.items()), f


@pytest.mark.parametrize("env,words", [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "zero_stage 1"),
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
      "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "offload_optimizer_device cpu"),
])
def test_deepspeed_settings_llamatune_does_not_run_are_refused(env, words):
    from llamatune.errors import UserError

    pytest.importorskip("deepspeed")
    with pytest.raises(UserError, match=words):
        processes._zero_stage(env)


def test_deepspeed_stage_from_a_json_config_file(tmp_path):
    from llamatune.errors import UserError

    pytest.importorskip("deepspeed")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert processes._zero_stage({"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}) == 3
    path.write_text(json.dumps({"zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(UserError, match=f"{path}: offload_optimizer_device cpu"):
        processes._zero_stage({"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)})


@pytest.mark.parametrize("scheme,quant,words", [
    ("zero3", "4bit", "model.quantization: a 4bit base cannot run under DeepSpeed ZeRO-3"),
    ("fsdp2", "8bit", "model.quantization: an 8bit base is not sharded by FSDP2"),
])
def test_a_quantized_base_a_scheme_cannot_shard_is_refused_before_loading(
        scheme, quant, words, tmp_path, tiny_model_dir, monkeypatch, capsys):
    from llamatune.cli import main as cli

    recipe = make_recipe(tmp_path, tiny_model_dir, _sft_data(tmp_path),
                         model={"quantization": quant})
    world = dist.World(zero=3) if scheme == "zero3" else dist.World(fsdp=dist.Fsdp())
    monkeypatch.setattr(processes, "_WORLD", world)
    assert cli(["sft", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_deepspeed_config_without_deepspeed_is_refused_before_launching(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    import importlib.util

    from llamatune.cli import main as cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    recipe = make_recipe(tmp_path, tiny_model_dir, _sft_data(tmp_path))
    assert cli(["sft", str(recipe), "--accelerate_config", "zero2"]) == 2
    err = capsys.readouterr().err
    assert "pip install deepspeed" in err and "zero2.yaml" in err and "Traceback" not in err
    (tmp_path / "bad.yaml").write_text("- a list\n")
    assert cli(["sft", str(recipe), "--accelerate_config", str(tmp_path / "bad.yaml")]) == 2
    assert "a YAML mapping" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
