"""The inputs users really feed llamatune: odd encodings, broken files, bad recipes.

Each case runs through the CLI: it works, or it exits 2 with one paragraph naming the file and
line (or the recipe key), no traceback, and nothing written. Property-based tests then throw
arbitrary bytes, truncated JSON, wrong types and huge lines at the readers and the config
loader: every case is a ``UserError``/``ConfigError`` or a success, never another exception.
"""

import json
import os
import string

import pytest
import yaml
from conftest import make_recipe, metrics_rows, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamatune.cli import main as cli
from llamatune.config import ConfigError, load_config
from llamatune.data.formats import FORMATS, read_records
from llamatune.errors import UserError

ROWS = [{"instruction": f"tell me about {w}", "input": "", "output": f"sure {w} is blue"}
        for w in ("cat", "dog", "sun", "moon", "sky", "water", "paris", "python")]


def _run_fails(capsys, argv, *needles):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    err = err.strip().splitlines()[-1]  # one paragraph, one line
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _sft(tmp_path, tiny_model_dir, data_path, *extra, **sections):
    recipe = make_recipe(tmp_path, tiny_model_dir, data_path, **sections)
    return ["sft", str(recipe), *extra]


def test_jsonl_with_bom_and_crlf_trains(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in ROWS))
    assert cli(_sft(tmp_path, tiny_model_dir, data, "train.max_steps=1")) == 0
    assert "data: 7/7 samples" in capsys.readouterr().out  # 8 rows, one held out


def test_json_array_file_trains(tmp_path, tiny_model_dir):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(ROWS, indent=2), encoding="utf-8-sig")
    assert cli(_sft(tmp_path, tiny_model_dir, data, "train.max_steps=1")) == 0


@pytest.mark.parametrize("content, needles", [
    (b"", ["is empty"]),
    (b"\n\n  \n", ["holds no records"]),
    (bytes(range(128, 256)) * 8, [":1: not UTF-8 text"]),
    (b'{"instruction": "a", "output": "b"}\n\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe',
     [":2: not UTF-8 text"]),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": ["x"], "output": "b"}\n',
     [":2: field 'instruction' must be a string, got list"]),
    (b'{"instruction": "a", "output": "b"}\n[1, 2]\n', [":2: a record must be a JSON object"]),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "outp', [":2: not valid JSON"]),
])
def test_bad_data_files_exit_2_naming_file_and_line(tmp_path, tiny_model_dir, capsys, content,
                                                    needles):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    _run_fails(capsys, _sft(tmp_path, tiny_model_dir, data), str(data), *needles)
    assert not (tmp_path / "run").exists(), "nothing is written"


@pytest.mark.parametrize("text, needles", [
    ("model:\n\tpath: x\n", ["recipe.yaml:2: not valid YAML", "spaces, never tabs"]),
    ("- model\n- data\n", ["the recipe is a list", "YAML mapping"]),
    ("", ["is empty"]),
    ("model: [unclosed\n", ["recipe.yaml:2: not valid YAML"]),
    ("data:\n  path: {data}\n  template: lama3\n", ["data.template 'lama3'", "Did you mean llama3"]),
    ("data:\n  path: {data}\ntrain:\n  lr: .nan\n", ["recipe.yaml:4: train.lr must be a number, got nan"]),
])
def test_bad_recipes_exit_2_naming_file_and_line(tmp_path, tiny_model_dir, capsys, text,
                                                 needles):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.format(data=data) + (f"model:\n  path: {tiny_model_dir}\n"
                                                if text.startswith("data") else ""))
    _run_fails(capsys, ["sft", str(recipe), f"output_dir={tmp_path}/run"], *needles)
    assert not (tmp_path / "run").exists()
    recipe.write_bytes(b"model:\n  path: \xff\xfe\n")
    _run_fails(capsys, ["validate", str(recipe)], "recipe.yaml:2: not UTF-8 text")


def test_eval_group_by_without_the_field_names_it(tmp_path, tiny_model_dir, capsys):
    rows = [dict(r, topic="animals") for r in ROWS]
    del rows[2]["topic"], rows[5]["topic"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    _run_fails(capsys, _sft(tmp_path, tiny_model_dir, data, data={"eval_group_by": "topic"}),
               f"{data}:3: field 'topic' is missing", f"{data}:6", "data.eval_group_by=topic")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cap", ["-1", "null", "0"])
def test_max_steps_minus_one_or_null_means_no_cap(tmp_path, tiny_model_dir, cap):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    argv = _sft(tmp_path, tiny_model_dir, data, f"train.max_steps={cap}", "train.epochs=2",
                "data.eval_split=0")
    assert cli(argv) == 0
    rows = metrics_rows(tmp_path / "run")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # 8 rows, batch 4, 2 epochs
    assert load_config(tmp_path / "run" / "config.yaml").train.step_cap == 0


def test_max_steps_below_minus_one_is_an_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="train.max_steps must be >= 0 .or -1/null"):
        load_config(None, ["train.max_steps=-2", "data.path=x"])


# --- property-based: readers and config loader never raise anything but user errors ---------

# LLAMATUNE_HYPOTHESIS_EXAMPLES=2000 for a longer hunt than the suite's.
SETTINGS = settings(max_examples=int(os.environ.get("LLAMATUNE_HYPOTHESIS_EXAMPLES", "120")),
                    deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=12)
KEYS = ["instruction", "input", "output", "conversations", "from", "value", "messages", "role",
        "content", "prompt", "chosen", "rejected", "topic", "system"]
ROW = st.dictionaries(st.sampled_from(KEYS), JSON | st.sampled_from(
    [[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]), max_size=6)


def _read_each_format(path, group_by=None):
    for fmt in FORMATS:
        try:
            records = read_records(path, fmt, group_by=group_by)
        except UserError:
            continue
        assert records and all("loc" in r for r in records)


@SETTINGS
@given(content=st.binary(max_size=600), suffix=st.sampled_from([".jsonl", ".json", ".csv",
                                                                ".parquet"]))
def test_any_bytes_in_any_data_file(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"data{suffix}"
    path.write_bytes(content)
    _read_each_format(path)


@SETTINGS
@given(rows=st.lists(ROW | JSON, max_size=5), cut=st.integers(min_value=0, max_value=400),
       crlf=st.booleans(), bom=st.booleans())
def test_json_rows_of_any_shape_truncated_anywhere(tmp_path_factory, rows, cut, crlf, bom):
    folder = tmp_path_factory.mktemp("rows")
    sep = "\r\n" if crlf else "\n"
    text = sep.join(json.dumps(r) for r in rows)
    for name, body in (("whole.jsonl", text), ("cut.jsonl", text[:cut]),
                       ("whole.json", json.dumps(rows)), ("cut.json", json.dumps(rows)[:cut])):
        path = folder / name
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8", "surrogatepass"))
        _read_each_format(path, group_by="topic")


def test_huge_lines(tmp_path):
    path = tmp_path / "huge.jsonl"
    big = "word " * 400_000  # a 2 MB answer on one line
    path.write_text(json.dumps({"instruction": "say it", "output": big}) + "\n"
                    + "x" * 3_000_000 + "\n")
    with pytest.raises(UserError, match=r"huge.jsonl:2: not valid JSON"):
        read_records(path, "alpaca")
    path.write_text(json.dumps({"instruction": "say it", "output": big}) + "\n")
    assert len(read_records(path, "alpaca")[0]["messages"][1]["content"]) == len(big)


SECTION_KEYS = {
    "model": ["path", "dtype", "quantization", "fused", "device", "adapter", "pth"],
    "lora": ["r", "alpha", "dropout", "target_modules", "enabled"],
    "data": ["path", "format", "template", "fields", "eval_split", "eval_group_by"],
    "train": ["max_steps", "batch_size", "lr", "epochs", "seed", "max_length", "packing"],
}
RECIPE = st.dictionaries(
    st.sampled_from([*SECTION_KEYS, "output_dir", "resume", "bogus"]),
    st.one_of(JSON, st.dictionaries(st.sampled_from(sum(SECTION_KEYS.values(), [])), JSON,
                                    max_size=6)),
    max_size=6)


@SETTINGS
@given(recipe=RECIPE, overrides=st.lists(st.text(alphabet=string.printable, max_size=30),
                                         max_size=4))
def test_any_recipe_structure_and_overrides(tmp_path_factory, recipe, overrides):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    try:
        load_config(path, overrides)
    except ConfigError:
        pass


@SETTINGS
@given(content=st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_any_bytes_as_a_recipe(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_bytes(content)
    try:
        load_config(path)
    except ConfigError:
        pass
