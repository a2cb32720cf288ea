"""The real-data benchmark's report logic (bench/real_data.py): the goal lines and the ISBI score's parts."""

import importlib
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def real_data():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("real_data")
    finally:
        sys.path.remove(str(BENCH))


def _entry(arm, fold, dice, s_per_volume, key):
    other = "tta" if key == "no_tta" else "no_tta"
    return {"arm": arm, "fold": fold, "inference": {key: {"scores": {"dice": dice}, "s_per_volume": s_per_volume},
                                                     other: {"scores": {"dice": -1.0}, "s_per_volume": 1e9}}}


def test_goals_compare_default_inference_per_fold(real_data):
    entries = [_entry("nnunet_2d", 0, 0.70, 20.0, "tta"), _entry("mslpipe_leaky_unet", 0, 0.75, 1.0, "no_tta"),
               _entry("nnunet_2d", 1, 0.80, 5.0, "tta"), _entry("mslpipe_leaky_unet", 1, 0.60, 1.0, "no_tta"),
               _entry("mslpipe_leaky_unet", 2, 0.9, 1.0, "no_tta")]  # no nnU-Net entry for fold 2: not compared
    text = real_data.goals(entries)
    assert "fold 0: Dice 0.750 vs 0.700 (met); 20.0x faster per volume (met)" in text
    assert "fold 1: Dice 0.600 vs 0.800 (NOT met); 5.0x faster per volume (NOT met: goal 10x)" in text
    assert "fold 2" not in text
    assert real_data.goals(entries[:1]) == ""
    # a run that did not stop by the shared budget rule is named next to its Dice
    entries[1].update(budget_min=1.5, training={"planned_epochs": 8, "loop_s": 96.0})
    assert "fold 0: Dice 0.750 vs 0.700 (met, but mslpipe trained 8 fixed epochs for 1.60 of 1.5 minutes)" in (
        real_data.goals(entries))
    # a brief run (--iterations) trains one epoch in every arm: nothing unequal to name
    entries[1]["training"] = {"stopping": "one epoch", "loop_s": 6.0}
    assert "fold 0: Dice 0.750 vs 0.700 (met); 20.0x" in real_data.goals(entries)
    entries[1]["training"] = {"stopping": "--minutes: whole epochs while the next fits", "loop_s": 80.0}
    # with both systems' throughput over every scan, the goal line says that ratio too
    entries[0]["throughput"] = {"s_per_volume": 12.0, "n_volumes": 6, "wall_s": 72.0, "inference": "tta"}
    entries[1]["throughput"] = {"s_per_volume": 1.5, "n_volumes": 6, "wall_s": 9.0, "inference": "no_tta"}
    assert "20.0x faster per volume (met), 8.0x over all 6 scans in one command (NOT met: goal 10x)" in (
        real_data.goals(entries))
    assert "| mslpipe_leaky_unet | 0 | no_tta | 6 | 9 | 1.5 |" in real_data.throughput_table(entries)
    assert real_data.throughput_table(entries[2:]) == ""


def test_isbi_parts_average_raters(real_data):
    def row(rater, pred, ref):
        return {"rater": rater, "dice": 1.0, "precision": 1.0, "lfpr": 0.0, "ltpr": 1.0,
                "pred_volume_ml": pred, "ref_volume_ml": ref}

    rows = [row(1, 1, 1), row(1, 2, 2), row(1, 3, 3), row(2, 1, 3), row(2, 2, 2), row(2, 3, 1)]
    partial, corr = real_data.isbi_parts(rows)
    assert partial == pytest.approx(0.75)
    assert corr == pytest.approx(0.0)  # +1 for rater 1, -1 for rater 2
    partial, corr = real_data.isbi_parts(rows[:3])
    assert corr == pytest.approx(1.0) and not math.isnan(partial)


def test_merge_entries_replaces_same_arm_and_fold(real_data, tmp_path):
    import json

    results = {"entries": [_entry("nnunet_2d", 0, 0.70, 20.0, "tta"), _entry("mslpipe_leaky_unet", 0, 0.75, 1.0,
                                                                                "no_tta")]}
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    newer = _entry("nnunet_2d", 0, 0.71, 19.0, "tta")
    first.write_text(json.dumps({"entries": [results["entries"][0], _entry("nnunet_2d", 1, 0.3, 40.0, "tta")]}))
    second.write_text(json.dumps({"entries": [newer, _entry("mslpipe_leaky_unet", 1, 0.35, 8.0, "no_tta")]}))
    added = real_data.merge_entries(results, [first, second])
    keys = sorted((e["arm"], e["fold"]) for e in results["entries"])
    assert keys == [("mslpipe_leaky_unet", 0), ("mslpipe_leaky_unet", 1), ("nnunet_2d", 0), ("nnunet_2d", 1)]
    assert [e for e in results["entries"] if (e["arm"], e["fold"]) == ("nnunet_2d", 0)] == [newer]
    assert len(added) == 3  # the unchanged copy of nnunet_2d fold 0 in the first file is not news
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": [{"fold": 0}]}))
    with pytest.raises(SystemExit, match="bad.json: not a real-data results file"):
        real_data.merge_entries(results, [bad])
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(SystemExit, match="broken.json"):
        real_data.merge_entries(results, [broken])


def test_undefined_numbers_show_as_a_dash(real_data):
    assert real_data._v(float("nan")) == "—" and real_data._v(None) == "—"
    assert real_data._v(0.12345) == 0.123 and real_data._v(3) == 3


def test_runs_name_fold_and_arm_pairs(real_data):
    assert real_data.parse_runs("1:nnunet_leaky_unet, 2:nnunet_2d") == [(1, "nnunet_leaky_unet"), (2, "nnunet_2d")]
    for bad in ("1:nnunet_3d", "x:nnunet_2d", "nnunet_2d", "1:"):
        with pytest.raises(SystemExit, match="FOLD:ARM"):
            real_data.parse_runs(bad)


def test_the_training_table_says_how_each_run_stopped(real_data):
    nn = {"arm": "nnunet_2d", "training": {}}
    old = {"arm": "mslpipe_leaky_unet", "training": {"planned_epochs": 8, "probe_s": 0.0}}
    new = {"arm": "mslpipe_leaky_unet", "training": {"stopping": "--minutes: whole epochs while the next fits"}}
    one = {"arm": "mslpipe_leaky_unet", "training": {"stopping": "one epoch"}}
    brief_nn = {"arm": "nnunet_2d", "iterations": 3, "training": {}}  # --iterations: nnU-Net's arms too
    assert [real_data.stopping(e) for e in (nn, old, new, one, brief_nn)] == [
        "fits", "8 fixed", "fits", "one epoch", "one epoch"]


def _scored(arm, fold, dices, wall_s, key):
    """An entry whose `key` inference scored one row per Dice (its other inference is far worse and slower)."""
    def rows(ds):
        return [{"case": f"f{fold}s{i}", "rater": 1, "dice": d, "iou": d / (2 - d), "precision": d, "recall": d,
                 "ltpr": d, "lfpr": 1 - d, "lesion_f1": d, "abs_volume_diff_ml": 1.0, "pred_volume_ml": 10 * d + i,
                 "ref_volume_ml": 10.0 + i} for i, d in enumerate(ds)]

    def inference(ds, wall):
        from statistics import mean
        return {"scores": {"dice": mean(ds), "iou": None, "lesion_f1": mean(ds), "ltpr": mean(ds), "lfpr": 0.0,
                           "isbi_score": None, "abs_volume_diff_ml": 1.0, "rows": rows(ds)},
                "wall_s": wall, "n_volumes": len(ds), "s_per_volume": wall / len(ds)}

    other = "tta" if key == "no_tta" else "no_tta"
    return {"arm": arm, "fold": fold, "budget_min": 1.5,
            "training": {"stopping": "--minutes: whole epochs while the next fits", "epochs": 7, "s_per_epoch": 11.0,
                         "time_to_best_s": 60.0, "loop_s": 80.0, "wall_s": 120.0},
            "inference": {key: inference(dices, wall_s), other: inference([0.0] * len(dices), 1e4)}}


def test_all_folds_are_pooled_per_scan_in_the_table_and_the_goals(real_data):
    from types import SimpleNamespace

    # fold 0 holds 3 scans, the others one each: pooling is over scans, not a mean of the four folds' means
    mine = [_scored("mslpipe_leaky_unet", 0, [0.8, 0.8, 0.8], 6.0, "no_tta")] + [
        _scored("mslpipe_leaky_unet", k, [0.3], 5.0, "no_tta") for k in (1, 2, 3)]
    theirs = [_scored("nnunet_2d", 0, [0.7, 0.7, 0.7], 45.0, "tta")] + [
        _scored("nnunet_2d", k, [d], 40.0, "tta") for k, d in ((1, 0.4), (2, 0.4), (3, 0.2))]
    setup = SimpleNamespace(folds=[{"val": ["a", "b", "c"]}, {"val": ["d"]}, {"val": ["e"]}, {"val": ["f"]}])
    text = real_data.render(setup, {"entries": mine + theirs}, "test card")
    # mslpipe (0.8*3 + 0.3*3) / 6 = 0.55; nnU-Net (0.7*3 + 0.4 + 0.4 + 0.2) / 6 = 0.517; fold means would say
    # 0.425 against 0.425. Seconds per volume: 21/6 against 165/6, 7.9x; per fold 7.5x and 8x, so met on none
    assert "pooled over all 4 folds (6 scans): Dice 0.550 vs 0.517 (met; met on 2 of 4 folds); 7.9x faster per " \
           "volume (NOT met: goal 10x; met on 0 of 4 folds)" in text
    pooled_row = next(line for line in text.splitlines() if line.startswith("| **mslpipe_leaky_unet** | pooled | no"))
    assert pooled_row.split(" | ")[3] == "0.55" and pooled_row.rstrip(" |").endswith("3.5")
    # with a fold of mslpipe missing there is no pooled row of it, and no pooled goal (nnU-Net's row stays)
    text = real_data.render(setup, {"entries": mine[:3] + theirs}, "test card")
    assert "| **nnunet_2d** | pooled | tta | 0.517 |" in text
    assert "| **mslpipe_leaky_unet** | pooled" not in text and "pooled over all" not in text
    assert real_data.pooled(setup, mine[:3], "no_tta") is None


def test_commit_stamp_flags_uncommitted_code_anywhere_but_not_results_md(tmp_path):
    """bench/results.py's commit stamp: a change to RESULTS.md (which earlier runs rewrite) is not flagged; a
    change anywhere else in the checkout is, mslpipe/ included, and so is a new file git does not ignore (a
    benchmark script not yet committed), but not an ignored one."""
    import os
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "mslpipe").mkdir()
    shutil.copy(BENCH / "results.py", repo / "bench" / "results.py")
    (repo / "bench" / "RESULTS.md").write_text("# results\n")
    (repo / "mslpipe" / "code.py").write_text("x = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=repo, check=True)
    env = {k: v for k, v in os.environ.items() if k != "MSLPIPE_COMMIT"}

    def stamp() -> str:
        return subprocess.run([sys.executable, "-c", "import results; print(results.commit())"], cwd=repo / "bench",
                              env=env, capture_output=True, text=True, check=True).stdout.strip()

    clean = stamp()
    assert clean and "uncommitted" not in clean
    (repo / "bench" / "RESULTS.md").write_text("# results\nrewritten\n")
    assert stamp() == clean
    (repo / ".gitignore").write_text("work/\n")
    subprocess.run([*git, "add", ".gitignore"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "ignore"], cwd=repo, check=True)
    clean = stamp()
    (repo / "work").mkdir()
    (repo / "work" / "cache.json").write_text("{}\n")
    assert stamp() == clean
    (repo / "bench" / "new_bench.py").write_text("x = 1\n")
    assert stamp() == clean + "+uncommitted changes"
    (repo / "bench" / "new_bench.py").unlink()
    assert stamp() == clean
    (repo / "mslpipe" / "code.py").write_text("x = 2\n")
    assert stamp() == clean + "+uncommitted changes"


def test_write_section_refuses_numbers_from_uncommitted_code(tmp_path):
    """A benchmark that started with uncommitted changes writes no section (its numbers could not be traced to a
    commit) and says why on standard error; $MSLPIPE_ALLOW_DIRTY lets it write, stamped as such; a clean run writes."""
    import os
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(BENCH / "results.py", repo / "bench" / "results.py")
    (repo / "bench" / "RESULTS.md").write_text("# results\n")
    (repo / "code.py").write_text("x = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=repo, check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MSLPIPE_COMMIT", "MSLPIPE_ALLOW_DIRTY")}
    script = "import results; print(results.write_section('t', 'T', 'numbers 1.0'))"

    def run(**extra):
        return subprocess.run([sys.executable, "-c", script], cwd=repo / "bench", env={**env, **extra},
                              capture_output=True, text=True, check=True)

    (repo / "code.py").write_text("x = 2\n")  # uncommitted
    out = run()
    assert out.stdout.strip() == "None"
    assert "section 't' not written: the run started from" in out.stderr and "+uncommitted changes" in out.stderr
    assert (repo / "bench" / "RESULTS.md").read_text() == "# results\n"
    run(MSLPIPE_ALLOW_DIRTY="1")
    text = (repo / "bench" / "RESULTS.md").read_text()
    assert "<!-- BEGIN t -->" in text and "+uncommitted changes" in text and "numbers 1.0" in text
    (repo / "code.py").write_text("x = 1\n")  # clean again: written, without the flag
    assert run().stderr == ""
    text = (repo / "bench" / "RESULTS.md").read_text()
    assert text.count("<!-- BEGIN t -->") == 1 and "+uncommitted changes" not in text


def test_bench_shading_leaves_a_zero_background_and_the_brain_box_alone():
    """bench/robustness_bias.py's shading of a raw scan: a ±40% ramp changes the brain's intensities but not a
    skull-stripped scan's zero background, so mslpipe's brain mask and crop box stay those of the scan as acquired
    (shading the background too lifted it above the mask's threshold, and the box became the whole volume)."""
    import numpy as np

    sys.path.insert(0, str(BENCH))
    try:
        robustness_bias = importlib.import_module("robustness_bias")
    finally:
        sys.path.remove(str(BENCH))
    from mslpipe import brainmask

    rng = np.random.default_rng(0)
    image = np.zeros((60, 64, 56), dtype=np.float32)
    z, y, x = np.ogrid[:60, :64, :56]
    brain = ((z - 30) / 22) ** 2 + ((y - 32) / 24) ** 2 + ((x - 28) / 20) ** 2 <= 1
    image[brain] = rng.uniform(40, 250, brain.sum())  # darkest brain intensity well above the mask's threshold
    shaded = robustness_bias.shade(image, robustness_bias.ramp(0.4))
    assert np.all(shaded[~brain] == 0)
    assert not np.allclose(shaded[brain], image[brain])
    inside = shaded[brain] / np.maximum(image[brain], 1e-6)
    assert inside.min() < 0.8 and inside.max() > 1.2  # the ramp is there
    assert brainmask.bounding_box(brainmask.brain_mask(shaded), 0) == brainmask.bounding_box(brain, 0)


def test_bench_arms_may_differ_only_as_named(tmp_path):
    """bench/results.py: an arm's plan that differs from the first arm's in more than its own overrides (as when one
    arm's folds were planned under an older default normalisation) is named field by field, an option absent from an
    older plan counts as off; reusing a planned folder whose plan does not hold the overrides asked stops, naming
    the plan file and the field, before any training."""
    import json

    sys.path.insert(0, str(BENCH))
    try:
        results = importlib.import_module("results")
    finally:
        sys.path.remove(str(BENCH))
    from mslpipe.plans import Workdirs

    def write(folder, plan):
        dirs = Workdirs.resolve(folder / "raw", folder / "plans", folder / "pre", folder / "results")
        dirs.plan_dir("real").mkdir(parents=True)
        (dirs.plan_dir("real") / "plans.json").write_text(json.dumps(plan))
        (dirs.plan_dir("real") / "splits.json").write_text("{}")
        return dirs

    old = {"hash": "a", "normalization": {"scheme": "brain_percentile_zscore"},
           "augmentation": {"p_bias_field": 0.0, "bias_field_coeff": [0.0, 0.1]}}
    new = {"hash": "b", "normalization": {"scheme": "brain_percentile_median_iqr", "n4_levels": 0},
           "augmentation": {"p_bias_field": 0.3, "bias_field_coeff": [0.0, 0.1]}}
    base, arm = write(tmp_path / "base", old), write(tmp_path / "arm", new)
    base_plans, arm_plans = (d.plan_dir("real") / "plans.json" for d in (base, arm))
    drift = results.plan_drift(base_plans, arm_plans, {"augmentation.p_bias_field": 0.3})
    assert drift == ["normalization.scheme: brain_percentile_zscore against brain_percentile_median_iqr"]
    assert results.plan_drift(base_plans, arm_plans, ["augmentation.p_bias_field", "normalization.scheme"]) == []
    # reuse: held overrides pass (a tuple asked equals the plan's list; absent equals 0), others stop
    assert results.planned(base, 1, {"augmentation.bias_field_coeff": (0.0, 0.1),
                                     "normalization.n4_levels": 0}) == base_plans
    # a whole section given as a dict (bench/normalisation.py's way) is checked key by key
    assert results.planned(base, 1, {"normalization": {"scheme": "brain_percentile_zscore"}}) == base_plans
    with pytest.raises(SystemExit, match="normalization.scheme"):
        results.planned(base, 1, {"normalization": {"scheme": "brain_percentile_median_iqr"}})
    with pytest.raises(SystemExit, match="normalization.scheme: brain_percentile_median_iqr in the plan") as info:
        results.planned(arm, 1, {"normalization.scheme": "brain_percentile_zscore"})
    assert str(arm_plans) in str(info.value)


def test_lesion_probability_filter_and_its_nested_choice():
    """bench/lesion_probability.py: a whole lesion goes when its mean (or highest) probability is under P; the
    choice over the grid follows `evaluate`'s criterion (no setting that lowers Dice or lesion F1 below no removal,
    then the best (Dice + F1)/2, ties to the smaller size and the lower P)."""
    import numpy as np

    sys.path.insert(0, str(BENCH))
    try:
        lesion_probability = importlib.import_module("lesion_probability")
    finally:
        sys.path.remove(str(BENCH))

    prob = np.zeros((20, 20, 20), dtype=np.float32)
    ref = np.zeros(prob.shape, dtype=bool)
    prob[2:6, 2:6, 2:6], ref[2:6, 2:6, 2:6] = 0.95, True  # a sure, true lesion of 64 mm³
    prob[12:15, 12:15, 12:15] = 0.55  # an unsure, false one of 27 mm³
    prob[13, 13, 13] = 0.9  # its peak: kept by a filter on the highest probability up to 0.9
    s = lesion_probability.setting_scores(prob, ref, (1.0, 1.0, 1.0))
    assert s["mean", 0, 0] == (pytest.approx(2 * 64 / (64 + 91)), pytest.approx(2 / 3))
    assert s["mean", 0, 0.6] == (1.0, 1.0)  # the unsure lesion gone by its mean
    assert s["max", 0, 0.8] == s["mean", 0, 0]  # its peak keeps it
    assert s["mean", 20, 0] == s["mean", 0, 0] and s["mean", 3, 0.8] == (1.0, 1.0)
    assert lesion_probability.choose([s], "mean") == (0, 0.6)  # the smallest setting reaching the best
    # a grid where every filter loses Dice or lesion F1: no removal
    lost = {key: ((0.5, 0.5) if key[1:] == (0, 0) else (0.9, 0.4)) for key in s}
    assert lesion_probability.choose([lost], "mean") == (0, 0)


def test_bn_adaptation_takes_the_statistics_of_the_scan_itself():
    """bench/bn_adaptation.py: the adapted copy's BatchNorm statistics are the average over the scan's own slices
    (with their neighbours as channels); the trained model is left as it was."""
    import numpy as np
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        bn_adaptation = importlib.import_module("bn_adaptation")
    finally:
        sys.path.remove(str(BENCH))

    conv = torch.nn.Conv2d(3, 2, 1, bias=False)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = np.random.default_rng(0).normal(5.0, 2.0, (7, 1, 8, 8)).astype(np.float32)  # S×C×H×W
    adapted = bn_adaptation.adapt_to_scan(model, image, divisor=4, batch_size=3, context=1)
    assert not adapted.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    from mslpipe import preprocess

    stacks = torch.from_numpy(preprocess.with_context(image, np.arange(7), 1))
    with torch.no_grad():
        outs = [conv(stacks[s:s + 3]) for s in range(0, 7, 3)]  # the batches the pass saw
    expected = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    assert torch.allclose(adapted[1].running_mean, expected, atol=1e-5)
    assert not torch.allclose(adapted[1].running_mean, before["1.running_mean"])
