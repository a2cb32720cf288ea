"""The console lines that moved out of the CLI: predict's summary, compare's pairs, export-nnunet's next step."""

from __future__ import annotations

from pathlib import Path

from mslpipe import tables
from mslpipe.predict import PredictReport


def test_predict_text_counts_skips_failures_and_warnings():
    report = PredictReport(written=["a", "b"], skipped=["c"], failed=[("d", "d.nii.gz: not a NIfTI file")],
                           warned=["b"])
    lines = tables.predict_text(report, Path("out"), total_s=3.0, imports_s=1.0).splitlines()
    assert lines[0] == f"wrote 2, skipped 1 existing (use --overwrite), failed 1 → {Path('out')}"
    assert lines[1] == "1 scan(s) unlike the training scans, segmented anyway (see the warnings): b"
    assert len(lines) == 2  # no scan was timed: no timing line


def test_predict_text_times_segmented_scans():
    report = PredictReport(written=["a"], load_s=0.5,
                           case_timings={"a": {"network_s": 1.25, "read_wait_s": 0.0, "write_queue_wait_s": 0.0}})
    lines = tables.predict_text(report, Path("out"), total_s=4.0, imports_s=1.0).splitlines()
    assert lines[0].endswith("skipped 0 existing, failed 0 → out")
    assert lines[1].startswith("time: ") and "network 1.25 s" in lines[1]
    assert len(lines) == 2


def test_pair_text():
    pair = {"baseline_case": "s01_01", "followup_case": "s01_02", "folder": "s01_01_to_02",
            "counts": {"new": 2, "enlarging": 1, "stable": 3, "shrinking": 0, "disappeared": 1},
            "volume_change_ml": 0.5}
    line = tables.pair_text(pair, Path("change"))
    assert line.startswith("s01_01 → s01_02: ") and "2 new" in line
    assert line.endswith(f"volume +0.500 mL → {Path('change') / 's01_01_to_02'}")


def test_nnunet_export_text_names_the_next_command():
    written = {"training": ["a", "b", "c"], "test": ["d"], "label_policy": "mean", "folds": [0, 1]}
    without = tables.nnunet_export_text(written, Path("nn"), "nnUNetPlans_leaky_unet").splitlines()
    assert without[0] == ("exported 3 training and 1 test scans (mean labels), 2 folds in splits_final.json → "
                          f"{Path('nn')}")
    assert without[1].startswith("next: nnUNetv2_plan_and_preprocess")
    with_plans = tables.nnunet_export_text({**written, "plans": "p.json"}, Path("nn"), "nnUNetPlans_leaky_unet")
    assert with_plans.splitlines()[1] == ("wrote p.json: nnUNetv2_train DATASET 2d FOLD -p nnUNetPlans_leaky_unet "
                                          "(with mslpipe importable)")
