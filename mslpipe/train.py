"""`mslpipe train`: one fold of the plan's network, with checkpoints, resume, logs and curves.

Everything the run needs comes from the plan (plus command-line overrides, recorded in the
fold folder). Validation scores whole volumes through :mod:`mslpipe.inference`, the same code
`predict` uses. Under ``torchrun`` the same function trains with DistributedDataParallel.
"""

from __future__ import annotations

import csv
import io as _io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mslpipe import architectures, checkpoints, data_loading, inference, metrics
from mslpipe.budget import EpochBudget
from mslpipe.errors import MslpipeError
from mslpipe.io import atomic_path, atomic_write_text, read_json, save_nifti, write_json
from mslpipe.plans import Plan, Workdirs, apply_overrides, load_plan
from mslpipe.preprocess import restore

log = logging.getLogger(__name__)

LOG_FIELDS = ["epoch", "train_loss", "val_loss", "val_dice", "val_dice_per_case", "lr", "seconds"]


@dataclass
class FoldData:
    train: list[str]
    val: list[str]


def fold_cases(splits: dict, fingerprint: dict, fold: int | str) -> FoldData:
    from mslpipe.plan import cases_of

    if fold == "final":
        view = splits["split_811"]
        return FoldData(cases_of(view["train"] + view["val"], fingerprint), [])
    k = int(fold)
    if not 0 <= k < len(splits["folds"]):
        raise MslpipeError(f"fold {k} does not exist: the splits have folds 0..{len(splits['folds']) - 1}")
    f = splits["folds"][k]
    return FoldData(cases_of(f["train"], fingerprint), cases_of(f["val"], fingerprint))


def make_loss():
    from monai.losses import DiceCELoss

    # BCE (with logits: the sigmoid lives in the loss) + soft Dice over the whole batch.
    return DiceCELoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)


def make_optimizer(model, plan: Plan):
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
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(
        os.environ.get("LOCAL_RANK", 0))


def _init_dist(device: str):
    import torch.distributed as dist

    rank, world, local = dist_info()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            import torch

            torch.cuda.set_device(local)
    return rank, world


# ---------------------------------------------------------------------------- logs
def _write_log(path: Path, rows: list[dict]) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def plot_curve(rows: list[dict], path: Path) -> None:
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


# ---------------------------------------------------------------------------- validation
def validate(model, cases: list[str], pre_dir: Path, plan: Plan, device: str, divisor: int,
             loss_fn) -> tuple[float, dict[str, float]]:
    import torch

    losses, dices = [], {}
    model.eval()
    for case in cases:
        image, seg, _ = data_loading.load_case_arrays(pre_dir, case)
        logits = inference.predict_volume([model], image, divisor=divisor, device=device,
                                          batch_size=plan.inference_batch_size, return_logits=True,
                                          context=plan.context_slices)
        with torch.no_grad():
            losses.append(float(loss_fn(torch.from_numpy(logits)[:, None], torch.from_numpy(seg)[:, None])))
        pred = logits > 0
        dices[case] = float(metrics.dice(pred, seg >= 0.5))
    return (float(np.mean(losses)) if losses else float("nan")), dices


def export_validation(model, cases: list[str], pre_dir: Path, plan: Plan, device: str, divisor: int,
                      out_dir: Path) -> None:
    """Out-of-fold predictions on the scans' own grids (no postprocessing), for `evaluate`."""
    for case in cases:
        image, _, props = data_loading.load_case_arrays(pre_dir, case)
        prob = inference.predict_volume([model], image, divisor=divisor, device=device,
                                        batch_size=plan.inference_batch_size, context=plan.context_slices)
        mask = restore((prob >= plan.postprocessing.get("threshold", 0.5)).astype(np.uint8), props)
        save_nifti(out_dir / f"{case}.nii.gz", mask, np.asarray(props["affine"]))


# ---------------------------------------------------------------------------- the run
def run(name: str, dirs: Workdirs, fold: int | str, *, arch: str | None = None, epochs: int | None = None,
        lr: float | None = None, batch_size: int | None = None, iterations: int | None = None,
        device: str = "auto", compile: bool = False, resume: bool = False, num_workers: int | None = None,
        ema_half_life: float | None = None, minutes: float | None = None, show_progress: bool = True
        ) -> dict[str, Any]:
    """``minutes``: whole epochs while the next one fits into this wall-clock budget (:mod:`mslpipe.budget`),
    with ``epochs`` as a cap (1000 unless given)."""
    import torch

    plan_dir = dirs.plan_dir(name)
    base = load_plan(plan_dir / "plans.json")
    splits, fingerprint = read_json(plan_dir / "splits.json"), read_json(plan_dir / "fingerprint.json")
    device = inference.pick_device(device)
    optimizer = dict(base.optimizer, lr=lr) if lr is not None else None
    arch_kwargs = {} if arch is not None and arch != base.architecture else None
    if minutes is not None and not minutes > 0:
        raise MslpipeError(f"--minutes must be positive, not {minutes:g}")
    if minutes is not None and epochs is not None and epochs < 1:
        raise MslpipeError(f"--epochs (with --minutes, the most epochs to run) must be at least 1, not {epochs}")
    budget = EpochBudget(minutes * 60, cap=epochs or 1000) if minutes is not None else None
    plan = apply_overrides(base, {"architecture": arch, "arch_kwargs": arch_kwargs,
                                  "epochs": None if budget else epochs,
                                  "batch_size": batch_size, "iterations_per_epoch": iterations,
                                  "optimizer": optimizer, "num_workers": num_workers,
                                  "ema_half_life": ema_half_life})
    if budget is not None and plan.ema_half_life:
        raise MslpipeError("--minutes leaves the run's length open, and the weights' moving average needs it (its "
                           "half-life is a fraction of the run): train --epochs N with --ema-half-life, or "
                           "--minutes with --ema-half-life 0")
    divisor = architectures.required_divisor(plan.architecture, **plan.arch_kwargs)
    if any(p % divisor for p in plan.patch_size):  # another architecture may need a coarser grid
        plan = apply_overrides(plan, {"patch_size": [-(-p // divisor) * divisor for p in plan.patch_size]})
    data = fold_cases(splits, fingerprint, fold)
    pre_dir = dirs.preprocessed_dir(name)
    out = dirs.fold_dir(name, plan.architecture, fold)
    rank, world = _init_dist(device)
    is_main = rank == 0
    latest, previous = out / "checkpoint_latest.pt", out / "checkpoint_previous.pt"
    if is_main:
        if not resume and latest.exists():
            raise MslpipeError("a run exists here already: add --continue to resume it, or delete the folder",
                               out)
        write_json(out / "plan.json", plan.to_dict())
        write_json(out / "run.json", {"fold": fold, "train": data.train, "val": data.val, "device": device,
                                      "world_size": world, "compile": compile, "minutes": minutes,
                                      "epoch_cap": budget.cap if budget else None})

    torch.manual_seed(plan.seed + rank)
    np.random.seed(plan.seed + rank)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    model = architectures.build(plan.architecture, in_channels=plan.input_channels, **plan.arch_kwargs)
    init_output_prior(model, plan.output_prior)
    model = inference.prepare_model(model, device)
    layout = architectures.memory_format(model, device)
    opt = make_optimizer(model, plan)
    ema = make_ema(model, plan)
    scored = ema.module if ema is not None else model  # what validation scores and the final checkpoint holds
    loss_fn = make_loss()
    start_epoch, best, rows = 0, -1.0, []
    if resume:
        payload = _load_resume(latest, previous)
        if payload is not None:
            model.load_state_dict(payload["model"])
            opt.load_state_dict(payload["optimizer"])
            if ema is not None:
                if "ema" not in payload:
                    raise MslpipeError("this run's checkpoint has no weight average (ema_half_life was 0): "
                                       "resume it with --ema-half-life 0", latest)
                ema.load_state_dict(payload["ema"])
            start_epoch, best = payload["meta"]["epoch"] + 1, payload["meta"]["best_dice"]
            if budget is not None and payload["meta"].get("budget"):  # the minutes already spent count
                budget.spent = float(payload["meta"]["budget"]["spent"])
                budget.epoch_s = [float(x) for x in payload["meta"]["budget"]["epoch_s"]]
            checkpoints.set_rng_state(payload["rng"])
            rows = [r for r in _read_log(out / "log.csv") if int(r["epoch"]) < start_epoch]
            log.info("resuming %s at epoch %d", out, start_epoch)
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()]
                                              if device == "cuda" else None)
    step = make_step(model, torch.compile(train_model) if compile else train_model, opt, loss_fn, device, ema)

    # One loader for the whole run: its workers stay alive across epochs, and each epoch's batches
    # follow from (seed, epoch), so a resumed run draws exactly what the uninterrupted one would.
    loader = data_loading.make_train_loader(pre_dir, data.train, plan, batches=plan.iterations_per_epoch,
                                            seed=plan.seed + rank, device_hint=device, start_epoch=start_epoch)
    meta = {"plan": plan.to_dict(), "fold": str(fold), "dataset": name}
    progress = _progress(show_progress and is_main)
    total = budget.total(start_epoch) if budget else plan.epochs  # the run's epochs: fixed, or what fits
    epoch, mark = start_epoch, time.perf_counter()
    with progress:
        task = progress.add_task(f"fold {fold}", total=None if budget else (total - start_epoch)
                                 * plan.iterations_per_epoch)
        while epoch < total:
            t0 = time.perf_counter()
            lr_now = poly_lr(plan, epoch, total)
            for g in opt.param_groups:
                g["lr"] = lr_now
            train_model.train()
            losses = []
            for batch in loader:
                losses.append(step(*batch_to_device(batch, device, layout)))
                progress.advance(task)
            train_loss = float(torch.stack(losses).mean())
            if is_main:
                val_loss, dices = validate(scored, data.val, pre_dir, plan, device, divisor, loss_fn)
                val_dice = float(np.mean(list(dices.values()))) if dices else float("nan")
                rows.append({"epoch": epoch, "train_loss": f"{train_loss:.5f}", "val_loss": f"{val_loss:.5f}",
                             "val_dice": f"{val_dice:.5f}",
                             "val_dice_per_case": " ".join(f"{c}={d:.4f}" for c, d in dices.items()),
                             "lr": f"{lr_now:.6g}", "seconds": f"{time.perf_counter() - t0:.2f}"})
                _write_log(out / "log.csv", rows)
                plot_curve(rows, out / "curve.png")
            if budget is not None:  # an epoch runs from the last one's end; rank 0's clock decides for all ranks
                now = time.perf_counter()
                budget.add(_from_rank0(now - mark, device, world))
                mark, total = now, budget.total(epoch + 1)
            if is_main:
                # under a budget the bar's length is the epochs expected to fit, re-estimated after each one
                progress.update(task, description=f"fold {fold} ep {epoch + 1}/{total} "
                                                  f"loss {train_loss:.3f} val Dice {val_dice:.3f}",
                                total=(total - start_epoch) * plan.iterations_per_epoch)
                improved = bool(dices) and val_dice > best
                best = max(best, val_dice) if dices else best
                state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": checkpoints.rng_state(),
                         "meta": {**meta, "epoch": epoch, "best_dice": best,
                                  **({"budget": budget.state()} if budget else {})}}
                if ema is not None:
                    state["ema"] = ema.state_dict()
                if improved:
                    checkpoints.save(out / "checkpoint_best.pt", dict(state, model=scored.state_dict()))
                if latest.exists():
                    os.replace(latest, previous)
                checkpoints.save(latest, state)
            epoch += 1
    if is_main:
        scored.eval()
        checkpoints.save(out / "checkpoint_final.pt", {"model": scored.state_dict(),
                                                       "meta": {**meta, "epoch": epoch - 1}})
        if data.val:
            export_validation(scored, data.val, pre_dir, plan, device, divisor, out / "validation")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    final = rows[-1] if rows else {}
    return {"fold_dir": out, "epochs": epoch, "val_dice": final.get("val_dice"), "rows": rows, "rank": rank}


def _from_rank0(value: float, device: str, world: int) -> float:
    """Rank 0's ``value`` on every rank (as is without DDP)."""
    if world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device="cuda" if device == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return float(t.item())


def _load_resume(latest: Path, previous: Path) -> dict | None:
    for path in (latest, previous):
        if not path.exists():
            continue
        try:
            return checkpoints.load(path)
        except MslpipeError as exc:
            log.warning("%s; falling back to the previous checkpoint", exc)
    if latest.exists() or previous.exists():
        raise MslpipeError("no readable checkpoint to resume from", latest.parent)
    log.warning("nothing to resume in %s: starting from epoch 0", latest.parent)
    return None


def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)
