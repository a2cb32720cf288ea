"""Robustness to intensity non-uniformity: the CPU plan with and without a bias-field augmentation or a flat field.

Scans from other scanners often come without bias-field correction: a smooth shading across the brain that the
real data here (corrected by its curators) does not have. This trains every fold of ../shared/data/real-ms-isbi
(leave one subject out, plan seeds as given) once with no correction at all (``p_bias_field`` 0, N4 off; the
default plan but for N4, which it has used since 2026-11-28; folds trained before then are `bench/lesion_sizes.py`'s
when the same ``--work`` folder is given) and once per arm of ``--arms``, each with its
``augmentation.p_bias_field`` and ``bias_field_coeff`` (:class:`mslpipe.augmentation.RandBrainBiasFieldd`), and
once per ``--flatfield`` value, ``normalization.flatfield_mm`` (:func:`mslpipe.intensity.flatten_field`, which
divides each scan's slow shading out before normalising, in training and in prediction alike), and once per
``--n4`` value, ``normalization.n4_levels`` (:func:`mslpipe.intensity.correct_bias_n4`, SimpleITK's N4 in the same
place; ``LEVELS@MM`` also sets ``n4_grid_mm``, its fitting grid), everything else equal. Each fold's scores are kept
beside its model (``robustness_bias_v2.json``), so a rerun scores only new folds. Each fold's final model then
segments its validation scans as acquired and shaded by fixed smooth fields applied to the **raw** scan before
mslpipe's own preprocessing (so the normalisation sees the shading, as it would on a new scanner's scan):

* ``ramp ±20%``: a left-to-right ramp from 0.8 to 1.2 across the brain's bounding box;
* ``ramp ±40%``: the same from 0.6 to 1.4;
* ``centre +20%``: brighter in the centre (1.2) than at the box's corners (0.8), a quadratic fall-off, as 3 T
  scanners' dielectric effect shades FLAIR.

A field multiplies the signal inside the brain above the scan's darkest brain intensity (its 0.5th brain
percentile), which stands for no signal: the real scans do not all have a zero background; outside the brain the
scan is unchanged. Volume Dice and lesion F1 of the final checkpoint, one pass, threshold 0.5, no
postprocessing, against the expert mask on the preprocessed grid. Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe import brainmask, datasets, inference, metrics, preprocess  # noqa: E402
from mslpipe.io import read_json, write_json  # noqa: E402
from mslpipe.plans import load_plan  # noqa: E402
from results import (  # noqa: E402
    check_arm,
    fold_arguments,
    planned,
    real_data_path,
    real_data_work,
    seed_dirs,
    table,
    trained_folds,
    write_section,
)


def _box_coordinates(image: np.ndarray, brain: np.ndarray) -> list[np.ndarray]:
    """Per axis, the voxel coordinate scaled to [-1, 1] over the brain's bounding box (beyond it outside)."""
    box = brainmask.bounding_box(brain, 0)
    return [np.linspace(-1 - 2 * a / max(b - a - 1, 1), 1 + 2 * (n - b) / max(b - a - 1, 1), n)
            for (a, b), n in zip(box, image.shape, strict=True)]


def ramp(strength: float):
    def field(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
        x = _box_coordinates(image, brain)[0]
        return np.broadcast_to((1 + strength * x)[:, None, None], image.shape)
    return field


def centre(strength: float):
    def field(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
        u = np.meshgrid(*_box_coordinates(image, brain), indexing="ij", sparse=True)
        return 1 + strength - 2 * strength * (u[0] ** 2 + u[1] ** 2 + u[2] ** 2) / 3
    return field


FIELDS = {"as acquired": None, "ramp ±20%": ramp(0.2), "ramp ±40%": ramp(0.4), "centre +20%": centre(0.2)}


def shade(image: np.ndarray, field) -> np.ndarray:
    """The raw scan times a smooth field inside its brain, above its darkest brain intensity (never below 0.05 of
    the field). Outside the brain the scan is left as it is: a scanner's field shades tissue, and a skull-stripped
    scan's background is what the stripping left. (Shading the background too, as this did before 2026-11-28 17:00
    UTC, lifted a zero background by up to the darkest brain intensity where the field fell below 1, and the brain
    mask then took in the whole volume: the ±40% ramp's scores on the MSLesSeg scans measured that, not N4.)"""
    if field is None:
        return image
    brain = brainmask.brain_mask(image)
    lo = float(np.percentile(image[brain], 0.5))
    shaded = (image - lo) * np.clip(field(image, brain), 0.05, None) + lo
    return np.where(brain, shaded, image).astype(np.float32)


def shaded_scores(predictor, plan, case: datasets.Case, fields: dict) -> dict[str, list[float]]:
    """{field name: [volume Dice, lesion F1]} of ``predictor``'s models on one case shaded by each field (None: as
    acquired) and preprocessed by ``plan``; one pass on the CPU, threshold 0.5, no postprocessing."""
    channels, affine, masks = preprocess.load_case(case)
    out = {}
    for name, field in fields.items():
        image, label, _ = preprocess.preprocess_volume([shade(c, field) for c in channels], affine, plan, masks)
        prob = inference.predict_volume(predictor.models, image, divisor=predictor.divisor, device="cpu",
                                        batch_size=plan.inference_batch_size, context=plan.context_slices)
        pred, ref = prob >= 0.5, label >= 0.5
        out[name] = [float(metrics.dice(pred, ref)), float(metrics.lesion_f1(pred, ref))]
    return out


def score_fold(fold_dir: Path, raw: dict[str, datasets.Case]) -> dict[str, dict[str, list[float]]]:
    """{case: {field: [volume Dice, lesion F1]}} of one fold's final model on its validation scans, kept in
    ``fold_dir/robustness_bias_v2.json`` so that a rerun with other arms does not score it again."""
    cache = fold_dir / "robustness_bias_v2.json"  # v2: shading inside the brain only (see shade)
    cached = read_json(cache) if cache.exists() else {}
    if cached and set(next(iter(cached.values()))) == set(FIELDS):
        return cached
    predictor = inference.load_predictor([fold_dir / "checkpoint_final.pt"], device="cpu")
    out = {}
    for case in read_json(fold_dir / "run.json")["val"]:
        out[case] = shaded_scores(predictor, predictor.plan, raw[case], FIELDS)
        print(f"{fold_dir}: {case} " + ", ".join(f"{k} {v[0]:.3f}" for k, v in out[case].items()), flush=True)
    write_json(cache, out)
    return out


def score_folds(args, work: Path, overrides: dict | None, raw: dict[str, datasets.Case]) -> dict:
    """{field: [(volume Dice, lesion F1) per validation scan]} over every seed and fold, and the scans' names."""
    scores, scans = {name: [] for name in FIELDS}, []
    for seed, fold, _, fold_dir in trained_folds(args, work, overrides):
        for case, by_field in score_fold(fold_dir, raw).items():
            for name in FIELDS:
                scores[name].append(tuple(by_field[name]))
            scans.append(f"{case} (seed {seed}, fold {fold})")
    plan = load_plan(fold_dir / "plan.json")
    return {"scores": scores, "scans": scans, "net": plan.arch_kwargs, "scheme": plan.normalization["scheme"]}


def parse_arms(text: str) -> list[tuple[float, float]]:
    """``P:C,...``: each augmented arm's ``p_bias_field`` and largest ``bias_field_coeff``."""
    return [(float(p), float(c)) for p, c in (item.split(":") for item in text.split(",") if item)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    ap.add_argument("--arms", default="0.3:0.1",
                    help="augmented arms, comma-separated P:C (p_bias_field, bias_field_coeff (0, C)); '' for none "
                         "[0.3:0.1]")
    ap.add_argument("--flatfield", default="",
                    help="flat-field arms: comma-separated normalization.flatfield_mm values (mm), none by default")
    ap.add_argument("--n4", default="",
                    help="N4 arms: comma-separated normalization.n4_levels values (fitting levels), each optionally "
                         "@ normalization.n4_grid_mm (its fitting grid, mm; 4 if not given), none by default")
    ap.add_argument("--per-scan", action="store_true",
                    help="add a table of each scan's Dice, as acquired and with the ±40%% ramp, per arm")
    ap.add_argument("--section", default="robustness_bias",
                    help="the RESULTS.md section to write (a new name adds one) [robustness_bias]")
    ap.add_argument("--title", default="Robustness to intensity non-uniformity (CPU plan, real data)",
                    help="its heading")
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-bias-")
    raw = {c.id: c for c in datasets.discover(real_data_path())}
    off = {"normalization.n4_levels": 0}  # the plan's default corrects with N4 since 2026-11-28
    base = score_folds(args, work, off, raw)
    # every arm normalises as the first arm's folds do (they may predate a change of the planner's default)
    pin = {"normalization.scheme": base["scheme"]}
    arms: dict[str, tuple[str, dict]] = {}
    for p, c in parse_arms(args.arms):
        on = {**off, "augmentation.p_bias_field": p, "augmentation.bias_field_coeff": (0.0, c)}
        arms[f"p_bias_field {p:g}, coefficients up to {c:g}"] = (f"bias_field_p{p:g}_c{c:g}", on)
    for mm in (float(v) for v in args.flatfield.split(",") if v):
        arms[f"flat field {mm:g} mm"] = (f"flatfield_{mm:g}", {"normalization.flatfield_mm": mm})
    for item in (v for v in args.n4.split(",") if v):
        levels, _, grid = item.partition("@")
        n4, label, folder = {"normalization.n4_levels": int(levels)}, f"N4, {int(levels)} levels", f"n4_{int(levels)}"
        if grid:
            n4["normalization.n4_grid_mm"] = float(grid)
            label, folder = f"{label}, {float(grid):g} mm grid", f"{folder}_grid{float(grid):g}"
        arms[label] = (folder, n4)
    for seed in (int(s) for s in args.seeds.split(",")):  # before any training: arms differ only as named
        first = planned(seed_dirs(work, seed), seed, off)
        for label, (folder, overrides) in arms.items():
            check_arm(first, seed_dirs(work / folder, seed), seed, {**overrides, **pin}, overrides, label)
    runs = {"without": base}
    for label, (folder, overrides) in arms.items():
        runs[label] = score_folds(args, work / folder, {**overrides, **pin}, raw)
    n = len(base["scans"])
    rows, win_rows = [], []
    for arm, r in runs.items():
        clean = np.mean(r["scores"]["as acquired"], axis=0)
        cells = []
        for name, per_scan in r["scores"].items():
            d, f = np.mean(per_scan, axis=0)
            cells.append(f"{d:.3f} / {f:.3f}" + ("" if name == "as acquired" else f" ({d - clean[0]:+.3f})"))
        rows.append([arm, *cells])
        if r is not base:
            higher = [sum(b[0] < o[0] for b, o in zip(base["scores"][k], r["scores"][k], strict=True)) for k in FIELDS]
            win_rows.append([arm, *(f"{h} of {n}" for h in higher)])
    body = (f"CPU plan (leaky_unet {base['net']}, normalisation {base['scheme']}), {args.epochs} epochs × "
            f"{args.iterations} iterations per fold, folds "
            f"by subject (leave one subject out), plan seed(s) {args.seeds}; the arms differ only in "
            "`augmentation.p_bias_field` and `bias_field_coeff`, or in `normalization.flatfield_mm` or `n4_levels` "
            "(the first arm has none of them). Each fold's final model on its validation scans, as "
            "acquired and shaded by a fixed smooth field on the raw scan before preprocessing (see "
            "`bench/robustness_bias.py`; inside the brain only since 2026-11-28 17:00 UTC); one pass, "
            f"threshold 0.5, no postprocessing, against the expert mask. {n} scans: {', '.join(base['scans'])}.\n\n"
            "Cells: volume Dice / lesion F1, mean over the scans (in brackets the Dice change from the same models "
            "on the scans as acquired).\n\n"
            + table(["arm", *FIELDS], rows)
            + "\n\nScans on which an arm's Dice is higher than the first arm's:\n\n"
            + table(["arm", *FIELDS], win_rows))
    if args.per_scan:
        cols = ["as acquired", "ramp ±40%"]
        scan_rows = [[scan, *(" / ".join(f"{r['scores'][c][i][0]:.3f}" for c in cols) for r in runs.values())]
                     for i, scan in enumerate(base["scans"])]
        body += (f"\n\nEach scan's volume Dice ({' / '.join(cols)}):\n\n"
                 + table(["scan", *runs], scan_rows))
    print(body)
    write_section(args.section, args.title, body)


if __name__ == "__main__":
    main()
