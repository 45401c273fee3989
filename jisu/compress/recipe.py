"""Compression recipes: short strings parsed into small frozen dataclasses.

Grammar (whitespace is ignored, case-insensitive):

    RECIPE  := STEP ("," STEP)* OPTION*
    OPTION  := "+embed" ["=" FORMAT] | "+head" ["=" FORMAT] | "+tune" ["=" STEPS] | "+lowrank=" R
    STEP    := "rtn:" FORMAT                      round to nearest
             | "gptq:" FORMAT (":" GPTQOPT)*      GPTQ error compensation (calibration data)
             | "awq:" FORMAT                      activation-aware scaling, then RTN (calibration data)
             | "nf4:g" G                          = rtn:nf4gG
             | "kmeans" [":g" G]                  = rtn:kmeans[gG]
             | "mixed:bpw=" X (":" MIXOPT)*       per-layer bits from {2,3,4,8} within X bits/weight
             | NAME ":" ARGS                      a transform step (jisu.compress.steps.TRANSFORMS)
    FORMAT  := "w8"                 int8, one float32 scale per output channel
             | "w8g" G              int8, one float16 scale per group of G (G=32: GGUF Q8_0)
             | "w" B "g" G ["a"]    B in {2,3,4}: symmetric x=(q-2^(B-1))*s (B=4,G=32: GGUF Q4_0);
                                    trailing "a": asymmetric x=q*s+min (B=4,G=32: GGUF Q4_1)
             | "nf4g" G             NF4 table, float16 absmax scale per group
             | "kmeans" ["g" G]     16-entry k-means table per row (+ float16 absmax scale per group)
    G       := 32 | 64 | 128
    GPTQOPT := "noact" (no act-order) | "damp=" F (dampening, fraction of mean diag(H); default 0.01)
    MIXOPT  := "g" G (group of the 2/3/4-bit choices, default 32) | "rtn" | "gptq" (default gptq)
             | "w4" (choices 4-bit at groups 128/64/32 and int8 instead of 2/3/4/8 bits)
             | "groups" (choices 3- and 4-bit at groups 64 and 32, int8, and 2-bit group 32 only when
               the budget cannot hold 3-bit group 64 everywhere)
             | "max=" B (only the choices of at most B bits per weight, e.g. ":groups:max=4.5": no int8)

Steps run in order. Exactly one step quantizes; the others transform the model
(jisu.compress.steps: pruning, sparsity, low rank, distillation), before the quantization step
on the float model or after it on the quantized one, as each transform allows
("prune:layers=20,distill:minutes=20,gptq:w4g32"). "+embed" / "+head" also
quantize the token embedding / LM head in FORMAT (default without them: int8 group 32 = Q8_0, or the
source's own Q8_0/Q4_0/Q4_1 format: jisu.compress.pipeline); without "=FORMAT" they take the
step's format (w8 for mixed). "+tune" (calibration data) trains every scale and norm of
the result end to end against the source's next-token distribution, codes fixed
(jisu.compress.tune), for STEPS steps (default 64). "+lowrank=R" (calibration data; rtn, gptq and
mixed steps) adds to every quantized linear the rank-R correction of the error its quantizer left,
factored in the metric of its calibration inputs and stored as int8 (jisu.compress.lowrank). The embedding is stored quantized and dequantized to
float32 when loaded (a row lookup, not a matmul); the head runs as a packed weight.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional

from ..errors import JisuError
from .spec import FormatSpec  # noqa: F401  (part of a parsed recipe)
from .steps import TransformStep, transforms

GROUPS = (32, 64, 128)
MIXED_BITS = (2, 3, 4, 8)
STEP_NAMES = ("rtn", "gptq", "awq", "nf4", "kmeans", "mixed")  # nf4 / kmeans: rtn steps of those formats
VALID_FORMS = ("rtn:w8 | rtn:w8g32 | rtn:wBgG[a] (B=2,3,4; G=32,64,128; a=asymmetric) | gptq:FORMAT[:noact][:damp=F] "
               "| awq:wBgG[a] | nf4:gG | kmeans[:gG] | rtn:nf4gG | gptq:nf4gG | mixed:bpw=X[:gG][:rtn][:w4|:groups][:max=B] "
               "| options +embed[=FORMAT] +head[=FORMAT] +tune[=STEPS] +lowrank=R")
TUNE_STEPS = 64
MAX_TUNE_STEPS = 10000
MAX_LOWRANK = 1024


class RecipeError(JisuError):
    """A recipe string that does not parse; the message lists the valid forms."""


def _fail(text: str, problem: str) -> RecipeError:
    extra = "".join(f" | {t.form}" for t in transforms().values())
    return RecipeError(f"recipe {text!r}: {problem}; valid forms: {VALID_FORMS}{extra}")


@dataclass(frozen=True)
class QuantStep:
    method: str                          # "rtn" | "gptq" | "awq" | "mixed"
    fmt: Optional[FormatSpec] = None     # None for mixed
    act_order: bool = True               # gptq
    damp: float = 0.01                   # gptq
    bpw: Optional[float] = None          # mixed: bits-per-weight budget over the quantized linears
    group_size: int = 32                 # mixed: group of the 2/3/4-bit choices
    base: str = "gptq"                   # mixed: "gptq" | "rtn"
    four_bit_groups: bool = False        # mixed ":w4": 4-bit at groups 128/64/32, or int8
    both_groups: bool = False            # mixed ":groups": 3/4-bit at groups 64 and 32, or int8
    max_bits: Optional[float] = None     # mixed ":max=B": only choices of at most B bits per weight
    lowrank: int = 0                     # "+lowrank=R": rank of each linear's error correction (0: none)

    @property
    def needs_calibration(self) -> bool:
        from .methods import METHODS

        return METHODS[self.method].calibrated or self.lowrank > 0

    @property
    def layer_method(self) -> str:
        """The method that quantizes each layer (mixed: its base, on the formats it chose)."""
        return self.base if self.method == "mixed" else self.method

    def mixed_choices(self) -> dict[float, FormatSpec]:
        """width -> format for mixed precision, widths ordered by size: symmetric wBgG for 2/3/4 and
        int8 per channel for 8; with ":w4", symmetric 4-bit at groups 128 / 64 / 32 (keyed by their bits
        per weight) and int8 per channel; with ":groups", 2-bit group 32 and 3- and 4-bit at groups 64
        and 32 (keyed by their bits per weight) and int8 per channel; ":max=B" keeps the widths <= B."""
        choices = self._all_mixed_choices()
        if self.max_bits is None:
            return choices
        return {b: spec for b, spec in choices.items() if b <= self.max_bits + 1e-9}

    def _all_mixed_choices(self) -> dict[float, FormatSpec]:
        if self.both_groups:
            pairs = ((2, 32), (3, 64), (3, 32), (4, 64), (4, 32))
            return {**{b + 16 / g: FormatSpec("int", b, g) for b, g in pairs}, 8: FormatSpec("int", 8, None)}
        if self.four_bit_groups:
            return {**{4 + 16 / g: FormatSpec("int", 4, g) for g in (128, 64, 32)}, 8: FormatSpec("int", 8, None)}
        return {b: (FormatSpec("int", 8, None) if b == 8 else FormatSpec("int", b, self.group_size))
                for b in MIXED_BITS}


@dataclass(frozen=True)
class Recipe:
    text: str
    steps: tuple = field(default_factory=tuple)
    embed: Optional[FormatSpec] = None
    head: Optional[FormatSpec] = None
    tune: int = 0                        # end-to-end tuning steps after quantizing (0: none)

    @property
    def quant(self) -> QuantStep:
        return next(s for s in self.steps if isinstance(s, QuantStep))

    @property
    def before(self) -> tuple:
        """The transform steps before the quantization step (they see the float model)."""
        i = self.steps.index(self.quant)
        return self.steps[:i]

    @property
    def after(self) -> tuple:
        """The transform steps after the quantization step (they see the quantized model)."""
        i = self.steps.index(self.quant)
        return self.steps[i + 1:]

    @property
    def needs_calibration(self) -> bool:
        return self.tune > 0 or any(s.needs_calibration for s in self.steps)

    @property
    def lowrank(self) -> int:
        """Rank of the quantized linears' low-rank error correction (0: none)."""
        return self.quant.lowrank

    def to_dict(self) -> dict:
        q = self.quant
        d = {"text": self.text, "method": q.method}
        if len(self.steps) > 1:
            d["steps"] = [s.text if isinstance(s, TransformStep) else "quantize" for s in self.steps]
        if q.fmt is not None:
            d["format"] = q.fmt.name
        if q.method == "gptq":
            d |= {"act_order": q.act_order, "damp": q.damp}
        if q.method == "mixed":
            d |= {"bpw": q.bpw, "group_size": q.group_size, "base": q.base,
                  "choices": [spec.name for spec in q.mixed_choices().values()]}
        d["embed"] = self.embed.name if self.embed else None
        d["head"] = self.head.name if self.head else None
        d["tune"] = self.tune
        if q.lowrank:
            d["lowrank"] = q.lowrank
        return d


_INT = re.compile(r"^w([2348])(?:g(\d+))?(a?)$")
_NF4 = re.compile(r"^nf4g(\d+)$")
_KMEANS = re.compile(r"^kmeans(?:g(\d+))?$")


def parse_format(s: str, text: str) -> FormatSpec:
    """FORMAT -> FormatSpec; `text` (the whole recipe) is only used in error messages."""
    m = _INT.match(s)
    if m:
        bits, g, a = int(m.group(1)), m.group(2), m.group(3)
        if bits == 8:
            if a:
                raise _fail(text, f"format {s!r}: int8 is symmetric only")
            return FormatSpec("int", 8, _group(g, text, s) if g else None)
        if g is None:
            raise _fail(text, f"format {s!r}: {bits}-bit formats need a group size (e.g. w{bits}g32)")
        return FormatSpec("int", bits, _group(g, text, s), sym=not a)
    m = _NF4.match(s)
    if m:
        return FormatSpec("nf4", 4, _group(m.group(1), text, s))
    m = _KMEANS.match(s)
    if m:
        return FormatSpec("kmeans", 4, _group(m.group(1), text, s) if m.group(1) else None)
    raise _fail(text, f"unknown format {s!r}")


def _group(g: str, text: str, s: str) -> int:
    if int(g) not in GROUPS:
        raise _fail(text, f"format {s!r}: group size must be one of {', '.join(map(str, GROUPS))}")
    return int(g)


def _parse_step(s: str, text: str):
    method, _, rest = s.partition(":")
    found = transforms().get(method)
    if found is not None:
        params = found.impl.parse(rest, lambda problem: RecipeError(
            f"recipe {text!r}: step {s!r}: {problem}; valid forms: {found.form}"))
        return TransformStep(method, s, params)
    fields = [f for f in rest.split(":")] if rest else []
    if any(not f for f in fields):
        raise _fail(text, f"step {s!r} has an empty field")
    if method in ("rtn", "awq"):
        if len(fields) != 1:
            raise _fail(text, f"step {s!r}: {method} takes exactly one FORMAT")
        fmt = parse_format(fields[0], text)
        if method == "awq" and fmt.kind != "int":
            raise _fail(text, f"step {s!r}: awq supports integer formats (wBgG[a], w8)")
        return QuantStep(method, fmt)
    if method == "gptq":
        if not fields:
            raise _fail(text, f"step {s!r}: gptq needs a FORMAT")
        fmt = parse_format(fields[0], text)
        act, damp = True, 0.01
        for opt in fields[1:]:
            if opt == "noact":
                act = False
            elif opt.startswith("damp="):
                damp = _number(opt[5:], text, "damp")
                if not 0 < damp < 1:
                    raise _fail(text, f"damp={opt[5:]} must be in (0, 1)")
            else:
                raise _fail(text, f"unknown gptq option {opt!r}")
        return QuantStep("gptq", fmt, act_order=act, damp=damp)
    if method == "nf4":
        if len(fields) != 1 or not re.fullmatch(r"g\d+", fields[0]):
            raise _fail(text, f"step {s!r}: nf4 takes a group size (nf4:g64)")
        return QuantStep("rtn", parse_format("nf4" + fields[0], text))
    if method == "kmeans":
        if len(fields) > 1 or (fields and not re.fullmatch(r"g\d+", fields[0])):
            raise _fail(text, f"step {s!r}: kmeans takes an optional group size (kmeans:g64)")
        return QuantStep("rtn", parse_format("kmeans" + (fields[0] if fields else ""), text))
    if method == "mixed":
        bpw, group, base, w4, both, top = None, None, "gptq", False, False, None
        for opt in fields:
            if opt.startswith("bpw="):
                bpw = _number(opt[4:], text, "bpw")
            elif opt == "w4":
                w4 = True
            elif opt == "groups":
                both = True
            elif opt.startswith("max="):
                top = _number(opt[4:], text, "max")
            elif re.fullmatch(r"g\d+", opt):
                group = _group(opt[1:], text, opt)
            elif opt in ("rtn", "gptq"):
                base = opt
            else:
                raise _fail(text, f"unknown mixed option {opt!r}")
        if bpw is None:
            raise _fail(text, "mixed needs a budget (mixed:bpw=4.0)")
        if not 2 <= bpw <= 9:
            raise _fail(text, f"bpw={bpw} is outside 2..9 bits per weight")
        if w4 and both:
            raise _fail(text, "mixed takes one of :w4 and :groups")
        if group is not None and (w4 or both):
            raise _fail(text, "mixed :w4 and :groups choose the group sizes themselves (drop :g" + str(group) + ")")
        group = 32 if group is None else group
        step = QuantStep("mixed", None, bpw=bpw, group_size=group, base=base, four_bit_groups=w4, both_groups=both,
                         max_bits=top)
        if top is not None and len(step.mixed_choices()) < 2:
            raise _fail(text, f"max={top} leaves fewer than two widths to choose from")
        return step
    known = ", ".join(STEP_NAMES + tuple(transforms()))
    raise _fail(text, f"unknown step {method!r} (known steps: {known})")


def _number(s: str, text: str, what: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise _fail(text, f"{what}={s!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise _fail(text, f"{what}={s!r} is not a finite number")
    return v


def parse_recipe(text) -> Recipe:
    """Parse a recipe string; any problem is one RecipeError line listing the valid forms."""
    if isinstance(text, Recipe):
        return text
    if not isinstance(text, str) or not text.strip():
        raise _fail(str(text), "empty recipe")
    s = "".join(text.split()).lower()
    steps, embed, head, tune, lowrank = [], None, None, 0, 0
    for part in s.split(","):
        if not part:
            raise _fail(text, "empty step")
        base, *opts = part.split("+")
        if base:
            steps.append(_parse_step(base, text))
        elif not steps:
            raise _fail(text, "an option comes before any step")
        for opt in opts:
            name, eq, value = opt.partition("=")
            if name == "tune":
                tune = _steps(value, text) if eq else TUNE_STEPS
                continue
            if name == "lowrank":
                lowrank = _rank(value, text)
                continue
            if name not in ("embed", "head"):
                raise _fail(text, f"unknown option +{opt}")
            fmt = parse_format(value, text) if eq else "default"
            if name == "embed":
                embed = fmt
            else:
                head = fmt
    quant = [st for st in steps if isinstance(st, QuantStep)]
    if not quant:
        raise _fail(text, "no quantization step" if steps else "no step")
    if len(quant) > 1:
        raise _fail(text, "only one quantization step per recipe")
    q = quant[0]
    if lowrank:
        if q.method == "awq":
            raise _fail(text, "+lowrank works with rtn, gptq and mixed steps (not awq)")
        i = steps.index(q)
        q = steps[i] = replace(q, lowrank=lowrank)
    factored = any(isinstance(st, TransformStep) and st.name == "lowrank" for st in steps)
    if factored and (q.method not in ("rtn", "gptq") or q.lowrank):
        raise _fail(text, "the linears a lowrank step factored are kept by rtn or gptq steps (without +lowrank)")
    if tune and (factored or q.lowrank):
        raise _fail(text, "+tune does not train low-rank factors (drop +tune or the low-rank part)")
    for i, st in enumerate(steps):
        if isinstance(st, TransformStep):
            where = "before" if i < steps.index(q) else "after"
            if not getattr(st.transform, where):
                raise _fail(text, f"step {st.text!r} cannot run {where} the quantization step")
            check = getattr(st.transform.impl, "check_quant", None)   # e.g. sparsity: zeros the format keeps
            problem = check(st.params, q) if check is not None and where == "before" else None
            if problem:
                raise _fail(text, problem)
    default = q.fmt if q.fmt is not None else FormatSpec("int", 8, None)
    embed = default if embed == "default" else embed
    head = default if head == "default" else head
    return Recipe(text, tuple(steps), embed, head, tune)


def _rank(s: str, text: str) -> int:
    if not re.fullmatch(r"\d+", s) or not 1 <= int(s) <= MAX_LOWRANK:
        raise _fail(text, f"+lowrank={s!r}: R must be a whole number from 1 to {MAX_LOWRANK}")
    return int(s)


def _steps(s: str, text: str) -> int:
    if not re.fullmatch(r"\d+", s) or not 1 <= int(s) <= MAX_TUNE_STEPS:
        raise _fail(text, f"+tune={s!r}: STEPS must be a whole number from 1 to {MAX_TUNE_STEPS}")
    return int(s)
