"""Knowledge distillation on the CPU: the loss (forward / reverse KL over the teacher's top-k + rest
bins, cross-entropy on the text, hidden-state matching, temperature) and one training loop for any
student (Adam, a budget in CPU-minutes or tokens, evaluation curve, atomic checkpoints that resume)."""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as ckpt

from ..errors import JisuError
from .distill_cache import HEAD_SLICE, Targets

KL_KINDS = ("forward", "reverse")
WARMUP = 8               # Adam steps of linear learning-rate warm-up
LR_FLOOR = 0.1           # the cosine decay ends at this fraction of the learning rate


@dataclass(frozen=True)
class DistillConfig:
    """What the loop trains for and with. The budget is `minutes` of CPU time (the process's CPU
    seconds / threads / 60, training only: evaluation and checkpoints are not counted) and / or
    `tokens`; the loop stops at the first one reached."""
    minutes: Optional[float] = None
    tokens: Optional[int] = None
    kl: str = "forward"            # forward: KL(teacher || student); reverse: KL(student || teacher)
    kl_weight: float = 1.0         # 0: no teacher (plain cross-entropy training)
    ce: float = 0.0                # weight of the cross-entropy on the text's next tokens
    hidden: float = 0.0            # weight of the final hidden states' MSE (relative to the teacher's mean square)
    temperature: float = 1.0
    lr: float = 1e-4
    batch: int = 4                 # windows per Adam step
    clip: float = 1.0              # gradient norm clipping (0: none)
    seed: int = 0
    eval_every: Optional[float] = None  # CPU-minutes between evaluations (None: an eighth of `minutes`, else 1)
    checkpoint_every: float = 60.0  # wall seconds between checkpoints (0: after every step)
    threads: Optional[int] = None  # the CPU-minute divisor (default: torch's thread count)

    def __post_init__(self):
        def bad(what):
            raise JisuError(f"distill: {what}")
        if self.minutes is None and self.tokens is None:
            bad("a budget is required (minutes=N or tokens=T)")
        if self.minutes is not None and not (isinstance(self.minutes, (int, float)) and math.isfinite(self.minutes)
                                             and self.minutes > 0):
            bad(f"minutes must be a number > 0 (got {self.minutes!r})")
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, int)
                                        or self.tokens < 1):
            bad(f"tokens must be a whole number >= 1 (got {self.tokens!r})")
        if self.kl not in KL_KINDS:
            bad(f"kl must be one of {', '.join(KL_KINDS)} (got {self.kl!r})")
        for name in ("kl_weight", "ce", "hidden"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                bad(f"{name} must be a number >= 0 (got {v!r})")
        if self.kl_weight == 0 and self.ce == 0 and self.hidden == 0:
            bad("every loss weight is 0: nothing to train")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            bad(f"temperature must be > 0 (got {self.temperature!r})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"lr must be > 0 (got {self.lr!r})")
        if not (isinstance(self.batch, int) and self.batch >= 1):
            bad(f"batch must be >= 1 (got {self.batch!r})")


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def bin_divergence(logits: torch.Tensor, t: Targets, kind: str = "forward", temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL between the teacher's and the student's (k + 1)-bin distributions (the teacher's
    top-k tokens and one bin for the rest), [..]. forward: KL(teacher || student) (a lower bound of
    the full KL); reverse: KL(student || teacher). A temperature tempers both binned distributions
    (the rest bin as one outcome) and scales the result by temperature^2."""
    lq = torch.log_softmax(logits.float() / temperature, dim=-1)
    q_k = lq.gather(-1, t.ix)
    q = torch.cat([q_k, (1.0 - q_k.exp().sum(-1, keepdim=True)).clamp_min(1e-12).log()], -1)
    p = torch.cat([t.lp, t.rest.clamp_min(1e-12).log().unsqueeze(-1)], -1)
    if temperature != 1.0:
        p = torch.log_softmax(p / temperature, dim=-1)
    kl = (p.exp() * (p - q)).sum(-1) if kind == "forward" else (q.exp() * (q - p)).sum(-1)
    return kl * temperature ** 2


class Student:
    """What the loop needs of a student: features(ids) -> [B, T, F] and head(features) -> logits
    [B, T, V]; `width` is F when the features are final hidden states (hidden-state matching), else
    None. as_student() builds one for any module."""

    def __init__(self, features: Callable, head: Callable, width: Optional[int] = None):
        self.features, self.head, self.width = features, head, width


def as_student(module) -> Student:
    """A Student for a module that has distill_features / distill_head (jisu's own students), an
    LSTM language model (embedding -> nn.LSTM -> projection -> head), or any module whose
    forward(ids) returns logits [B, T, V] or (logits, state)."""
    if isinstance(module, Student):
        return module
    if hasattr(module, "distill_features"):
        return Student(module.distill_features, module.distill_head, getattr(module, "distill_width", None))
    inner = getattr(module, "model", None)
    if isinstance(getattr(inner, "lstm", None), torch.nn.LSTM) and hasattr(inner, "embed_tokens"):
        def features(ids):
            out, _ = inner.lstm(inner.embed_tokens(ids))
            return inner.proj(out) if getattr(inner, "proj", None) is not None else out

        def head(h):
            w = inner.embed_tokens.weight if module.lm_head is None else module.lm_head.weight
            return F.linear(h, w)
        return Student(features, head, inner.embed_tokens.weight.shape[1])

    def logits(ids):
        out = module(ids)
        return out[0] if isinstance(out, tuple) else out
    return Student(logits, lambda x: x, None)


def distill_loss(student: Student, ids: torch.Tensor, t: Optional[Targets], c: DistillConfig,
                 checkpoint: bool = True) -> tuple[torch.Tensor, dict]:
    """The weighted loss on windows `ids` [B, T] with the teacher's targets `t` (their rows, or None
    without a teacher): the head and the loss run a slice of positions at a time, recomputed in the
    backward pass when `checkpoint`. Returns (loss, parts as floats)."""
    h = student.features(ids)
    B, T = ids.shape
    use_kl = c.kl_weight > 0 and t is not None
    zero = h.new_zeros(())
    parts = {"kl": zero, "ce": zero, "hidden": zero}

    def piece(hh, lp, ix, rest, nxt):
        logits = student.head(hh)
        kl = (bin_divergence(logits, Targets(lp, ix, rest), c.kl, c.temperature).sum() if use_kl else zero)
        ce = zero
        if c.ce > 0 and nxt.shape[1] > 0:
            n = nxt.shape[1]
            ce = F.cross_entropy(logits[:, :n].reshape(-1, logits.shape[-1]).float(), nxt.reshape(-1), reduction="sum")
        return kl, ce

    for t0 in range(0, T, HEAD_SLICE):
        sl = slice(t0, min(T, t0 + HEAD_SLICE))
        nxt = ids[:, t0 + 1:min(T, t0 + HEAD_SLICE + 1)]
        args = ((t.lp[:, sl], t.ix[:, sl], t.rest[:, sl]) if use_kl else (zero, zero, zero))
        kl, ce = (ckpt(piece, h[:, sl], *args, nxt, use_reentrant=False) if checkpoint and torch.is_grad_enabled()
                  else piece(h[:, sl], *args, nxt))
        parts["kl"] = parts["kl"] + kl
        parts["ce"] = parts["ce"] + ce
    parts["kl"] = parts["kl"] / (B * T)
    parts["ce"] = parts["ce"] / (B * (T - 1)) if T > 1 else zero
    if c.hidden > 0 and t is not None and t.hidden is not None:
        parts["hidden"] = (h.float() - t.hidden).pow(2).mean() / t.hidden.pow(2).mean().clamp_min(1e-12)
    loss = (c.kl_weight * parts["kl"] if use_kl else zero) + c.ce * parts["ce"] + c.hidden * parts["hidden"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def check_student(student: Student, c: DistillConfig, targets: Optional[Targets], vocab: Optional[int] = None) -> None:
    """One-line errors before any work: hidden-state matching without matching widths, no teacher."""
    if c.kl_weight > 0 and targets is None:
        raise JisuError("distill: KL needs the teacher's targets")
    if c.hidden > 0:
        if targets is None or targets.hidden is None:
            raise JisuError("distill: hidden=W needs the teacher's hidden states")
        if student.width != targets.hidden.shape[-1]:
            raise JisuError(f"distill: hidden=W needs a student of the teacher's width {targets.hidden.shape[-1]} "
                            f"(the student's final features: {student.width})")


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    cpu_s: float = 0.0          # training CPU seconds / threads
    wall_s: float = 0.0         # training wall seconds
    pos: int = 0
    order: Optional[torch.Tensor] = None
    gen: Optional[torch.Tensor] = None
    next_eval: float = 0.0      # cpu_s of the next evaluation
    curve: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    done: bool = False


def _groups(params) -> list[dict]:
    params = list(params)
    if params and isinstance(params[0], dict):
        return [dict(g) for g in params]
    return [{"params": params}]


def train_loop(loss_fn: Callable, params, samples: int, tokens_per_sample: int, config: DistillConfig, *,
               checkpoint_path: Optional[str] = None, signature: str = "", evaluate: Optional[Callable] = None,
               progress: bool = False, desc: str = "distill", on_step: Optional[Callable] = None) -> dict:
    """Adam over `params` (tensors, or param groups with their own "lr") on loss_fn(pick) -> (loss,
    parts), `pick` the indices of `config.batch` of the `samples` windows in a seeded order (a new
    permutation each epoch), until the budget is spent; warm-up then cosine decay over the budget.

    `evaluate()` -> float is called at the start, every `eval_every` CPU-minutes and at the end:
    the curve (step, tokens, cpu_minutes, wall_minutes, value) comes back in the result.
    `checkpoint_path`: the state (weights, Adam, data order, generator, budget used, curve) is
    written there atomically every `checkpoint_every` wall seconds and at the end; a rerun with the
    same path and `signature` resumes from it and ends with the same weights as a run that was never
    stopped (for a token budget; a CPU-minute budget ends where the CPU time runs out).
    `on_step(step)` runs after each step (tests inject a crash there)."""
    from tqdm import tqdm

    c = config
    groups = _groups(params)
    for g in groups:
        g.setdefault("lr", c.lr)
        g["base_lr"] = g["lr"]
    tensors = [p for g in groups for p in g["params"]]
    opt = torch.optim.Adam(groups)
    threads = c.threads or torch.get_num_threads()
    batch = min(c.batch, samples)
    st = _State()
    gen = torch.Generator().manual_seed(c.seed)
    resumed = False
    if checkpoint_path and os.path.exists(checkpoint_path):
        saved = torch.load(checkpoint_path, weights_only=False)
        if saved.get("signature") == signature and len(saved["params"]) == len(tensors):
            with torch.no_grad():
                for p, v in zip(tensors, saved["params"]):
                    p.copy_(v)
            opt.load_state_dict(saved["opt"])
            st = _State(**saved["state"])
            gen.set_state(st.gen)
            resumed = True
    if st.order is None:
        st.order = torch.randperm(samples, generator=gen)

    def budget_fraction() -> float:
        f = 0.0
        if c.minutes is not None:
            f = max(f, st.cpu_s / 60.0 / c.minutes)
        if c.tokens is not None:
            f = max(f, st.tokens / c.tokens)
        return f

    def save() -> None:
        if not checkpoint_path:
            return
        st.gen = gen.get_state()
        tmp = f"{checkpoint_path}.tmp-{os.getpid()}"
        torch.save({"signature": signature, "params": [p.detach().clone() for p in tensors],
                    "opt": opt.state_dict(), "state": asdict(st)}, tmp)
        os.replace(tmp, checkpoint_path)

    def run_eval() -> None:
        if evaluate is None:
            return
        value = float(evaluate())
        st.curve.append({"step": st.step, "tokens": st.tokens, "cpu_minutes": st.cpu_s / 60.0,
                         "wall_minutes": st.wall_s / 60.0, "value": value})
        every = c.eval_every if c.eval_every is not None else (c.minutes / 8 if c.minutes is not None else 1.0)
        st.next_eval = st.cpu_s + every * 60.0

    if not st.done and not st.curve:
        run_eval()
    last_save = time.perf_counter()
    total = c.tokens if c.minutes is None else None
    bar = tqdm(total=total, initial=st.tokens, desc=desc, unit="tok", disable=not progress)
    while not st.done and budget_fraction() < 1.0:
        if st.pos + batch > samples:
            st.order, st.pos = torch.randperm(samples, generator=gen), 0
        pick = st.order[st.pos:st.pos + batch]
        st.pos += batch
        f = budget_fraction()
        scale = min(1.0, (st.step + 1) / WARMUP) * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * f)))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        c0, w0 = time.process_time(), time.perf_counter()
        loss, parts = loss_fn(pick)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if c.clip > 0:
            torch.nn.utils.clip_grad_norm_(tensors, c.clip)
        opt.step()
        dc, dw = (time.process_time() - c0) / threads, time.perf_counter() - w0
        st.cpu_s += dc
        st.wall_s += dw
        st.step += 1
        n = len(pick) * tokens_per_sample
        st.tokens += n
        st.losses.append(float(loss.detach()))
        bar.update(n)
        bar.set_postfix(loss=f"{st.losses[-1]:.4f}", tok_s=f"{n / max(dw, 1e-9):.0f}",
                        cpu_min=f"{st.cpu_s / 60:.2f}")
        if evaluate is not None and st.cpu_s >= st.next_eval:
            run_eval()
        if on_step is not None:
            on_step(st.step)
        if checkpoint_path and time.perf_counter() - last_save >= c.checkpoint_every:
            save()
            last_save = time.perf_counter()
    bar.close()
    if not st.done:
        if evaluate is not None and (not st.curve or st.curve[-1]["step"] != st.step):
            run_eval()
        st.done = True
        save()
    return {"steps": st.step, "tokens": st.tokens, "cpu_minutes": st.cpu_s / 60.0, "wall_minutes": st.wall_s / 60.0,
            "threads": threads, "loss_first": st.losses[0] if st.losses else None,
            "loss_last": st.losses[-1] if st.losses else None, "curve": st.curve, "resumed": resumed}


def distill(student, ids: torch.Tensor, targets: Optional[Targets], config: DistillConfig, *, params=None,
            checkpoint_path: Optional[str] = None, signature: str = "", evaluate: Optional[Callable] = None,
            progress: bool = False, on_step: Optional[Callable] = None) -> dict:
    """Train `student` (a module, see as_student) on the windows `ids` [S, T] against the teacher's
    `targets` on them (distill_cache.teacher_targets; None with kl_weight 0) by `config`. `params`:
    what to train (default: the module's parameters that require grad). Returns the loop's figures."""
    s = as_student(student)
    check_student(s, config, targets)
    if params is None:
        params = [p for p in student.parameters() if p.requires_grad]

    def loss_fn(pick):
        return distill_loss(s, ids[pick], None if targets is None else targets.rows(pick), config)

    return train_loop(loss_fn, params, ids.shape[0], ids.shape[1], config, checkpoint_path=checkpoint_path,
                      signature=signature, evaluate=evaluate, progress=progress, on_step=on_step)


@torch.no_grad()
def heldout_divergence(student, ids: torch.Tensor, targets: Targets, batch: int = 4, kind: str = "forward") -> float:
    """Mean binned KL (bin_divergence, temperature 1) of `student` on held-out windows: the curve's value."""
    s = as_student(student)
    tot = 0.0
    for s0 in range(0, ids.shape[0], batch):
        sl = slice(s0, min(ids.shape[0], s0 + batch))
        h = s.features(ids[sl])
        t = targets.rows(sl)
        for t0 in range(0, ids.shape[1], HEAD_SLICE):
            p = slice(t0, t0 + HEAD_SLICE)
            tot += float(bin_divergence(s.head(h[:, p]), Targets(t.lp[:, p], t.ix[:, p], t.rest[:, p]), kind).sum())
    return tot / ids.numel()


@torch.no_grad()
def heldout_perplexity(student, ids: torch.Tensor, batch: int = 4) -> float:
    """Perplexity of `student` on the next tokens of held-out windows `ids` [S, T]."""
    s = as_student(student)
    nll, n = 0.0, 0
    for s0 in range(0, ids.shape[0], batch):
        x = ids[s0:s0 + batch]
        h = s.features(x)
        for t0 in range(0, x.shape[1] - 1, HEAD_SLICE):
            t1 = min(x.shape[1] - 1, t0 + HEAD_SLICE)
            logits = s.head(h[:, t0:t1]).float()
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, t0 + 1:t1 + 1].reshape(-1),
                                         reduction="sum"))
            n += x[:, t0 + 1:t1 + 1].numel()
    return math.exp(nll / n)
