"""Intensity normalisation on the real data: z-score (the default) against median / interquartile range.

Scanners differ in how much dark CSF or bright lesion the brain mask holds, and that moves a z-score's mean and
standard deviation; the median and the interquartile range move less. Two measurements:

1. **invariance**: for each real scan, the mean lesion intensity in normalised units under each scheme (the
   scan's own brain mask and percentile clipping, as `plan` preprocesses it). The more alike these are across
   scans and sources, the less an unseen scanner's scan differs from the training scans after normalisation;
2. **accuracy**: every fold of ../shared/data/real-ms-isbi (4 leave-one-subject-out folds, CPU plan) trained once
   per scheme, everything else equal (the z-score arm is the same run as `bench/onnx_int8.py`'s and `bench/tta.py`'s,
   whose work folder can be reused), each final model scored on its validation scans: volume Dice and lesion F1
   against the expert mask, no postprocessing.

Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mslpipe import brainmask, datasets, intensity  # noqa: E402
from mslpipe.io import load_image, load_mask, read_json  # noqa: E402
from mslpipe.plans import Plan  # noqa: E402
from results import (  # noqa: E402
    fold_arguments,
    real_data_path,
    real_data_work,
    score_checkpoint,
    seed_dirs,
    table,
    trained_fold,
    write_section,
)

SCHEMES = {"z-score": "brain_percentile_zscore", "median / IQR": "brain_percentile_median_iqr"}
DEFAULT = Plan("x").normalization  # the plan's default: clipping percentiles and the z-score scheme


def lesion_contrast() -> list[list]:
    """Per scan: the mean lesion intensity in normalised units, under each scheme."""
    rows = []
    for case in datasets.discover(real_data_path()):
        image, _ = load_image(next(iter(case.images.values())))
        lesion = load_mask(case.masks[0], image.shape) > 0
        brain = brainmask.brain_mask(image)
        row = [case.id]
        for scheme in SCHEMES.values():
            normed, _ = intensity.normalise(image, brain, DEFAULT["lower_pct"], DEFAULT["upper_pct"], scheme)
            row.append(float(normed[lesion & brain].mean()))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    args = ap.parse_args()
    seeds = [int(v) for v in args.seeds.split(",")]
    work = real_data_work(args.work, "mslpipe-norm-")
    contrast = lesion_contrast()
    spread = {name: np.array([r[i + 1] for r in contrast]) for i, name in enumerate(SCHEMES)}
    contrast_rows = [[r[0], *(f"{v:.2f}" for v in r[1:])] for r in contrast]
    contrast_rows.append(["**range (max − min)**", *(f"{np.ptp(v):.2f}" for v in spread.values())])
    contrast_rows.append(["**coefficient of variation**", *(f"{v.std() / v.mean():.3f}" for v in spread.values())])
    rows, per_case = [], []
    pooled: dict[str, list] = {name: [] for name in SCHEMES}
    per_seed: dict[int, dict[str, list]] = {seed: {name: [] for name in SCHEMES} for seed in seeds}
    for seed in seeds:
        for fold in (int(k) for k in args.folds.split(",")):
            scores = {}
            for name, scheme in SCHEMES.items():
                # the default scheme's runs are onnx_int8's and tta's, in the same work folder
                dirs = seed_dirs(work if scheme == DEFAULT["scheme"] else work / scheme, seed)
                overrides = {"normalization": {**DEFAULT, "scheme": scheme}}
                fold_dir = trained_fold(dirs, seed, fold, args.epochs, args.iterations, overrides)
                val = read_json(fold_dir / "run.json")["val"]
                scores[name] = score_checkpoint(dirs.preprocessed_dir("real"), fold_dir / "checkpoint_final.pt",
                                                val)
                pooled[name] += list(scores[name].values())
                per_seed[seed][name] += list(scores[name].values())
                net = read_json(fold_dir / "plan.json")["arch_kwargs"]
            means = {name: np.mean(list(s.values()), axis=0) for name, s in scores.items()}
            rows.append([seed, fold, ", ".join(val), *(f"{means[n][0]:.3f} / {means[n][1]:.3f}" for n in SCHEMES),
                         f"{means['median / IQR'][0] - means['z-score'][0]:+.3f}"])
            per_case += [[seed, fold, case, *(f"{scores[n][case][0]:.3f} / {scores[n][case][1]:.3f}"
                                              for n in SCHEMES)] for case in val]
    pool = {n: np.mean(v, axis=0) for n, v in pooled.items()}
    seed_pools = "; ".join(
        f"seed {seed}: " + ", ".join(f"{n} {np.mean(v[n], axis=0)[0]:.3f} / {np.mean(v[n], axis=0)[1]:.3f}"
                                     for n in SCHEMES) for seed, v in per_seed.items())
    body = ("Mean lesion intensity after normalisation (in units of each scheme's scale), per real scan; the "
            "expert mask, the scan's brain mask and 0.5/99.5 percentile clipping as `plan` preprocesses it:\n\n"
            + table(["scan", *SCHEMES], contrast_rows)
            + f"\n\nAccuracy: CPU plan (leaky_unet {net}), {args.epochs} epochs × {args.iterations} iterations per "
            f"fold, plan seeds {', '.join(map(str, seeds))} (a seed sets the folds' order and the training's random "
            "draws), folds by subject (leave one subject out), one run per scheme and seed with everything else "
            "equal. Cells: volume Dice / lesion F1 on the validation scans, final model, no postprocessing (see "
            "`bench/normalisation.py`). Runs already in the work folder are reused, whatever commit trained them."
            "\n\n"
            + table(["seed", "fold", "validation scans", *SCHEMES, "Dice change"], rows)
            + f"\n\nPooled over {len(pooled['z-score'])} scan runs: "
            + ", ".join(f"{n} {pool[n][0]:.3f} / {pool[n][1]:.3f}" for n in SCHEMES) + f" ({seed_pools}).\n\n"
            + table(["seed", "fold", "scan", *SCHEMES], per_case))
    print(body)
    write_section("normalisation", "Intensity normalisation: z-score against median / IQR (CPU plan, real data)",
                  body)


if __name__ == "__main__":
    main()
