"""HF folders with sharded safetensors (model.safetensors.index.json + several files) load exactly
as the same weights in one file; a broken index is a one-line error."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import jisu
from jisu.errors import JisuError
from tests.fixtures import write_hf_llama


def _shard(src: str, dst: str, dtype=None) -> str:
    """Copy src's folder with its weights split into two shards and an index."""
    shutil.copytree(src, dst)
    os.unlink(os.path.join(dst, "model.safetensors"))
    w = load_file(os.path.join(src, "model.safetensors"))
    if dtype is not None:
        w = {k: v.to(dtype) for k, v in w.items()}
    names = sorted(w)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, part in files.items():
        save_file({k: w[k].contiguous() for k in part}, os.path.join(dst, fname))
    index = {"metadata": {}, "weight_map": {k: f for f, part in files.items() for k in part}}
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    one = write_hf_llama(str(root / "one"))
    return one, _shard(one, str(root / "two"))


@pytest.mark.parametrize("packed", [False, None])
def test_sharded_equals_single_file(folders, packed):
    one, two = (jisu.load(p, packed=packed) for p in folders)
    assert one.config == two.config
    opts = dict(temperature=0, max_tokens=10, ignore_eos=True)
    assert one.generate("hello there", **opts).token_ids == two.generate("hello there", **opts).token_ids
    ref = jisu.load(folders[0], packed=False).model.w
    got = jisu.load(folders[1], packed=False).model.w
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)


def test_sharded_bf16_runs_packed(folders, tmp_path):
    """bf16 shards (how checkpoints are published) run in place on the packed path, close to fp32."""
    bf = _shard(folders[0], str(tmp_path / "bf16"), torch.bfloat16)
    ids = jisu.load(bf).generate("hello there", temperature=0, max_tokens=6, ignore_eos=True).token_ids
    assert len(ids) == 6
    ref = jisu.load(bf, packed=False).model.w
    src = jisu.load(folders[0], packed=False).model.w
    assert all(torch.equal(ref[k], src[k].to(torch.bfloat16).float()) for k in ref)


def test_index_naming_a_missing_shard_is_one_line(folders, tmp_path):
    bad = shutil.copytree(folders[1], str(tmp_path / "bad"))
    os.unlink(os.path.join(bad, "model-00002-of-00002.safetensors"))
    with pytest.raises(JisuError) as e:
        jisu.load(bad)
    assert "model-00002-of-00002.safetensors" in str(e.value) and "\n" not in str(e.value)
