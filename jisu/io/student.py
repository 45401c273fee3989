"""A trained student model (jisu.models.lstm) written as a jisu artifact folder: float32 weights in
model.safetensors, the teacher's tokenizer, the training figures in the manifest; built in a temp
folder next to the target and renamed into place, so `jisu.load(folder)` sees all of it or nothing."""
from __future__ import annotations

import os
import shutil

import torch

from ..config import ModelConfig
from ..errors import JisuError
from .artifact import CONFIG, config_from_dict, is_artifact, replace_folder, verify_artifact, write_artifact
from .sources import ModelSource, resolve


def source_config(source: ModelSource) -> ModelConfig:
    """The ModelConfig of a resolved model source, read from its header / config file only."""
    if source.kind == "gguf":
        from .gguf import GGUFFile, gguf_config

        return gguf_config(GGUFFile(source.path))
    if source.kind == "artifact":
        from .hf import read_json

        path = os.path.join(source.path, CONFIG)
        return config_from_dict(read_json(path), path)
    from .hf import hf_config

    return hf_config(source.path)


def check_student_vocab(cfg: ModelConfig, teacher: ModelSource, teacher_cfg: ModelConfig | None = None) -> None:
    """One-line refusal of a student whose vocabulary is not its teacher's (the tokenizer is the teacher's)."""
    t = teacher_cfg or source_config(teacher)
    if cfg.vocab_size != t.vocab_size:
        raise JisuError(f"student vocabulary of {cfg.vocab_size} tokens differs from the teacher {teacher.path}'s "
                        f"{t.vocab_size}; a student takes its teacher's tokenizer and vocabulary")


def _replace(tmp: str, out: str) -> None:
    """Rename `tmp` to `out`; an existing artifact (or empty folder) at `out` goes only now."""
    if os.path.lexists(out) and not (is_artifact(out) or (os.path.isdir(out) and not os.listdir(out))):
        raise JisuError(f"{out}: exists and is not a jisu artifact folder; not replacing it")
    replace_folder(tmp, out)


def save_student(model, folder, *, tokenizer_from: str, meta: dict) -> None:
    """Write `model` (a trainable jisu.models.lstm.LSTMModel) as an artifact at `folder` that
    jisu.load reads: its float32 weights (a tied head stored once), config.json, the tokenizer of
    the teacher `tokenizer_from` (a path or name, as jisu.io.sources resolves it) and `meta` (the
    training figures) under "distill" in manifest.json. An existing artifact at `folder` is
    replaced only by the final rename."""
    if not getattr(model, "trainable", False):
        raise JisuError("save_student: the model holds packed (quantized) weights; save it with jisu compress")
    cfg = model.cfg
    teacher = resolve(tokenizer_from)
    check_student_vocab(cfg, teacher)
    out = os.path.abspath(os.fspath(folder))
    parent, base = os.path.split(out)
    if not os.path.isdir(parent):
        raise JisuError(f"{folder}: parent folder {parent} does not exist")
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    try:
        tensors = {n: t.detach().to(torch.float32).contiguous() for n, t in model.weights().items()}
        n_params = sum(t.numel() for t in tensors.values())
        manifest = {
            "source": {"path": os.path.abspath(teacher.path), "kind": teacher.kind, "name": teacher.name,
                       "role": "teacher (tokenizer and vocabulary)"},
            "recipe": {"text": f"student {model.spec.text}", "student": True},
            "bits_per_weight": {"total": 32.0, "linear": 32.0},
            "params": {"total": n_params},
            "distill": dict(meta),
        }
        write_artifact(tmp, cfg, tensors, manifest, source_kind=teacher.kind, source_path=teacher.path)
        verify_artifact(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
