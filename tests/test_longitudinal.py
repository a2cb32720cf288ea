"""Longitudinal change (`mslpipe compare`): classification, outputs, geometry checks, synthetic truth, CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mslpipe import longitudinal as lg
from mslpipe.errors import MslpipeError
from mslpipe.io import load_image, read_json, save_nifti

SHAPE = (48, 40, 30)


def _cube(mask: np.ndarray, corner, size) -> None:
    sl = tuple(slice(c, c + s) for c, s in zip(corner, np.broadcast_to(size, 3), strict=True))
    mask[sl] = 1


def _scene():
    """Six baseline lesions and six follow-up lesions (1 mm³ voxels), each far from the others.

    stable (27 → 27), enlarging (27 → 64: +37 mm³, +137 %), shrinking (64 → 27), disappeared (27 → 0),
    new (0 → 27), small growth (27 → 36: +9 mm³ < 10 mm³, stable) and large-but-relatively-small growth
    (512 → 576: +64 mm³ but +12.5 % < 25 %, stable).
    """
    base, follow = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    _cube(base, (2, 2, 2), 3), _cube(follow, (2, 2, 2), 3)  # stable
    _cube(base, (2, 12, 2), 3), _cube(follow, (2, 12, 2), 4)  # enlarging
    _cube(base, (2, 22, 2), 4), _cube(follow, (3, 23, 3), 3)  # shrinking
    _cube(base, (12, 2, 2), 3)  # disappeared
    _cube(follow, (12, 12, 2), 3)  # new
    _cube(base, (12, 22, 2), 3), _cube(follow, (12, 22, 2), (3, 3, 4))  # +9 mm³: stable
    _cube(base, (24, 2, 2), 8), _cube(follow, (24, 2, 2), (8, 8, 9))  # +64 mm³, +12.5 %: stable
    return base, follow


def _status_at(change: lg.Change, voxel) -> str:
    return lg.LABELS[int(change.mask[voxel])]


def test_hand_built_classification_is_exact():
    base, follow = _scene()
    change = lg.compare_masks(base, follow, np.eye(4))
    assert _status_at(change, (3, 3, 3)) == "stable"
    assert _status_at(change, (3, 13, 3)) == "enlarging" and _status_at(change, (5, 15, 5)) == "enlarging"
    assert _status_at(change, (4, 24, 4)) == "shrinking"
    assert _status_at(change, (2, 22, 2)) == "background"  # the voxels a shrinking lesion lost
    assert _status_at(change, (13, 3, 3)) == "disappeared"
    assert _status_at(change, (13, 13, 3)) == "new"
    assert _status_at(change, (13, 23, 5)) == "stable"
    assert _status_at(change, (30, 8, 10)) == "stable"
    assert change.summary["counts"] == {"stable": 3, "enlarging": 1, "new": 1, "shrinking": 1, "disappeared": 1,
                                        "outside": 0}
    assert change.summary["n_baseline_lesions"] == 6 and change.summary["n_followup_lesions"] == 6
    assert set(np.unique(change.mask)) == {0, 1, 2, 3, 4, 5}
    # label 0 exactly where neither scan has a lesion (5 only on disappeared baseline voxels)
    assert np.array_equal(change.mask > 0, (follow > 0) | ((base > 0) & (change.mask == 5)))
    grown = next(r for r in change.lesions if r["status"] == "enlarging")
    assert grown["volume_baseline_mm3"] == 27 and grown["volume_followup_mm3"] == 64
    assert grown["change_mm3"] == 37 and grown["change_percent"] == pytest.approx(100 * 37 / 27)
    assert change.summary["volume_change_ml"] == pytest.approx((follow.sum() - base.sum()) / 1000)


def test_thresholds_are_options_and_physical():
    base, follow = _scene()
    loose = lg.compare_masks(base, follow, np.eye(4), min_growth_fraction=0.1, min_growth_mm3=5)
    assert loose.summary["counts"]["enlarging"] == 3  # now +9 mm³ (+33 %) and +64 mm³ (+12.5 %) count
    # 2 mm³ voxels: the +9 voxel lesion grows by 18 mm³ >= 10 mm³ and 33 % >= 25 %
    coarse = lg.compare_masks(base, follow, np.diag([2.0, 1.0, 1.0, 1.0]))
    assert coarse.summary["counts"]["enlarging"] == 2
    with pytest.raises(MslpipeError, match="min_growth_fraction"):
        lg.compare_masks(base, follow, np.eye(4), min_growth_fraction=-1)


def test_merge_and_split():
    """Lesions that merge are compared with their summed baseline volume; the parts of a split lesion share its
    volume by the voxels each keeps of it, so that the rows' changes add up to the lesions' change."""
    base, follow = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    _cube(base, (2, 2, 2), 3), _cube(base, (2, 6, 2), 3)  # two lesions, one voxel apart
    follow[2:5, 2:9, 2:5] = 1  # bridged: 63 voxels vs 54
    _cube(base, (20, 2, 2), (3, 9, 3))  # 81 voxels, split into two of 27: each has 40.5 of it, lost 13.5 (33 %)
    _cube(follow, (20, 2, 2), 3), _cube(follow, (20, 8, 2), 3)
    _cube(base, (2, 20, 2), (3, 3, 6))  # 54 voxels, split into 27 (all within) and 45 (18 within): 32.4 and 21.6
    _cube(follow, (2, 20, 2), 3), _cube(follow, (2, 20, 6), (3, 3, 5))
    change = lg.compare_masks(base, follow, np.eye(4))
    merged = next(r for r in change.lesions if len(r["baseline_lesions"]) == 2)
    assert merged["status"] == "stable" and merged["volume_baseline_mm3"] == 54
    parts = [r for r in change.lesions if r["centroid_voxel"][0] > 15]
    assert [(r["status"], r["volume_baseline_mm3"]) for r in parts] == [("shrinking", 40.5), ("shrinking", 40.5)]
    grown = sorted((r["volume_baseline_mm3"], r["volume_followup_mm3"], r["status"]) for r in change.lesions
                   if r["centroid_voxel"][1] > 15)
    assert np.allclose([g[:2] for g in grown], [(21.6, 45), (32.4, 27)])
    assert [g[2] for g in grown] == ["enlarging", "stable"]  # +23.4 mm3 (108 %) and -5.4 (17 %)
    total = sum(r["change_mm3"] for r in change.lesions)
    assert total == pytest.approx(change.summary["volume_change_ml"] * 1000)  # no lesion new or gone here


def test_a_lesion_outside_the_follow_ups_field_of_view_is_not_called_gone():
    """Registered visits whose follow-up stops short of the baseline's bottom: a baseline lesion reaching beyond the
    follow-up's view with no partner is 'outside' (label 6), not 'disappeared'; one wholly inside that vanished is
    still 'disappeared'."""
    base, follow = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    _cube(base, (5, 5, 1), 3)  # below the follow-up's view (slices < 6) in part
    _cube(base, (20, 5, 12), 3)  # inside, gone
    _cube(base, (5, 20, 12), 3), _cube(follow, (5, 20, 12), 3)  # inside, stable
    covered = np.zeros(SHAPE, bool)
    covered[:, :, 3:] = True
    change = lg.compare_masks(base, follow, np.eye(4), coverage=covered)
    assert change.summary["counts"] == {"stable": 1, "enlarging": 0, "new": 0, "shrinking": 0, "disappeared": 1,
                                        "outside": 1}
    assert change.summary["volume_outside_ml"] == pytest.approx(0.027)
    assert change.summary["volume_disappeared_ml"] == pytest.approx(0.027)
    assert (change.mask == lg.OUTSIDE).sum() == 27 and (change.mask == lg.DISAPPEARED).sum() == 27
    # the volumes compare what both views hold: the 2 x 3 x 3 voxels of the first lesion below the view apart
    assert change.summary["volume_baseline_beyond_view_ml"] == pytest.approx(0.018)
    assert change.summary["volume_baseline_ml"] == pytest.approx(0.081 - 0.018)
    without = lg.compare_masks(base, follow, np.eye(4))
    assert without.summary["counts"]["disappeared"] == 2 and without.summary["counts"]["outside"] == 0


def test_files_written_atomically_with_csv_and_json(tmp_path):
    base, follow = _scene()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-10, 5, 2)
    save_nifti(tmp_path / "t1.nii.gz", base, affine)
    save_nifti(tmp_path / "t2.nii.gz", follow, affine)
    change = lg.compare_files(tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz", tmp_path / "out")
    mask, aff = load_image(tmp_path / "out" / "change_mask.nii.gz")
    assert np.array_equal(mask, change.mask) and np.allclose(aff, affine)
    rows = list(csv.DictReader((tmp_path / "out" / "lesions.csv").open()))
    assert len(rows) == 6 + 1  # one per follow-up lesion, one per disappeared baseline lesion
    assert sorted(r["status"] for r in rows) == sorted(["stable"] * 3 + ["enlarging", "new", "shrinking",
                                                        "disappeared"])
    summary = read_json(tmp_path / "out" / "summary.json")
    assert summary["counts"]["new"] == 1 and summary["baseline"].endswith("t1.nii.gz")
    assert summary["labels"]["5"] == "disappeared" and len(summary["lesions"]) == 7
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("kind", ["shape", "affine"])
def test_mismatched_geometry_refused(tmp_path, kind):
    base, follow = _scene()
    affine2 = np.eye(4)
    if kind == "shape":
        follow = follow[:-1]
    else:
        affine2[0, 3] = 0.01  # 10 µm: more than the 1e-3 tolerance
    save_nifti(tmp_path / "base.nii.gz", base, np.eye(4))
    save_nifti(tmp_path / "follow.nii.gz", follow, affine2)
    with pytest.raises(MslpipeError) as err:
        lg.compare_files(tmp_path / "base.nii.gz", tmp_path / "follow.nii.gz", tmp_path / "out")
    assert "base.nii.gz" in str(err.value) and "follow.nii.gz" in str(err.value)
    assert kind in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_tiny_affine_difference_accepted(tmp_path):
    base, follow = _scene()
    affine2 = np.eye(4)
    affine2[0, 3] = 1e-4
    save_nifti(tmp_path / "a.nii.gz", base, np.eye(4))
    save_nifti(tmp_path / "b.nii.gz", follow, affine2)
    assert lg.compare_files(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "o").summary["counts"]["new"] == 1


def _probabilities(base, follow):
    """Maps the masks were thresholded from: 0.2 outside the lesions, and per lesion a value of its own."""
    p0, p1 = np.full(SHAPE, 0.2, np.float32), np.full(SHAPE, 0.2, np.float32)
    p0[base > 0], p1[follow > 0] = 0.8, 0.9
    p0[12:15, 2:5, 2:5] = 0.55  # the lesion that disappeared
    p1[12:15, 12:15, 2:5] = 0.6  # the new one
    p1[12, 12, 2] = 0.9  # one voxel of it higher: a mean, not a copy of one voxel
    return p0, p1


def test_lesions_carry_their_mean_probability():
    """With the maps, each follow-up lesion has its mean on the follow-up's map and a disappeared one its mean on
    the baseline's; without them the rows say None."""
    base, follow = _scene()
    change = lg.compare_masks(base, follow, np.eye(4), probabilities=_probabilities(base, follow))
    by_status = {}
    for r in change.lesions:
        by_status.setdefault(r["status"], []).append(r["mean_probability"])
    assert by_status["new"] == [pytest.approx((26 * 0.6 + 0.9) / 27)]
    assert by_status["disappeared"] == [pytest.approx(0.55)]
    assert all(p == pytest.approx(0.9) for key in ("stable", "enlarging", "shrinking") for p in by_status[key])
    assert change.summary["mean_probability"] == {"baseline": True, "followup": True}
    plain = lg.compare_masks(base, follow, np.eye(4))
    assert all(r["mean_probability"] is None for r in plain.lesions)
    assert plain.summary["mean_probability"] == {"baseline": False, "followup": False}
    with pytest.raises(MslpipeError, match="probability shape"):
        lg.compare_masks(base, follow, np.eye(4), probabilities=(None, np.zeros((4, 4, 4), np.float32)))


def test_new_lesions_line_lists_the_doubtful_first():
    from mslpipe import tables

    base, follow = _scene()
    follow[30:33, 30:33, 20:23] = 1  # a second new lesion, 27 mm³
    p0, p1 = _probabilities(base, follow)
    p1[30:33, 30:33, 20:23] = 0.95
    change = lg.compare_masks(base, follow, np.eye(4), probabilities=(p0, p1))
    assert tables.new_lesions_text(change.lesions) == ("new lesions, by mean probability (the lowest first, the first "
                                                       "to check): 0.61 (27 mm³), 0.95 (27 mm³)")
    assert tables.new_lesions_text(lg.compare_masks(base, follow, np.eye(4)).lesions) is None  # no maps
    many = [{"status": "new", "mean_probability": 0.5 + i / 100, "volume_followup_mm3": 8.0} for i in range(12)]
    assert tables.new_lesions_text(many).endswith("0.59 (8 mm³) (+2 more, in lesions.csv)")


def test_compare_files_reads_the_probabilities_predict_saved(tmp_path):
    """Masks in a predict output folder with probabilities/<case>.nii.gz beside them: the CSV and JSON carry the
    lesions' means; a map on another grid, or one that is not a probability, is refused naming its file."""
    base, follow = _scene()
    p0, p1 = _probabilities(base, follow)
    save_nifti(tmp_path / "pred" / "a.nii.gz", base, np.eye(4))
    save_nifti(tmp_path / "pred" / "b.nii.gz", follow, np.eye(4))
    save_nifti(tmp_path / "pred" / "probabilities" / "b.nii.gz", p1, np.eye(4), np.float32)
    change = lg.compare_files(tmp_path / "pred" / "a.nii.gz", tmp_path / "pred" / "b.nii.gz", tmp_path / "o")
    assert change.summary["mean_probability"] == {"baseline": False, "followup": True}
    with open(tmp_path / "o" / "lesions.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["status"]: r["mean_probability"] for r in rows}["disappeared"] == ""  # no baseline map
    assert float(next(r for r in rows if r["status"] == "new")["mean_probability"]) == pytest.approx(0.6111, abs=1e-4)
    saved = read_json(tmp_path / "o" / "summary.json")
    assert next(r for r in saved["lesions"] if r["status"] == "new")["mean_probability"] == pytest.approx(0.6111, 1e-3)
    for bad, reason in ((np.zeros((4, 4, 4), np.float32), "probabilities of shape"),
                        (p0 * 2, "not a probability map")):
        save_nifti(tmp_path / "pred" / "probabilities" / "a.nii.gz", bad, np.eye(4), np.float32)
        with pytest.raises(MslpipeError, match=reason) as info:
            lg.compare_files(tmp_path / "pred" / "a.nii.gz", tmp_path / "pred" / "b.nii.gz", tmp_path / "o")
        assert "probabilities/a.nii.gz" in str(info.value)


def test_image_without_model_refused(tmp_path):
    save_nifti(tmp_path / "flair.nii.gz", np.random.default_rng(0).random(SHAPE) * 100, np.eye(4), np.float32)
    save_nifti(tmp_path / "mask.nii.gz", _scene()[1], np.eye(4))
    with pytest.raises(MslpipeError, match="not a lesion mask.*--checkpoint"):
        lg.compare_files(tmp_path / "flair.nii.gz", tmp_path / "mask.nii.gz", tmp_path / "out")


def test_images_are_segmented_first_with_a_model(trained, synth_root, tmp_path):
    from mslpipe import workflow

    d, result = trained
    images = sorted((synth_root / "training" / "training01" / "preprocessed").glob("*_flair_pp.nii.gz"))
    change = workflow.compare_scans(images[0], images[1], tmp_path / "out", dirs=d,
                                    checkpoint=[result["fold_dir"] / "checkpoint_final.pt"], device="cpu")
    summary = read_json(tmp_path / "out" / "summary.json")
    masks = {role: summary["segmented"][role]["mask"] for role in ("baseline", "followup")}
    assert all(os.path.exists(m) and "segmentations" in m for m in masks.values())
    assert change.mask.shape == load_image(images[1])[0].shape
    # the maps are saved beside the masks and read back: every lesion (the tiny model may find none) is listed
    # with its mean probability, each of its voxels being >= 0.5 on its own scan
    assert all((tmp_path / "out" / "segmentations" / role / "probabilities").is_dir() for role in masks)
    assert change.summary["mean_probability"] == {"baseline": True, "followup": True}
    assert all(0.5 <= r["mean_probability"] <= 1.0 for r in change.lesions)
    with open(tmp_path / "out" / "lesions.csv") as f:
        assert all(0.5 <= float(row["mean_probability"]) <= 1.0 for row in csv.DictReader(f))


# ---------------------------------------------------------------------------- synthetic truth
@pytest.fixture(scope="module")
def longitudinal_root(tmp_path_factory):
    from mslpipe.synth import make_dataset

    root = tmp_path_factory.mktemp("longi") / "raw" / "longi"
    make_dataset(root, subjects=2, timepoints=3, shape=(48, 56, 40), seed=7, raters=1)
    return root


def _truth_voxels(lesion: dict, shape) -> np.ndarray:
    """The voxels of a truth lesion: normalised ellipsoid distance <= 1 (how synth draws mask1)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    rel = grid - np.asarray(lesion["centre"])
    d2 = sum(((rel @ np.asarray(ax)) / r) ** 2 for ax, r in zip(lesion["axes"], lesion["radii"], strict=True))
    return d2 <= 1.0


def test_compare_finds_every_truth_new_lesion(longitudinal_root, tmp_path):
    """On rater-1 masks of t and t+1, every lesion the truth marks "new" at t+1 is found.

    Rule: a truth-new lesion counts as found if a follow-up component classified new overlaps its voxels.
    Conversely, every component classified new overlaps some truth-new lesion (no old lesion is called new).
    """
    truth = read_json(longitudinal_root / "synth_truth.json")
    n_new = 0
    for subject in truth["subjects"]:
        scans = subject["timepoints"]
        for before, after in zip(scans, scans[1:], strict=False):
            change = lg.compare_files(longitudinal_root / before["masks"][0], longitudinal_root / after["masks"][0],
                                      tmp_path / f"{subject['subject']}_{after['timepoint']}")
            new_voxels = change.mask == lg.NEW
            truth_new = np.zeros(new_voxels.shape, dtype=bool)
            for lesion in after["lesions"]:
                if lesion["status"] == "new":
                    voxels = _truth_voxels(lesion, new_voxels.shape)
                    assert (voxels & new_voxels).any(), f"{subject['subject']} t{after['timepoint']} {lesion['id']}"
                    truth_new |= voxels
                    n_new += 1
            from mslpipe.metrics import label_lesions

            labels, n = label_lesions(new_voxels)
            assert all((truth_new & (labels == i)).any() for i in range(1, n + 1))
    assert n_new >= 4  # 2 subjects × 2 follow-ups × at least one new lesion each


# ---------------------------------------------------------------------------- CLI
def _cli(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mslpipe", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", cwd=cwd, env=env)


def test_cli_compare_two_masks_and_errors(tmp_path):
    base, follow = _scene()
    save_nifti(tmp_path / "t1.nii.gz", base, np.eye(4))
    save_nifti(tmp_path / "t2.nii.gz", follow, np.eye(4))
    save_nifti(tmp_path / "other.nii.gz", follow[:-2], np.eye(4))
    out = _cli("compare", tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz", "-o", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    assert "1 new" in out.stdout and "1 enlarging" in out.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"change_mask.nii.gz", "lesions.csv", "summary.json"}
    bad = _cli("compare", tmp_path / "t1.nii.gz", tmp_path / "other.nii.gz", "-o", tmp_path / "bad")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and "Traceback" not in bad.stderr
    assert "t1.nii.gz" in lines[0] and "other.nii.gz" in lines[0] and "shape" in lines[0]
    one = _cli("compare", tmp_path / "t1.nii.gz", "-o", tmp_path / "bad")
    assert one.returncode == 1 and len(one.stderr.strip().splitlines()) == 1


def test_cli_compare_subject(longitudinal_root, tmp_path):
    raw = longitudinal_root.parent
    out = _cli("--raw", raw, "compare", "-d", "longi", "--subject", "training01", "-o", tmp_path / "ch")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "ch").iterdir()) == [
        "training01_01_to_training01_02", "training01_02_to_training01_03", "training01_summary.json"]
    summary = json.loads((tmp_path / "ch" / "training01_summary.json").read_text())
    assert summary["masks"] == "reference masks (rater 1)" and len(summary["pairs"]) == 2
    missing = _cli("--raw", raw, "compare", "-d", "longi", "--subject", "training09", "-o", tmp_path / "x")
    assert missing.returncode == 1 and "training01" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_two_visits_are_registered_before_comparing(trained, synth_root, tmp_path, monkeypatch):
    """`compare --register`: the follow-up FLAIR, turned and shifted onto another grid as a second visit would be,
    is aligned to the baseline; its mask is compared on the baseline grid, and out/registered/ keeps the aligned
    image and mask and the transform. Without --register the two grids are refused, naming the option."""
    from test_registration import _moved

    from mslpipe import workflow

    d, result = trained
    model = [result["fold_dir"] / "checkpoint_final.pt"]
    baseline, second = sorted((synth_root / "training" / "training01" / "preprocessed").glob("*_flair_pp.nii.gz"))
    data, affine = load_image(second)
    follow_affine = affine.copy()
    follow_affine[:3, 3] += (6.0, -3.0, 2.0)
    save_nifti(tmp_path / "visit2.nii.gz", _moved(data, affine, 4.0, (2.0, -2.0, 1.0), follow_affine), follow_affine,
               dtype=np.float32)
    with pytest.raises(MslpipeError, match="compare --register"):
        workflow.compare_scans(baseline, tmp_path / "visit2.nii.gz", tmp_path / "plain", dirs=d, checkpoint=model,
                               device="cpu")
    change = workflow.compare_scans(baseline, tmp_path / "visit2.nii.gz", tmp_path / "out", dirs=d,
                                    checkpoint=model, device="cpu", register=True)
    reg = read_json(tmp_path / "out" / "summary.json")["registration"]
    assert reg == change.summary["registration"] and reg["correlation_after"] > 0.75 > reg["correlation_before"]
    assert "warning" not in reg
    assert abs(abs(reg["rotation_deg"][2]) - 4.0) < 1.0
    for key in ("followup_mask", "followup_image", "transform"):
        assert os.path.exists(reg[key]), key
    assert change.mask.shape == load_image(baseline)[0].shape
    assert load_image(reg["followup_mask"])[0].shape == change.mask.shape
    # each lesion's mean probability, the follow-up's moved onto the baseline grid with its mask
    assert change.summary["mean_probability"] == {"baseline": True, "followup": True}
    assert all(0.5 <= r["mean_probability"] <= 1.0 for r in change.lesions)
    # an alignment below the correlation floor is said, in the summary and the log, not passed over
    from mslpipe import registration

    monkeypatch.setattr(registration, "MIN_ALIGNED_CORRELATION", 0.999)
    images = [load_image(baseline), load_image(tmp_path / "visit2.nii.gz")]
    _, weak, moved, _ = workflow._register_followup(images, tmp_path / "visit2.nii.gz",
                                                    tmp_path / "out" / "segmentations" / "followup" / "visit2.nii.gz",
                                                    tmp_path / "weak")
    assert moved.shape == change.mask.shape and 0.0 <= moved.min() and moved.max() <= 1.0
    assert "the aligned scans correlate poorly" in weak["warning"] and "followup_on_baseline.nii.gz" in weak["warning"]
    mask = tmp_path / "out" / "segmentations" / "baseline"
    with pytest.raises(MslpipeError, match="--register aligns the two FLAIR images"):
        workflow.compare_scans(next(mask.glob("*.nii.gz")), tmp_path / "visit2.nii.gz", tmp_path / "m", dirs=d,
                               register=True)


def test_two_visits_as_dicom_series(trained, synth_root, tmp_path):
    """A hospital's two visits come as DICOM: each series folder is segmented and the follow-up registered; a
    folder of several FLAIR series is refused, naming them, and a DICOM folder without a model is refused."""
    from test_registration import _moved

    from mslpipe import workflow
    from mslpipe.dicom import write_dicom_series

    d, result = trained
    model = [result["fold_dir"] / "checkpoint_final.pt"]
    first, second = sorted((synth_root / "training" / "training01" / "preprocessed").glob("*_flair_pp.nii.gz"))
    (a, aff_a), (b, aff_b) = load_image(first), load_image(second)
    follow_affine = aff_b.copy()
    follow_affine[:3, 3] += (5.0, 2.0, -3.0)
    write_dicom_series(tmp_path / "visit1" / "AX FLAIR", np.rint(a), aff_a, "AX FLAIR", 3)
    write_dicom_series(tmp_path / "visit2" / "AX FLAIR", np.rint(_moved(b, aff_b, 3.0, (2.0, 1.0, 0.0),
                                                                        follow_affine)), follow_affine, "AX FLAIR", 3)
    write_dicom_series(tmp_path / "visit2" / "SAG T1", np.rint(b), aff_b, "SAG T1", 2)  # a study: T1 left out
    change = workflow.compare_scans(tmp_path / "visit1", tmp_path / "visit2", tmp_path / "out", dirs=d,
                                    checkpoint=model, device="cpu", register=True)
    reg = change.summary["registration"]
    assert "warning" not in reg and abs(abs(reg["rotation_deg"][2]) - 3.0) < 1.0
    assert change.mask.shape == a.shape
    write_dicom_series(tmp_path / "visit3" / "AX FLAIR", np.rint(b), aff_b, "AX FLAIR", 3)
    write_dicom_series(tmp_path / "visit3" / "AX FLAIR post", np.rint(b), aff_b, "AX FLAIR post", 9)
    with pytest.raises(MslpipeError, match=r"the followup folder holds 2 scans \(AX_FLAIR, AX_FLAIR_post\)"):
        workflow.compare_scans(tmp_path / "visit1", tmp_path / "visit3", tmp_path / "o3", dirs=d, checkpoint=model,
                               device="cpu", register=True)
    with pytest.raises(MslpipeError, match="the baseline is a DICOM folder, an image: give a model"):
        workflow.compare_scans(tmp_path / "visit1", tmp_path / "visit2", tmp_path / "o4", dirs=d)
