"""`mslpipe plan`: fingerprint, plan, subject-level splits, preprocessing, and input verification."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mslpipe import architectures, brainmask, plan
from mslpipe.errors import MslpipeError
from mslpipe.io import load_image, read_json, save_nifti
from mslpipe.plans import Plan, Workdirs, load_plan
from mslpipe.synth import make_dataset

TINY = (24, 28, 20)


def _workdirs(base: Path) -> Workdirs:
    return Workdirs.resolve(base / "raw", base / "plans", base / "pre", base / "results")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _subject_of(fingerprint: dict) -> dict[str, str]:
    return {c["case"]: c["subject"] for c in fingerprint["cases"]}


@pytest.fixture(scope="module")
def synth_planned(tmp_path_factory, synth_root):
    base = tmp_path_factory.mktemp("plan_synth")
    d = _workdirs(base)
    result = plan.run("syn", d, input_path=synth_root, device="cpu")
    return d, result


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """2 subjects × 1 time point, one rater, tiny (read-only: copy before changing)."""
    root = tmp_path_factory.mktemp("tiny") / "tiny"
    make_dataset(root, subjects=2, timepoints=1, shape=TINY, seed=1, raters=1)
    return root


# ---------------------------------------------------------------------------- plan.run on synth_root
def test_fingerprint(synth_planned, synth_root):
    d, result = synth_planned
    fp = json.loads((d.plan_dir("syn") / "fingerprint.json").read_text())
    assert fp["n_cases"] == fp["n_labelled"] == 10 and fp["n_subjects"] == 5 and fp["n_raters"] == 2
    assert fp["dataset"] == "syn" and fp["source"] == str(synth_root.resolve())
    truth = json.loads((synth_root / "synth_truth.json").read_text())
    truth_scans = {f"{s['subject']}_{t['timepoint']:02d}": t
                   for s in truth["subjects"] for t in s["timepoints"]}
    structure = ndimage.generate_binary_structure(3, 3)
    assert [c["case"] for c in fp["cases"]] == sorted(truth_scans)
    for c in fp["cases"]:
        image_path = synth_root / truth_scans[c["case"]]["image"]
        image, affine = load_image(image_path)
        assert c["subject"] == c["case"].split("_")[0] and not c["test_only"]
        assert c["shape"] == list(image.shape)
        np.testing.assert_allclose(c["spacing"], np.linalg.norm(affine[:3, :3], axis=0))
        assert c["orientation"] == "".join(nib.aff2axcodes(affine))
        box = np.array(c["brain_bbox_canonical"])
        assert (box[:, 0] >= 0).all() and (box[:, 1] <= np.array(image.shape)).all()
        assert c["brain_bbox_size"] == list(box[:, 1] - box[:, 0])
        assert 0 < c["intensity"]["p00_5"] < c["intensity"]["mean"] < c["intensity"]["p99_5"]
        assert c["intensity"]["p99_5"] <= image.max()
        assert c["lesion_voxels"] == truth_scans[c["case"]]["lesion_voxels"]
        masks = [load_image(synth_root / m)[0] for m in truth_scans[c["case"]]["masks"]]
        assert c["lesion_count"] == [ndimage.label(m, structure)[1] for m in masks]
        assert c["n_raters"] == 2
        brain = brainmask.brain_mask(image)  # orientation does not change the count
        assert c["brain_ml"] == pytest.approx(brain.sum() * np.prod(c["spacing"]) / 1000)
    med = fp["median"]
    assert med["shape"] == [40, 44, 32]
    np.testing.assert_allclose(med["brain_bbox_size"],
                               np.median([c["brain_bbox_size"] for c in fp["cases"]], axis=0))
    assert med["lesion_voxels"] == np.median([c["lesion_voxels"][0] for c in fp["cases"]])
    assert med["lesion_count"] == np.median([c["lesion_count"][0] for c in fp["cases"]])
    assert result["fingerprint"]["median"] == med


def test_gpu_plans_simulate_low_resolution(synth_planned):
    """GPU plans train long enough for nnU-Net's low-resolution simulation; CPU plans leave it off."""
    fingerprint = read_json(synth_planned[0].plan_dir("syn") / "fingerprint.json")
    gpu = plan.make_plan(fingerprint, "syn", "cuda")
    assert gpu.augmentation.p_low_res == plan.DEFAULT_P_LOW_RES == 0.25
    assert plan.make_plan(fingerprint, "syn", "cpu").augmentation.p_low_res == 0.0


def test_plans_estimate_batchnorm_statistics_again_by_default(synth_planned):
    """Every new plan, GPU or CPU, estimates the final weights' BatchNorm statistics again
    (``bn_recalibration_batches``); a plan without the field (written before) keeps the running averages."""
    fingerprint = read_json(synth_planned[0].plan_dir("syn") / "fingerprint.json")
    for device in ("cuda", "cpu"):
        made = plan.make_plan(fingerprint, "syn", device)
        assert made.bn_recalibration_batches == plan.DEFAULT_BN_RECALIBRATION_BATCHES == 50
    old = plan.make_plan(fingerprint, "syn", "cpu").to_dict()
    del old["bn_recalibration_batches"]
    assert Plan.from_dict(old).bn_recalibration_batches == 0


def test_plans_correct_the_bias_field_with_n4_by_default(synth_planned):
    """Every new plan, GPU or CPU, runs N4 before normalising (``normalization.n4_levels``), and the plan written
    to plans.json says so; a plan without the key (written before) keeps N4 off."""
    fingerprint = read_json(synth_planned[0].plan_dir("syn") / "fingerprint.json")
    for device in ("cuda", "cpu"):
        assert plan.make_plan(fingerprint, "syn", device).normalization["n4_levels"] == plan.DEFAULT_N4_LEVELS == 3
    assert read_json(synth_planned[0].plan_dir("syn") / "plans.json")["normalization"]["n4_levels"] == 3


def test_plans_normalise_by_median_and_iqr_by_default(synth_planned):
    """New plans, GPU or CPU, normalise by the brain's median and IQR, and plans.json says so."""
    fingerprint = read_json(synth_planned[0].plan_dir("syn") / "fingerprint.json")
    for device in ("cuda", "cpu"):
        scheme = plan.make_plan(fingerprint, "syn", device).normalization["scheme"]
        assert scheme == plan.DEFAULT_NORMALIZATION == "brain_percentile_median_iqr"
    written = read_json(synth_planned[0].plan_dir("syn") / "plans.json")
    assert written["normalization"]["scheme"] == "brain_percentile_median_iqr"


def test_plans_json(synth_planned):
    d, result = synth_planned
    p = load_plan(d.plan_dir("syn") / "plans.json")
    assert p == result["plan"] and p.hash == p.compute_hash()
    assert p.dataset == "syn" and p.target_device == "cpu" and p.n_raters == 2 and p.label_policy == "mean"
    volumes = [c["brain_ml"] for c in result["fingerprint"]["cases"]]
    assert p.brain_ml_range == [round(min(volumes), 1), round(max(volumes), 1)] and volumes[0] > 0
    assert p.context_slices == plan.DEFAULT_CONTEXT_SLICES == 1 and p.input_channels == 3  # 2.5D by default
    assert p.augmentation.p_low_res == 0.0  # simulated low resolution: GPU plans only
    divisor = architectures.required_divisor(p.architecture, **p.arch_kwargs)
    assert divisor > 1
    assert len(p.patch_size) == 2 and all(s % divisor == 0 for s in p.patch_size)
    # the patch covers the median brain box plus margins in the slice plane
    bbox = result["fingerprint"]["median"]["brain_bbox_size"]
    in_plane = [s for i, s in enumerate(bbox) if i != p.slice_axis]
    assert all(ps >= s + 2 * p.crop_margin for ps, s in zip(p.patch_size, in_plane, strict=True))



@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_plan_slices_along_the_axis_it_is_given(synth_planned, axis):
    """``slice_axis`` (``plan --slice-axis``): the patch covers the median brain box plus margins across the other
    two axes, whichever axis the slices are cut along; an axis outside 0..2 is refused."""
    fingerprint = read_json(synth_planned[0].plan_dir("syn") / "fingerprint.json")
    p = plan.make_plan(fingerprint, "syn", "cpu", slice_axis=axis)
    divisor = architectures.required_divisor(p.architecture, **p.arch_kwargs)
    in_plane = [s for i, s in enumerate(fingerprint["median"]["brain_bbox_size"]) if i != axis]
    assert p.slice_axis == axis
    assert all(s + 2 * p.crop_margin <= ps < s + 2 * p.crop_margin + divisor and ps % divisor == 0
               for ps, s in zip(p.patch_size, in_plane, strict=True))
    with pytest.raises(MslpipeError, match="slice axis"):
        plan.make_plan(fingerprint, "syn", "cpu", slice_axis=3)


def test_the_slice_axis_is_not_an_override(tmp_path, tiny_root):
    """An override would keep the axial patch: plan.run refuses ``slice_axis`` there, before writing anything."""
    d = _workdirs(tmp_path)
    with pytest.raises(MslpipeError, match="slice_axis"):
        plan.run("tiny", d, input_path=tiny_root, device="cpu", overrides={"slice_axis": 0})
    with pytest.raises(MslpipeError, match="slice axis must be"):  # said before the data is looked at
        plan.run("tiny", d, input_path=tmp_path / "no such folder", device="cpu", slice_axis=-1)
    assert not _files(tmp_path)


def test_a_sagittal_plan_preprocesses_the_same_voxels_sliced_the_other_way(tmp_path, tiny_root):
    """The same scan planned axial and sagittal: the same normalised voxels and labels, cut along the other axis
    (axial slice z, row x, column y is sagittal slice x, row y, column z)."""
    arrays = {}
    for axis in (2, 0):
        d = _workdirs(tmp_path / str(axis))
        result = plan.run("tiny", d, input_path=tiny_root, device="cpu", slice_axis=axis, n_folds=2,
                          test_fraction=0, overrides={"normalization.n4_levels": 0})
        assert result["plan"].slice_axis == axis
        case = result["fingerprint"]["cases"][0]["case"]
        pre = d.preprocessed_dir("tiny")
        arrays[axis] = (np.load(pre / f"{case}.npy"), np.load(pre / f"{case}_seg.npy"),
                        read_json(pre / f"{case}.json")["slice_axis"])
    (axial, axial_seg, a), (sagittal, sagittal_seg, s) = arrays[2], arrays[0]
    assert (a, s) == (2, 0) and axial_seg.any()
    np.testing.assert_array_equal(sagittal, np.transpose(axial, (2, 1, 3, 0)))
    np.testing.assert_array_equal(sagittal_seg, np.transpose(axial_seg, (1, 2, 0)))

def _check_splits_by_subject(splits: dict, subjects: set[str], case_subject: dict[str, str]) -> None:
    test = set(splits["test"])
    rest = subjects - test
    vals = [set(f["val"]) for f in splits["folds"]]
    for f, val in zip(splits["folds"], vals, strict=True):
        train = set(f["train"])
        assert not train & val and not (train | val) & test and train | val == rest
    assert sum(len(v) for v in vals) == len(rest) and set().union(*vals) == rest  # disjoint cover
    s811 = splits["split_811"]
    assert set(s811["test"]) == test and not set(s811["train"]) & set(s811["val"])
    assert set(s811["train"]) | set(s811["val"]) == rest
    # every scan of a subject lands in one partition of every split
    by_subject: dict[str, list[str]] = {}
    for case, subject in case_subject.items():
        by_subject.setdefault(subject, []).append(case)
    partitions = [[test, rest]] + [[test, v, rest - v] for v in vals] + [
        [test, set(s811["train"]), set(s811["val"])]]
    for parts in partitions:
        for subject in by_subject:
            assert sum(subject in part for part in parts) == 1


def test_splits_json(synth_planned):
    d, result = synth_planned
    splits = json.loads((d.plan_dir("syn") / "splits.json").read_text())
    assert splits == result["splits"]
    assert {"test", "folds", "split_811", "seed"} <= set(splits)
    assert splits["seed"] == 12345 and splits["test_only_cases"] == []
    assert all(set(f) == {"train", "val"} for f in splits["folds"])
    assert set(splits["split_811"]) == {"train", "val", "test"}
    subjects = {f"training{s:02d}" for s in range(1, 6)}
    assert len(splits["test"]) == 1 and len(splits["folds"]) == 4 and "warning" in splits
    _check_splits_by_subject(splits, subjects, _subject_of(result["fingerprint"]))
    cases = plan.cases_of(splits["test"], result["fingerprint"])
    assert len(cases) == 2 and {c.split("_")[0] for c in cases} == set(splits["test"])


def test_splits_deterministic_per_seed(synth_planned, tmp_path):
    _, result = synth_planned
    subjects = [c["subject"] for c in result["fingerprint"]["cases"]]
    assert plan.make_splits(subjects, 12345) == {k: v for k, v in result["splits"].items()
                                                 if k != "test_only_cases"}
    many = [f"s{i:02d}" for i in range(10)]
    assert plan.make_splits(many, 7) == plan.make_splits(list(reversed(many)), 7)
    assert plan.make_splits(many, 7) != plan.make_splits(many, 8)
    other = plan.run("syn", _workdirs(tmp_path), input_path=_root_of(result), device="cpu", seed=99)
    assert other["splits"]["seed"] == 99 and other["splits"] != result["splits"]
    assert other["plan"].seed == 99


def _root_of(result) -> Path:
    return Path(result["fingerprint"]["source"])


def test_preprocessed_files(synth_planned):
    d, result = synth_planned
    out = d.preprocessed_dir("syn")
    ids = [c["case"] for c in result["fingerprint"]["cases"]]
    assert result["preprocessed"] == ids
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{cid}{end}" for cid in ids for end in (".npy", "_seg.npy", ".json"))
    p = result["plan"]
    for cid in ids[:2]:
        image = np.load(out / f"{cid}.npy")
        label = np.load(out / f"{cid}_seg.npy")
        props = json.loads((out / f"{cid}.json").read_text())
        assert image.dtype == np.float32 and image.ndim == 4 and image.shape[1] == 1
        assert label.shape == (image.shape[0], *image.shape[2:])
        assert set(np.unique(label)) <= {0.0, 0.5, 1.0}  # mean of two raters
        assert props["case"] == cid and props["preprocessing_hash"] == p.preprocessing_hash()
        assert props["fg_slices"] and max(props["fg_slices"]) < label.shape[0]


def test_rerun_rewrites_nothing_and_changed_option_reprocesses(tmp_path, synth_root):
    d = _workdirs(tmp_path)
    first = plan.run("syn", d, input_path=synth_root, device="cpu")
    assert len(first["preprocessed"]) == 10
    out = d.preprocessed_dir("syn")
    before = {p: p.stat().st_mtime_ns for p in _files(out)}
    second = plan.run("syn", d, input_path=synth_root, device="cpu")
    assert second["preprocessed"] == []
    assert second["plan"].hash == first["plan"].hash
    assert {p: p.stat().st_mtime_ns for p in _files(out)} == before
    third = plan.run("syn", d, input_path=synth_root, device="cpu", overrides={"crop_margin": 2})
    assert third["preprocessed"] == first["preprocessed"]
    assert third["plan"].crop_margin == 2 and third["plan"].hash != first["plan"].hash
    assert load_plan(d.plan_dir("syn") / "plans.json").crop_margin == 2
    props = json.loads((out / "training01_01.json").read_text())
    assert props["preprocessing_hash"] == third["plan"].preprocessing_hash()
    assert all(p.stat().st_mtime_ns != before[p] for p in before)
    # a training-only change keeps the preprocessed files
    fourth = plan.run("syn", d, input_path=synth_root, device="cpu",
                      overrides={"crop_margin": 2, "epochs": 3})
    assert fourth["preprocessed"] == []


def test_changed_source_file_is_preprocessed_again(tmp_path, tiny_root):
    root = tmp_path / "ds"
    shutil.copytree(tiny_root, root)
    d = _workdirs(tmp_path / "work")
    plan.run("ds", d, input_path=root, device="cpu")
    out = d.preprocessed_dir("ds")
    before = np.load(out / "training02_01_seg.npy")
    data, affine = load_image(_mask(root))
    save_nifti(_mask(root), np.zeros_like(data), affine)  # the rater's mask is corrected after planning
    again = plan.run("ds", d, input_path=root, device="cpu")
    assert again["preprocessed"] == ["training02_01"]
    assert before.any() and not np.load(out / "training02_01_seg.npy").any()


def test_test_only_scans_are_preprocessed_but_not_split(tmp_path, tiny_root):
    root = tmp_path / "ds"
    shutil.copytree(tiny_root, root)
    image = root / "training" / "training01" / "preprocessed" / "training01_01_flair_pp.nii.gz"
    test_image = root / "testdata" / "test01" / "preprocessed" / "test01_01_flair_pp.nii"
    test_image.parent.mkdir(parents=True)
    data, affine = load_image(image)
    save_nifti(test_image, data, affine, dtype=np.float32)
    d = _workdirs(tmp_path)
    result = plan.run("ds", d, input_path=root, device="cpu")
    assert result["splits"]["test_only_cases"] == ["test01_01"]
    assert "test01" not in json.dumps({k: result["splits"][k] for k in ("test", "folds", "split_811")})
    out = d.preprocessed_dir("ds")
    assert (out / "test01_01.npy").exists() and not (out / "test01_01_seg.npy").exists()
    assert json.loads((out / "test01_01.json").read_text())["test_only"] is True


def test_nnunet_layout_with_subjects_json(tmp_path):
    synth = tmp_path / "synth"
    make_dataset(synth, subjects=3, timepoints=2, shape=TINY, seed=5, raters=1)
    root = tmp_path / "Dataset001_MS"
    subjects = {}
    for image in sorted(synth.rglob("*_flair_pp.nii.gz")):
        cid = image.name.replace("_flair_pp.nii.gz", "").replace("training", "p")
        mask = image.parent.parent / "masks" / image.name.replace("_flair_pp", "_mask1")
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, root / "imagesTr" / f"{cid}_0000.nii.gz")
        shutil.copy(mask, root / "labelsTr" / f"{cid}.nii.gz")
        subjects[cid] = cid.split("_")[0]
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "FLAIR"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "lesion": 1}}))
    (root / "subjects.json").write_text(json.dumps(subjects))
    result = plan.run("ms", _workdirs(tmp_path), input_path=root, device="cpu", test_fraction=0)
    splits = result["splits"]
    assert splits["test"] == [] and len(splits["folds"]) == 3
    assert result["plan"].label_policy == "mask1"
    _check_splits_by_subject(splits, {"p01", "p02", "p03"}, _subject_of(result["fingerprint"]))


# ---------------------------------------------------------------------------- make_splits
def test_make_splits_ten_subjects():
    subjects = [f"s{i:02d}" for i in range(10)]
    splits = plan.make_splits(subjects * 2, seed=1)  # duplicates (several scans) count once
    assert len(splits["test"]) == 1 and len(splits["folds"]) == 5 and "warning" not in splits
    assert all(len(f["val"]) in (1, 2) for f in splits["folds"])
    assert len(splits["split_811"]["val"]) == 1 and len(splits["split_811"]["train"]) == 8
    _check_splits_by_subject(splits, set(subjects), {s: s for s in subjects})


def test_make_splits_four_subjects_warns(caplog):
    subjects = ["a", "b", "c", "d"]
    with caplog.at_level(logging.WARNING, logger="mslpipe.plan"):
        splits = plan.make_splits(subjects, seed=3)
    assert len(splits["test"]) == 1 and len(splits["folds"]) == 3
    assert "3 folds instead of 5" in splits["warning"]
    assert any("3 folds instead of 5" in r.getMessage() for r in caplog.records)
    _check_splits_by_subject(splits, set(subjects), {s: s for s in subjects})


def test_make_splits_two_subjects():
    splits = plan.make_splits(["a", "b"], seed=3)
    assert splits["test"] == [] and len(splits["folds"]) == 2
    assert sorted(v for f in splits["folds"] for v in f["val"]) == ["a", "b"]
    _check_splits_by_subject(splits, {"a", "b"}, {"a": "a", "b": "b"})


# ---------------------------------------------------------------------------- leave one group (site) out
SITES = {"s01": "b", "s02": "a", "s03": "b", "s04": "c", "s05": "a", "s06": "b", "s07": "c", "s08": "a"}


@pytest.mark.parametrize("test_fraction", [0.0, 0.2])
def test_make_splits_by_group_leaves_one_group_out(test_fraction):
    splits = plan.make_splits(list(SITES) * 2, seed=4, test_fraction=test_fraction, groups=SITES)
    test = set(splits["test"])
    assert len(test) == round(test_fraction * len(SITES))
    rest = {s: g for s, g in SITES.items() if s not in test}
    assert [f["group"] for f in splits["folds"]] == sorted(set(rest.values()))
    for f in splits["folds"]:  # each fold validates on exactly one group's subjects and trains on all the others
        assert f["val"] == sorted(s for s, g in rest.items() if g == f["group"])
        assert {rest[s] for s in f["train"]} == set(rest.values()) - {f["group"]}
    _check_splits_by_subject(splits, set(SITES), {s: s for s in SITES})
    assert plan.make_splits(list(SITES), seed=4, test_fraction=test_fraction, groups=SITES) == splits


def test_make_splits_by_group_refuses_a_subject_without_group_and_a_single_group():
    with pytest.raises(MslpipeError, match=r"--groups: no group for 2 subject\(s\): s09, s10"):
        plan.make_splits([*SITES, "s09", "s10"], seed=4, groups=SITES)
    with pytest.raises(MslpipeError, match="all in group 'a'; leaving one group out needs subjects of at least 2"):
        plan.make_splits(["s02", "s05", "s08"], seed=4, test_fraction=0, groups=SITES)


@pytest.mark.parametrize("content", ['["a", "b"]', "{}", '{"s01": true}', '{"s01": ""}', '{"s01": ["a"]}',
                                     "{not json"])
def test_read_groups_refuses_what_is_not_subject_to_group(tmp_path, content):
    path = tmp_path / "groups.json"
    path.write_text(content)
    with pytest.raises(MslpipeError, match=f"^{path}: "):
        plan.read_groups(path)


def test_read_groups_takes_names_and_numbers(tmp_path):
    path = tmp_path / "groups.json"
    path.write_text('{"s01": "site_a", "s02": 3}')
    assert plan.read_groups(path) == {"s01": "site_a", "s02": "3"}


def test_plan_with_groups_writes_group_folds_and_nothing_when_one_is_missing(tmp_path, tiny_root):
    groups = tmp_path / "groups.json"
    groups.write_text('{"training01": "north"}')
    d = _workdirs(tmp_path / "work")
    with pytest.raises(MslpipeError, match="no group for 1 subject\\(s\\): training02"):
        plan.run("ds", d, input_path=tiny_root, device="cpu", test_fraction=0, groups=groups)
    assert not d.plan_dir("ds").exists() and not d.preprocessed_dir("ds").exists()
    groups.write_text('{"training01": "north", "training02": "south"}')
    result = plan.run("ds", d, input_path=tiny_root, device="cpu", test_fraction=0, groups=groups)
    written = json.loads((d.plan_dir("ds") / "splits.json").read_text())
    assert written["folds"] == result["splits"]["folds"] == [
        {"group": "north", "train": ["training02"], "val": ["training01"]},
        {"group": "south", "train": ["training01"], "val": ["training02"]}]


@pytest.mark.parametrize("subjects", [["only"], ["only", "only"], []])
def test_make_splits_one_subject_is_refused(subjects):
    with pytest.raises(MslpipeError, match="at least 2 labelled subjects"):
        plan.make_splits(subjects, seed=3)


def test_make_splits_without_test_set():
    subjects = [f"s{i:02d}" for i in range(10)]
    splits = plan.make_splits(subjects, seed=3, test_fraction=0)
    assert splits["test"] == [] and splits["split_811"]["test"] == [] and len(splits["folds"]) == 5
    _check_splits_by_subject(splits, set(subjects), {s: s for s in subjects})


# ---------------------------------------------------------------------------- verification
def _break_image(root: Path, data: np.ndarray | None = None) -> Path:
    path = root / "training" / "training02" / "preprocessed" / "training02_01_flair_pp.nii.gz"
    if data is not None:
        _, affine = load_image(path)
        save_nifti(path, data, affine, dtype=np.float32)
    return path


def _mask(root: Path) -> Path:
    return root / "training" / "training02" / "masks" / "training02_01_mask1.nii.gz"


def _corrupt(root):
    path = _break_image(root)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return path, ("cannot read as nifti",)


def _nan(root):
    data, _ = load_image(_break_image(root))
    data[10, 10, 10] = np.nan
    return _break_image(root, data), ("nan",)


def _four_d(root):
    data, _ = load_image(_break_image(root))
    return _break_image(root, np.stack([data, data], axis=-1)), ("3d", "4d")


def _all_zero(root):
    return _break_image(root, np.zeros(TINY, np.float32)), ("empty",)


def _missing_mask(root):
    _mask(root).unlink()
    return _break_image(root), ("training02_01", "no mask")


def _non_binary_mask(root):
    data, affine = load_image(_mask(root))
    data[0, 0, 0] = 2
    save_nifti(_mask(root), data, affine)
    return _mask(root), ("not binary",)


def _mask_shape(root):
    data, affine = load_image(_mask(root))
    save_nifti(_mask(root), data[:, :, :-1], affine)
    return _mask(root), ("shape", str(TINY))


def _mask_affine(root):
    data, affine = load_image(_mask(root))
    affine = affine.copy()
    affine[:3, 3] += [0.0, 0.0, 2.0]
    save_nifti(_mask(root), data, affine)
    return _mask(root), ("affine",)


def _duplicate(root):
    data, affine = load_image(_break_image(root))
    other = _break_image(root).with_name("training02_01_flair_pp.nii")
    save_nifti(other, data, affine, dtype=np.float32)
    return other.parent, ("duplicate", "training02_01")


def _empty(root):
    shutil.rmtree(root)
    root.mkdir()
    return root, ("no cases found",)


def _no_labelled(root):
    """Only test scans (ISBI's testdata_website layout): nothing to plan from; the message names the folder."""
    blob = _break_image(root).read_bytes()
    shutil.rmtree(root)
    folder = root / "testdata_website" / "test01" / "preprocessed"
    folder.mkdir(parents=True)
    (folder / "test01_01_flair_pp.nii.gz").write_bytes(blob)
    return root, ("no labelled", "test case")


def _extra_rater(root):
    """One case has a second rater's mask, the others one: the message names that case and a file of it."""
    shutil.copyfile(_mask(root), _mask(root).with_name("training02_01_mask2.nii.gz"))
    return _mask(root), ("training02_01", "2 rater mask", "have 1")


@pytest.mark.parametrize(
    "breaker",
    [_corrupt, _nan, _four_d, _missing_mask, _non_binary_mask, _mask_shape, _mask_affine, _all_zero,
     _duplicate, _empty, _no_labelled, _extra_rater],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, tiny_root, breaker):
    root = tmp_path / "ds"
    shutil.copytree(tiny_root, root)
    where, words = breaker(root)
    dataset_files = {p: p.stat().st_mtime_ns for p in _files(root)}
    d = _workdirs(tmp_path / "work")
    with pytest.raises(MslpipeError) as info:
        plan.run("ds", d, input_path=root, device="cpu")
    msg = str(info.value)
    assert str(where) in msg, msg
    for word in words:
        assert word.lower() in msg.lower(), msg
    assert _files(d.plans) == [] and _files(d.preprocessed) == []
    assert {p: p.stat().st_mtime_ns for p in _files(root)} == dataset_files  # input untouched


def test_missing_dataset_folder_is_refused(tmp_path):
    d = _workdirs(tmp_path)
    with pytest.raises(MslpipeError) as info:
        plan.run("absent", d, device="cpu")
    assert str(d.raw / "absent") in str(info.value) and "not found" in str(info.value)
    assert _files(d.plans) == [] and _files(d.preprocessed) == []


# ---------------------------------------------------------------------------- real data
def test_plan_on_real_data(tmp_path, real_data):
    repo = Path(__file__).resolve().parents[1]
    assert not real_data.resolve().is_relative_to(repo)  # reached in ../shared, never copied in
    d = _workdirs(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in _files(real_data)}
    result = plan.run("real", d, input_path=real_data, device="cpu")
    fp = result["fingerprint"]
    assert fp["n_cases"] == 6 and len(result["preprocessed"]) == 6
    assert len(list(d.preprocessed_dir("real").glob("*.npy"))) == 12  # image + label per scan
    assert {p: p.stat().st_mtime_ns for p in _files(real_data)} == before  # read-only input
    splits = result["splits"]
    t03 = [c["case"] for c in fp["cases"] if c["subject"] == "training03"]
    assert sorted(t03) == ["training03_01", "training03_02", "training03_03"]
    subjects = {c["subject"] for c in fp["cases"]}
    _check_splits_by_subject(splits, subjects, _subject_of(fp))
    test_cases = set(plan.cases_of(splits["test"], fp))
    for f in splits["folds"]:
        parts = [test_cases, set(plan.cases_of(f["val"], fp)), set(plan.cases_of(f["train"], fp))]
        assert sum(set(t03) <= part for part in parts) == 1
        assert sum(bool(set(t03) & part) for part in parts) == 1


def test_test_cases_of_training_patients_are_named(synth_planned, tmp_path, caplog):
    """A dataset whose test-only cases (imagesTs) belong to training subjects (subjects.json) is planned, with a
    warning in splits.json and the log: those cases' scores are not of unseen patients."""
    from mslpipe import nnunet_export

    d, first = synth_planned
    root = tmp_path / "Dataset002_syn"
    nnunet_export.run("syn", d, root)
    clean = plan.run("nn", _workdirs(tmp_path / "clean"), input_path=root, device="cpu")
    assert "subject(s) with the training cases" not in clean["splits"].get("warning", "")
    subjects = read_json(root / "subjects.json")
    test_case = sorted(p.name.removesuffix("_0000.nii.gz") for p in (root / "imagesTs").iterdir())[0]
    subjects[test_case] = first["splits"]["folds"][0]["train"][0]  # a training patient's time point
    (root / "subjects.json").write_text(json.dumps(subjects))
    with caplog.at_level(logging.WARNING):
        result = plan.run("nn", _workdirs(tmp_path / "leaky"), input_path=root, device="cpu")
    note = f"test-only cases share 1 subject(s) with the training cases ({subjects[test_case]})"
    assert note in result["splits"]["warning"] and note in caplog.text
    assert note in read_json(_workdirs(tmp_path / "leaky").plan_dir("nn") / "splits.json")["warning"]


def test_plan_tells_progress_per_stage_and_case(tiny_root, tmp_path):
    calls = []
    plan.run("tiny", _workdirs(tmp_path), input_path=tiny_root, device="cpu", progress=lambda *a: calls.append(a))
    ids = ["training01_01", "training02_01"]
    assert calls == [("verify", 1, 2, ids[0]), ("verify", 2, 2, ids[1]),
                     ("preprocess", 1, 2, ids[0]), ("preprocess", 2, 2, ids[1])]


def test_a_plan_for_nnunet2d_fits_its_depth_to_the_patch(synth_planned):
    """nnunet2d's depth follows nnU-Net's planner (deepest stage at least 4 pixels per side), so the patch is rounded
    to 2**depth, not to the default depth's 64, and training can run on it."""
    fingerprint = read_json(synth_planned[0].plan_dir("syn") / "fingerprint.json")
    for device in ("cpu", "cuda"):
        p = plan.make_plan(fingerprint, "syn", device, arch="nnunet2d")
        depth = p.arch_kwargs["depth"]
        assert 1 <= depth < 6 and architectures.required_divisor("nnunet2d", **p.arch_kwargs) == 2**depth
        assert all(s % 2**depth == 0 and s // 2**depth >= 4 for s in p.patch_size)


@pytest.mark.parametrize(("options", "message"), [
    ({"n_folds": 1}, "--folds must be at least 2"), ({"n_folds": 0}, "--folds must be at least 2"),
    ({"n_folds": -2}, "--folds must be at least 2"), ({"test_fraction": -0.3}, r"--test-fraction must lie in \[0, 1\)"),
    ({"test_fraction": 1.0}, "--test-fraction must lie"), ({"test_fraction": float("nan")}, "--test-fraction must lie"),
])
def test_split_options_that_make_no_cross_validation_are_refused_before_any_scan_is_read(dirs, tmp_path, options,
                                                                                          message):
    """--folds 1 left a fold without training subjects, --folds 0 none at all, and a negative test fraction held out
    most subjects: all refused, by plan before it reads a scan (here there is none to read) and by the splitter."""
    with pytest.raises(MslpipeError, match=message):
        plan.run("syn", dirs, input_path=tmp_path / "no_such_folder", **options)
    with pytest.raises(MslpipeError, match=message):
        plan.make_splits([f"s{i}" for i in range(6)], 1, **options)
    assert not dirs.plan_dir("syn").exists()


def test_groups_naming_subjects_the_dataset_does_not_have_are_warned_about():
    """A typo in the groups file (a subject that is not in the dataset) was ignored in silence."""
    groups = {"s1": "a", "s2": "a", "s3": "b", "s4": "b", "s9": "b", "trainnig01": "a"}
    splits = plan.make_splits(["s1", "s2", "s3", "s4"], seed=4, test_fraction=0, groups=groups)
    assert splits["warning"] == "--groups names 2 subject(s) this dataset does not have: s9, trainnig01"
    assert "warning" not in plan.make_splits(["s1", "s2", "s3", "s4"], seed=4, test_fraction=0,
                                             groups={k: groups[k] for k in ("s1", "s2", "s3", "s4")})
