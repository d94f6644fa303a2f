"""What a run shows and keeps as it trains: ``metrics.jsonl`` rows, the progress bar, the plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

from llamatune import _atomic, dist

__all__ = ["MetricsWriter", "Progress", "draw_plots"]


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl``.

    With a ``monitor`` (:class:`~llamatune.health.Monitor`), every process feeds it every
    row, and the main process appends and prints the alarms that trip after the row.
    """

    def __init__(self, path: Path, resume_step: int | None = None, trackers=None,
                 monitor=None):
        self.path = path
        self.trackers = trackers
        """:class:`~llamatune.trackers.Trackers` that also get every row (``train.report_to``)."""
        self.monitor = monitor
        self.enabled = dist.world().main  # under a launcher, the main process writes
        if self.enabled and resume_step is not None and path.exists():
            # Drop rows logged after the checkpoint we resume from: they will be redone. A
            # process killed mid-write leaves a torn last line; it goes too.
            keep = []
            for ln in path.read_text().splitlines():
                try:
                    row = json.loads(ln)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= resume_step:
                    keep.append(ln)
            with _atomic.writing(path.name, path.parent, self._fix):
                _atomic.write_text(path, "".join(k + "\n" for k in keep))
        if monitor is not None and resume_step is not None:
            monitor.resume(path, resume_step)  # every process: the alarms agree

    _fix = "choose another output_dir; earlier rows are whole, resume=true continues."

    def write(self, row: dict) -> None:
        """Append a row (and the alarms it trips) and flush.

        Raises:
            WriteError: The row could not be appended; the file keeps its earlier rows whole.
                Only the main process writes, so the run stops there; under a launcher the
                other processes stop at their next collective when it exits (the launcher
                ends them), they do not wait forever.
        """
        alarms = self.monitor.observe(row) if self.monitor is not None else []
        if not self.enabled:
            return
        self._append([row, *alarms], alarms)
        if self.trackers is not None:
            self.trackers.log(row)

    def _append(self, rows: list[dict], alarms: list[dict]) -> None:
        """One append of ``rows`` (a figure row and the alarms it tripped), then the alarms said."""
        from llamatune.health import announce

        if not rows or not self.enabled:
            return
        with _atomic.writing(f"a row of {self.path.name}", self.path.parent, self._fix):
            _atomic.append_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        for a in alarms:
            announce(a)

    def close(self) -> None:
        """Check the end-of-run alarms and finish the trackers (the file needs nothing)."""
        if self.monitor is not None:
            alarms = self.monitor.finish()
            self._append(alarms, alarms)
            self.monitor = None
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None


class Progress:
    """A tqdm bar with step, loss, tokens/s and ETA; plain lines every 10 steps when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str, every: int = 10):
        self.bar = None
        self.total, self.step, self.every, self.desc = total, initial, every, desc
        self.start, self.start_step = time.perf_counter(), initial
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, **fields) -> None:
        """Advance one step and show the latest figures."""
        self.step += 1
        if self.bar is not None:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                  for k, v in fields.items()}, refresh=False)
            self.bar.update(1)
        elif self.step % self.every == 0 or self.step == self.total:
            done = self.step - self.start_step
            eta = (time.perf_counter() - self.start) / max(done, 1) * (self.total - self.step)
            figures = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in fields.items())
            print(f"{self.desc} step {self.step}/{self.total} {figures} eta {eta:.0f}s", flush=True)

    def write(self, msg: str) -> None:
        """Print a line without breaking the bar."""
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()

def draw_plots(run_dir) -> None:
    """Draw the run's PNG plots (:mod:`llamatune.plots`); a failure only warns: the run is done."""
    import sys

    try:
        from llamatune.plots import plot_run

        written = plot_run(run_dir)
    except ImportError as e:
        print(f"note: no plots ({e}); pip install matplotlib, then `llamatune report "
              f"{run_dir}`", file=sys.stderr, flush=True)
        return
    except Exception as e:  # noqa: BLE001 - a figure must not fail a finished run
        print(f"warning: plotting {run_dir} failed ({type(e).__name__}: {e}); the run itself is "
              "complete", file=sys.stderr, flush=True)
        return
    if written:
        print(f"plots: {', '.join(p.name for p in written)} in {written[0].parent}", flush=True)
