"""Slicing along three axes and averaging (a multi-view ensemble) against axial slicing alone, CPU plan, real data.

A 2D network sees each scan one slice (here 3 slices, 2.5D) at a time, along one axis. Models planned with
`plan --slice-axis` 1 (coronal) and 0 (sagittal) see the same lesions in other cross-sections; averaging the
three views' probabilities on the scan's grid is a cheap 3D ensemble, a common 2D remedy for missed small lesions
and slice-to-slice inconsistency. Three views are also three models, and any ensemble of three models tends to
beat one, so the fair comparison is an ensemble of three axial models trained with different seeds (each
seed's split holds every subject out once, so every scan has one out-of-fold model per seed).

Per plan seed in ``--seeds``: the real data planned three times, identical but for the slice axis (the patch
follows the brain across the other two), each fold trained for the CPU plan's schedule; then, on each fold's
validation scans, mapped back to the scan's own grid: each view alone, the three views' mean, and the mean of
the axial models of every seed in ``--seeds`` and ``--extra-axial-seeds``. Volume Dice / lesion F1 against the
expert mask, threshold 0.5, no postprocessing. ``--axial-work`` reuses axial runs (another benchmark's work
folder with the same plan). Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe import data_loading, inference, metrics  # noqa: E402
from mslpipe.io import read_json  # noqa: E402
from mslpipe.preprocess import restore  # noqa: E402
from results import fold_arguments, real_data_work, seed_dirs, table, trained_folds, write_section  # noqa: E402

VIEWS = {2: "axial", 1: "coronal", 0: "sagittal"}


def out_of_fold(args, work: Path, seed: int, axis: int, cache: Path, overrides: dict | None = None,
                tag: str = "") -> dict[str, np.ndarray]:
    """{case: lesion probability on the scan's own grid} from the out-of-fold models of one seed and view, cached
    as float16 in ``cache`` (file names start with ``tag``); the folds trained (or reused) in ``work``, with the
    plan ``overrides`` besides the view's slice axis."""
    one = argparse.Namespace(**{**vars(args), "seeds": str(seed)})
    overrides = {**({} if axis == 2 else {"slice_axis": axis}), **(overrides or {})} or None
    out = {}
    for _, _, dirs, fold_dir in trained_folds(one, work, overrides):
        predictor = None
        for case in read_json(fold_dir / "run.json")["val"]:
            path = cache / f"{tag}{VIEWS[axis]}_seed{seed}_{case}.npy"
            if not path.exists():
                if predictor is None:
                    predictor = inference.load_predictor([fold_dir / "checkpoint_final.pt"], device="cpu")
                p = predictor.plan
                image, _, props = data_loading.load_case_arrays(dirs.preprocessed_dir("real"), case)
                prob = inference.predict_volume(predictor.models, image, divisor=predictor.divisor, device="cpu",
                                                batch_size=p.inference_batch_size, context=p.context_slices)
                cache.mkdir(parents=True, exist_ok=True)
                np.save(path.with_suffix(".tmp.npy"), restore(prob, props).astype(np.float16))
                path.with_suffix(".tmp.npy").replace(path)
            out[case] = np.load(path).astype(np.float32)
    return out


def reference(work: Path, seed: int) -> dict[str, np.ndarray]:
    """{case: expert mask on the scan's own grid}, from the preprocessed labels of the plan seed's runs in ``work``
    (planned by :func:`out_of_fold`)."""
    pre = seed_dirs(work, seed).preprocessed_dir("real")
    refs = {}
    for props_file in sorted(pre.glob("*.json")):
        case = props_file.stem
        _, seg, props = data_loading.load_case_arrays(pre, case)
        refs[case] = restore(seg, props) >= 0.5
    return refs


def scan_spacing(work: Path, seed: int) -> dict[str, tuple[float, ...]]:
    """{case: voxel size in mm on the scan's own grid (the grid :func:`reference` and :func:`out_of_fold` map to)}."""
    pre = seed_dirs(work, seed).preprocessed_dir("real")
    return {f.stem: tuple(float(v) for v in np.linalg.norm(np.asarray(read_json(f)["affine"])[:3, :3], axis=0))
            for f in sorted(pre.glob("*.json"))}


def scores(prob: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    pred = prob >= 0.5
    return float(metrics.dice(pred, ref)), float(metrics.lesion_f1(pred, ref))


def cell(s: tuple[float, float]) -> str:
    return f"{s[0]:.3f} / {s[1]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    ap.add_argument("--extra-axial-seeds", default="", help="comma-separated seeds of further axial models for "
                    "the axial ensemble")
    ap.add_argument("--axial-work", type=Path, default=None, help="work folder of existing axial runs")
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-multiview-")
    axial_work = args.axial_work or work / "axial"
    cache = work / "probabilities"
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = [int(s) for s in args.extra_axial_seeds.split(",") if s]
    views = {(seed, axis): out_of_fold(args, axial_work if axis == 2 else work / VIEWS[axis], seed, axis, cache)
             for seed in seeds for axis in VIEWS}
    axial_all = [views[seed, 2] for seed in seeds] + [out_of_fold(args, axial_work, s, 2, cache) for s in extra]
    refs = reference(axial_work, seeds[0])
    arms = [*VIEWS.values(), "three views", f"axial, {len(axial_all)} seeds"]
    rows, pooled, wins = [], {arm: [] for arm in arms}, 0
    for seed in seeds:
        for case in sorted(views[seed, 2]):
            ref = refs[case]
            probs = [views[seed, axis][case] for axis in VIEWS]
            s = {VIEWS[axis]: scores(p, ref) for axis, p in zip(VIEWS, probs, strict=True)}
            s["three views"] = scores(np.mean(probs, axis=0), ref)
            s[arms[-1]] = scores(np.mean([a[case] for a in axial_all], axis=0), ref)
            wins += s["three views"][0] > s[arms[-1]][0]
            for arm in arms:
                pooled[arm].append(s[arm])
            rows.append([case, seed, *(cell(s[arm]) for arm in arms),
                         f"{s['three views'][0] - s[arms[-1]][0]:+.3f}"])
    mean = {arm: tuple(np.mean(v, axis=0)) for arm, v in pooled.items()}
    plan = read_json(next((work / "coronal").glob(f"seed{seeds[0]}/plans/real/plans.json")))
    body = (f"CPU plan (leaky_unet {plan['arch_kwargs']}, {2 * plan['context_slices'] + 1} input slices), "
            f"{args.epochs} epochs × {args.iterations} iterations per fold, folds by subject (leave one subject "
            f"out), plan seeds {args.seeds} for every view (each seed's three plans share its folds)"
            + (f", axial models also of seed(s) {args.extra_axial_seeds}" if extra else "")
            + ". Each fold's final model on its validation scans, one pass, probabilities mapped back to the scan's "
            "own grid and averaged there; threshold 0.5, no postprocessing. Cells: volume Dice / lesion F1 against "
            "the expert mask. `three views`: the mean of one seed's axial, coronal and sagittal models; "
            f"`{arms[-1]}`: the mean of the axial models of all seeds (the same for both rows of a scan), the "
            "like-for-like three-model ensemble (see `bench/multiview.py`).\n\n"
            + table(["scan", "seed", *arms, "Dice change, three views − axial seeds"], rows)
            + f"\n\nPooled over {len(rows)} scan runs: "
            + "; ".join(f"{arm} {cell(m)}" for arm, m in mean.items())
            + f". Three views ahead of the axial seeds' ensemble in Dice on {wins} of {len(rows)}.")
    print(body)
    write_section("multiview", "Three slicing axes against axial slicing (CPU plan, real data)", body)


if __name__ == "__main__":
    main()
