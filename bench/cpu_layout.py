"""CPU memory layout: each built-in network of a CPU plan in torch's default layout and in channels_last.

On CUDA mslpipe always runs channels_last (with bf16). On a CPU the better layout depends on the network:
oneDNN's convolutions prefer channels_last, while instance normalisation (nnU-Net's network) can be slower
in it. For every built-in architecture this builds the network a CPU plan would (the planner's own
``make_plan`` on an ISBI-like fingerprint: 1 mm voxels, a 140×172×140 mm brain) with random weights and
times, per layout, the forward pass over a batch of ``CPU_INFERENCE_BATCH`` slices (what ``predict`` runs)
and one training step (BCE, backward, SGD) at the plan's batch size. Median of ``--repeats`` after one
warm-up, the two layouts interleaved; the outputs of the two layouts are compared too. Writes its section of
bench/RESULTS.md; the networks' ``channels_last_on_cpu`` attributes record the choice it supports.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe import architectures  # noqa: E402
from mslpipe.plan import make_plan  # noqa: E402
from mslpipe.plans import CPU_INFERENCE_BATCH  # noqa: E402
from results import table, write_section  # noqa: E402

FINGERPRINT = {"n_raters": 1, "median": {"spacing_canonical": [1.0, 1.0, 1.0], "brain_bbox_mm": [140, 172, 140]},
               "cases": []}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def measure(arch: str, repeats: int) -> dict:
    plan = make_plan(FINGERPRINT, "layout", "cpu", arch=arch)
    torch.manual_seed(0)
    reference = architectures.build(arch, in_channels=plan.input_channels, **plan.arch_kwargs)
    x = torch.randn(CPU_INFERENCE_BATCH, plan.input_channels, *plan.patch_size)
    target = (torch.rand(plan.batch_size, 1, *plan.patch_size) > 0.97).float()
    models, outputs, result = {}, {}, {"plan": plan}
    for name, fmt in LAYOUTS.items():
        model = architectures.build(arch, in_channels=plan.input_channels, **plan.arch_kwargs)
        model.load_state_dict(reference.state_dict())
        models[name] = model.to(memory_format=fmt)
        with torch.inference_mode():
            outputs[name] = models[name].eval()(x.contiguous(memory_format=fmt))
    result["max_abs_diff"] = float((outputs["contiguous"] - outputs["channels_last"]).abs().max())
    loss_fn = torch.nn.BCEWithLogitsLoss()
    runs = {}
    for name, fmt in LAYOUTS.items():
        model, xi = models[name], x.contiguous(memory_format=fmt)
        xb, opt = xi[: plan.batch_size], torch.optim.SGD(model.parameters(), lr=1e-3)

        def forward(model=model, xi=xi):
            with torch.inference_mode():
                model.eval()(xi)

        def step(model=model, xb=xb, opt=opt):
            model.train()
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            out = out[0] if isinstance(out, (list, tuple)) else out
            loss_fn(out, target).backward()
            opt.step()

        runs[name] = {"forward_s": forward, "step_s": step}
        forward(), step()  # warm-up
    times = {name: {key: [] for key in fns} for name, fns in runs.items()}
    for _ in range(repeats):  # the layouts interleaved, so drifts in the machine's speed hit both alike
        for name, fns in runs.items():
            for key, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name][key].append(time.perf_counter() - t0)
    for name in LAYOUTS:
        result[name] = {key: statistics.median(v) for key, v in times[name].items()}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows, notes = [], []
    for arch in ("leaky_unet", "nnunet2d"):
        r = measure(arch, args.repeats)
        plan = r["plan"]
        for name in LAYOUTS:
            rows.append([arch, name, round(r[name]["forward_s"], 3),
                         round(CPU_INFERENCE_BATCH / r[name]["forward_s"], 1), round(r[name]["step_s"], 3)])
        rows.append([f"**{arch}**", "channels_last speed-up",
                     f"{r['contiguous']['forward_s'] / r['channels_last']['forward_s']:.2f}×", "",
                     f"{r['contiguous']['step_s'] / r['channels_last']['step_s']:.2f}×"])
        chosen = getattr(architectures.build(arch, in_channels=plan.input_channels, **plan.arch_kwargs),
                         "channels_last_on_cpu", False)
        notes.append(f"{arch} {plan.arch_kwargs or '(defaults)'}, {plan.input_channels} input channels, patch "
                     f"{'×'.join(map(str, plan.patch_size))}, training batch {plan.batch_size}: outputs of the two "
                     f"layouts differ by at most {r['max_abs_diff']:.1e}; mslpipe runs it "
                     f"{'channels_last' if chosen else 'contiguous'} on a CPU")
        print(rows[-3:], flush=True)
    body = (f"Forward: {CPU_INFERENCE_BATCH} slices (predict's CPU batch), inference mode. Step: one training step "
            f"(forward, BCE, backward, SGD) at the CPU plan's batch size. Median of {args.repeats} after a warm-up, "
            f"random weights, fp32.\n\n" + "; ".join(notes) + ".\n\n"
            + table(["network", "layout", "forward s", "slices/s", "training step s"], rows))
    print(body)
    if not args.no_write:
        write_section("cpu_layout", "CPU memory layout: contiguous against channels_last", body)


if __name__ == "__main__":
    main()
