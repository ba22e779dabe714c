"""Progress that is visible whether or not the output is a terminal.

On a terminal a stage shows one ``tqdm`` bar. When the output is piped or redirected (``make run
| tee log``, CI), a bar only ever shows its last state, so :class:`ProgressPrinter` prints plain
lines instead: one when the stage starts, then at most every ``interval_s`` seconds (10 s by
default, so a reader never waits more than that for a sign of life), and one at the end::

    [ppo] 12,288/98,304 steps (12%), 1,004 steps/s, ~86 s left; recent episodes: E2E 5.31 s

:class:`PPOProgress` drives one for PPO from SB3's callback hooks.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from stable_baselines3.common.callbacks import BaseCallback

#: Seconds between plain progress lines when the output is not a terminal.
PLAIN_INTERVAL_S = 10.0


class ProgressPrinter:
    """Progress of one stage: a tqdm bar on a terminal, plain lines otherwise.

    :param stage: short name printed in brackets (``ppo``, ``BC``, ``demos``, ``report``).
    :param total: amount of work (in ``unit``s).
    :param unit: what is counted (``steps``, ``epochs``, ``episodes``).
    :param initial: work already done (a resumed run).
    :param enabled: print nothing when False.
    :param stream: where to print (default ``sys.stdout``, with the results).
    :param interval_s: seconds between plain lines.
    :param tty: force bar (True) or plain lines (False); default: ``stream.isatty()``.
    :param clock: seconds, monotonic (tests inject one).
    """

    def __init__(self, stage: str, total: float, unit: str, *, initial: float = 0,
                 enabled: bool = True, stream: IO[str] | None = None,
                 interval_s: float = PLAIN_INTERVAL_S, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stage = stage
        self.total = float(total)
        self.unit = unit
        self.initial = float(initial)
        self.done = float(initial)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.interval_s = float(interval_s)
        self.clock = clock
        self.note = ""
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.tty = bool(isatty()) if tty is None else tty
        self._start = clock()
        self._last_line = -float("inf")
        self._bar: Any = None
        self._closed = False
        if not enabled:
            return
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit=f" {unit}", desc=stage,
                             file=self.stream, dynamic_ncols=True)
        else:
            self._print()

    def update(self, done: float, note: str | None = None) -> None:
        """Set the work done so far (absolute, in ``unit``s) and an optional note."""
        if note is not None:
            self.note = note
        if not self.enabled or self._closed:
            self.done = float(done)
            return
        if self._bar is not None:
            self._bar.update(float(done) - self.done)
            self.done = float(done)
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            return
        self.done = float(done)
        if self.done < self.total and self.clock() - self._last_line >= self.interval_s:
            self._print()  # (the last line comes from close())

    def write(self, text: str) -> None:
        """A line of text that does not break the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self, note: str | None = None) -> None:
        """End the stage (prints the final line when not on a terminal)."""
        if self._closed:
            return
        if note is not None:
            self.note = note
        self._closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(note, refresh=True)
            self._bar.close()
        else:
            self._print(final=True)

    def line(self, final: bool = False) -> str:
        """The plain progress line for the current state."""
        elapsed = max(self.clock() - self._start, 1e-9)
        rate = (self.done - self.initial) / elapsed
        text = f"[{self.stage}] {self.done:,.0f}/{self.total:,.0f} {self.unit}"
        if self.total > 0:
            text += f" ({100 * self.done / self.total:.0f}%)"
        if final:
            text += f" in {elapsed:.1f} s"
        elif self.done > self.initial and rate > 0:
            shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"  # 0.84 episodes/s, not 1
            text += f", {shown} {self.unit}/s, ~{(self.total - self.done) / rate:.0f} s left"
        if self.note:
            text += f"; {self.note}"
        return text

    def _print(self, final: bool = False) -> None:
        self._last_line = self.clock()
        print(self.line(final), file=self.stream, flush=True)


class PPOProgress(BaseCallback):
    """PPO's progress (env steps of the whole budget) through a :class:`ProgressPrinter`.

    :param total_timesteps: the run's budget (env steps, all envs).
    :param note: returns a short text about recent training episodes (or ``""``).
    :param printer_kwargs: passed to :class:`ProgressPrinter`.
    """

    def __init__(self, total_timesteps: int, note: Callable[[], str] | None = None,
                 **printer_kwargs: Any) -> None:
        super().__init__()
        self.total_timesteps = int(total_timesteps)
        self.note = note
        self.printer_kwargs = printer_kwargs
        self.printer: ProgressPrinter | None = None

    def _on_training_start(self) -> None:
        self.printer = ProgressPrinter("ppo", self.total_timesteps, "steps",
                                       initial=self.model.num_timesteps, **self.printer_kwargs)

    def _on_step(self) -> bool:
        self.printer.update(self.model.num_timesteps)
        return True

    def _on_rollout_end(self) -> None:
        if self.note is not None:
            self.printer.update(self.model.num_timesteps, self.note())

    def _on_training_end(self) -> None:
        self.printer.close()
