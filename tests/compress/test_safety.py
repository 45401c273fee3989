"""Writing is safe: temp folder + verify + rename; refusals without --force; nothing left behind on
failure; bad calibration fails before any work; --max-kld discards a result above it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import jisu
from jisu.compress import pipeline, run
from jisu.errors import JisuError
from jisu.io import artifact

from .conftest import FAST


def tree(path):
    """{relative path: bytes} of a file or folder."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"": f.read()}
    out = {}
    for root, _, files in os.walk(path):
        for n in files:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = f.read()
    return out


def leftovers(folder):
    return [n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n]


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if quantization starts."""
    def boom(*a, **k):
        raise AssertionError("quantization started")
    monkeypatch.setattr(run, "quantize_model", boom)


def test_existing_out_refused_without_force(tiny_hf, tmp_path, no_work):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(JisuError, match="already exists; use --force"):
        jisu.compress.compress(tiny_hf, str(out), "rtn:w4g32", **FAST)
    assert tree(str(out)) == {"keep.txt": b"mine"} and not leftovers(str(tmp_path))


@pytest.mark.parametrize("inside", [False, True])
def test_input_never_overwritten_without_force(tiny_hf, tmp_path, no_work, inside):
    before = tree(tiny_hf)
    target = tiny_hf if not inside else os.path.dirname(tiny_hf)  # OUT is the input, or contains it
    with pytest.raises(JisuError, match="input model"):
        jisu.compress.compress(tiny_hf, target, "rtn:w4g32", **FAST)
    assert tree(tiny_hf) == before


def test_force_replaces_only_at_the_end(tiny_hf, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    seen = []
    real_commit = run.commit

    def spy(tmp, dest, force):
        seen.append(tree(dest))           # the old OUT is still intact when the new one is complete
        assert os.path.isfile(os.path.join(tmp, "manifest.json"))
        assert os.path.basename(tmp) == f".out.tmp-{os.getpid()}"
        return real_commit(tmp, dest, force)

    monkeypatch.setattr(run, "commit", spy)
    jisu.compress.compress(tiny_hf, str(out), "rtn:w4g32", force=True, **FAST)
    assert seen == [{"old.txt": b"old"}]
    assert not (out / "old.txt").exists() and (out / "manifest.json").exists()
    assert not leftovers(str(tmp_path))
    jisu.load(str(out))


def test_crash_mid_write_leaves_nothing(tiny_hf, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = artifact.write_tokenizer

    def crash(folder, *a, **k):  # model.safetensors and config.json are written by now
        real(folder, *a, **k)
        assert os.path.isfile(os.path.join(folder, "model.safetensors"))
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "write_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        jisu.compress.compress(tiny_hf, str(out), "rtn:w4g32", **FAST)
    assert not out.exists() and not leftovers(str(tmp_path))


def test_crash_with_force_keeps_old_out(tiny_hf, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(run, "_measure", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("measure failed")))
    with pytest.raises(RuntimeError):
        jisu.compress.compress(tiny_hf, str(out), "rtn:w4g32", force=True, **FAST)
    assert tree(str(out)) == {"old.txt": b"old"} and not leftovers(str(tmp_path))


@pytest.mark.parametrize("content, name, problem", [
    (b"", "empty.txt", "is empty"),
    (b"   \n\n", "blank.txt", "is empty"),
    (b"\x00\x01\x02binary", "bin.txt", "binary"),
    (b"\xff\xfe bad utf8", "latin.txt", "not UTF-8"),
    (b'{"text": "ok"}\nnot json\n', "bad.jsonl", "line 2 is not valid JSON"),
    (b'{"content": "x"}\n', "nofield.jsonl", "no string field"),
    (b"a few words only", "short.txt", "fewer than --samples"),
    (None, "missing.txt", "no such calibration file"),
])
def test_bad_calibration_fails_before_any_work(tiny_hf, tmp_path, no_work, content, name, problem):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(JisuError, match=problem) as e:
        jisu.compress.compress(tiny_hf, str(tmp_path / "out"), "gptq:w4g32", calib=str(path), **FAST)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not leftovers(str(tmp_path))


def test_good_jsonl_calibration(tiny_hf, tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join('{"text": "%s"}' % (f"line {i} of some calibration text " * 20) for i in range(40)))
    r = jisu.compress.compress(tiny_hf, str(tmp_path / "out"), "gptq:w4g32", calib=str(path), **FAST)
    assert r.manifest["calibration"]["text"] == str(path)


def test_max_kld_discards_result(tiny_hf, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(JisuError, match=r"measured KLD [0-9.]+ is above --max-kld 1e-09; nothing written"):
        jisu.compress.compress(tiny_hf, str(out), "rtn:w2g64", max_kld=1e-9, **FAST)
    assert not out.exists() and not leftovers(str(tmp_path))
    r = jisu.compress.compress(tiny_hf, str(out), "rtn:w8", max_kld=10.0, **FAST)
    assert out.exists()
    # a bound just above / below the measured value keeps / refuses the same result
    kld = r.quality["kld_mean"]
    assert 0 < kld < 10.0
    jisu.compress.compress(tiny_hf, str(tmp_path / "above"), "rtn:w8", max_kld=kld * 1.001, **FAST)
    with pytest.raises(JisuError, match="is above --max-kld"):
        jisu.compress.compress(tiny_hf, str(tmp_path / "below"), "rtn:w8", max_kld=kld * 0.999, **FAST)
    assert not (tmp_path / "below").exists() and not leftovers(str(tmp_path))


def test_max_kld_cli_exits_2_and_keeps_old_out(tiny_hf, tmp_path):
    """`jisu compress --max-kld` refusing a result: exit status 2, one line, and with --force the
    existing OUT is left exactly as it was."""
    out = tmp_path / "out"
    jisu.compress.compress(tiny_hf, str(out), "rtn:w8", **FAST)
    before = {n: artifact.sha256_file(str(out / n)) for n in os.listdir(out)}
    r = cli("compress", tiny_hf, "-o", str(out), "--recipe", "rtn:w2g64", "--max-kld", "1e-9", "--force",
            "--samples", "4", "--seq-len", "32")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is above --max-kld" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert {n: artifact.sha256_file(str(out / n)) for n in os.listdir(out)} == before
    assert not leftovers(str(tmp_path))


def test_bad_arguments_fail_fast(tiny_hf, tmp_path, no_work):
    for kwargs, problem in (({"samples": 0}, "--samples"), ({"seq_len": 1}, "--seq-len"),
                            ({"max_kld": -1}, "--max-kld"), ({"seq_len": 100000}, "longer than the model")):
        with pytest.raises(JisuError, match=problem):
            jisu.compress.compress(tiny_hf, str(tmp_path / "o"), "gptq:w4g32", **{**FAST, **kwargs})
    with pytest.raises(JisuError, match="parent folder"):
        jisu.compress.compress(tiny_hf, str(tmp_path / "nope" / "o"), "rtn:w4g32", **FAST)
    with pytest.raises(JisuError, match="not a multiple of the group size"):
        jisu.compress.compress(tiny_hf, str(tmp_path / "o"), "rtn:w4g128", **FAST)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "jisu.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli(tiny_hf, tmp_path):
    out = str(tmp_path / "cli_out")
    r = cli("compress", tiny_hf, "-o", out, "--recipe", "gptq:w4g32", "--samples", "4", "--seq-len", "32")
    assert r.returncode == 0, r.stderr
    assert "bits/weight" in r.stdout and "KLD" in r.stdout
    r = cli("run", out, "-p", "hi", "-n", "3", "--temp", "0", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    r = cli("compress", tiny_hf, "-o", out, "--recipe", "gptq:w4g32")
    assert r.returncode == 2 and "already exists" in r.stderr
    r = cli("compress", tiny_hf, "-o", str(tmp_path / "x"), "--recipe", "gptq:w9")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "valid forms" in r.stderr
