"""Block-local reconstruction: each decoder layer of a (pruned) student trained alone, one after the
other, so its output on the student's own inputs matches the teacher's layer output (MSE on the
calibration activations); cheap healing before (or instead of) a global distillation."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import torch

from ..errors import JisuError
from .distill import DistillConfig, train_loop
from .distill_cache import tensor_sha, weights_fingerprint
from .observe import CTX, ReferenceNumerics, batches, compression_model, embed_all, model_form


def default_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer whose output each student layer is trained to give: the same layer when the
    depths are equal, else evenly spread (student layer j -> teacher layer round((j+1) * Lt / Ls) - 1)."""
    if student_layers == teacher_layers:
        return list(range(teacher_layers))
    return [max(0, round((j + 1) * teacher_layers / student_layers) - 1) for j in range(student_layers)]


def check_layer_map(layer_map: Sequence[int], student_layers: int, teacher_layers: int) -> list[int]:
    m = [int(v) for v in layer_map]
    if len(m) != student_layers or any(not 0 <= v < teacher_layers for v in m) or any(
            b <= a for a, b in zip(m, m[1:])):
        raise JisuError(f"distill: layer map {m} must give each of the student's {student_layers} layers a "
                        f"teacher layer in [0, {teacher_layers}), increasing")
    return m


def _advance(model, i: int, X: torch.Tensor, batch: int) -> None:
    with torch.no_grad():
        for sl in batches(X.shape[0], batch):
            X[sl] = model.layer(i, X[sl], CTX)


def reconstruct_layers(cfg, weights: dict, teacher_cfg, teacher_weights: dict, ids: torch.Tensor,
                       config: DistillConfig, *, layer_map: Optional[Sequence[int]] = None,
                       workdir: Optional[str] = None, progress: bool = False) -> dict:
    """Train every layer j of the student (`cfg`, float `weights` in source form; its layer tensors
    are replaced by new ones, never changed in place) so that layer j, fed the student's own hidden
    states (the embedding, then the layers already trained), gives the teacher's hidden states after
    teacher layer layer_map[j] (default_layer_map) on the calibration windows `ids` [S, T]. Loss: MSE
    relative to the teacher's mean square. The budget of `config` (minutes / tokens) is split evenly
    over the layers; Adam at config.lr. `workdir`: per-layer checkpoints (a rerun resumes). The
    widths of the residual stream must be equal. Returns the figures per layer."""
    if cfg.hidden_size != teacher_cfg.hidden_size:
        raise JisuError(f"distill: block-local reconstruction needs the teacher's width {teacher_cfg.hidden_size} "
                        f"(the student has {cfg.hidden_size})")
    L = cfg.num_layers
    m = check_layer_map(layer_map if layer_map is not None else default_layer_map(L, teacher_cfg.num_layers),
                        L, teacher_cfg.num_layers)
    per = dataclasses.replace(config, minutes=None if config.minutes is None else config.minutes / L,
                              tokens=None if config.tokens is None else max(1, config.tokens // L),
                              kl_weight=0.0, ce=0.0, hidden=1.0)
    teacher = compression_model(teacher_cfg, model_form(teacher_cfg, teacher_weights), ReferenceNumerics(exact=True))
    student = compression_model(cfg, model_form(cfg, weights), ReferenceNumerics(exact=True))
    batch = config.batch
    Xt = embed_all(teacher, ids, batch)
    Xs = embed_all(student, ids, batch)
    ids_sha = tensor_sha(ids)
    done_t = -1
    layers = []
    for j in range(L):
        for i in range(done_t + 1, m[j] + 1):
            _advance(teacher, i, Xt, batch)
        done_t = m[j]
        prefix = f"model.layers.{j}."
        names = [n for n, t in weights.items() if n.startswith(prefix) and isinstance(t, torch.Tensor)
                 and t.is_floating_point()]
        sig = f"{weights_fingerprint(cfg, {n: weights[n] for n in names})} {ids_sha} layer {j} -> {m[j]} {per}"
        leaves = {n: weights[n].detach().float().clone().requires_grad_() for n in names}
        target_ms = float(Xt.pow(2).mean())

        def loss_fn(pick, j=j, leaves=leaves):
            student.w.update(model_form(cfg, leaves))
            y = student.layer(j, Xs[pick], CTX)
            mse = (y - Xt[pick]).pow(2).mean() / target_ms
            return mse, {"mse": float(mse.detach())}

        def evaluate(j=j, leaves=leaves) -> float:
            with torch.no_grad():
                student.w.update(model_form(cfg, leaves))
                tot = sum(float((student.layer(j, Xs[sl], CTX) - Xt[sl]).pow(2).sum()) for sl in batches(Xs.shape[0], batch))
            return tot / Xt.numel() / target_ms

        path = None
        if workdir is not None:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, f"local-{j}.pt")
        info = train_loop(loss_fn, list(leaves.values()), ids.shape[0], ids.shape[1], per, checkpoint_path=path,
                          signature=sig, evaluate=evaluate, progress=progress,
                          desc=f"distill: layer {j}")
        for n, p in leaves.items():
            weights[n] = p.detach().clone()
        student.w.update(model_form(cfg, {n: weights[n] for n in names}))
        _advance(student, j, Xs, batch)
        layers.append({"layer": j, "teacher_layer": m[j], "mse_before": info["curve"][0]["value"],
                       "mse_after": info["curve"][-1]["value"], "steps": info["steps"], "tokens": info["tokens"],
                       "cpu_minutes": info["cpu_minutes"]})
    return {"mode": "local", "layer_map": m, "layers": layers,
            "cpu_minutes": sum(x["cpu_minutes"] for x in layers), "tokens": sum(x["tokens"] for x in layers)}
