"""Recipe steps that change a model rather than quantize it (pruning, sparsity, low rank, distillation).

A recipe is a chain `STEP,STEP,...` run in order; exactly one of them quantizes (rtn / gptq / awq /
mixed, jisu.compress.recipe). A transform before the quantization step works on the dense float32
model (`StepContext.weights`, HF names); a transform after it works on the quantized result
(`StepContext.quantized`, codes and scales). Each transform lives in its own module, registers
itself with `@transform(...)` and is listed in `_MODULES`:

    @transform("prune", before=True, after=False, calibrated=True)
    class Prune:
        form = "prune:layers=N | prune:ffn=W | prune:heads=H"   # the valid forms, for errors
        def parse(self, rest: str, fail) -> object: ...         # rest: the text after "prune:";
                                                                # fail(problem) -> RecipeError to raise
        def check(self, params, cfg) -> None: ...              # one-line JisuError before any work
        def apply(self, params, ctx: StepContext) -> dict: ...  # the step's figures (manifest "steps")

A transform never changes a tensor in place: it puts new tensors into `ctx.weights` (the teacher's
weights, `ctx.teacher.weights`, share the untouched ones) and a new `ctx.cfg` when shapes change.
"""
from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..config import ModelConfig

_MODULES: tuple = ("prune", "distill_step")   # modules of jisu.compress that register transforms, imported on first use
TRANSFORMS: dict = {}         # name -> Transform
_loaded = False


@dataclass(frozen=True)
class Transform:
    name: str
    impl: Any                  # the object with form / parse / check / apply
    before: bool = True        # may run before the quantization step (on float weights)
    after: bool = False        # may run after it (on the quantized model)
    calibrated: bool = False   # needs the calibration text

    @property
    def form(self) -> str:
        return getattr(self.impl, "form", f"{self.name}:...")


def transform(name: str, *, before: bool = True, after: bool = False, calibrated: bool = False) -> Callable:
    """Class decorator: register an instance of the class as the transform `name`."""
    def register(cls):
        TRANSFORMS[name] = Transform(name, cls(), before, after, calibrated)
        return cls
    return register


def transforms() -> dict:
    """Every registered transform (the listed modules imported once)."""
    global _loaded
    if not _loaded:
        for mod in _MODULES:
            importlib.import_module(f"{__package__}.{mod}")
        _loaded = True
    return TRANSFORMS


@dataclass(frozen=True)
class TransformStep:
    """A parsed transform step of a recipe: `text` as written, `params` from the transform's parse."""
    name: str
    text: str
    params: Any = None

    @property
    def transform(self) -> Transform:
        return transforms()[self.name]

    @property
    def needs_calibration(self) -> bool:
        return self.transform.calibrated


@dataclass
class Teacher:
    """The source model in float32, as it was before any step: distillation's and the importance
    measures' reference."""
    cfg: ModelConfig
    weights: dict


@dataclass
class StepContext:
    cfg: ModelConfig                       # the model as it stands (a pruning step replaces it)
    weights: Optional[dict]                # HF name -> float32 tensor, before the quantization step
    teacher: Teacher
    calib_ids: Optional[torch.Tensor] = None   # [samples, seq_len] calibration token ids
    tokenizer: Any = None
    workdir: Optional[str] = None          # survives a crash: caches and checkpoints, reused by a rerun
    progress: bool = False
    threads: Optional[int] = None
    quantized: Any = None                  # jisu.compress.pipeline.Quantized, after the quantization step
    log: list = field(default_factory=list)   # one dict per step that ran (the manifest's "steps")

    def workfile(self, *parts: str) -> str:
        """A path inside the work folder (created on demand)."""
        if self.workdir is None:
            raise RuntimeError("this step needs a work folder")
        path = os.path.join(self.workdir, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path


def run_steps(steps, ctx: StepContext) -> None:
    """Apply transform steps in order, recording each one's figures and its wall / CPU time."""
    for step in steps:
        t0, c0 = time.perf_counter(), time.process_time()
        info = step.transform.impl.apply(step.params, ctx) or {}
        ctx.log.append({"step": step.text, **info, "wall_s": time.perf_counter() - t0,
                        "cpu_s": time.process_time() - c0})


def check_steps(steps, cfg: ModelConfig) -> None:
    """Each transform's own checks against the model, before any work."""
    for step in steps:
        step.transform.impl.check(step.params, cfg)


def dense_float(weights: dict) -> dict:
    """A float32 copy of a source's weights (packed / file-backed matrices decoded), for the
    transforms that run before quantization."""
    from .observe import as_float

    return {n: (t.float() if isinstance(t, torch.Tensor) else as_float(t)) for n, t in weights.items()}
