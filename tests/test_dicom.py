"""mslpipe.dicom: DICOM series round trips (data and world geometry) and the series it refuses, on tiny hand-made
series."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
from test_io import SHAPE, _affine, _image, _raises

from mslpipe.dicom import _gdcm_guard, find_dicom_series, load_dicom_series, write_dicom_series
from mslpipe.io import load_image, save_nifti


def _canonical(data: np.ndarray, affine: np.ndarray):
    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asanyarray(img.dataobj), img.affine


def test_dicom_round_trip_right_handed_grid(tmp_path):
    """A grid DICOM can store as is: data and affine come back exactly."""
    aff = _affine(diag=(-1.0, -1.0, 1.5))  # RAS affine of LPS-ordered voxels, offset
    data = np.rint(_image())
    write_dicom_series(tmp_path / "dcm", data, aff)
    out, out_aff = load_dicom_series(tmp_path / "dcm")
    assert out.dtype == np.float32 and out.shape == SHAPE
    np.testing.assert_array_equal(out, data)
    nifti = save_nifti(tmp_path / "same.nii.gz", data, aff, dtype=np.float32)
    np.testing.assert_allclose(out_aff, load_image(nifti)[1], atol=1e-3)


def test_dicom_round_trip_flipped_offset_grid(tmp_path):
    """diag(-1, 1, 1.5) + offset is left-handed: a DICOM reader stacks slices along the normal,
    so the voxel order may differ, but the image in world space must be the same."""
    aff = _affine(diag=(-1.0, 1.0, 1.5))
    data = _image(1)
    data[0, 0, 0], data[1, 0, 0] = 2.4, -2.6  # int16 rounding, not truncation
    write_dicom_series(tmp_path / "dcm", data, aff)
    out, out_aff = load_dicom_series(tmp_path / "dcm")
    nifti = save_nifti(tmp_path / "same.nii.gz", data, aff, dtype=np.float32)
    n_data, n_aff = load_image(nifti)
    got, got_aff = _canonical(out, out_aff)
    want, want_aff = _canonical(np.rint(n_data), n_aff)
    np.testing.assert_allclose(got_aff, want_aff, atol=1e-3)
    np.testing.assert_array_equal(got, want)
    # spacing and the voxel-to-world mapping of every corner agree
    np.testing.assert_allclose(np.linalg.norm(out_aff[:3, :3], axis=0), [1.0, 1.0, 1.5], atol=1e-3)
    corners = np.array([[i, j, k, 1] for i in (0, 5) for j in (0, 6) for k in (0, 4)], float).T
    world_dcm = {tuple(np.round(p, 3)) for p in (out_aff @ corners)[:3].T}
    world_nii = {tuple(np.round(p, 3)) for p in (n_aff @ corners)[:3].T}
    assert world_dcm == world_nii


def test_dicom_series_with_missing_middle_slice_is_refused(tmp_path):
    folder = write_dicom_series(tmp_path / "dcm", np.rint(_image()), _affine(diag=(1.0, 1.0, 2.0)))
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == SHAPE[2]
    files[2].unlink()
    with _raises(folder, "uneven slice spacing", "missing slice"):
        load_dicom_series(folder)


def test_dicom_series_of_one_slice_is_refused(tmp_path):
    folder = write_dicom_series(tmp_path / "dcm", np.rint(_image()), np.eye(4))
    for f in sorted(folder.glob("*.dcm"))[1:]:
        f.unlink()
    with _raises(folder, "fewer than 2 slices"):
        load_dicom_series(folder)


def test_two_dicom_series_in_one_folder_are_refused(tmp_path):
    a = write_dicom_series(tmp_path / "a", np.rint(_image(0)), _affine(diag=(1.0, 1.0, 2.0)))
    b = write_dicom_series(tmp_path / "b", np.rint(_image(1)), _affine(diag=(1.0, 1.0, 2.0)))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for series in (a, b):
        for f in series.glob("*.dcm"):
            shutil.copy(f, mixed / f"{series.name}_{f.name}")
    with _raises(mixed, "2 dicom series", "one series per folder"):
        load_dicom_series(mixed)


def test_empty_folder_has_no_dicom_series(tmp_path):
    (tmp_path / "empty").mkdir()
    with _raises(tmp_path / "empty", "no dicom series"):
        load_dicom_series(tmp_path / "empty")
    with _raises(tmp_path / "absent", "not a folder"):
        load_dicom_series(tmp_path / "absent")


def test_looking_for_series_prints_nothing_and_leaves_itk_warnings_as_they_were(tmp_path, capfd):
    """ITK prints a warning on stderr for every folder without a series; a DICOM tree is mostly such folders, and
    an error must be one line. The search finds the series quietly, and ITK's warnings are back on after it."""
    import SimpleITK as sitk

    write_dicom_series(tmp_path / "root" / "patient" / "flair", np.rint(_image()), _affine())
    (tmp_path / "root" / "notes").mkdir()
    capfd.readouterr()
    series = find_dicom_series(tmp_path / "root")
    assert len(series) == 1 and len(series[0][1]) == SHAPE[2]
    assert capfd.readouterr().err == ""
    assert sitk.ProcessObject.GetGlobalWarningDisplay()


@pytest.mark.parametrize("bad", [40000.0, -40000.0, np.nan])
def test_write_dicom_refuses_values_int16_cannot_hold(tmp_path, bad):
    data = np.rint(_image())
    data[1, 1, 1] = bad
    with _raises(tmp_path / "dcm", "int16"):
        write_dicom_series(tmp_path / "dcm", data, np.eye(4))
    assert not list((tmp_path / "dcm").glob("*"))


def test_dicom_calls_from_several_threads_run_one_at_a_time(tmp_path, monkeypatch):
    """GDCM is not thread-safe and predict reads scans in two threads: loading series from four threads at once
    gives what loading them one after another gives, with never two SimpleITK series reads running together."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import SimpleITK as sitk

    folders = []
    for k in range(4):
        data = np.rint(_image(k))
        folders.append(write_dicom_series(tmp_path / f"dcm{k}", data, _affine()))
    expected = [load_dicom_series(f) for f in folders]
    active, most, guard, real = [0], [0], threading.Lock(), sitk.ImageSeriesReader

    class Watched(real):
        def Execute(self, *args):
            with guard:
                active[0] += 1
                most[0] = max(most[0], active[0])
            time.sleep(0.05)  # lets another thread in, were calls not serialised
            try:
                return super().Execute(*args)
            finally:
                with guard:
                    active[0] -= 1

    monkeypatch.setattr(sitk, "ImageSeriesReader", Watched)
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(load_dicom_series, folders * 2))
    assert most[0] == 1
    for (out, aff), (want, want_aff) in zip(loaded, expected * 2, strict=True):
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(aff, want_aff)


def _uids(folder):
    import SimpleITK as sitk

    tags = ("0020|000d", "0020|000e", "0008|0018", "0020|0052")  # study, series, instance, frame of reference
    rows = []
    for name in sorted(folder.glob("*.dcm")):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(name))
        reader.ReadImageInformation()
        rows.append(tuple(reader.GetMetaData(t) if reader.HasMetaDataKey(t) else None for t in tags))
    return rows


def test_a_written_series_is_one_study_with_uids_the_same_every_run(tmp_path):
    """Every slice of a series carries the same study, series and frame-of-reference UIDs and its own instance
    UID; series written side by side share the study; writing again gives the same UIDs. (GDCM alone gave each
    slice a random study of its own.)"""
    data, aff = np.rint(_image()), _affine(diag=(1.0, 1.0, 2.0))
    flair = _uids(write_dicom_series(tmp_path / "visit" / "flair", data, aff, "AX FLAIR", 3))
    t1 = _uids(write_dicom_series(tmp_path / "visit" / "t1", data, aff, "SAG T1", 2))
    assert len(flair) == SHAPE[2] and all(None not in row for row in flair)
    assert len({row[0] for row in flair + t1}) == 1  # one study
    assert len({row[1] for row in flair}) == 1 and {row[1] for row in flair} != {row[1] for row in t1}
    assert len({row[3] for row in flair}) == 1
    assert len({row[2] for row in flair + t1}) == 2 * SHAPE[2]  # an instance UID per slice
    again = _uids(write_dicom_series(tmp_path / "visit" / "flair", data, aff, "AX FLAIR", 3))
    assert again == flair
    other = _uids(write_dicom_series(tmp_path / "elsewhere" / "flair", data, aff, "AX FLAIR", 3))
    assert other[0][0] != flair[0][0] and other[0][1] != flair[0][1]


# ---------------------------------------------------------------------------- series as scanners and exports write them
@_gdcm_guard()  # ITK sets the process locale to "C": put back, or later tests read UTF-8 text as ASCII
def _slices(folder, data, *, uid="1.2.826.0.1.3680043.2.1125.7", slopes=None, sideways=0.0, keep=None, names=None,
            z0=0.0):
    """Write ``data`` (i, j, k) as one file per axial slice k, 1 mm apart, with SimpleITK directly: optionally each
    slice with its own RescaleSlope (the values stored as int16), its position stepping ``sideways`` mm along x as
    well as 1 mm along the normal, only the slices ``keep``, under other file ``names``."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # file names without .dcm
    for k in range(data.shape[2]) if keep is None else keep:
        values = np.ascontiguousarray(data[:, :, k].T)
        sl = sitk.GetImageFromArray(values.astype(np.float32) if slopes is not None
                                    else np.rint(values).astype(np.int16))
        tags = {"0020|000e": uid, "0020|000d": "1.2.826.0.1.3680043.2.1125.8", "0008|0060": "MR",
                "0008|0018": f"{uid}.{k + 1}", "0020|0013": str(k + 1), "0020|0037": "1\\0\\0\\0\\1\\0",
                "0020|0032": f"{sideways * k:.4f}\\0\\{z0 + k:.4f}", "0028|0030": "1\\1", "0018|0050": "1"}
        if slopes is not None:
            tags.update({"0028|1053": repr(float(slopes[k])), "0028|1052": "0", "0028|0100": "16",
                         "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"})
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / (names[k] if names else f"IM{k:04d}")))
        writer.Execute(sl)
    return folder


def _volume(seed=0, shape=(8, 9, 6)):
    return np.random.default_rng(seed).uniform(0, 300, shape).astype(np.float32)


def test_a_rescale_slope_per_slice_is_applied_to_every_slice(tmp_path):
    """Each slice its own RescaleSlope, the first one 1: the values come back rescaled (ITK took the first slice's
    integer type for the whole series and cut every other slice's values to integers)."""
    data = _volume() / 100.0  # 0 to 3
    slopes = [1.0] + [float(data[:, :, k].max()) / 30000 for k in range(1, data.shape[2])]
    folder = _slices(tmp_path / "dcm", data, slopes=slopes)
    out, _ = load_dicom_series(folder)
    stored = np.stack([np.rint(data[:, :, k] / slopes[k]) * slopes[k] for k in range(data.shape[2])], axis=2)
    np.testing.assert_allclose(out, stored, atol=max(slopes[1:]))  # GDCM's own rounding of the stored values
    assert len(np.unique(out[:, :, 1:])) > 100  # not whole numbers


def test_a_series_spread_over_two_folders_is_one_scan(tmp_path):
    """One series UID in two folders (exports that cap a folder's files; here odd and even slices): one volume of
    every slice in order, named after the folder holding both."""
    data = _volume()
    _slices(tmp_path / "export" / "DICOM" / "A", data, keep=range(0, 6, 2))
    _slices(tmp_path / "export" / "DICOM" / "B", data, keep=range(1, 6, 2))
    series = find_dicom_series(tmp_path / "export")
    assert len(series) == 1 and len(series[0][1]) == 6
    from mslpipe.datasets import gather_sources

    (source,) = gather_sources(tmp_path / "export")
    assert source.case == "DICOM"
    (out,), affine = source.read()
    assert out.shape == (8, 9, 6) and np.allclose(affine[:3, :3], np.diag([-1.0, -1.0, 1.0]))  # LPS rows, RAS out
    np.testing.assert_array_equal(out, np.rint(data))


def test_series_that_are_no_one_regular_stack_are_refused_saying_why(tmp_path):
    """Echoes at one position, a sheared (gantry-tilted) stack, slices of two sizes, a colour series, a
    multi-frame file: each refused with its reason, not as a 'missing slice'."""
    import SimpleITK as sitk

    data = _volume()
    echoes = _slices(tmp_path / "echoes", data, names=[f"E1_{k}" for k in range(6)])
    _slices(echoes, data / 2, names=[f"E2_{k}" for k in range(6)])
    with _raises(echoes, "12 images at 6 slice positions", "echoes"):
        load_dicom_series(echoes)
    sheared = _slices(tmp_path / "sheared", data, sideways=0.5)
    with _raises(sheared, "26.6 degrees off their normal", "tilted gantry"):
        load_dicom_series(sheared)
    sizes = _slices(tmp_path / "sizes", data, keep=range(3))
    _slices(sizes, _volume(1, (8, 7, 6)), keep=range(3, 6))
    with _raises(sizes, "slices of different sizes (8x7 and 8x9)"):
        load_dicom_series(sizes)
    colour = tmp_path / "colour"
    colour.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(3):
        rgb = sitk.GetImageFromArray(np.full((5, 5, 3), 100 * k, np.uint8), isVector=True)
        for tag, value in {"0020|000e": "1.2.3.9", "0020|0032": f"0\\0\\{k}", "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0008|0018": f"1.2.3.9.{k}"}.items():
            rgb.SetMetaData(tag, value)
        writer.SetFileName(str(colour / f"s{k}.dcm"))
        with _gdcm_guard():
            writer.Execute(rgb)
    with _raises(colour, "a colour image (3 values per pixel)"):
        load_dicom_series(colour)
    frames = tmp_path / "frames"
    frames.mkdir()
    from mslpipe.io import numpy_to_sitk

    with _gdcm_guard():
        sitk.WriteImage(sitk.Cast(numpy_to_sitk(np.rint(data), np.eye(4)), sitk.sitkUInt16), str(frames / "mf.dcm"))
    with _raises(frames, "multi-frame DICOM file (6 frames", "dcm2niix"):
        load_dicom_series(frames)


def test_a_damaged_slice_file_is_named_not_left_out_unsaid(tmp_path, caplog):
    """A series' last file is damaged: the scan comes a slice short, so the file is named in a warning (a damaged
    middle slice is named too, before its gap refuses the series); files no export images are not."""
    data = _volume()
    folder = _slices(tmp_path / "dcm", data)
    (folder / "IM0005").write_bytes(b"DICM" + bytes(100))
    (folder / "DICOMDIR").write_bytes(b"")
    (folder / ".DS_Store").write_bytes(b"")
    with caplog.at_level("WARNING"):
        (uid, files), = find_dicom_series(tmp_path)
    assert len(files) == 5
    assert "1 file(s) beside its DICOM series belong to no series" in caplog.text and "IM0005" in caplog.text
    assert "DICOMDIR" not in caplog.text and "DS_Store" not in caplog.text
