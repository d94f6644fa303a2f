"""Formats, row validation, invariants, packing equivalence and the tokenization cache."""

import json

import pytest
from conftest import lm_loss_sum, write_jsonl

from llamatune.data import (
    pack,
    packed_batch,
    pad_batch,
    read_records,
    split_records,
    tokenize_conversations,
)
from llamatune.errors import UserError


def test_alpaca_rows_become_conversations(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "add", "input": "1 2", "output": "3"},
        {"instruction": "hi", "output": "hello"},
    ])
    recs = read_records(p, "alpaca")
    assert recs[0]["messages"][0] == {"role": "user", "content": "add", "input": "1 2"}
    assert recs[1]["messages"][1] == {"role": "assistant", "content": "hello"}
    assert recs[1]["loc"].endswith("a.jsonl:2")


def test_broken_third_line_named(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"},
        '{"instruction": "e", "output": ', {"instruction": "f", "output": "g"}])
    with pytest.raises(UserError) as e:
        read_records(p, "alpaca")
    assert f"{p}:3: not valid JSON" in str(e.value)


def test_several_bad_rows_listed_together(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "a"},
        {"instruction": 3, "output": "x"},
        {"instruction": "b", "output": "   "},
        {"instruction": "ok", "output": "fine"},
    ])
    with pytest.raises(UserError) as e:
        read_records(p, "alpaca")
    msg = str(e.value)
    assert "3 bad row(s)" in msg
    assert f"{p}:1: field 'output' is missing" in msg
    assert f"{p}:2: field 'instruction' must be a string" in msg
    assert f"{p}:3: field 'output' is empty" in msg


def test_field_remapping(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "response": "a"}])
    recs = read_records(p, "alpaca", {"instruction": "prompt", "output": "response"})
    assert recs[0]["messages"][-1]["content"] == "a"


def test_sharegpt_and_messages(tmp_path):
    conv = [{"from": "system", "value": "s"}, {"from": "human", "value": "u1"},
            {"from": "gpt", "value": "a1"}, {"from": "human", "value": "u2"},
            {"from": "gpt", "value": "a2"}]
    p = write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv}])
    msgs = read_records(p, "sharegpt")[0]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    bad = write_jsonl(tmp_path / "b.jsonl", [
        {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": ""}]},
        {"conversations": [{"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "robot", "value": "a"}]}])
    with pytest.raises(UserError) as e:
        read_records(bad, "sharegpt")
    msg = str(e.value)
    assert "b.jsonl:1" in msg and "empty assistant response" in msg
    assert "b.jsonl:2" in msg and "expected 'user'" in msg
    assert "b.jsonl:3" in msg and "unknown from 'robot'" in msg
    m = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}])
    assert read_records(m, "messages")[0]["messages"][1]["content"] == "a"


def test_preference_forms_and_errors(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"chosen": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "g"}],
         "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
    ])
    recs = read_records(p, "preference")
    assert recs[1]["prompt"] == [{"role": "user", "content": "q2"}]
    assert recs[1]["chosen"] == [{"role": "assistant", "content": "g"}]
    bad = write_jsonl(tmp_path / "b.jsonl", [
        {"prompt": "q", "rejected": "bad"}, {"prompt": "q", "chosen": "same", "rejected": "same"}])
    with pytest.raises(UserError) as e:
        read_records(bad, "preference")
    assert "b.jsonl:1: field 'chosen' is missing" in str(e.value)
    assert "b.jsonl:2: field 'chosen' is identical to rejected" in str(e.value)


def test_other_file_types(tmp_path):
    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(3)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps(rows))
    import csv

    with open(tmp_path / "d" / "b.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d" / "c.parquet")
    recs = read_records(tmp_path / "d", "alpaca")
    assert len(recs) == 9
    assert recs[3]["loc"].endswith("b.csv:2")
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert len(read_records(tmp_path / "saved", "alpaca")) == 3


def test_group_split_holds_out_whole_groups():
    recs = [{"group": f"t{i % 10}", "loc": str(i)} for i in range(100)]
    train, held = split_records(recs, 0.2, seed=0, group_by=True)
    assert len({r["group"] for r in held}) == 2
    assert not {r["group"] for r in held} & {r["group"] for r in train}
    train, held = split_records(recs, 5, seed=0)
    assert len(held) == 5 and len(train) == 95


def test_invariants_counts_truncation_and_drops(tiny_tokenizer, alpaca_file):
    recs = read_records(alpaca_file, "alpaca")
    samples, stats = tokenize_conversations(recs, tiny_tokenizer, "alpaca", max_length=512)
    assert stats.samples == 40 and stats.bos_ok == 40 and stats.end_ok == 40
    for s in samples:
        assert s["input_ids"][0] == tiny_tokenizer.bos_token_id
        assert [t for t in s["labels"] if t != -100][-1] == tiny_tokenizer.eos_token_id
    # Too short for anything but the prompt: nothing left to learn in any sample.
    with pytest.raises(UserError, match="no usable samples"):
        tokenize_conversations(recs, tiny_tokenizer, "alpaca", max_length=20)
    cut = max(len(s["input_ids"]) for s in samples) - 1
    short, st = tokenize_conversations(recs, tiny_tokenizer, "alpaca", max_length=cut)
    assert st.truncated > 0 and all(len(s["input_ids"]) <= cut for s in short)
    truncated = [s for s in short if len(s["input_ids"]) == cut]
    assert all(s["labels"][-1] != tiny_tokenizer.eos_token_id for s in truncated)
    dropped, st = tokenize_conversations(recs, tiny_tokenizer, "alpaca", max_length=cut,
                                         truncation="drop")
    assert st.dropped_too_long == st.records - st.samples > 0


def test_invariant_counts_are_of_the_samples_as_trained(tiny_tokenizer, alpaca_file):
    """With some samples cut and some left with nothing to learn, the counts still add up."""
    recs = read_records(alpaca_file, "alpaca")
    full, _ = tokenize_conversations(recs, tiny_tokenizer, "alpaca", max_length=512)
    first_sup = sorted({s["labels"].index(next(t for t in s["labels"] if t != -100))
                        for s in full})
    length = first_sup[len(first_sup) // 2] + 1  # some prompts are longer, some shorter
    kept, st = tokenize_conversations(recs, tiny_tokenizer, "alpaca", max_length=length)
    assert st.dropped_unsupervised > 0 and st.truncated > 0
    assert st.samples == len(kept) == st.records - st.dropped_unsupervised
    assert st.truncated == sum(len(s["input_ids"]) == length for s in kept)
    assert st.bos_ok == st.samples
    assert st.end_ok == st.samples - st.truncated
    assert f"end token supervised {st.end_ok}/{st.samples - st.truncated}" in st.summary()


def test_tokenization_cache_hit(tiny_tokenizer, alpaca_file, tmp_path, monkeypatch):
    import llamatune.data.tokenize as tk

    recs = read_records(alpaca_file, "alpaca")
    first, _ = tokenize_conversations(recs, tiny_tokenizer, "alpaca", cache_root=tmp_path)
    assert list((tmp_path / "tokenized").glob("*.json"))
    monkeypatch.setattr(tk, "render", lambda *a, **k: pytest.fail("cache missed"))
    again, _ = tokenize_conversations(recs, tiny_tokenizer, "alpaca", cache_root=tmp_path)
    assert again == first
    with pytest.raises(pytest.fail.Exception):  # a different template is a different key
        tokenize_conversations(recs, tiny_tokenizer, "vicuna", cache_root=tmp_path)


def test_packing_gives_the_unpacked_loss(tiny_model_dir, tiny_tokenizer, alpaca_file):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.eval()
    recs = read_records(alpaca_file, "alpaca")[:12]
    samples, _ = tokenize_conversations(recs, tiny_tokenizer, "alpaca")
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        l1, n1 = lm_loss_sum(model, pad_batch(samples, pad))
        rows = pack(samples, 200)
        assert len(rows) < len(samples)
        l2, n2 = lm_loss_sum(model, packed_batch(rows, pad))
        # And against each sample alone, with no padding at all.
        alone = sum(lm_loss_sum(model, pad_batch([s], pad))[0] for s in samples)
    assert int(n1) == int(n2)
    assert abs(l1.item() / int(n1) - l2.item() / int(n2)) < 1e-5
    assert abs(alone.item() - l2.item()) / int(n2) < 1e-5
