"""Polite stops: SIGTERM (or SIGINT) at a random moment writes a checkpoint at the step the run
stopped at, the exit message names it and the command that resumes, and that command
continues to the loss rows of an uninterrupted run. A second signal exits at once; a signal
during setup or during the final save leaves nothing half-written.

The moments are random but land mid-run: each trial waits for a random number of loss rows
in ``metrics.jsonl`` and a random fraction of a step more (``LLAMATUNE_SIGNAL_SEED`` picks
other moments; the suite's are fixed, so a failure repeats).
"""

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import make_recipe, metrics_rows, write_jsonl

from llamatune import _stop
from llamatune.cli import main as cli

STEPS = 12
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = int(os.environ.get("LLAMATUNE_SIGNAL_SEED", 0))


def _loss_rows(run):
    rows = metrics_rows(run)
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _n_rows(*runs):
    n = 0
    for run in runs:
        m = run / "metrics.jsonl"
        n += m.read_text().count('"loss"') if m.exists() else 0
    return n


def _sft_recipe(root, model_dir, data, **train):
    return make_recipe(root, model_dir, data, model={"dtype": "float32"},
                       lora={"dropout": 0.1}, data={"eval_split": 0},
                       train={"max_steps": STEPS, "save_every": 0, **train})


PPO_STEPS = 8


def _ppo_recipe(root, model_dir):
    from test_ppo import _prompts, _reward_file

    root.mkdir(parents=True, exist_ok=True)
    return make_recipe(root, model_dir, _prompts(root), stage="ppo", model={"dtype": "float32"},
                       data={"format": "prompts", "template": "chatml", "eval_split": 0},
                       ppo={"reward_fn": f"{_reward_file(root)}:starts_with_t",
                            "rollout_batch": 4, "k": 2, "max_new_tokens": 6, "sample_every": 0},
                       train={"max_steps": PPO_STEPS, "save_every": 0})


def _signal_mid_run(cmds, runs, afters, rng, sig=signal.SIGTERM, env=None):
    """Start every command at once; signal each once ``after`` loss rows (summed over its
    ``runs``) are in, plus a random fraction of a step. Returns ``(exit code, stderr)`` each."""
    # (The threads as in this process: PPO's sampling is sensitive to the reduction order.)
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for c in cmds]
    waiting = dict(enumerate(procs))
    deadline = time.time() + 900
    while waiting and time.time() < deadline:
        for i, p in list(waiting.items()):
            if p.poll() is not None or _n_rows(*runs[i]) >= afters[i]:
                time.sleep(rng.uniform(0, 0.05))
                p.send_signal(sig)
                del waiting[i]
        time.sleep(0.005)
    out = []
    for p in procs:
        err = p.communicate(timeout=300)[1].decode()
        out.append((p.returncode, err))
    return out


def _checkpoint_named(err, run):
    """The checkpoint the exit message names: complete, at the last logged step, mid-run."""
    assert "Traceback" not in err.split("stopped by")[-1], err[-3000:]
    m = re.search(r"stopped by SIG\w+.* after step (\d+) of (\d+): wrote checkpoint (\S+)\. "
                  r"Continue with `([^`]+)`", err)
    assert m, err[-3000:]
    step, total, ckpt = int(m.group(1)), int(m.group(2)), m.group(3)
    assert ckpt == str(run / f"checkpoint-{step}")
    assert (run / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert [s for s, _ in _loss_rows(run)][-1] == step < total, "stopped at a step, mid-run"
    assert not (run / "adapter_model.safetensors").exists()
    assert not list(run.glob(".*tmp")), "nothing half-written"
    return step, m.group(4)


def _resume(command, want, run):
    """Run the resume command from the message (in this process) and compare every loss row."""
    argv = shlex.split(command)
    assert argv[0] == "llamatune" and argv[-1] == "resume=true", command
    assert cli(argv[1:]) == 0
    got = _loss_rows(run)
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [x for _, x in got] == pytest.approx([x for _, x in want], abs=1e-6)


_REF: dict = {}


def _reference(stage, root, make):
    """The loss rows of an uninterrupted run (one per stage and session)."""
    if stage not in _REF:
        assert cli([stage, str(make(root))]) == 0
        _REF[stage] = _loss_rows(root / "run")
        assert len(_REF[stage]) == (STEPS if stage == "sft" else PPO_STEPS)
    return _REF[stage]


def _maker(stage, model_dir, alpaca_file):
    if stage == "sft":
        return lambda root: _sft_recipe(root, model_dir, alpaca_file)
    return lambda root: _ppo_recipe(root, model_dir)


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_sigterm_at_random_moments_then_resume_gives_an_uninterrupted_run(
        stage, tmp_path, tiny_model_dir, alpaca_file):
    make = _maker(stage, tiny_model_dir, alpaca_file)
    want = _reference(stage, tmp_path / "straight", make)
    rng = random.Random(SEED * 100 + len(stage))
    # sft: two trials here, the third under two processes (below); ppo: three.
    trials, steps = (range(2), STEPS) if stage == "sft" else (range(3), PPO_STEPS)
    recipes, runs = [make(tmp_path / f"t{t}") for t in trials], [tmp_path / f"t{t}/run" for t in trials]
    results = _signal_mid_run([[sys.executable, "-m", "llamatune", stage, str(r)] for r in recipes],
                              [[r] for r in runs], [rng.randint(1, steps - 5) for _ in trials], rng)
    for run, (code, err) in zip(runs, results):
        assert code == 143, err[-3000:]
        _, command = _checkpoint_named(err, run)
        _resume(command, want, run)


def test_sigint_works_the_same(tmp_path, tiny_model_dir, alpaca_file):
    make = _maker("sft", tiny_model_dir, alpaca_file)
    want = _reference("sft", tmp_path / "straight", make)
    recipe, run = make(tmp_path / "int"), tmp_path / "int" / "run"
    rng = random.Random(SEED * 100 + 7)
    [(code, err)] = _signal_mid_run([[sys.executable, "-m", "llamatune", "sft", str(recipe)]],
                                    [[run]], [rng.randint(1, STEPS - 6)], rng, sig=signal.SIGINT)
    assert code == 130 and "stopped by SIGINT" in err, err[-3000:]
    _, command = _checkpoint_named(err, run)
    _resume(command, want, run)


def test_sigterm_under_two_processes_stops_every_process_at_one_step(tmp_path, tiny_model_dir):
    """The third sft trial: ``--accelerate_config ddp`` with two processes; the signal goes to
    llamatune's own process, which passes it on; both stop at one step, rank 0 writes."""
    import psutil
    from test_dist import _env, _sft_data

    data = _sft_data(tmp_path)
    one = _sft_recipe(tmp_path / "one", tiny_model_dir, data, batch_size=4)
    assert cli(["sft", str(one), "lora.dropout=0"]) == 0  # 1 x 4 = 2 x 2 (tests/test_dist.py)
    recipe = _sft_recipe(tmp_path / "two", tiny_model_dir, data, batch_size=2)
    run = tmp_path / "two" / "run"
    argv = ["sft", str(recipe), "lora.dropout=0", "--accelerate_config", "ddp",
            "--num_processes", "2"]
    rng = random.Random(SEED * 100 + 2)
    env = _env(tmp_path)
    [(code, err)] = _signal_mid_run([[sys.executable, "-m", "llamatune", *argv]], [[run]],
                                    [rng.randint(1, STEPS - 6)], rng, env=env)
    assert code == 143, err[-3000:]
    step, command = _checkpoint_named(err, run)
    assert "passed on to 2 process(es)" in err
    assert f"the newest checkpoint is {run / f'checkpoint-{step}'}." in err  # ours, after rank 0
    assert command.endswith("--accelerate_config ddp --num_processes 2 resume=true"), command
    assert not [p for p in psutil.process_iter(["cmdline"])
                if str(recipe) in " ".join(p.info["cmdline"] or [])], "no orphans"
    proc = subprocess.run(shlex.split(command.replace("llamatune", f"{sys.executable} -m "
                                                      "llamatune", 1)),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = _loss_rows(run), _loss_rows(tmp_path / "one" / "run")
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-4, abs=1e-6)


def _pipeline(root, model_dir, alpaca_file):
    rows = [{"prompt": f"tell me about {w}", "chosen": f"the {w} is nice thanks",
             "rejected": f"the {w} is bad"} for w in ("cat", "dog", "sun", "moon") * 4]
    root.mkdir(parents=True, exist_ok=True)
    pref = write_jsonl(root / "pref.jsonl", rows)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows])
    steps = {"max_steps": 4, "save_every": 0}
    recipe = {
        "stage": "pipeline", "output_dir": str(root / "out"),
        "model": {"path": str(model_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"template": "chatml", "eval_split": 0},
        "train": {"batch_size": 4, "max_length": 128, "lr": 1e-2, "progress": False},
        "stages": {
            "sft": {"data": {"path": str(alpaca_file), "format": "alpaca"}, "train": steps},
            "rm": {"data": {"path": str(pref), "format": "preference"}, "train": steps},
            "ppo": {"data": {"path": str(prompts), "format": "prompts"}, "train": steps,
                    "ppo": {"rollout_batch": 4, "max_new_tokens": 5, "sample_every": 0}},
        },
        "merge": False,
    }
    path = root / "pipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, root / "out"


def test_sigterm_to_a_pipeline_then_a_rerun_resumes_the_stage(tmp_path, tiny_model_dir,
                                                              alpaca_file):
    folders = ("sft", "reward", "ppo")
    path, out = _pipeline(tmp_path / "straight", tiny_model_dir, alpaca_file)
    assert cli(["pipeline", str(path)]) == 0
    want = {f: _loss_rows(out / f) for f in folders}
    assert sum(map(len, want.values())) == 12
    rng = random.Random(SEED * 100 + 3)
    pipes = [_pipeline(tmp_path / f"t{t}", tiny_model_dir, alpaca_file) for t in range(3)]
    results = _signal_mid_run(
        [[sys.executable, "-m", "llamatune", "pipeline", str(p)] for p, _ in pipes],
        [[out / f for f in folders] for _, out in pipes], [rng.randint(1, 10) for _ in pipes],
        rng)
    for trial, ((path, out), (code, err)) in enumerate(zip(pipes, results)):
        assert code == 143, err[-3000:]
        m = re.search(r"stopped by SIGTERM(?: in stage (\w+))? (.*) Continue with `([^`]+)`",
                      err)
        assert m and m.group(3) == f"llamatune pipeline {path}", err[-3000:]
        stage, what = m.group(1), m.group(2)
        if "wrote checkpoint" in what:  # mid-stage (else in its setup, or between stages)
            folder = out / dict(zip(("sft", "rm", "ppo"), folders))[stage]
            step = int(re.search(r"checkpoint-(\d+)", what).group(1))
            assert (folder / f"checkpoint-{step}" / "trainer_state.json").is_file()
            assert _loss_rows(folder)[-1][0] == step < 4
            assert not (folder / "adapter_model.safetensors").exists()
        print(f"trial {trial}: {m.group(0)}")
        assert cli(shlex.split(m.group(3))[1:]) == 0
        for f in folders:
            got = _loss_rows(out / f)
            assert [s for s, _ in got] == [s for s, _ in want[f]], f
            assert [x for _, x in got] == pytest.approx([x for _, x in want[f]], abs=1e-6), f


def test_a_second_signal_exits_at_once(tmp_path, tiny_model_dir, alpaca_file):
    recipe = _sft_recipe(tmp_path, tiny_model_dir, alpaca_file, max_steps=400)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "llamatune", "sft", str(recipe)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _n_rows(run) < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)  # before the step in progress can end
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode in (130, 143), err[-3000:]
    assert "second signal" in err and "without a checkpoint" in err
    assert not list(run.glob("checkpoint-*/trainer_state.json"))
    assert not (run / "adapter_model.safetensors").exists()


def test_repeats_count_once_under_a_launcher_only(monkeypatch):
    """The handler itself: a second signal exits at once with 128 + its number, except a quick
    repeat under a launcher (a scheduler signals every process, the launcher forwards too)."""
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    for launched, want in ((False, [143]), (True, [])):
        monkeypatch.setenv("WORLD_SIZE", "2" if launched else "1")
        with _stop.handling(), _stop.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert _stop.received() == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
            assert exits == want
        exits.clear()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the old handler is back"


def test_a_signal_during_setup_stops_there(tmp_path, tiny_model_dir, alpaca_file, monkeypatch,
                                           capsys):
    from llamatune import model

    real = model.load_base

    def load_base(*a, **kw):  # the signal arrives while the model loads
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(model, "load_base", load_base)
    recipe = _sft_recipe(tmp_path, tiny_model_dir, alpaca_file)
    assert cli(["sft", str(recipe)]) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM during setup" in err and "Traceback" not in err
    assert f"Continue with `llamatune sft {recipe}`" in err
    run = tmp_path / "run"
    assert not list(run.glob("checkpoint-*")) and not (run / "adapter_model.safetensors").exists()
    assert not list(run.glob(".*tmp"))


def test_a_signal_during_the_final_save_completes_it(tmp_path, tiny_model_dir, alpaca_file,
                                                     monkeypatch, capsys):
    from safetensors.torch import load_file

    from llamatune import model

    real = model.save_trainable

    def save_trainable(loaded, folder):  # the signal arrives while the adapter is written
        os.kill(os.getpid(), signal.SIGTERM)
        return real(loaded, folder)

    monkeypatch.setattr(model, "save_trainable", save_trainable)
    recipe = _sft_recipe(tmp_path, tiny_model_dir, alpaca_file, max_steps=2)
    assert cli(["sft", str(recipe)]) == 143
    err = capsys.readouterr().err
    assert "while the final files were written; they were completed first" in err
    run = tmp_path / "run"
    assert load_file(str(run / "adapter_model.safetensors"))
    assert json.loads((run / "adapter_config.json").read_text())["r"] == 4
    assert not list(run.glob(".*tmp")) and [s for s, _ in _loss_rows(run)] == [1, 2]
