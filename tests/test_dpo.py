"""The DPO stage on a tiny random Llama: trl's loss on the same batch, zero rewards at the
start, a reference that never moves, accumulation, precomputed reference, saved adapter."""

import math

import pytest
import torch
from conftest import make_recipe, metrics_rows, with_sections, write_jsonl
from test_reward import _pairs

from llamatune.cli import main as cli
from llamatune.config import load_config
from llamatune.recipes.dpo import DPORecipe, dpo_loss
from llamatune.training import pair_batches


def _recipe(tmp_path, tiny_model_dir, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "pref.jsonl", _pairs())
    sections = dict(stage="dpo",
                    data={"format": "preference", "template": "chatml", "eval_group_by": "topic",
                          "eval_split": 2},
                    train={"max_steps": 2, "batch_size": 4, "lr": 1e-2},
                    model={"dtype": "float32"})
    sections = with_sections(sections, extra)
    path = make_recipe(tmp_path, tiny_model_dir, data, **sections)
    return DPORecipe(load_config(path), str(path)), path



@pytest.mark.parametrize("start", ["base", "sft"])
def test_implicit_rewards_are_exactly_zero_before_the_first_step(tmp_path, tiny_model_dir,
                                                                  sft_run, start):
    extra = {"model": {"adapter": str(sft_run)}} if start == "sft" else {}
    r, _ = _recipe(tmp_path / "dpo", tiny_model_dir, **extra)
    r.setup()
    batch = r.batches(0)[0]
    with torch.no_grad():
        loss, figures = r.loss(batch)
    n = r.count(batch)
    assert figures["rewards_chosen"] == 0.0 and figures["rewards_rejected"] == 0.0
    assert figures["reward_margin"] == 0.0
    assert float(loss) == pytest.approx(n * math.log(2), rel=1e-6)  # -log sigmoid(0) per pair


def test_reference_and_base_never_move(tmp_path, tiny_model_dir, sft_run):
    from safetensors.torch import load_file

    r, _ = _recipe(tmp_path / "dpo", tiny_model_dir, model={"adapter": str(sft_run)},
                   train={"max_steps": 4})
    r.setup()
    before = {n: p.detach().clone() for n, p in r.net.named_parameters()}
    r.train()
    r.cleanup()
    moved = 0
    for n, p in r.net.named_parameters():
        if ".policy." in n:
            moved += not torch.equal(before[n], p.detach())
        else:
            assert torch.equal(before[n], p.detach()), n
    assert moved > 0
    # The reference is the SFT adapter itself, and the run keeps its own copy of it.
    sft = load_file(str(sft_run / "adapter_model.safetensors"))
    kept = load_file(str(r.run_dir / "reference_adapter" / "adapter_model.safetensors"))
    assert sft.keys() == kept.keys() and all(torch.equal(sft[k], kept[k]) for k in sft)
    live = {n.replace(".reference", ""): p for n, p in r.net.model.named_parameters()
            if ".reference." in n}
    for k, v in sft.items():
        name = next(n for n in live if n.endswith(k.replace("base_model.model.", "", 1)))
        assert torch.equal(live[name], v), k
    final = load_file(str(r.run_dir / "adapter_model.safetensors"))
    assert final.keys() == sft.keys() and any(not torch.equal(final[k], sft[k]) for k in sft)


def test_precomputed_reference_gives_the_same_run(tmp_path, tiny_model_dir, sft_run):
    runs = []
    for i, pre in enumerate((False, True)):
        r, _ = _recipe(tmp_path / str(i), tiny_model_dir, model={"adapter": str(sft_run)},
                       dpo={"precompute_ref": pre}, train={"max_steps": 3})
        r.setup()
        r.train()
        runs.append(metrics_rows(r.run_dir))
    for a, b in zip(*runs):
        for k in a:
            if k not in ("tokens_per_s",):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_conservative_dpo_matches_its_formula():
    policy = torch.tensor([-3.0, -5.0, -4.0, -4.5], dtype=torch.float64)
    reference = torch.tensor([-3.5, -4.0, -4.2, -4.4], dtype=torch.float64)
    counts = torch.tensor([3, 4, 2, 5])
    beta, eps = 0.3, 0.2
    loss, figures = dpo_loss(policy, reference, counts, beta, "sigmoid", eps)
    want = 0.0
    for c, rj in ((0, 2), (1, 3)):
        d = (policy[c] - reference[c]) - (policy[rj] - reference[rj])
        want += -(1 - eps) * math.log(1 / (1 + math.exp(-beta * d))) \
            - eps * math.log(1 / (1 + math.exp(beta * d)))
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert figures["reward_accuracy"] == 1.0  # pair 0: 0.15 > 0.06; pair 1: -0.3 < -0.03


def _trl_split(sample, side):
    """prompt_ids / completion ids as trl's collator takes them: the same tokens and mask."""
    ids, labels = sample[f"{side}_ids"], sample[f"{side}_labels"]
    first = next(i for i, t in enumerate(labels) if t != -100)
    assert all(t != -100 for t in labels[first:])
    return ids[:first], ids[first:]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_loss_equals_trl_dpo_trainer_on_the_same_batch(tmp_path, tiny_model_dir, loss):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    r, _ = _recipe(tmp_path / "dpo", tiny_model_dir, dpo={"beta": 0.25, "loss": loss},
                   train={"batch_size": 3})
    r.setup()
    # trl looks for peft's "default" adapter: give the stage an equal policy under that name.
    from llamatune.config import LoraConfig, ModelConfig
    from llamatune.model import load_model

    r.net = load_model(ModelConfig(path=str(tiny_model_dir), dtype="float32"),
                       LoraConfig(r=4, alpha=8, dropout=0.0)).net
    batch = pair_batches(r.train_samples[:3], r.cfg.train, 0, r.pad_id, shuffle=False)[0]

    examples = []
    for s in r.train_samples[:3]:
        prompt, chosen = _trl_split(s, "chosen")
        prompt_r, rejected = _trl_split(s, "rejected")
        assert prompt == prompt_r
        examples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.25, loss_type=[loss],
                         report_to=[], use_cpu=True, bf16=False, fp16=False,
                         per_device_train_batch_size=3, max_length=None)
    tiny = Dataset.from_list([{"prompt": "hi", "chosen": "yes", "rejected": "no"}])
    # trl keeps a copy of the adapter it is given as its reference ("ref"): give it the fresh
    # adapter (B = 0, the base model), then move the policy so the loss is not trivial.
    trainer = trl.DPOTrainer(model=r.net.model, args=args, train_dataset=tiny,
                             processing_class=r.tokenizer)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in r.net.named_parameters():
            if "lora_B.default" in n:  # not trl's "ref" copy
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ours, _ = r.loss(batch)
    ours = float(ours) / r.count(batch)
    inputs = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=r.pad_id)(examples)
    r.net.model.train()
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, inputs))
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)


def test_saved_adapter_loads_with_plain_peft_and_gives_the_logged_accuracy(tmp_path,
                                                                             tiny_model_dir):
    """Implicit rewards recomputed with plain transformers + peft (no llamatune code)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r, _ = _recipe(tmp_path / "dpo", tiny_model_dir, train={"max_steps": 6})
    r.setup()
    r.train()
    r.cleanup()
    logged = [x for x in metrics_rows(r.run_dir) if "eval_reward_accuracy" in x][-1]

    def logps(model, ids, labels):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        lab = torch.tensor(labels[1:])
        keep = lab != -100
        return float(torch.log_softmax(logits, -1)[keep].gather(1, lab[keep][:, None]).sum())

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(r.run_dir)).eval()
    beta, right, margin = r.cfg.dpo.beta, 0, 0.0
    for s in r.eval_samples:
        rew = {side: beta * (logps(policy, s[f"{side}_ids"], s[f"{side}_labels"])
                             - logps(base, s[f"{side}_ids"], s[f"{side}_labels"]))
               for side in ("chosen", "rejected")}
        right += rew["chosen"] > rew["rejected"]
        margin += rew["chosen"] - rew["rejected"]
    assert right / len(r.eval_samples) == pytest.approx(logged["eval_reward_accuracy"])
    assert margin / len(r.eval_samples) == pytest.approx(logged["eval_reward_margin"], rel=1e-3)


def test_cli_dpo_checks_its_inputs(tmp_path, tiny_model_dir, alpaca_file, capsys):
    _, path = _recipe(tmp_path / "dpo", tiny_model_dir)
    assert cli(["dpo", str(path), "dpo.beta=0", "dpo.loss=kto"]) == 2
    err = capsys.readouterr().err
    assert "dpo.beta must be > 0" in err and "dpo.loss is 'kto'" in err
    assert cli(["dpo", str(path), "data.format=alpaca", f"data.path={alpaca_file}"]) == 2
    assert "llamatune dpo takes data.format=preference" in capsys.readouterr().err
    assert cli(["sft", str(path)]) == 2
    assert "`stage: dpo` recipe" in capsys.readouterr().err
    assert cli(["validate", str(path)]) == 0
    assert "stage dpo" in capsys.readouterr().out
    assert not (tmp_path / "dpo" / "run").exists()
