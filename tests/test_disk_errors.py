"""A full disk, a read-only file system, a missing permission: nothing good is lost.

Each case injects the OS error into the real write call (safetensors' ``save_file``, the
append to ``metrics.jsonl``, the GGUF and Modelfile writes) and runs the command through the
CLI, as a user would: the files that were there before stay byte-equal, no temporary file or
folder is left, and the command exits 2 with one paragraph on stderr, no traceback. (The
tests run as root, where ``chmod 0o555`` stops nothing, so the read-only and permission
cases are injected the same way.)
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
from conftest import WORDS, make_recipe, metrics_rows, write_jsonl
from safetensors import SafetensorError

from llamatune import _atomic
from llamatune.cli import main as cli


def _digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (recursively) and the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _temporaries(folder: Path) -> list[str]:
    """Names that only a write in progress leaves (``.NAME.tmp``, ``.X.merging-PID``, ...)."""
    return sorted(p.name for p in folder.rglob(".*") if p.name != ".gitignore")


def _failing_save_file(monkeypatch, exc, nth: int = 1):
    """Make the ``nth`` safetensors write from now on write half a file, then fail with ``exc``."""
    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) != nth:
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 100)  # the part the disk took
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return calls


def _enospc(path="a file"):
    return SafetensorError("Error while serializing: I/O error: No space left on device "
                           f"(os error 28) at path \"{path}\"")


def _data(root: Path) -> Path:
    rows = [{"instruction": f"tell me about {w}", "input": "", "output": f"sure {w} is here"}
            for w in WORDS[:24]]
    return write_jsonl(root / "alpaca.jsonl", rows)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """A finished 4-step SFT run with checkpoint-2 and its final adapter; (recipe, run)."""
    root = tmp_path_factory.mktemp("base")
    recipe = make_recipe(root, tiny_model_dir, _data(root),
                         train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 1})
    assert cli(["sft", str(recipe)]) == 0
    return recipe, root / "run"


def _copy_run(finished_run, tmp_path) -> tuple[Path, Path]:
    recipe, run = finished_run
    shutil.copytree(run, tmp_path / "run")
    return recipe, tmp_path / "run"


def _one_clear_error(capsys, *words) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_checkpoint_on_a_full_disk_keeps_the_older_one_and_prunes_nothing(
        finished_run, tmp_path, capsys, monkeypatch):
    recipe, run = _copy_run(finished_run, tmp_path)
    before = _digest(run)
    # Resumed from checkpoint-2 to 6 steps: checkpoint-4 is due at step 4; its optimizer
    # state (the second safetensors file of the checkpoint) meets the full disk.
    calls = _failing_save_file(monkeypatch, _enospc(), nth=2)
    rc = cli(["sft", str(recipe), "resume=true", f"output_dir={run}", "train.max_steps=6"])
    assert rc == 2 and len(calls) == 2
    assert "optimizer" in calls[-1]
    msg = _one_clear_error(capsys, "checkpoint-4", "the disk is full", "resume=true")
    assert "checkpoint-2" in msg  # where to continue from
    after = _digest(run)
    kept = [k for k in before if k.startswith("checkpoint-2/") or k.startswith("adapter_")]
    assert kept and all(after[k] == before[k] for k in kept)  # keep_checkpoints=1 pruned nothing
    assert not (run / "checkpoint-4").exists()
    assert _temporaries(run) == []
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows if "loss" in json.loads(r)] == [1, 2, 3, 4]


def test_final_adapter_without_permission_keeps_the_earlier_one(
        finished_run, tmp_path, capsys, monkeypatch):
    recipe, run = _copy_run(finished_run, tmp_path)
    before = _digest(run)
    # Resumed from checkpoint-2, same 4 steps: no checkpoint is due, the final adapter is the
    # first safetensors write, over the adapter the first run left.
    _failing_save_file(monkeypatch, PermissionError(errno.EACCES, "Permission denied",
                                                    str(run / ".final.tmp" / "x")))
    rc = cli(["sft", str(recipe), "resume=true", f"output_dir={run}"])
    assert rc == 2
    _one_clear_error(capsys, "the final adapter", "permission is denied", str(run))
    after = _digest(run)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert after[name] == before[name]
    assert _temporaries(run) == []


def test_metrics_append_on_a_full_disk_stops_the_run_with_whole_rows(
        tmp_path, tiny_model_dir, capsys, monkeypatch):
    recipe = make_recipe(tmp_path, tiny_model_dir, _data(tmp_path),
                         train={"max_steps": 5, "log_every": 1})
    real_open, appends = open, []

    class HalfFull:
        """A file the disk takes 10 bytes of, then refuses."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, *a):
            return self.f.seek(*a)

        def truncate(self, size):
            return self.f.truncate(size)

        def write(self, data):
            self.f.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if Path(path).name == "metrics.jsonl" and "a" in mode:
            appends.append(path)
            if len(appends) == 3:
                return HalfFull(f)
        return f

    monkeypatch.setattr(_atomic, "open", fake_open, raising=False)
    assert cli(["sft", str(recipe)]) == 2
    _one_clear_error(capsys, "metrics.jsonl", "the disk is full")
    rows = metrics_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]  # the torn third row was cut off


@pytest.mark.parametrize("exc", [_enospc(), OSError(errno.EROFS, "Read-only file system")],
                         ids=["enospc", "erofs"])
def test_merge_that_cannot_be_written_leaves_nothing(finished_run, tmp_path, capsys,
                                                     monkeypatch, exc):
    _, run = finished_run
    before = _digest(run)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "older").mkdir()
    (tmp_path / "models" / "older" / "model.safetensors").write_bytes(b"earlier merge")
    import transformers.modeling_utils as mu

    real = mu.safe_save_file

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise exc

    monkeypatch.setattr(mu, "safe_save_file", save_file)
    out = tmp_path / "models" / "merged"
    assert cli(["merge", str(run), "--out", str(out), "--no-verify"]) == 2
    monkeypatch.setattr(mu, "safe_save_file", real)
    reason = "the disk is full" if _atomic.os_errno(exc) == errno.ENOSPC else "read-only"
    _one_clear_error(capsys, "the merged model", reason, "--out")
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["older"]
    assert (tmp_path / "models" / "older" / "model.safetensors").read_bytes() == b"earlier merge"
    assert _digest(run) == before


@pytest.mark.parametrize("where", ["gguf", "modelfile"])
def test_export_that_cannot_be_written_keeps_the_earlier_gguf(tiny_model_dir, tmp_path, capsys,
                                                              monkeypatch, where):
    import llamatune.export as export

    out = tmp_path / "m.gguf"
    assert cli(["export", str(tiny_model_dir), "--gguf", str(out), "--no-verify"]) == 0
    before = _digest(tmp_path)
    assert set(before) == {"m.gguf", "m.Modelfile"}
    capsys.readouterr()
    if where == "gguf":  # the disk fills while the GGUF is written
        real = export.write_gguf

        def write_gguf(folder, path, gguf_type, name):
            real(folder, path, gguf_type, name)
            Path(path).write_bytes(Path(path).read_bytes()[:1000])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(export, "write_gguf", write_gguf)
        words = ("the disk is full", "m.gguf", "--gguf")
    else:  # the GGUF is complete; the Modelfile beside it meets a read-only mount
        real = Path.write_text

        def write_text(self, text, *a, **k):
            if self.name.endswith(".Modelfile.tmp"):
                real(self, text[:5], *a, **k)
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real(self, text, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)
        words = ("the file system is read-only", "m.gguf")
    assert cli(["export", str(tiny_model_dir), "--gguf", str(out), "--no-verify"]) == 2
    _one_clear_error(capsys, *words)
    assert _digest(tmp_path) == before  # byte-equal, and no temporary file beside them


def test_an_unwrapped_write_error_is_one_paragraph(monkeypatch, capsys):
    import llamatune.cli as cli_module

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/plot.png")

    monkeypatch.setitem(cli_module._COMMANDS, "env", full)
    assert cli(["env"]) == 2
    _one_clear_error(capsys, "/data/run/plot.png", "the disk is full")

    def bug(args):
        raise OSError(errno.ENOENT, "No such file or directory")

    monkeypatch.setitem(cli_module._COMMANDS, "env", bug)
    with pytest.raises(FileNotFoundError):  # not a disk problem: a bug keeps its traceback
        cli(["env"])


def test_os_errors_in_words():
    assert _atomic.os_errno(_enospc("/x/.tmpAB")) == errno.ENOSPC
    assert _atomic.os_errno(SafetensorError("invalid header")) is None
    assert _atomic.reason(errno.EROFS) == "the file system is read-only"
    msg = _atomic.describe(_enospc("/x/.tmpAB"))
    assert msg is not None and msg.startswith("/x/.tmpAB: the disk is full")
