"""``llamatune preview``: the human view and the JSON lines."""

import json

from conftest import make_recipe, write_jsonl

from llamatune.cli import main as cli

CONVS = [
    {"conversations": [{"from": "system", "value": "be helpful"},
                       {"from": "human", "value": "hello"}, {"from": "gpt", "value": "the cat sat"},
                       {"from": "human", "value": "why"}, {"from": "gpt", "value": "because"}]},
    {"conversations": [{"from": "human", "value": "tell me a poem"},
                       {"from": "gpt", "value": "the sky is blue"}]},
    {"conversations": [{"from": "human", "value": "one"}, {"from": "gpt", "value": "two"},
                       {"from": "human", "value": "three"}, {"from": "gpt", "value": "four"}]},
]


def test_preview_json_supervises_exactly_the_answers(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                     capsys):
    data = write_jsonl(tmp_path / "v.jsonl", CONVS)
    recipe = make_recipe(tmp_path, tiny_model_dir, data,
                         data={"format": "sharegpt", "template": "llama2", "eval_split": 0})
    assert cli(["preview", str(recipe), "--json", "-n", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    eos = tiny_tokenizer.eos_token_id
    for line, conv in zip(lines, CONVS):
        row = json.loads(line)
        assert set(row) == {"text", "input_ids", "labels"}
        answers = [t["value"] for t in conv["conversations"] if t["from"] == "gpt"]
        spans, cur = [], []
        for tid, lab in zip(row["input_ids"], row["labels"]):
            assert lab in (-100, tid)
            if lab != -100:
                cur.append(tid)
            elif cur:
                spans.append(cur)
                cur = []
        if cur:
            spans.append(cur)
        assert len(spans) == len(answers)
        for span, answer in zip(spans, answers):
            assert span[-1] == eos
            assert tiny_tokenizer.decode(span[:-1]).strip() == answer


def test_preview_human_view_marks_spans(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "v.jsonl", CONVS)
    recipe = make_recipe(tmp_path, tiny_model_dir, data,
                         data={"format": "sharegpt", "template": "chatml", "eval_split": 0})
    assert cli(["preview", str(recipe), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "[[the cat sat<|im_end|>]]" in out and "[[because<|im_end|>]]" in out
    assert "BOS ok" in out and "end token supervised 3/3" in out


def test_broken_third_line_stops_sft(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"},
        '{"instruction": "broken"', {"instruction": "e", "output": "f"}])
    recipe = make_recipe(tmp_path, tiny_model_dir, data)
    assert cli(["sft", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:3: not valid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_preview_llama3_without_bos_post_processor(tmp_path, tiny_model_dir, capsys):
    """A Llama-3 tokenizer.json that adds no BOS still gets <|begin_of_text|> on every sample."""
    from conftest import build_llama3_tokenizer

    tok_dir = build_llama3_tokenizer(tmp_path / "llama3-tok", bos_post_processor=False)
    data = write_jsonl(tmp_path / "v.jsonl", CONVS)
    recipe = make_recipe(tmp_path, tiny_model_dir, data, model={"tokenizer": str(tok_dir)},
                         data={"format": "sharegpt", "template": "llama3", "eval_split": 0})
    assert cli(["preview", str(recipe), "--json", "-n", "3"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["text"].startswith("<|begin_of_text|><|start_header_id|>")
        assert row["input_ids"][0] == 0 and row["input_ids"].count(0) == 1  # its id in this vocab
    assert cli(["preview", str(recipe), "-n", "1"]) == 0
    assert "BOS ok 3/3, end token supervised 3/3" in capsys.readouterr().out
