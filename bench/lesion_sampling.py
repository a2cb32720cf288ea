"""Foreground sampling by slice (the default) against by lesion (``foreground_sampling: lesion``), CPU plan, real data.

A foreground sample (a third of each batch) draws a case, then one of its lesion slices. Drawn uniformly, a lesion
spanning thirty slices is seen thirty times as often as a one-slice lesion, and the CPU plan finds few small
lesions (`bench/lesion_sizes.py`). With ``foreground_sampling: lesion`` the sample draws a lesion first, then one
of its slices. This trains every fold of ../shared/data/real-ms-isbi both ways, everything else equal (the
slice-sampled runs are `bench/lesion_sizes.py`'s, reused from the same work folder), and counts, on each fold's
validation scans, the reference lesions found and the predicted lesions that are false, by lesion volume, with
volume Dice and lesion F1. One pass, threshold 0.5, no postprocessing. Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesion_sizes import found_and_false_rows, score_arms  # noqa: E402

from results import fold_arguments, real_data_work, table, write_section  # noqa: E402

ARMS = {"by slice": None, "by lesion": {"foreground_sampling": "lesion"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-sampling-")
    runs = score_arms(args, work, ARMS, "lesion_sampling")
    first = next(iter(runs.values()))
    size_rows = found_and_false_rows(runs)
    totals = ["all", sum(b["n_ref_lesions"] for b in first["sizes"]),
              *(str(sum(b["n_detected_ref_lesions"] for b in r["sizes"])) for r in runs.values()),
              *(f"{sum(b['n_fp_pred_lesions'] for b in r['sizes'])} of {sum(b['n_pred_lesions'] for b in r['sizes'])}"
                for r in runs.values())]
    pooled = {arm: np.mean(r["overlap"], axis=0) for arm, r in runs.items()}
    scan_rows = [[scan, *(f"{r['overlap'][i][0]:.3f} / {r['overlap'][i][1]:.3f}" for r in runs.values())]
                 for i, scan in enumerate(first["scans"])]
    body = (f"CPU plan (leaky_unet {first['net']}), {args.epochs} epochs × {args.iterations} iterations per fold, "
            f"folds by subject (leave one subject out), plan seed(s) {args.seeds}; the two arms differ only in "
            "`foreground_sampling` (see `bench/lesion_sampling.py`). Each fold's final model on its validation "
            "scans, one pass, threshold 0.5, no postprocessing, against the expert mask. "
            + "; ".join(f"{arm}: mean volume Dice {d:.3f}, lesion F1 {f:.3f}" for arm, (d, f) in pooled.items())
            + f", over {len(first['scans'])} scans.\n\nReference lesions found (share) and predicted lesions that are "
            "false, by lesion volume, summed over the scans:\n\n"
            + table(["volume mm³", "reference lesions", *(f"found, {arm}" for arm in runs),
                     *(f"false, {arm}" for arm in runs)], [*size_rows, totals])
            + "\n\nPer scan, volume Dice / lesion F1:\n\n" + table(["scan", *runs], scan_rows))
    print(body)
    write_section("lesion_sampling", "Foreground sampling by slice against by lesion (CPU plan, real data)", body)


if __name__ == "__main__":
    main()
