"""Find scans on disk: the cases of a dataset (ISBI 2015 or nnU-Net raw layout), and the scans to segment.

A :class:`Case` is one scan (one subject at one time point) with its image channels and,
for labelled cases, one mask per rater. Nothing is loaded here; :mod:`mslpipe.plan` verifies.
A :class:`Source` is one scan for `predict` (:func:`gather_sources`: a NIfTI file, a folder of them, ISBI-named
files, DICOM series or a dataset's test split), read when its turn comes.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mslpipe.dicom import dicom_series_info, find_dicom_series, load_dicom_series
from mslpipe.errors import MslpipeError
from mslpipe.io import NIFTI_SUFFIXES, is_nifti, load_image, read_json, strip_nifti_suffix
from mslpipe.plans import Workdirs

log = logging.getLogger(__name__)

ISBI_IMAGE = re.compile(r"^(?P<subject>[A-Za-z]+\d+)_(?P<tp>\d+)_(?P<mod>[A-Za-z0-9]+)_pp$")
ISBI_MASK = re.compile(r"^(?P<subject>[A-Za-z]+\d+)_(?P<tp>\d+)_mask(?P<rater>\d+)$")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Case:
    id: str
    subject: str
    timepoint: int
    images: dict[str, Path]
    masks: list[Path] = field(default_factory=list)
    test_only: bool = False

    @property
    def labelled(self) -> bool:
        return bool(self.masks)


def check_case_id(case_id: str, where: object) -> str:
    """Refuse ids that could escape an output folder (``..``, separators, absolute paths)."""
    if not SAFE_ID.fullmatch(case_id) or ".." in case_id:
        raise MslpipeError(f"unsafe case name {case_id!r} (letters, digits, '.', '_', '-' only)", where)
    return case_id


def _nifti_files(folder: Path) -> list[Path]:
    # hidden files are no scans: a killed write's temporary (.NAME.xxx.tmp.nii.gz), a viewer's or a sync tool's
    return (sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
            if folder.is_dir() else [])


def isbi_images(paths: list[Path]) -> dict[str, Case]:
    """Group ISBI-named images (``SUBJECT_TT_MODALITY_pp.nii[.gz]``) into cases by ``SUBJECT_TT``, one image per
    modality (lower case); names that do not follow the pattern are left out."""
    cases: dict[str, Case] = {}
    for image in sorted(paths):
        m = ISBI_IMAGE.match(strip_nifti_suffix(image.name))
        if not m:
            continue
        subject, mod = m["subject"], m["mod"].lower()
        case_id = f"{subject}_{m['tp']}"
        case = cases.get(case_id)
        if case is None:
            case = cases[case_id] = Case(case_id, subject, int(m["tp"]), {},
                                         test_only=not subject.startswith("training"))
        if mod in case.images:
            raise MslpipeError(f"duplicate case {case_id} ({mod} found twice)", image)
        case.images[mod] = image
    return cases


def _discover_isbi(root: Path, channels: list[str]) -> list[Case]:
    cases = isbi_images([p for suffix in NIFTI_SUFFIXES for p in root.rglob(f"*_pp{suffix}")
                         if p.parent.name == "preprocessed"])
    for case in cases.values():
        subject_dir = case.images[next(iter(case.images))].parent.parent
        raters = {}
        for mask in _nifti_files(subject_dir / "masks"):
            m = ISBI_MASK.match(strip_nifti_suffix(mask.name))
            if m and f"{m['subject']}_{m['tp']}" == case.id:
                raters[int(m["rater"])] = mask
        case.masks = [raters[r] for r in sorted(raters)]
    return select_channels(list(cases.values()), channels, root)


def _discover_nnunet(root: Path, channels: list[str]) -> list[Case]:
    meta = read_json(root / "dataset.json")
    names = meta.get("channel_names") or meta.get("modality") or {"0": "flair"}
    channel_index = {str(v).lower(): int(k) for k, v in names.items()}
    ending = meta.get("file_ending", ".nii.gz")
    subjects = read_json(root / "subjects.json") if (root / "subjects.json").exists() else {}
    cases = []
    for folder, test_only in (("imagesTr", False), ("imagesTs", True)):
        ids = sorted({p.name[: -len(ending) - 5] for p in (root / folder).glob(f"*_0000{ending}")})
        for cid in ids:
            images = {ch: root / folder / f"{cid}_{i:04d}{ending}" for ch, i in channel_index.items()}
            if test_only:  # labelsTs, where the dataset has it, holds the test cases' masks
                masks = [p for p in [root / "labelsTs" / f"{cid}{ending}"] if p.is_file()]
            else:
                masks = [root / "labelsTr" / f"{cid}{ending}"]
            cases.append(Case(cid, str(subjects.get(cid, cid)), 1, images, masks, test_only))
    return select_channels(cases, channels, root)


def select_channels(cases: list[Case], channels: list[str], root: Path) -> list[Case]:
    """Keep each case's images of ``channels``, in that order; a case without one of them is an error."""
    for case in cases:
        missing = [ch for ch in channels if ch not in case.images]
        if missing:
            some = next(iter(case.images.values()))
            raise MslpipeError(f"case {case.id} has no {'/'.join(missing)} image "
                               f"(found {sorted(case.images)})", some.parent)
        case.images = {ch: case.images[ch] for ch in channels}
    return cases


def discover(root: str | Path, channels: list[str] | None = None) -> list[Case]:
    """Return the dataset's cases sorted by id. Raises MslpipeError when there are none."""
    root = Path(root)
    channels = [c.lower() for c in (channels or ["flair"])]
    if not root.exists():
        raise MslpipeError("dataset folder not found", root)
    if not root.is_dir():
        raise MslpipeError("not a folder", root)
    if (root / "dataset.json").exists():
        cases = _discover_nnunet(root, channels)
    else:
        cases = _discover_isbi(root, channels)
    if not cases:
        raise MslpipeError("no cases found (expected the ISBI 2015 layout "
                           "training/trainingSS/preprocessed/trainingSS_TT_flair_pp.nii[.gz] "
                           "or an nnU-Net raw dataset with dataset.json)", root)
    seen: set[str] = set()
    for case in cases:
        check_case_id(case.id, case.images[channels[0]])
        if case.id in seen:
            raise MslpipeError(f"duplicate case id {case.id}", case.images[channels[0]])
        seen.add(case.id)
        for path in [*case.images.values(), *case.masks]:
            if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
                log.info("%s is a symlink out of the dataset folder; reading it, never writing", path)
    return sorted(cases, key=lambda c: c.id)


# ---------------------------------------------------------------------------- scans to segment (predict's inputs)
@dataclass
class Source:
    """One scan to segment: its output name and how to read its channels."""

    case: str
    paths: list[Path]
    kind: str = "nifti"  # or "dicom": paths holds the series' folder, files its files
    files: list[str] | None = None

    def read(self) -> tuple[list[np.ndarray], np.ndarray]:
        channels, affine = [], None
        for path in self.paths:
            data, aff = load_dicom_series(path, self.files) if self.kind == "dicom" else load_image(path)
            if affine is not None and (data.shape != channels[0].shape or not np.allclose(aff, affine, atol=1e-3)):
                raise MslpipeError("channel is not on the same grid as the first channel", path)
            channels.append(data)
            affine = aff if affine is None else affine
        return channels, affine


def gather_sources(inp: Path, channels: list[str] | None = None, dirs: Workdirs | None = None,
                   dataset: str | None = None) -> list[Source]:
    """Turn IN into scans: one NIfTI file, a folder of NIfTI files, DICOM series, or a dataset.

    ``channels``: the model's input channels (default FLAIR alone). Files named as in ISBI 2015's
    ``preprocessed/`` folders (``SUBJECT_TT_MODALITY_pp``) are grouped into one scan per ``SUBJECT_TT``, named so
    (as ``predict -d`` and ``evaluate`` name it), with the model's channels picked by modality: the other
    modalities beside them are no scans of their own.
    """
    inp = Path(inp)
    channels = [c.lower() for c in (channels or ["flair"])]
    if not inp.exists():
        raise MslpipeError("input not found", inp)
    if inp.is_file():
        if not is_nifti(inp):
            raise MslpipeError("not a NIfTI file (.nii or .nii.gz); give a DICOM series as a folder", inp)
        if not isbi_images([inp]):
            return [_nifti_source(inp, len(channels))]
        case = next(c for c in isbi_images(_nifti_files(inp.parent)).values() if inp in c.images.values())
        return _isbi_sources({case.id: case}, channels, inp.parent, only=inp)
    niftis = _nifti_files(inp)
    if niftis:
        cases = isbi_images(niftis)
        isbi_files = {p for c in cases.values() for p in c.images.values()}  # before the channels are picked
        plain = [p for p in niftis if p not in isbi_files]
        sources = _isbi_sources(cases, channels, inp)
        if len(channels) > 1:  # nnU-Net naming: CASE_0000.nii.gz, CASE_0001.nii.gz, ...
            stems = [strip_nifti_suffix(p.name) for p in plain]
            cases = sorted({s[:-5] for s in stems if s[-5:-4] == "_"})
            sources += [_nifti_source(inp / f"{c}_0000.nii.gz", len(channels)) for c in cases]
        else:
            sources += [_nifti_source(p, 1) for p in plain]
        return sources + _dicom_beside_nifti(inp, len(channels))
    if (inp / "training").is_dir() or (inp / "dataset.json").exists() or any(inp.glob("test*/preprocessed")):
        return _dataset_test_sources(inp, dirs, dataset)
    series = find_dicom_series(inp)
    if series:
        return _dicom_sources(series, inp)
    raise MslpipeError("no NIfTI files, DICOM series or dataset found in this folder", inp)


def _dicom_beside_nifti(inp: Path, n_channels: int) -> list[Source]:
    """DICOM series in a folder that also holds NIfTI files (in it or in its subfolders): scans too, not left out
    unsaid. A model of several channels reads NIfTI files only (a series is one channel), so there they are
    named in a warning instead."""
    if not any(p.is_dir() or not (is_nifti(p) or p.name.startswith(".")) for p in inp.iterdir()):
        return []  # NIfTI files alone: no DICOM search (it loads SimpleITK and asks GDCM about every file)
    series = find_dicom_series(inp)
    if not series:
        return []
    if n_channels > 1:
        log.warning("%d DICOM series beside the NIfTI files in %s left out: a model of %d channels reads NIfTI "
                    "files (CASE_0000.nii.gz, CASE_0001.nii.gz, ...)", len(series), inp, n_channels)
        return []
    return _dicom_sources(series, inp)


# SeriesDescription / ProtocolName words of a FLAIR series, once '_' and '-' are spaces: "T2 FLAIR", Siemens' "dark
# fluid" (3D SPACE: "t2_spc_da-fl") and TIRM; a T1-weighted FLAIR (GE's "AX T1 FLAIR") is no FLAIR for this
FLAIR_WORDS = re.compile(r"flair|\bdark ?fluid|\bda ?fl\b|\btirm\b")  # "flair" also inside "T2FLAIR"
NOT_FLAIR = re.compile(r"\bt1")


def names_flair(*fields: str) -> bool:
    """Whether a series' description or protocol names a (T2-weighted) FLAIR: :data:`FLAIR_WORDS`, not T1."""
    text = re.sub(r"[_\-]+", " ", " ".join(fields).lower())
    return bool(FLAIR_WORDS.search(text)) and not NOT_FLAIR.search(text)


def _dicom_sources(series: list[tuple[str, list[str]]], root: Path) -> list[Source]:
    """One scan per DICOM series, named after its folder (plus its series number and description where a folder
    holds several). Of several series (a study), those whose description or protocol names FLAIR
    (:data:`FLAIR_WORDS`) are segmented and the others left out; where none does, all are (with a warning). A
    single series is segmented whatever its name."""
    infos = [dicom_series_info(files) for _, files in series]
    # a series' folder: where its files lie (their common folder, for a series spread over several)
    folders = [Path(os.path.commonpath(sorted({str(Path(f).parent) for f in files}))) for _, files in series]
    chosen = list(range(len(series)))
    if len(series) > 1:
        flair = [i for i, info in enumerate(infos) if names_flair(info["description"], info["protocol"])]
        if flair:
            left = [_series_label(folders[i], infos[i]) for i in chosen if i not in flair]
            if left:
                log.warning("%d of %d DICOM series are FLAIR by their description and segmented; left out: %s",
                            len(flair), len(series), "; ".join(left))
            chosen = flair
        else:
            log.warning("none of the %d DICOM series names FLAIR in its description or protocol: segmenting every "
                        "one (give the FLAIR series' folder to segment only that)", len(series))
    shared = {f for f in folders if folders.count(f) > 1}
    labels = _folder_labels(sorted({folders[i] for i in chosen}), root)
    names = {}
    for i in chosen:
        name = labels[folders[i]]
        if folders[i] in shared:
            name += f"_s{infos[i]['number'] or i + 1}" + (f"_{infos[i]['description']}" if infos[i]["description"]
                                                          else "")
        names[i] = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or f"series{i + 1}"
    twins = [i for i in chosen if [names[j] for j in chosen].count(names[i]) > 1 and folders[i] in shared]
    for i in twins:  # one folder, two series of one number and description (sent twice): their UIDs tell them apart
        names[i] += "_" + re.sub(r"[^0-9]", "", series[i][0])[-6:]
    return [Source(check_case_id(names[i], folders[i]), [folders[i]], "dicom", series[i][1]) for i in chosen]


def _folder_labels(folders: list[Path], root: Path) -> dict[Path, str]:
    """Each folder's name, with as many of its parents' names before it (joined by '_') as it takes to tell it from
    the others: patientA/FLAIR and patientB/FLAIR are patientA_FLAIR and patientB_FLAIR."""
    parts = {f: (f.relative_to(root).parts if f.is_relative_to(root) and f != root else ()) or (f.name,)
             for f in folders}
    depth = dict.fromkeys(folders, 1)
    while True:
        labels = {f: "_".join(parts[f][-depth[f]:]) for f in folders}
        clash = [f for f in folders if list(labels.values()).count(labels[f]) > 1 and depth[f] < len(parts[f])]
        if not clash:
            return labels
        for f in clash:
            depth[f] += 1


def _series_label(folder: Path, info: dict[str, str]) -> str:
    what = info["description"] or info["protocol"] or "no description"
    return f"{folder.name} (series {info['number'] or '?'}: {what})"


def _isbi_sources(cases: dict[str, Case], channels: list[str], folder: Path, only: Path | None = None) -> list[Source]:
    """The ISBI-named ``cases`` of ``folder`` as scans of the model's channels; ``only``: the one file asked for,
    refused when it is not of those channels."""
    if only is not None:
        mod = next(m for c in cases.values() for m, p in c.images.items() if p == only)
        if mod not in channels:
            raise MslpipeError(f"by its ISBI name a {mod} scan, but the model segments {'+'.join(channels)} "
                               f"(give the {channels[0]} file, or rename this one if its name is wrong)", only)
    ignored = sorted({m for c in cases.values() for m in c.images if m not in channels})
    if ignored:
        log.info("%s: ISBI-named %s images are not the model's channels (%s); not segmented", folder,
                 "/".join(ignored), "+".join(channels))
    chosen = select_channels(list(cases.values()), channels, folder)
    return [Source(check_case_id(c.id, folder), list(c.images.values())) for c in chosen]


def _nifti_source(path: Path, n_channels: int) -> Source:
    name = strip_nifti_suffix(path.name)
    if n_channels > 1:
        base = name[:-5]
        paths = [path.parent / f"{base}_{i:04d}{path.name[len(name):]}" for i in range(n_channels)]
        return Source(check_case_id(base, path), paths)
    return Source(check_case_id(name, path), [path])


def _dataset_test_sources(root: Path, dirs: Workdirs | None, dataset: str | None) -> list[Source]:
    cases = discover(root)
    test_subjects: set[str] = set()
    if dirs is not None and dataset is not None and (dirs.plan_dir(dataset) / "splits.json").exists():
        test_subjects = set(read_json(dirs.plan_dir(dataset) / "splits.json")["test"])
    chosen = [c for c in cases if c.test_only or c.subject in test_subjects]
    if not chosen:
        if test_subjects:
            raise MslpipeError(f"a dataset is segmented by its test scans, and none of this one's is a test-only "
                               f"scan or a subject of {dataset}'s test split; to segment other scans, give them "
                               "as files or a folder", root)
        raise MslpipeError("dataset has no test scans (no test-only cases and no test split; give -d NAME "
                           "after `mslpipe plan`, or the scans as files or a folder)", root)
    return [Source(c.id, list(c.images.values())) for c in chosen]
