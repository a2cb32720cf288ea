"""evaluate -d NAME (cross-validation + test split) and the demo, end to end on tiny data."""

from __future__ import annotations

import json

import pytest

from mslpipe import tables, workflow
from mslpipe.errors import MslpipeError


def test_evaluate_dataset(trained, planned):
    d, _ = trained
    summary = workflow.evaluate_dataset("syn", d, device="cpu", report=True)
    root = d.results_dir("syn", "leaky_unet")
    written = json.loads((root / "summary.json").read_text())
    assert written["per_case"] and "dice" in written["mean"] and "iou" in written["mean"]
    assert written["folds"] == ["fold_0"]
    # with one fold of several trained, the command's table says so: the other folds' scans are in no row
    n_folds = len(planned[1]["splits"]["folds"])
    assert n_folds > 1 and written["n_folds_planned"] == n_folds
    assert tables.summary_text(summary).startswith(f"Cross-validation (out-of-fold): 1 of {n_folds} folds "
                                                           "trained (fold_0); the other folds' validation scans")
    val_subjects = set(planned[1]["splits"]["folds"][0]["val"])
    assert {r["case"].split("_")[0] for r in written["per_case"]} == val_subjects
    assert {r["rater"] for r in written["per_case"]} == {1, 2}
    pp = json.loads((root / "postprocessing.json").read_text())
    assert pp["min_lesion_mm3"] in [c["min_lesion_mm3"] for c in pp["candidates"]]
    test_subjects = set(planned[1]["splits"]["test"])
    assert {r["case"].split("_")[0] for r in summary["test"]["per_case"]} == test_subjects
    assert "slice_dice_study" in summary["mean"]
    page = (root / "crossval" / "report.html").read_text(encoding="utf-8")
    assert "false positive" in page and page.count("<img") >= len(written["per_case"]) // 2


def test_demo_end_to_end_tiny(tmp_path):
    """The whole demo, tiny; run into the folder of an earlier demo (its mark there), which it replaces."""
    earlier = tmp_path / "demo"
    earlier.mkdir()
    (earlier / workflow.DEMO_MARK).write_text("")
    (earlier / "stale.txt").write_text("from an earlier demo")
    result = workflow.demo(tmp_path / "demo", subjects=4, timepoints=1, shape=(32, 36, 24), epochs=1,
                           iterations=2, device="cpu", arch_kwargs={"base_channels": 4, "max_channels": 16,
                                                                     "depth": 2})
    assert "test" in result["summary"] and result["summary"]["test"]["per_case"]
    assert (tmp_path / "demo" / "results" / "synthetic" / "leaky_unet" / "summary.json").exists()
    assert not (earlier / "stale.txt").exists() and (earlier / workflow.DEMO_MARK).is_file()


def test_demo_refuses_a_folder_it_did_not_write_and_deletes_nothing(tmp_path):
    """`demo -o` pointed at a folder of the user's: one clear error before any work, every file still there."""
    mine = tmp_path / "mine"
    (mine / "results").mkdir(parents=True)
    (mine / "results" / "model.pt").write_text("precious")
    with pytest.raises(MslpipeError, match="holds files no demo wrote") as err:
        workflow.demo(mine, subjects=4, epochs=1, iterations=1, device="cpu")
    assert err.value.path == str(mine) and (mine / "results" / "model.pt").read_text() == "precious"
    assert sorted(p.name for p in mine.iterdir()) == ["results"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(MslpipeError, match="this is a file"):
        workflow.demo(tmp_path / "a_file", subjects=4, epochs=1, iterations=1, device="cpu")


def test_evaluate_scores_a_datasets_own_labelled_test_cases(planned, tmp_path):
    """An nnU-Net dataset with imagesTs and labelsTs (here mslpipe's own export of a plan): `evaluate -d` scores
    those test cases against their labelsTs masks, beside the test subjects the plan held out itself."""
    from conftest import TINY_OVERRIDES

    from mslpipe import nnunet_export, plan, train
    from mslpipe.plans import Workdirs

    d, first = planned
    exported = tmp_path / "Dataset001_syn"
    nnunet_export.run("syn", d, exported)
    test_cases = sorted(p.name.removesuffix(".nii.gz") for p in (exported / "labelsTs").iterdir())
    assert test_cases  # the first plan's held-out subjects
    d2 = Workdirs.resolve(tmp_path / "raw", tmp_path / "plans", tmp_path / "pre", tmp_path / "results")
    planned2 = plan.run("nn", d2, input_path=exported, device="cpu", overrides=TINY_OVERRIDES)
    assert sorted(planned2["splits"]["test_only_cases"]) == test_cases
    train.run("nn", d2, 0, epochs=1, iterations=1, device="cpu", show_progress=False)
    summary = workflow.evaluate_dataset("nn", d2, device="cpu")
    scored = {r["case"] for r in summary["test"]["per_case"]}
    held_out = {c["case"] for c in planned2["fingerprint"]["cases"] if c["subject"] in planned2["splits"]["test"]}
    assert scored == set(test_cases) | held_out


def test_train_folds_by_number_all_or_final(planned):
    d = planned[0]
    n_folds = len(planned[1]["splits"]["folds"])
    assert workflow.train_folds("syn", d, "all") == list(range(n_folds))
    assert workflow.train_folds("syn", d, "3") == [3] and workflow.train_folds("syn", d, "final") == ["final"]
    for bad in ("-1", "one", "0,1"):
        with pytest.raises(MslpipeError, match="--fold must be a number, 'all' or 'final'"):
            workflow.train_folds("syn", d, bad)

