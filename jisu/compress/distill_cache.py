"""Teacher targets for distillation: the teacher's top-k next-token log-probs, their token ids and the
probability left to the rest of the vocabulary, on fixed token windows, computed once and cached on
disk per (teacher, token ids, k) under ~/.cache/jisu/distill/<key>/ so every student reuses them."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .observe import CTX, ReferenceNumerics, compression_model, model_form

CACHE_ENV = "JISU_DISTILL_CACHE"   # overrides the cache folder (tests)
TOP_K = 64
HEAD_SLICE = 64                    # positions per LM-head call: no [B, T, V] buffer


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "jisu", "distill")


@dataclass
class Targets:
    """Per window s and position t (predicting token t + 1): the teacher's top-k log-probs `lp`
    [S, T, k] (float16 on disk), token ids `ix` [S, T, k] (int32), the probability of every other token
    `rest` [S, T] (float32) and, when asked for, its final (normed) hidden states `hidden` [S, T, D]."""
    lp: torch.Tensor
    ix: torch.Tensor
    rest: torch.Tensor
    hidden: Optional[torch.Tensor] = None

    @property
    def k(self) -> int:
        return self.lp.shape[-1]

    def rows(self, pick) -> "Targets":
        """The windows `pick` in the training types (float32 log-probs, int64 ids)."""
        return Targets(self.lp[pick].float(), self.ix[pick].long(), self.rest[pick].float(),
                       None if self.hidden is None else self.hidden[pick].float())


def tensor_sha(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(cfg, weights: dict) -> str:
    """sha256 of a model's config and every tensor's bytes (packed weights by their decoded values)."""
    h = hashlib.sha256(repr(cfg).encode())
    for name in sorted(weights):
        t = weights[name]
        t = t if isinstance(t, torch.Tensor) else t.dequantize()
        h.update(f"{name} {tensor_sha(t)}\n".encode())
    return h.hexdigest()


def cache_key(teacher: str, ids: torch.Tensor, k: int) -> str:
    """The cache folder's name: the teacher's fingerprint (source sha256 or weights_fingerprint), the
    windows' token ids (so the text, the tokenizer, the window length and count) and k."""
    return hashlib.sha256(f"{teacher}\n{tensor_sha(ids.long())}\n{k}".encode()).hexdigest()[:32]


def _save(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# a teacher: ids [B, T] -> (top-k log-probs [B, T, k], ids [B, T, k], rest [B, T], final hidden [B, T, D] | None)
TeacherFn = Callable[[torch.Tensor, int, bool], tuple]


def teacher_targets(teacher: str, ids: torch.Tensor, compute: TeacherFn, *, k: int = TOP_K, hidden: bool = False,
                    batch: int = 4, progress: bool = False, root: Optional[str] = None) -> tuple[Targets, dict]:
    """The targets of `compute` on `ids` [S, T]: read from the cache when present, else computed a
    batch of windows at a time (with a progress bar) and written atomically (temp file + rename,
    meta.json last). `hidden`: the final hidden states too (a second file, built when first asked).
    Returns (targets, info: key, folder, cached)."""
    from tqdm import tqdm

    folder = os.path.join(root or cache_root(), cache_key(teacher, ids, k))
    files = {"t": os.path.join(folder, "targets.pt"), "h": os.path.join(folder, "hidden.pt"),
             "m": os.path.join(folder, "meta.json")}
    have_t = os.path.exists(files["m"]) and os.path.exists(files["t"])
    have_h = os.path.exists(files["h"])
    info = {"key": os.path.basename(folder), "folder": folder, "cached": have_t and (have_h or not hidden)}
    if info["cached"]:
        d = torch.load(files["t"])
        return Targets(d["lp"], d["ix"], d["rest"], torch.load(files["h"]) if hidden else None), info
    os.makedirs(folder, exist_ok=True)
    S, T = ids.shape
    lp = torch.empty(S, T, k, dtype=torch.float16)
    ix = torch.empty(S, T, k, dtype=torch.int32)
    rest = torch.empty(S, T)
    hid = None
    for s0 in tqdm(range(0, S, batch), desc="distill: teacher targets", unit="batch", disable=not progress):
        sl = slice(s0, min(S, s0 + batch))
        v, i, r, h = compute(ids[sl], k, hidden)
        lp[sl], ix[sl], rest[sl] = v.to(torch.float16), i.to(torch.int32), r
        if hidden:
            hid = torch.empty(S, T, h.shape[-1], dtype=torch.float16) if hid is None else hid
            hid[sl] = h.to(torch.float16)
    try:
        if not have_t:
            _save({"lp": lp, "ix": ix, "rest": rest}, files["t"])
        if hidden:
            _save(hid, files["h"])
        meta = {"teacher": teacher, "windows": S, "seq_len": T, "k": k, "bytes_per_token": k * 6 + 4}
        with open(files["m"] + f".tmp-{os.getpid()}", "w") as f:
            json.dump(meta, f)
        os.replace(files["m"] + f".tmp-{os.getpid()}", files["m"])
    except OSError:
        if not have_t:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if have_t:  # computed again only for the hidden states: keep the stored targets
        d = torch.load(files["t"])
        lp, ix, rest = d["lp"], d["ix"], d["rest"]
    return Targets(lp, ix, rest, hid), info


def topk_rest(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [..., V] -> top-k log-probs, their ids, the probability of the other tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    v, i = lp.topk(k, dim=-1)
    return v, i, (1.0 - v.double().exp().sum(-1)).clamp_min(0.0).float()


def decoder_teacher(cfg, weights: dict) -> TeacherFn:
    """A transformer teacher over `weights` (source form; packed ones decoded in float32 when used),
    run with compression's exact numerics; the head a few positions at a time."""
    model = compression_model(cfg, model_form(cfg, weights), ReferenceNumerics(exact=True))

    @torch.no_grad()
    def compute(ids, k, hidden):
        x = model.embed(ids)
        for i in range(cfg.num_layers):
            x = model.layer(i, x, CTX)
        h = model.final_hidden(x)
        B, T = ids.shape
        lp, ix = torch.empty(B, T, k), torch.empty(B, T, k, dtype=torch.long)
        rest = torch.empty(B, T)
        for t0 in range(0, T, HEAD_SLICE):
            sl = slice(t0, t0 + HEAD_SLICE)
            lp[:, sl], ix[:, sl], rest[:, sl] = topk_rest(model.head(h[:, sl]), k)
        return lp, ix, rest, (h if hidden else None)

    return compute


def module_teacher(module) -> TeacherFn:
    """A teacher that is any module with forward(ids) -> logits [B, T, V] (or (logits, state))."""
    @torch.no_grad()
    def compute(ids, k, hidden):
        if hidden:
            raise ValueError("module_teacher gives no hidden states")
        out = module(ids)
        return (*topk_rest(out[0] if isinstance(out, tuple) else out, k), None)

    return compute
