"""Folder matching, scoring, summary.json and the minimum-lesion-size search on tiny NIfTI files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mslpipe.errors import MslpipeError
from mslpipe.evaluate import (
    CasePair,
    choose_min_lesion_size,
    match_folders,
    run_folders,
    score_pairs,
    select_min_lesion_size,
)
from mslpipe.io import save_nifti
from mslpipe.tables import format_table

AFFINE = np.diag([1.0, 1.0, 3.0, 1.0])
SHAPE = (10, 10, 6)


def lesions(*boxes, shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for box in boxes:
        m[box] = 1
    return m


A = (slice(1, 3), slice(1, 3), slice(1, 3))
B = (slice(6, 9), slice(6, 9), slice(3, 5))


@pytest.fixture
def dirs(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    return pred, ref


def test_run_folders_writes_summary(dirs):
    pred, ref = dirs
    save_nifti(pred / "c1.nii.gz", lesions(A, B), AFFINE)
    save_nifti(ref / "c1.nii.gz", lesions(A), AFFINE)
    save_nifti(pred / "c2.nii", lesions(B), AFFINE)
    save_nifti(ref / "c2.nii.gz", lesions(A, B), AFFINE)
    summary = run_folders(pred, ref)
    on_disk = json.loads((pred / "summary.json").read_text())
    assert on_disk["per_case"] == summary["per_case"]
    for key in ("per_case", "mean", "mean_skipped", "per_rater", "isbi_score", "isbi_score_reason",
                "volume_correlation", "n_cases", "n_rows", "n_empty_ref", "n_empty_both", "rules"):
        assert key in on_disk
    assert on_disk["n_cases"] == 2 and on_disk["n_rows"] == 2
    row = on_disk["per_case"][0]
    assert row["case"] == "c1" and row["rater"] == 1
    for key in ("dice", "iou", "precision", "recall", "ltpr", "lfpr", "lesion_f1", "n_ref_lesions",
                "n_pred_lesions", "ref_volume_ml", "pred_volume_ml", "abs_volume_diff_ml",
                "hd95_mm", "slice_dice_study"):
        assert key in row and key in on_disk["mean"]
    assert row["n_pred_lesions"] == 2 and row["ltpr"] == 1.0 and row["lfpr"] == 0.5
    assert row["ref_volume_ml"] == pytest.approx(8 * 3 / 1000)  # spacing from the affine
    assert on_disk["per_case"][1]["precision"] == 1.0
    assert isinstance(on_disk["isbi_score"], float)
    assert "slice_dice_study" in on_disk["rules"] and "empty_cases" in on_disk["rules"]
    # by lesion size (voxels of 3 mm³): A is 24 mm³ (10-50), B 54 mm³ (50-200); c1 finds A and adds B, c2 finds B only
    by_size = {b["from_mm3"]: b for b in on_disk["lesions_by_size"]}
    assert [b["to_mm3"] for b in on_disk["lesions_by_size"]] == [10, 50, 200, 1000, None]
    assert [by_size[10][k] for k in ("n_ref_lesions", "n_detected_ref_lesions", "n_pred_lesions",
                                     "n_fp_pred_lesions")] == [2, 1, 1, 0]
    assert [by_size[50][k] for k in ("n_ref_lesions", "n_detected_ref_lesions", "n_pred_lesions",
                                     "n_fp_pred_lesions")] == [1, 1, 2, 1]
    assert by_size[10]["ltpr"] == 0.5 and by_size[50]["fp_fraction"] == 0.5
    assert by_size[0]["ltpr"] is None and by_size[0]["fp_fraction"] is None  # no lesion of that size: no rate
    assert on_disk["per_rater"][0]["lesions_by_size"] == on_disk["lesions_by_size"]
    assert "lesions_by_size" in on_disk["rules"]
    text = format_table(summary)
    assert "c1" in text and "c2" in text and "mean" in text and "ISBI" in text
    size_lines = [line for line in text.splitlines() if "10–50" in line or "50–200" in line]
    assert len(size_lines) == 2 and "0.500" in size_lines[0] and "Lesions by size" in text
    # the score is shown with its two parts: the per-scan terms, and the volume correlation over so few scans
    part, corr = on_disk["isbi_per_scan_part"], on_disk["volume_correlation"]
    assert 0 <= part <= 0.75 and on_disk["isbi_score"] == pytest.approx(part + corr / 4)
    assert (f"ISBI score: {on_disk['isbi_score']:.3f} = per-scan part {part:.3f} (at most 0.75) + volume correlation "
            f"{corr:.3f} / 4 over 2 scans") in text


def test_two_raters_give_two_rows_per_case(dirs, tmp_path):
    pred, ref = dirs
    for case in ("c1", "c2"):
        save_nifti(pred / f"{case}.nii.gz", lesions(A), AFFINE)
        save_nifti(ref / f"{case}_mask1.nii.gz", lesions(A), AFFINE)
        save_nifti(ref / f"{case}_mask2.nii.gz", lesions(A, B), AFFINE)
    pairs = match_folders(pred, ref)
    assert [p.case for p in pairs] == ["c1", "c2"]
    assert [r.name for r in pairs[0].ref_paths] == ["c1_mask1.nii.gz", "c1_mask2.nii.gz"]
    out = tmp_path / "elsewhere" / "s.json"
    summary = run_folders(pred, ref, out=out)
    assert out.exists() and not (pred / "summary.json").exists()
    assert [(r["case"], r["rater"]) for r in summary["per_case"]] == [
        ("c1", 1), ("c1", 2), ("c2", 1), ("c2", 2)]
    assert summary["n_raters"] == 2 and len(summary["per_rater"]) == 2
    assert summary["per_rater"][0]["mean"]["dice"] == 1.0
    assert summary["mean"]["dice"] == pytest.approx(np.mean([r["dice"] for r in summary["per_case"]]))
    # both cases have the same volumes: the correlation is undefined, and said so
    assert summary["isbi_score"] is None and "do not vary" in summary["isbi_score_reason"]


def test_nan_hd95_is_null_and_counted(dirs):
    pred, ref = dirs
    save_nifti(pred / "c1.nii.gz", np.zeros(SHAPE), AFFINE)
    save_nifti(ref / "c1.nii.gz", lesions(A), AFFINE)
    save_nifti(pred / "c2.nii.gz", lesions(A), AFFINE)
    save_nifti(ref / "c2.nii.gz", lesions(A), AFFINE)
    summary = run_folders(pred, ref)
    assert summary["per_case"][0]["hd95_mm"] is None
    assert summary["mean_skipped"]["hd95_mm"] == 1
    assert summary["mean"]["hd95_mm"] == 0.0
    assert summary["n_cases"] == 2 and summary["n_empty_ref"] == 0
    json.loads((pred / "summary.json").read_text())


def test_empty_both_counted(dirs):
    pred, ref = dirs
    save_nifti(pred / "c1.nii.gz", np.zeros(SHAPE), AFFINE)
    save_nifti(ref / "c1.nii.gz", np.zeros(SHAPE), AFFINE)
    summary = run_folders(pred, ref)
    assert summary["n_empty_ref"] == 1 and summary["n_empty_both"] == 1
    assert summary["per_case"][0]["dice"] == 1.0
    assert summary["isbi_score"] is None and "fewer than 2" in summary["isbi_score_reason"]
    assert "ISBI score: undefined (volume correlation undefined with fewer than 2 scans); per-scan part 0.750" in (
        format_table(summary))


def test_unmatched_names(dirs):
    pred, ref = dirs
    save_nifti(pred / "c1.nii.gz", lesions(A), AFFINE)
    save_nifti(pred / "orphan.nii.gz", lesions(A), AFFINE)
    save_nifti(ref / "c1.nii.gz", lesions(A), AFFINE)
    save_nifti(ref / "lonely_mask1.nii.gz", lesions(A), AFFINE)
    with pytest.raises(MslpipeError) as info:
        match_folders(pred, ref)
    msg = str(info.value)
    assert "orphan" in msg and "lonely_mask1.nii.gz" in msg and "\n" not in msg


def test_same_case_twice_is_refused(dirs):
    pred, ref = dirs
    save_nifti(pred / "c1.nii.gz", lesions(A), AFFINE)
    save_nifti(pred / "c1.nii", lesions(A), AFFINE)
    save_nifti(ref / "c1.nii.gz", lesions(A), AFFINE)
    with pytest.raises(MslpipeError, match="two files"):
        match_folders(pred, ref)


def test_empty_prediction_folder(dirs):
    pred, ref = dirs
    save_nifti(ref / "c1.nii.gz", lesions(A), AFFINE)
    (pred / "notes.txt").write_text("not an image")
    with pytest.raises(MslpipeError, match="no NIfTI predictions") as info:
        run_folders(pred, ref)
    assert str(pred) in str(info.value)


def test_missing_folder(dirs, tmp_path):
    pred, _ = dirs
    with pytest.raises(MslpipeError, match="not found"):
        match_folders(pred, tmp_path / "nope")


def test_non_binary_mask_names_the_file(dirs):
    pred, ref = dirs
    bad = lesions(A)
    bad[5, 5, 5] = 2
    save_nifti(pred / "c1.nii.gz", bad, AFFINE)
    save_nifti(ref / "c1.nii.gz", lesions(A), AFFINE)
    with pytest.raises(MslpipeError, match="not binary") as info:
        run_folders(pred, ref)
    assert str(pred / "c1.nii.gz") in str(info.value)


def test_mismatched_shape_names_the_file(dirs):
    pred, ref = dirs
    save_nifti(pred / "c1.nii.gz", np.zeros((10, 10, 5)), AFFINE)
    save_nifti(ref / "c1.nii.gz", lesions(A), AFFINE)
    with pytest.raises(MslpipeError, match="shape") as info:
        run_folders(pred, ref)
    assert str(pred / "c1.nii.gz") in str(info.value)


def test_mismatched_affine_names_the_file(dirs):
    pred, ref = dirs
    save_nifti(pred / "c1.nii.gz", lesions(A), np.diag([1.0, 1.0, 2.0, 1.0]))
    save_nifti(ref / "c1.nii.gz", lesions(A), AFFINE)
    with pytest.raises(MslpipeError, match="affine") as info:
        run_folders(pred, ref)
    assert str(pred / "c1.nii.gz") in str(info.value)


def test_score_pairs_accepts_tuples_and_explicit_spacing(dirs):
    pred, ref = dirs
    p = save_nifti(pred / "c1.nii.gz", lesions(A), AFFINE)
    r = save_nifti(ref / "c1.nii.gz", lesions(A), AFFINE)
    summary = score_pairs([("c1", p, [r])], spacing_from=(2.0, 2.0, 2.0))
    assert summary["per_case"][0]["ref_volume_ml"] == pytest.approx(8 * 8 / 1000)
    with pytest.raises(MslpipeError, match="no cases"):
        score_pairs([])


@pytest.mark.parametrize("spacing_from, words", [("voxel", "'ref', 'pred' or 3 numbers"),
                                                   ((1.0, 1.0), "3 positive numbers"),
                                                   ((1.0, 0.0, 1.0), "3 positive numbers"),
                                                   ((1.0, float("nan"), 1.0), "3 positive numbers")])
def test_score_pairs_refuses_a_bad_voxel_size(dirs, spacing_from, words):
    pred, ref = dirs
    p = save_nifti(pred / "c1.nii.gz", lesions(A), AFFINE)
    r = save_nifti(ref / "c1.nii.gz", lesions(A), AFFINE)
    with pytest.raises(MslpipeError, match=re.escape(words)):
        score_pairs([("c1", p, [r])], spacing_from=spacing_from)


def test_a_case_without_reference_masks_is_refused_naming_its_prediction(dirs):
    pred, _ = dirs
    p = save_nifti(pred / "c1.nii.gz", lesions(A), AFFINE)
    with pytest.raises(MslpipeError, match="'c1' has no reference mask") as info:
        score_pairs([("c1", p, [])])
    assert str(p) in str(info.value)


def speck_case(tmp_path, name, pred_mask, ref_mask):
    p = save_nifti(tmp_path / f"{name}_pred.nii.gz", pred_mask, np.eye(4))
    r = save_nifti(tmp_path / f"{name}_ref.nii.gz", ref_mask, np.eye(4))
    return CasePair(name, p, [r])


def test_select_min_lesion_size_removes_specks(tmp_path):
    ref = lesions(A, (slice(5, 8), slice(5, 8), slice(2, 5)))  # 8 and 27 mm³ at 1 mm
    pred = ref.copy()
    pred[0, 9, 0] = pred[9, 0, 5] = pred[9, 9, 0] = 1  # 1 mm³ false-positive specks
    pairs = [speck_case(tmp_path, "a", pred, ref), speck_case(tmp_path, "b", pred, ref)]
    result = select_min_lesion_size(pairs)
    assert result["min_lesion_mm3"] == 3  # the smallest threshold that removes the specks
    assert result["connectivity"] == 26
    assert [c["min_lesion_mm3"] for c in result["candidates"]] == [0, 3, 5, 10, 20]
    by = {c["min_lesion_mm3"]: c for c in result["candidates"]}
    assert by[3]["lesion_f1"] == 1.0 and by[0]["lesion_f1"] < 1.0
    assert by[20]["dice"] < by[3]["dice"]  # 20 mm³ also drops the 8 mm³ lesion
    assert "3 mm³" in result["chosen_because"]


def test_select_min_lesion_size_keeps_zero_when_removal_hurts(tmp_path):
    ref = lesions(A)
    ref[8, 8, 4] = ref[0, 9, 5] = 1  # real one-voxel lesions
    pairs = [speck_case(tmp_path, "a", ref.copy(), ref)]
    result = select_min_lesion_size(pairs, candidates_mm3=(3, 10))
    assert result["min_lesion_mm3"] == 0
    assert [c["min_lesion_mm3"] for c in result["candidates"]] == [0, 3, 10]
    assert "keeping 0" in result["chosen_because"]


def test_choose_min_lesion_size_in_memory_weighs_the_voxel_size():
    """The in-memory form (what the nested benchmark calls) reads each case's own voxel size: the same 1-voxel
    specks are 1 mm³ at 1 mm and 8 mm³ at 2 mm, so at 2 mm 3 mm³ no longer removes them."""
    ref = lesions(A, (slice(5, 8), slice(5, 8), slice(2, 5)))
    pred = ref.copy()
    pred[0, 9, 0] = pred[9, 0, 5] = 1
    at_1mm = choose_min_lesion_size([(pred, [ref], (1.0, 1.0, 1.0))], candidates_mm3=(3,))
    at_2mm = choose_min_lesion_size([(pred, [ref], (2.0, 2.0, 2.0))], candidates_mm3=(3,))
    assert at_1mm["min_lesion_mm3"] == 3 and at_2mm["min_lesion_mm3"] == 0
    with pytest.raises(MslpipeError, match="no cases"):
        choose_min_lesion_size([])
    with pytest.raises(MslpipeError, match="connectivity"):
        choose_min_lesion_size([(pred, [ref], (1.0, 1.0, 1.0))], connectivity=5)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(MslpipeError, match=">= 0 mm³"):
            choose_min_lesion_size([(pred, [ref], (1.0, 1.0, 1.0))], candidates_mm3=(3, bad))


def _isbi_tree(root, masks):
    for name, mask in masks.items():
        save_nifti(root / "training" / name.split("_")[0] / "masks" / f"{name}.nii.gz", mask, AFFINE)
    return root


def test_isbi_dataset_as_reference_scores_the_predicted_cases(dirs, tmp_path):
    """`--ref` may be an ISBI 2015-layout tree: its masks/ folders are the references (raters by mask number);
    labelled cases that were not predicted are listed in the summary and the table, not scored, not an error."""
    pred, _ = dirs
    root = _isbi_tree(tmp_path / "isbi", {"training01_01_mask1": lesions(A), "training01_01_mask2": lesions(A, B),
                                          "training02_01_mask1": lesions(B)})
    save_nifti(pred / "training01_01.nii.gz", lesions(A), AFFINE)
    summary = run_folders(pred, root)
    assert [(r["case"], r["rater"], r["dice"]) for r in summary["per_case"]] == [
        ("training01_01", 1, 1.0), ("training01_01", 2, pytest.approx(2 * 8 / (8 + 26)))]
    assert summary["unpredicted_references"] == ["training02_01"]
    assert "not scored: 1 labelled case(s) of the reference dataset, not predicted (training02_01)" \
        in format_table(summary)
    # one subject's folder works as well; every case predicted: nothing listed
    assert "unpredicted_references" not in run_folders(pred, root / "training" / "training01")


def test_isbi_dataset_reference_still_refuses_predictions_without_a_mask(dirs, tmp_path):
    pred, _ = dirs
    root = _isbi_tree(tmp_path / "isbi", {"training01_01_mask1": lesions(A)})
    save_nifti(pred / "training01_01.nii.gz", lesions(A), AFFINE)
    save_nifti(pred / "training01_01_flair_pp.nii.gz", lesions(A), AFFINE)
    with pytest.raises(MslpipeError, match="no reference in .* for: training01_01_flair_pp"):
        run_folders(pred, root)
    (tmp_path / "empty" / "training").mkdir(parents=True)
    with pytest.raises(MslpipeError, match="nor an ISBI 2015-layout dataset's masks/ folders"):
        match_folders(pred, tmp_path / "empty")


def test_slice_dice_is_taken_along_each_scans_axial_axis(tmp_path):
    """The same masks stored with their axes in another order (world positions unchanged) score the same
    slice_dice_study: the slices are the axial ones whichever array axis holds S-I (it was always axis 2)."""
    pred, ref = lesions(A, B), lesions(A)
    pred[1:3, 5:9, 1:2] = 1  # a false positive spread in x-y: axial slices and x slices differ
    scores = {}
    for name, order in (("kji", (0, 1, 2)), ("ikj", (2, 0, 1))):
        affine = np.eye(4)
        affine[:3, :3] = AFFINE[:3, :3][:, order]  # array axis a is world axis order[a]
        save_nifti(tmp_path / name / "pred" / "c.nii.gz", pred.transpose(order), affine)
        save_nifti(tmp_path / name / "ref" / "c.nii.gz", ref.transpose(order), affine)
        summary = run_folders(tmp_path / name / "pred", tmp_path / name / "ref")
        scores[name] = summary["mean"]["slice_dice_study"]
        assert summary["slice_axis"] == "axial"
    assert scores["kji"] == pytest.approx(scores["ikj"])
    assert score_pairs([("c", tmp_path / "ikj" / "pred" / "c.nii.gz", [tmp_path / "ikj" / "ref" / "c.nii.gz"])],
                       slice_axis=2)["mean"]["slice_dice_study"] != pytest.approx(scores["kji"])
