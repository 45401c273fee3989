"""The `distill:` recipe step (jisu.compress.distill_step) and block-local reconstruction on a tiny
transformer: it heals a damaged float model before quantization, tunes the quantized model's scales
after it, parses strictly, and reconstruction lowers every layer's error."""
from __future__ import annotations

import json

import pytest
import torch

import jisu
from jisu.compress import steps as steps_mod
from jisu.compress.distill import DistillConfig, heldout_divergence
from jisu.compress.distill_cache import CACHE_ENV, decoder_teacher, teacher_targets
from jisu.compress.distill_local import default_layer_map, reconstruct_layers
from jisu.compress.distill_step import DecoderStudent
from jisu.compress.recipe import RecipeError, parse_recipe
from jisu.errors import JisuError

from .conftest import FAST

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


class _Noise:
    """noise:X — adds X * randn to every linear of layer 0 (a damaged model to heal)."""
    form = "noise:X"

    def parse(self, rest, fail):
        return float(rest)

    def check(self, x, cfg):
        pass

    def apply(self, x, ctx):
        g = torch.Generator().manual_seed(0)
        for n, t in list(ctx.weights.items()):
            if n.startswith("model.layers.0.") and t.dim() == 2:
                ctx.weights[n] = t + x * torch.randn(t.shape, generator=g)
        return {}


@pytest.fixture
def noise(monkeypatch):
    steps_mod.transforms()
    monkeypatch.setattr(steps_mod, "TRANSFORMS", dict(steps_mod.TRANSFORMS))
    steps_mod.transform("noise", before=True, after=False)(_Noise)


def _steps(out):
    with open(out / "manifest.json") as f:
        return json.load(f)["steps"]


def test_distill_before_quantization_heals_a_damaged_model(noise, tiny_hf, tmp_path):
    out = tmp_path / "out"
    jisu.compress.compress(tiny_hf, str(out), "noise:0.2,distill:tokens=3000:lr=3e-3,rtn:w8", **FAST)
    d = _steps(out)[1]
    assert d["step"] == "distill:tokens=3000:lr=3e-3" and d["kept"] and d["tokens"] >= 3000
    assert d["heldout_kl_after"] < 0.9 * d["heldout_kl_before"]
    assert not (tmp_path / ".out.work").exists()


def test_distill_after_quantization_tunes_the_scales(tiny_hf, tmp_path):
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    r0 = jisu.compress.compress(tiny_hf, str(plain), "rtn:w3g32", **FAST)
    r1 = jisu.compress.compress(tiny_hf, str(tuned), "rtn:w3g32,distill:tokens=2000", **FAST)
    d = _steps(tuned)[0]
    assert d["kept"] and d["heldout_kl_after"] < d["heldout_kl_before"]
    assert r1.artifact_bytes == r0.artifact_bytes
    assert r1.quality["kld_mean"] < r0.quality["kld_mean"]


def test_local_reconstruction_lowers_every_layers_error(tiny_hf):
    from jisu.io.sources import load_weights, resolve

    cfg, w, _ = load_weights(resolve(tiny_hf))
    teacher = {n: t.float() for n, t in w.items()}
    g = torch.Generator().manual_seed(1)
    student = {n: (t + 0.1 * torch.randn(t.shape, generator=g) if n.startswith("model.layers.") and t.dim() == 2
                   else t) for n, t in teacher.items()}
    ids = torch.randint(0, cfg.vocab_size, (8, 32), generator=g)
    held, _ = teacher_targets("tiny", ids, decoder_teacher(cfg, teacher), k=16)
    kl0 = heldout_divergence(DecoderStudent(cfg, student), ids, held)
    before = dict(student)
    info = reconstruct_layers(cfg, student, cfg, teacher, ids, DistillConfig(tokens=3000, lr=1e-2))
    assert info["layer_map"] == list(range(cfg.num_layers))
    assert all(x["mse_after"] < 0.6 * x["mse_before"] for x in info["layers"])
    assert heldout_divergence(DecoderStudent(cfg, student), ids, held) < kl0
    assert all(before[n] is not student[n] for n in student if n.startswith("model.layers."))  # new tensors


def test_layer_map_and_width_checks():
    assert default_layer_map(4, 4) == [0, 1, 2, 3]
    assert default_layer_map(2, 6) == [2, 5]
    with pytest.raises(JisuError, match="increasing"):
        from jisu.compress.distill_local import check_layer_map
        check_layer_map([1, 1], 2, 4)


@pytest.mark.parametrize("recipe,msg", [
    ("distill,rtn:w8", "a budget is required"),
    ("distill:minutes=0,rtn:w8", "minutes must be a number > 0"),
    ("distill:tokens=0,rtn:w8", "tokens must be a whole number >= 1"),
    ("distill:tokens=1.5,rtn:w8", "must be a whole number"),
    ("distill:minutes=x,rtn:w8", "is not a number"),
    ("distill:minutes=5:kl=sideways,rtn:w8", "kl must be one of"),
    ("distill:minutes=5:colour=red,rtn:w8", "unknown option"),
    ("distill:minutes=5:minutes=6,rtn:w8", "given twice"),
    ("distill:minutes=5:gen=-1,rtn:w8", "gen='-1' must be a whole number >= 0"),
    ("distill:minutes=5:gen=2.5,rtn:w8", "must be a whole number"),
    ("distill:minutes=5:local:gen=4,rtn:w8", "not :local"),
])
def test_bad_step_is_one_line(recipe, msg):
    with pytest.raises(RecipeError, match=msg) as e:
        parse_recipe(recipe)
    assert "\n" not in str(e.value) and "distill:minutes=N" in str(e.value)


def test_local_after_quantization_is_refused(tiny_hf, tmp_path):
    r = parse_recipe("rtn:w8,distill:minutes=1:local")
    assert r.after[0].params.local
    with pytest.raises(JisuError, match="before the quantization step"):
        jisu.compress.compress(tiny_hf, str(tmp_path / "out"), r, **FAST)
    assert not (tmp_path / "out").exists()


def test_teacher_text_is_reproducible_cached_and_resumes(tiny_hf, tmp_path, monkeypatch):
    """The teacher's own windows: [n, seq_len] ids starting at visible tokens, the same on a rerun
    (read from the cache) and after a crash between chunks (resumed from the windows written)."""
    from jisu.compress import distill_gen
    from jisu.compress.distill_cache import weights_fingerprint
    from jisu.compress.steps import dense_float
    from jisu.compress.stream import load_streamed
    from jisu.io.sources import resolve

    cfg, weights, tok = load_streamed(resolve(tiny_hf))
    weights = dense_float(weights)
    tid = weights_fingerprint(cfg, weights)
    monkeypatch.setattr(distill_gen, "CHUNK", 2)
    a, info = distill_gen.teacher_windows(cfg, weights, tok, tid, 5, 12, root=str(tmp_path / "a"))
    assert a.shape == (5, 12) and not info["cached"] and a.max() < cfg.vocab_size
    assert all(tok.decode([int(t)]).strip() for t in a[:, 0])
    assert len({tuple(r) for r in a.tolist()}) == 5
    again, info = distill_gen.teacher_windows(cfg, weights, tok, tid, 5, 12, root=str(tmp_path / "a"))
    assert info["cached"] and torch.equal(again, a)
    real, calls = distill_gen._save, []

    def crash_after_first_chunk(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(obj, path)

    monkeypatch.setattr(distill_gen, "_save", crash_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        distill_gen.teacher_windows(cfg, weights, tok, tid, 5, 12, root=str(tmp_path / "b"))
    monkeypatch.setattr(distill_gen, "_save", real)
    resumed, info = distill_gen.teacher_windows(cfg, weights, tok, tid, 5, 12, root=str(tmp_path / "b"))
    assert torch.equal(resumed, a) and not info["cached"]


def test_distill_with_teacher_text(tiny_hf, tmp_path):
    out = tmp_path / "out"
    r0 = jisu.compress.compress(tiny_hf, str(tmp_path / "plain"), "rtn:w3g32", **FAST)
    jisu.compress.compress(tiny_hf, str(out), "rtn:w3g32,distill:tokens=2000:gen=6", **FAST)
    d = _steps(out)[0]
    assert d["teacher_text"]["windows"] == 6 and d["kept"] and d["heldout_kl_after"] < d["heldout_kl_before"]
    assert r0.artifact_bytes > 0
