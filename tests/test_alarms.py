"""Training-health alarms (llamatune.health): every rule on synthetic rows, tripped and not,
then real tiny-model runs that trip them once, record them and show them in the report."""

import json

from conftest import WORDS, make_recipe, metrics_rows, write_jsonl
from test_reward import _pairs

from llamatune import health
from llamatune.cli import main as cli
from llamatune.health import Monitor, check_rows


def _ppo(n, **series):
    """``n`` PPO rows; each keyword is a function of the row index giving that figure."""
    return [{"step": i + 1, "loss": 0.1, **{k: f(i) for k, f in series.items()}}
            for i in range(n)]


def _names(alarms):
    return [a["alarm"] for a in alarms]


# -- the rules on synthetic rows --------------------------------------------------------------

def test_negative_kl_is_smoothed_over_a_window():
    tripped = check_rows(_ppo(6, kl=lambda i: -0.2 if i >= 3 else 0.0), "ppo")
    # Step 4 alone is -0.2 (window mean -0.067); steps 3-5 average -0.133.
    assert _names(tripped) == ["negative_kl"] and tripped[0]["step"] == 5
    assert "ppo.top_p" in tripped[0]["message"]
    assert tripped[0]["figures"]["kl"] == round(-0.4 / 3, 6)
    # One very negative row among zeros, or a small negative mean: estimator noise.
    assert check_rows(_ppo(6, kl=lambda i: -0.25 if i == 3 else 0.0), "ppo") == []
    assert check_rows(_ppo(6, kl=lambda i: -0.05), "ppo") == []
    assert check_rows(_ppo(6, kl=lambda i: -0.2), "dpo") == [], "rules belong to their stage"


def test_entropy_collapse_by_floor_or_fraction_of_the_start():
    falling = _ppo(8, entropy=lambda i: 2.0 if i < 3 else 0.08)  # 4% of the start
    assert _names(check_rows(falling, "ppo")) == ["entropy_collapse"]
    low = _ppo(8, entropy=lambda i: 0.3 if i < 3 else 0.01)  # under the floor
    assert _names(check_rows(low, "ppo")) == ["entropy_collapse"]
    assert check_rows(_ppo(8, entropy=lambda i: 2.0 if i < 3 else 0.5), "ppo") == []


def test_response_length_collapse_and_limit():
    collapse = check_rows(_ppo(6, response_len=lambda i: 20.0 if i < 3 else 1.0), "ppo")
    assert _names(collapse) == ["response_collapse"] and collapse[0]["step"] == 6
    assert check_rows(_ppo(6, response_len=lambda i: 20.0 if i < 3 else 3.0), "ppo") == []
    grow = _ppo(6, response_len=lambda i: 10.0 if i < 3 else 31.5)
    hit = check_rows(grow, "ppo", {"max_new_tokens": 32})
    assert _names(hit) == ["response_at_limit"] and "ppo.max_new_tokens" in hit[0]["message"]
    assert check_rows(grow, "ppo") == [], "no limit known, no limit rule"
    at_start = _ppo(6, response_len=lambda i: 32.0)  # never ended from the first iteration
    assert check_rows(at_start, "ppo", {"max_new_tokens": 32}) == []


def test_no_eos_rising_needs_a_high_share_well_above_the_start():
    assert _names(check_rows(_ppo(6, no_eos_frac=lambda i: 0.1 if i < 3 else 0.8),
                             "ppo")) == ["no_eos_rising"]
    assert check_rows(_ppo(6, no_eos_frac=lambda i: 0.9 if i < 3 else 1.0), "ppo") == []
    assert check_rows(_ppo(6, no_eos_frac=lambda i: 0.1 if i < 3 else 0.45), "ppo") == []


def _dpo(n, chosen, margin, accuracy=lambda i: 0.9):
    return [{"step": i + 1, "loss": 0.5, "rewards_chosen": chosen(i), "reward_margin": margin(i),
             "reward_accuracy": accuracy(i)} for i in range(n)]


def test_chosen_rewards_falling_while_the_margin_rises():
    rows = _dpo(10, chosen=lambda i: -0.3 * i, margin=lambda i: 0.5 * i)
    hit = check_rows(rows, "dpo")
    assert _names(hit) == ["chosen_falling"] and hit[0]["step"] == 10
    assert "likelihood displacement" in hit[0]["message"]
    assert check_rows(_dpo(10, chosen=lambda i: -0.3 * i, margin=lambda i: -0.1 * i), "dpo") == []
    assert check_rows(_dpo(10, chosen=lambda i: -0.05 * i, margin=lambda i: i), "dpo") == []


def test_dpo_reward_accuracy_at_chance_after_enough_steps():
    at_chance = _dpo(30, chosen=lambda i: 0.0, margin=lambda i: 0.0,
                     accuracy=lambda i: (0.25, 0.75)[i % 2])
    hit = check_rows(at_chance, "dpo")
    assert _names(hit) == ["dpo_chance"] and hit[0]["step"] == health.DPO_CHANCE_MIN_STEP
    assert check_rows(at_chance[:15], "dpo") == [], "too early to tell"
    assert check_rows(_dpo(30, chosen=lambda i: 0.0, margin=lambda i: 0.0,
                           accuracy=lambda i: (0.5, 1.0)[i % 2]), "dpo") == []


def test_reward_model_at_or_below_chance_at_the_end():
    rows = [{"step": 1, "loss": 0.7, "accuracy": 0.5}, {"step": 4, "eval_accuracy": 0.9},
            {"step": 8, "eval_accuracy": 0.52}]
    ctx = {"eval_pairs": 40, "pairs": 100, "identical_pairs": 37, "max_length": 32}
    hit = check_rows(rows, "rm", ctx)
    assert _names(hit) == ["rm_chance"] and hit[0]["step"] == 8
    assert "37 of 100 training pairs" in hit[0]["message"] and "labels swapped" in hit[0]["message"]
    assert check_rows(rows, "rm", ctx, finished=False) == [], "the end rule waits for the end"
    assert check_rows(rows, "rm", {**ctx, "eval_pairs": 10}) == [], "too few pairs to tell"
    swapped = rows[:-1] + [{"step": 8, "eval_accuracy": 0.1}]
    assert _names(check_rows(swapped, "rm", ctx)) == ["rm_below_chance"]
    assert check_rows(rows[:-1], "rm", ctx) == []


def test_eval_loss_rising_three_evaluations_in_a_row():
    def rows(losses):
        return [{"step": 10 * (i + 1), "eval_loss": v} for i, v in enumerate(losses)]

    hit = check_rows(rows([1.0, 0.9, 0.95, 1.0, 1.1]), "sft")
    assert _names(hit) == ["eval_loss_rising"] and hit[0]["step"] == 50
    assert "0.9000 -> 0.9500 -> 1.0000 -> 1.1000" in hit[0]["message"]
    assert check_rows(rows([1.0, 1.1, 1.05, 1.2, 1.3]), "sft") == []  # two rises, then a dip
    assert check_rows(rows([1.0, 1.00001, 1.00002, 1.00003]), "sft") == [], "rounding, not a rise"


def test_an_alarm_trips_once_and_a_resumed_run_remembers_it(tmp_path):
    rows = _ppo(12, kl=lambda i: -0.5)
    assert _names(check_rows(rows, "ppo")) == ["negative_kl"]
    path = tmp_path / "metrics.jsonl"
    mon = Monitor("ppo")
    with open(path, "w") as f:
        for r in rows[:6]:
            f.write(json.dumps(r) + "\n")
            for a in mon.observe(r):
                f.write(json.dumps(a) + "\n")
    again = Monitor("ppo")
    again.resume(path, 6)
    assert [a for r in rows[6:] for a in again.observe(r)] == []
    fresh = Monitor("ppo")
    fresh.resume(path, 2)  # resumed before the alarm: it trips again, at the same step
    assert [a["step"] for r in rows[2:] for a in fresh.observe(r)] == [3]


# -- real tiny-model runs -------------------------------------------------------------------


def _report(run, capsys):
    capsys.readouterr()
    assert cli(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert cli(["report", str(run), "--json"]) == 0
    return out, json.loads(capsys.readouterr().out)


def test_sft_eval_loss_rising_trips_once_is_recorded_and_reported(tmp_path, tiny_model_dir,
                                                                 capsys):
    # Trained on "yes yes yes", evaluated on "no no no": the held-out loss can only rise.
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"instruction": f"tell me about {w}", "input": "", "output": "yes yes yes"}
        for w in WORDS[:32]])
    held = write_jsonl(tmp_path / "held.jsonl", [
        {"instruction": f"tell me about {w}", "input": "", "output": "no no no"}
        for w in WORDS[:4]])
    recipe = make_recipe(tmp_path, tiny_model_dir, train, model={"dtype": "float32"},
                         data={"eval_path": str(held)},
                         train={"max_steps": 6, "eval_every": 1, "lr": 2e-2})
    assert cli(["sft", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert out.count("ALARM eval_loss_rising at step ") == 1
    run = tmp_path / "run"
    rows = metrics_rows(run)
    alarms = [r for r in rows if "alarm" in r]
    assert _names(alarms) == ["eval_loss_rising"] and alarms[0]["step"] == 5
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6], "rows unchanged"
    text, fig = _report(run, capsys)
    assert "ALARM eval_loss_rising at step 5 (recorded)" in text
    assert _names(fig["alarms"]) == ["eval_loss_rising"]
    # The same run with the alarms off: nothing printed, nothing recorded.
    assert cli(["sft", str(recipe), "train.alarms=false", f"output_dir={tmp_path / 'off'}"]) == 0
    assert "ALARM" not in capsys.readouterr().out
    assert not [r for r in metrics_rows(tmp_path / "off") if "alarm" in r]
    # ...and the replay finds what the live monitor found.
    assert _names(health.replay(tmp_path / "off")) == ["eval_loss_rising"]


def test_train_alarms_must_be_a_boolean(tmp_path, tiny_model_dir, alpaca_file, capsys):
    recipe = make_recipe(tmp_path, tiny_model_dir, alpaca_file)
    assert cli(["sft", str(recipe), "train.alarms=maybe"]) == 2
    err = capsys.readouterr().err
    assert "train.alarms" in err and "Traceback" not in err


def _pref(root, model_dir, rows, stage, **train):
    data = write_jsonl(root / "pref.jsonl", rows)
    return make_recipe(root, model_dir, data, stage=stage,
                       data={"format": "preference", "template": "chatml",
                             "eval_group_by": "topic", "eval_split": 2},
                       train={"batch_size": 4, **train}, model={"dtype": "float32"})


def test_reward_model_on_half_swapped_pairs_is_at_chance(tmp_path, tiny_model_dir, capsys):
    # Every other pair has chosen and rejected the other way round: nothing to learn.
    rows = [dict(p, chosen=p["rejected"], rejected=p["chosen"]) if i % 2 else p
            for i, p in enumerate(_pairs(n_per_topic=10))]
    recipe = _pref(tmp_path, tiny_model_dir, rows, "rm", max_steps=8, lr=2e-2)
    assert cli(["rm", str(recipe)]) == 0
    assert capsys.readouterr().out.count("ALARM rm_chance at step 8") == 1
    run = tmp_path / "run"
    alarms = [r for r in metrics_rows(run) if "alarm" in r]
    assert _names(alarms) == ["rm_chance"] and alarms[0]["figures"]["eval_pairs"] == 20
    assert "0 of 60 training pairs" in alarms[0]["message"]
    text, _ = _report(run, capsys)
    assert "ALARM rm_chance at step 8 (recorded)" in text


def test_pair_context_counts_pairs_identical_after_truncation():
    same = {"chosen_ids": [1, 2, 3], "rejected_ids": [1, 2, 3]}
    other = {"chosen_ids": [1, 2, 3], "rejected_ids": [1, 2, 4]}
    ctx = health.pair_context([same, other, same], [other], 3)
    assert ctx == {"pairs": 3, "identical_pairs": 2, "eval_pairs": 1, "max_length": 3}
    rows = [{"step": 2, "eval_accuracy": 0.0}]
    msg = check_rows(rows, "rm", {**ctx, "eval_pairs": 20})[0]["message"]
    assert "2 of 3 training pairs have the same chosen and rejected token ids" in msg


def test_dpo_normal_run_trips_nothing(tmp_path, tiny_model_dir, capsys):
    recipe = _pref(tmp_path, tiny_model_dir, _pairs(), "dpo", max_steps=12, lr=5e-2)
    assert cli(["dpo", str(recipe)]) == 0
    assert "ALARM" not in capsys.readouterr().out
    run = tmp_path / "run"
    assert not [r for r in metrics_rows(run) if "alarm" in r] and health.replay(run) == []
    assert len([r for r in metrics_rows(run) if "reward_margin" in r]) == 12


def test_ppo_alarm_on_a_real_run(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The live path of a PPO run: the floor raised so the tiny random policy's entropy (about
    5.6 nats) counts as collapsed; with the shipped thresholds the same rows trip nothing."""
    from test_ppo import _prompts, _reward_file

    monkeypatch.setattr(health, "ENTROPY_FLOOR", 50.0)
    recipe = make_recipe(tmp_path, tiny_model_dir, _prompts(tmp_path), stage="ppo",
                         data={"format": "prompts", "template": "chatml", "eval_split": 0},
                         ppo={"reward_fn": f"{_reward_file(tmp_path)}:starts_with_t",
                              "rollout_batch": 4, "k": 2, "max_new_tokens": 6,
                              "sample_every": 0, "advantage": "grpo"},
                         train={"max_steps": 7, "batch_size": 8, "lr": 1e-2},
                         model={"dtype": "float32"})
    assert cli(["ppo", str(recipe)]) == 0
    assert capsys.readouterr().out.count("ALARM entropy_collapse at step 6") == 1
    run = tmp_path / "run"
    rows = metrics_rows(run)
    assert _names([r for r in rows if "alarm" in r]) == ["entropy_collapse"]
    text, _ = _report(run, capsys)
    assert "ALARM entropy_collapse at step 6 (recorded)" in text
    monkeypatch.undo()
    assert check_rows(rows, "ppo", {"max_new_tokens": 6}) == []
