"""Dice per slice against over the batch, each after the minimum lesion size `evaluate` would choose, CPU plan.

`bench/loss_dice.py` found that soft Dice per slice (``bce_dice_per_slice``) finds more small lesions than Dice
over the batch but predicts many more false ones, nearly all under 50 mm³. `evaluate` removes lesions under a
minimum size chosen on the out-of-fold predictions, so this scores both losses after that removal, chosen without
fooling itself: for each arm, plan seed and subject, :func:`mslpipe.evaluate.choose_min_lesion_size` (`evaluate`'s
own candidates and criterion) on the *other* subjects' out-of-fold scans of the same arm and seed picks the size
that is then applied to the subject's own scans. The probabilities are the two arms' out-of-fold models (trained,
or reused: the batch-Dice runs from ``--axial-work`` as `bench/multiview.py` leaves them, the per-slice runs from
``--per-slice-work`` as `bench/loss_dice.py` leaves them), one pass, threshold 0.5, on the scan's own grid; volume
Dice and lesion F1 against the expert mask. Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multiview import out_of_fold, reference, scan_spacing  # noqa: E402

from mslpipe import metrics  # noqa: E402
from mslpipe.evaluate import choose_min_lesion_size  # noqa: E402
from mslpipe.postprocess import remove_small_components  # noqa: E402
from results import fold_arguments, real_data_work, table, write_section  # noqa: E402

ARMS = {"Dice over the batch": None, "Dice per slice": {"loss": "bce_dice_per_slice"}}


def nested(probs: dict[str, np.ndarray], refs: dict[str, np.ndarray], spacing: dict[str, tuple]) -> dict:
    """{case: (chosen mm³, (Dice, lesion F1) without removal, (Dice, lesion F1) after removal)}, each subject's
    size chosen on the other subjects' scans."""
    preds = {case: p >= 0.5 for case, p in probs.items()}
    out = {}
    for subject in sorted({case.split("_")[0] for case in preds}):
        own = sorted(c for c in preds if c.startswith(subject + "_"))
        others = [(preds[c], [refs[c]], spacing[c]) for c in preds if c not in own]
        size = choose_min_lesion_size(others)["min_lesion_mm3"]
        for case in own:
            kept = remove_small_components(preds[case], spacing[case], size)
            out[case] = (size, (metrics.dice(preds[case], refs[case]), metrics.lesion_f1(preds[case], refs[case])),
                         (metrics.dice(kept, refs[case]), metrics.lesion_f1(kept, refs[case])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    ap.add_argument("--axial-work", type=Path, default=None, help="work folder of existing batch-Dice runs")
    ap.add_argument("--per-slice-work", type=Path, default=None, help="work folder of existing per-slice runs")
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-loss-size-")
    folders = {"Dice over the batch": args.axial_work or work / "axial",
               "Dice per slice": args.per_slice_work or work / "loss_per_slice"}
    seeds = [int(s) for s in args.seeds.split(",")]
    scored = {arm: {seed: out_of_fold(args, folders[arm], seed, 2, work / "probabilities", overrides,
                                      "" if overrides is None else "per_slice_")
                    for seed in seeds} for arm, overrides in ARMS.items()}
    refs = reference(folders["Dice over the batch"], seeds[0])
    spacing = scan_spacing(folders["Dice over the batch"], seeds[0])
    results = {arm: {seed: nested(by_seed[seed], refs, spacing) for seed in seeds} for arm, by_seed in scored.items()}
    first, second = (results[arm] for arm in ARMS)
    rows, pooled, ahead = [], {arm: [] for arm in ARMS}, 0
    for seed in seeds:
        for case in sorted(first[seed]):
            a, b = first[seed][case], second[seed][case]
            for arm in ARMS:
                pooled[arm].append(results[arm][seed][case][2])
            ahead += b[2][0] > a[2][0]
            rows.append([case, seed, *(f"{r[0]:g}" for r in (a, b)),
                         *(f"{r[2][0]:.3f} / {r[2][1]:.3f}" for r in (a, b)), f"{b[2][0] - a[2][0]:+.3f}"])
    raw = {arm: np.mean([v[1] for s in seeds for v in results[arm][s].values()], axis=0) for arm in ARMS}
    mean = {arm: np.mean(v, axis=0) for arm, v in pooled.items()}
    body = (f"CPU plan (leaky_unet, 3 input slices), {args.epochs} epochs × {args.iterations} iterations per fold, "
            f"folds by subject (leave one subject out), plan seeds {args.seeds}; the arms differ only in the plan's "
            "`loss`. Each arm's out-of-fold probabilities on the scan's own grid, threshold 0.5; the minimum lesion "
            "size chosen by `evaluate`'s criterion on the other subjects' scans of the same arm and seed and applied "
            "to the subject's own (nested; see `bench/loss_min_size.py`). Cells: volume Dice / lesion F1 against "
            "the expert mask after the removal.\n\n"
            + table(["scan", "seed", *(f"mm³ chosen, {arm}" for arm in ARMS), *ARMS, "Dice change"], rows)
            + f"\n\nPooled over {len(rows)} scan runs, volume Dice / lesion F1 without removal: "
            + "; ".join(f"{arm} {d:.3f} / {f:.3f}" for arm, (d, f) in raw.items())
            + "; after the nested removal: "
            + "; ".join(f"{arm} {d:.3f} / {f:.3f}" for arm, (d, f) in mean.items())
            + f". Dice per slice ahead in Dice on {ahead} of {len(rows)}.")
    print(body)
    write_section("loss_min_size", "Dice per slice against over the batch, after the minimum lesion size "
                  "(CPU plan, real data)", body)


if __name__ == "__main__":
    main()
