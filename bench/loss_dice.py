"""Soft Dice per slice against over the whole batch (the plan's ``loss``), CPU plan, real data.

The study's loss is BCE + soft Dice. Over the whole batch (``bce_dice``, the default) the Dice term is one ratio
of sums, so the voxels of large lesions dominate it; per slice (``bce_dice_per_slice``) each slice's Dice counts
alike, so a slice holding a small lesion weighs as much as one with a large one. The CPU plan misses most
lesions under 50 mm³ (`bench/lesion_sizes.py`). This trains every fold of ../shared/data/real-ms-isbi both ways,
everything else equal (the batch-Dice runs are `bench/lesion_sizes.py`'s, reused from the same work folder), and
scores each fold's final model on its validation scans: one pass, threshold 0.5, no postprocessing, volume Dice
and lesion F1, and the reference lesions found and predicted lesions false by volume. Writes its section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesion_sizes import found_and_false_rows, score_arms  # noqa: E402

from results import fold_arguments, real_data_work, table, write_section  # noqa: E402

ARMS = {"Dice over the batch": None, "Dice per slice": {"loss": "bce_dice_per_slice"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-loss-")
    runs = score_arms(args, work, ARMS, "loss_per_slice")
    first, second = runs.values()
    size_rows = found_and_false_rows(runs)
    pooled = {arm: np.mean(r["overlap"], axis=0) for arm, r in runs.items()}
    ahead = sum(b[0] > a[0] for a, b in zip(first["overlap"], second["overlap"], strict=True))
    scan_rows = [[scan, *(f"{r['overlap'][i][0]:.3f} / {r['overlap'][i][1]:.3f}" for r in runs.values()),
                  f"{second['overlap'][i][0] - first['overlap'][i][0]:+.3f}"] for i, scan in enumerate(first["scans"])]
    body = (f"CPU plan (leaky_unet {first['net']}), {args.epochs} epochs × {args.iterations} iterations per fold, "
            f"folds by subject (leave one subject out), plan seed(s) {args.seeds}; the two arms differ only in the "
            "plan's `loss` (see `bench/loss_dice.py`). Each fold's final model on its validation scans, one pass, "
            "threshold 0.5, no postprocessing, against the expert mask. Pooled over "
            f"{len(first['scans'])} scan runs, volume Dice / lesion F1: "
            + "; ".join(f"{arm} {d:.3f} / {f:.3f}" for arm, (d, f) in pooled.items())
            + f"; Dice per slice ahead in Dice on {ahead} of {len(first['scans'])}.\n\n"
            + table(["scan", *runs, "Dice change"], scan_rows)
            + "\n\nReference lesions found (share) and predicted lesions that are false, by lesion volume, summed over "
            "the scans:\n\n"
            + table(["volume mm³", "reference lesions", *(f"found, {arm}" for arm in runs),
                     *(f"false, {arm}" for arm in runs)], size_rows))
    print(body)
    write_section("loss_dice", "Dice per slice against over the batch (CPU plan, real data)", body)


if __name__ == "__main__":
    main()
