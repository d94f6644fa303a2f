"""``train.report_to``: every metrics row also goes to TensorBoard, wandb or trackio; none is
required, and a missing one is refused before anything is written."""

import sys
import types

import pytest
from conftest import make_recipe, metrics_rows

from llamatune.cli import main as cli


class _Recorder:
    """Stands in for a tracker package: records init, log and finish calls."""

    def __init__(self):
        self.calls = []

    def module(self, name):
        mod = types.ModuleType(name)
        rec = self

        class Run:
            def log(self, figures, step=None):
                rec.calls.append(("log", dict(figures), step))

            def finish(self):
                rec.calls.append(("finish",))

        def init(**kw):
            rec.calls.append(("init", kw))
            return Run()

        mod.init = init
        mod.log = lambda figures, step=None: rec.calls.append(("log", dict(figures), step))
        mod.finish = lambda: rec.calls.append(("finish",))
        return mod


def _logged(calls):
    out = {}
    for kind, *rest in calls:
        if kind == "log":
            figures, step = rest
            out.setdefault(step, {}).update(figures)
    return out


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_every_metrics_row_reaches_the_tracker(name, tmp_path, tiny_model_dir, alpaca_file,
                                               monkeypatch):
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, name, rec.module(name))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: object() if n == name else real(n, *a))
    recipe = make_recipe(tmp_path, tiny_model_dir, alpaca_file, model={"dtype": "float32"},
                         train={"max_steps": 3, "eval_every": 3, "report_to": name})
    assert cli(["sft", str(recipe)]) == 0
    rows = metrics_rows(tmp_path / "run")
    init = [c for c in rec.calls if c[0] == "init"]
    assert len(init) == 1 and init[0][1]["name"] == "run"
    assert init[0][1]["config"]["train"]["max_steps"] == 3
    logged = _logged(rec.calls)
    for row in rows:  # each row's numbers, at its step (eval rows merge into their step)
        for k, v in row.items():
            if k != "step":
                assert logged[row["step"]][k] == pytest.approx(v)
    assert rec.calls[-1] == ("finish",)


def test_tensorboard_gets_scalars(tmp_path, tiny_model_dir, alpaca_file, monkeypatch):
    written = []

    class SummaryWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            written.append(("closed",))

    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: object() if n == "tensorboard" else real(n, *a))
    recipe = make_recipe(tmp_path, tiny_model_dir, alpaca_file, model={"dtype": "float32"},
                         train={"max_steps": 2, "report_to": ["tensorboard"]})
    assert cli(["sft", str(recipe)]) == 0
    assert written[0] == ("dir", str(tmp_path / "run" / "tensorboard"))
    assert [(t, s) for t, _, s in (w for w in written if len(w) == 3) if t == "loss"] == \
        [("loss", 1), ("loss", 2)]
    assert written[-1] == ("closed",)


def test_a_tracker_that_is_not_installed_is_refused_before_anything(tmp_path, tiny_model_dir,
                                                                     alpaca_file, monkeypatch,
                                                                     capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "wandb" else real(n, *a))
    recipe = make_recipe(tmp_path, tiny_model_dir, alpaca_file, train={"report_to": "wandb"})
    assert cli(["sft", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "pip install wandb" in err and "train.report_to" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert cli(["sft", str(recipe), "train.report_to=mlflow"]) == 2
    assert "'mlflow' is not a tracker" in capsys.readouterr().err
