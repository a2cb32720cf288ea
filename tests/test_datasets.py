"""datasets.discover: the ISBI 2015 and nnU-Net raw layouts, and the ways a folder can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mslpipe.datasets import check_case_id, discover
from mslpipe.errors import MslpipeError
from mslpipe.io import save_nifti

SHAPE = (4, 5, 3)


def _touch_nifti(path: Path) -> Path:
    return save_nifti(path, np.zeros(SHAPE), np.eye(4))


def _isbi_scan(root: Path, subject: str, tp: int, raters=(1,), suffix=".nii.gz", mods=("flair",),
               split="training") -> None:
    stem = f"{subject}_{tp:02d}"
    for mod in mods:
        _touch_nifti(root / split / subject / "preprocessed" / f"{stem}_{mod}_pp{suffix}")
    for r in raters:
        _touch_nifti(root / split / subject / "masks" / f"{stem}_mask{r}{suffix}")


def _check_error(info, path, *words):
    msg = str(info.value)
    assert str(path) in msg, msg
    for word in words:
        assert word.lower() in msg.lower(), msg


# ---------------------------------------------------------------------------- ISBI
def test_isbi_layout_of_the_synthetic_dataset(synth_root):
    cases = discover(synth_root)
    assert [c.id for c in cases] == [f"training{s:02d}_{t:02d}" for s in range(1, 6) for t in (1, 2)]
    for case in cases:
        subject, tp = case.id.split("_")
        assert case.subject == subject and case.timepoint == int(tp)
        assert not case.test_only and case.labelled
        assert list(case.images) == ["flair"]
        assert case.images["flair"] == (synth_root / "training" / subject / "preprocessed"
                                        / f"{case.id}_flair_pp.nii.gz")
        assert [m.name for m in case.masks] == [f"{case.id}_mask1.nii.gz", f"{case.id}_mask2.nii.gz"]


def test_isbi_masks_sorted_by_rater_number(tmp_path):
    _isbi_scan(tmp_path, "training01", 1, raters=(10, 2, 1))
    (case,) = discover(tmp_path)
    assert [m.name for m in case.masks] == [f"training01_01_mask{r}.nii.gz" for r in (1, 2, 10)]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_isbi_nii_and_nii_gz(tmp_path, suffix):
    _isbi_scan(tmp_path, "training01", 1, raters=(1, 2), suffix=suffix)
    _isbi_scan(tmp_path, "training01", 2, raters=(1, 2), suffix=suffix)
    cases = discover(tmp_path)
    assert [c.id for c in cases] == ["training01_01", "training01_02"]
    assert all(c.images["flair"].name.endswith(f"_flair_pp{suffix}") for c in cases)
    assert all(len(c.masks) == 2 and c.masks[0].name.endswith(suffix) for c in cases)


def test_isbi_mixed_suffixes_across_cases(tmp_path):
    _isbi_scan(tmp_path, "training01", 1, suffix=".nii")
    _isbi_scan(tmp_path, "training02", 1, suffix=".nii.gz")
    assert [c.id for c in discover(tmp_path)] == ["training01_01", "training02_01"]


def test_isbi_test_only_scans(tmp_path):
    _isbi_scan(tmp_path, "training01", 1)
    _touch_nifti(tmp_path / "testdata" / "test01" / "preprocessed" / "test01_01_flair_pp.nii")
    _touch_nifti(tmp_path / "testdata" / "test01" / "preprocessed" / "test01_02_flair_pp.nii")
    cases = {c.id: c for c in discover(tmp_path)}
    assert sorted(cases) == ["test01_01", "test01_02", "training01_01"]
    for cid in ("test01_01", "test01_02"):
        assert cases[cid].test_only and not cases[cid].labelled and cases[cid].masks == []
        assert cases[cid].subject == "test01"
    assert cases["test01_02"].timepoint == 2
    assert not cases["training01_01"].test_only


def test_isbi_other_modalities_present_flair_chosen(tmp_path):
    _isbi_scan(tmp_path, "training01", 1, mods=("mprage", "flair", "t2", "pd"), raters=(1, 2))
    (case,) = discover(tmp_path)
    assert list(case.images) == ["flair"]
    assert case.images["flair"].name == "training01_01_flair_pp.nii.gz"
    (case,) = discover(tmp_path, channels=["FLAIR", "MPRAGE"])
    assert list(case.images) == ["flair", "mprage"]


def test_isbi_ignores_images_outside_preprocessed_folders(tmp_path):
    _isbi_scan(tmp_path, "training01", 1)
    _touch_nifti(tmp_path / "training" / "training01" / "orig" / "training01_01_flair_pp.nii.gz")
    (case,) = discover(tmp_path)
    assert case.images["flair"].parent.name == "preprocessed"


def test_isbi_missing_flair_channel(tmp_path):
    _isbi_scan(tmp_path, "training01", 1, mods=("mprage", "t2"))
    folder = tmp_path / "training" / "training01" / "preprocessed"
    with pytest.raises(MslpipeError) as info:
        discover(tmp_path)
    _check_error(info, folder, "training01_01", "no flair image", "mprage")


def test_isbi_duplicate_case_as_nii_and_nii_gz(tmp_path):
    _isbi_scan(tmp_path, "training01", 1, suffix=".nii.gz")
    _touch_nifti(tmp_path / "training" / "training01" / "preprocessed" / "training01_01_flair_pp.nii")
    with pytest.raises(MslpipeError) as info:
        discover(tmp_path)
    _check_error(info, tmp_path / "training" / "training01" / "preprocessed", "duplicate", "training01_01")


def test_isbi_duplicate_case_in_two_folders(tmp_path):
    _isbi_scan(tmp_path, "training01", 1)
    shutil.copytree(tmp_path / "training", tmp_path / "copy_of_training")
    with pytest.raises(MslpipeError) as info:
        discover(tmp_path)
    _check_error(info, "training01_01_flair_pp.nii.gz", "duplicate case training01_01")


# ---------------------------------------------------------------------------- nnU-Net
def _nnunet(root: Path, cases=("case001", "case002"), channels=None, ending=".nii.gz", test=()) -> Path:
    meta = {"channel_names": channels or {"0": "FLAIR"}, "labels": {"background": 0, "lesion": 1},
            "numTraining": len(cases), "file_ending": ending}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    n_channels = len(meta["channel_names"])
    for cid in cases:
        for i in range(n_channels):
            _touch_nifti(root / "imagesTr" / f"{cid}_{i:04d}{ending}")
        _touch_nifti(root / "labelsTr" / f"{cid}{ending}")
    for cid in test:
        for i in range(n_channels):
            _touch_nifti(root / "imagesTs" / f"{cid}_{i:04d}{ending}")
    return root


def test_nnunet_layout(tmp_path):
    root = _nnunet(tmp_path / "Dataset001_MS", test=("new001",))
    cases = discover(root)
    assert [c.id for c in cases] == ["case001", "case002", "new001"]
    c1 = cases[0]
    assert c1.images == {"flair": root / "imagesTr" / "case001_0000.nii.gz"}
    assert c1.masks == [root / "labelsTr" / "case001.nii.gz"]
    assert c1.subject == "case001" and not c1.test_only  # no subjects.json: each case its own subject
    assert cases[2].test_only and cases[2].masks == []


def test_nnunet_second_channel_and_nii_ending(tmp_path):
    root = _nnunet(tmp_path / "ds", channels={"0": "T1", "1": "FLAIR"}, ending=".nii")
    cases = discover(root)
    assert cases[0].images == {"flair": root / "imagesTr" / "case001_0001.nii"}
    assert cases[0].masks == [root / "labelsTr" / "case001.nii"]


def test_nnunet_subjects_json_maps_cases_to_subjects(tmp_path):
    root = _nnunet(tmp_path / "ds", cases=("p1_t1", "p1_t2", "p2_t1"))
    (root / "subjects.json").write_text(json.dumps({"p1_t1": "patient1", "p1_t2": "patient1"}))
    subjects = {c.id: c.subject for c in discover(root)}
    assert subjects == {"p1_t1": "patient1", "p1_t2": "patient1", "p2_t1": "p2_t1"}


def test_nnunet_missing_flair_channel(tmp_path):
    root = _nnunet(tmp_path / "ds", channels={"0": "T1", "1": "T2"})
    with pytest.raises(MslpipeError) as info:
        discover(root)
    _check_error(info, root / "imagesTr", "case001", "no flair image", "t1")


def test_nnunet_unsafe_case_id(tmp_path):
    root = _nnunet(tmp_path / "ds", cases=("good", "bad..id"))
    with pytest.raises(MslpipeError) as info:
        discover(root)
    _check_error(info, root / "imagesTr" / "bad..id_0000.nii.gz", "unsafe case name", "bad..id")


def test_nnunet_invalid_dataset_json(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(MslpipeError) as info:
        discover(root)
    _check_error(info, root / "dataset.json", "not valid json")


def test_nnunet_without_images(tmp_path):
    root = _nnunet(tmp_path / "ds", cases=())
    with pytest.raises(MslpipeError) as info:
        discover(root)
    _check_error(info, root, "no cases found")


# ---------------------------------------------------------------------------- bad folders
def test_empty_folder(tmp_path):
    with pytest.raises(MslpipeError) as info:
        discover(tmp_path)
    _check_error(info, tmp_path, "no cases found")


def test_folder_with_unrelated_files_only(tmp_path):
    _touch_nifti(tmp_path / "scan.nii.gz")
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(MslpipeError) as info:
        discover(tmp_path)
    _check_error(info, tmp_path, "no cases found")


def test_missing_folder(tmp_path):
    with pytest.raises(MslpipeError) as info:
        discover(tmp_path / "absent")
    _check_error(info, tmp_path / "absent", "not found")


def test_file_instead_of_folder(tmp_path):
    path = _touch_nifti(tmp_path / "scan.nii.gz")
    with pytest.raises(MslpipeError) as info:
        discover(path)
    _check_error(info, path, "not a folder")


@pytest.mark.parametrize(
    "bad", ["..", "a..b", "../evil", "a/b", "/abs", ".hidden", "", "a b", "-x", "case\n", "a\\b"]
)
def test_check_case_id_refuses_unsafe_names(bad):
    with pytest.raises(MslpipeError) as info:
        check_case_id(bad, "somewhere.nii.gz")
    _check_error(info, "somewhere.nii.gz", "unsafe case name", repr(bad))


@pytest.mark.parametrize("good", ["training01_01", "case.001", "A-1_b"])
def test_check_case_id_accepts_safe_names(good):
    assert check_case_id(good, "x") == good
