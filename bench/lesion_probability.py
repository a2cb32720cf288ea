"""Whole lesions removed by their probability, chosen on cross-validation with the minimum lesion size, CPU plan.

`predict --report` lists each lesion's mean probability, and on the real data most lesions near the 0.5 threshold
were false ("Lesion detection by size, and lesion probability"), while `evaluate`'s minimum lesion size barely
moved lesion F1 ("Dice per slice against over the batch, after the minimum lesion size"). This asks whether a
filter on whole lesions, keeping a predicted lesion (26-connected, thresholded at 0.5) only when its mean
probability is at least P, earns a place beside the size: chosen per dataset on the out-of-fold predictions as
`evaluate` chooses the size, without fooling itself. For each plan seed and subject, two selections on the *other*
subjects' out-of-fold scans of the same seed, each applied to the subject's own scans (nested):

* ``size``: :func:`mslpipe.evaluate.choose_min_lesion_size` (what `evaluate` does today);
* ``size + mean p``: the grid of the same sizes × ``PROBABILITIES`` under the same criterion (the best mean of
  (Dice + lesion F1)/2 among settings that lower neither mean Dice nor mean lesion F1 below no removal; ties to
  the smaller size, then the lower P);

and, reported beside them, ``size + max p``: the same with the lesion's highest probability instead of its mean.
The probabilities are the axial out-of-fold models of every seed (trained, or reused from ``--work``/
``--axial-work`` as `bench/multiview.py` leaves them), one pass, on the scan's own grid; volume Dice and lesion F1
against the expert mask. Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multiview import out_of_fold, reference, scan_spacing  # noqa: E402

from mslpipe import metrics  # noqa: E402
from mslpipe.evaluate import best_candidate, choose_min_lesion_size  # noqa: E402
from results import fold_arguments, real_data_work, table, write_section  # noqa: E402

SIZES = (0, 3, 5, 10, 20)  # evaluate's own candidates, mm³
PROBABILITIES = (0, 0.6, 0.7, 0.8)
STATS = {"mean": ndimage.mean, "max": ndimage.maximum}


def setting_scores(prob: np.ndarray, ref: np.ndarray, spacing: tuple) -> dict[tuple[str, float, float], tuple]:
    """{(statistic, min size mm³, min probability): (Dice, lesion F1)} of one scan, lesions labelled once."""
    labels, n = ndimage.label(prob >= 0.5, structure=np.ones((3, 3, 3), bool))
    index = np.arange(1, n + 1)
    volume = np.bincount(labels.ravel(), minlength=n + 1)[1:] * float(np.prod(spacing))
    out = {}
    for stat, fn in STATS.items():
        value = np.asarray(fn(prob, labels, index)) if n else np.zeros(0)
        for size in SIZES:
            for p in PROBABILITIES:
                keep = np.concatenate([[False], (volume >= size) & (value >= p)])
                pred = keep[labels]
                out[stat, size, p] = (float(metrics.dice(pred, ref)), float(metrics.lesion_f1(pred, ref)))
    return out


def choose(scores: list[dict], stat: str) -> tuple[float, float]:
    """`evaluate`'s criterion (:func:`mslpipe.evaluate.best_candidate`) over the grid of one statistic, on these
    scans' setting scores; the grid in order of preference: smaller sizes, then lower P, first."""
    grid = [(size, p) for size in SIZES for p in PROBABILITIES]
    means = [tuple(float(v) for v in np.mean([s[(stat, *g)] for s in scores], axis=0)) for g in grid]
    return grid[best_candidate(means)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    ap.add_argument("--axial-work", type=Path, default=None, help="work folder of existing axial runs")
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-lesion-probability-")
    axial_work = args.axial_work or work / "axial"
    seeds = [int(s) for s in args.seeds.split(",")]
    oof = {seed: out_of_fold(args, axial_work, seed, 2, work / "probabilities") for seed in seeds}
    refs, spacing = reference(axial_work, seeds[0]), scan_spacing(axial_work, seeds[0])
    arms = ("size", "size + mean p", "size + max p")
    rows, pooled, ahead, behind = [], {arm: [] for arm in arms}, 0, 0
    for seed in seeds:
        probs = oof[seed]
        scores = {case: setting_scores(p, refs[case], spacing[case]) for case, p in probs.items()}
        for subject in sorted({case.split("_")[0] for case in probs}):
            own = sorted(c for c in probs if c.startswith(subject + "_"))
            others = [c for c in probs if c not in own]
            size = choose_min_lesion_size([(probs[c] >= 0.5, [refs[c]], spacing[c]) for c in others],
                                          SIZES)["min_lesion_mm3"]
            chosen = {"size": ("mean", size, 0), **{f"size + {stat} p": (stat, *choose([scores[c] for c in others],
                                                                                       stat)) for stat in STATS}}
            for case in own:
                got = {arm: scores[case][chosen[arm]] for arm in arms}
                for arm in arms:
                    pooled[arm].append(got[arm])
                change = (sum(got["size + mean p"]) - sum(got["size"])) / 2
                ahead, behind = ahead + (change > 1e-12), behind + (change < -1e-12)
                rows.append([case, seed, f"{size:g}", *(f"{chosen[a][1]:g} / {chosen[a][2]:g}" for a in arms[1:]),
                             *(f"{got[a][0]:.3f} / {got[a][1]:.3f}" for a in arms), f"{change:+.3f}"])
    mean = {arm: np.mean(v, axis=0) for arm, v in pooled.items()}
    body = (f"CPU plan (leaky_unet, 3 input slices), {args.epochs} epochs × {args.iterations} iterations per fold, "
            f"folds by subject (leave one subject out), plan seeds {args.seeds}: each axial out-of-fold model's "
            "probabilities on its validation scans, on the scan's own grid, thresholded at 0.5; lesions are "
            "26-connected components. `size`: the minimum lesion size (mm³ of "
            f"{', '.join(map(str, SIZES))}) chosen by `evaluate`'s own function on the other subjects' scans of the "
            "same seed and applied to the subject's; `size + mean p`: the minimum size and a minimum mean lesion "
            f"probability (of {', '.join(f'{p:g}' for p in PROBABILITIES)}) chosen together by the same criterion, "
            "nested the same way; `size + max p`: the same with the lesion's highest probability (see "
            "`bench/lesion_probability.py`). Cells: volume Dice / lesion F1 against the expert mask; chosen: "
            "mm³ / P.\n\n"
            + table(["scan", "seed", "chosen, size", "chosen, size + mean p", "chosen, size + max p", *arms,
                     "(Dice + F1)/2 change, mean p − size"], rows)
            + f"\n\nPooled over {len(rows)} scan runs, volume Dice / lesion F1: "
            + "; ".join(f"{arm} {d:.3f} / {f:.3f}" for arm, (d, f) in mean.items())
            + f". `size + mean p` ahead of `size` in (Dice + F1)/2 on {ahead} of {len(rows)}, behind on {behind}.")
    print(body)
    write_section("lesion_probability", "Whole lesions removed by their probability (CPU plan, real data)", body)


if __name__ == "__main__":
    main()
