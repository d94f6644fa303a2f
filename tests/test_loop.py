"""The shared loop, once for every batch stage (SFT, reward model, DPO)."""

from __future__ import annotations

import importlib

import pytest
from conftest import make_recipe, trainable_state_dict, write_jsonl
from test_reward import _pairs

from llamatune.config import TRAIN_STAGES, load_config

_CLASSES = {"sft": "SFTRecipe", "rm": "RewardRecipe", "dpo": "DPORecipe"}


def _stage(stage: str, folder, tiny_model_dir, alpaca_file, train: dict):
    if stage == "sft":
        data, sections = alpaca_file, {"data": {"eval_split": 0}}
    else:
        folder.mkdir(parents=True, exist_ok=True)
        data = write_jsonl(folder / "pref.jsonl", _pairs())
        sections = {"data": {"format": "preference", "template": "chatml", "eval_split": 0}}
    path = make_recipe(folder, tiny_model_dir, data, stage=stage, model={"dtype": "float32"},
                       train=train, **sections)
    module = importlib.import_module(TRAIN_STAGES[stage].module)
    return getattr(module, _CLASSES[stage])(load_config(path), str(path))


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_accumulation_weighs_every_unit_equally(stage, tmp_path, tiny_model_dir, alpaca_file):
    """Two micro-batches of 2 give the update of one batch of 4: every token (SFT) or pair
    (RM, DPO) weighs the same whatever micro-batch it landed in."""
    import torch

    states = []
    for i, (bs, acc) in enumerate(((4, 1), (2, 2))):
        r = _stage(stage, tmp_path / str(i), tiny_model_dir, alpaca_file,
                   {"max_steps": 1, "batch_size": bs, "grad_accum": acc, "lr": 1e-2,
                    "group_by_length": False})
        r.setup()
        r.train()
        states.append({n: t.clone() for n, t in trainable_state_dict(r.loaded.net).items()})
    assert states[0]
    for n in states[0]:
        assert torch.allclose(states[0][n], states[1][n], atol=1e-6), n
