"""Training throughput: the real data pipeline against the bare model step, same device, same run.

Plans and preprocesses ../shared/data/real-ms-isbi (or a synthetic MNI-size dataset when absent)
into a temporary folder, then times
- the bare step: forward + BCE/Dice loss + backward + SGD on random tensors already on the device;
- the pipeline step: the same, fed by mslpipe's loader (foreground oversampling, MONAI
  augmentation, background workers, pinned memory).
Goal: the pipeline reaches at least 90% of the bare step rate. Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe import architectures, data_loading, inference, plan, train  # noqa: E402
from mslpipe.plans import Workdirs, apply_overrides  # noqa: E402
from results import real_data_path, table, write_section  # noqa: E402

REAL = real_data_path()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="time a torch.compile row after the eager one")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    device = inference.pick_device(args.device)
    iters = args.iterations or (150 if device == "cuda" else 20)
    tmp = Path(tempfile.mkdtemp())
    dirs = Workdirs.resolve(tmp / "raw", tmp / "plans", tmp / "pre", tmp / "results")
    if (REAL / "training").is_dir():
        source, what = REAL, "real-ms-isbi (6 scans)"
    else:
        from mslpipe.synth import make_dataset

        source, what = tmp / "raw" / "bench", "synthetic 182×218×182"
        make_dataset(source, subjects=3, timepoints=1, shape=(182, 218, 182), seed=0)
    planned = plan.run("bench", dirs, input_path=source, device=device, test_fraction=0)
    p = planned["plan"]
    if args.workers is not None:
        p = apply_overrides(p, {"num_workers": args.workers})
    cases = [c["case"] for c in planned["fingerprint"]["cases"]]
    b, (h, w) = p.batch_size, p.patch_size
    workers = data_loading.resolve_num_workers(p.num_workers, p, iters)
    rows = []
    headers = ["network", "batch", "input slices", "loader workers", "compile", "bare step slices/s",
               "pipeline slices/s", "pipeline / bare"]
    for compiled in ([False, True] if args.compile else [False]):  # eager first: the compiled row's baseline
        bare, piped = measure(p, dirs, cases, device, compiled, iters)
        rows.append([f"{p.architecture} {p.arch_kwargs or '(full width)'}", f"{b} × {h}×{w}",
                     p.input_channels, workers, "yes" if compiled else "no", round(bare, 1), round(piped, 1),
                     f"{100 * piped / bare:.0f}%"])
        body = (f"Data: {what}, planned for {device}. Per row: {iters} timed iterations after warm-up ones, a "
                "fresh model and loader; the step is train's (forward, BCE + Dice, backward, gradient clipping, "
                f"SGD); {'bf16 autocast + channels_last' if device == 'cuda' else 'fp32'}. Goal: pipeline ≥ 90% "
                "of bare.\n\n" + table(headers, rows))
        print(body, flush=True)
        write_section(f"train_throughput_{device}", f"Training throughput ({device})", body)  # after each row


def measure(p, dirs: Workdirs, cases: list[str], device: str, compiled: bool, iters: int) -> tuple[float, float]:
    """Slices/s of the bare step on random tensors, then of the same step fed by the training loader."""
    torch.manual_seed(p.seed)
    model = inference.prepare_model(architectures.build(p.architecture, in_channels=p.input_channels,
                                                         **p.arch_kwargs), device).train()
    opt = train.make_optimizer(model, p)
    step = train.make_step(model, torch.compile(model) if compiled else model, opt, train.make_loss(), device)
    b, (h, w) = p.batch_size, p.patch_size
    x = torch.randn(b, p.input_channels, h, w, device=device)
    y = (torch.rand(b, 1, h, w, device=device) > 0.97).float()
    layout = architectures.memory_format(model, device)
    x = x.contiguous(memory_format=layout)
    warm = 5 if compiled else 2
    for _ in range(warm):
        step(x, y)
    inference_sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step(x, y)
    inference_sync(device)
    bare = b * iters / (time.perf_counter() - t0)

    loader = data_loading.make_train_loader(dirs.preprocessed_dir("bench"), cases, p, batches=iters + warm,
                                            seed=1, device_hint=device)
    it = iter(loader)
    for _ in range(warm):
        step(*train.batch_to_device(next(it), device, layout))
    inference_sync(device)
    t0 = time.perf_counter()
    for batch in it:
        step(*train.batch_to_device(batch, device, layout))
    inference_sync(device)
    return bare, b * iters / (time.perf_counter() - t0)


def inference_sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
