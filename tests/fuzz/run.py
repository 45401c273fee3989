"""Long fuzz runs: `python -m tests.fuzz.run --minutes 60 [--harness NAME ...]`. Prints, per
harness, cases run, distinct outcomes, lines covered (with --coverage), peak RSS growth and time;
every escape is shrunk by hypothesis and saved under tests/fuzz/seeds/."""
from __future__ import annotations

import argparse
import sys
import time

from hypothesis import HealthCheck, Phase, given, seed as hyp_seed, settings

from jisu.memory import _proc_kib, peak_rss_bytes, trim_heap

from .core import Escape, Stats, _label, check, save_seed
from .harnesses import HARNESSES, context


def fuzz(name: str, seconds: float, batch: int = 20, start_seed: int = 0, save: bool = True) -> Stats:
    h = HARNESSES[name]
    ctx = context(name)
    stats = Stats()
    started = time.monotonic()
    deadline = started + seconds
    i = start_seed
    seen: set[str] = set()
    rss = []  # resident set after each batch (heap trimmed): flat memory means the last is near the first
    # built once: a strategy built per batch grew hypothesis's caches for good (~1.7 KB a case)
    strategy = h.strategy(ctx)
    while time.monotonic() < deadline:
        found: list[Escape] = []

        @hyp_seed(i)
        @settings(max_examples=batch, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
        @given(strategy)
        def one(case):
            if time.monotonic() > deadline and not found:
                return
            try:
                check(h, ctx, case, stats)
            except Escape as e:
                found.append(e)
                raise

        try:
            one()
        except (Escape, BaseExceptionGroup) as err:  # several distinct failures come as a group
            leaves = err.exceptions if isinstance(err, BaseExceptionGroup) else (err,)
            if not all(isinstance(e, Escape) for e in leaves):
                raise
            for e in leaves:  # each one shrunk by hypothesis; each kind reported once
                kind = _label(Exception(e.problem))
                if kind in seen:
                    continue
                seen.add(kind)
                stats.escapes.append(e)
                print(f"[{name}] ESCAPE {e.problem[:200]}", flush=True)
                if save:
                    print(f"[{name}] seed saved: {save_seed(name, e.case, e.problem)}", flush=True)
        i += 1
        rate = stats.cases / max(time.monotonic() - started, 1e-3)
        batch = max(10, min(500, int(rate * 15)))  # a batch of about 15 s: the deadline is not overrun much
        trim_heap(collect=True)   # what is held, not glibc's free lists
        rss.append(_proc_kib("/proc/self/status", "VmRSS:") or 0)
    stats.rss = rss
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=1.0, help="minutes per harness")
    ap.add_argument("--harness", action="append", choices=sorted(HARNESSES), help="default: all")
    ap.add_argument("--seed", type=int, default=0, help="first hypothesis seed")
    ap.add_argument("--coverage", action="store_true", help="count jisu lines hit (needs coverage.py)")
    args = ap.parse_args(argv)
    names = args.harness or list(HARNESSES)
    failed = 0
    for name in names:
        cov = None
        if args.coverage:
            import coverage

            cov = coverage.Coverage(source=["jisu"], data_file=None)
        context(name)  # setup outside the timing and the memory baseline
        rss0, t0 = peak_rss_bytes(), time.monotonic()
        if cov:
            cov.start()
        stats = fuzz(name, args.minutes * 60, start_seed=args.seed)
        lines = ""
        if cov:
            cov.stop()
            data = cov.get_data()
            lines = f", {sum(len(data.lines(f) or ()) for f in data.measured_files())} jisu lines hit"
        dt = time.monotonic() - t0
        growth = (peak_rss_bytes() - rss0) / 2**20
        rss = [r / 2**20 for r in stats.rss] or [0.0]
        quarters = [rss[min(len(rss) - 1, q * len(rss) // 4)] for q in range(4)] + [rss[-1]]
        print(f"{name}: {stats.cases} cases in {dt:.0f} s ({stats.cases / max(dt, 1e-9):.1f}/s), "
              f"{len(stats.outcomes)} distinct outcomes{lines}, "
              f"slowest case {stats.slowest:.2f} s CPU / {stats.slowest_wall:.2f} s wall, "
              f"peak RSS +{growth:.0f} MiB, RSS by quarters of the run {' '.join(f'{r:.0f}' for r in quarters)} MiB, "
              f"{len(stats.escapes)} escapes", flush=True)
        for outcome, n in stats.outcomes.most_common(8):
            print(f"    {n:7d}  {outcome}")
        failed += len(stats.escapes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
