"""The command line: help, one-line errors with non-zero exits, --debug, evaluate --pred --ref."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mslpipe.io import save_nifti

TEXT = {"text": True, "encoding": "utf-8", "errors": "replace"}  # the CLI prints UTF-8 whatever the locale


def run_cli(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mslpipe", *map(str, args)], capture_output=True, **TEXT,
                          cwd=cwd, env=env)


def test_help_lists_every_stage():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("synth", "plan", "train", "predict", "evaluate", "demo", "archs"):
        assert cmd in out.stdout


def test_version():
    from mslpipe import __version__

    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"mslpipe {__version__}"


def test_every_option_says_what_it_does():
    """No option of any command is listed without a help text (rich's table leaves its last column empty, or shows
    only the default there)."""
    for cmd in ("synth", "plan", "train", "predict", "evaluate", "demo", "compare", "export", "export-nnunet"):
        out = subprocess.run([sys.executable, "-m", "mslpipe", cmd, "--help"], capture_output=True, **TEXT,
                             env={**os.environ, "COLUMNS": "200"})
        bare = []
        for line in out.stdout.splitlines():
            words = re.sub(r"\[default: [^]]*\]", "", line).strip("│ *").split()
            if words and words[0].startswith("--") and all(w[0] in "-<" for w in words):  # flags, metavar only
                bare.append(words[0])
        assert out.returncode == 0 and not bare, (cmd, bare)


def test_help_shows_the_defaults_in_brackets():
    """Defaults written in help texts survive rich's markup (square brackets would be eaten as tags)."""
    out = subprocess.run([sys.executable, "-m", "mslpipe", "plan", "--help"], capture_output=True, **TEXT,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0
    assert "raw_data/NAME" in out.stdout and "(default: 1, i.e. 3 slices)" in out.stdout


def test_missing_dataset_is_one_line_error(tmp_path):
    out = run_cli("plan", "-d", "nothing", cwd=tmp_path)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "raw_data/nothing" in lines[0] and "not found" in lines[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "plans").exists()


def test_debug_shows_traceback(tmp_path):
    out = run_cli("--debug", "plan", "-d", "nothing", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_work_folders_move_with_environment(tmp_path, synth_root):
    env_raw = tmp_path / "elsewhere"
    env_raw.mkdir()
    (env_raw / "syn").symlink_to(synth_root)
    out = subprocess.run([sys.executable, "-m", "mslpipe", "plan", "-d", "syn", "--device", "cpu"],
                         capture_output=True, **TEXT, cwd=tmp_path,
                         env={**os.environ, "MSLPIPE_RAW": str(env_raw), "MSLPIPE_PLANS": str(tmp_path / "P")})
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "P" / "syn" / "plans.json").exists()
    # plan's warnings are said once, on stderr (they were also repeated among its lines on stdout)
    assert out.stderr.splitlines() == ["WARNING mslpipe.plan: only 4 subjects outside the test set: 4 folds instead "
                                       "of 5"] and "only 4 subjects" not in out.stdout, out.stderr
    assert (tmp_path / "preprocessed" / "syn").is_dir()


def _plan_with(tmp_path, synth_root, option: str, bad: str, reason: str, good: list[str]) -> tuple[dict, str]:
    """``plan OPTION BAD`` exits 1 with one line naming ``reason`` and writes nothing; ``plan OPTION GOOD...`` works:
    (the plans.json it wrote, its stdout)."""
    import json

    out = run_cli("plan", "-d", "syn", "-i", synth_root, "--device", "cpu", option, bad, cwd=tmp_path)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert reason in out.stderr and not (tmp_path / "plans").exists()
    out = run_cli("plan", "-d", "syn", "-i", synth_root, "--device", "cpu", option, *good, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return json.loads((tmp_path / "plans" / "syn" / "plans.json").read_text()), out.stdout


def test_plan_context_slices_option(tmp_path, synth_root):
    written, stdout = _plan_with(tmp_path, synth_root, "--context-slices", "7", "context_slices", ["2"])
    assert written["context_slices"] == 2 and "5 axial input slice(s)" in stdout
    lines = stdout.splitlines()
    assert lines[0].startswith(f"plan {written['hash']} for syn:") and lines[1].startswith("splits: test")
    assert lines[-1] == "next: mslpipe train -d syn --fold 0"



def test_plan_slice_axis_option(tmp_path, synth_root):
    written, stdout = _plan_with(tmp_path, synth_root, "--slice-axis", "3", "slice axis", ["1"])
    assert written["slice_axis"] == 1 and "3 coronal input slice(s)" in stdout

def test_plan_foreground_sampling_option(tmp_path, synth_root):
    written, _ = _plan_with(tmp_path, synth_root, "--foreground-sampling", "voxel", "foreground_sampling",
                            ["lesion"])
    assert written["foreground_sampling"] == "lesion"


def test_plan_bias_field_option(tmp_path, synth_root):
    written, _ = _plan_with(tmp_path, synth_root, "--bias-field", "1.5", "p_bias_field must lie in [0, 1]", ["0.4"])
    assert written["augmentation"]["p_bias_field"] == 0.4 and written["augmentation"]["bias_field_coeff"] == [0.0, 0.1]


def test_plan_flatfield_option(tmp_path, synth_root):
    written, stdout = _plan_with(tmp_path, synth_root, "--flatfield", "-3", "flatfield_mm",
                                 ["25", "--normalization", "brain_percentile_zscore"])
    norm = written["normalization"]
    assert norm["flatfield_mm"] == 25 and norm["scheme"] == "brain_percentile_zscore"
    assert "preprocessing: flat field (25 mm), clip to brain percentiles 0.5/99.5, z-score inside" in stdout
    assert norm["n4_levels"] == 0  # a flat field replaces the default N4


def test_plan_n4_option(tmp_path, synth_root):
    written, _ = _plan_with(tmp_path, synth_root, "--n4", "9", "n4_levels must be an integer from 0 (off) to 6",
                            ["3"])
    assert written["normalization"]["n4_levels"] == 3 and not written["normalization"].get("flatfield_mm")


def test_plan_refuses_n4_beside_a_flat_field(tmp_path, synth_root):
    out = run_cli("plan", "-d", "syn", "-i", synth_root, "--device", "cpu", "--n4", "3", "--flatfield", "25",
                  cwd=tmp_path)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "flatfield_mm or n4_levels, not both" in out.stderr and not (tmp_path / "plans").exists()


def test_plan_groups_option(tmp_path, synth_root):
    (tmp_path / "bad.json").write_text('["training01"]')
    sites = {f"training{i:02d}": "ab"[i % 2] for i in range(1, 6)}
    (tmp_path / "sites.json").write_text(json.dumps(sites))
    _, stdout = _plan_with(tmp_path, synth_root, "--groups", tmp_path / "bad.json",
                           f"{tmp_path / 'bad.json'}: --groups takes a JSON object", [tmp_path / "sites.json"])
    assert "(one group left out in each: a, b)" in stdout.splitlines()[1]
    splits = json.loads((tmp_path / "plans" / "syn" / "splits.json").read_text())
    assert [f["group"] for f in splits["folds"]] == ["a", "b"]


def test_plan_normalization_option(tmp_path, synth_root):
    import json

    import numpy as np

    out = run_cli("plan", "-d", "syn", "-i", synth_root, "--device", "cpu", "--normalization", "minmax", cwd=tmp_path)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "normalization" in out.stderr and not (tmp_path / "plans").exists()
    centres = {}
    for scheme, centre in (("brain_percentile_zscore", np.mean), (None, np.median)):  # None: the default
        work = tmp_path / str(scheme)
        work.mkdir()
        out = run_cli("plan", "-d", "syn", "-i", synth_root, "--device", "cpu",
                      *(["--normalization", scheme] if scheme else []), cwd=work)
        assert out.returncode == 0, out.stderr
        plan = json.loads((work / "plans" / "syn" / "plans.json").read_text())
        assert plan["normalization"]["scheme"] == (scheme or "brain_percentile_median_iqr")
        words = "z-score" if scheme else "median/IQR"
        assert f"preprocessing: N4 (3 levels), clip to brain percentiles 0.5/99.5, {words} inside" in out.stdout
        image = np.load(next((work / "preprocessed" / "syn").glob("*_01.npy")))
        brain = image[image != 0]
        centres[scheme] = (float(np.mean(brain)), float(np.median(brain)))
        assert abs(float(centre(brain))) < 0.05, (scheme, centres[scheme])  # centred on the scheme's centre
    assert centres["brain_percentile_zscore"] != centres[None]


def test_evaluate_pred_ref(tmp_path):
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:5, 2:5, 2:5] = 1
    pred = np.zeros_like(ref)
    pred[3:5, 2:5, 2:5] = 1
    save_nifti(tmp_path / "ref" / "c1.nii.gz", ref, np.eye(4))
    save_nifti(tmp_path / "pred" / "c1.nii.gz", pred, np.eye(4))
    out = run_cli("evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "pred" / "summary.json").exists()
    assert "0.800" in out.stdout  # Dice = 2*18/(27+18)


def test_evaluate_unmatched_is_one_line_error(tmp_path):
    save_nifti(tmp_path / "ref" / "a.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    save_nifti(tmp_path / "pred" / "b.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    out = run_cli("evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1


def test_archs_lists_parameter_counts():
    out = run_cli("archs")
    assert out.returncode == 0
    assert "leaky_unet" in out.stdout and "31.39" in out.stdout and "nnunet2d" in out.stdout


def test_predict_ends_with_everything_said_and_written(trained, synth_root, tmp_path):
    """predict ends its process without Python's teardown once it is done: the outputs are complete, every line
    is printed, and the exit status still tells success (0) from a failed scan (1)."""
    from mslpipe.io import load_image

    _, result = trained
    model = result["fold_dir"] / "checkpoint_final.pt"
    scan = next((synth_root / "training").glob("training01/preprocessed/*_flair_pp.nii.gz"))
    data, affine = load_image(scan)
    inp = tmp_path / "in"
    save_nifti(inp / "good.nii.gz", data, affine, dtype=np.float32)
    out = run_cli("predict", "-i", inp, "-o", tmp_path / "out", "--checkpoint", model, "--device", "cpu")
    assert out.returncode == 0 and out.stderr == "", out.stderr  # no progress bar where stderr is no terminal
    assert "wrote 1, skipped 0 existing, failed 0" in out.stdout and out.stdout.rstrip().splitlines()[-1].startswith(
        "time: ")
    assert load_image(tmp_path / "out" / "good.nii.gz")[0].shape == data.shape
    (inp / "bad.nii.gz").write_bytes(b"not a nifti")
    out = run_cli("predict", "-i", inp, "-o", tmp_path / "out", "--checkpoint", model, "--device", "cpu")
    assert out.returncode == 1
    assert "skipped 1 existing (use --overwrite), failed 1" in out.stdout
    failed = out.stderr.splitlines()  # one line for the bad scan, and nothing else (no blank line of a bar)
    assert len(failed) == 1 and failed[0].startswith("failed: ") and "bad.nii.gz" in failed[0], out.stderr
    assert "not a gzip file" in failed[0]


def test_predict_imports_no_k_d_tree():
    """`predict` imports the metrics module (through the lesion report) but needs none of scipy.spatial, which takes
    a tenth of a second warm and about a second from a cold disk: the evaluation code imports it where it is used."""
    code = ("import sys, mslpipe.cli, mslpipe.predict; "
            "print(sorted(m for m in sys.modules if m.startswith('scipy.spatial')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, **TEXT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("args", "message"), [
    (["predict", "-d", "syn", "-i", "in", "-o", "out", "--folds", "0,x"], "--folds takes fold numbers or 'final'"),
    (["evaluate", "--pred", "p"], "--pred and --ref go together"),
    (["evaluate"], "give -d NAME, or --pred DIR --ref DIR"),
    (["compare", "a.nii.gz", "-o", "out"], "give two files, BASELINE FOLLOWUP"),
    (["predict", "--onnx", "m.onnx", "--checkpoint", "c.pt", "-i", "in", "-o", "out"],
     "--onnx runs the exported model alone: leave out --checkpoint and --folds"),
    (["predict", "--onnx", "m.onnx", "--folds", "0", "-i", "in", "-o", "out"], "--onnx runs the exported model alone"),
    (["export", "-o", "m.onnx", "--checkpoint", "c.pt", "--calibration", "scans"],
     "--calibration goes with --precision int8"),
    (["export", "-o", "m.onnx", "-d", "syn", "--fold", "best"], "--fold takes a fold number or 'final'"),
    (["plan", "-d", "syn", "--folds", "1"], "--folds must be at least 2"),
    (["plan", "-d", "syn", "--test-fraction", "-0.3"], "--test-fraction must lie in [0, 1)"),
    (["compare", "a.nii.gz", "b.nii.gz", "-d", "syn", "--subject", "training01", "-o", "out"],
     "--subject goes with -d NAME and no BASELINE FOLLOWUP files"),
])
def test_options_that_do_not_go_together_are_one_line_errors(tmp_path, args, message):
    """Refused before any file is read or written: one line, exit code 1, nothing in the work folder."""
    out = run_cli(*args, cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), out.stderr
    assert list(tmp_path.iterdir()) == []


def test_evaluate_dataset_writes_its_summary_where_o_says_too(trained, tmp_path):
    """`evaluate -d NAME -o FILE`: the summary in the results folder, and the same summary at FILE (-o was ignored)."""
    d, _ = trained
    out = run_cli("--plans", d.plans, "--preprocessed", d.preprocessed, "--results", d.results, "evaluate", "-d",
                  "syn", "--device", "cpu", "-o", tmp_path / "copy.json")
    assert out.returncode == 0, out.stderr
    copy = json.loads((tmp_path / "copy.json").read_text())
    assert copy == json.loads((d.results_dir("syn", "leaky_unet") / "summary.json").read_text()) and copy["per_case"]
