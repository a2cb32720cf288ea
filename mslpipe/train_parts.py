"""The parts that `mslpipe train` puts together, none of which needs a dataset (benchmarks time them alone):
loss, optimiser, output prior, weights' moving average, BatchNorm statistics estimated again for the final weights,
optimisation step and learning-rate schedule; the process group under ``torchrun``; a run's epoch log
(``log.csv``) and learning curve (``curve.png``).

From the project it imports only floor-1 modules; torch, MONAI and matplotlib load when used.
"""

from __future__ import annotations

import csv
import io as _io
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mslpipe.errors import MslpipeError
from mslpipe.io import atomic_path, atomic_write_text
from mslpipe.plans import Plan


# ---------------------------------------------------------------------------- optimisation
def make_loss(plan: Plan | None = None):
    """The training loss: binary cross-entropy on logits plus soft Dice, the Dice over the whole batch (the plan's
    ``loss`` "bce_dice", the default) or per slice, then averaged ("bce_dice_per_slice")."""
    from monai.losses import DiceCELoss

    # BCE (with logits: the sigmoid lives in the loss) + soft Dice.
    per_slice = plan is not None and plan.loss == "bce_dice_per_slice"
    return DiceCELoss(sigmoid=True, batch=not per_slice, smooth_nr=1e-5, smooth_dr=1e-5)


def make_optimizer(model, plan: Plan):
    """The plan's optimiser (SGD with Nesterov momentum, or AdamW) over ``model``'s parameters."""
    import torch

    opt = dict(plan.optimizer)
    name = opt.pop("name", "sgd").lower()
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opt.get("lr", 1e-2), momentum=opt.get("momentum", 0.9),
                               nesterov=opt.get("nesterov", True), weight_decay=opt.get("weight_decay", 0))
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=opt.get("lr", 1e-3),
                                 weight_decay=opt.get("weight_decay", 1e-2))
    raise MslpipeError(f"unknown optimizer {name!r} in the plan (sgd or adamw)")


def init_output_prior(model, prior: float) -> None:
    """Set the bias of the last 1-channel convolution to logit(prior)."""
    import torch

    heads = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 1]
    if heads and heads[-1].bias is not None and 0 < prior < 1:
        with torch.no_grad():
            heads[-1].bias.fill_(float(np.log(prior / (1 - prior))))


def batch_to_device(batch: dict, device: str, layout) -> tuple:
    """A loader batch as (image, label) on the device; the image in ``layout`` (a torch.memory_format, the
    network's :func:`architectures.memory_format`)."""
    x = batch["image"].to(device, non_blocking=True)
    y = batch["label"].to(device, non_blocking=True)
    return x.contiguous(memory_format=layout), y


def make_ema(model, plan: Plan):
    """The exponential moving average of ``model``'s weights and BatchNorm statistics that the plan asks for
    (``plan.ema_half_life``, a fraction of the run's iterations), or None. torch's AveragedModel; its first
    update copies the weights."""
    if not plan.ema_half_life:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    half_life_steps = max(plan.ema_half_life * plan.epochs * plan.iterations_per_epoch, 1.0)
    decay = 0.5 ** (1.0 / half_life_steps)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


# A batch of the BatchNorm pass (forward only, no gradient) against a training step, for the time a budget keeps
# free for it, with a margin: on 2 CPU cores 0.16 s (bench/RESULTS.md "BatchNorm statistics estimated again": 8 s for
# 50 batches) against 0.40 s ("Training throughput (cpu)": 14.9 slices/s in batches of 6).
RECALIBRATION_STEP_SHARE = 0.5


def next_batches(loader, n: int) -> Iterator:
    """The first ``n`` batches of ``loader``'s next passes (epochs), over as many passes as it takes."""
    def passes():
        while True:
            yield from loader

    return itertools.islice(passes(), n)


def recalibrate_batchnorm(model, loader, device: str, layout) -> int:
    """Estimate ``model``'s BatchNorm statistics again for its current weights ("precise BN"): its running
    averages reset, then one pass over ``loader``'s training batches in train mode without gradients, each
    layer's statistics the plain average over the batches (torch's ``update_bn``). The running averages kept
    during training mix the statistics of weights that kept changing, and with small batches they are noisy.
    Images go to ``device`` in ``layout`` (see :func:`batch_to_device`), under bf16 autocast on CUDA as in
    training. Returns the batches used (0 when the model has no BatchNorm, which is then left as it is)."""
    import torch
    from torch.optim.swa_utils import update_bn

    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return 0
    used = 0

    def images():
        nonlocal used
        for batch in loader:
            used += 1
            yield batch["image"].to(device, non_blocking=True).contiguous(memory_format=layout)

    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        update_bn(images(), model)
    return used


def make_step(model, step_model, opt, loss_fn, device: str, ema=None):
    """One optimisation step on (x, y), returning the detached loss: ``step_model`` (the model, or its
    DDP or compiled wrapper) forward under bf16 autocast on CUDA, backward, gradients of ``model``
    clipped to norm 12, SGD step, then the weights' moving average ``ema`` (see make_ema) updated."""
    import torch

    def step(x, y):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn(step_model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        return loss.detach()
    return step


def poly_lr(plan: Plan, epoch: int, total: int | None = None) -> float:
    """The plan's learning rate decayed polynomially over ``total`` epochs (the plan's by default)."""
    base = plan.optimizer.get("lr", 1e-2)
    return base * (1 - epoch / (total or plan.epochs)) ** plan.lr_schedule.get("exponent", 0.9)


# ---------------------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(
        os.environ.get("LOCAL_RANK", 0))


def init_dist(device: str) -> tuple[int, int]:
    """(rank, world size) of this process; under torchrun, joins the process group (and picks its GPU)."""
    import torch.distributed as dist

    rank, world, local = dist_info()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            import torch

            torch.cuda.set_device(local)
    return rank, world


def wrap_ddp(model, device: str, world: int):
    """The model wrapped in DistributedDataParallel when there are several processes, else the model."""
    if world > 1:
        import torch
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)
    return model


def from_rank0(value: float, device: str, world: int) -> float:
    """Rank 0's ``value`` on every rank (as is without DDP)."""
    if world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device="cuda" if device == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return float(t.item())


def close_dist(world: int) -> None:
    """Wait for every process, then leave the process group (nothing without DDP)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- log and curve
LOG_FIELDS = ["epoch", "train_loss", "val_loss", "val_dice", "val_dice_per_case", "lr", "seconds"]


def write_log(path: Path, rows: list[dict]) -> None:
    """Write the epoch rows as a CSV file with the LOG_FIELDS columns (atomically)."""
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_log(path: Path) -> list[dict]:
    """The rows of a log written by write_log (values as strings), or [] when there is none."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def plot_curve(rows: list[dict], path: Path) -> None:
    """Training and validation loss, and validation Dice on a second axis, per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(k):
        return [float(r[k]) if r.get(k) not in ("", None) else np.nan for r in rows]

    ep = col("epoch")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ep, col("train_loss"), label="train loss")
    ax.plot(ep, col("val_loss"), label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(ep, col("val_dice"), color="tab:green", label="validation Dice (volume)")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("Dice")
    fig.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
