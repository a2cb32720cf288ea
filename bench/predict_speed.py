"""Inference speed: mslpipe's predict path against a bare forward of the same network.

Measures, on the current device, for one whole MNI-size FLAIR volume (a real scan from
../shared/data/real-ms-isbi if present, the first or ``--scan``, else a synthetic one of the same size):
- the bare network forward over all slices (on CUDA: bf16 + channels_last + torch.compile);
- mslpipe's compute per volume (preprocess, with the default N4 since 2026-11-28, + network + map back +
  postprocess, no file I/O), and the same with N4 off (N4's time depends on the scan: it stops early where it
  finds no field);
- end-to-end folder throughput (read NIfTI, predict, write NIfTI) over several copies.
Weights are random: only speed is measured. Timing: warm-up, synchronise, median of repeats.
Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe import architectures, datasets, inference, predict, preprocess, train  # noqa: E402
from mslpipe.io import load_image, save_nifti  # noqa: E402
from mslpipe.plan import DEFAULT_CONTEXT_SLICES, DEFAULT_N4_LEVELS  # noqa: E402
from mslpipe.plans import Plan  # noqa: E402
from results import real_data_path, table, write_section  # noqa: E402

REAL = real_data_path()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def a_volume(scan: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    scans = sorted(REAL.glob(f"training/*/preprocessed/{scan or '*'}_flair_pp.nii*"))
    if scan and not scans:
        sys.exit(f"no real scan {scan}_flair_pp.nii[.gz] under {REAL}/training")
    if scans:
        data, affine = load_image(scans[0])
        return data, affine, f"real scan {scans[0].name} {data.shape}"
    from mslpipe.synth import make_dataset

    tmp = Path(tempfile.mkdtemp())
    path = make_dataset(tmp, subjects=1, timepoints=1, shape=(182, 218, 182), seed=0)[0]
    data, affine = load_image(path)
    return data, affine, f"synthetic scan {data.shape}"


def bare_forward(model, x: torch.Tensor, device: str, batch: int, compile: bool):
    net = torch.compile(model) if compile else model

    def run():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            for s in range(0, x.shape[0], batch):
                net(x[s:s + batch])
    return run


def measure(arch: str, kwargs: dict, device: str, data, affine, args) -> list:
    plan = Plan(dataset="bench", architecture=arch, arch_kwargs=kwargs, context_slices=DEFAULT_CONTEXT_SLICES,
                inference_batch_size=args.batch if device == "cuda" else 16)
    plan.normalization = {**plan.normalization, "n4_levels": DEFAULT_N4_LEVELS}  # as `plan` writes it
    net = architectures.build(arch, in_channels=plan.input_channels, **kwargs)
    train.init_output_prior(net, plan.output_prior)  # as training starts: sparse masks, not coin flips
    model = inference.prepare_model(net, device).eval()
    divisor = architectures.required_divisor(arch, **kwargs)
    image, _, _ = preprocess.preprocess_volume([data], affine, plan)
    padded, _ = preprocess.pad_to_multiple(image, divisor)
    padded = preprocess.with_context(padded, np.arange(padded.shape[0]), plan.context_slices)  # what predict feeds
    x = torch.from_numpy(padded).to(device).contiguous(memory_format=architectures.memory_format(model, device))
    n = image.shape[0]
    compile = device == "cuda"
    t_bare = timed(bare_forward(model, x, device, plan.inference_batch_size, compile), device, args.repeats,
                   warmup=3 if compile else 1)
    run_model = torch.compile(model) if compile else model
    predictor = inference.Predictor([run_model], plan, device, divisor, [])
    t_case = timed(lambda: inference.predict_case(predictor, [data], affine), device, args.repeats,
                   warmup=2 if compile else 1)
    no_n4 = dataclasses.replace(plan, normalization={**plan.normalization, "n4_levels": 0})
    predictor_no_n4 = inference.Predictor([run_model], no_n4, device, divisor, [])
    t_case_no_n4 = timed(lambda: inference.predict_case(predictor_no_n4, [data], affine), device, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        for i in range(args.volumes):
            save_nifti(src / f"scan{i:02d}.nii.gz", data, affine, dtype=np.float32)
        sources = datasets.gather_sources(src)
        t0 = time.perf_counter()
        predict.predict_sources(predictor, sources, Path(tmp) / "out", overwrite=True)
        sync(device)
        t_folder = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters()) / 1e6
    slices = f"{n} × {padded.shape[2]}×{padded.shape[3]}, {plan.input_channels} input slice(s)"
    return [f"{arch} {kwargs or '(full width)'}", f"{params:.2f} M", slices,
            round(t_bare, 4), round(n / t_bare, 1), round(t_case, 4), round(t_case_no_n4, 4),
            round(t_case / t_bare, 2), round(args.volumes / t_folder, 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--volumes", type=int, default=8, help="copies in the end-to-end folder run")
    ap.add_argument("--batch", type=int, default=256, help="slices per batch on CUDA")
    ap.add_argument("--full-width-cpu", action="store_true", help="also time the full-width network on CPU")
    ap.add_argument("--scan", default=None, help="real scan to time, e.g. training04_01 [the first]")
    args = ap.parse_args()
    device = inference.pick_device(args.device)
    torch.manual_seed(0)
    data, affine, what = a_volume(args.scan)
    configs = [("leaky_unet", {})] if device == "cuda" else [("leaky_unet", {"base_channels": 16, "max_channels": 256})]
    if device == "cpu" and args.full_width_cpu:
        configs.append(("leaky_unet", {}))
    configs.append(("nnunet2d", {}))
    if device == "cpu":
        args.repeats, args.volumes = min(args.repeats, 3), min(args.volumes, 3)
    headers = ["network", "params", "slices per volume", "bare forward s/volume", "bare slices/s",
               "mslpipe compute s/volume", "same, N4 off", "compute / bare",
               "end-to-end volumes/s (read+predict+write)"]
    baseline = ("bf16 + channels_last + torch.compile" if device == "cuda"
                else "fp32 eager, the network's CPU layout, batch 16")
    rows = []
    for a, k in configs:  # the section is rewritten after each network: a run cut short keeps what it measured
        rows.append(measure(a, k, device, data, affine, args))
        body = (f"Input: {what}, brain-cropped by mslpipe's preprocessing. Bare forward: {baseline}, the same "
                f"tensors. Median of {args.repeats} repeats after warm-up; end-to-end over {args.volumes} volumes. "
                f"mslpipe's compute includes the default plan's N4 ({DEFAULT_N4_LEVELS} levels); the column after it "
                "is the same path with N4 off. "
                "Random weights with the output bias at the lesion prior, as training starts (speed only; the "
                "masks come out sparse, as a trained model's do). `nnunet2d` is nnU-Net's 2D network architecture "
                "run through mslpipe's inference path, not nnU-Net's own predictor.\n\n" + table(headers, rows))
        print(body, flush=True)
        write_section(f"predict_speed_{device}", f"Inference speed ({device})", body)


if __name__ == "__main__":
    main()
