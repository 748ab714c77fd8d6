"""Reading DensePose checkpoints (densepose/weights.py): both formats, and one line for each bad file.

Small crafted files, except one round trip of the conformance weights (make_weights.py, 256 MB)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from magicanimate_rt.densepose.model import validate_state_dict
from magicanimate_rt.densepose.weights import CheckpointError, read_checkpoint
from magicanimate_rt.errors import ModelLoadError

STATE = {"backbone.bottom_up.stem.conv1.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
         "roi_heads.box_predictor.cls_score.bias": np.array([0.5, -1.0], np.float32),
         "counts": np.array([1, 2, 3], np.int64)}


def _same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == np.asarray(want[k]).dtype and np.array_equal(got[k], want[k]), k


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_model_zoo_pickle(tmp_path, protocol):
    path = tmp_path / "zoo.pkl"
    path.write_bytes(pickle.dumps({"model": STATE, "__author__": "Detectron2 Model Zoo"}, protocol=protocol))
    _same(read_checkpoint(path), STATE)


def test_torch_files(tmp_path):
    tensors = {k: torch.from_numpy(v) for k, v in STATE.items()}
    torch.save({"model": tensors, "iteration": 7}, tmp_path / "nested.pth")
    _same(read_checkpoint(tmp_path / "nested.pth"), STATE)
    torch.save(tensors, tmp_path / "top.pth")  # the state dict at the top level
    _same(read_checkpoint(tmp_path / "top.pth"), STATE)
    torch.save({"model": tensors}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    _same(read_checkpoint(tmp_path / "legacy.pth"), STATE)
    torch.save({"w": torch.tensor([1.5, -2.25], dtype=torch.bfloat16)}, tmp_path / "bf16.pth")
    got = read_checkpoint(tmp_path / "bf16.pth")["w"]
    assert got.dtype == np.float32 and got.tolist() == [1.5, -2.25]


class _RunsCode:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    assert isinstance(info.value, ModelLoadError)  # the CLI's one-line error, exit 2
    return message


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = pickle.dumps({"model": {"x": np.zeros(2)}, "payload": _RunsCode(marker)}, protocol=2)
    (tmp_path / "evil.pkl").write_bytes(evil)
    # the crafted file does run code when unpickled with pickle.load: the test would catch it
    pickle.loads(evil)
    assert marker.exists()
    marker.unlink()
    message = _error(tmp_path / "evil.pkl")
    assert "refused" in message and "system" in message
    assert not marker.exists()
    # the same inside a torch file: torch.load(weights_only=True) refuses it
    torch.save({"model": {"x": torch.zeros(2)}, "payload": _RunsCode(marker)}, tmp_path / "evil.pth")
    message = _error(tmp_path / "evil.pth")
    assert "refused" in message and "system" in message
    assert not marker.exists()


def test_bad_files(tmp_path):
    good = pickle.dumps({"model": STATE}, protocol=3)
    cases = {
        "missing.pkl": (None, "no such file"),
        "truncated.pkl": (good[: len(good) // 2], "truncated"),
        "lfs.pkl": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 255523053\n", "Git LFS pointer"),
        "text.pkl": (b"hello, not weights\n", "not a DensePose checkpoint"),
        "list.pkl": (pickle.dumps([1, 2, 3]), "not a DensePose checkpoint"),
        "strings.pkl": (pickle.dumps({"model": {"a": "b"}}), "is a str, not an array"),
        "objects.pkl": (pickle.dumps({"model": {"a": np.array([1, "x"], object)}}), "array of Python objects"),
        "empty_state.pkl": (pickle.dumps({"model": {}}), "no arrays"),
        "empty.pkl": (b"", "empty file"),
    }
    for name, (data, words) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        assert words in _error(tmp_path / name), name
    assert "not a regular file" in _error(tmp_path)
    torch.save({"model": {"x": torch.zeros(1000)}}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _error(tmp_path / "cut.pth")


def test_weights_of_another_model(tmp_path):
    with pytest.raises(CheckpointError, match=r"x\.pkl: not a DensePose R-CNN checkpoint \(not a detectron2 model"):
        validate_state_dict({"conv_in.weight": np.zeros(1)}, tmp_path / "x.pkl")


def test_conformance_weights_round_trip(densepose_weights):
    """make_weights.py's file reads to exactly what a plain (trusted) pickle.load gives: 335 float32
    tensors, 63,927,330 values (its docstring), ResNet-50."""
    state = read_checkpoint(densepose_weights)
    with open(densepose_weights, "rb") as f:
        plain = pickle.load(f)["model"]
    assert len(state) == 335 and sum(v.size for v in state.values()) == 63_927_330
    _same(state, plain)
    assert validate_state_dict(state, densepose_weights)[1] == (3, 4, 6, 3)  # R-50 (R-101: test_densepose_model)
