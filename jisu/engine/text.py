"""From token events to text: incremental detokenizing and stop strings (the text emitted never
contains a stop string, and nothing after one is emitted)."""
from __future__ import annotations

from typing import Sequence


class StopMatcher:
    """Feeds text deltas through, holding back any tail that could still start a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Returns the text safe to emit; sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        cut = len(self.pending) - self.hold
        # keep only a tail that is a prefix of some stop string
        while cut < len(self.pending) and not any(s.startswith(self.pending[max(cut, 0):]) for s in self.stops):
            cut += 1
        cut = max(cut, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
