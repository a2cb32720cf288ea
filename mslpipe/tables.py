"""Plain text for the console: an evaluation summary's tables (:func:`mslpipe.evaluate.score_pairs`), the
lines of ``plan``, ``predict``, ``compare``, ``export`` and ``export-nnunet``, and the stages' progress bar.

Presentation only: it reads the summaries' dicts and imports nothing from the project.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from io import StringIO
from typing import Any


@contextlib.contextmanager
def case_progress():
    """A progress bar on standard error for a stage's cases, gone when done (nothing at all where it is no
    terminal): yields ``update(stage, done, total, case)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tasks: dict[str, Any] = {}
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        def update(stage: str, done: int, total: int, case: str) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total, description=f"{stage} {case}")
        yield update


def name_list(items: Sequence[str], limit: int = 10) -> str:
    """Up to ``limit`` names, comma-separated, and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


_COLUMNS = (("Dice", "dice"), ("IoU", "iou"), ("PPV", "precision"), ("TPR", "recall"),
            ("LTPR", "ltpr"), ("LFPR", "lfpr"), ("LF1", "lesion_f1"), ("HD95 mm", "hd95_mm"),
            ("|ΔV| mL", "abs_volume_diff_ml"), ("slice Dice", "slice_dice_study"))


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _size_table(summary: dict):
    """Detection and false positives by lesion volume, pooled over the summary's rows."""
    from rich.table import Table

    table = Table(title=f"Lesions by size (summed over {summary['n_rows']} scan-rater rows)")
    for title in ("volume mm³", "reference lesions", "detected", "LTPR", "predicted lesions", "false positive",
                  "FP share"):
        table.add_column(title, justify="right")
    for b in summary["lesions_by_size"]:
        size = f"≥ {b['from_mm3']:g}" if b["to_mm3"] is None else f"{b['from_mm3']:g}–{b['to_mm3']:g}"
        table.add_row(size, str(b["n_ref_lesions"]), str(b["n_detected_ref_lesions"]), _fmt(b["ltpr"]),
                      str(b["n_pred_lesions"]), str(b["n_fp_pred_lesions"]), _fmt(b["fp_fraction"]))
    return table


def format_table(summary: dict, width: int = 140) -> str:
    """A plain-text table: one line per (case, rater), then the mean, lesions by size and the ISBI score."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Evaluation", show_lines=False)
    table.add_column("case")
    table.add_column("rater", justify="right")
    for title, _ in _COLUMNS:
        table.add_column(title, justify="right")
    for row in summary["per_case"]:
        table.add_row(row["case"], str(row["rater"]), *(_fmt(row[key]) for _, key in _COLUMNS))
    table.add_section()
    table.add_row("mean", "", *(_fmt(summary["mean"][key]) for _, key in _COLUMNS))
    buffer = StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    console.print(table)
    if summary.get("lesions_by_size"):
        console.print(_size_table(summary))
    isbi, part = summary.get("isbi_score"), summary.get("isbi_per_scan_part")
    line = f"ISBI score: {_fmt(isbi)}" if isbi is not None else \
        f"ISBI score: undefined ({summary.get('isbi_score_reason')})"
    if part is not None:  # the correlation term (a quarter of the score) is over few scans here, often noisy
        n_scans = len({row["case"] for row in summary["per_case"]})
        corr = summary.get("volume_correlation")
        line += (f" = per-scan part {_fmt(part)} (at most 0.75) + volume correlation {_fmt(corr)} / 4 over "
                 f"{n_scans} scans" if isbi is not None else f"; per-scan part {_fmt(part)} (at most 0.75)")
    skipped = {k: n for k, n in summary.get("mean_skipped", {}).items() if n}
    if skipped:
        line += "; skipped in means: " + ", ".join(f"{k} {n}" for k, n in skipped.items())
    left = summary.get("unpredicted_references")
    if left:
        line += (f"\nnot scored: {len(left)} labelled case(s) of the reference dataset, not predicted "
                 f"({name_list(left)})")
    return buffer.getvalue() + line + "\n"


def summary_text(summary: dict) -> str:
    """`evaluate -d` and the demo: the cross-validation table, the held-out test table and the chosen lesion size."""
    folds, planned = summary.get("folds", []), summary.get("n_folds_planned")
    head = "Cross-validation (out-of-fold)"
    if planned and len(folds) < planned:  # the untrained folds' validation scans are in no row
        head += (f": {len(folds)} of {planned} folds trained ({', '.join(folds)}); the other folds' validation "
                 "scans are not scored")
    parts = [head, format_table(summary)]
    if "test" in summary:
        parts += ["Held-out test subjects (fold ensemble)", format_table(summary["test"])]
    pp = summary["postprocessing"]
    parts.append(f"minimum lesion size chosen on cross-validation: {pp['min_lesion_mm3']} mm³")
    return "\n".join(parts)


def counts_text(counts: dict) -> str:
    """``compare``'s lesion counts by kind: "2 new, 1 enlarging, ..." ("outside" the follow-up's view only when
    there are such lesions: it takes a registration with a partial field of view)."""
    return ", ".join(f"{n} {name}" for name, n in counts.items() if n or name != "outside")


def new_lesions_text(lesions: list[dict]) -> str | None:
    """``compare``'s line on the new lesions' mean probabilities, lowest (the first to check) first; None when there
    is no new lesion with a known probability."""
    known = sorted((r["mean_probability"], r["volume_followup_mm3"]) for r in lesions
                   if r["status"] == "new" and r.get("mean_probability") is not None)
    if not known:
        return None
    return ("new lesions, by mean probability (the lowest first, the first to check): "
            + ", ".join(f"{p:.2f} ({v:.0f} mm³)" for p, v in known[:10])
            + (f" (+{len(known) - 10} more, in lesions.csv)" if len(known) > 10 else ""))


def registration_text(reg: dict) -> str:
    """``compare --register``'s line on the rigid alignment it found."""
    if reg.get("kept_scanner_alignment"):
        return (f"registration of the follow-up aligned the brains worse than their scanner coordinates: kept those "
                f"(brain correlation {reg['correlation_before']:.2f})")
    return (f"registered the follow-up to the baseline: rotation {reg['rotation_deg']} deg, translation "
            f"{reg['translation_mm']} mm, brain correlation {reg['correlation_before']:.2f} → "
            f"{reg['correlation_after']:.2f}")


SCHEME_NAMES = {"brain_percentile_zscore": "z-score", "brain_percentile_median_iqr": "median/IQR"}


def normalisation_text(norm: dict) -> str:
    """A plan's ``normalization`` in words, e.g. "N4 (3 levels), clip to brain percentiles 0.5/99.5, median/IQR"."""
    steps = []
    if norm.get("n4_levels"):
        steps.append(f"N4 ({norm['n4_levels']} levels)")
    if norm.get("flatfield_mm"):
        steps.append(f"flat field ({norm['flatfield_mm']:g} mm)")
    steps.append(f"clip to brain percentiles {norm['lower_pct']:g}/{norm['upper_pct']:g}")
    steps.append(SCHEME_NAMES.get(norm["scheme"], norm["scheme"]) + " inside the brain")
    return ", ".join(steps)


SLICE_AXES = {0: "sagittal", 1: "coronal", 2: "axial"}  # a plan's slice_axis, in the scan's RAS order


def plan_text(dataset: str, result: dict) -> str:
    """``plan``'s lines: the plan, the splits and the next command (warnings go to the log, on stderr)."""
    p, s, fp = result["plan"], result["splits"], result["fingerprint"]
    lines = [f"plan {p.hash} for {dataset}: {fp['n_cases']} scans, {fp['n_subjects']} subjects; {p.architecture} "
             f"{p.arch_kwargs or '(full width)'} on {p.target_device}, {p.input_channels} "
             f"{SLICE_AXES[p.slice_axis]} input slice(s), patch {p.patch_size[0]}×{p.patch_size[1]}, "
             f"batch {p.batch_size}",
             f"splits: test {s['test']}, {len(s['folds'])} folds"
             + (f" (one group left out in each: {', '.join(f['group'] for f in s['folds'])})"
                if s["folds"] and "group" in s["folds"][0] else "")
             + f"; preprocessed {len(result['preprocessed'])} new scans → {result['plan_dir']}"]
    lines.append(f"preprocessing: {normalisation_text(p.normalization)}")
    # its warnings are logged (stderr) as they arise, not repeated here
    lines.append(f"next: mslpipe train -d {dataset} --fold 0")
    return "\n".join(lines)


def export_text(meta: dict, output) -> str:
    """``export``'s lines: the model written and its check against torch; for int8, its calibration and check."""
    checked = "its fp32 export before quantization" if "quantization" in meta else "ONNX Runtime"
    lines = [f"exported {meta['source_checkpoint']} → {output} ({meta['precision']}, {meta['exporter']} exporter, "
             f"opset {meta['opset']}; {checked} vs torch max logit difference "
             f"{meta['export_check']['max_abs_logit_diff']:.2g})"]
    if "quantization" in meta:
        q = meta["quantization"]
        dice = q["check"]["mask_dice"]
        lines.append(f"int8 calibrated on {q['calibration']['slices']} slices of {q['calibration']['volumes']} "
                     f"scans; masks against fp32 on {q['check']['slices']} other slices: "
                     + (f"Dice {dice:.3f}" if dice is not None else "not measurable (almost no foreground)"))
    return "\n".join(lines)


def predict_text(report, output, total_s: float, imports_s: float) -> str:
    """``predict``'s lines: what was written, skipped and failed; the timing line; scans unlike the training scans.
    ``report`` is a :class:`mslpipe.predict.PredictReport`; ``total_s`` the whole command's seconds."""
    lines = [f"wrote {len(report.written)}, skipped {len(report.skipped)} existing"
             f"{' (use --overwrite)' if report.skipped else ''}, failed {len(report.failed)} → {output}"]
    timing = report.timing_summary(total_s, imports_s=imports_s)
    if timing:
        lines.append(f"time: {timing}")
    if report.warned:
        lines.append(f"{len(report.warned)} scan(s) unlike the training scans, segmented anyway (see the warnings): "
                     f"{', '.join(report.warned)}")
    return "\n".join(lines)


def pair_text(pair: dict, output) -> str:
    """``compare --subject``'s line for one pair of consecutive time points."""
    return (f"{pair['baseline_case']} → {pair['followup_case']}: {counts_text(pair['counts'])}, "
            f"volume {pair['volume_change_ml']:+.3f} mL → {output / pair['folder']}")


def nnunet_export_text(written: dict, output, plans_name: str) -> str:
    """``export-nnunet``'s lines: what was written and the next nnU-Net command."""
    lines = [f"exported {len(written['training'])} training and {len(written['test'])} test scans "
             f"({written['label_policy']} labels), {len(written['folds'])} folds in splits_final.json → {output}"]
    if "plans" in written:
        lines.append(f"wrote {written['plans']}: nnUNetv2_train DATASET 2d FOLD -p {plans_name} "
                     "(with mslpipe importable)")
    else:
        lines.append("next: nnUNetv2_plan_and_preprocess -d NNN (nnunetv2 2.8 copies splits_final.json into "
                     "$nnUNet_preprocessed/DatasetNNN_NAME itself; older versions need it copied)")
    return "\n".join(lines)
