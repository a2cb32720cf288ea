"""CPU inference speed: ONNX Runtime (`predict --onnx`) against torch, seconds per volume.

One MNI-size FLAIR volume (../shared/data/real-ms-isbi/training/training01/preprocessed/
training01_01_flair_pp.nii.gz if present, else a synthetic 182×218×182 one), the CPU plan's network
(leaky_unet, base_channels=16, max_channels=256) with random weights: only speed is measured, plus the
agreement of the two paths on this volume. Both paths run mslpipe's whole per-volume compute
(preprocess, every slice through the network in batches of 16, map back, postprocess; no file I/O);
the network alone is timed too. Median of 3 after one warm-up. Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe import architectures, checkpoints, export, inference, onnx_inference, preprocess  # noqa: E402
from mslpipe.io import load_image  # noqa: E402
from mslpipe.plans import Plan  # noqa: E402
from results import real_data_path, table, write_section  # noqa: E402

ARCH, KWARGS = "leaky_unet", {"base_channels": 16, "max_channels": 256}
BATCH = 16


def a_volume() -> tuple[np.ndarray, np.ndarray, str]:
    scan = real_data_path() / "training" / "training01" / "preprocessed" / "training01_01_flair_pp.nii.gz"
    if scan.exists():
        data, affine = load_image(scan)
        return data, affine, f"real scan {scan.name} {data.shape}"
    from mslpipe.synth import make_dataset

    path = make_dataset(Path(tempfile.mkdtemp()), subjects=1, timepoints=1, shape=(182, 218, 182), seed=0)[0]
    data, affine = load_image(path)
    return data, affine, f"synthetic scan {data.shape}"


def timed_pair(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function; the functions alternate, so that both share any outside load."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--note", default="", help="a sentence added to the section (e.g. other load on the machine)")
    args = ap.parse_args()
    torch.manual_seed(0)
    data, affine, what = a_volume()
    plan = Plan(dataset="bench", architecture=ARCH, arch_kwargs=KWARGS, target_device="cpu",
                inference_batch_size=BATCH).finalised()
    model = architectures.build(ARCH, **KWARGS).eval()
    with tempfile.TemporaryDirectory() as tmp:
        payload = {"model": model.state_dict(), "meta": {"plan": plan.to_dict()}}
        ckpt = checkpoints.save(Path(tmp) / "random.pt", payload)
        t0 = time.perf_counter()
        meta = export.export_onnx(ckpt, Path(tmp) / "model.onnx")
        t_export = time.perf_counter() - t0
        onnx_predictor = onnx_inference.load_onnx_predictor(Path(tmp) / "model.onnx", threads=torch.get_num_threads())
        torch_predictor = inference.load_predictor([ckpt], device="cpu")

    image, _, _ = preprocess.preprocess_volume([data], affine, plan)
    divisor = torch_predictor.divisor
    n, (h, w) = image.shape[0], image.shape[2:]
    rows = []

    def torch_net():
        return inference.predict_volume(torch_predictor.models, image, divisor=divisor, device="cpu",
                                        batch_size=BATCH, return_logits=True)

    def onnx_net():
        return onnx_inference.predict_volume(onnx_predictor.session, onnx_predictor.input_name, image,
                                             divisor=divisor, batch_size=BATCH, return_logits=True)

    t_net = timed_pair({"torch": torch_net, "onnx": onnx_net}, args.repeats)
    t_case = timed_pair({"torch": lambda: inference.predict_case(torch_predictor, [data], affine),
                         "onnx": lambda: onnx_inference.predict_case(onnx_predictor, [data], affine)}, args.repeats)
    logit_diff = float(np.max(np.abs(torch_net() - onnx_net())))
    m_torch, p_torch = inference.predict_case(torch_predictor, [data], affine)
    m_onnx, p_onnx = onnx_inference.predict_case(onnx_predictor, [data], affine)
    threads = (f"{torch.get_num_threads()} intra-op threads for both (torch; ONNX Runtime CPUExecutionProvider), "
               f"{os.cpu_count()} cores visible")
    layout = "channels_last" if architectures.memory_format(torch_predictor.models[0], "cpu") == torch.channels_last \
        else "contiguous"
    for name, label in (("torch", f"torch {torch.__version__} fp32 eager, {layout}"),
                        ("onnx", f"ONNX Runtime {_ort_version()} ({meta['exporter']} exporter, "
                                 f"opset {meta['opset']})")):
        rows.append([label, round(t_case[name], 3), round(t_net[name], 3), round(n / t_net[name], 1),
                     round(t_case["torch"] / t_case[name], 2)])
    headers = ["path", "s/volume (whole compute)", "network only s/volume", "network slices/s",
               "speed-up vs torch (whole)"]
    body = (f"Input: {what}; {n} slices of {h}×{w} after mslpipe's brain crop (padded to a multiple of "
            f"{divisor}), batches of {BATCH}. Network: {ARCH} {KWARGS} (the CPU plan's width), random weights. "
            f"{threads}. Median of {args.repeats} after one warm-up. Export took {t_export:.1f} s. "
            f"Agreement on this volume: largest |logit difference| {logit_diff:.2g}, largest |probability "
            f"difference| {float(np.max(np.abs(p_torch - p_onnx))):.2g}, masks (random weights: "
            f"{100 * float(m_torch.mean()):.1f}% of voxels foreground) differ in {int((m_torch != m_onnx).sum())} of "
            f"{m_torch.size} voxels. Timings alternate torch and ONNX Runtime run by run. {args.note}\n\n"
            + table(headers, rows))
    print(body)
    write_section("onnx_cpu_speed", "CPU inference: ONNX Runtime vs torch", body)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
