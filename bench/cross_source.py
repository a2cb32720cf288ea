"""Another scanner: the CPU plan trained on one source of the real data and scored on the other.

The real scans come from two sources (../shared/data/real-ms-isbi/README.md): the Lesjak et al. database
(training01, training02: one scan each) and MSLesSeg (training03: three time points; training04). Leave-one-subject-
out folds mix both in training, so they never show a scan from a source the model has not seen, which is what a
new site's scans are. This plans the real data with ``plan --groups`` (subject → source), which gives two folds:
fold 0 trains on Lesjak and validates on MSLesSeg's 4 scans, fold 1 the reverse, with the 2 subjects of the other
source in training in each case.

Each arm of ``--arms`` is a set of plan overrides that names the scheme it tests, so that a change of the planner's
defaults does not change what a cached arm means (``default``: the plan as ``mslpipe plan`` now writes it;
``zscore``: z-score normalisation with N4, the default before median/IQR; ``n4_off``: z-score without N4;
``median_iqr``: median/IQR normalisation with N4; ``bias_aug``: the plan as written plus the random bias-field
augmentation on 30% of slices; ``strong_intensity``: median/IQR with N4 and brightness, contrast and gamma
augmentation on 30% of slices each instead of 15%, contrast factors 0.65-1.5 instead of 0.75-1.25; ``low_res``:
median/IQR with N4 and the simulated low resolution GPU plans have, on 25% of slices), trained once per plan seed
(a seed changes the training's randomness; the folds are fixed by the sources). The final checkpoint
of each fold segments its validation scans: volume Dice and lesion F1, one pass, threshold 0.5, no postprocessing,
on the preprocessed grid. Suffixes score an arm's models differently: ``NAME+tta`` with test-time mirroring,
``NAME+ens`` as one ensemble per fold (every seed's model of the fold, probabilities averaged, as ``predict``
averages folds), and both, ``NAME+ens+tta``. A rerun with the same ``--work`` reuses trained folds and scores.
Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe.io import read_json, write_json  # noqa: E402
from results import real_data_work, score_checkpoint, seed_dirs, table, trained_fold, write_section  # noqa: E402

# the sources, as ../shared/data/real-ms-isbi/README.md names them
SOURCES = {"training01": "Lesjak", "training02": "Lesjak", "training03": "MSLesSeg", "training04": "MSLesSeg"}
ARMS = {
    "default": None,
    "zscore": {"normalization.scheme": "brain_percentile_zscore"},
    "n4_off": {"normalization.scheme": "brain_percentile_zscore", "normalization.n4_levels": 0},
    "median_iqr": {"normalization.scheme": "brain_percentile_median_iqr"},
    "bias_aug": {"augmentation.p_bias_field": 0.3},
    # median/IQR with N4, and the intensity augmentations (brightness, contrast, gamma) on twice as many slices,
    # contrast over a wider range: a different FLAIR sequence changes contrast more than the defaults draw
    "strong_intensity": {"normalization.scheme": "brain_percentile_median_iqr", "augmentation.p_brightness": 0.3,
                         "augmentation.p_contrast": 0.3, "augmentation.contrast_range": [0.65, 1.5],
                         "augmentation.p_gamma": 0.3},
    # median/IQR with N4, and nnU-Net's simulated low resolution on a quarter of the slices, as GPU plans have it
    "low_res": {"normalization.scheme": "brain_percentile_median_iqr", "augmentation.p_low_res": 0.25},
}
SUFFIXES = ("tta", "ens")  # NAME+tta: test-time mirroring; NAME+ens: the seeds' models of a fold as one ensemble


def parse_arm(arm: str) -> tuple[str, set[str]]:
    """``NAME+ens+tta`` → ("NAME", {"ens", "tta"}); exits on an unknown arm or suffix."""
    base, *suffixes = arm.split("+")
    if base not in ARMS or not set(suffixes) <= set(SUFFIXES) or len(set(suffixes)) != len(suffixes):
        sys.exit(f"unknown arm {arm!r}: NAME[+ens][+tta] with NAME one of {', '.join(ARMS)}")
    return base, set(suffixes)


def trained_source_fold(work: Path, arm: str, seed: int, fold: int, epochs: int, iterations: int) -> Path:
    """Fold ``fold`` of the real data planned with one source left out per fold (arm ``arm``'s overrides), trained
    unless already there."""
    groups = work / "sources.json"
    work.mkdir(parents=True, exist_ok=True)
    write_json(groups, SOURCES)
    return trained_fold(seed_dirs(work / arm, seed), seed, fold, epochs, iterations, ARMS[arm], groups)


def score(work: Path, arm: str, seeds: list[int], fold: int, args) -> dict[str, tuple[float, float]]:
    """{case: (Dice, lesion F1)} of one fold's final model(s) on its validation scans (cached beside the first). One
    seed: that seed's model; several (arm ``NAME+ens``): their probabilities averaged. ``NAME+tta``: with test-time
    mirroring (``predict --tta``) instead of one pass. Each seed's preprocessing is the same (one arm, one scheme);
    the first seed's preprocessed scans are used."""
    base, suffixes = parse_arm(arm)
    fold_dirs = [trained_source_fold(work, base, s, fold, args.epochs, args.iterations) for s in seeds]
    parts = (["ens" + "-".join(map(str, seeds))] if len(seeds) > 1 else []) + (["tta"] if "tta" in suffixes else [])
    cache = fold_dirs[0] / ("_".join(["cross_source", *parts]) + ".json")
    if cache.exists():
        return {k: tuple(v) for k, v in read_json(cache).items()}
    out = score_checkpoint(seed_dirs(work / base, seeds[0]).preprocessed_dir("real"),
                           [d / "checkpoint_final.pt" for d in fold_dirs], read_json(fold_dirs[0] / "run.json")["val"],
                           tta="tta" in suffixes)
    write_json(cache, out)
    print(f"{arm} seed(s) {seeds} fold {fold}: " + ", ".join(f"{c} {d:.3f}/{f:.3f}" for c, (d, f) in out.items()),
          flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="zscore,n4_off,median_iqr",
                    help=f"comma-separated, of {', '.join(ARMS)}, each optionally NAME+ens, NAME+tta or NAME+ens+tta")
    ap.add_argument("--seeds", default="12345,7", help="comma-separated plan seeds [12345,7]")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--work", type=Path, default=None, help="work folder; a rerun reuses trained folds")
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    parsed = {a: parse_arm(a) for a in arms}
    seeds = [int(s) for s in args.seeds.split(",")]
    # the seeds an arm's rows go by: each seed's model alone, or (NAME+ens) one row for the ensemble of them all
    arm_seeds = {a: ["all"] if "ens" in parsed[a][1] else seeds for a in arms}
    work = real_data_work(args.work, "cross_source_")
    scores = {(a, s, k): score(work, a, seeds if s == "all" else [s], k, args)
              for a in arms for s in arm_seeds[a] for k in (0, 1)}
    folds = read_json(seed_dirs(work / parsed[arms[0]][0], seeds[0]).plan_dir("real") / "splits.json")["folds"]
    direction = {k: f"{SOURCES[f['train'][0]]} → {f['group']}" for k, f in enumerate(folds)}  # trained on → scored on

    def mean(values) -> str:
        return f"{statistics.mean(values):.3f}" if values else "—"

    def seed_label(s) -> str:
        return f"ensemble of {args.seeds}" if s == "all" else str(s)

    rows = []
    for a in arms:
        for k in (0, 1):
            for s in arm_seeds[a]:
                cases = scores[(a, s, k)]
                rows.append([a, direction[k], seed_label(s), len(cases), mean([d for d, _ in cases.values()]),
                             mean([f for _, f in cases.values()])])
        per_seed = [[v for k in (0, 1) for v in scores[(a, s, k)].values()] for s in arm_seeds[a]]  # pooled per seed
        for s, pooled in zip(arm_seeds[a], per_seed, strict=True):
            rows.append([a, "pooled", seed_label(s), len(pooled), mean([d for d, _ in pooled]),
                         mean([f for _, f in pooled])])
        if len(per_seed) > 1:  # each seed's pooled mean, averaged over the seeds
            rows.append([f"**{a}**", "**pooled, mean of the seeds**", "all", sum(map(len, per_seed)),
                         mean([statistics.mean(d for d, _ in p) for p in per_seed]),
                         mean([statistics.mean(f for _, f in p) for p in per_seed])])
    per_scan = []
    for a in arms:
        for s in arm_seeds[a]:
            for k in (0, 1):
                for case, (d, f) in scores[(a, s, k)].items():
                    per_scan.append([a, seed_label(s), direction[k], case, f"{d:.3f}", f"{f:.3f}"])

    def describe(a: str) -> str:
        base, suffixes = parsed[a]
        how = [w for flag, w in (("ens", "as one ensemble per fold (the seeds' models, probabilities averaged)"),
                                 ("tta", "with test-time mirroring (`--tta`)")) if flag in suffixes]
        return f"`{a}` {ARMS[base] or 'the plan as written'}" + (" scored " + " and ".join(how) if how else "")

    body = (f"Folds by source (`plan --groups`: {json.dumps(SOURCES)}); fold names read trained on → scored on. "
            f"CPU plan, {args.epochs} epochs × {args.iterations} iterations per fold, plan seeds {args.seeds}; each "
            "fold's final checkpoint on its validation scans, one pass unless the arm says otherwise, threshold "
            "0.5, no postprocessing. Arms: " + "; ".join(describe(a) for a in arms)
            + ". Mean volume Dice and lesion F1 over the scans.\n\n"
            + table(["arm", "direction", "seed", "scans", "Dice", "lesion F1"], rows)
            + "\n\nPer scan:\n\n" + table(["arm", "seed", "direction", "scan", "Dice", "lesion F1"], per_scan))
    print(body)
    write_section("cross_source", "Another scanner: trained on one source, scored on the other (CPU plan, real data)",
                  body)


if __name__ == "__main__":
    main()
