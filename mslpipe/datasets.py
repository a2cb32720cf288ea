"""Find the cases of a dataset on disk: ISBI 2015 layout or nnU-Net raw layout.

A :class:`Case` is one scan (one subject at one time point) with its image channels and,
for labelled cases, one mask per rater. Nothing is loaded here; :mod:`mslpipe.plan` verifies.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from mslpipe.errors import MslpipeError
from mslpipe.io import NIFTI_SUFFIXES, is_nifti, read_json, strip_nifti_suffix

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
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p)) if folder.is_dir() else []


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
            masks = [] if test_only else [root / "labelsTr" / f"{cid}{ending}"]
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
