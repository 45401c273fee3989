"""jisu compress on an LSTM student (jisu.compress.lstm): rtn / gptq artifacts load, run through the
recurrent runner on packed weights and are measured against the float student; other recipes refused."""
from __future__ import annotations

import json

import pytest
import torch

import jisu
import jisu.compress
from jisu.config import SamplingParams
from jisu.engine.engine import Engine
from jisu.errors import JisuError
from jisu.kernels.packed import PackedInt
from jisu.models.lstm import HEAD, linear_names
from tests.compress.conftest import FAST, write_tiny_hf
from tests.engine.test_recurrent import lively_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    from jisu.io.student import save_student

    root = tmp_path_factory.mktemp("lstm_compress")
    teacher = write_tiny_hf(str(root / "teacher"))
    save_student(lively_student(teacher), root / "student", tokenizer_from=teacher, meta={"minutes": 0})
    return str(root / "student")


def test_rtn_w8_loads_and_runs(student, tmp_path):
    out = tmp_path / "q8"
    m = jisu.compress.compress(student, str(out), "rtn:w8g32", **FAST).manifest
    assert abs(m["bits_per_weight"]["linear"] - 8.5) < 1e-9
    assert 0 < m["quality"]["kld_mean"] < 0.01 and m["quality"]["top1_agreement"] > 0.9
    llm = jisu.load(str(out))
    assert all(isinstance(llm.model.w[n], PackedInt) for n in linear_names(llm.config))
    assert HEAD not in llm.model.w       # tied: the head runs on the packed embedding
    p = llm.tokenizer.encode("the cat in the hat")
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = llm.generate(p, greedy).token_ids
    assert len(ref) == 8
    others = [llm.tokenizer.encode(t) for t in ("he the", "in in the then")]
    batched = Engine.from_llm(llm, num_blocks=64, block_size=4).generate([p] + others, greedy)
    assert batched[0]["token_ids"] == ref


def test_gptq_w4_beats_rtn_on_its_inputs(student, tmp_path):
    m = jisu.compress.compress(student, str(tmp_path / "g4"), "gptq:w4g32", **FAST).manifest
    layers = m["layers"]
    assert set(layers) == set(linear_names(jisu.load(student).config))
    assert sum(e["err"] for e in layers.values()) < sum(e["rtn_err"] for e in layers.values())
    assert abs(m["bits_per_weight"]["linear"] - 4.5) < 1e-9
    llm = jisu.load(str(tmp_path / "g4"))
    assert len(llm.generate("the cat", temperature=0, max_tokens=4, ignore_eos=True).token_ids) == 4


def test_head_option_unties_the_head(student, tmp_path):
    jisu.compress.compress(student, str(tmp_path / "h"), "rtn:w4g32+head=w8g32", **FAST)
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["tie_embeddings"] is False
    llm = jisu.load(str(tmp_path / "h"))
    assert isinstance(llm.model.w[HEAD], PackedInt)
    ids = torch.tensor([[5, 9, 100, 42]])
    with torch.no_grad():
        assert torch.isfinite(llm.model(ids)[0]).all()


@pytest.mark.parametrize("recipe", ["awq:w4g32", "mixed:bpw=4", "rtn:w4g32+tune=2"])
def test_decoder_only_recipes_are_refused(student, tmp_path, recipe):
    with pytest.raises(JisuError) as e:
        jisu.compress.compress(student, str(tmp_path / "x"), recipe, **FAST)
    assert "\n" not in str(e.value) and "LSTM" in str(e.value)
    assert list(tmp_path.iterdir()) == []
