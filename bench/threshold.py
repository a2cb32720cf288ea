"""A probability threshold chosen on cross-validation against 0.5, nested by subject, CPU plan, real data.

`evaluate` already chooses the minimum lesion size on the out-of-fold predictions; this asks whether the
threshold could be chosen the same way without fooling itself. For each plan seed and each subject: the threshold
(of ``THRESHOLDS``) with the best mean of (volume Dice + lesion F1)/2 over the *other* subjects' out-of-fold
scans (the criterion `evaluate` uses for the lesion size; ties go to the one nearest 0.5) is applied to that
subject's scans, so no scan helps choose its own threshold. Scored against 0.5 on the same probabilities: the
axial out-of-fold models of every seed (trained, or reused from ``--work``/``--axial-work`` as
`bench/multiview.py` leaves them), on the scan's own grid, no lesion-size removal. Writes its section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multiview import out_of_fold, reference  # noqa: E402

from mslpipe import metrics  # noqa: E402
from results import fold_arguments, real_data_work, table, write_section  # noqa: E402

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)


def both(prob: np.ndarray, ref: np.ndarray, t: float) -> tuple[float, float]:
    pred = prob >= t
    return float(metrics.dice(pred, ref)), float(metrics.lesion_f1(pred, ref))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    ap.add_argument("--axial-work", type=Path, default=None, help="work folder of existing axial runs")
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-threshold-")
    axial_work = args.axial_work or work / "axial"
    seeds = [int(s) for s in args.seeds.split(",")]
    oof = {seed: out_of_fold(args, axial_work, seed, 2, work / "probabilities") for seed in seeds}
    refs = reference(axial_work, seeds[0])  # planned by out_of_fold
    rows, pooled, ahead = [], {"0.5": [], "chosen": []}, 0
    for seed in seeds:
        probs = oof[seed]
        scores = {case: {t: both(p, refs[case], t) for t in THRESHOLDS} for case, p in probs.items()}
        for subject in sorted({case.split("_")[0] for case in probs}):
            others = [c for c in probs if not c.startswith(subject + "_")]
            mean = {t: np.mean([sum(scores[c][t]) / 2 for c in others]) for t in THRESHOLDS}
            chosen = max(THRESHOLDS, key=lambda t: (round(mean[t], 12), -abs(t - 0.5)))
            for case in sorted(c for c in probs if c.startswith(subject + "_")):
                base, pick = scores[case][0.5], scores[case][chosen]
                pooled["0.5"].append(base)
                pooled["chosen"].append(pick)
                ahead += sum(pick) >= sum(base)
                rows.append([case, seed, f"{chosen:g}", f"{base[0]:.3f} / {base[1]:.3f}",
                             f"{pick[0]:.3f} / {pick[1]:.3f}", f"{(sum(pick) - sum(base)) / 2:+.3f}"])
    mean = {k: np.mean(v, axis=0) for k, v in pooled.items()}
    body = (f"CPU plan (leaky_unet, 3 input slices), {args.epochs} epochs × {args.iterations} iterations per fold, "
            f"folds by subject (leave one subject out), plan seeds {args.seeds}: each axial out-of-fold model's "
            "probabilities on its validation scans, on the scan's own grid, no lesion-size removal. Chosen: the "
            f"threshold of {', '.join(f'{t:g}' for t in THRESHOLDS)} with the best mean (Dice + lesion F1)/2 over "
            "the other subjects' scans of the same seed, applied to the subject's own (nested: no scan chooses its "
            "own threshold; see `bench/threshold.py`). Cells: volume Dice / lesion F1 against the expert mask.\n\n"
            + table(["scan", "seed", "chosen threshold", "0.5", "chosen", "(Dice + F1)/2 change"], rows)
            + f"\n\nPooled over {len(rows)} scan runs: 0.5 {mean['0.5'][0]:.3f} / {mean['0.5'][1]:.3f}, chosen "
            f"{mean['chosen'][0]:.3f} / {mean['chosen'][1]:.3f}; (Dice + F1)/2 {np.mean(mean['0.5']):.3f} → "
            f"{np.mean(mean['chosen']):.3f}; the chosen threshold at least as good on {ahead} of {len(rows)}.")
    print(body)
    write_section("threshold", "A probability threshold chosen on cross-validation (CPU plan, real data)", body)


if __name__ == "__main__":
    main()
