import pytest

from llamatune.config import ConfigError, load_config, save_config


def test_defaults_and_overrides():
    cfg = load_config(None, ["data.path=x.jsonl", "train.lr=1e-4", "lora.target_modules=[q_proj]"])
    assert cfg.train.lr == 1e-4
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.model.path == "smollm2-135m-instruct"


def test_unknown_key_did_you_mean():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.path=x", "train.max_stepz=3"])
    assert "train.max_stepz" in str(e.value) and "did you mean train.max_steps" in str(e.value)


def test_all_errors_in_one_message_with_yaml_lines(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  path: x\ntrain:\n  lr: fast\n  batchsize: 2\nmodel:\n  quantization: 4bi\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["lora.r=0"])
    msg = str(e.value)
    assert "4 problems" in msg
    assert f"{p}:4: train.lr must be a number" in msg
    assert f"{p}:5: train.batchsize is not a recipe key; did you mean train.batch_size?" in msg
    assert "did you mean 4bit" in msg
    assert "override lora.r must be a positive integer" in msg


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(p)


def test_section_must_be_mapping_and_types(tmp_path):
    with pytest.raises(ConfigError, match="train must be a mapping"):
        load_config(None, ["data.path=x", "train=3"])
    with pytest.raises(ConfigError, match="train.packing must be true/false"):
        load_config(None, ["data.path=x", "train.packing=maybe"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.path=x", "train.max_steps=7", "data.fields={output: response}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_every_shipped_recipe_loads():
    from llamatune.shipped import list_recipes

    recipes = list_recipes()
    assert "alpaca" in recipes
    from llamatune.pipeline import plan_pipeline

    for name, path in recipes.items():
        if "stage: pipeline" in path.read_text():
            plans, _, _ = plan_pipeline(str(path))
            assert [p.command for p in plans] == ["sft", "rm", "ppo"], name
            assert all(p.cfg.data.path for p in plans), name
        else:
            cfg = load_config(path)
            assert cfg.data.path, name
        text = path.read_text()
        assert text.startswith("#"), f"{name}: recipes open with a header comment"
        assert "llamatune" in text
