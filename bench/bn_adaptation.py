"""BatchNorm statistics of each scan itself (test-time adaptation) on a source never seen in training, CPU plan.

A network trained on one scanner's scans normalises another scanner's with the training data's BatchNorm
statistics. "AdaBN" (Li et al. 2016) takes them from the new scan instead: the statistics reset, one pass over
the scan's own slices in train mode without gradients, then the prediction. This scores three versions of the
same final weights on `bench/cross_source.py`'s folds (``plan --groups`` by source: trained on one source, scored
on the other's scans):

* ``stored``: the running averages training kept;
* ``precise``: estimated again on 50 batches of the run's own loader continued (what `train` does by default,
  :func:`mslpipe.train_parts.recalibrate_batchnorm`);
* ``adapted``: taken from the scored scan's own slices (all of them, in the inference's batches, each slice with
  its neighbours as input).

The folds are trained with ``bn_recalibration_batches`` 0 (so ``stored`` is what training left), or reused from
``--work``. One pass, threshold 0.5, no postprocessing, on the preprocessed grid; volume Dice and lesion F1
against the expert mask. Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bn_recalibration import as_train_recalibrates  # noqa: E402
from cross_source import SOURCES  # noqa: E402

from mslpipe import architectures, data_loading, inference, metrics, preprocess  # noqa: E402
from mslpipe.io import read_json, write_json  # noqa: E402
from mslpipe.train_parts import recalibrate_batchnorm  # noqa: E402
from results import fold_arguments, real_data_work, seed_dirs, table, trained_fold, write_section  # noqa: E402

STORED = {"bn_recalibration_batches": 0}
ARMS = ("stored", "precise", "adapted")
PRECISE_BATCHES = 50


def adapt_to_scan(model, image: np.ndarray, divisor: int, batch_size: int, context: int):
    """A copy of ``model`` whose BatchNorm statistics are the plain average over the scan's own slices (train mode,
    no gradient, the inference's batches and padding), in eval mode."""
    adapted = copy.deepcopy(model)
    layout = architectures.memory_format(adapted, "cpu")
    padded, _ = preprocess.pad_to_multiple(image, divisor)
    volume = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))
    batches = ({"image": preprocess.with_context(volume, np.arange(s, min(s + batch_size, len(padded))), context)}
               for s in range(0, len(padded), batch_size))
    recalibrate_batchnorm(adapted, batches, "cpu", layout)
    return adapted.eval()


def fold_scores(dirs, fold_dir: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """{arm: {case: (Dice, lesion F1)}} of one fold's final weights on its validation scans, cached in the fold."""
    cache = fold_dir / "bn_adaptation.json"
    if cache.exists():
        return {arm: {c: tuple(v) for c, v in cases.items()} for arm, cases in read_json(cache).items()}
    run = read_json(fold_dir / "run.json")
    predictor = inference.load_predictor([fold_dir / "checkpoint_final.pt"], device="cpu")
    plan, pre = predictor.plan, dirs.preprocessed_dir("real")
    stored = predictor.models[0]
    precise = as_train_recalibrates(copy.deepcopy(stored), pre, run["train"], plan, PRECISE_BATCHES)
    out = {arm: {} for arm in ARMS}
    for case in run["val"]:
        image, seg, _ = data_loading.load_case_arrays(pre, case)
        ref = seg >= 0.5
        models = {"stored": stored, "precise": precise,
                  "adapted": adapt_to_scan(stored, image, predictor.divisor, plan.inference_batch_size,
                                           plan.context_slices)}
        for arm, model in models.items():
            prob = inference.predict_volume([model], image, divisor=predictor.divisor, device="cpu",
                                            batch_size=plan.inference_batch_size, context=plan.context_slices)
            pred = prob >= 0.5
            out[arm][case] = (float(metrics.dice(pred, ref)), float(metrics.lesion_f1(pred, ref)))
        print(f"{fold_dir}: {case} " + ", ".join(f"{a} {d:.3f}/{f:.3f}" for a, (d, f) in
                                                 ((a, out[a][case]) for a in ARMS)), flush=True)
    write_json(cache, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-bn-adaptation-")
    groups = work / "sources.json"
    if not groups.exists():
        write_json(groups, SOURCES)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, pooled, ahead, behind = [], {arm: [] for arm in ARMS}, 0, 0
    for seed in seeds:
        dirs = seed_dirs(work, seed)
        for fold in (0, 1):
            fold_dir = trained_fold(dirs, seed, fold, args.epochs, args.iterations, STORED, groups)
            scores = fold_scores(dirs, fold_dir)
            for case in sorted(scores["stored"]):
                got = {arm: scores[arm][case] for arm in ARMS}
                for arm in ARMS:
                    pooled[arm].append(got[arm])
                change = got["adapted"][0] - got["precise"][0]
                ahead, behind = ahead + (change > 0), behind + (change < 0)
                rows.append([case, SOURCES[case.split("_")[0]], seed,
                             *(f"{got[a][0]:.3f} / {got[a][1]:.3f}" for a in ARMS), f"{change:+.3f}"])
    mean = {arm: np.mean(v, axis=0) for arm, v in pooled.items()}
    plan = read_json(seed_dirs(work, seeds[0]).plan_dir("real") / "plans.json")
    body = (f"Folds by source (`plan --groups`: {json.dumps(SOURCES)}): each fold trained on one source's subjects "
            "and scored on the other's scans (the scored scan's source is named). CPU plan (leaky_unet "
            f"{plan['arch_kwargs']}, batch {plan['batch_size']}, {2 * plan['context_slices'] + 1} input slices, "
            f"{plan['normalization']['scheme']}, N4), {args.epochs} epochs × {args.iterations} iterations per fold, "
            f"plan seeds {args.seeds}, trained with `bn_recalibration_batches` 0. The same final weights three ways: "
            "`stored`, the BatchNorm running averages training kept; `precise`, the statistics estimated again on "
            f"{PRECISE_BATCHES} batches of the run's loader continued (train's default); `adapted`, the statistics "
            "of the scored scan's own slices (test-time adaptation; see `bench/bn_adaptation.py`). One pass, "
            "threshold 0.5, no postprocessing, on the preprocessed grid. Cells: volume Dice / lesion F1 against the "
            "expert mask.\n\n"
            + table(["scan", "scored scan's source", "seed", *ARMS, "Dice change, adapted − precise"], rows)
            + f"\n\nPooled over {len(rows)} scan runs, volume Dice / lesion F1: "
            + "; ".join(f"{arm} {d:.3f} / {f:.3f}" for arm, (d, f) in mean.items())
            + f". Adapted ahead of precise in Dice on {ahead} of {len(rows)}, behind on {behind}.")
    print(body)
    write_section("bn_adaptation", "BatchNorm statistics of each scan itself, on a source not seen in training "
                  "(CPU plan, real data)", body)


if __name__ == "__main__":
    main()
