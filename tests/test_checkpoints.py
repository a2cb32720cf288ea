"""checkpoints: weights_only-safe save/load, refusal of pickled objects and corrupt files, RNG state."""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import random

import numpy as np
import pytest
import torch

from mslpipe import checkpoints
from mslpipe.errors import MslpipeError


@dataclasses.dataclass
class _Meta:
    epoch: int = 3


class _State(collections.OrderedDict):
    pass


def _payload() -> dict:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    return {"model": model.state_dict(), "meta": {"epoch": 4, "plan_hash": "abc", "dice": [0.5, 0.7],
                                                  "ok": True, "none": None},
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()}


def _check_error(info, path, *words):
    msg = str(info.value)
    assert str(path) in msg, msg
    for word in words:
        assert word.lower() in msg.lower(), msg


def test_save_load_round_trip_with_weights_only(tmp_path):
    payload = _payload()
    path = checkpoints.save(tmp_path / "model.pt", payload)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # atomic: no temp file left
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == checkpoints.FORMAT
    loaded = checkpoints.load(path)
    assert loaded["meta"] == payload["meta"]
    assert loaded["model"].keys() == payload["model"].keys()
    for k, v in payload["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["optimizer"]["param_groups"] == payload["optimizer"]["param_groups"]


def test_overwrite_keeps_one_file(tmp_path):
    checkpoints.save(tmp_path / "model.pt", _payload())
    checkpoints.save(tmp_path / "model.pt", {**_payload(), "meta": {"epoch": 9}})
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
    assert checkpoints.load(tmp_path / "model.pt")["meta"] == {"epoch": 9}


@pytest.mark.parametrize("obj", [_Meta(), _State(w=torch.ones(2))], ids=["dataclass", "dict_subclass"])
def test_pickled_custom_objects_are_refused(tmp_path, obj):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "meta": obj}, path)  # a plain torch.save pickles the object
    with pytest.raises(MslpipeError) as info:
        checkpoints.load(path)
    _check_error(info, path, "refusing", "needs pickled python objects", "weights_only")


def test_checkpoint_saving_a_custom_object_cannot_be_loaded(tmp_path):
    path = checkpoints.save(tmp_path / "bad.pt", {"model": {}, "meta": _Meta()})
    with pytest.raises(MslpipeError, match="needs pickled"):
        checkpoints.load(path)


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.0])
def test_truncated_checkpoint(tmp_path, keep):
    path = checkpoints.save(tmp_path / "model.pt", _payload())
    blob = path.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(blob[: int(len(blob) * keep)])
    with pytest.raises(MslpipeError) as info:
        checkpoints.load(bad)
    _check_error(info, bad, "corrupt or unreadable checkpoint")


def test_text_file_and_missing_file(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint\n")
    with pytest.raises(MslpipeError) as info:
        checkpoints.load(bad)
    _check_error(info, bad, "corrupt or unreadable checkpoint")
    with pytest.raises(MslpipeError) as info:
        checkpoints.load(tmp_path / "missing.pt")
    _check_error(info, tmp_path / "missing.pt", "not found")


def test_foreign_and_newer_checkpoints(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, foreign)
    with pytest.raises(MslpipeError) as info:
        checkpoints.load(foreign)
    _check_error(info, foreign, "not an mslpipe checkpoint")
    newer = tmp_path / "newer.pt"
    torch.save({"format": checkpoints.FORMAT + 1, "model": {}, "meta": {}}, newer)
    with pytest.raises(MslpipeError) as info:
        checkpoints.load(newer)
    _check_error(info, newer, f"format {checkpoints.FORMAT + 1}", "newer")


def _draw() -> tuple:
    return (torch.rand(5).tolist(), torch.randn(3).tolist(), np.random.rand(4).tolist(),
            np.random.randn(3).tolist(), [random.random() for _ in range(4)], random.gauss(0, 1))


def test_rng_state_restores_every_sequence(tmp_path):
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    _draw()
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)
    state = checkpoints.rng_state()
    expected = _draw()
    path = checkpoints.save(tmp_path / "rng.pt", {"model": {}, "meta": {}, "rng": state})
    torch.load(path, weights_only=True)  # the RNG state is weights_only-safe
    _draw()
    _draw()  # move every generator on
    checkpoints.set_rng_state(checkpoints.load(path)["rng"])
    assert _draw() == expected
    checkpoints.set_rng_state(state)  # the in-memory state works too
    assert _draw() == expected


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_is_not_mistaken_for_a_checkpoint_with_objects(tmp_path):
    for name, blob in [("garbage.pt", b"\x80\x02garbage"), ("plain.pt", pickle.dumps({"model": {}}))]:
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(MslpipeError) as info:
            checkpoints.load(path)
        _check_error(info, path, "corrupt or unreadable checkpoint")
