"""datasets.discover: the ISBI 2015 and nnU-Net raw layouts, and the ways a folder can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mslpipe.datasets import check_case_id, discover, gather_sources
from mslpipe.dicom import write_dicom_series
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


def test_nnunet_labels_ts_are_the_test_cases_masks(tmp_path):
    """labelsTs, where it holds a test case's mask (nnU-Net datasets often ship one), is that case's reference."""
    root = _nnunet(tmp_path / "ds", test=("new001", "new002"))
    _touch_nifti(root / "labelsTs" / "new001.nii.gz")
    cases = {c.id: c for c in discover(root)}
    assert cases["new001"].test_only and cases["new001"].masks == [root / "labelsTs" / "new001.nii.gz"]
    assert cases["new002"].test_only and cases["new002"].masks == []


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


# ---------------------------------------------------------------------------- scans to segment
def _isbi_folder(folder, cases=("training01_01", "training01_02"), mods=("flair", "t2", "mprage")):
    data = np.zeros((4, 5, 3), np.float32)
    for case in cases:
        for mod in mods:
            save_nifti(folder / f"{case}_{mod}_pp.nii", data, np.eye(4), dtype=np.float32)
    return folder


def test_isbi_preprocessed_folder_gives_one_scan_per_case(tmp_path):
    """ISBI's preprocessed/ folders hold every modality of a scan: the model's channels are picked, the other
    modalities are no scans of their own, and the output is named as `predict -d` and `evaluate` name it."""
    inp = _isbi_folder(tmp_path / "preprocessed")
    save_nifti(inp / "other.nii.gz", np.zeros((4, 5, 3), np.float32), np.eye(4), dtype=np.float32)
    sources = gather_sources(inp)
    assert [(s.case, [p.name for p in s.paths]) for s in sources] == [
        ("training01_01", ["training01_01_flair_pp.nii"]), ("training01_02", ["training01_02_flair_pp.nii"]),
        ("other", ["other.nii.gz"])]
    two = gather_sources(inp / "training01_02_flair_pp.nii", ["t2", "flair"])
    assert [(s.case, [p.name for p in s.paths]) for s in two] == [
        ("training01_02", ["training01_02_t2_pp.nii", "training01_02_flair_pp.nii"])]


def test_isbi_named_input_of_another_modality_or_without_the_channel_fails(tmp_path):
    inp = _isbi_folder(tmp_path / "preprocessed")
    with pytest.raises(MslpipeError, match="by its ISBI name a t2 scan, but the model segments flair") as exc:
        gather_sources(inp / "training01_01_t2_pp.nii")
    assert "training01_01_t2_pp.nii" in str(exc.value)
    only_t2 = _isbi_folder(tmp_path / "t2only", cases=("training02_01",), mods=("t2",))
    with pytest.raises(MslpipeError, match=r"case training02_01 has no flair image \(found \['t2'\]\)"):
        gather_sources(only_t2)


def _series(folder, value, description, number, prefix="slice"):
    data = np.full((6, 7, 5), value, np.float32)
    data[0, 0, 0] = 0  # not constant
    return write_dicom_series(folder, data, np.diag([1.0, 1.0, 2.0, 1.0]), description, number, prefix)


def test_a_dicom_study_gives_its_flair_series(tmp_path, caplog):
    """A study of several series: the FLAIR ones (by description or protocol) are segmented, the others left out
    with a warning naming them; series sharing one folder are told apart by number and description."""
    study = tmp_path / "study"
    _series(study / "AX T2 FLAIR", 100, "AX T2 FLAIR", 3)
    _series(study / "t1", 200, "SAG T1 MPRAGE", 2)
    _series(study / "mixed", 300, "t2_tirm_tra_dark-fluid", 7, prefix="a")
    _series(study / "mixed", 400, "DWI b1000", 8, prefix="b")
    with caplog.at_level("WARNING"):
        sources = gather_sources(study)
    assert [s.case for s in sources] == ["AX_T2_FLAIR", "mixed_s7_t2_tirm_tra_dark-fluid"]
    assert "2 of 4 DICOM series are FLAIR" in caplog.text and "t1 (series 2: SAG T1 MPRAGE)" in caplog.text
    assert "mixed (series 8: DWI b1000)" in caplog.text
    (image,), _ = sources[1].read()  # the mixed folder's FLAIR series, not its DWI
    assert image.shape == (6, 7, 5) and image.max() == 300


def test_dicom_series_without_a_flair_name_are_all_segmented_and_one_series_whatever_its_name(tmp_path, caplog):
    study = tmp_path / "study"
    _series(study / "a", 100, "", 1)
    _series(study / "b", 200, "T1", 2)
    with caplog.at_level("WARNING"):
        assert [s.case for s in gather_sources(study)] == ["a", "b"]
    assert "none of the 2 DICOM series names FLAIR" in caplog.text
    assert [s.case for s in gather_sources(study / "b")] == ["b"]


def test_series_folders_of_one_name_take_their_parents_names(tmp_path):
    """A tree of patients whose FLAIR series folders share a name gives one scan each, named with the parent
    folders it takes to tell them apart (not one name for all, which predict refuses); unique names stay short."""
    root = tmp_path / "dicom"
    _series(root / "patientA" / "visit1" / "FLAIR", 100, "AX FLAIR", 3)
    _series(root / "patientB" / "visit1" / "FLAIR", 200, "AX FLAIR", 3)
    _series(root / "patientB" / "visit2" / "FLAIR", 300, "AX FLAIR", 3)
    _series(root / "patientC" / "flair_only", 400, "AX FLAIR", 3)
    sources = gather_sources(root)
    names = {s.case: s.read()[0][0].max() for s in sources}
    assert names == {"patientA_visit1_FLAIR": 100, "patientB_visit1_FLAIR": 200, "visit2_FLAIR": 300,
                     "flair_only": 400}
    assert [s.case for s in gather_sources(root / "patientB" / "visit2" / "FLAIR")] == ["FLAIR"]


def test_two_series_of_one_number_and_description_in_one_folder_get_two_names(tmp_path):
    """The same series number and description twice in one folder (a series sent twice, or edited and sent again):
    their UIDs' last digits tell them apart, each read whole."""
    _series(tmp_path / "a", 100, "AX FLAIR", 3, prefix="first")
    _series(tmp_path / "b", 200, "AX FLAIR", 3, prefix="second")
    for f in (tmp_path / "b").iterdir():
        f.rename(tmp_path / "a" / f.name)
    sources = gather_sources(tmp_path / "a")
    assert len({s.case for s in sources}) == 2 and all(s.case.startswith("a_s3_AX_FLAIR_") for s in sources)
    assert sorted(s.read()[0][0].max() for s in sources) == [100, 200]


def test_dicom_series_beside_nifti_files_are_scans_too(tmp_path, caplog):
    """A folder holding NIfTI files and DICOM series folders: all are segmented (the series were left out unsaid);
    a model of several channels reads NIfTI files only and names the series it leaves out."""
    mixed = tmp_path / "mixed"
    _touch_nifti(mixed / "scan1.nii.gz")
    _series(mixed / "patient2" / "FLAIR", 100, "AX FLAIR", 3)
    assert [s.case for s in gather_sources(mixed)] == ["scan1", "FLAIR"]
    assert [s.kind for s in gather_sources(mixed)] == ["nifti", "dicom"]
    _touch_nifti(mixed / "two_0000.nii.gz")
    _touch_nifti(mixed / "two_0001.nii.gz")
    with caplog.at_level("WARNING"):
        assert [s.case for s in gather_sources(mixed, channels=["flair", "t1"])] == ["two"]
    assert "1 DICOM series beside the NIfTI files" in caplog.text and "left out" in caplog.text


@pytest.mark.parametrize(("description", "flair"), [
    ("AX T2 FLAIR", True), ("Sag_3D_T2FLAIR", True), ("3D FLAIR CUBE", True), ("t2_tirm_tra_dark-fluid", True),
    ("DARK_FLUID", True), ("t2_spc_da-fl_sag_p2_iso", True), ("tirm_cor", True),  # Siemens' 3D FLAIR: SPACE dark fluid
    ("AX T1 FLAIR", False), ("AX T1 FLAIR +C", False), ("T1FLAIR", False),  # GE's T1-weighted FLAIR
    ("SAG T1 MPRAGE", False), ("t2_tse_tra", False), ("DWI", False), ("confirm", False)])
def test_which_series_descriptions_name_a_flair(description, flair):
    from mslpipe.datasets import names_flair

    assert names_flair(description, "") is flair


def test_real_isbi_scans_are_named_as_their_masks(real_data):
    """On the real data: predict's names for an ISBI preprocessed/ folder are the case ids whose masks
    `evaluate --ref DATASET` finds, so the two commands meet without renaming."""
    from mslpipe.evaluate import isbi_masks

    sources = gather_sources(real_data / "training" / "training03" / "preprocessed")
    assert [s.case for s in sources] == ["training03_01", "training03_02", "training03_03"]
    assert {name.rsplit("_mask", 1)[0] for name in isbi_masks(real_data)} == {c.id for c in discover(real_data)}
