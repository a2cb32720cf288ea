"""The `mslpipe` command: parses arguments and calls the stages. No logic lives here."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from mslpipe.errors import MslpipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Segment multiple sclerosis lesions on brain FLAIR MRI: "
                       "synth → plan → train → predict → evaluate.")
STATE: dict = {"debug": False}

Name = Annotated[str, typer.Option("-d", "--dataset", help="Dataset name (a folder of raw_data/).")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Arch = Annotated[str | None, typer.Option(help="Registered architecture (`mslpipe archs`); default: the plan's.")]


def _dirs():
    from mslpipe.plans import Workdirs

    return Workdirs.resolve(*STATE["dirs"])


def _echo(text: str) -> None:
    typer.echo(text)


def _version(value: bool) -> None:
    if value:
        from mslpipe import __version__

        _echo(f"mslpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    raw: Annotated[Path | None, typer.Option(envvar="MSLPIPE_RAW",
                                             help="Raw datasets folder (default: ./raw_data).")] = None,
    plans: Annotated[Path | None, typer.Option(envvar="MSLPIPE_PLANS", help="Plans folder (default: ./plans).")] = None,
    preprocessed: Annotated[Path | None, typer.Option(envvar="MSLPIPE_PREPROCESSED",
                                                      help="Preprocessed folder (default: ./preprocessed).")] = None,
    results: Annotated[Path | None, typer.Option(envvar="MSLPIPE_RESULTS",
                                                 help="Results folder (default: ./results).")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="More log output.")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                          help="Print mslpipe's version and exit.")] = False,
) -> None:
    STATE["dirs"] = (raw, plans, preprocessed, results)
    STATE["debug"] = debug
    STATE["fast_exit"] = False
    STATE["start"] = time.perf_counter()  # predict's timing line counts from here (Python and typer loaded)
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (ISBI 2015 layout).")],
    subjects: Annotated[int, typer.Option(help="Subjects (trainingSS).")] = 4,
    timepoints: Annotated[int, typer.Option(help="Scans per subject; later ones add new and growing lesions.")] = 2,
    shape: Annotated[tuple[int, int, int], typer.Option(help="Volume shape X Y Z.")] = (64, 72, 48),
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes the same data.")] = 0,
    raters: Annotated[int, typer.Option(help="Masks per scan, 1 or 2 (mask2 draws some lesion borders a voxel "
                                             "further out or in).")] = 2,
) -> None:
    """Write a synthetic FLAIR dataset with known lesions (two raters, longitudinal)."""
    from mslpipe.synth import make_dataset

    written = make_dataset(out, subjects=subjects, timepoints=timepoints, shape=shape, seed=seed, raters=raters)
    _echo(f"wrote {len(written)} scans of {subjects} subjects to {out}")


@app.command("plan")
def plan_cmd(
    dataset: Name,
    input: Annotated[Path | None, typer.Option("-i", "--input",
                                               help="Dataset folder (default: raw_data/NAME).")] = None,
    device: Device = "auto",
    arch: Annotated[str, typer.Option(help="Registered architecture (see `mslpipe archs`).")] = "leaky_unet",
    seed: Annotated[int, typer.Option(help="Seed of the subject split and of training's randomness (recorded in "
                                           "plans.json).")] = 12345,
    folds: Annotated[int, typer.Option(help="Cross-validation folds (fewer when fewer subjects remain outside the "
                                            "test set).")] = 5,
    groups: Annotated[Path | None, typer.Option(
        help='JSON file of subject to group (site, scanner), e.g. {"training01": "site_a"}: each fold leaves one '
             "group out (in place of --folds), which measures a site the model never saw.")] = None,
    test_fraction: Annotated[float, typer.Option(help="Share of subjects held out as test set.")] = 0.1,
    context_slices: Annotated[int | None, typer.Option(
        help="Neighbouring slices per side fed as extra channels, 0 = plain 2D "
             "(default: 1, i.e. 3 slices).")] = None,
    normalization: Annotated[str | None, typer.Option(
        help="Intensity normalisation scheme: brain_percentile_median_iqr (default) or brain_percentile_zscore.")
    ] = None,
    foreground_sampling: Annotated[str | None, typer.Option(
        help="How a lesion sample picks its slice: slice (uniformly among lesion slices, the default) or lesion "
             "(a lesion first, then one of its slices).")] = None,
    flatfield: Annotated[float | None, typer.Option(
        help="Divide out each scan's slow shading (its local tissue mean over a Gaussian of this many mm) before "
             "normalising, in place of N4 (default: off).")] = None,
    n4: Annotated[int | None, typer.Option(
        help="Fitting levels of the N4 bias-field correction (SimpleITK) each scan gets before normalising "
             "(default: 3; 0 turns it off; a flat field replaces it).")] = None,
    bias_field: Annotated[float | None, typer.Option(
        help="Share of training slices shaded by a random smooth bias field, for scans without bias-field "
             "correction (default: 0, off; see the README's Numbers).")] = None,
    slice_axis: Annotated[int, typer.Option(
        help="Axis the network slices along, in the scan's RAS order: 2 axial (default), 1 coronal, "
             "0 sagittal.")] = 2,
) -> None:
    """Verify the data, fingerprint it, write plans and subject-level splits, preprocess."""
    from mslpipe import plan as plan_mod
    from mslpipe import tables

    overrides = {"context_slices": context_slices, "foreground_sampling": foreground_sampling,
                 "normalization.scheme": normalization, "normalization.flatfield_mm": flatfield,
                 "normalization.n4_levels": n4, "augmentation.p_bias_field": bias_field}
    with tables.case_progress() as update:
        result = plan_mod.run(dataset, _dirs(), input, device=device, arch=arch, seed=seed, n_folds=folds,
                              test_fraction=test_fraction, overrides=overrides, progress=update, groups=groups,
                              slice_axis=slice_axis)
    _echo(tables.plan_text(dataset, result))


@app.command()
def train(
    dataset: Name,
    fold: Annotated[str, typer.Option(help="0..4, 'all' or 'final' (train+val of the 8:1:1 view).")] = "0",
    arch: Arch = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the plan's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Initial learning rate (default: the plan's, 0.01).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Slices per batch (default: the plan's).")] = None,
    iterations: Annotated[int | None, typer.Option(help="Batches per epoch.")] = None,
    device: Device = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the network.")] = False,
    resume: Annotated[bool, typer.Option("--continue", help="Resume from the last checkpoint.")] = False,
    workers: Annotated[int | None, typer.Option(help="Data-loading workers.")] = None,
    ema_half_life: Annotated[float | None, typer.Option(
        help="Half-life of the weights' moving average, as a fraction of the run (0 = the last weights).")] = None,
    minutes: Annotated[float | None, typer.Option(
        help="Train for this many minutes: whole epochs (validation included) while the next one fits, the learning "
             "rate decaying over the epochs expected to fit; --epochs is then a cap (default: 1000).")] = None,
) -> None:
    """Train a fold of the plan's network (checkpoints, log.csv and curve.png in results/)."""
    from mslpipe import train as train_mod
    from mslpipe import workflow

    dirs = _dirs()
    for k in workflow.train_folds(dataset, dirs, fold):
        result = train_mod.run(dataset, dirs, k, arch=arch, epochs=epochs, lr=lr, batch_size=batch_size,
                               iterations=iterations, device=device, compile=compile, resume=resume,
                               num_workers=workers, ema_half_life=ema_half_life, minutes=minutes)
        if result["rank"] == 0:
            again = result.get("val_dice_recalibrated")
            final = "" if again is None else f" ({again:.5f} with BatchNorm statistics estimated again)"
            validated = (f"last validation Dice {result['val_dice']}{final}"
                         if str(result["val_dice"]).lower() not in ("nan", "none")
                         else "no validation scans (the final model trains on the 8:1:1 view's train and "
                              "validation subjects)")
            _echo(f"fold {k}: {result['epochs']} epochs, {validated} → {result['fold_dir']}")


def _parse_folds(values: list[str] | None) -> list[int | str] | None:
    if not values:
        return None
    words = [v for item in values for v in item.replace(",", " ").split()]
    if not all(w.isdigit() or w == "final" for w in words):
        raise MslpipeError(f"--folds takes fold numbers or 'final', not {' '.join(values)!r}")
    return [w if w == "final" else int(w) for w in words]


@app.command()
def predict(
    input: Annotated[Path, typer.Option("-i", "--input", help="NIfTI file, folder of NIfTI/DICOM, or dataset.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    dataset: Annotated[str | None, typer.Option("-d", "--dataset", help="Use this dataset's trained folds.")] = None,
    arch: Arch = None,
    folds: Annotated[list[str] | None, typer.Option(help="Folds to ensemble, e.g. --folds 0,1,2, or 'final' "
                                                         "(default: every trained fold; the final model if no "
                                                         "fold is trained).")] = None,
    checkpoint: Annotated[list[Path] | None, typer.Option(help="Checkpoint file(s) instead of -d.")] = None,
    device: Device = "auto",
    tta: Annotated[bool, typer.Option("--tta", help="Average over mirrored inputs.")] = False,
    save_probabilities: Annotated[bool, typer.Option(
        "--save-probabilities", help="Also write OUT/probabilities/<case>.nii.gz (float32 lesion probability).")
                                  ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the network (it compiles before the "
                                                            "first scan; off by default).")] = False,
    onnx: Annotated[Path | None, typer.Option("--onnx", help="An exported model (`mslpipe export`) run by ONNX "
                                                            "Runtime on the CPU, without torch.")] = None,
    lesion_report: Annotated[bool, typer.Option("--report", help="Also write lesion tables (OUT/<case>.lesions."
                                                "csv/json: volume, place and probability of each lesion), OUT/report."
                                                "csv and an offline OUT/report.html.")] = False,
) -> None:
    """Segment scans; writes OUT/<case>.nii.gz (uint8 0/1 on the input grid)."""
    from mslpipe import predict as predict_mod
    from mslpipe import tables

    with tables.case_progress() as update:
        report = predict_mod.run(input, output, dirs=_dirs(), dataset=dataset, arch=arch,
                                 folds=_parse_folds(folds), checkpoint=checkpoint, device=device, tta=tta,
                                 save_probabilities=save_probabilities, overwrite=overwrite, compile=compile,
                                 report=lesion_report, onnx=onnx,
                                 progress=lambda done, total, case: update("predict", done, total, case))
    _echo(tables.predict_text(report, output, time.perf_counter() - STATE["start"],
                              imports_s=max(report.started - STATE["start"], 0.0)))
    for _case, reason in report.failed:
        typer.echo(f"failed: {reason}", err=True)
    STATE["fast_exit"] = True  # every output is written and closed: the process may end without teardown
    if report.failed:
        raise typer.Exit(1)


@app.command("evaluate")
def evaluate_cmd(
    dataset: Annotated[str | None, typer.Option("-d", "--dataset", help="Score a trained dataset.")] = None,
    arch: Arch = None,
    pred: Annotated[Path | None, typer.Option(help="Folder of predicted masks.")] = None,
    ref: Annotated[Path | None, typer.Option(
        help="Folder of reference masks, or an ISBI 2015-layout dataset (its masks/ folders).")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="summary.json path (default: the --pred "
                                                "folder's; with -d a copy of results/NAME/ARCH/summary.json).")
                      ] = None,
    qc_report: Annotated[bool, typer.Option("--report", help="With -d: crossval/report.html with TP/FP/FN overlays.")
                         ] = False,
    device: Device = "auto",
) -> None:
    """Dice, IoU, lesion-wise TPR/FPR/F1, volume difference, HD95, ISBI score."""
    from mslpipe import evaluate as evaluate_mod
    from mslpipe import tables

    if pred is not None or ref is not None:
        if pred is None or ref is None:
            raise MslpipeError("--pred and --ref go together")
        summary = evaluate_mod.run_folders(pred, ref, output)
        _echo(tables.format_table(summary))
        return
    if dataset is None:
        raise MslpipeError("give -d NAME, or --pred DIR --ref DIR")
    from mslpipe import workflow

    summary = workflow.evaluate_dataset(dataset, _dirs(), arch=arch, device=device, report=qc_report)
    if output is not None:
        from mslpipe.io import write_json

        write_json(output, summary)
    _echo(tables.summary_text(summary))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("-o", "--output", help="Work folder for the demo.")] = Path("demo_out"),
    subjects: Annotated[int, typer.Option(help="Synthetic subjects (2 scans each).")] = 10,
    epochs: Annotated[int, typer.Option(help="Training epochs of fold 0.")] = 20,
    iterations: Annotated[int, typer.Option(help="Batches per epoch.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data and of the plan.")] = 0,
    device: Device = "auto",
) -> None:
    """End to end on synthetic data: synth → plan → train fold 0 → predict test split → evaluate."""
    from mslpipe import tables, workflow

    result = workflow.demo(out, subjects=subjects, epochs=epochs, iterations=iterations, seed=seed, device=device)
    _echo(tables.summary_text(result["summary"]))
    test = result["summary"].get("test", {})
    _echo(f"demo done in {out}: test-subject volume Dice {test.get('mean', {}).get('dice', float('nan')):.3f}")


@app.command()
def compare(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    scans: Annotated[list[Path] | None, typer.Argument(metavar="BASELINE FOLLOWUP",
                                                       help="Two co-registered lesion masks, or two FLAIR "
                                                            "images (NIfTI or DICOM folders) with -d/--checkpoint "
                                                            "(and --register for two visits).")] = None,
    dataset: Annotated[str | None, typer.Option("-d", "--dataset", help="With --subject: the dataset; with two "
                                                "images: segment them with its trained folds.")] = None,
    subject: Annotated[str | None, typer.Option(help="Compare this subject's consecutive time points.")] = None,
    pred: Annotated[Path | None, typer.Option(help="With --subject: predicted masks <case>.nii.gz "
                                                   "(default: the dataset's mask1 references).")] = None,
    checkpoint: Annotated[list[Path] | None, typer.Option(help="Checkpoint to segment two images.")] = None,
    min_growth_percent: Annotated[float, typer.Option(help="Enlarging/shrinking: relative change of at "
                                                           "least this.")] = 25.0,
    min_growth_mm3: Annotated[float, typer.Option(help="... and an absolute change of at least this.")] = 10.0,
    register: Annotated[bool, typer.Option("--register", help="Two FLAIR images from two visits: align the "
                                           "follow-up to the baseline (rigid) before comparing.")] = False,
    device: Device = "auto",
) -> None:
    """Longitudinal change: new, enlarging, stable, shrinking and disappeared lesions (mask, CSV, JSON)."""
    from mslpipe import tables, workflow

    thresholds = {"min_growth_fraction": min_growth_percent / 100.0, "min_growth_mm3": min_growth_mm3}
    if subject is not None:
        if scans or dataset is None:
            raise MslpipeError("--subject goes with -d NAME and no BASELINE FOLLOWUP files")
        pairs = workflow.compare_subject(dataset, subject, output, dirs=_dirs(), pred=pred, **thresholds)
        for p in pairs:
            _echo(tables.pair_text(p, output))
        return
    if not scans or len(scans) != 2:
        raise MslpipeError("give two files, BASELINE FOLLOWUP, or -d NAME --subject S")
    change = workflow.compare_scans(scans[0], scans[1], output, dirs=_dirs(), dataset=dataset,
                                    checkpoint=checkpoint, device=device, register=register, **thresholds)
    if change.summary.get("registration"):
        _echo(tables.registration_text(change.summary["registration"]))
    _echo(f"{tables.counts_text(change.summary['counts'])}, volume {change.summary['volume_change_ml']:+.3f} mL "
          f"→ {output}")
    new_lesions = tables.new_lesions_text(change.lesions)
    if new_lesions:
        _echo(new_lesions)


@app.command()
def export(
    output: Annotated[Path, typer.Option("-o", "--output", help="The model file (.onnx); MODEL.onnx.json, "
                                                                "its description, goes beside it.")],
    dataset: Annotated[str | None, typer.Option("-d", "--dataset", help="Export this dataset's trained fold.")] = None,
    fold: Annotated[str | None, typer.Option(help="Fold to export, a number or 'final' (default: the only trained "
                                                 "one).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="A checkpoint file instead of -d.")] = None,
    arch: Arch = None,
    format: Annotated[str, typer.Option("--format", help="onnx (the only format).")] = "onnx",
    exporter: Annotated[str, typer.Option(help="auto, dynamo or torchscript (legacy).")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, or int8: quantized for small CPUs (about 4x smaller, "
                                           "checked against fp32 on the calibration scans).")] = "fp32",
    calibration: Annotated[Path | None, typer.Option(help="int8: scans to calibrate with (NIfTI file or folder, "
                                                     "DICOM series); default with -d: the fold's training "
                                                     "scans.")] = None,
) -> None:
    """Export a trained network to ONNX (dynamic batch, height and width) for `predict --onnx`."""
    from mslpipe import export as export_mod
    from mslpipe import tables

    if format != "onnx":
        raise MslpipeError(f"--format must be onnx, not {format!r}")
    meta = export_mod.run(output, dirs=_dirs(), dataset=dataset, arch=arch, fold=fold, checkpoint=checkpoint,
                          exporter=exporter, precision=precision, calibration=calibration)
    _echo(tables.export_text(meta, output))


@app.command("export-nnunet")
def export_nnunet(
    dataset: Name,
    output: Annotated[Path, typer.Option("-o", "--output", help="The nnU-Net dataset folder "
                                         "(nnU-Net expects $nnUNet_raw/DatasetNNN_NAME).")],
    plans: Annotated[bool, typer.Option("--plans", help="Also write the plans entry that makes nnU-Net "
                                        "train leaky_unet (DIR/nnUNetPlans_leaky_unet.fragment.json).")] = False,
    nnunet_plans: Annotated[Path | None, typer.Option("--nnunet-plans", help="nnU-Net's nnUNetPlans.json: "
                                                      "write nnUNetPlans_leaky_unet.json beside it (implies "
                                                      "--plans).")] = None,
    preprocessed_dir: Annotated[Path | None, typer.Option("--preprocessed-dir", help="Also write splits_final.json "
                                                          "here ($nnUNet_preprocessed/DatasetNNN_NAME).")] = None,
    label_policy: Annotated[str | None, typer.Option(help="mean, union, intersection or mask1, binarised at 0.5 "
                                                     "(default: the plan's).")] = None,
) -> None:
    """Write a planned dataset in nnU-Net v2's raw format with mslpipe's subject-level folds."""
    from mslpipe import nnunet_export, tables

    w = nnunet_export.run(dataset, _dirs(), output, label_policy=label_policy, plans=plans,
                          nnunet_plans=nnunet_plans, preprocessed_dir=preprocessed_dir)
    _echo(tables.nnunet_export_text(w, output, nnunet_export.PLANS_NAME))


@app.command()
def archs() -> None:
    """List the registered architectures with their parameter counts."""
    from mslpipe import architectures

    for name in sorted(architectures.available()):
        info = architectures.describe(name)
        _echo(f"{name:16s} {info['parameters'] / 1e6:8.2f} M parameters  {info.get('summary', '')}")


def _fast_exit(code: int | str | None) -> None:
    """End the process without Python's teardown (a few tenths of a second with torch loaded, more with a GPU):
    only once a command has finished its work, every output written and closed, and said all it has to say."""
    if isinstance(code, str):
        typer.echo(code, err=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def main() -> None:
    try:
        app()
    except SystemExit as exc:  # typer's way out, also on success; predict marks when nothing is left to finish
        if STATE.get("fast_exit"):
            _fast_exit(exc.code)
        raise
    except MslpipeError as exc:
        if STATE["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if STATE["debug"]:
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        sys.exit(3)
