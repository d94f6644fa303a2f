"""The PPO stage (and RLOO/GRPO) on a tiny random Llama: the estimators by hand, KL 0 and
ratio 1 before the first update, the reference is the starting model, the base never moves,
a toy reward rises, errors."""

import math

import pytest
import torch
from conftest import WORDS, make_recipe, metrics_rows, with_sections, write_jsonl

from llamatune import advantages as A
from llamatune.cli import main as cli
from llamatune.config import ConfigError, load_config
from llamatune.experience import dense, minibatch, partition
from llamatune.recipes.ppo import PPORecipe, _rollout

TOY = '''
def cat_count(prompts, responses, **fields):
    return [min(r.split().count("cat"), 4) / 4 for r in responses]


def starts_with_t(prompts, responses, **fields):
    return [float(r.startswith("t")) for r in responses]


def wrong_length(prompts, responses, **fields):
    return [1.0]
'''


def _prompts(tmp_path, n=24):
    rows = [{"prompt": f"tell me about {WORDS[i % len(WORDS)]}", "answer": str(i)}
            for i in range(n)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def _reward_file(tmp_path):
    path = tmp_path / "toy_reward.py"
    path.write_text(TOY)
    return path


def _recipe(tmp_path, model_dir, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    sections = dict(stage="ppo",
                    data={"format": "prompts", "template": "chatml", "eval_split": 4},
                    ppo={"reward_fn": f"{_reward_file(tmp_path)}:cat_count", "rollout_batch": 4,
                         "k": 2, "max_new_tokens": 6, "sample_every": 0},
                    train={"max_steps": 2, "batch_size": 4, "lr": 1e-2, "eval_every": 0},
                    model={"dtype": "float32"})
    sections = with_sections(sections, extra)
    path = make_recipe(tmp_path, model_dir, _prompts(tmp_path), **sections)
    return PPORecipe(load_config(path), str(path)), path



# -- the estimators --------------------------------------------------------------------------

def test_gae_against_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, -1.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 9.0], [0.1, 0.3, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    g, lam = 0.9, 0.8
    adv, ret = A.gae(rewards, values, mask, g, lam)
    # Row 0: deltas d2 = 1 - 0.6, d1 = 0 + g*0.6 - 0.4, d0 = 0 + g*0.4 - 0.2 (V after the end: 0)
    d2, d1, d0 = 1 - 0.6, g * 0.6 - 0.4, g * 0.4 - 0.2
    a2, a1 = d2, d1 + g * lam * d2
    a0 = d0 + g * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    e1 = -1.0 - 0.3
    e0 = 0.5 + g * 0.3 - 0.1 + g * lam * e1
    assert adv[1].tolist() == pytest.approx([e0, e1, 0.0, 0.0])
    assert ret[0, :3].tolist() == pytest.approx([a0 + 0.2, a1 + 0.4, a2 + 0.6])
    assert ret[0, 3] == 0 and ret[1, 2:].abs().sum() == 0


def test_group_advantages_and_kl_estimators():
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0])
    rloo = A.group_advantages(scores, 3, "rloo")
    assert rloo.tolist() == pytest.approx([1.0, -0.5, -0.5, -3.0, 0.0, 3.0])
    grpo = A.group_advantages(scores, 3, "grpo")
    g = scores.view(2, 3)
    want = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(-1)
    assert torch.allclose(grpo, want)
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    k3 = A.kl_k3(logp, ref)
    assert k3[1] == 0 and k3[0] == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    w = A.whiten(torch.tensor([[1.0, 3.0, 100.0]]), mask)
    assert w[0, 2] == 0 and w[0, :2].tolist() == pytest.approx([-1.0, 1.0], abs=1e-4)


def test_clipped_losses_and_adaptive_kl():
    mask = torch.ones(1, 3, dtype=torch.bool)
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, clipfrac, approx_kl, ratio = A.policy_loss(logp, old, adv, mask, 0.2)
    # ratios 1.5 (clipped to 1.2 for a positive advantage), 1.0, 0.5 (clipped to 0.8, negative)
    assert float(loss) == pytest.approx(-(1.2 + 1.0 - 0.8) / 3)
    assert clipfrac == pytest.approx(2 / 3) and ratio == pytest.approx(1.0)
    v = A.value_loss(torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]),
                     torch.ones(1, 1, dtype=torch.bool), 0.5)
    assert float(v) == pytest.approx(0.5 * (0.5 - 2.0) ** 2)  # the clipped one is further
    kl = A.AdaptiveKL(0.1, target=1.0, horizon=100)
    kl.update(3.0, 50)  # error clipped to +20%, scaled by 50/100
    assert kl.coef == pytest.approx(0.1 * 1.1)
    fixed = A.AdaptiveKL(0.1, target=None, horizon=100)
    fixed.update(9.0, 50)
    assert fixed.coef == 0.1


# -- the stage -------------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["base", "sft"])
def test_kl_is_zero_and_ratio_one_before_the_first_update(tmp_path, tiny_model_dir, sft_run,
                                                          start):
    extra = {"model": {"adapter": str(sft_run)}} if start == "sft" else {}
    r, _ = _recipe(tmp_path / "ppo", tiny_model_dir, ppo={"advantage": "gae"}, **extra)
    r.setup()
    rows = [r.train_samples[i] for i in range(4) for _ in range(2)]
    torch.manual_seed(0)
    roll = _rollout(r, rows)
    parts = partition(len(rows), r.cfg.train.batch_size, seed=1)
    scored = r._score(roll, parts)
    assert torch.equal(scored.kl, torch.zeros_like(scored.kl))
    assert roll.mask.sum() > 0
    with torch.no_grad():  # the first mini-batch of the first epoch: ratio exactly 1
        mb, w = minibatch(roll.batch, parts[0], r.device)
        out = r.net("logprobs", mb, temperature=r.cfg.ppo.temperature)
        logp = dense(out["logp"].float(), roll.mask[parts[0], :w])
    assert torch.equal(logp, scored.old[parts[0], :w])


def test_reference_is_the_starting_model(tmp_path, tiny_model_dir, sft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r, _ = _recipe(tmp_path / "ppo", tiny_model_dir, model={"adapter": str(sft_run)},
                   train={"max_steps": 2, "lr": 5e-2})
    r.setup()
    r.train()
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                    str(sft_run)).eval()
    ids = torch.tensor([r.train_samples[0]["input_ids"]])
    with torch.no_grad():
        want = sft(input_ids=ids).logits[0, :-1]
        labels = ids.clone()
        got = r.net("logprobs", {"input_ids": ids, "labels": labels}, adapter="reference")
        ref = torch.log_softmax(want.float(), -1).gather(1, ids[0, 1:, None]).squeeze(1)
        now = r.net("logprobs", {"input_ids": ids, "labels": labels})
    assert torch.allclose(got["logp"], ref, atol=1e-5)
    assert not torch.allclose(now["logp"], ref, atol=1e-4), "the policy itself has moved"


def test_base_weights_never_move_and_metrics_are_per_iteration(tmp_path, tiny_model_dir):
    r, _ = _recipe(tmp_path / "ppo", tiny_model_dir, ppo={"advantage": "gae"},
                   train={"max_steps": 3, "eval_every": 2})
    r.setup()
    before = {n: p.detach().clone() for n, p in r.net.named_parameters()}
    r.train()
    r.cleanup()
    moved = set()
    for n, p in r.net.named_parameters():
        if not torch.equal(before[n], p.detach()):
            moved.add(n)
    assert moved and all(".policy." in n or n.startswith("heads.value") for n in moved), moved
    rows = metrics_rows(r.run_dir)
    train_rows = [x for x in rows if "loss" in x]
    assert [x["step"] for x in train_rows] == [1, 2, 3]
    need = {"reward_mean", "reward_std", "kl", "kl_k3", "entropy", "policy_loss", "value_loss",
            "clipfrac", "approx_kl", "ratio_mean", "response_len", "no_eos_frac", "rollout_s",
            "update_s"}
    assert all(need <= set(x) for x in train_rows), need - set(train_rows[0])
    evals = [x for x in rows if "eval_reward" in x]
    assert [x["step"] for x in evals] == [0, 2, 3] and all("eval_accuracy" in x for x in evals)
    assert (r.run_dir / "adapter_model.safetensors").exists()
    assert (r.run_dir / "value_head.safetensors").exists()


@pytest.mark.parametrize("advantage", ["gae", "rloo", "grpo"])
def test_a_toy_reward_rises(tmp_path, tiny_model_dir, advantage):
    """Starting the answer with a "t" pays: every estimator learns it in a few iterations."""
    reward = f"{_reward_file(tmp_path)}:starts_with_t"
    r, _ = _recipe(tmp_path / advantage, tiny_model_dir,
                   ppo={"advantage": advantage, "k": 8, "rollout_batch": 4, "epochs": 2,
                        "reward_fn": reward, "max_new_tokens": 4, "kl_coef": 0.0},
                   train={"max_steps": 16, "lr": 2e-2, "batch_size": 16, "warmup_steps": 0,
                          "schedule": "constant"},
                   lora={"r": 8, "alpha": 16})
    r.setup()
    r.train()
    rewards = [x["reward_mean"] for x in metrics_rows(r.run_dir) if "reward_mean" in x]
    assert len(rewards) == 16
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.2, rewards


def test_cli_ppo_checks_its_inputs(tmp_path, tiny_model_dir, capsys):
    _, path = _recipe(tmp_path / "ppo", tiny_model_dir)
    assert cli(["ppo", str(path), "ppo.reward_fn=null"]) == 2
    assert "set exactly one" in capsys.readouterr().err
    assert cli(["ppo", str(path), "ppo.advantage=grpo", "ppo.k=1"]) == 2
    assert "ppo.k must be >= 2 for ppo.advantage=grpo" in capsys.readouterr().err
    assert cli(["ppo", str(path), "ppo.reward_fn=nosuchmodule:f"]) == 2
    assert "importing nosuchmodule failed" in capsys.readouterr().err
    bad = f"{tmp_path / 'ppo' / 'toy_reward.py'}:wrong_length"
    assert cli(["ppo", str(path), f"ppo.reward_fn={bad}", "overwrite=true"]) == 2
    assert "returned 1 values for 4 responses" in capsys.readouterr().err  # the first eval
    with pytest.raises(ConfigError, match="ppo.temperature must be > 0"):
        load_config(path, ["ppo.temperature=0"])


def test_ppo_against_a_reward_model_on_the_same_base(tmp_path, tiny_model_dir):
    """The reward model is one more frozen adapter and head on the shared base; the value
    head starts as the reward head."""
    from test_reward import _cfg_sections, _pairs

    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    rm_recipe = make_recipe(rm_dir, tiny_model_dir, write_jsonl(rm_dir / "p.jsonl", _pairs()),
                            **_cfg_sections(model={"dtype": "float32"}, train={"max_steps": 4}))
    assert cli(["rm", str(rm_recipe)]) == 0
    r, _ = _recipe(tmp_path / "ppo", tiny_model_dir,
                   ppo={"reward_fn": None, "reward_model": str(rm_dir / "run"), "advantage": "gae"},
                   train={"max_steps": 2})
    r.setup()
    assert set(r.net.model.peft_config) == {"policy", "reward"}
    assert r.rm.adapter == "reward"
    assert torch.equal(r.net.heads["value"].linear.weight, r.net.heads["reward"].linear.weight)
    from llamatune.score import load_reward_model

    alone = load_reward_model(str(rm_dir / "run"))
    conv = [{"role": "user", "content": "tell me about cat"},
            {"role": "assistant", "content": "the cat is blue thanks"}]
    assert r.rm.score([conv])[0] == pytest.approx(alone.score([conv])[0], abs=1e-5)
    r.train()
    rows = metrics_rows(r.run_dir)
    assert [x["step"] for x in rows if "loss" in x] == [1, 2]
    assert "eval_reward" in rows[-1] and "eval_accuracy" not in rows[-1]
    reward_params = {n: p for n, p in r.net.named_parameters() if ".reward." in n
                     or n.startswith("heads.reward")}
    assert reward_params and not any(p.requires_grad for p in reward_params.values())


@pytest.mark.parametrize("max_kl", [None, 50.0])
def test_one_pass_update_equals_scoring_first(tmp_path, tiny_model_dir, monkeypatch, max_kl):
    """GRPO without a KL penalty, one epoch, one optimizer step an iteration: the update's
    own forward gives the old log-probs (no scoring pass), with the same result as scoring
    first; the reference runs only when ppo.max_kl needs the KL."""
    import safetensors.torch as st

    def run(name, force_two_pass):
        r, _ = _recipe(tmp_path / name, tiny_model_dir,
                       ppo={"advantage": "grpo", "k": 4, "rollout_batch": 4, "kl_coef": 0.0,
                            "max_kl": max_kl, "max_new_tokens": 5},
                       train={"max_steps": 3, "batch_size": 8, "grad_accum": 2,
                              "warmup_steps": 0})
        r.setup()
        calls = []
        real = r.net.forward
        monkeypatch.setattr(r.net, "forward", lambda *a, **k: calls.append(k.get("adapter"))
                            or real(*a, **k))
        if force_two_pass:
            monkeypatch.setattr(r, "_one_pass", lambda n: False)
        else:
            assert r._one_pass(2)
        r.train()
        r.cleanup()
        rows = [x for x in metrics_rows(r.run_dir) if "reward_mean" in x]
        return rows, st.load_file(r.run_dir / "adapter_model.safetensors"), calls

    one, w1, calls1 = run("one", False)
    two, w2, calls2 = run("two", True)
    assert len(calls1) < len(calls2)
    assert ("base" in calls1) == (max_kl is not None)  # the reference only for the bound
    for a, b in zip(one, two):
        assert a["ratio_mean"] == 1.0 and a["approx_kl"] == 0.0
        for key in ("reward_mean", "policy_loss", "entropy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        assert ("kl" in a) == (max_kl is not None)
        if max_kl is not None:
            assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-6)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-6), k


def test_entropy_bonus_and_kl_loss_act_and_keep_the_one_pass(tmp_path, tiny_model_dir):
    """``ppo.entropy_coef`` keeps the policy's entropy up and ``ppo.kl_loss_coef`` keeps its KL
    to the reference down, against the same run without them; both keep the one-pass update
    (ratios exactly 1) and report their terms in the rows."""
    reward = f"{_reward_file(tmp_path)}:starts_with_t"

    def run(name, **ppo):
        r, _ = _recipe(tmp_path / name, tiny_model_dir,
                       ppo={"advantage": "grpo", "k": 8, "rollout_batch": 4, "kl_coef": 0.0,
                            "max_kl": 1e9, "reward_fn": reward, "max_new_tokens": 4, **ppo},
                       train={"max_steps": 10, "lr": 2e-2, "batch_size": 16, "grad_accum": 2,
                              "warmup_steps": 0, "schedule": "constant"},
                       lora={"r": 8, "alpha": 16})
        r.setup()
        assert r._one_pass(2)
        r.train()
        r.cleanup()
        return [x for x in metrics_rows(r.run_dir) if "reward_mean" in x]

    plain = run("plain")
    ent = run("ent", entropy_coef=0.5)
    kl = run("kl", kl_loss_coef=2.0)
    assert "entropy_bonus" not in plain[0] and "kl_loss" not in plain[0]
    for rows, key in ((ent, "entropy_bonus"), (kl, "kl_loss")):
        assert all(x["ratio_mean"] == 1.0 and key in x for x in rows)

    def late(rows, key):
        return sum(x[key] for x in rows[-4:]) / 4

    assert late(ent, "entropy") > late(plain, "entropy") + 0.1, (ent, plain)
    assert late(kl, "kl") < 0.7 * late(plain, "kl"), (kl, plain)
    # The bonus is the entropy the update measured, the KL term k3 of the same log-probs.
    assert ent[0]["entropy_bonus"] == pytest.approx(ent[0]["entropy"], rel=0.05)
    assert kl[0]["kl_loss"] == pytest.approx(0.0, abs=1e-6)  # the first update starts at ref


def test_kl_loss_acts_under_gae(tmp_path, tiny_model_dir):
    """Under GAE the value loss joins the policy loss without dropping the KL anchor."""
    reward = f"{_reward_file(tmp_path)}:starts_with_t"

    def run(name, **ppo):
        r, _ = _recipe(tmp_path / name, tiny_model_dir,
                       ppo={"advantage": "gae", "rollout_batch": 8, "kl_coef": 0.0,
                            "max_kl": 1e9, "reward_fn": reward, "max_new_tokens": 4, **ppo},
                       train={"max_steps": 10, "lr": 2e-2, "batch_size": 8, "grad_accum": 1,
                              "warmup_steps": 0, "schedule": "constant"},
                       lora={"r": 8, "alpha": 16})
        r.setup()
        r.train()
        r.cleanup()
        rows = [x for x in metrics_rows(r.run_dir) if "reward_mean" in x]
        return sum(x["kl"] for x in rows[-4:]) / 4, rows

    plain, _ = run("plain")
    kl, rows = run("kl", kl_loss_coef=2.0)
    assert all("kl_loss" in x and "value_loss" in x for x in rows)
    assert kl < 0.7 * plain, (kl, plain)
