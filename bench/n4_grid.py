"""N4's fitting grid: seconds, field and scores at two grids (``normalization.n4_grid_mm``), CPU plan, real data.

N4 fits its bias field on a shrunk copy of the scan (``n4_grid_mm``, 4 mm where a plan names none). SimpleITK's N4
runs on one thread, so its seconds per scan do not fall with more cores. This measures what a coarser grid changes:

* per real scan, as acquired and with a ±40% left-to-right ramp (``bench/robustness_bias.py``'s), N4's seconds at
  each grid (median of ``--repeats`` after a warm-up) and how far the fields differ: ``|field_b / field_a - 1|``
  over the brain, 99th percentile and largest (the field as :func:`mslpipe.intensity.correct_bias_n4` divides it
  out of the cropped brain, as ``preprocess_volume`` runs it);
* the same models on both: each fold's final model, trained on the first grid's preprocessing, segments its
  validation scans preprocessed with each grid (no retraining, so only the field differs);
* retrained: the same folds trained with the second grid, scored on their own preprocessing (descriptive: across
  retrained arms, training noise alone moves the mean Dice by several hundredths, see "N4 bias-field correction").

One pass, threshold 0.5, no postprocessing, volume Dice and lesion F1 against the expert mask on the preprocessed
grid. Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from n4_cost import cropped_brain  # noqa: E402
from robustness_bias import ramp, shade, shaded_scores  # noqa: E402

from mslpipe import datasets, inference, preprocess  # noqa: E402
from mslpipe.intensity import correct_bias_n4  # noqa: E402
from mslpipe.io import read_json  # noqa: E402
from mslpipe.plans import Plan, load_plan  # noqa: E402
from results import fold_arguments, real_data_path, real_data_work, table, trained_folds, write_section  # noqa: E402

FIELDS = {"as acquired": None, "ramp ±40%": ramp(0.4)}


def with_grid(plan: Plan, grid: float) -> Plan:
    return dataclasses.replace(plan, normalization={**plan.normalization, "n4_grid_mm": grid})


def n4_field(channel: np.ndarray, affine: np.ndarray, plan: Plan, grid: float) -> tuple[float, np.ndarray]:
    """N4's seconds on the cropped brain (as ``preprocess_volume`` runs it; the scans are at the plan's voxel size)
    and the field it divides out, at the brain's voxels with signal."""
    image, mask, spacing = cropped_brain(channel, affine, plan)
    t0 = time.perf_counter()
    corrected = correct_bias_n4(image, mask, spacing, levels=int(plan.normalization["n4_levels"]), shrink_mm=grid)
    seconds = time.perf_counter() - t0
    lo = float(np.percentile(image[mask], 0.5))
    signal = image[mask] - lo
    return seconds, signal[signal > 0] / np.maximum(corrected[mask] - lo, 1e-6)[signal > 0]


def field_rows(plan: Plan, grids: tuple[float, float], repeats: int) -> tuple[list[list], dict[str, list[float]]]:
    """Per scan and shading: N4's seconds at each grid and the fields' difference."""
    rows, secs = [], {"a": [], "b": []}
    for case in datasets.discover(real_data_path()):
        channels, affine, _ = preprocess.load_case(case)
        for name, field in FIELDS.items():
            raw = shade(channels[0], field)
            runs = []
            for grid in grids:
                n4_field(raw, affine, plan, grid)  # warm-up
                timed = [n4_field(raw, affine, plan, grid) for _ in range(repeats)]
                runs.append((statistics.median(t for t, _ in timed), timed[0][1]))
            diff = np.abs(runs[1][1] / runs[0][1] - 1)
            if field is None:
                secs["a"].append(runs[0][0])
                secs["b"].append(runs[1][0])
            rows.append([case.id, name, f"{runs[0][0]:.2f}", f"{runs[1][0]:.2f}",
                         f"{np.percentile(diff, 99):.3f}", f"{diff.max():.3f}"])
            print(rows[-1], flush=True)
    return rows, secs


def score(fold_dir: Path, raw: dict[str, datasets.Case], grid: float) -> dict[str, dict[str, list[float]]]:
    """{case: {shading: (Dice, lesion F1)}} of a fold's final model on its validation scans preprocessed with N4 on
    ``grid``."""
    predictor = inference.load_predictor([fold_dir / "checkpoint_final.pt"], device="cpu")
    plan, out = with_grid(predictor.plan, grid), {}
    for case in read_json(fold_dir / "run.json")["val"]:
        out[case] = shaded_scores(predictor, plan, raw[case], FIELDS)
        print(f"{fold_dir} grid {grid:g}: {case} {out[case]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    ap.add_argument("--grids", default="4,8", help="the trained grid and the other, mm [4,8]")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-n4grid-")
    a, b = (float(v) for v in args.grids.split(","))
    raw = {c.id: c for c in datasets.discover(real_data_path())}
    base_folds = list(trained_folds(args, work, None))
    plan = load_plan(base_folds[0][3] / "plan.json")
    if not plan.normalization.get("n4_levels") or float(plan.normalization.get("n4_grid_mm", 4.0)) != a:
        sys.exit(f"the models in {work} were not trained with N4 on a {a:g} mm grid")
    rows, secs = field_rows(plan, (a, b), args.repeats)
    other = list(trained_folds(args, work / f"n4_grid{b:g}", {"normalization.n4_grid_mm": b}))
    arms = {f"{a:g} mm models, {a:g} mm input": [], f"{a:g} mm models, {b:g} mm input": [],
            f"{b:g} mm models (retrained), {b:g} mm input": []}
    scans = []
    for (seed, fold, _, base_dir), (_, _, _, other_dir) in zip(base_folds, other, strict=True):
        runs = [score(base_dir, raw, a), score(base_dir, raw, b), score(other_dir, raw, b)]
        for case in runs[0]:
            scans.append(f"{case} (seed {seed}, fold {fold})")
            for arm, run in zip(arms, runs, strict=True):
                arms[arm].append(run[case])
    mean_rows = [[arm, *(" / ".join(f"{v:.3f}" for v in np.mean([s[name] for s in per], axis=0)) for name in FIELDS)]
                 for arm, per in arms.items()]
    keys = list(arms)
    scan_rows = [[scan, *(" / ".join(f"{arms[k][i][name][0]:.3f}" for name in FIELDS) for k in keys),
                  f"{arms[keys[1]][i]['as acquired'][0] - arms[keys[0]][i]['as acquired'][0]:+.3f}"]
                 for i, scan in enumerate(scans)]
    body = (f"N4 ({plan.normalization['n4_levels']} fitting levels) on a {a:g} mm grid (`n4_grid_mm`) against "
            f"{b:g} mm, on this machine's CPU; N4's seconds per scan: median {statistics.median(secs['a']):.2f} "
            f"against {statistics.median(secs['b']):.2f}, largest {max(secs['a']):.2f} against {max(secs['b']):.2f} "
            f"(as acquired, median of {args.repeats} after a warm-up). Field difference: |field at {b:g} mm / "
            f"field at {a:g} mm - 1| over the brain (see `bench/n4_grid.py`).\n\n"
            + table(["scan", "shading", f"N4 s, {a:g} mm", f"N4 s, {b:g} mm", "field difference p99", "largest"], rows)
            + f"\n\nScores: CPU plan (leaky_unet {plan.arch_kwargs}, {plan.input_channels} input slices), "
            f"{args.epochs} epochs × {args.iterations} iterations per fold, folds by subject, plan seed(s) "
            f"{args.seeds}; each fold's final model on its validation scans, one pass, threshold 0.5, no "
            f"postprocessing. The first two rows are the same models ({a:g} mm preprocessing in training) with each "
            "grid's input: only the field differs. The third retrains the folds on the other grid (training noise "
            f"included). Mean volume Dice / lesion F1 over {len(scans)} scan runs:\n\n"
            + table(["models, input", *FIELDS], mean_rows)
            + f"\n\nEach scan run's volume Dice ({' / '.join(FIELDS)}), and the change of the same models' Dice "
            f"as acquired from {a:g} to {b:g} mm input:\n\n"
            + table(["scan", *keys, "change, same models"], scan_rows))
    print(body)
    write_section("n4_grid", "N4's fitting grid: seconds, field and scores (CPU plan, real data)", body)


if __name__ == "__main__":
    main()
