"""Gemma through compression: its (1 + w) norms, post-norms, GeLU and soft-capping in the one model
that compression observes. AWQ folds 1/s into Gemma's norms (stored in source form), mixed runs
the Fisher pass and +tune trains the norms; every artifact loads to the in-memory model's logits."""
from __future__ import annotations

import os

import pytest
import torch

import jisu
from jisu.compress import pipeline
from jisu.io import artifact
from jisu.models.layers import CausalContext

from .test_artifact import quantize

pytest.importorskip("transformers")

TOKENS = torch.tensor([[5, 17, 42, 99, 7, 60, 3, 11, 64, 28, 20, 31]])


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory) -> str:
    from tests.fixtures import CASES, build_hf_model, save_hf

    folder = str(tmp_path_factory.mktemp("compress") / "gemma3")
    save_hf(build_hf_model(CASES["gemma3"]), folder)
    return folder


def logits(model):
    return model.forward(TOKENS, CausalContext())


@pytest.mark.parametrize("recipe", ["gptq:w4g32", "awq:w4g32", "mixed:bpw=4.5", "rtn:w4g32+tune=4"])
def test_gemma_round_trip(tiny_gemma, tmp_path, recipe):
    source, qz = quantize(tiny_gemma, recipe)
    assert qz.cfg.family == "gemma"
    expected = logits(pipeline.build_quantized_model(qz, native=False))
    folder = str(tmp_path / "art")
    os.mkdir(folder)
    artifact.write_artifact(folder, qz.cfg, qz.tensors, {"recipe": {"text": recipe}}, source_kind=source.kind,
                            source_path=source.path)
    assert torch.equal(logits(jisu.load(folder, native=False).model), expected)
    reference = logits(jisu.load(tiny_gemma, native=False).model)
    kl = torch.nn.functional.kl_div(expected.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert torch.isfinite(kl) and kl < 0.5
