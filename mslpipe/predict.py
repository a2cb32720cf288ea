"""`mslpipe predict`: segment new scans (NIfTI files, DICOM series, or a dataset's test split).

Reading the next scan and writing the last result overlap with the network's work on the
current one. A bad input file is reported and skipped; the run goes on and lists failures.
Outputs are written atomically and never overwritten without ``overwrite=True``, so an
interrupted run is resumed by starting it again.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mslpipe import __version__, preprocess
from mslpipe import report as lesion_report
from mslpipe.datasets import Source, gather_sources
from mslpipe.errors import MslpipeError
from mslpipe.io import PROBABILITY_DIR, make_dir, read_json, save_nifti, write_json
from mslpipe.plans import Plan, Workdirs, load_plan

if TYPE_CHECKING:  # imported where used: the ONNX Runtime path (`--onnx`) must never import torch
    from mslpipe import inference, onnx_inference

log = logging.getLogger(__name__)


# A case's seconds: the main thread waits for its input and runs the network (and waits when too many writes are
# queued); reading with preprocessing, and postprocessing with writing, run beside it on threads of their own.
MAIN_STEPS = ("read_wait_s", "network_s", "write_queue_wait_s")
BACKGROUND_STEPS = ("read_s", "preprocess_s", "postprocess_s", "write_s")
MAX_QUEUED_WRITES = 2  # finished cases held in memory while the writer catches up


def reader_count(predictor, cpus: int | None = None) -> int:
    """Scans read and preprocessed at once. Beside a GPU, whose network takes less time per scan than reading and
    preprocessing it: one per 4 CPU cores, from 2 to 4. They release the GIL for most of their time, and N4, the
    longest part, runs on one core however many there are, so only more scans at once put more cores to work; each
    holds a few copies of its volume. Beside a CPU network, 1: the network keeps the cores busy itself."""
    if getattr(predictor, "device", "cpu") != "cuda":
        return 1
    return max(2, min(4, (cpus or os.cpu_count() or 1) // 4))


@dataclass
class PredictReport:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    warned: list[str] = field(default_factory=list)  # segmented, with a quality warning (see the log)
    # where the time went, in seconds: loading the models (device start-up included) and its parts; per segmented
    # case MAIN_STEPS and BACKGROUND_STEPS; then waiting for the last writes. started: perf_counter() at the start.
    load_s: float = 0.0
    load_parts: dict[str, float] = field(default_factory=dict)
    case_timings: dict[str, dict[str, float]] = field(default_factory=dict)
    write_wait_s: float = 0.0
    started: float = 0.0

    def fail(self, case: str, exc: Exception) -> None:
        """Record a failure; the command lists every failure once, at its end (here only in the log's detail)."""
        self.failed.append((case, str(exc)))
        log.info("failed: %s", exc)

    def timing_summary(self, total_s: float | None = None, imports_s: float = 0.0) -> str | None:
        """One line: loading the models (and its parts), then the mean per segmented scan of the main thread's steps
        and of the steps beside it, then the writes' tail. With ``total_s`` (the whole command's seconds) that comes
        first, ``imports_s`` (the command's start before :func:`run`) is named, and last comes what no step covers."""
        if not self.case_timings:
            return None
        n = len(self.case_timings)
        mean = {k: sum(t.get(k, 0.0) for t in self.case_timings.values()) / n for k in MAIN_STEPS + BACKGROUND_STEPS}
        parts = ", ".join(f"{name} {sec:.2f} s" for name, sec in self.load_parts.items())
        queued = mean["write_queue_wait_s"]
        queue = f", waiting for the writer {queued:.2f} s" if queued >= 0.005 else ""
        line = (f"models {self.load_s:.2f} s{f' ({parts})' if parts else ''}; per scan ({n}): network "
                f"{mean['network_s']:.2f} s, waiting for its input {mean['read_wait_s']:.2f} s{queue}; beside them, "
                f"per scan: reading {mean['read_s']:.2f} s, preprocessing {mean['preprocess_s']:.2f} s, "
                f"postprocessing {mean['postprocess_s']:.2f} s, writing {mean['write_s']:.2f} s; waiting for writes "
                f"at the end {self.write_wait_s:.2f} s")
        if total_s is None:
            return line
        main = sum(t.get(k, 0.0) for t in self.case_timings.values() for k in MAIN_STEPS)
        other = total_s - imports_s - self.load_s - self.write_wait_s - main
        return (f"{total_s:.1f} s: imports {imports_s:.2f} s; {line}; other (finding inputs, reports) "
                f"{max(other, 0.0):.2f} s")


# ---------------------------------------------------------------------------- models
def find_checkpoints(dirs: Workdirs, dataset: str, arch: str, folds: list[int | str] | None) -> list[Path]:
    """The final checkpoints of ``folds`` (numbers, or "final" for `train --fold final`'s model); by default every
    trained cross-validation fold, or the final model when no fold is trained."""
    root = dirs.results_dir(dataset, arch)
    if folds:
        paths = [root / f"fold_{k}" / "checkpoint_final.pt" for k in folds]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise MslpipeError("fold not trained (no checkpoint_final.pt)", missing[0])
        return paths
    paths = sorted(root.glob("fold_[0-9]*/checkpoint_final.pt")) or sorted(root.glob("fold_final/checkpoint_final.pt"))
    if not paths:
        if not root.exists():  # a mistyped --arch: say so (the registry imports torch, so only here)
            from mslpipe import architectures

            architectures.check_name(arch)
        raise MslpipeError(f"no trained folds of {arch}: run `mslpipe train -d {dataset} --fold 0`", root)
    return paths


def planned_channels_beside(checkpoint: list[Path]) -> list[str] | None:
    """The channels of the plan a training run wrote beside the first checkpoint (``fold_K/plan.json``), so that the
    scans are found before torch and the models load; None when there is none to read. A missing checkpoint is
    refused here too, for the same reason."""
    for path in checkpoint:
        if not Path(path).is_file():
            raise MslpipeError("checkpoint not found" if not Path(path).exists() else "checkpoint is not a file", path)
    plan = plan_beside(checkpoint[0])
    return None if plan is None else plan.channels


def plan_beside(checkpoint: Path) -> Plan | None:
    """The plan a training run wrote beside a checkpoint (``fold_K/plan.json``), read without torch; None when there
    is none or it does not load (the checkpoint's own plan then decides)."""
    try:
        return load_plan(Path(checkpoint).parent / "plan.json")
    except MslpipeError:
        return None


def postprocessing_for(dirs: Workdirs, dataset: str | None, arch: str) -> dict | None:
    if dataset is None:
        return None
    path = dirs.results_dir(dataset, arch) / "postprocessing.json"
    if not path.exists():
        return None
    pp = read_json(path)
    return {k: pp[k] for k in ("min_lesion_mm3", "connectivity") if k in pp}


# ---------------------------------------------------------------------------- the run
def read_scan(src: Source, plan: Plan):
    """Read a scan and preprocess it for the network: (channels, affine, prepared scan, seconds of each)."""
    t0 = time.perf_counter()
    channels, affine = src.read()
    t1 = time.perf_counter()
    prepared = preprocess.prepare_scan(channels, affine, plan, where=src.paths[0])
    return channels, affine, prepared, {"read_s": t1 - t0, "preprocess_s": time.perf_counter() - t1}


@dataclass
class HeadStart:
    """The first scan to segment, read and preprocessed while torch and the models load, by the plan beside the
    first checkpoint; used when that plan is the models' own, which it is unless the files were mixed by hand."""
    case: str
    plan: Plan
    future: Future


def to_segment(src: Source, out: Path, overwrite: bool) -> bool:
    """Whether ``predict`` segments this source: always with ``overwrite``, else when its mask is not yet there."""
    return overwrite or not (Path(out) / f"{src.case}.nii.gz").exists()


def start_first_read(pool: ThreadPoolExecutor, sources: list[Source] | None, plan: Plan | None, out: Path,
                     overwrite: bool) -> HeadStart | None:
    todo = [s for s in sources or [] if to_segment(s, out, overwrite)]
    if plan is None or not todo:
        return None
    return HeadStart(todo[0].case, plan, pool.submit(read_scan, todo[0], plan))


def predict_sources(predictor: inference.Predictor | onnx_inference.OnnxPredictor, sources: list[Source],
                    out: Path, *, tta: bool = False,
                    postprocessing: dict | None = None, save_probabilities: bool = False,
                    overwrite: bool = False, progress: Callable[[int, int, str], None] | None = None,
                    report: bool = False, head: HeadStart | None = None) -> PredictReport:
    """Segment every source into ``out``; read-ahead and writes overlap the computation.

    ``head``: the first scan's reading, started before the models loaded (:func:`start_first_read`); used only
    when it is the first scan to do and its plan is the predictor's.

    ``report``: also write each case's lesion table and QC images (:mod:`mslpipe.report`), report
    skipped cases that have none yet, and rebuild ``report.csv`` and ``report.html`` at the end.
    ``progress`` is told (scans done, scans to do, case) after each scan's network (or its failure).
    """
    want_report, result = report, PredictReport()
    made_by = what_segments(predictor, tta)
    todo = []
    for src in sources:
        if to_segment(src, out, overwrite):
            todo.append(src)
        else:
            result.skipped.append(src.case)
    names = [s.case for s in todo]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        inputs = " and ".join(str(s.paths[0]) for s in todo if s.case == dupes[0])
        more = f" (and {len(dupes) - 1} more output names)" if len(dupes) > 1 else ""
        raise MslpipeError(f"{inputs} would all write {dupes[0]}.nii.gz here{more}: rename or move all but one", out)
    make_dir(out)
    pp = {**predictor.postprocessing, **(postprocessing or {})}

    def read(src: Source):  # beside the network: read and preprocess the next scan
        return read_scan(src, predictor.plan)

    def write(src: Source, prob: np.ndarray, prepared: preprocess.PreparedScan, affine: np.ndarray,
              image: np.ndarray, timings: dict[str, float]) -> None:  # beside the network: postprocess and write
        t0 = time.perf_counter()
        mask, prob = preprocess.finish_scan(prob, prepared, affine, pp)
        t1 = time.perf_counter()
        # the mask last: its presence marks the case finished (a rerun skips it), so the map is there before it
        if save_probabilities:
            save_nifti(out / PROBABILITY_DIR / f"{src.case}.nii.gz", prob, affine, dtype=np.float32)
        else:  # an earlier run's map (--overwrite) would pass for this mask's (compare reads it)
            (out / PROBABILITY_DIR / f"{src.case}.nii.gz").unlink(missing_ok=True)
        save_nifti(out / f"{src.case}.nii.gz", mask, affine, dtype=np.uint8)
        if want_report:
            notes = [prepared.warning] if prepared.warning else []
            lesion_report.write_case_report(out, src.case, image, mask, affine, warnings=notes, made_by=made_by,
                                            probability=prob, connectivity=int(pp.get("connectivity", 26)))
            lesion_report.write_report_csv(out)
        timings.update(postprocess_s=t1 - t0, write_s=time.perf_counter() - t1)

    def report_skipped(src: Source) -> None:  # finished by an earlier run that wrote no report
        channels, affine = src.read()
        lesion_report.write_saved_case_report(out, src.case, channels[0], affine,
                                              connectivity=int(pp.get("connectivity", 26)))
        lesion_report.write_report_csv(out)

    def collect(src: Source, fut: Future) -> None:
        try:
            fut.result()
            result.written.append(src.case)
        except MslpipeError as exc:
            result.fail(src.case, exc)

    readers = reader_count(predictor)
    with ThreadPoolExecutor(max_workers=readers) as reader, ThreadPoolExecutor(max_workers=1) as writer:
        pending: list[tuple[Source, Future]] = []
        backfill = [(src, writer.submit(report_skipped, src)) for src in sources if want_report
                    and src.case in result.skipped and not lesion_report.case_json_path(out, src.case).exists()]
        usable = head is not None and bool(todo) and head.case == todo[0].case and head.plan == predictor.plan
        ahead = deque(head.future if usable and k == 0 else reader.submit(read, src)
                      for k, src in enumerate(todo[:readers]))
        for i, src in enumerate(todo):
            current = ahead.popleft()
            if i + readers < len(todo):
                ahead.append(reader.submit(read, todo[i + readers]))
            try:
                t0 = time.perf_counter()
                channels, affine, prepared, timings = current.result()
                t1 = time.perf_counter()
                prob = predictor.run_volume(prepared.image, tta=tta)
                t2 = time.perf_counter()
                while len(pending) >= MAX_QUEUED_WRITES:  # hold few finished volumes in memory
                    collect(*pending.pop(0))
                timings.update(read_wait_s=t1 - t0, network_s=t2 - t1, write_queue_wait_s=time.perf_counter() - t2)
                result.case_timings[src.case] = timings
                pending.append((src, writer.submit(write, src, prob, prepared, affine, channels[0], timings)))
                if prepared.warning:
                    result.warned.append(src.case)
            except MslpipeError as exc:
                result.fail(src.case, exc)
            if progress:
                progress(i + 1, len(todo), src.case)
        t0 = time.perf_counter()
        for src, fut in pending:
            collect(src, fut)
        result.write_wait_s = time.perf_counter() - t0
        for src, fut in backfill:
            try:
                fut.result()
            except MslpipeError as exc:
                result.fail(src.case, exc)
    if want_report:
        try:
            lesion_report.write_report_index(out)
        except MslpipeError as exc:
            result.fail("report", exc)
    return result


def run(inp: Path, out: Path, *, dirs: Workdirs, dataset: str | None = None, arch: str | None = None,
        folds: list[int | str] | None = None, checkpoint: list[Path] | None = None, device: str = "auto",
        tta: bool = False, save_probabilities: bool = False, overwrite: bool = False,
        compile: bool = False, progress: Callable[[int, int, str], None] | None = None,
        report: bool = False, onnx: Path | None = None) -> PredictReport:
    """``onnx``: an exported model run by ONNX Runtime on the CPU (no torch); otherwise checkpoints."""
    t0 = time.perf_counter()
    load_parts: dict[str, float] = {}
    if onnx is not None and (checkpoint or folds):
        raise MslpipeError("--onnx runs the exported model alone: leave out --checkpoint and --folds")
    if not Path(inp).exists():  # said before the models load (seconds with torch and a GPU)
        raise MslpipeError("input not found", inp)
    read_from = Path(inp) if Path(inp).is_dir() else Path(inp).parent
    if Path(out).resolve() == read_from.resolve():  # with --overwrite a scan's mask would replace the scan itself
        raise MslpipeError("the output folder is the folder the scans are read from: the masks would replace or mix "
                           "with them; give another -o", out)
    sources, planned_channels = None, None
    plan_file = dirs.plan_dir(dataset) / "plans.json" if dataset is not None else None
    if onnx is None and not checkpoint and plan_file and (arch is None or plan_file.exists()):
        plan = load_plan(plan_file)  # it names the channels: the scans too are found before the models load
        arch, planned_channels = arch or plan.architecture, plan.channels
        sources = gather_sources(inp, planned_channels, dirs, dataset)
    elif onnx is None and checkpoint:
        planned_channels = planned_channels_beside(checkpoint)
        if planned_channels is not None:
            sources = gather_sources(inp, planned_channels, dirs, dataset)
    early = ThreadPoolExecutor(max_workers=1)  # the first scan's reading, beside the models' loading
    try:
        head = None
        if onnx is not None:
            from mslpipe import onnx_inference

            predictor = onnx_inference.load_onnx_predictor(onnx)
        else:
            if checkpoint:
                paths = list(checkpoint)
            else:
                if dataset is None:
                    raise MslpipeError("say which model to use: -d NAME (trained folds), --checkpoint PATH or "
                                       "--onnx MODEL")
                paths = find_checkpoints(dirs, dataset, arch, folds)
            head = start_first_read(early, sources, plan_beside(paths[0]), out, overwrite)
            t_import = time.perf_counter()
            from mslpipe import inference  # with torch, unless an earlier step imported it

            load_parts["torch import"] = time.perf_counter() - t_import
            predictor = inference.load_predictor(paths, device=device, compile=compile, timings=load_parts)
        load_s = time.perf_counter() - t0
        if sources is None or predictor.plan.channels != planned_channels:  # the checkpoints' own plan decides
            sources = gather_sources(inp, predictor.plan.channels, dirs, dataset)
        pp = postprocessing_for(dirs, dataset, predictor.plan.architecture)
        started = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        result = predict_sources(predictor, sources, Path(out), tta=tta, postprocessing=pp,
                                 save_probabilities=save_probabilities, overwrite=overwrite, progress=progress,
                                 report=report, head=head)
    finally:  # a read nobody waits for (the models failed to load) is not waited for either
        early.shutdown(wait=False, cancel_futures=True)
    result.load_s, result.load_parts, result.started = load_s, load_parts, t0
    if result.written or result.failed:
        try:
            record_run(Path(out), predictor, sources, result, started=started, inp=Path(inp), tta=tta,
                       postprocessing={**predictor.postprocessing, **(pp or {})})
        except MslpipeError as exc:
            result.fail("provenance", exc)
    return result


PROVENANCE_DIR = "provenance"


def what_segments(predictor, tta: bool) -> dict:
    """mslpipe's version, the model files, their plan's hash and TTA: what each mask's report and record name."""
    return {"mslpipe_version": __version__, "models": list(predictor.sources), "plan_hash": predictor.plan.hash,
            "tta": tta}


def record_run(out: Path, predictor, sources: list[Source], result: PredictReport, *, started: str, inp: Path,
               tta: bool, postprocessing: dict) -> Path:
    """Write ``OUT/provenance/predict_<UTC time>_<pid>.json``: which mslpipe, models, plan, device and settings
    wrote which masks from which inputs, so that every mask in the folder can be traced to what made it. One
    file per run: reruns and runs side by side into one folder add records and never overwrite one."""
    inputs = {s.case: [str(p.resolve()) for p in s.paths] for s in sources}
    record = {
        "started": started, **what_segments(predictor, tta), "input": str(inp.resolve()),
        "architecture": predictor.plan.architecture, "device": getattr(predictor, "device", "cpu (ONNX Runtime)"),
        "postprocessing": postprocessing,
        "written": {case: inputs.get(case, []) for case in result.written},
        "failed": {case: reason for case, reason in result.failed},
    }
    stamp = datetime.fromisoformat(started).strftime("%Y%m%dT%H%M%S.%fZ")
    return write_json(out / PROVENANCE_DIR / f"predict_{stamp}_{os.getpid()}.json", record)
