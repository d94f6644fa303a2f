"""``llamatune pipeline``: SFT -> RM -> PPO -> merge on a tiny Llama; reruns skip, resume,
refuse changes; everything is checked before the first stage starts."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import WORDS, write_jsonl

from llamatune.cli import main as cli


@pytest.fixture
def pipeline(tmp_path, tiny_model_dir, alpaca_file):
    rows = [{"prompt": f"tell me about {w}", "chosen": f"the {w} is nice thanks",
             "rejected": f"the {w} is bad", "topic": w} for w in WORDS[:12] for _ in range(2)]
    pref = write_jsonl(tmp_path / "pref.jsonl", rows)
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"tell me about {w}"} for w in WORDS[:20]])
    recipe = {
        "stage": "pipeline", "output_dir": str(tmp_path / "out"),
        "model": {"path": str(tiny_model_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"template": "chatml"},
        "train": {"batch_size": 4, "max_length": 128, "lr": 1e-2, "progress": False,
                  "eval_every": 0},
        "stages": {
            "sft": {"data": {"path": str(alpaca_file), "format": "alpaca", "eval_split": 4},
                    "train": {"max_steps": 2}},
            "rm": {"data": {"path": str(pref), "format": "preference", "eval_split": 4},
                   "train": {"max_steps": 2}},
            "ppo": {"data": {"path": str(prompts), "format": "prompts", "eval_split": 4},
                    "ppo": {"rollout_batch": 4, "max_new_tokens": 5, "sample_every": 0},
                    "train": {"max_steps": 2, "save_every": 1}},
        },
        "merge": {"samples": 2},
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp_path / "out"


def _summary(out):
    return {r["stage"]: r for r in json.loads((out / "summary.json").read_text())["stages"]}


def test_pipeline_runs_every_stage_then_skips_them(pipeline, capsys):
    from transformers import AutoModelForCausalLM

    from llamatune.config import load_config

    path, out = pipeline
    assert cli(["pipeline", str(path)]) == 0
    rows = _summary(out)
    assert list(rows) == ["sft", "rm", "ppo", "merge"]
    assert all(r["status"] == "ran" for r in rows.values())
    rm_cfg, ppo_cfg = load_config(out / "reward" / "config.yaml"), load_config(out / "ppo" /
                                                                                "config.yaml")
    assert rm_cfg.model.adapter == str((out / "sft").resolve())
    assert ppo_cfg.model.adapter == str((out / "sft").resolve())
    assert ppo_cfg.ppo.reward_model == str((out / "reward").resolve())
    assert rm_cfg.data.template == ppo_cfg.data.template == "chatml"  # shared key inherited
    assert rm_cfg.train.max_steps == 2 and rm_cfg.lora.r == 4
    AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    for stage in ("sft", "reward", "ppo"):
        assert (out / stage / "plots" / "loss.png").is_file()
    said = capsys.readouterr().out
    assert "stage" in said and "key figure" in said

    before = {s: (out / s / "metrics.jsonl").stat().st_mtime_ns for s in ("sft", "reward", "ppo")}
    assert cli(["pipeline", str(path)]) == 0
    said = capsys.readouterr().out
    assert all(r["status"] == "skipped" for r in _summary(out).values())
    assert said.count("skipped (") == 4
    assert before == {s: (out / s / "metrics.jsonl").stat().st_mtime_ns
                      for s in ("sft", "reward", "ppo")}

    # A changed stage is refused, naming the key; --from redoes it and what follows.
    assert cli(["pipeline", str(path), "ppo.train.lr=0.001"]) == 2
    err = capsys.readouterr().err
    assert "pipeline stage ppo" in err and "train.lr" in err and "--from ppo" in err
    assert cli(["pipeline", str(path), "ppo.train.lr=0.001", "--from", "ppo"]) == 0
    rows = _summary(out)
    assert [rows[s]["status"] for s in ("sft", "rm", "ppo", "merge")] == \
        ["skipped", "skipped", "ran", "ran"]
    assert load_config(out / "ppo" / "config.yaml").train.lr == 0.001

    # An interrupted stage resumes from its checkpoint.
    (out / "ppo" / "adapter_model.safetensors").unlink()
    assert cli(["pipeline", str(path), "ppo.train.lr=0.001"]) == 0
    rows = _summary(out)
    assert rows["ppo"]["status"] == "resumed" and rows["merge"]["status"] == "ran"


def test_everything_is_checked_before_the_first_stage(pipeline, tmp_path, capsys):
    path, out = pipeline
    assert cli(["pipeline", str(path), "rm.train.max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "pipe.yaml stages.rm: train.max_stepz" in err and "train.max_steps" in err
    assert not out.exists()
    recipe = yaml.safe_load(path.read_text())
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"nope": 1}])
    recipe["stages"]["ppo"]["data"]["path"] = str(bad)
    path.write_text(yaml.safe_dump(recipe))
    assert cli(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pipeline stage ppo" in err and "bad.jsonl:2" in err and "Traceback" not in err
    assert not (out / "sft").exists()
    recipe["stages"]["dpo"] = {}
    path.write_text(yaml.safe_dump(recipe))
    assert cli(["pipeline", str(path)]) == 2
    assert "stages.dpo is not a pipeline stage" in capsys.readouterr().err
    assert cli(["pipeline", str(path), "--from", "nope"]) == 2
    assert "not a pipeline step" in capsys.readouterr().err


def test_a_stage_recipe_by_path_and_the_precedence_of_keys(pipeline, tmp_path):
    from llamatune.pipeline import plan_pipeline

    path, out = pipeline
    recipe = yaml.safe_load(path.read_text())
    stage_file = tmp_path / "sft_stage.yaml"
    stage_file.write_text(yaml.safe_dump({
        "stage": "sft", "output_dir": "elsewhere", "data": recipe["stages"]["sft"]["data"],
        "train": {"max_steps": 7, "lr": 0.5, "batch_size": 2}, "lora": {"r": 2}}))
    recipe["stages"]["sft"] = str(stage_file)
    path.write_text(yaml.safe_dump(recipe))
    plans, _, _ = plan_pipeline(str(path), ["sft.train.max_steps=3"])
    sft = plans[0].cfg
    assert sft.train.max_steps == 3          # the command line wins
    assert sft.train.lr == 0.01 and sft.lora.r == 4  # shared keys over the stage file
    assert sft.train.batch_size == 4
    assert sft.output_dir == str(out / "sft")  # the pipeline places every stage
    assert plans[0].recipe_path == str(stage_file)


def test_held_out_topics_stay_out_of_every_stage_and_are_checked_at_the_end(
        pipeline, tmp_path, capsys):
    from llamatune.config import load_config
    from llamatune.data.prepare import prepare
    from llamatune.model import load_tokenizer

    path, out = pipeline
    alpaca = tmp_path / "alpaca_topics.jsonl"
    rows = [dict(json.loads(x), topic=WORDS[i % 12])
            for i, x in enumerate((tmp_path / "alpaca.jsonl").read_text().splitlines())]
    write_jsonl(alpaca, rows)
    prompts = write_jsonl(tmp_path / "prompts_topics.jsonl",
                          [{"prompt": f"tell me about {w}", "topic": w} for w in WORDS[:20]])
    held = ["cat", "dog"]
    assert cli(["pipeline", str(path), f"data.holdout_topics={json.dumps(held)}",
                f"sft.data.path={alpaca}", f"ppo.data.path={prompts}"]) == 0
    said = capsys.readouterr().out
    assert "rows of held-out topics" in said
    row = _summary(out)["held-out"]
    assert row["status"] == "ran" and row["prompts"] == 2  # one distinct prompt per topic
    got = [json.loads(x) for x in (out / "held_out.jsonl").read_text().splitlines()]
    assert {g["topic"] for g in got} == set(held)
    assert all({"sft_answer", "final_answer", "sft_score", "final_score"} <= set(g) for g in got)
    assert row["mean"]["final"] == pytest.approx(sum(g["final_score"] for g in got) / 2, abs=1e-3)
    # No stage saw a row of a held-out topic, in training or in its eval split.
    for stage, kind in (("sft", "conversations"), ("reward", "pairs"), ("ppo", "prompts")):
        cfg = load_config(out / stage / "config.yaml")
        assert cfg.data.holdout_topics == held
        data = prepare(cfg, load_tokenizer(cfg.model, str(out / stage)), kind, "test")
        file_rows = [json.loads(x) for x in Path(cfg.data.path).read_text().splitlines()]
        n_held = sum(r["topic"] in held for r in file_rows)
        assert data.held_out == n_held > 0
        assert len(data.train) + len(data.eval) == len(file_rows) - n_held
        if kind == "prompts":
            asked = {s["messages"][-1]["content"] for s in data.train + data.eval}
            assert asked.isdisjoint({f"tell me about {w}" for w in held})
    assert cli(["pipeline", str(path), f"data.holdout_topics={json.dumps(held)}",
                f"sft.data.path={alpaca}", f"ppo.data.path={prompts}"]) == 0
    assert _summary(out)["held-out"]["status"] == "skipped"
    capsys.readouterr()
    assert cli(["report", str(out)]) == 0
    assert "held-out topics: RM score sft" in capsys.readouterr().out


def test_holdout_topics_on_data_without_topics_is_a_clear_error(pipeline, capsys):
    path, out = pipeline
    assert cli(["pipeline", str(path), "data.holdout_topics=[cat]"]) == 2
    err = capsys.readouterr().err
    assert "data.holdout_topics" in err and "no `topic` field" in err and "Traceback" not in err
    assert not (out / "sft" / "metrics.jsonl").exists()
