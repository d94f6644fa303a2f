"""Generation for users and for PPO's rollouts: the decoding loop against transformers'
``generate``, batched = one at a time, ``llamatune generate --data/--out``."""

import json

import pytest
import torch
from conftest import make_recipe, write_jsonl

from llamatune.cli import main as cli
from llamatune.decoding import generate, sample_next


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_greedy_decoding_equals_transformers_generate_batched_or_not(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, model.config.vocab_size, (n,), generator=g).tolist()
               for n in (3, 9, 5, 12)]
    one_by_one = generate(model, tok, prompts, stop_ids=[tok.eos_token_id], max_new_tokens=8,
                          greedy=True, batch_size=1)
    batched = generate(model, tok, prompts, stop_ids=[tok.eos_token_id], max_new_tokens=8,
                       greedy=True)
    assert batched.ids == one_by_one.ids
    for p, got, ended in zip(prompts, one_by_one.ids, one_by_one.ended):
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id) + 1]
        assert got == ref
        assert ended == (got[-1] == tok.eos_token_id)


def test_sampling_follows_the_distribution_within_top_p():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    draws = sample_next(logits)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)
    nucleus = torch.bincount(sample_next(logits, top_p=0.7), minlength=4).float() / len(draws)
    assert nucleus[2:].sum() == 0  # 0.5 + 0.3 covers 0.7: the tail is never drawn
    assert nucleus[0] == pytest.approx(0.5 / 0.8, abs=0.015)
    hot = torch.bincount(sample_next(logits, temperature=100.0), minlength=4).float() / len(draws)
    assert hot.min() > 0.2  # a high temperature flattens the distribution


def test_generate_file_one_row_per_input_in_order(tmp_path, tiny_model_dir, alpaca_file, capsys):
    recipe = make_recipe(tmp_path, tiny_model_dir, alpaca_file)
    assert cli(["sft", str(recipe), "train.max_steps=1"]) == 0
    run = tmp_path / "run"
    rows = [{"prompt": f"tell me about {w}", "id": i} for i, w in
            enumerate(["cat", "dog", "the sun and the moon", "a", "trees", "rain"])]
    rows.append({"prompt": [{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"},
                            {"role": "user", "content": "tell me about cat"}], "id": 6})
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "answers" / "out.jsonl"
    capsys.readouterr()
    assert cli(["generate", str(run), "--data", str(data), "--out", str(out),
                "--max-new-tokens", "6", "--batch-size", "3"]) == 0
    assert "wrote 7 answers" in capsys.readouterr().out
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["id"] for g in got] == list(range(7))
    assert [g["prompt"] for g in got] == [r["prompt"] for r in rows]
    assert all(isinstance(g["response"], str) and isinstance(g["ended"], bool) for g in got)
    # Greedy by default: one prompt alone answers as it did inside a batch.
    capsys.readouterr()
    assert cli(["generate", str(run), "--prompt", rows[2]["prompt"], "--max-new-tokens",
                "6"]) == 0
    assert capsys.readouterr().out.strip() == got[2]["response"]
    # Sampling is seeded: the same seed gives the same answers.
    sampled = []
    for _ in range(2):
        assert cli(["generate", str(run), "--data", str(data), "--out", str(out),
                    "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3"]) == 0
        sampled.append(out.read_text())
    assert sampled[0] == sampled[1]


def test_generate_file_errors_name_the_file_and_leave_nothing(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt field"}\n')
    out = tmp_path / "out.jsonl"
    assert cli(["generate", str(tiny_model_dir), "--data", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "--field" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.glob(".out.jsonl*")) == []
    assert cli(["generate", str(tiny_model_dir), "--data", str(bad)]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli(["generate", str(tiny_model_dir), "--data", str(bad), "--out", str(bad)]) == 2
    assert "input file" in capsys.readouterr().err
