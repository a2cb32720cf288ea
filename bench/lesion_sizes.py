"""Where the CPU plan's misses and false positives are: lesion detection by size, and lesion probability.

Trains each fold of ../shared/data/real-ms-isbi (leave-one-subject-out, CPU plan; the same runs as
`bench/onnx_int8.py` and `bench/tta.py`, whose work folder can be reused) and predicts each fold's validation scans
with its final model (one pass, threshold 0.5, no postprocessing), on the preprocessed grid. Pooled over all folds:

* reference lesions found and predicted lesions that are false, by lesion volume (the classes `evaluate` reports,
  ``metrics.SIZE_EDGES_MM3``; detection as ISBI counts it: any overlap);
* predicted lesions by their mean probability (the number `predict --report` lists beside each lesion), and how
  many of each band are false positives: whether a low probability marks the lesions to check first.

Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe import data_loading, inference, metrics  # noqa: E402
from mslpipe.io import read_json  # noqa: E402
from mslpipe.plans import load_plan  # noqa: E402
from mslpipe.postprocess import lesion_table  # noqa: E402
from results import (  # noqa: E402
    check_arm,
    fold_arguments,
    planned,
    real_data_work,
    seed_dirs,
    table,
    trained_folds,
    write_section,
)

PROBABILITY_BANDS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def lesions_of(prob: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> tuple[list[dict], list[dict]]:
    """(counts by size class, one {mean_probability, volume_mm3, false_positive} per predicted lesion)."""
    pred = prob >= 0.5
    by_size = metrics.lesion_counts_by_size(pred, ref, spacing)
    labels, _ = metrics.label_lesions(pred)
    hit = set(np.unique(labels[pred & ref]).tolist())
    rows = lesion_table(pred, np.diag([*spacing, 1.0]), probability=prob)
    return by_size, [{"mean_probability": r["mean_probability"], "volume_mm3": r["volume_mm3"],
                      "false_positive": r["label"] not in hit} for r in rows]


def band_rows(lesions: list[dict]) -> list[list]:
    rows = []
    for lo, hi in zip(PROBABILITY_BANDS[:-1], PROBABILITY_BANDS[1:], strict=True):
        top = hi == PROBABILITY_BANDS[-1]  # the last band holds its upper end (a probability of 1) too
        band = [les for les in lesions if lo <= les["mean_probability"] < hi or (top and les["mean_probability"] == hi)]
        fp = [les for les in band if les["false_positive"]]
        volumes = sorted(les["volume_mm3"] for les in band)
        rows.append([f"{lo:.1f}–{hi:.1f}", len(band), len(fp), f"{len(fp) / len(band):.2f}" if band else "—",
                     f"{np.median(volumes):.0f}" if volumes else "—"])
    return rows


def score_folds(args, work: Path, overrides: dict | None = None) -> dict:
    """Train (or reuse) every fold and seed of ``args`` in ``work`` and predict each fold's validation scans: the
    scans' lesion counts by size, every predicted lesion, the scans' names and their (volume Dice, lesion F1)."""
    per_scan_sizes, lesions, scans, overlap = [], [], [], []
    for seed, fold, dirs, fold_dir in trained_folds(args, work, overrides):
        predictor = inference.load_predictor([fold_dir / "checkpoint_final.pt"], device="cpu")
        p = predictor.plan
        for case in read_json(fold_dir / "run.json")["val"]:
            image, seg, props = data_loading.load_case_arrays(dirs.preprocessed_dir("real"), case)
            prob = inference.predict_volume(predictor.models, image, divisor=predictor.divisor, device="cpu",
                                            batch_size=p.inference_batch_size, context=p.context_slices)
            spacing = tuple(p.target_spacing if props.get("resampled_shape") else props["spacing_canonical"])
            by_size, found = lesions_of(prob, seg >= 0.5, spacing)
            per_scan_sizes.append(by_size)
            lesions += found
            scans.append(f"{case} (seed {seed}, fold {fold})")
            overlap.append((metrics.dice(prob >= 0.5, seg >= 0.5), metrics.lesion_f1(prob >= 0.5, seg >= 0.5)))
    return {"sizes": metrics.pool_counts_by_size(per_scan_sizes), "lesions": lesions, "scans": scans,
            "overlap": overlap, "net": load_plan(fold_dir / "plan.json").arch_kwargs}


def score_arms(args, work: Path, arms: dict[str, dict | None], folder: str) -> dict[str, dict]:
    """:func:`score_folds` per arm: the arm without plan overrides (``None``) from ``work`` itself (the default
    runs, `bench/lesion_sizes.py`'s), the others from ``work / folder``; before any training, every arm's plan
    is checked to differ from the default runs' in its own overrides only (:func:`results.check_arm`)."""
    for seed in (int(s) for s in args.seeds.split(",")):
        first = planned(seed_dirs(work, seed), seed)
        for arm, overrides in arms.items():
            if overrides is not None:
                check_arm(first, seed_dirs(work / folder, seed), seed, overrides, overrides, arm)
    return {arm: score_folds(args, work if overrides is None else work / folder, overrides)
            for arm, overrides in arms.items()}


def found_and_false_rows(runs: dict[str, dict]) -> list[list]:
    """One row per lesion-volume class: the class, its reference lesions, then per arm the lesions found (share),
    then per arm the predicted lesions that are false (of all predicted)."""
    first = next(iter(runs.values()))
    return [[size_class(b), b["n_ref_lesions"],
             *(f"{r['sizes'][k]['n_detected_ref_lesions']} ({share(r['sizes'][k]['ltpr'])})" for r in runs.values()),
             *(f"{r['sizes'][k]['n_fp_pred_lesions']} of {r['sizes'][k]['n_pred_lesions']}" for r in runs.values())]
            for k, b in enumerate(first["sizes"])]


def size_class(b: dict) -> str:
    return f"≥ {b['from_mm3']:g}" if b["to_mm3"] is None else f"{b['from_mm3']:g}–{b['to_mm3']:g}"


def share(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-sizes-")
    r = score_folds(args, work)
    scans, lesions, net = r["scans"], r["lesions"], r["net"]
    size_rows = [[size_class(b), b["n_ref_lesions"], b["n_detected_ref_lesions"], share(b["ltpr"]),
                  b["n_pred_lesions"], b["n_fp_pred_lesions"], share(b["fp_fraction"])] for b in r["sizes"]]
    dice, f1 = np.mean(r["overlap"], axis=0)
    body = (f"CPU plan (leaky_unet {net}), {args.epochs} epochs × {args.iterations} iterations per fold, folds by "
            f"subject (leave one subject out), plan seed(s) {args.seeds}. Each fold's final model on its validation "
            "scans: one pass, threshold 0.5, no postprocessing, on the preprocessed grid, against the expert mask "
            f"(see `bench/lesion_sizes.py`). {len(scans)} scans: {', '.join(scans)}; mean volume Dice {dice:.3f}, "
            f"lesion F1 {f1:.3f}. Lesions are 26-connected components; a reference lesion is found when any voxel "
            "of it is predicted, a predicted lesion is false when no voxel of it is in the reference.\n\n"
            "By lesion volume (each reference lesion in the class of its own volume, each predicted lesion in "
            "that of its own), summed over the scans:\n\n"
            + table(["volume mm³", "reference lesions", "found", "share found", "predicted lesions",
                     "false", "share false"], size_rows)
            + "\n\nPredicted lesions by their mean probability (what `predict --report` lists beside each lesion):"
            "\n\n" + table(["mean probability", "predicted lesions", "false", "share false",
                            "median volume mm³"], band_rows(lesions)))
    print(body)
    write_section("lesion_sizes", "Lesion detection by size, and lesion probability (CPU plan, real data)", body)


if __name__ == "__main__":
    main()
