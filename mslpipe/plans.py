"""The plan: a typed, versioned, hashed record of every choice the pipeline makes for a dataset.

Configuration lives here and in command-line flags, never in subclasses that change one constant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mslpipe.errors import MslpipeError
from mslpipe.io import read_json, write_json

PLAN_VERSION = 1

LABEL_POLICIES = ("mean", "union", "intersection", "mask1")
# Slices per forward pass on a CPU, whatever the plan says: a GPU plan's batch of 256 full-width slices would
# need tens of GB of activations, and bigger batches gain nothing on a few cores.
CPU_INFERENCE_BATCH = 16
NORMALIZATION_SCHEMES = ("brain_percentile_zscore", "brain_percentile_median_iqr")
# BCE + soft Dice. "bce_dice": Dice over the whole batch (what plans written before the choice mean);
# "bce_dice_per_slice": Dice per slice, then averaged, so a slice with a small lesion counts as much as one with a
# large one (bench/RESULTS.md "Dice per slice against over the batch": no better on the real data).
LOSSES = ("bce_dice", "bce_dice_per_slice")
FOREGROUND_SAMPLING = ("slice", "lesion")


@dataclass
class Augmentation:
    """Spatial and intensity augmentation of 2D slices (probabilities per sample)."""

    p_rotate: float = 0.2
    rotate_deg: float = 15.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.85, 1.25)
    p_elastic: float = 0.1
    elastic_sigma: tuple[float, float] = (9.0, 13.0)
    elastic_magnitude: tuple[float, float] = (50.0, 150.0)
    mirror_axes: tuple[int, ...] = (0, 1)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.15
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.1
    noise_std: float = 0.1
    p_blur: float = 0.1
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    # nnU-Net's "simulate low resolution": down with nearest, back up bilinearly, by a zoom in low_res_zoom.
    # 0 here is what plans written before it mean; the planner sets plan.DEFAULT_P_LOW_RES.
    p_low_res: float = 0.0
    low_res_zoom: tuple[float, float] = (0.5, 1.0)
    # A smooth shading of the brain (scanners without bias-field correction), mslpipe.augmentation.RandBrainBiasFieldd;
    # 0 here is what plans written before it mean.
    p_bias_field: float = 0.0
    bias_field_coeff: tuple[float, float] = (0.0, 0.1)
    enabled: bool = True


AUGMENTATION_FIELDS = {f.name for f in dataclasses.fields(Augmentation)}
NORMALIZATION_KEYS = {"scheme", "lower_pct", "upper_pct", "flatfield_mm", "n4_levels", "n4_grid_mm"}
SHADING_KEYS = ("flatfield_mm", "n4_levels")  # off at 0, hashed as absent
N4_GRID_MM = 4.0  # N4's fitting grid where a plan does not name one (``normalization.n4_grid_mm``)


def _normalization_for_hash(norm: Any) -> Any:
    """``flatfield_mm`` or ``n4_levels`` 0 (off) hashes as its absence: plans written before them keep their hashes."""
    if isinstance(norm, dict):
        return {k: v for k, v in norm.items() if k not in SHADING_KEYS or v}
    return norm


@dataclass
class Plan:
    """Everything the later stages need; written to ``plans/NAME/plans.json``."""

    dataset: str
    channels: list[str] = field(default_factory=lambda: ["flair"])
    label_policy: str = "mean"
    n_raters: int = 1
    slice_axis: int = 2
    # 2.5D input: the network sees this many neighbouring slices on each side of the one it segments,
    # stacked as channels (the study fed 3 channels of one replicated grey slice). 0 = plain 2D.
    context_slices: int = 0
    # Voxel size (mm, RAS axis order) the network works at; scans more than 5% off are resampled.
    target_spacing: list[float] | None = None
    patch_size: list[int] = field(default_factory=lambda: [224, 192])
    crop_margin: int = 4
    # Smallest and largest brain-mask volume (mL) among the planned scans: `predict` warns about a scan far
    # outside it (not skull-stripped, or only part of the brain in view). Quality control only: not hashed.
    brain_ml_range: list[float] | None = None
    normalization: dict[str, Any] = field(
        default_factory=lambda: {"scheme": "brain_percentile_zscore", "lower_pct": 0.5, "upper_pct": 99.5}
    )
    architecture: str = "leaky_unet"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    target_device: str = "cuda"
    batch_size: int = 32
    epochs: int = 100
    iterations_per_epoch: int = 250
    num_workers: int = 4
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"name": "sgd", "lr": 1e-2, "momentum": 0.9, "nesterov": True,
                                 "weight_decay": 3e-5}
    )
    lr_schedule: dict[str, Any] = field(default_factory=lambda: {"name": "poly", "exponent": 0.9})
    loss: str = "bce_dice"  # one of LOSSES
    # Initial foreground probability of the output layer (bias = logit(prior)): with lesions under
    # 1% of voxels, starting from p = 0.5 everywhere wastes the first epochs unlearning background.
    output_prior: float = 0.01
    oversample_foreground: float = 0.34
    # How a foreground sample picks its slice within a case: "slice" (uniformly among the lesion slices) or
    # "lesion" (a lesion first, uniformly, then one of its slices: one-slice lesions are drawn as often as ones
    # spanning thirty slices). "slice" is what plans written before it mean.
    foreground_sampling: str = "slice"
    # Weights used for validation and saved as the final model: an exponential moving average of the trained
    # weights (BatchNorm statistics included) whose half-life is this fraction of the run's iterations
    # (0.05 of 10 epochs: half an epoch). 0 = the last weights, as plans written before it mean.
    ema_half_life: float = 0.0
    # After the last epoch, the final weights' BatchNorm statistics are estimated again over this many training
    # batches (train mode, no gradient, a plain average: "precise BN"), instead of the running averages, which
    # mix the statistics of weights that kept changing and of small batches. 0 = the running averages, as plans
    # written before it mean.
    bn_recalibration_batches: int = 0
    augmentation: Augmentation = field(default_factory=Augmentation)
    postprocessing: dict[str, Any] = field(
        default_factory=lambda: {"threshold": 0.5, "min_lesion_mm3": 0.0, "connectivity": 26}
    )
    inference_batch_size: int = 64
    seed: int = 12345
    version: int = PLAN_VERSION
    mslpipe_version: str = ""
    hash: str = ""

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def input_channels(self) -> int:
        """The network's input channels: every modality, for the slice and its context neighbours."""
        return len(self.channels) * (2 * self.context_slices + 1)

    def compute_hash(self) -> str:
        """Hash of everything that changes preprocessing or training (not the hash itself)."""
        d = self.to_dict()
        d["normalization"] = _normalization_for_hash(d["normalization"])
        d.pop("hash", None)
        d.pop("mslpipe_version", None)
        d.pop("brain_ml_range", None)
        if not d.get("context_slices"):  # added later: plans written before it keep their hash
            d.pop("context_slices", None)
        if not d.get("ema_half_life"):  # likewise
            d.pop("ema_half_life", None)
        if d.get("foreground_sampling") == "slice":  # likewise
            d.pop("foreground_sampling", None)
        if not d.get("bn_recalibration_batches"):  # likewise
            d.pop("bn_recalibration_batches", None)
        if not d["augmentation"].get("p_low_res"):  # likewise
            d["augmentation"] = {k: v for k, v in d["augmentation"].items() if k not in ("p_low_res", "low_res_zoom")}
        if not d["augmentation"].get("p_bias_field"):  # likewise
            d["augmentation"] = {k: v for k, v in d["augmentation"].items()
                                 if k not in ("p_bias_field", "bias_field_coeff")}
        blob = json.dumps(d, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def preprocessing_hash(self) -> str:
        """Hash of the fields that change the preprocessed arrays only."""
        keys = ("channels", "label_policy", "slice_axis", "crop_margin", "normalization", "target_spacing")
        d = {k: getattr(self, k) for k in keys}
        d["normalization"] = _normalization_for_hash(d["normalization"])
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def finalised(self) -> Plan:
        from mslpipe import __version__

        self.mslpipe_version = __version__
        self.hash = self.compute_hash()
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: object = "plan") -> Plan:
        if not isinstance(d, dict):
            raise MslpipeError("plan is not a JSON object", where)
        version = d.get("version")
        if not isinstance(version, int):
            raise MslpipeError("plan has no integer 'version'", where)
        if version > PLAN_VERSION:
            from mslpipe import __version__

            raise MslpipeError(
                f"plan version {version} was written by a newer mslpipe ({d.get('mslpipe_version', '?')}); "
                f"this mslpipe {__version__} reads plan version {PLAN_VERSION} or older. Upgrade mslpipe",
                where,
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MslpipeError(f"plan has unknown fields {unknown}", where)
        if "dataset" not in d:
            raise MslpipeError("plan has no 'dataset'", where)
        d = dict(d)
        aug = d.get("augmentation", {})
        try:
            aug_names = {f.name for f in dataclasses.fields(Augmentation)}
            bad = sorted(set(aug) - aug_names)
            if bad:
                raise MslpipeError(f"plan augmentation has unknown fields {bad}", where)
            d["augmentation"] = Augmentation(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()}
            )
            plan = cls(**d)
        except (TypeError, AttributeError) as exc:  # e.g. augmentation that is a list, not an object
            raise MslpipeError(f"invalid plan ({exc})", where) from exc
        plan.validate(where)
        return plan

    def validate(self, where: object = "plan") -> None:
        try:
            self._validate(where)
        except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong type
            raise MslpipeError(f"invalid plan ({exc})", where) from exc

    def _validate(self, where: object) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise MslpipeError(f"invalid plan: {msg}", where)

        need(self.label_policy in LABEL_POLICIES, f"label_policy must be one of {LABEL_POLICIES}")
        need(self.slice_axis in (0, 1, 2), "slice_axis must be 0, 1 or 2")
        need(isinstance(self.patch_size, list | tuple) and len(self.patch_size) == 2
             and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in self.patch_size),
             "patch_size must be two positive integers")
        need(len(self.channels) >= 1, "at least one channel")
        norm = self.normalization
        need(isinstance(norm, dict) and norm.get("scheme") in NORMALIZATION_SCHEMES
             and 0 <= norm.get("lower_pct", -1) < norm.get("upper_pct", -1) <= 100,
             f"normalization needs a scheme from {NORMALIZATION_SCHEMES} and 0 <= lower_pct < upper_pct <= 100")
        flat = norm.get("flatfield_mm", 0)
        need(isinstance(flat, int | float) and not isinstance(flat, bool) and 0 <= flat <= 500,
             "normalization flatfield_mm must be a number of mm from 0 (off) to 500")
        n4 = norm.get("n4_levels", 0)
        need(isinstance(n4, int) and not isinstance(n4, bool) and 0 <= n4 <= 6,
             "normalization n4_levels must be an integer from 0 (off) to 6")
        need(not (flat and n4), "normalization: choose flatfield_mm or n4_levels, not both")
        grid = norm.get("n4_grid_mm", N4_GRID_MM)
        need(isinstance(grid, int | float) and not isinstance(grid, bool) and 1 <= grid <= 20,
             "normalization n4_grid_mm must be a number of mm from 1 to 20")
        need(self.brain_ml_range is None or (isinstance(self.brain_ml_range, list | tuple)
                                             and len(self.brain_ml_range) == 2
                                             and 0 < self.brain_ml_range[0] <= self.brain_ml_range[1]),
             "brain_ml_range must be null or [smallest, largest] mL, both positive")
        need(isinstance(self.context_slices, int) and not isinstance(self.context_slices, bool)
             and 0 <= self.context_slices <= 4, "context_slices must be an integer from 0 to 4")
        need(self.batch_size >= 1 and self.epochs >= 1 and self.iterations_per_epoch >= 1,
             "batch_size, epochs and iterations_per_epoch must be positive")
        need(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers must be 0 or more")
        opt = self.optimizer if isinstance(self.optimizer, dict) else {}
        need(all(isinstance(opt.get(k, 0.0), int | float) and not isinstance(opt.get(k, 0.0), bool)
                 and math.isfinite(opt.get(k, 0.0)) for k in ("lr", "momentum", "weight_decay")),
             "the optimizer's lr, momentum and weight_decay must be numbers")
        need(opt.get("lr", 0.0) > 0,
             f"the learning rate (optimizer lr, train --lr) must be positive, not {opt.get('lr')}")
        need(0.0 <= opt.get("momentum", 0.0) < 1.0 and opt.get("weight_decay", 0.0) >= 0.0,
             "the optimizer's momentum must lie in [0, 1) and its weight_decay must not be negative")
        need(0.0 <= self.oversample_foreground <= 1.0, "oversample_foreground must lie in [0, 1]")
        need(self.loss in LOSSES, f"loss must be one of {LOSSES}")
        need(self.foreground_sampling in FOREGROUND_SAMPLING,
             f"foreground_sampling must be one of {FOREGROUND_SAMPLING}")
        need(0.0 <= self.ema_half_life <= 1.0, "ema_half_life must lie in [0, 1] (a fraction of the run)")
        need(isinstance(self.bn_recalibration_batches, int) and not isinstance(self.bn_recalibration_batches, bool)
             and self.bn_recalibration_batches >= 0, "bn_recalibration_batches must be a whole number >= 0")
        aug = self.augmentation
        need(0.0 <= aug.p_low_res <= 1.0, "augmentation p_low_res must lie in [0, 1]")
        need(len(aug.low_res_zoom) == 2 and 0.0 < min(aug.low_res_zoom) <= max(aug.low_res_zoom) <= 1.0,
             "augmentation low_res_zoom must be two zoom factors in (0, 1]")
        need(0.0 <= aug.p_bias_field <= 1.0, "augmentation p_bias_field must lie in [0, 1]")
        need(len(aug.bias_field_coeff) == 2 and 0.0 <= min(aug.bias_field_coeff) <= max(aug.bias_field_coeff) <= 1.0,
             "augmentation bias_field_coeff must be two coefficients in [0, 1]")
        need(self.postprocessing.get("connectivity", 26) in (6, 18, 26), "connectivity must be 6, 18 or 26")


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    plan.finalised()
    return write_json(path, plan.to_dict())


def load_plan(path: str | os.PathLike) -> Plan:
    path = Path(path)
    if not path.exists():
        raise MslpipeError("no plan here: run `mslpipe plan -d NAME` first", path)
    plan = Plan.from_dict(read_json(path), where=path)
    if plan.hash and plan.hash != plan.compute_hash():
        raise MslpipeError("plan was edited by hand and its hash no longer matches: "
                           "run `mslpipe plan` again or clear the 'hash' field", path)
    return plan


def apply_overrides(plan: Plan, overrides: dict[str, Any]) -> Plan:
    """Return a copy of ``plan`` with fields replaced (None values are ignored): top-level ones by name, the
    augmentation's as ``augmentation.NAME`` and the normalisation's as ``normalization.KEY``. A shading correction
    given alone (``flatfield_mm`` or ``n4_levels`` set) replaces the other; both set at once are refused."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    aug, norm = ({k.split(".", 1)[1]: changes.pop(k) for k in list(changes) if k.startswith(f"{part}.")}
                 for part in ("augmentation", "normalization"))
    names = {f.name for f in dataclasses.fields(Plan)}
    unknown = (sorted(set(changes) - names) + sorted(f"augmentation.{k}" for k in set(aug) - AUGMENTATION_FIELDS)
               + sorted(f"normalization.{k}" for k in set(norm) - NORMALIZATION_KEYS))
    if unknown:
        raise MslpipeError(f"unknown plan fields {unknown}")
    if aug:
        changes["augmentation"] = dataclasses.replace(changes.get("augmentation", plan.augmentation), **aug)
    for key, other in (SHADING_KEYS, SHADING_KEYS[::-1]):
        if norm.get(key) and other not in norm:
            norm[other] = 0
    if norm:
        changes["normalization"] = {**changes.get("normalization", plan.normalization), **norm}
    new = dataclasses.replace(plan, **changes)
    new.validate()
    return new.finalised()


# ---------------------------------------------------------------------------- work folders
@dataclass(frozen=True)
class Workdirs:
    """The four work folders; option > environment variable > ./NAME of the current directory."""

    raw: Path
    plans: Path
    preprocessed: Path
    results: Path

    @classmethod
    def resolve(cls, raw=None, plans=None, preprocessed=None, results=None) -> Workdirs:
        def pick(value, env, default):
            return Path(value or os.environ.get(env) or default).expanduser()

        return cls(
            raw=pick(raw, "MSLPIPE_RAW", "raw_data"),
            plans=pick(plans, "MSLPIPE_PLANS", "plans"),
            preprocessed=pick(preprocessed, "MSLPIPE_PREPROCESSED", "preprocessed"),
            results=pick(results, "MSLPIPE_RESULTS", "results"),
        )

    def plan_dir(self, name: str) -> Path:
        return self.plans / name

    def preprocessed_dir(self, name: str) -> Path:
        return self.preprocessed / name

    def results_dir(self, name: str, arch: str) -> Path:
        return self.results / name / arch

    def fold_dir(self, name: str, arch: str, fold: int | str) -> Path:
        return self.results_dir(name, arch) / f"fold_{fold}"
