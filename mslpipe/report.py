"""Clinical outputs of ``predict --report``: lesion tables per case, QC overlays, one offline HTML page.

Per case ``OUT/<case>.lesions.csv`` (one row per lesion) and ``OUT/<case>.lesions.json`` (lesion
count, total volume, the lesions, the QC images), PNG overlays in ``OUT/qc/`` and the lesions' ids as a NIfTI label
map, ``OUT/lesion_ids/<case>.nii.gz`` (a viewer then names the table's row of the lesion under the cursor). The
dataset-level ``OUT/report.csv`` and ``OUT/report.html`` are rebuilt from the per-case JSON files present in OUT,
so reruns and skipped cases stay consistent. ``report.html`` is self-contained: images are embedded
as base64 data URIs, the CSS is inline, there is no script and no external URL.

A lesion is a connected component (26-connectivity unless the model's postprocessing says 6 or 18); volumes are
voxel counts × the voxel volume (|det| of the affine's 3×3 part); centroids are in scanner (world) millimetres
through the affine. The axial axis is the array axis closest to world S-I.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
from pathlib import Path

import numpy as np

from mslpipe.errors import MslpipeError
from mslpipe.io import (
    atomic_write_text,
    axial_axis,
    load_mask,
    read_json,
    save_nifti,
    saved_probability,
    write_json,
)
from mslpipe.metrics import dice, lesion_counts
from mslpipe.postprocess import label_lesions, lesion_table
from mslpipe.qc_images import COLOURS, QC_DIR, render_case_images

log = logging.getLogger(__name__)

JSON_SUFFIX = ".lesions.json"
LABEL_DIR = "lesion_ids"  # OUT/lesion_ids/<case>.nii.gz: each lesion's voxels hold its id, as in the tables
LESION_FIELDS = ("id", "volume_mm3", "n_voxels", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
                 "axial_first", "axial_last", "mean_probability", "max_probability")
REPORT_FIELDS = ("case", "lesion_count", "total_volume_ml", "largest_lesion_mm3", "warnings")
MAX_LISTED = 10  # lesions listed on the page (the CSV has all)
PROBABILITY_NOTE = ("mean p: the models' lesion probability averaged over the lesion's voxels (over the folds, and "
                    "the mirrored passes with TTA). It is no calibrated chance of being a lesion, but lesions near the "
                    "0.5 threshold are those the models were least sure of: check them first.")
LEGENDS = {"lesion": "lesion (prediction)", "tp": "true positive (green): predicted and in the reference",
           "fp": "false positive (red): predicted, not in the reference",
           "fn": "false negative (blue): in the reference, not predicted"}
CSS = (
    "body{font-family:sans-serif;margin:1em;color:#222;background:#fff}"
    "table{border-collapse:collapse;margin:.3em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;"
    "text-align:left}section.case{border-top:2px solid #888;margin-top:1em}.row{display:flex;gap:1em;"
    "flex-wrap:wrap;align-items:flex-start}.numbers{min-width:320px}.images{display:flex;flex-direction:column}"
    "figure{margin:0 0 .5em 0}figcaption{font-size:12px;color:#555}img{display:block;max-width:100%}"
    ".legend{list-style:none;padding:0;font-size:13px}.sw{display:inline-block;width:12px;height:12px;"
    "margin-right:6px;vertical-align:middle;border:1px solid #333}.none{font-weight:bold}.note{font-size:12px}"
    ".warn{color:#b00;font-weight:bold}"
)
ORIENTATION_NOTE = (
    "Slices are reoriented to RAS (nibabel's closest canonical orientation) and drawn with the origin "
    "at the lower left, in the neurological convention: the patient's left is on the image's left (marked L, "
    "R, and P, A in sagittal views); "
    "anterior is up in axial views, superior is up in coronal and sagittal views, anterior is on the "
    "right in sagittal views. Slice numbers are voxel indices of the input scan."
)


# ---------------------------------------------------------------------------- numbers
def lesion_summary(mask: np.ndarray, affine: np.ndarray, case: str, connectivity: int = 26,
                   probability: np.ndarray | None = None, labelled: tuple[np.ndarray, int] | None = None) -> dict:
    """Lesion count, total volume (mL), largest lesion (mm³) and one entry per lesion (label order); with the
    probability map the mask came from, each lesion's mean and highest probability (None without it)."""
    affine = np.asarray(affine, dtype=np.float64)
    rows = lesion_table(mask, affine, connectivity, probability, labelled)
    ax = axial_axis(affine)
    lesions = [{
        "id": r["label"],
        "volume_mm3": r["volume_mm3"],
        "n_voxels": r["n_voxels"],
        "centroid_mm": r["centroid_mm"],
        "centroid_voxel": r["centroid_voxel"],
        "axial_slices": r["slice_range"][ax],
        "slice_ranges": r["slice_range"],
        "mean_probability": r.get("mean_probability"),
        "max_probability": r.get("max_probability"),
    } for r in rows]
    volumes = [les["volume_mm3"] for les in lesions]
    return {
        "case": case,
        "lesion_count": len(lesions),
        "total_volume_ml": float(sum(volumes)) / 1000.0,
        "largest_lesion_mm3": float(max(volumes, default=0.0)),
        "voxel_volume_mm3": abs(float(np.linalg.det(affine[:3, :3]))),
        "shape": [int(s) for s in np.shape(mask)],
        "affine": affine.tolist(),
        "axial_axis": ax,
        "connectivity": connectivity,
        "lesions": lesions,
    }


def _reference_summary(mask: np.ndarray, ref: np.ndarray, connectivity: int) -> dict:
    pred, truth = np.asarray(mask) != 0, np.asarray(ref) != 0
    return {"dice": dice(pred, truth), **lesion_counts(pred, truth, connectivity),
            "tp_voxels": int((pred & truth).sum()), "fp_voxels": int((pred & ~truth).sum()),
            "fn_voxels": int((~pred & truth).sum())}


def _write_lesion_csv(path: Path, summary: dict) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LESION_FIELDS)
    for les in summary["lesions"]:
        writer.writerow([les["id"], round(les["volume_mm3"], 4), les["n_voxels"],
                         *(round(v, 3) for v in les["centroid_mm"]), *les["axial_slices"],
                         *("" if les.get(k) is None else round(les[k], 4) for k in ("mean_probability",
                                                                                     "max_probability"))])
    atomic_write_text(path, buf.getvalue())


def _write_label_map(out_dir: Path, case: str, labelled: tuple[np.ndarray, int], affine: np.ndarray) -> str:
    """``OUT/lesion_ids/<case>.nii.gz`` from :func:`label_lesions`' ``labelled``: 0 outside lesions, each lesion's
    id inside (uint16, int32 past 65535 lesions); its path relative to ``out_dir``."""
    labels, n = labelled
    name = f"{LABEL_DIR}/{case}.nii.gz"
    save_nifti(Path(out_dir) / name, labels, affine, dtype=np.uint16 if n <= np.iinfo(np.uint16).max else np.int32)
    return name


# ---------------------------------------------------------------------------- per case
def case_json_path(out_dir: Path, case: str) -> Path:
    return Path(out_dir) / f"{case}{JSON_SUFFIX}"


def write_case_report(out_dir: Path, case: str, image: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                      ref: np.ndarray | None = None, connectivity: int = 26, warnings: list[str] | None = None,
                      made_by: dict | None = None, probability: np.ndarray | None = None) -> dict:
    """Write ``<case>.lesions.csv``, ``lesion_ids/<case>.nii.gz`` (on ``affine``'s grid), ``qc/<case>_*.png`` and,
    last, ``<case>.lesions.json``; return the JSON.
    ``warnings``: sentences about the scan's quality (e.g. from ``preprocess.brain_volume_warning``), shown first.
    ``made_by``: what segmented the scan (``mslpipe_version``, ``models``, ``plan_hash``, ``tta``), shown with it.
    ``probability``: the map the mask was thresholded from, for each lesion's mean and highest probability."""
    out_dir = Path(out_dir)
    try:
        if any(a is not None and np.shape(a) != np.shape(mask) for a in (image, ref, probability)):
            raise MslpipeError("image, mask, reference and probabilities must have the same shape for the report",
                               case_json_path(out_dir, case))
        labelled = label_lesions(mask, connectivity)  # once, for the tables and the label map
        summary = {**lesion_summary(mask, affine, case, connectivity, probability, labelled),
                   "warnings": list(warnings or [])}
        if made_by:
            summary["made_by"] = dict(made_by)
        if ref is not None:
            summary["reference"] = _reference_summary(mask, ref, connectivity)
        _write_lesion_csv(out_dir / f"{case}.lesions.csv", summary)
        summary["label_map"] = _write_label_map(out_dir, case, labelled, affine)
        summary["images"] = render_case_images(out_dir, case, image, mask, affine, summary, ref)
        write_json(case_json_path(out_dir, case), summary)  # last: its presence means the case is complete
    except MslpipeError:
        raise
    except Exception as exc:  # matplotlib, nibabel and numpy raise many types: one line per case
        raise MslpipeError(f"cannot write the lesion report ({type(exc).__name__}: {exc})",
                           case_json_path(out_dir, case)) from exc
    return summary


def write_saved_case_report(out_dir: Path, case: str, image: np.ndarray, affine: np.ndarray,
                            connectivity: int = 26) -> dict:
    """Report a case from the mask ``OUT/<case>.nii.gz`` that an earlier run wrote (e.g. without a report), with
    the lesions' probabilities where that run saved them (``OUT/probabilities/<case>.nii.gz``)."""
    mask = load_mask(Path(out_dir) / f"{case}.nii.gz", np.shape(image), affine)
    probability = saved_probability(Path(out_dir) / f"{case}.nii.gz", mask.shape)
    return write_case_report(out_dir, case, image, mask, affine, probability=probability, connectivity=connectivity)


# ---------------------------------------------------------------------------- the whole folder
def read_case_reports(out_dir: Path) -> list[dict]:
    """Every per-case JSON in ``out_dir``, sorted by case; unreadable ones are skipped with a warning."""
    summaries = []
    for path in sorted(Path(out_dir).glob(f"*{JSON_SUFFIX}")):
        try:
            data = read_json(path)
            if not isinstance(data, dict) or not {"case", "lesion_count", "lesions"} <= data.keys():
                raise MslpipeError("not a lesion report", path)
        except MslpipeError as exc:
            log.warning("left out of the report: %s", exc)
            continue
        summaries.append(data)
    return sorted(summaries, key=lambda s: str(s["case"]))


def write_report_csv(out_dir: Path, summaries: list[dict] | None = None) -> Path:
    """(Re)write ``report.csv``: one row per case with a per-case JSON in ``out_dir``."""
    summaries = read_case_reports(out_dir) if summaries is None else summaries
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(REPORT_FIELDS)
    for s in summaries:
        writer.writerow([s["case"], s["lesion_count"], round(float(s["total_volume_ml"]), 6),
                         round(float(s["largest_lesion_mm3"]), 4), "; ".join(map(str, s.get("warnings", [])))])
    return atomic_write_text(Path(out_dir) / "report.csv", buf.getvalue())


def write_report_index(out_dir: Path) -> Path:
    """Rebuild ``report.csv`` and the self-contained ``report.html`` from the per-case files; return the page."""
    out_dir = Path(out_dir)
    summaries = read_case_reports(out_dir)
    write_report_csv(out_dir, summaries)
    return atomic_write_text(out_dir / "report.html", render_page(out_dir, summaries))


def _data_uri(out_dir: Path, name: str) -> str | None:
    path = out_dir / QC_DIR / Path(str(name)).name  # never outside OUT/qc, whatever the JSON says
    try:
        data = path.read_bytes()
    except OSError as exc:
        log.warning("image left out of the report: %s (%s)", path, exc.strerror or exc)
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _legend(summary: dict) -> str:
    keys = ("tp", "fp", "fn") if "reference" in summary else ("lesion",)
    return "".join(f'<li><span class="sw" style="background:{COLOURS[k]}"></span>{_esc(LEGENDS[k])}</li>'
                   for k in keys)


def _numbers(s: dict) -> str:
    rows = [("lesions", s["lesion_count"]), ("total lesion volume", f"{float(s['total_volume_ml']):.3f} mL"),
            ("largest lesion", f"{float(s['largest_lesion_mm3']):.1f} mm³")]
    ref = s.get("reference")
    if ref:
        rows += [("Dice vs reference", f"{float(ref['dice']):.3f}"),
                 ("reference lesions detected", f"{ref['n_detected_ref_lesions']} of {ref['n_ref_lesions']}"),
                 ("false-positive lesions", f"{ref['n_fp_pred_lesions']} of {ref['n_pred_lesions']}")]
    out = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    if not s["lesions"]:
        return f'<table class="num">{out}</table><p class="none">no lesions found</p>'
    biggest = sorted(s["lesions"], key=lambda les: -float(les["volume_mm3"]))[:MAX_LISTED]
    with_p = any(les.get("mean_probability") is not None for les in biggest)
    lines = "".join(
        f"<tr><td>{_esc(les['id'])}</td><td>{float(les['volume_mm3']):.1f}</td><td>{_esc(les['n_voxels'])}</td>"
        f"<td>{', '.join(f'{float(v):.1f}' for v in les['centroid_mm'])}</td>"
        f"<td>{_esc(les['axial_slices'][0])}–{_esc(les['axial_slices'][1])}</td>"
        + (f"<td>{_probability(les.get('mean_probability'))}</td>" if with_p else "") + "</tr>" for les in biggest)
    more = (f'<p class="note">{len(s["lesions"]) - MAX_LISTED} smaller lesions in {_esc(s["case"])}.lesions.csv</p>'
            if len(s["lesions"]) > MAX_LISTED else "")
    if s.get("label_map"):
        more += f'<p class="note">lesion ids as a NIfTI label map: {_esc(s["label_map"])}</p>'

    p_note = (f'<p class="note">{_esc(PROBABILITY_NOTE)}</p>' if with_p else "")
    return (f'<table class="num">{out}</table><table class="les"><tr><th>id</th><th>mm³</th><th>voxels</th>'
            f"<th>centroid x, y, z (mm)</th><th>axial slices</th>{'<th>mean p</th>' if with_p else ''}</tr>"
            f"{lines}</table>{more}{p_note}")


def _probability(value) -> str:
    return "—" if value is None else f"{float(value):.2f}"


def _case_section(out_dir: Path, s: dict) -> str:
    figures = []
    for item in s.get("images", []):
        uri = _data_uri(out_dir, item.get("file", ""))
        if uri is None:
            figures.append(f'<p class="note">image missing: {_esc(item.get("file", ""))}</p>')
            continue
        figures.append(f'<figure><img src="{uri}" alt="{_esc(s["case"])}: {_esc(item.get("caption", ""))}">'
                       f'<figcaption>{_esc(item.get("caption", ""))}</figcaption></figure>')
    warns = "".join(f'<p class="warn">Check this scan: {_esc(w)}</p>' for w in s.get("warnings", []))
    return (f'<section class="case" id="case-{_esc(s["case"])}"><h2>{_esc(s["case"])}</h2>{warns}<div class="row">'
            f'<div class="numbers">{_numbers(s)}<ul class="legend">{_legend(s)}</ul>{_made_by(s)}</div>'
            f'<div class="images">{"".join(figures)}</div></div></section>')


def _made_by(s: dict) -> str:
    made = s.get("made_by")
    if not isinstance(made, dict):
        return ""
    models = ", ".join("/".join(Path(str(m)).parts[-2:]) for m in made.get("models", []))
    tta = " with mirroring" if made.get("tta") else ""
    return (f'<p class="note">Segmented by mslpipe {_esc(made.get("mslpipe_version", "?"))}{tta}: '
            f'{_esc(models or "?")} (plan {_esc(str(made.get("plan_hash", "?"))[:12])}).</p>')


def render_page(out_dir: Path, summaries: list[dict]) -> str:
    """The HTML text of ``report.html`` (no script, no external resource)."""
    rows = "".join(
        f'<tr><td><a href="#case-{_esc(s["case"])}">{_esc(s["case"])}</a>{" ⚠" if s.get("warnings") else ""}</td>'
        f'<td>{_esc(s["lesion_count"])}</td>'
        f'<td>{float(s["total_volume_ml"]):.3f}</td><td>{float(s["largest_lesion_mm3"]):.1f}</td></tr>'
        for s in summaries)
    sections = "".join(_case_section(Path(out_dir), s) for s in summaries)
    kinds = "- or ".join(str(c) for c in sorted({int(s.get("connectivity", 26)) for s in summaries})) or "26"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>mslpipe lesion report</title>'
            f"<style>{CSS}</style></head><body><h1>MS lesion report</h1>"
            f"<p>{len(summaries)} scans. A lesion is a {kinds}-connected component of the predicted mask; volumes are "
            f"voxel counts × voxel volume; centroids are scanner (world) coordinates in mm. "
            f"{_esc(ORIENTATION_NOTE)} Intensities are windowed to the 0.5–99.5th percentiles of the brain.</p>"
            f'<table class="sum"><tr><th>case</th><th>lesions</th><th>total volume (mL)</th>'
            f"<th>largest lesion (mm³)</th></tr>{rows}</table>{sections}</body></html>\n")

