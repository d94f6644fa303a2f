"""Polite stops: SIGTERM and SIGINT end a run at a step boundary, with a checkpoint.

A spot instance or a SLURM preemption sends SIGTERM and waits a grace period; a user sends
SIGINT (Ctrl-C). While :func:`handling` is active (the CLI's stage and pipeline commands),
the first signal is acted on according to where the run is:

* inside :func:`deferred` (the step loop and the final save): nothing is cut short; the loop
  asks :func:`agreed` once per step whether to stop (under a launcher every process answers
  together, so all stop at the same step), writes a checkpoint there and raises
  :class:`Interrupted`. The final files, once begun, are completed first;
* elsewhere (setup, loading, tokenizing, a pipeline's merge): :class:`Interrupted` is raised
  at once. What those phases write is written atomically, so nothing is left half-written.

A second signal exits at once (``128 + signal``, no checkpoint; the newest complete one is
kept). Under a launcher the same signal can reach a worker twice within moments (a scheduler
signals every process and the launcher forwards it too), so there a repeat within
:data:`REPEAT_S` seconds counts as the first.

:func:`forwarding` is the other side, for the process that ran ``accelerate launch``: it
passes the first signal on to the workers (not to torch's launcher, which would kill them 30
seconds later) and kills the whole family on a second one, leaving no orphans.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

__all__ = ["REPEAT_S", "SIGNALS", "Interrupted", "agreed", "deferred", "forwarding", "handling",
           "received", "stage"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals a run stops politely on."""

REPEAT_S = 2.0
"""Under a launcher: a repeat of the first signal this soon after it is the same stop."""


class Interrupted(BaseException):
    """A stop signal ended the run.

    A ``BaseException``, as KeyboardInterrupt is, so that nothing catches it by accident.

    Attributes:
        signum: The signal (``SIGINT`` or ``SIGTERM``).
        step: Optimizer steps done when the loop stopped (``None``: outside the loop).
        total: The run's total steps.
        checkpoint: The checkpoint to resume from (``None``: none written).
        finished: The run had finished its steps; its final files were completed.
        stage: In a pipeline, the step it stopped in (``sft``, ``rm``, ``ppo``, ``merge``).
        parent: Said by the process that launched the workers (they said where they stopped).
    """

    def __init__(self, signum: int, step: int | None = None, total: int | None = None,
                 checkpoint=None, finished: bool = False, parent: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step, self.total = int(signum), step, total
        self.checkpoint, self.finished, self.stage = checkpoint, finished, None
        self.parent = parent

    @property
    def code(self) -> int:
        """The exit code: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def report(self, command: str, rerun: str) -> str:
        """The one-paragraph exit message.

        Args:
            command: What stopped (``llamatune sft``).
            rerun: The command that continues the run (already quoted).
        """
        name = signal.Signals(self.signum).name
        in_stage = self.stage in ("sft", "rm", "dpo", "ppo")
        where = f" in stage {self.stage}" if in_stage else ""
        then = f" Continue with `{rerun}`."
        if self.finished:
            return (f"{command}: stopped by {name}{where} while the final files were written; "
                    "they were completed first, so that run is finished."
                    + (then if self.stage else ""))
        if self.parent:
            return (f"{command}: stopped by {name}: the processes ended; "
                    + (f"the newest checkpoint is {self.checkpoint}." if self.checkpoint else
                       "no checkpoint was written.") + then)
        if self.step is not None and self.checkpoint is not None:
            what = f"after step {self.step} of {self.total}: wrote checkpoint {self.checkpoint}."
        elif self.step is not None:
            what = "before the first step: nothing was trained, no checkpoint written."
        else:
            phase = f"during {self.stage}" if self.stage and not in_stage else "during setup"
            what = f"{phase}: nothing is half-written."
            if self.checkpoint is not None:
                what += f" The newest checkpoint, {self.checkpoint}, is kept."
        return f"{command}: stopped by {name}{where} {what}{then}"


class _State:
    installed = False
    mode = "raise"  # or "defer"
    signum: int | None = None
    at = 0.0
    repeat_ok = False  # under a launcher: a quick repeat is the same stop
    quiet = False  # not the main process: say nothing
    pid = 0


_S = _State()


def _say(msg: str) -> None:
    if not _S.quiet:  # os.write: safe inside a signal handler (print may be mid-write)
        os.write(2, (msg + "\n").encode())


def _on_signal(signum, frame) -> None:
    if os.getpid() != _S.pid:  # a forked helper (a tokenizing pool): the default action
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    name = signal.Signals(signum).name
    now = time.monotonic()
    if _S.signum is not None:
        if _S.repeat_ok and signum == _S.signum and now - _S.at < REPEAT_S:
            return
        _say(f"llamatune: second signal ({name}): stopping at once, without a checkpoint; the "
             "newest complete checkpoint is kept")
        sys.stdout.flush()
        os._exit(128 + signum)
    _S.signum, _S.at = signum, now
    if _S.mode == "raise":
        raise Interrupted(signum)
    _say(f"llamatune: {name}: finishing the current step, then writing a checkpoint (a second "
         "signal stops at once, without one)")


@contextlib.contextmanager
def _handlers(handler):
    """``handler`` for every signal of :data:`SIGNALS` inside the block, the old ones after."""
    before = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@contextlib.contextmanager
def handling():
    """Stop politely on SIGINT and SIGTERM in the body (see the module docstring).

    The previous handlers come back afterwards. Off the main thread (where Python cannot
    set handlers) the body runs without.
    """
    if threading.current_thread() is not threading.main_thread() or _S.installed:
        yield
        return
    from llamatune.dist import launched

    _S.installed, _S.mode, _S.signum, _S.pid = True, "raise", None, os.getpid()
    _S.repeat_ok = launched()
    _S.quiet = int(os.environ.get("RANK", "0") or 0) > 0
    try:
        with _handlers(_on_signal):
            yield
    finally:
        _S.installed, _S.mode = False, "raise"


@contextlib.contextmanager
def deferred():
    """In the body a first signal only asks to stop (:func:`agreed` says when)."""
    mode, _S.mode = _S.mode, "defer"
    try:
        yield
    finally:
        _S.mode = mode


def received() -> int | None:
    """The stop signal this process received, or ``None``."""
    return _S.signum


def agreed() -> int | None:
    """Whether to stop here: the signal, when this or any other process received one.

    Under a launcher a collective: every process calls it at the same point (once a step).
    Without :func:`handling` it answers ``None`` at once, so a notebook's loop never stops.
    """
    if not _S.installed:
        return None
    from llamatune import dist

    got, sig = dist.all_sum([1.0 if _S.signum else 0.0, float(_S.signum or 0)])
    if not got:
        return None
    if _S.signum is None:  # a peer's signal: stop with it
        _S.signum, _S.at = round(sig / got), time.monotonic()
    return _S.signum


@contextlib.contextmanager
def stage(name: str):
    """Name the pipeline step an :class:`Interrupted` raised in the body stopped."""
    try:
        yield
    except Interrupted as e:
        e.stage = e.stage or name
        raise


def _workers(launcher) -> list:
    """The topmost llamatune processes under the launcher (its workers, not their helpers)."""
    import psutil

    found = []
    for p in launcher.children(recursive=True):
        try:
            cmd = p.cmdline()
            parent = p.ppid()
        except psutil.Error:
            continue
        if "llamatune" in cmd and "accelerate.commands.launch" not in cmd:
            found.append((p, parent))
    pids = {p.pid for p, _ in found}
    return [p for p, parent in found if parent not in pids]


@contextlib.contextmanager
def forwarding(proc):
    """Pass stop signals on to ``proc``'s workers (``proc``: ``accelerate launch``).

    The first signal goes to every worker, which then stops as :func:`handling` says; before
    any worker exists it goes to the launcher itself. A second one kills the launcher and
    everything under it, then exits at once. Off the main thread the body runs without.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import psutil

    launcher = psutil.Process(proc.pid)

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if _S.signum is None:
            _S.signum = signum
            targets = _workers(launcher) or [launcher]
            for p in targets:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signum)
            _say(f"llamatune: {name}: passed on to {len(targets)} process(es); they finish "
                 "their step and write a checkpoint (a second signal stops them at once)")
            return
        family = [launcher, *launcher.children(recursive=True)]
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(family, timeout=10)
        _say(f"llamatune: second signal ({name}): stopped every process at once, without a "
             "checkpoint; the newest complete one is kept")
        os._exit(128 + signum)

    _S.signum, _S.quiet = None, False
    with _handlers(on_signal):
        yield
