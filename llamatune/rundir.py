"""Run directories: how stages write them and how every command reads them back.

A finished run directory describes itself (DESIGN.md):

```
OUTPUT_DIR/
  config.yaml                resolved config, paths absolute, ``stage`` filled in
  metrics.jsonl              one JSON object per logged step
  adapter_model.safetensors  + adapter_config.json: the trainable adapter, as peft's default
  score_head.safetensors     a reward model's head (value_head... for PPO), when the stage has one
  tokenizer files + chat_template.jinja
  checkpoint-STEP/           complete checkpoints only (written to a temp name, then renamed)
```

The top-level adapter always applies to the base alone (stages that start from another
run train a copy of its adapter), so ``merge``, ``export`` and ``generate`` treat every
stage's run alike. What a run cannot live without is copied in (for example the starting
adapter a DPO run's reference needs to resume), and the paths its config stores are
absolute, so commands work from any working directory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from llamatune._atomic import WriteError, agree, publish, reason, remove, writing
from llamatune.config import Config, ConfigError, load_config, read_recipe, save_config
from llamatune.errors import UserError

__all__ = [
    "ADAPTER_FILES",
    "REFERENCE_DIR",
    "Run",
    "absolute_config",
    "adapter_dir",
    "checkpoints",
    "create_output_dir",
    "head_file",
    "is_finished",
    "keep_copy",
    "latest_checkpoint",
    "prepare_output_dir",
    "read_run_config",
    "starting_adapter",
    "write_final",
    "write_run_files",
]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

_FIX = "choose another output_dir."
_FIX_FINAL = ("choose another output_dir; the last checkpoint-STEP (if train.save_every "
              "wrote one) is kept, and resume=true continues from it.")


def head_file(name: str) -> str:
    """The file a run keeps head ``name`` in (``score_head.safetensors``, ``value_head...``)."""
    return f"{name}_head.safetensors"

_FINISHED_MARKERS = ("adapter_model.safetensors", "model.safetensors")


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete ``checkpoint-STEP`` folders (those with ``trainer_state.json``), oldest first."""
    out = []
    for p in Path(run_dir).glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if tail.isdigit() and (p / "trainer_state.json").is_file():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    ckpts = checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def is_finished(run_dir: Path) -> bool:
    """Whether a stage finished writing this run (config plus final weights)."""
    p = Path(run_dir)
    return (p / "config.yaml").is_file() and any((p / m).is_file() for m in _FINISHED_MARKERS)


def read_run_config(run_dir: str | os.PathLike) -> dict | None:
    """A run's ``config.yaml`` as the plain mapping it holds, unvalidated.

    For readers that only look at a key or two (the stage, ``train.alarms``) and must also
    work on a run still training or written by an older llamatune; :meth:`Run.open` reads a
    finished run strictly.

    Args:
        run_dir: The run directory.

    Returns:
        The mapping, or ``None`` when the file is missing or is not a readable YAML mapping.
    """
    try:
        return read_recipe(Path(run_dir) / "config.yaml")[0]
    except ConfigError:
        return None


def prepare_output_dir(cfg: Config) -> Path:
    """Check ``output_dir`` can be written and holds no run we would silently clobber.

    Creates nothing; call :func:`create_output_dir` once the inputs are validated.

    Raises:
        UserError: Not writable, or a finished run / checkpoints exist and neither
            ``resume`` nor ``overwrite`` is set.
    """
    out = Path(cfg.output_dir).expanduser()
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is not a folder" if probe.exists() and not probe.is_dir() else "is not writable"
        raise UserError(
            f"output_dir {cfg.output_dir} cannot be created: {probe} {why}; choose another "
            "folder with output_dir=PATH."
        )
    has_ckpt = bool(checkpoints(out)) if out.is_dir() else False
    finished = any((out / m).exists() for m in _FINISHED_MARKERS)
    if cfg.resume:
        if not has_ckpt:
            raise UserError(
                f"resume=true but output_dir {cfg.output_dir} has no complete checkpoint-STEP "
                "folder; set train.save_every to write checkpoints, or drop resume=true."
            )
    elif (has_ckpt or finished) and not cfg.overwrite:
        raise UserError(
            f"output_dir {cfg.output_dir} already holds a run. Continue it with resume=true, "
            "replace it with overwrite=true, or pick another output_dir."
        )
    return out


def create_output_dir(cfg: Config, out: Path) -> None:
    """Create the run directory (clearing an old run when ``overwrite`` is set).

    Raises:
        UserError: The folder cannot be created.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output_dir {cfg.output_dir} cannot be created: {reason(e.errno)} "
                        f"({e.strerror}); free space or choose another folder with "
                        "output_dir=PATH.") from None
    if cfg.overwrite and not cfg.resume:
        for p in out.glob("checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)
        for name in ("metrics.jsonl", *_FINISHED_MARKERS):
            (out / name).unlink(missing_ok=True)
        for f in out.glob(head_file("*")):
            f.unlink()


def _absolute(path: str | None) -> str | None:
    if not path:
        return path
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def absolute_config(cfg: Config, recipe_path: str | None = None) -> Config:
    """The config with every path that exists made absolute (data files found as training does).

    Built-in model names and hub ids stay as they are.
    """
    from llamatune.data.prepare import resolve_data_path

    d = cfg.data
    data = dataclasses.replace(
        d, path=resolve_data_path(d.path, recipe_path) if d.path else d.path,
        eval_path=resolve_data_path(d.eval_path, recipe_path) if d.eval_path else None)
    m = cfg.model
    model = dataclasses.replace(m, path=_absolute(m.path), tokenizer=_absolute(m.tokenizer),
                                adapter=_absolute(m.adapter))
    return dataclasses.replace(cfg, data=data, model=model,
                               output_dir=str(Path(cfg.output_dir).expanduser().resolve()))


def write_run_files(run_dir: Path, cfg: Config, tokenizer) -> None:
    """Resolved config plus tokenizer with the run's chat template: the folder describes itself."""
    from llamatune.data.jinja import to_jinja

    tmp = run_dir / ".run-files.tmp"
    remove(tmp)
    # Written aside and moved in: a resumed run's config.yaml and tokenizer are replaced
    # whole or not at all.
    with writing("the run's config.yaml and tokenizer", run_dir, _FIX, temporary=[tmp]):
        tmp.mkdir()
        save_config(cfg, tmp / "config.yaml")
        tokenizer.chat_template = to_jinja(tokenizer, cfg.data.template, cfg.data.system)
        tokenizer.save_pretrained(str(tmp))
        publish(tmp, run_dir)


def write_final(run_dir: Path, write) -> None:
    """Write the final weights through a temporary folder, then move them in place.

    A failure to write (a full disk, a read-only mount) leaves an earlier adapter there
    untouched and no temporary folder; every process then stops with one message.

    Args:
        run_dir: The run directory.
        write: ``callable(folder)`` that writes the files (adapter, heads, ...).

    Raises:
        WriteError: The files could not be written.
    """
    from llamatune import dist

    error = None
    with dist.on_main() as main:  # under a launcher, one process writes
        if main:
            tmp = run_dir / ".final.tmp"
            remove(tmp)
            try:
                with writing("the final adapter", run_dir, _FIX_FINAL, temporary=[tmp]):
                    tmp.mkdir()
                    write(tmp)
                    publish(tmp, run_dir)
            except WriteError as e:
                error = e
    agree(error)


def keep_copy(run_dir: Path, src: str, name: str, files=ADAPTER_FILES) -> Path:
    """Copy what the run needs from ``src`` into ``run_dir/name`` (atomically); return it.

    A copy already there (a resumed run) is kept, even if ``src`` has moved since.
    """
    from llamatune import dist

    dest = run_dir / name
    with dist.on_main() as main:  # under a launcher, one process copies; all then read it
        if main:
            _copy_in(src, dest, files)
    return dest


def _copy_in(src: str, dest: Path, files) -> None:
    if Path(src).resolve() == dest.resolve() or (dest / files[0]).is_file():
        return
    run_dir, name = dest.parent, dest.name
    tmp = run_dir / f".{name}.tmp"
    remove(tmp)
    with writing(f"the copy of {src} the run needs", dest, _FIX, temporary=[tmp]):
        tmp.mkdir()
        for f in files:
            if (Path(src) / f).is_file():
                shutil.copy2(Path(src) / f, tmp / f)
        os.replace(tmp, dest)


REFERENCE_DIR = "reference_adapter"
"""Where a DPO or PPO run keeps the copy of the starting adapter its reference needs."""


def starting_adapter(cfg: Config, command: str, kept: str | None = None) -> str | None:
    """The SFT run a stage starts from (``model.adapter``), checked before anything is written.

    Args:
        cfg: The stage's config.
        command: The stage command, for messages.
        kept: The name of the run's own copy of it (a resumed run uses that copy, even if the
            SFT run has moved since).

    Returns:
        The adapter folder, or ``None`` when the stage starts from the base.

    Raises:
        UserError: No adapter there, or it is a reward model.
    """
    if cfg.model.adapter is None:
        return None
    if kept is not None:
        copy = Path(cfg.output_dir).expanduser() / kept
        if cfg.resume and (copy / "adapter_config.json").is_file():
            return str(copy)
    folder = adapter_dir(cfg.model.adapter)
    if is_finished(folder) and Run.open(folder).stage == "rm":
        raise UserError(f"model.adapter {cfg.model.adapter} is a reward model; {command} starts "
                        "from an SFT run (a causal-LM adapter), or from the base with "
                        "model.adapter unset. To continue a reward run, use resume=true with its "
                        "output_dir.")
    return folder


def adapter_dir(path: str, key: str = "model.adapter") -> str:
    """A run directory or adapter folder holding ``adapter_config.json``, as an absolute path.

    Raises:
        UserError: No adapter there.
    """
    p = Path(path).expanduser()
    if (p / "adapter_config.json").is_file():
        return str(p.resolve())
    raise UserError(
        f"{key} {path}: no adapter_config.json there; point it at a finished llamatune run "
        "directory (or a peft adapter folder)."
    )


@dataclass
class Run:
    """A finished run directory, read back."""

    path: Path
    cfg: Config
    stage: str

    @classmethod
    def open(cls, path: str, stages: tuple[str, ...] | None = None, use: str = "") -> Run:
        """Read a finished run; ``stages`` limits which stages' runs are accepted.

        Args:
            path: The run directory.
            stages: Accepted stages (``None``: any).
            use: What the caller does with it, for messages ("merge", "generate").

        Raises:
            UserError: Not a finished run, an invalid config, or a stage not accepted.
        """
        p = Path(path).expanduser()
        if not p.is_dir():
            raise UserError(f"{path} is not a folder; give the run directory a training stage "
                            "wrote (its output_dir).")
        if not is_finished(p):
            missing = [f for f in ("config.yaml", *ADAPTER_FILES) if not (p / f).is_file()]
            raise UserError(
                f"{path} is not a finished llamatune run directory: {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing. Point it at the output_dir of "
                "a completed stage (a run still training has no final adapter yet).")
        try:
            cfg = load_config(p / "config.yaml")
        except ConfigError as e:
            raise UserError(f"{p}/config.yaml is not a valid run config: {e}") from None
        stage = cfg.stage or "sft"  # every stage records itself; a hand-made config: SFT
        if stages is not None and stage not in stages:
            raise UserError(f"{path} is a `{stage}` run; {use or 'this command'} takes runs of "
                            f"{', '.join(stages)}.")
        return cls(p.resolve(), cfg, stage)

    @property
    def has_adapter(self) -> bool:
        """Whether the run holds an adapter (else a full fine-tune's ``model.safetensors``)."""
        return (self.path / "adapter_config.json").is_file()

    def head(self, name: str) -> Path | None:
        """The file of head ``name`` (``score``, ``value``), if the run has it."""
        f = self.path / head_file(name)
        return f if f.is_file() else None
