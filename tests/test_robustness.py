"""Robustness: the NIfTI path never crashes on random input; failures are one line and exit 1;
concurrent predict runs into one folder leave only complete files."""

from __future__ import annotations

import gzip
import io as _io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mslpipe.errors import MslpipeError
from mslpipe.io import load_image, load_mask, save_nifti

TEXT = {"text": True, "encoding": "utf-8", "errors": "replace"}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_nifti_bytes(shape=(6, 5, 4)) -> bytes:
    img = nib.Nifti1Image(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), np.diag([2.0, 1, 1, 1]))
    return img.to_bytes()


def _check_loader(path: Path) -> None:
    """Either mslpipe's own error or a valid 3D finite float32 volume with a usable affine."""
    try:
        data, affine = load_image(path)
    except MslpipeError as exc:
        assert str(path) in str(exc)
        return
    assert data.ndim == 3 and data.dtype == np.float32 and np.isfinite(data).all()
    assert affine.shape == (4, 4) and np.isfinite(affine).all()


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([".nii", ".nii.gz"]))
def test_random_bytes_never_crash_the_reader(blob, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{suffix}"
        path.write_bytes(gzip.compress(blob) if suffix == ".nii.gz" and blob[:1] == b"\x00" else blob)
        _check_loader(path)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), min_size=1, max_size=12),
       st.sampled_from([".nii", ".nii.gz"]))
def test_random_header_corruption_never_crashes_the_reader(edits, suffix):
    raw = bytearray(_valid_nifti_bytes())
    for pos, value in edits:
        raw[pos] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{suffix}"
        path.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
        _check_loader(path)
        try:
            load_mask(path)
        except MslpipeError:
            pass


def test_truncated_gzip_stream_is_one_error(tmp_path):
    buf = _io.BytesIO(gzip.compress(_valid_nifti_bytes((20, 20, 20))))
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(buf.getvalue()[:200])
    with pytest.raises(MslpipeError, match="cut.nii.gz"):
        load_image(path)


@pytest.fixture(scope="module")
def model(trained):
    return trained[1]["fold_dir"] / "checkpoint_final.pt"


def _predict_cli(inp, out, model, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mslpipe", "predict", "-i", str(inp), "-o", str(out),
                             "--checkpoint", str(model), "--device", "cpu", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **TEXT)


def test_predict_cli_lists_failures_and_exits_1(model, synth_root, tmp_path):
    src = next((synth_root / "training").glob("training01/preprocessed/*.nii.gz"))
    data, affine = load_image(src)
    save_nifti(tmp_path / "in" / "ok.nii.gz", data, affine, dtype=np.float32)
    (tmp_path / "in" / "bad.nii").write_text("not an image")
    proc = _predict_cli(tmp_path / "in", tmp_path / "out", model)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in err
    failures = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failures) == 1 and "bad.nii" in failures[0]
    assert (tmp_path / "out" / "ok.nii.gz").exists()


def test_two_predict_runs_into_one_folder(model, synth_root, tmp_path):
    srcs = sorted((synth_root / "training").glob("*/preprocessed/*.nii.gz"))[:4]
    for src in srcs:
        data, affine = load_image(src)
        save_nifti(tmp_path / "in" / src.name, data, affine, dtype=np.float32)
    procs = [_predict_cli(tmp_path / "in", tmp_path / "out", model, "--overwrite") for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    outs = sorted(p for p in (tmp_path / "out").iterdir() if p.name != "provenance")
    assert len(list((tmp_path / "out" / "provenance").iterdir())) == 2  # a record per run, neither overwritten
    # no temporary files left; ISBI-named scans are named by their case
    assert [p.name for p in outs] == sorted(s.name.replace("_flair_pp", "") for s in srcs)
    for p in outs:
        data, _ = load_image(p)  # every file complete and readable
        assert set(np.unique(data)) <= {0.0, 1.0}


def test_outputs_get_normal_file_permissions(tmp_path):
    from mslpipe.io import FILE_MODE, write_json

    path = write_json(tmp_path / "a.json", {"x": 1})
    assert path.stat().st_mode & 0o777 == FILE_MODE
    assert FILE_MODE & 0o044, "group/others can read outputs under the usual umask"


def test_dicom_reading_keeps_the_process_locale(tmp_path):
    """ITK sets the C locale; mslpipe restores it, so later text I/O is not forced to ASCII."""
    import locale

    from mslpipe.dicom import load_dicom_series, write_dicom_series

    before = locale.setlocale(locale.LC_ALL)
    write_dicom_series(tmp_path / "s", np.zeros((4, 4, 3)), np.eye(4))
    load_dicom_series(tmp_path / "s")
    assert locale.setlocale(locale.LC_ALL) == before


def test_overwrite_replaces_a_symlink_never_its_target(model, synth_root, tmp_path):
    """An output name that is a symlink out of the folder is replaced, the file it points to untouched."""
    from mslpipe import predict

    src = next((synth_root / "training").glob("training01/preprocessed/*.nii.gz"))
    data, affine = load_image(src)
    save_nifti(tmp_path / "in" / "a.nii.gz", data, affine, dtype=np.float32)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me", encoding="utf-8")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.nii.gz").symlink_to(outside)
    report = predict.run(tmp_path / "in", tmp_path / "out", dirs=None, checkpoint=[model], device="cpu",
                         overwrite=True)
    assert report.written == ["a"]
    assert outside.read_text(encoding="utf-8") == "keep me"
    assert not (tmp_path / "out" / "a.nii.gz").is_symlink()
