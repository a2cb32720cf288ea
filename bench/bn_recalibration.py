"""BatchNorm statistics estimated again for the final weights ("precise BN") against the running averages, CPU plan.

The study's network normalises with BatchNorm, whose statistics at inference are running averages kept during
training: they mix the statistics of weights that kept changing, from batches of a few slices (6 in a CPU plan).
On the real data a fold's validation Dice swung by tenths from one epoch to the next at the smallest learning
rates. `train` can estimate the statistics again after the last epoch (the plan's ``bn_recalibration_batches``:
one pass over that many batches of the epochs that would come next, train mode, no gradient, a plain average;
:func:`mslpipe.train_parts.recalibrate_batchnorm`). This does exactly that to each fold's final weights, with the
loader train would build, and scores both on the fold's validation scans.

Per plan seed and fold: the final checkpoint (trained, or reused from ``--work``/``--axial-work`` as
`bench/multiview.py` leaves them) with its stored statistics and with ``--batches`` recalibrated ones, one pass,
on the scan's own grid, threshold 0.5, no size removal; volume Dice and lesion F1 against the expert mask.
Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multiview import out_of_fold, reference, scores  # noqa: E402

from mslpipe import architectures, data_loading, inference  # noqa: E402
from mslpipe.io import read_json  # noqa: E402
from mslpipe.preprocess import restore  # noqa: E402
from mslpipe.train_parts import next_batches, recalibrate_batchnorm  # noqa: E402
from results import fold_arguments, real_data_work, table, trained_folds, write_section  # noqa: E402

STORED = {"bn_recalibration_batches": 0}  # the folds trained without it, whatever the plan's default


def as_train_recalibrates(model, pre: Path, train_cases: list[str], plan, batches: int):
    """``model`` (a fold's final weights, on the CPU) with what `train`'s last step does to them: the BatchNorm
    statistics estimated again on ``batches`` batches of the run's own loader as it stands after the last epoch
    (its next passes); back in eval mode."""
    loader = data_loading.make_train_loader(pre, train_cases, plan, batches=plan.iterations_per_epoch,
                                            seed=plan.seed, start_epoch=plan.epochs)
    recalibrate_batchnorm(model, next_batches(loader, batches), "cpu", architectures.memory_format(model, "cpu"))
    return model.eval()


def recalibrated(args, work: Path, seed: int, cache: Path, batches: int) -> tuple[dict[str, np.ndarray], dict]:
    """({case: probability on the scan's own grid} of each fold's final weights after recalibration, cached as
    float16 in ``cache``; {fold: seconds the recalibration took}) for one seed's folds in ``work``."""
    one = argparse.Namespace(**{**vars(args), "seeds": str(seed)})
    out, seconds = {}, {}
    for _, fold, dirs, fold_dir in trained_folds(one, work, STORED):
        val = read_json(fold_dir / "run.json")["val"]
        paths = {case: cache / f"bnrecal{batches}_axial_seed{seed}_{case}.npy" for case in val}
        timing = cache / f"bnrecal{batches}_axial_seed{seed}_fold{fold}.seconds"
        if not all(p.exists() for p in paths.values()) or not timing.exists():
            predictor = inference.load_predictor([fold_dir / "checkpoint_final.pt"], device="cpu")
            model, plan, pre = predictor.models[0], predictor.plan, dirs.preprocessed_dir("real")
            t0 = time.perf_counter()  # what train adds: the loader's start and the pass
            as_train_recalibrates(model, pre, read_json(fold_dir / "run.json")["train"], plan, batches)
            took = time.perf_counter() - t0
            cache.mkdir(parents=True, exist_ok=True)
            for case, path in paths.items():
                image, _, props = data_loading.load_case_arrays(pre, case)
                prob = inference.predict_volume([model], image, divisor=predictor.divisor, device="cpu",
                                                batch_size=plan.inference_batch_size, context=plan.context_slices)
                np.save(path.with_suffix(".tmp.npy"), restore(prob, props).astype(np.float16))
                path.with_suffix(".tmp.npy").replace(path)
            timing.write_text(f"{took:.3f}\n")
        seconds[fold] = float(timing.read_text())
        out.update({case: np.load(path).astype(np.float32) for case, path in paths.items()})
    return out, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    ap.add_argument("--axial-work", type=Path, default=None, help="work folder of existing axial runs")
    ap.add_argument("--batches", type=int, default=50, help="training batches to estimate the statistics on [50]")
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-bn-recalibration-")
    axial_work = args.axial_work or work / "axial"
    cache = work / "probabilities"
    seeds = [int(s) for s in args.seeds.split(",")]
    stored = {seed: out_of_fold(args, axial_work, seed, 2, cache, STORED) for seed in seeds}
    again = {seed: recalibrated(args, axial_work, seed, cache, args.batches) for seed in seeds}
    refs = reference(axial_work, seeds[0])
    rows, pooled, ahead, behind = [], {"stored": [], "again": []}, 0, 0
    for seed in seeds:
        for case in sorted(stored[seed]):
            a, b = scores(stored[seed][case], refs[case]), scores(again[seed][0][case], refs[case])
            pooled["stored"].append(a)
            pooled["again"].append(b)
            ahead, behind = ahead + (b[0] > a[0]), behind + (b[0] < a[0])
            rows.append([case, seed, f"{a[0]:.3f} / {a[1]:.3f}", f"{b[0]:.3f} / {b[1]:.3f}", f"{b[0] - a[0]:+.3f}",
                         f"{b[1] - a[1]:+.3f}"])
    mean = {k: np.mean(v, axis=0) for k, v in pooled.items()}
    secs = [s for seed in seeds for s in again[seed][1].values()]
    plan = read_json(next(axial_work.glob(f"seed{seeds[0]}/results/real/*/fold_*/plan.json")))
    body = (f"CPU plan (leaky_unet {plan['arch_kwargs']}, batch {plan['batch_size']}, {2 * plan['context_slices'] + 1}"
            f" input slices), {args.epochs} epochs × {args.iterations} iterations per fold, folds by subject (leave "
            f"one subject out), plan seeds {args.seeds}. Each fold's final weights on its validation scans, one pass, "
            "on the scan's own grid, threshold 0.5, no postprocessing: with the BatchNorm statistics stored by "
            f"training (running averages) and with statistics estimated again on {args.batches} training batches of "
            "the epochs that would come next (the run's loader continued), augmented as in training (what `train` "
            "does with the plan's `bn_recalibration_batches`; see `bench/bn_recalibration.py`). Cells: volume Dice / "
            "lesion F1 against the expert mask.\n\n"
            + table(["scan", "seed", "stored statistics", "estimated again", "Dice change", "lesion F1 change"], rows)
            + f"\n\nPooled over {len(rows)} scan runs, volume Dice / lesion F1: stored {mean['stored'][0]:.3f} / "
            f"{mean['stored'][1]:.3f}, estimated again {mean['again'][0]:.3f} / {mean['again'][1]:.3f}. Estimated "
            f"again ahead in Dice on {ahead} of {len(rows)}, behind on {behind}. The estimate took "
            f"{np.median(secs):.0f} s per fold (median; {min(secs):.0f}-{max(secs):.0f} s) on this CPU, the "
            "loader's start and augmentation included.")
    print(body)
    write_section("bn_recalibration", "BatchNorm statistics estimated again for the final weights (CPU plan, real "
                  "data)", body)


if __name__ == "__main__":
    main()
