"""SIGTERM and SIGINT (a scheduler's preemption, Ctrl-C) stop a run at the end of its current step, after a
checkpoint: the run exits 143 or 130 and `--resume` continues it exactly.

Every rank may receive the signal at a different moment (or only some do): after each step the ranks agree, with one
small all-reduce, whether any of them was asked to stop, so they all stop after the same step. A second SIGINT stops
at once (KeyboardInterrupt), without a checkpoint.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGTERM and SIGINT set `stop.received`; `stop.agreed(ranks)` is the
    signal (its number) every rank stops for, or 0."""

    def __init__(self):
        self.received: set[int] = set()
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt
        self.received.add(signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def agreed(self, ranks) -> int:
        """The signal every rank stops for (SIGTERM before SIGINT), or 0 to go on. Collective on several ranks."""
        term, intr = ranks.all_sum([signal.SIGTERM in self.received, signal.SIGINT in self.received])
        return int(signal.SIGTERM) if term else int(signal.SIGINT) if intr else 0


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
