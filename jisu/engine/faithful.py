"""FaithfulRunner: the default way quantized models generate. Each step runs under precise
activations (ops.PRECISE: every int8 activation block carries its rounding residual) with the fast
mode's KV cache (fp16 for quantized weights), so greedy tokens follow the fp32 reference's."""
from __future__ import annotations

import threading

import torch

from ..kernels import ops
from .batch import StepBatch
from .kv_cache import PagedKVCache


class FaithfulRunner:
    """Wraps a runner (same Runner protocol: cfg, kv_dtype, max_step_tokens, prefill_chunk and any
    other attribute are the inner runner's). While the process runs plain int8 activations (the
    kernels' setting 0, `--fast`), each step switches to ops.PRECISE and back; any other setting
    (`--precise`, a sparse threshold) is an explicit choice and is left alone. The KV dtype is the
    inner runner's under the process's setting: fp16 for quantized weights unless `--precise`.

    Why whole steps: plain int8 activations move each logit by up to ~2 (mean per-row maximum
    0.74 on SmolLM2-135M Q4_1) and the error lives on in every K/V row they wrote; recomputing only
    the near-tied rows precise over a fast cache, or precise prompts with fast decode, or the
    reverse, left most sequences of 64 tokens different from the fp32 reference's (README.md,
    "Faithful by default"; benchmarks/bench_faithful.py counts the modes). A step is computed the
    same way whatever it holds, so batch invariance is kept. The setting is process-wide: engines of one process should not run
    fast and faithful steps on two threads at once (faithful steps on several threads are safe:
    the setting goes back only when the last of them ends)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # only for names not found on the wrapper itself
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def run(self, step: StepBatch, kv: PagedKVCache) -> torch.Tensor:
        with _PRECISE_STEPS:
            return self.inner.run(step, kv)


class _PreciseSteps:
    """Switches the kernels to ops.PRECISE while any faithful step runs, when they were at plain
    int8 (0) as the first of them began; back to 0 when the last one ends."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._switched = False

    def __enter__(self):
        with self._lock:
            if self._active == 0:
                self._switched = ops.native_available() and ops.get_act_refine() == 0.0
                if self._switched:
                    ops.set_act_refine(ops.PRECISE)
                    ops.set_head_rescore(True)
            self._active += 1

    def __exit__(self, *exc):
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._switched:
                ops.set_act_refine(0.0)
                ops.set_head_rescore(False)
                self._switched = False


_PRECISE_STEPS = _PreciseSteps()
