"""``llamatune STAGE RECIPE --accelerate_config NAME``: the stage under ``accelerate launch``.

The CLI's side of running several processes: the packaged accelerate configs
(``llamatune/launch/*.yaml``, listed by ``llamatune ls --accelerate``), a check of a config
before accelerate's launcher would fail on it with a traceback, and the launcher run as a
subprocess. What each launched process then does is :mod:`llamatune.dist`'s.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llamatune.errors import UserError

__all__ = ["LAUNCH_DIR", "launch", "launch_config", "launch_configs"]

LAUNCH_DIR = Path(__file__).resolve().parent / "launch"
"""The packaged accelerate configs (``llamatune ls --accelerate``)."""


def launch_configs() -> dict[str, Path]:
    """Packaged accelerate config name to file."""
    return {p.stem: p for p in sorted(LAUNCH_DIR.glob("*.yaml"))}


def launch_config(name: str) -> Path:
    """A packaged config by name, or a config file by path.

    Raises:
        UserError: Neither.
    """
    configs = launch_configs()
    if name in configs:
        return configs[name]
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise UserError(f"--accelerate_config {name}: no such file and not a packaged config "
                    f"({', '.join(configs)}; `llamatune ls --accelerate`).")


def _check_launch_config(path: Path) -> None:
    """Refuse a config accelerate's launcher would fail on with a traceback (no DeepSpeed).

    Raises:
        UserError: The file is not a YAML mapping, or asks for DeepSpeed without it installed.
    """
    import importlib.util

    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--accelerate_config {path}: not a readable YAML file ({e}).") from None
    if not isinstance(data, dict):
        raise UserError(f"--accelerate_config {path}: an accelerate config is a YAML mapping.")
    if (str(data.get("distributed_type", "")).upper() == "DEEPSPEED"
            and importlib.util.find_spec("deepspeed") is None):
        raise UserError(f"--accelerate_config {path}: asks for DeepSpeed, which is not installed; "
                        "`pip install deepspeed` (or `pip install llamatune[deepspeed]`), or use "
                        "the ddp or fsdp2 config.")


def launch(config: str, num_processes: int | None, argv: list[str]) -> int:
    """Run ``accelerate launch --config_file CONFIG -m llamatune ARGV`` and wait for it.

    Args:
        config: A packaged config name or a config file.
        num_processes: Overrides the config's process count.
        argv: The llamatune command line to run in every process (``sft RECIPE k=v ...``).

    Returns:
        The launcher's exit code (after a stop signal the caller asks
        :func:`llamatune._stop.received`).

    The launcher runs in a session of its own, so a terminal's Ctrl-C reaches this process
    only, which passes a stop signal on to the workers (:func:`llamatune._stop.forwarding`):
    they agree on a step, write a checkpoint and exit; a second signal ends them all at once.
    The command line is handed to the workers (``LLAMATUNE_ARGV``) for their resume message.
    """
    import json
    import subprocess

    from llamatune import _stop

    path = launch_config(config)
    _check_launch_config(path)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    cmd += ["-m", "llamatune", *argv]
    print("launching: accelerate launch " + " ".join(cmd[4:]), flush=True)
    own = [*argv, "--accelerate_config", config] + (
        ["--num_processes", str(num_processes)] if num_processes is not None else [])
    env = dict(os.environ, LLAMATUNE_ARGV=json.dumps(own))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    with _stop.forwarding(proc):
        return proc.wait()
