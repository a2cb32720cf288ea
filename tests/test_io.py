"""mslpipe.io: NIfTI loading rules, atomic writes and JSON, on tiny hand-made files."""

from __future__ import annotations

import contextlib
import os
import tempfile

import nibabel as nib
import numpy as np
import pytest

from mslpipe.errors import MslpipeError
from mslpipe.io import (
    atomic_path,
    atomic_write_text,
    load_image,
    load_mask,
    read_json,
    save_nifti,
    write_json,
)

SHAPE = (6, 7, 5)


def _affine(diag=(-1.0, 1.0, 1.5), offset=(10.5, -20.25, 3.0)) -> np.ndarray:
    a = np.diag([*diag, 1.0])
    a[:3, 3] = offset
    return a


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-50, 500, SHAPE).astype(np.float32)


@contextlib.contextmanager
def _raises(path, *words):
    """An MslpipeError whose message names ``path`` and contains every one of ``words``."""
    with pytest.raises(MslpipeError) as info:
        yield info
    msg = str(info.value)
    assert str(path) in msg, msg
    for word in words:
        assert word.lower() in msg.lower(), msg


# ---------------------------------------------------------------------------- load_image
def test_load_image_reads_float32_and_affine(tmp_path):
    data, aff = _image(), _affine()
    path = save_nifti(tmp_path / "a.nii.gz", data, aff, dtype=np.float32)
    out, out_aff = load_image(path)
    assert out.dtype == np.float32 and out.shape == SHAPE
    np.testing.assert_array_equal(out, data)
    np.testing.assert_allclose(out_aff, aff, atol=1e-6)


def test_truncated_nii_gz_is_refused(tmp_path):
    good = save_nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).random((20, 20, 20)), np.eye(4),
                      dtype=np.float32)
    blob = good.read_bytes()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    with _raises(bad, "cannot read as nifti"):
        load_image(bad)
    bad.write_bytes(blob[:60])  # not even a full header
    with _raises(bad, "cannot read as nifti"):
        load_image(bad)


def test_truncated_uncompressed_nii_is_refused(tmp_path):
    good = save_nifti(tmp_path / "good.nii", np.ones((20, 20, 20)), np.eye(4), dtype=np.float32)
    bad = tmp_path / "bad.nii"
    bad.write_bytes(good.read_bytes()[:1000])
    with _raises(bad, "cannot read as nifti"):
        load_image(bad)


@pytest.mark.parametrize("name", ["notes.nii", "notes.nii.gz"])
def test_text_file_named_nifti_is_refused(tmp_path, name):
    bad = tmp_path / name
    bad.write_text("this is a text file, not an image\n" * 20)
    with _raises(bad, "cannot read as nifti"):
        load_image(bad)


def test_2d_image_is_refused(tmp_path):
    path = save_nifti(tmp_path / "flat.nii.gz", np.ones((6, 7)), np.eye(4), dtype=np.float32)
    with _raises(path, "3d", "2d"):
        load_image(path)


def test_4d_image_is_refused(tmp_path):
    path = save_nifti(tmp_path / "four.nii.gz", np.ones((*SHAPE, 2)), np.eye(4), dtype=np.float32)
    with _raises(path, "3d", "4d"):
        load_image(path)


@pytest.mark.parametrize("dtype", [np.complex64, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])],
                         ids=["complex", "rgb"])
def test_complex_or_rgb_voxels_are_refused(tmp_path, dtype):
    """NIfTI stores complex and RGB voxels too; neither is an intensity image, and casting would drop parts."""
    path = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, dtype=dtype), np.eye(4)), str(path))
    with _raises(path, "unsupported voxel type"):
        load_image(path)


def test_4d_image_with_one_volume_is_squeezed(tmp_path):
    data = _image()
    path = save_nifti(tmp_path / "one.nii", data[..., None], _affine(), dtype=np.float32)
    out, aff = load_image(path)
    assert out.shape == SHAPE
    np.testing.assert_array_equal(out, data)
    np.testing.assert_allclose(aff, _affine(), atol=1e-6)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_refused(tmp_path, value):
    data = _image()
    data[1, 2, 3] = value
    data[4, 0, 1] = value
    path = save_nifti(tmp_path / "bad.nii.gz", data, np.eye(4), dtype=np.float32)
    with _raises(path, "2 voxels", "nan or inf"):
        load_image(path)


def test_missing_file_is_refused(tmp_path):
    path = tmp_path / "nowhere" / "missing.nii.gz"
    with _raises(path, "not found"):
        load_image(path)


def test_folder_named_like_an_image_is_refused(tmp_path):
    path = tmp_path / "dir.nii.gz"
    path.mkdir()
    with _raises(path, "not a regular file"):
        load_image(path)


def test_unreadable_file_is_refused(tmp_path):
    path = save_nifti(tmp_path / "secret.nii.gz", _image(), np.eye(4), dtype=np.float32)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user (root) who can read a chmod 000 file")
        with _raises(path, "not readable"):
            load_image(path)
    finally:
        path.chmod(0o644)


def test_singular_affine_is_refused(tmp_path):
    # nibabel will not build an image from a singular affine, so write the header by hand
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    path = tmp_path / "flat_affine.nii.gz"
    nib.save(nib.Nifti1Image(_image(), None, header=hdr), str(path))
    with _raises(path, "affine", "singular"):
        load_image(path)


# ---------------------------------------------------------------------------- load_mask
def test_load_mask_accepts_binary_in_any_dtype(tmp_path):
    mask = (_image() > 200).astype(np.float32)
    path = save_nifti(tmp_path / "m.nii.gz", mask, _affine(), dtype=np.float32)
    out = load_mask(path, like_shape=SHAPE, like_affine=_affine())
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, mask.astype(np.uint8))


@pytest.mark.parametrize("bad", [2, -1, 0.5])
def test_load_mask_refuses_values_outside_0_1(tmp_path, bad):
    mask = np.zeros(SHAPE, np.float32)
    mask[1, 1, 1] = 1
    mask[2, 2, 2] = bad
    path = save_nifti(tmp_path / "m.nii.gz", mask, np.eye(4), dtype=np.float32)
    with _raises(path, "not binary", str(float(bad))):
        load_mask(path)


def test_load_mask_refuses_other_shape(tmp_path):
    path = save_nifti(tmp_path / "m.nii.gz", np.zeros((6, 7, 4)), np.eye(4))
    with _raises(path, "shape", "(6, 7, 4)", "(6, 7, 5)"):
        load_mask(path, like_shape=SHAPE, like_affine=np.eye(4))


def test_load_mask_refuses_other_affine(tmp_path):
    path = save_nifti(tmp_path / "m.nii.gz", np.zeros(SHAPE), _affine())
    with _raises(path, "affine"):
        load_mask(path, like_shape=SHAPE, like_affine=_affine(offset=(10.5, -20.25, 5.0)))
    # within tolerance is the same grid
    assert load_mask(path, like_shape=SHAPE, like_affine=_affine() + 1e-5).shape == SHAPE


# ---------------------------------------------------------------------------- save_nifti
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_save_nifti_round_trips_affine_and_dtype(tmp_path, suffix, dtype):
    aff = np.array([[0.0, -0.9, 0.0, 12.5], [1.1, 0.0, 0.0, -30.0], [0.0, 0.0, 2.5, 7.25], [0, 0, 0, 1]])
    data = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 97).astype(dtype)
    path = save_nifti(tmp_path / f"x{suffix}", data, aff, dtype=dtype)
    assert path.name == f"x{suffix}"
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    if suffix == ".nii.gz":
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzip-compressed
    else:
        assert path.read_bytes()[344:348] == b"n+1\x00"  # really a single-file NIfTI-1
    out, out_aff = load_image(path)
    np.testing.assert_array_equal(out, data.astype(np.float32))
    np.testing.assert_allclose(out_aff, aff, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == [f"x{suffix}"]  # no temp file left behind


# ---------------------------------------------------------------------------- atomic writes
def test_atomic_writes_leave_no_temp_files(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_text(tmp_path / "b.txt", "hello")
    save_nifti(tmp_path / "c.nii.gz", np.ones(SHAPE), np.eye(4))
    write_json(tmp_path / "a.json", {"x": 2})  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.txt", "c.nii.gz"]
    assert read_json(tmp_path / "a.json") == {"x": 2}


def test_atomic_path_removes_temp_and_keeps_old_file_when_block_fails(tmp_path):
    target = tmp_path / "keep.json"
    write_json(target, {"old": True})
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("boom")
    assert read_json(target) == {"old": True}
    assert sorted(os.listdir(tmp_path)) == ["keep.json"]


def test_write_into_read_only_folder_fails_cleanly(tmp_path):
    folder = tmp_path / "ro"
    target = write_json(folder / "data.json", {"old": True})
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user (root) who can write into a chmod 555 folder")
        with _raises(folder, "cannot write"):
            write_json(target, {"new": True})
    finally:
        folder.chmod(0o755)
    assert read_json(target) == {"old": True}
    assert sorted(os.listdir(folder)) == ["data.json"]


def test_write_refused_by_the_folder_names_it_and_keeps_old_file(tmp_path, monkeypatch):
    """The read-only-folder case as root can see it: creating the temp file fails."""
    folder = tmp_path / "ro"
    target = write_json(folder / "data.json", {"old": True})

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with _raises(folder, "cannot write", "permission denied") as info:
        write_json(target, {"new": True})
    assert info.value.path == str(folder)
    monkeypatch.undo()
    assert read_json(target) == {"old": True}
    assert sorted(os.listdir(folder)) == ["data.json"]


def test_write_under_a_file_names_the_folder(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with _raises(tmp_path / "blocker" / "sub", "cannot write"):
        write_json(blocker / "sub" / "x.json", {})
    assert blocker.read_text() == "a file, not a folder"


def test_failed_rename_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = write_json(tmp_path / "data.json", {"old": True})

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with _raises(target, "cannot write", "no space"):
        write_json(target, {"new": True})
    monkeypatch.undo()
    assert read_json(target) == {"old": True}
    assert sorted(os.listdir(tmp_path)) == ["data.json"]


# ---------------------------------------------------------------------------- JSON
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), np.float32("nan")])
def test_write_json_refuses_nan_and_writes_nothing(tmp_path, bad):
    target = write_json(tmp_path / "stats.json", {"old": 1})
    with _raises(target, "json", "nan"):
        write_json(target, {"mean": bad})
    assert read_json(target) == {"old": 1}
    assert sorted(os.listdir(tmp_path)) == ["stats.json"]


def test_write_json_converts_numpy_and_paths(tmp_path):
    path = write_json(tmp_path / "a.json", {"i": np.int64(3), "f": np.float32(0.5), "a": np.arange(3),
                                           "p": tmp_path})
    assert read_json(path) == {"i": 3, "f": 0.5, "a": [0, 1, 2], "p": str(tmp_path)}


def test_read_json_invalid_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"a": 1,\n "b": }\n')
    with _raises(path, "not valid json", "line 2"):
        read_json(path)


def test_read_json_missing_and_binary(tmp_path):
    with _raises(tmp_path / "none.json", "not found"):
        read_json(tmp_path / "none.json")
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with _raises(path, "cannot read"):
        read_json(path)
