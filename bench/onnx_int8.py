"""int8 against fp32 ONNX models on the CPU (`mslpipe export --precision int8`): accuracy on real scans and speed.

Trains each fold of ../shared/data/real-ms-isbi (4 leave-one-subject-out folds, CPU plan) once, exports it twice
through `mslpipe export -d real --fold K` (fp32, and int8 calibrated on the fold's own training scans), and
segments the fold's validation scans with both through ONNX Runtime (`predict --onnx`'s code, on the preprocessed
scans, no postprocessing). Cells: volume Dice and lesion F1 against the expert mask, and the Dice between the two
models' masks. Speed: fold 0's two models on one whole real scan (`predict --onnx`'s per-volume compute:
preprocessing, network, mapping back, postprocessing; no file I/O), and the network alone on that scan's slices,
alternating the two models run by run, median of ``--repeats`` after a warm-up. Writes its section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_cpu_speed import _ort_version, timed_pair  # noqa: E402

from mslpipe import data_loading, export, metrics, onnx_inference, preprocess  # noqa: E402
from mslpipe.io import load_image, read_json  # noqa: E402
from results import (  # noqa: E402
    fold_arguments,
    real_data_path,
    real_data_work,
    table,
    trained_folds,
    write_section,
)

REAL = real_data_path()
PRECISIONS = ("fp32", "int8")


def score(models: dict[str, onnx_inference.OnnxPredictor], pre_dir: Path, cases: list[str]) -> dict[str, dict]:
    """{case: {"fp32": (Dice, lesion F1), "int8": (...), "agreement": Dice of the two masks}}."""
    out = {}
    for case in cases:
        image, seg, _ = data_loading.load_case_arrays(pre_dir, case)
        masks = {}
        for name, m in models.items():
            prob = onnx_inference.predict_volume(m.session, m.input_name, image, divisor=m.divisor,
                                                 batch_size=m.plan.inference_batch_size, context=m.plan.context_slices)
            masks[name] = prob >= 0.5
        out[case] = {name: (float(metrics.dice(mask, seg >= 0.5)), float(metrics.lesion_f1(mask, seg >= 0.5)))
                     for name, mask in masks.items()}
        out[case]["agreement"] = float(metrics.dice(masks["int8"], masks["fp32"]))
    return out


def pair(scores: tuple[float, float]) -> str:
    return f"{scores[0]:.3f} / {scores[1]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-int8-")
    rows, per_case, speed_models = [], [], None
    pooled: dict[str, list] = {"fp32": [], "int8": [], "agreement": []}
    for seed, fold, dirs, fold_dir in trained_folds(args, work):
        models, metas = {}, {}
        for name in PRECISIONS:
            out = work / f"seed{seed}" / "onnx" / f"fold{fold}_{name}.onnx"
            t0 = time.perf_counter()
            metas[name] = export.run(out, dirs=dirs, dataset="real", fold=fold, precision=name)
            metas[name]["seconds"] = time.perf_counter() - t0
            metas[name]["megabytes"] = out.stat().st_size / 1e6
            models[name] = onnx_inference.load_onnx_predictor(out)
        run = read_json(fold_dir / "run.json")
        scores = score(models, dirs.preprocessed_dir("real"), run["val"])
        for case, s in scores.items():
            for key in pooled:
                pooled[key].append(s[key])
            per_case.append([fold, case, pair(s["fp32"]), pair(s["int8"]), f"{s['agreement']:.3f}"])
        mean = {k: np.mean([s[k] for s in scores.values()], axis=0) for k in pooled}
        check = metas["int8"]["quantization"]["check"]
        rows.append([fold, ", ".join(run["val"]), pair(mean["fp32"]), pair(mean["int8"]), f"{mean['agreement']:.3f}",
                     f"{check['mask_dice']:.3f}" if check["mask_dice"] is not None else "—",
                     f"{metas['int8']['seconds']:.0f}"])
        if speed_models is None:
            speed_models, speed_metas = models, metas
        net = read_json(fold_dir / "plan.json")["arch_kwargs"]
    scan = REAL / "training" / "training01" / "preprocessed" / "training01_01_flair_pp.nii.gz"
    data, affine = load_image(scan)
    m0 = speed_models["fp32"]
    image = preprocess.preprocess_volume([data], affine, m0.plan)[0]

    def network(m):
        return lambda: onnx_inference.predict_volume(m.session, m.input_name, image, divisor=m.divisor,
                                                     batch_size=m.plan.inference_batch_size,
                                                     context=m.plan.context_slices, return_logits=True)

    t_net = timed_pair({n: network(m) for n, m in speed_models.items()}, args.repeats)
    t_case = timed_pair({n: (lambda m=m: m.predict_case([data], affine)) for n, m in speed_models.items()},
                        args.repeats)
    speed_rows = [[name, f"{speed_metas[name]['megabytes']:.2f}", round(t_case[name], 2), round(t_net[name], 2),
                   round(image.shape[0] / t_net[name], 1), round(t_case["fp32"] / t_case[name], 2),
                   round(t_net["fp32"] / t_net[name], 2)] for name in PRECISIONS]
    pool = {k: np.mean(v, axis=0) for k, v in pooled.items()}
    body = (f"CPU plan (leaky_unet {net}), {args.epochs} epochs × {args.iterations} iterations per fold, plan seed "
            f"{args.seed}; folds by subject (leave one subject out). Each fold exported by `mslpipe export -d real "
            "--fold K` as fp32 and as `--precision int8` (calibrated on the fold's own training scans; first and "
            "last convolution in float). Cells: volume Dice / lesion F1 against the expert mask on the validation "
            "scans, no postprocessing, through ONNX Runtime; `int8 vs fp32`: Dice between the two models' masks; "
            "`export check`: the same agreement as measured by the export on its calibration scans' other slices "
            "(see `bench/onnx_int8.py`).\n\n"
            + table(["fold", "validation scans", "fp32", "int8", "int8 vs fp32 (validation)",
                     "export check (training scans)", "int8 export s"], rows)
            + f"\n\nPooled over {len(pooled['fp32'])} scans: fp32 {pair(pool['fp32'])}, int8 {pair(pool['int8'])}, "
            f"masks agree at Dice {pool['agreement']:.3f}.\n\n"
            + table(["fold", "scan", "fp32", "int8", "int8 vs fp32"], per_case)
            + f"\n\nSpeed: fold {args.folds.split(',')[0]}'s models on {scan.name} {data.shape} ({image.shape[0]} "
            f"slices of {image.shape[2]}×{image.shape[3]} after the brain crop), ONNX Runtime "
            f"{_ort_version()} CPUExecutionProvider with its default threads, batches of "
            f"{m0.plan.inference_batch_size}. Median of {args.repeats} after one warm-up.\n\n"
            + table(["model", "file MB", "s/volume (whole compute)", "network s/volume", "network slices/s",
                     "speed-up (whole)", "speed-up (network)"], speed_rows))
    print(body)
    write_section("onnx_int8", "CPU inference: int8 against fp32 ONNX models (real data)", body)


if __name__ == "__main__":
    main()
