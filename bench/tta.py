"""Test-time mirroring (`predict --tta`) against none, per fold of the real data, CPU plan.

Trains each fold of ../shared/data/real-ms-isbi (4 leave-one-subject-out folds; the same runs as
`bench/onnx_int8.py`, whose work folder can be reused) and scores its final model on the fold's validation
scans twice: one pass, and the average over the scan and its three mirror images (left-right, front-back,
both: `--tta`). Volume Dice and lesion F1 per scan against the expert mask, no postprocessing, plus the seconds
each took. Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe.io import read_json  # noqa: E402
from results import fold_arguments, real_data_work, score_checkpoint, table, trained_folds, write_section  # noqa: E402

ARMS = {"one pass": False, "mirroring (--tta)": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-tta-")
    rows, per_case = [], []
    pooled: dict[str, list] = {arm: [] for arm in ARMS}
    seconds = {arm: 0.0 for arm in ARMS}
    for seed, fold, dirs, fold_dir in trained_folds(args, work):
        val = read_json(fold_dir / "run.json")["val"]
        scores = {}
        for arm, tta in ARMS.items():
            t0 = time.perf_counter()
            scores[arm] = score_checkpoint(dirs.preprocessed_dir("real"), fold_dir / "checkpoint_final.pt", val,
                                           tta=tta)
            seconds[arm] += time.perf_counter() - t0
            pooled[arm] += list(scores[arm].values())
        means = {arm: np.mean(list(s.values()), axis=0) for arm, s in scores.items()}
        on, off = means["mirroring (--tta)"], means["one pass"]
        rows.append([seed, fold, ", ".join(val), *(f"{means[a][0]:.3f} / {means[a][1]:.3f}" for a in ARMS),
                     f"{on[0] - off[0]:+.3f}", f"{on[1] - off[1]:+.3f}"])
        per_case += [[seed, fold, case, *(f"{scores[a][case][0]:.3f} / {scores[a][case][1]:.3f}" for a in ARMS)]
                     for case in val]
        net = read_json(fold_dir / "plan.json")["arch_kwargs"]
    pool = {arm: np.mean(v, axis=0) for arm, v in pooled.items()}
    n = len(pooled["one pass"])
    body = (f"CPU plan (leaky_unet {net}), {args.epochs} epochs × {args.iterations} iterations per fold; folds by "
            "subject (leave one subject out). Each fold's final model on its validation scans, without and with "
            "test-time mirroring. Cells: volume Dice / lesion F1 against the expert mask, no postprocessing "
            "(see `bench/tta.py`).\n\n"
            + table(["seed", "fold", "validation scans", *ARMS, "Dice change", "lesion F1 change"], rows)
            + f"\n\nPooled over {n} scans: one pass {pool['one pass'][0]:.3f} / {pool['one pass'][1]:.3f}, "
            f"mirroring {pool['mirroring (--tta)'][0]:.3f} / {pool['mirroring (--tta)'][1]:.3f}. Network seconds per "
            f"scan on this CPU: {seconds['one pass'] / n:.1f} one pass, {seconds['mirroring (--tta)'] / n:.1f} "
            "mirrored.\n\n" + table(["seed", "fold", "scan", *ARMS], per_case))
    print(body)
    write_section("tta", "Test-time mirroring against one pass (CPU plan, real data)", body)


if __name__ == "__main__":
    main()
