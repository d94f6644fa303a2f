"""Reward functions for ``llamatune ppo``: rules for verifiable tasks, and loading your own.

``ppo.reward_fn: module:function`` (or ``path/to/file.py:function``) names a Python callable::

    def reward(prompts: list[str], responses: list[str], **fields) -> list[float]: ...

``prompts`` are the user turns, ``responses`` the generated answers (text, end token
stripped), and ``fields`` the prompt rows' other columns as lists in the same order (for
example ``answer=["82", "17", ...]``). One float per response.

Shipped rules (use them as ``llamatune.rewards:NAME``):

* :func:`last_integer`: 1.0 when the last integer in the response equals the row's
  ``answer``, else 0.0 (arithmetic and other tasks with one numeric answer).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

from llamatune.errors import UserError

__all__ = ["last_integer", "load_reward_fn"]

_INT = re.compile(r"-?\d[\d,]*")


def _last_int(text: str) -> int | None:
    found = _INT.findall(text)
    if not found:
        return None
    try:
        return int(found[-1].replace(",", ""))
    except ValueError:
        return None


def last_integer(prompts: list[str], responses: list[str], answer=None, **fields) -> list[float]:
    """1.0 where the response's last integer is the row's ``answer``, else 0.0.

    Raises:
        UserError: The prompt rows have no ``answer`` field.
    """
    if answer is None:
        raise UserError("ppo.reward_fn llamatune.rewards:last_integer needs an `answer` field "
                        "in every prompt row (the expected number).")
    out = []
    for resp, want in zip(responses, answer):
        got = _last_int(resp)
        try:
            out.append(float(got is not None and got == int(str(want).strip())))
        except ValueError:
            out.append(0.0)
    return out


def load_reward_fn(spec: str):
    """The callable named by ``ppo.reward_fn``.

    Raises:
        UserError: It cannot be imported or is not callable.
    """
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise UserError(f"ppo.reward_fn {spec!r} is not module:function (for example "
                        "llamatune.rewards:last_integer or my_rewards.py:score).")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser()
            if not path.is_file():
                raise UserError(f"ppo.reward_fn {spec!r}: no such file {path}.")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module's
        raise UserError(f"ppo.reward_fn {spec!r}: importing {mod_name} failed "
                        f"({type(e).__name__}: {e}).") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"ppo.reward_fn {spec!r}: {mod_name} has no function {fn_name!r}.")
    return fn
