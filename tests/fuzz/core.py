"""The fuzzing property and its bookkeeping: a case either works or raises jisu's one-line error
(a 4xx for the server); anything else, or a case slower than the time cap, is an escape."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from jisu.errors import JisuError

CASE_SECONDS = 2.0   # CPU seconds of this process per case (a shared machine stretches wall time)
HANG_SECONDS = 120.0  # wall seconds: a case waiting on something that never comes
STOP_SECONDS = 10 * CASE_SECONDS  # CPU seconds after which a runaway case is stopped (not waited out)


class _Runaway(BaseException):
    """Raised into a case's Python code by the CPU watchdog (SIGPROF)."""


def _stop(signum, frame):
    raise _Runaway()


class _Watchdog:
    """Interrupts a case that has used STOP_SECONDS of this process's CPU (ITIMER_PROF: all threads),
    at its next Python instruction: a loop over a fuzzed count would otherwise run, and fill
    memory, until the machine gave out. Main thread only (signals); elsewhere it does nothing."""

    def __enter__(self):
        self.on = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        if self.on:
            self.old = signal.signal(signal.SIGPROF, _stop)
            signal.setitimer(signal.ITIMER_PROF, STOP_SECONDS)
        return self

    def __exit__(self, *exc):
        if self.on:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.signal(signal.SIGPROF, self.old)
        return False


SEEDS_DIR = os.path.join(os.path.dirname(__file__), "seeds")


class Escape(AssertionError):
    """A case that broke the property; carries the case so it can be saved as a seed."""

    def __init__(self, harness: str, case: Any, problem: str):
        super().__init__(f"{harness}: {problem}\ncase: {json.dumps(case, ensure_ascii=True)[:2000]}")
        self.harness, self.case, self.problem = harness, case, problem


@dataclass
class Harness:
    """name; setup(workdir) -> context (built once); strategy(context) -> hypothesis strategy of
    JSON-able cases; run(context, case) -> an outcome label, or raises JisuError."""
    name: str
    setup: Callable[[str], Any]
    strategy: Callable[[Any], Any]
    run: Callable[[Any, Any], str]
    short_examples: int = 60


@dataclass
class Stats:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    slowest: float = 0.0       # CPU seconds
    slowest_wall: float = 0.0
    escapes: list = field(default_factory=list)
    rss: list = field(default_factory=list)    # bytes resident after each batch of a long run


_DIGITS = re.compile(r"\d+")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _label(e: BaseException) -> str:
    """An outcome label: the error type and its message with numbers and quoted names blanked
    (distinct labels approximate distinct code paths reached)."""
    text = _QUOTED.sub("'_'", _DIGITS.sub("N", str(e).split(": ", 1)[-1]))
    return f"{type(e).__name__}: {text[:120]}"


def check(h: Harness, ctx: Any, case: Any, stats: Stats | None = None) -> str:
    """Run one case under the property; returns its outcome label, raises Escape if broken."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with _Watchdog():
            outcome = "ok: " + (h.run(ctx, case) or "")
    except _Runaway:
        raise Escape(h.name, case, f"ran away: stopped after {STOP_SECONDS:.0f} s of CPU") from None
    except JisuError as e:
        msg = str(e)
        if not msg or "\n" in msg.strip():
            raise Escape(h.name, case, f"error is not one line: {msg!r}") from e
        outcome = _label(e)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - the property (a Rust panic is a BaseException)
        raise Escape(h.name, case, f"escaped as {type(e).__name__}: {e}") from e
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if stats is not None:
        stats.cases += 1
        stats.outcomes[outcome] += 1
        stats.slowest = max(stats.slowest, cpu)
        stats.slowest_wall = max(stats.slowest_wall, wall)
    if cpu > CASE_SECONDS or wall > HANG_SECONDS:
        raise Escape(h.name, case, f"took {cpu:.2f} s of CPU, {wall:.2f} s of wall time (caps {CASE_SECONDS} s, "
                                   f"{HANG_SECONDS} s)")
    return outcome


def save_seed(harness: str, case: Any, problem: str, directory: str = SEEDS_DIR) -> str:
    """Write a found case as tests/fuzz/seeds/<harness>-<hash>.json (replayed by test_seeds)."""
    import hashlib

    text = json.dumps(case, ensure_ascii=True, sort_keys=True)
    path = os.path.join(directory, f"{harness}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json")
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"harness": harness, "problem": problem.splitlines()[0][:300], "case": case}, f,
                  ensure_ascii=True, indent=1)
    return path


def load_seeds(directory: str = SEEDS_DIR) -> list[tuple[str, str, Any]]:
    """(file name, harness, case) of every saved seed."""
    out = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                d = json.load(f)
            out.append((name, d["harness"], d["case"]))
    return out
