"""`predict --report`: lesion tables, report.csv, the offline report.html (and how a browser shows it)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mslpipe import predict, qc_images, report
from mslpipe.errors import MslpipeError
from mslpipe.io import load_image, save_nifti

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHAPE = (20, 24, 16)
# permuted and flipped axes, anisotropic voxels (1.2 × 1.0 × 0.9 mm), an offset; array axis 1 is world S-I
AFFINE = np.array([[0.0, 0.0, -1.2, 40.0], [-1.0, 0.0, 0.0, 12.0], [0.0, 0.9, 0.0, -7.0], [0, 0, 0, 1]])
VOXEL_MM3 = 1.2 * 1.0 * 0.9


def _world(ijk) -> np.ndarray:
    return AFFINE[:3, :3] @ np.asarray(ijk, dtype=float) + AFFINE[:3, 3]


def _known_mask() -> tuple[np.ndarray, list[np.ndarray]]:
    """Two lesions: a 3×4×2 block plus one voxel touching it only at a corner (26-connected), and one voxel."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[2:5, 3:7, 4:6] = 1
    mask[5, 7, 6] = 1
    first = np.argwhere(mask)  # 25 voxels
    mask[15, 20, 12] = 1
    return mask, [first, np.array([[15, 20, 12]])]


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros(SHAPE, dtype=np.float32)
    img[1:19, 1:23, 1:15] = 100 + 10 * rng.standard_normal((18, 22, 14))
    return img


def _png_ok(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    try:
        from PIL import Image
    except ImportError:
        return (0, 0)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------- numbers
def test_lesion_summary_known_lesions():
    mask, voxels = _known_mask()
    s = report.lesion_summary(mask, AFFINE, "k")
    assert s["case"] == "k" and s["lesion_count"] == 2 and s["axial_axis"] == 1
    assert s["voxel_volume_mm3"] == pytest.approx(VOXEL_MM3)
    a, b = s["lesions"]
    assert (a["id"], a["n_voxels"], b["id"], b["n_voxels"]) == (1, 25, 2, 1)
    assert a["volume_mm3"] == pytest.approx(25 * VOXEL_MM3) and b["volume_mm3"] == pytest.approx(VOXEL_MM3)
    assert a["centroid_mm"] == pytest.approx(_world(voxels[0].mean(axis=0)).tolist())
    assert b["centroid_mm"] == pytest.approx([25.6, -3.0, 11.0])  # x = -1.2·12 + 40, y = -15 + 12, z = 0.9·20 - 7
    assert a["slice_ranges"] == [[2, 5], [3, 7], [4, 6]] and a["axial_slices"] == [3, 7]
    assert b["slice_ranges"] == [[15, 15], [20, 20], [12, 12]] and b["axial_slices"] == [20, 20]
    assert s["total_volume_ml"] == pytest.approx(26 * VOXEL_MM3 / 1000)
    assert s["largest_lesion_mm3"] == pytest.approx(25 * VOXEL_MM3)


def test_case_files_csv_and_json(tmp_path):
    mask, voxels = _known_mask()
    summary = report.write_case_report(tmp_path, "k", _image(), mask, AFFINE)
    rows = _read_csv(tmp_path / "k.lesions.csv")
    assert list(rows[0]) == list(report.LESION_FIELDS) and len(rows) == 2
    assert [int(r["id"]) for r in rows] == [1, 2] and [int(r["n_voxels"]) for r in rows] == [25, 1]
    assert float(rows[0]["volume_mm3"]) == pytest.approx(25 * VOXEL_MM3, abs=1e-3)
    centroid = [float(rows[0][f"centroid_{c}_mm"]) for c in "xyz"]
    assert centroid == pytest.approx(_world(voxels[0].mean(axis=0)).tolist(), abs=1e-3)
    assert (rows[1]["axial_first"], rows[1]["axial_last"]) == ("20", "20")
    data = json.loads((tmp_path / "k.lesions.json").read_text())
    assert data["lesion_count"] == 2 and data["total_volume_ml"] == pytest.approx(26 * VOXEL_MM3 / 1000)
    assert data["lesions"][0]["slice_ranges"] == [[2, 5], [3, 7], [4, 6]]
    assert data == json.loads(json.dumps(summary))
    # the lesions' ids as a label map on the mask's grid: the table's row of the lesion under a viewer's cursor
    import nibabel as nib

    assert data["label_map"] == "lesion_ids/k.nii.gz"
    ids = nib.load(tmp_path / "lesion_ids" / "k.nii.gz")
    assert ids.get_data_dtype() == np.uint16 and np.allclose(ids.affine, AFFINE)
    labels = np.asarray(ids.dataobj)
    assert labels.shape == mask.shape and set(np.unique(labels)) == {0, 1, 2}
    for row, lesion in zip(rows, voxels, strict=True):
        assert (labels == int(row["id"])).sum() == int(row["n_voxels"])
        assert (labels[tuple(lesion.T)] == int(row["id"])).all()
    files = sorted(p.name for p in (tmp_path / "qc").iterdir())
    assert files == ["k_planes.png", "k_slices.png"]
    for name in files:
        w, h = _png_ok((tmp_path / "qc" / name).read_bytes())
        assert h <= 300 and w <= 3 * 300
    assert not list(tmp_path.glob("**/.*tmp*"))  # nothing half-written left behind


def test_lesion_probabilities_in_the_csv_json_and_page(tmp_path):
    mask, voxels = _known_mask()
    prob = np.where(mask > 0, 0.95, 0.1).astype(np.float32)
    prob[tuple(voxels[1][0])] = 0.52  # the one-voxel lesion (id 2), barely above the threshold
    report.write_case_report(tmp_path, "p", _image(), mask, AFFINE, probability=prob)
    rows = _read_csv(tmp_path / "p.lesions.csv")
    assert [float(r["mean_probability"]) for r in rows] == pytest.approx([0.95, 0.52])
    assert [float(r["max_probability"]) for r in rows] == pytest.approx([0.95, 0.52])
    lesions = json.loads((tmp_path / "p.lesions.json").read_text())["lesions"]
    assert [les["mean_probability"] for les in lesions] == pytest.approx([0.95, 0.52])
    page = report.write_report_index(tmp_path).read_text()
    assert "<th>mean p</th>" in page and "<td>0.52</td>" in page and "least sure" in page
    # without the map: empty cells, no column; a map of another shape is refused
    report.write_case_report(tmp_path / "q", "q", _image(), mask, AFFINE)
    assert [r["mean_probability"] for r in _read_csv(tmp_path / "q" / "q.lesions.csv")] == ["", ""]
    assert "mean p" not in report.write_report_index(tmp_path / "q").read_text()
    with pytest.raises(MslpipeError, match="same shape"):
        report.write_case_report(tmp_path / "r", "r", _image(), mask, AFFINE, probability=prob[:-1])


def test_zero_lesion_case(tmp_path):
    out = tmp_path / "out"
    report.write_case_report(out, "k", _image(), _known_mask()[0], AFFINE)  # an earlier run found lesions
    s = report.write_case_report(out, "k", _image(), np.zeros(SHAPE, np.uint8), AFFINE)
    assert s["lesion_count"] == 0 and s["total_volume_ml"] == 0 and s["largest_lesion_mm3"] == 0
    assert (out / "k.lesions.csv").read_text().strip() == ",".join(report.LESION_FIELDS)
    assert [im["file"] for im in s["images"]] == ["qc/k_slices.png"]
    assert not (out / "qc" / "k_planes.png").exists()
    page = report.write_report_index(out).read_text()
    assert "no lesions found" in page and page.count("<img ") == 1


# ---------------------------------------------------------------------------- the folder
def test_report_csv_rebuilt_from_case_files(tmp_path):
    mask, _ = _known_mask()
    report.write_case_report(tmp_path, "b_case", _image(), mask, AFFINE)
    report.write_report_csv(tmp_path)
    assert [r["case"] for r in _read_csv(tmp_path / "report.csv")] == ["b_case"]
    small = np.zeros(SHAPE, np.uint8)
    small[15, 20, 12] = 1
    report.write_case_report(tmp_path, "a_case", _image(1), small, AFFINE)
    report.write_case_report(tmp_path, "c_case", _image(2), np.zeros(SHAPE, np.uint8), AFFINE)
    (tmp_path / "broken.lesions.json").write_text("{ not json")
    report.write_report_index(tmp_path)
    rows = _read_csv(tmp_path / "report.csv")
    assert list(rows[0]) == list(report.REPORT_FIELDS)
    assert [(r["case"], int(r["lesion_count"])) for r in rows] == [("a_case", 1), ("b_case", 2), ("c_case", 0)]
    assert float(rows[1]["total_volume_ml"]) == pytest.approx(26 * VOXEL_MM3 / 1000, abs=1e-6)
    assert float(rows[1]["largest_lesion_mm3"]) == pytest.approx(25 * VOXEL_MM3, abs=1e-3)
    assert float(rows[0]["largest_lesion_mm3"]) == pytest.approx(VOXEL_MM3, abs=1e-3)
    assert float(rows[2]["total_volume_ml"]) == 0


def _report_with_reference(out: Path) -> Path:
    """Three cases: one scored against a reference (lesions of all three kinds on the same axial slices)."""
    mask, _ = _known_mask()
    pred = mask.copy()
    pred[15, 4, 12] = 1  # a false-positive lesion on the slices of the detected one
    ref = mask.copy()
    ref[15, 20, 12] = 0  # another false-positive lesion
    ref[5, 7, 6] = 0  # a false-positive voxel of the detected lesion
    ref[10:13, 3:6, 10:13] = 1  # a missed lesion
    s = report.write_case_report(out, "with_ref", _image(), pred, AFFINE, ref=ref)
    counts = s["reference"]
    assert (counts["n_ref_lesions"], counts["n_detected_ref_lesions"]) == (2, 1)
    assert (counts["n_pred_lesions"], counts["n_fp_pred_lesions"]) == (3, 2)
    assert (counts["tp_voxels"], counts["fp_voxels"], counts["fn_voxels"]) == (24, 3, 27)
    report.write_case_report(out, "no_ref", _image(1), mask, AFFINE)
    report.write_case_report(out, "empty", _image(2), np.zeros(SHAPE, np.uint8), AFFINE)
    return report.write_report_index(out)


def test_html_is_self_contained(tmp_path):
    page = _report_with_reference(tmp_path).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page and "<link" not in page
    srcs = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)
    assert len(srcs) == page.count("<img ") == 5  # 2 + 2 + 1 images
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        w, h = _png_ok(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert h <= 300 and w <= 3 * 300
    assert "neurological convention" in page
    assert len(page) < 400_000  # light: three small cases


def test_reference_colours_true_false_positives_and_negatives(tmp_path):
    page = _report_with_reference(tmp_path).read_text()
    sections = {m.group(1): m.group(0) for m in re.finditer(r'<section class="case" id="case-([^"]+)">.*?</section>',
                                                            page, re.S)}
    assert set(sections) == {"with_ref", "no_ref", "empty"}
    for legend in ("true positive (green)", "false positive (red)", "false negative (blue)"):
        assert legend in sections["with_ref"] and legend not in sections["no_ref"]
    assert "lesion (prediction)" in sections["no_ref"] and "lesion (prediction)" not in sections["with_ref"]
    assert "1 of 2" in sections["with_ref"] and "2 of 3" in sections["with_ref"]  # detected, false-positive lesions
    pil = pytest.importorskip("PIL.Image")
    colours = {}
    for case in ("with_ref", "no_ref"):
        with pil.open(tmp_path / "qc" / f"{case}_slices.png") as im:
            rgb = np.asarray(im.convert("RGB")).astype(int)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        colours[case] = {"green": ((g > r + 60) & (g > b + 60)).sum(), "red": ((r > g + 90) & (r > b + 90)).sum(),
                         "blue": ((b > r + 60) & (b > g + 30)).sum(), "orange": ((r > b + 90) & (g > b + 60)).sum()}
    assert colours["with_ref"]["green"] and colours["with_ref"]["red"] and colours["with_ref"]["blue"], colours
    assert not colours["with_ref"]["orange"]
    assert colours["no_ref"]["orange"] and not (colours["no_ref"]["green"] or colours["no_ref"]["blue"]), colours


# ---------------------------------------------------------------------------- predict --report
@pytest.fixture(scope="module")
def model(trained):
    return trained[1]["fold_dir"] / "checkpoint_final.pt"


def test_predict_report_end_to_end(model, synth_root, tmp_path):
    data, affine = load_image(next((synth_root / "training").glob("training01/preprocessed/*_flair_pp.nii.gz")))
    inp, out = tmp_path / "in", tmp_path / "out"
    save_nifti(inp / "scan_a.nii.gz", data, affine, dtype=np.float32)
    save_nifti(inp / "scan_b.nii.gz", data[::-1], affine, dtype=np.float32)
    result = predict.run(inp, out, dirs=None, checkpoint=[model], device="cpu", report=True)
    assert sorted(result.written) == ["scan_a", "scan_b"] and not result.failed
    for case in ("scan_a", "scan_b"):
        for name in (f"{case}.nii.gz", f"{case}.lesions.csv", f"{case}.lesions.json", f"qc/{case}_slices.png",
                     f"lesion_ids/{case}.nii.gz"):
            assert (out / name).is_file(), name
    assert [r["case"] for r in _read_csv(out / "report.csv")] == ["scan_a", "scan_b"]
    page = (out / "report.html").read_text()
    assert page.count('<section class="case"') == 2
    # each case says what segmented it: mslpipe's version, the model file, the plan
    from mslpipe import __version__

    made = json.loads((out / "scan_a.lesions.json").read_text())["made_by"]
    assert made["mslpipe_version"] == __version__ and made["models"] == [str(model)] and made["tta"] is False
    assert page.count(f"Segmented by mslpipe {__version__}: {model.parent.name}/{model.name} "
                      f"(plan {made['plan_hash'][:12]}).") == 2
    # a rerun skips finished cases and reports those an earlier run left without a report
    for path in [out / "scan_b.lesions.json", out / "scan_b.lesions.csv", out / "report.csv", out / "report.html"]:
        path.unlink()
    again = predict.run(inp, out, dirs=None, checkpoint=[model], device="cpu", report=True)
    assert again.skipped == ["scan_a", "scan_b"] and not again.failed
    assert (out / "scan_b.lesions.json").is_file()
    assert [r["case"] for r in _read_csv(out / "report.csv")] == ["scan_a", "scan_b"]
    rebuilt = json.loads((out / "scan_b.lesions.json").read_text())["lesions"]
    assert all(les["mean_probability"] is None for les in rebuilt)  # that run saved no probabilities


def test_each_lesion_carries_the_probabilities_it_was_found_with(model, synth_root, tmp_path, monkeypatch):
    """A network whose probability is known (a ramp over the slices, above 0.5 on the brightest voxels): each
    lesion's mean and highest probability, through predict's whole path, and again in a report rebuilt later
    from the probabilities that run saved."""
    from mslpipe import datasets, inference

    data, affine = load_image(next((synth_root / "training").glob("training01/preprocessed/*_flair_pp.nii.gz")))
    inp, out = tmp_path / "in", tmp_path / "out"
    save_nifti(inp / "scan.nii.gz", data, affine, dtype=np.float32)
    predictor = inference.load_predictor([model], device="cpu")

    def network(image, tta=False):  # S×C×H×W → S×H×W: bright voxels, weighted by slice from 0.55 to 1
        ramp = np.linspace(0.55, 1.0, image.shape[0], dtype=np.float32)[:, None, None]
        return np.where(image[:, image.shape[1] // 2] > 2.0, ramp, 0.0).astype(np.float32)

    monkeypatch.setattr(predictor, "run_volume", network)
    predict.predict_sources(predictor, datasets.gather_sources(inp), out, report=True, save_probabilities=True,
                            postprocessing={"min_lesion_mm3": 0})
    lesions = json.loads((out / "scan.lesions.json").read_text())["lesions"]
    assert lesions and all(0.55 - 1e-4 <= les["mean_probability"] <= les["max_probability"] <= 1.0 + 1e-6
                           for les in lesions)
    assert len({round(les["mean_probability"], 3) for les in lesions}) > 1  # lesions on other slices differ
    saved = load_image(out / "probabilities" / "scan.nii.gz")[0]
    mask = load_image(out / "scan.nii.gz")[0] > 0
    assert sum(les["mean_probability"] * les["n_voxels"] for les in lesions) == \
        pytest.approx(float(saved[mask].sum()), rel=1e-4)  # the lesions' means weigh up to the saved map
    (out / "scan.lesions.json").unlink()  # rebuilt by the next run, from the saved mask and probabilities
    again = predict.predict_sources(predictor, datasets.gather_sources(inp), out, report=True)
    assert again.skipped == ["scan"]
    rebuilt = json.loads((out / "scan.lesions.json").read_text())["lesions"]
    assert [les["mean_probability"] for les in rebuilt] == pytest.approx([les["mean_probability"] for les in lesions])


def test_the_report_counts_lesions_with_the_models_connectivity(model, synth_root, tmp_path, monkeypatch):
    """A model whose postprocessing joins lesions by faces only (6-connectivity): its report counts and labels
    lesions so too, also when it reports a case an earlier run segmented (they came out 26-connected)."""
    from mslpipe import datasets, inference
    from mslpipe.metrics import label_lesions

    data, affine = load_image(next((synth_root / "training").glob("training01/preprocessed/*_flair_pp.nii.gz")))
    inp = tmp_path / "in"
    save_nifti(inp / "scan.nii.gz", data, affine, dtype=np.float32)
    predictor = inference.load_predictor([model], device="cpu")

    def network(image, tta=False):  # speckle: many voxels that touch only at edges or corners
        bright = image[:, image.shape[1] // 2] > 1.0
        return np.where(bright & (np.indices(bright.shape).sum(axis=0) % 2 == 0), 0.9, 0.0).astype(np.float32)

    monkeypatch.setattr(predictor, "run_volume", network)
    for connectivity in (6, 26):
        out = tmp_path / str(connectivity)
        predict.predict_sources(predictor, datasets.gather_sources(inp), out, report=True,
                                postprocessing={"min_lesion_mm3": 0, "connectivity": connectivity})
        mask = load_image(out / "scan.nii.gz")[0]
        summary = json.loads((out / "scan.lesions.json").read_text())
        assert summary["connectivity"] == connectivity
        assert summary["lesion_count"] == label_lesions(mask, connectivity)[1]
        assert int(load_image(out / "lesion_ids" / "scan.nii.gz")[0].max()) == summary["lesion_count"]
        assert f"A lesion is a {connectivity}-connected component" in (out / "report.html").read_text()
    assert json.loads((tmp_path / "6" / "scan.lesions.json").read_text())["lesion_count"] > \
        json.loads((tmp_path / "26" / "scan.lesions.json").read_text())["lesion_count"]
    (tmp_path / "6" / "scan.lesions.json").unlink()  # rebuilt from the saved mask by the next run
    predict.predict_sources(predictor, datasets.gather_sources(inp), tmp_path / "6", report=True,
                            postprocessing={"connectivity": 6})
    assert json.loads((tmp_path / "6" / "scan.lesions.json").read_text())["connectivity"] == 6


def test_a_failed_case_report_is_a_failed_case(model, synth_root, tmp_path, monkeypatch):
    scan = next((synth_root / "training").glob("training02/preprocessed/*_flair_pp.nii.gz"))
    case = scan.name.removesuffix("_flair_pp.nii.gz")  # an ISBI-named scan is named by its case

    def broken(*args, **kwargs):
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(report, "render_case_images", broken)
    result = predict.run(scan, tmp_path / "o", dirs=None, checkpoint=[model], device="cpu", report=True)
    assert result.written == [] and [c for c, _ in result.failed] == [case]
    assert "cannot write the lesion report (RuntimeError: renderer exploded)" in result.failed[0][1]
    assert (tmp_path / "o" / f"{case}.nii.gz").is_file() and not (tmp_path / "o" / f"{case}.lesions.json").exists()
    assert (tmp_path / "o" / "report.html").is_file()  # the page is still rebuilt, without that case
    with pytest.raises(MslpipeError, match="same shape"):
        report.write_case_report(tmp_path, "x", np.zeros((2, 2, 2)), np.zeros(SHAPE), AFFINE)


def test_cli_predict_report(model, synth_root, tmp_path):
    scan = next((synth_root / "training").glob("training02/preprocessed/*_flair_pp.nii.gz"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "mslpipe", "predict", "-i", str(scan), "-o", str(tmp_path / "o"),
                           "--checkpoint", str(model), "--device", "cpu", "--report"],
                          capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    case = scan.name.removesuffix("_flair_pp.nii.gz")  # an ISBI-named scan is named by its case
    assert (tmp_path / "o" / f"{case}.lesions.json").is_file() and (tmp_path / "o" / "report.html").is_file()


# ---------------------------------------------------------------------------- in a real browser
def _chromium() -> str | None:
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")


CHECK_SCRIPT = ("<script>window.addEventListener('load',function(){var im=Array.from(document.images);"
                "var ok=im.length>0&&im.every(function(i){return i.complete&&i.naturalWidth>0});"
                "document.body.setAttribute('data-loaded',ok?'yes':'no');"
                "document.body.setAttribute('data-images',String(im.length));});</script>")


def _run_chromium(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'chromium-profile'}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=180)


def test_report_renders_in_headless_chromium(tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed (Debian package `chromium`)")
    page = _report_with_reference(tmp_path / "out")
    # images loaded: a copy of the page with a check script (the report itself has no script)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = _run_chromium(exe, tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert 'data-loaded="yes"' in dom.stdout and 'data-images="5"' in dom.stdout, dom.stderr[-2000:]
    # the page as it is, screenshotted: the overlays' colours show up on screen
    shot = tmp_path / "report.png"
    done = _run_chromium(exe, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    pil = pytest.importorskip("PIL.Image")
    with pil.open(shot) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    assert ((r < 30) & (g < 30) & (b < 30)).mean() > 0.05  # the black image panels
    assert ((g > r + 60) & (g > b + 60)).sum() > 0  # true positives
    assert ((r > g + 90) & (r > b + 90)).sum() > 0  # false positives
    assert ((b > r + 60) & (b > g + 30)).sum() > 0  # false negatives


def test_qc_panels_mark_the_patients_sides(tmp_path, monkeypatch):
    """Each panel names the patient's side at its left and right edge (L/R; P/A in sagittal views), so a PNG
    read on its own, outside report.html's orientation note, shows which side is which."""
    pil = pytest.importorskip("PIL.Image")
    dark = {"image": np.zeros((40, 40), np.float32), "pred": np.zeros((40, 40), bool), "ref": None, "aspect": 1.0,
            "title": ""}
    for sides, name in (((), "plain.png"), (("L", "R"), "marked.png")):
        qc_images._render(tmp_path / name, [{**dark, "sides": sides}], (0.0, 1.0))
    bright = {}
    for name in ("plain.png", "marked.png"):
        with pil.open(tmp_path / name) as im:
            rgb = np.asarray(im.convert("RGB")).astype(int)
        edges = (slice(0, rgb.shape[1] // 6), slice(-rgb.shape[1] // 6, None))
        bright[name] = [int((rgb[:, band].sum(axis=2) > 300).sum()) for band in edges]
    assert bright["plain.png"] == [0, 0] and all(bright["marked.png"]), bright
    panels = []
    monkeypatch.setattr(qc_images, "_render",
                        lambda path, ps, window: panels.append((path.name, [p["sides"] for p in ps])))
    mask, _ = _known_mask()
    report.write_case_report(tmp_path, "c", _image(), mask, AFFINE)
    assert panels == [("c_slices.png", [("L", "R")] * len(panels[0][1])),
                      ("c_planes.png", [("L", "R"), ("L", "R"), ("P", "A")])]
