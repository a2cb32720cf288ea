"""plans: Plan serialisation, versioning, hashing, validation, overrides and Workdirs.resolve."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mslpipe.errors import MslpipeError
from mslpipe.plans import PLAN_VERSION, Plan, Workdirs, apply_overrides, load_plan, save_plan


def _plan() -> Plan:
    return Plan(dataset="ms", n_raters=2, patch_size=[64, 48], arch_kwargs={"base_channels": 8})


def _saved(tmp_path) -> Path:
    return save_plan(_plan(), tmp_path / "plans.json")


def _edit(path: Path, **changes) -> dict:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))
    return d


def _check_error(info, path, *words):
    msg = str(info.value)
    assert str(path) in msg, msg
    for word in words:
        assert word.lower() in msg.lower(), msg


def test_round_trip_with_stable_hash(tmp_path):
    plan = _plan()
    path = save_plan(plan, tmp_path / "plans.json")
    assert len(plan.hash) == 16 and plan.mslpipe_version
    loaded = load_plan(path)
    assert loaded == plan
    assert loaded.to_dict() == plan.to_dict()
    assert loaded.hash == plan.hash == loaded.compute_hash()
    assert isinstance(loaded.augmentation.scale_range, tuple)
    # saving again gives the same file and the same hash
    save_plan(loaded, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()
    assert Plan(dataset="ms").compute_hash() == Plan(dataset="ms").compute_hash()


def test_plans_written_before_context_slices_keep_their_hash(tmp_path):
    """A plan saved before the field existed has none; it loads as plain 2D with its hash still valid."""
    import hashlib

    old = _plan().finalised().to_dict()
    del old["foreground_sampling"], old["bn_recalibration_batches"]  # added later than all of these
    del old["context_slices"], old["ema_half_life"], old["brain_ml_range"]
    for key in ("p_low_res", "low_res_zoom", "p_bias_field", "bias_field_coeff"):  # added later still
        del old["augmentation"][key]
    # the hash as mslpipe computed it before the field existed
    body = {k: v for k, v in old.items() if k not in ("hash", "mslpipe_version")}
    old["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, default=list).encode()).hexdigest()[:16]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = load_plan(path)
    assert loaded.context_slices == 0 and loaded.input_channels == len(loaded.channels)
    deeper = apply_overrides(loaded, {"context_slices": 2})
    assert deeper.hash != loaded.hash and deeper.input_channels == 5 * len(loaded.channels)
    assert deeper.preprocessing_hash() == loaded.preprocessing_hash()  # context is built on the fly


def test_plans_written_before_low_res_augmentation_keep_their_hash(tmp_path):
    """Plans saved before p_low_res existed load with it off and their hash intact; turning it on re-hashes."""
    import hashlib

    old = _plan().finalised().to_dict()
    del old["foreground_sampling"], old["bn_recalibration_batches"]  # added later than all of these
    del old["ema_half_life"], old["brain_ml_range"]  # added later still
    for key in ("p_low_res", "low_res_zoom", "p_bias_field", "bias_field_coeff"):
        del old["augmentation"][key]
    body = {k: v for k, v in old.items() if k not in ("hash", "mslpipe_version", "context_slices")}
    old["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, default=list).encode()).hexdigest()[:16]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = load_plan(path)
    assert loaded.augmentation.p_low_res == 0.0
    on = apply_overrides(loaded, {"augmentation": dataclasses.replace(loaded.augmentation, p_low_res=0.25)})
    assert on.hash != loaded.hash and on.augmentation.p_low_res == 0.25


def test_plans_written_before_weight_averaging_keep_their_hash(tmp_path):
    """Plans saved before ema_half_life existed train their last weights, hash intact; setting it re-hashes."""
    import hashlib

    old = _plan().finalised().to_dict()
    del old["foreground_sampling"], old["bn_recalibration_batches"]  # added later than all of these
    del old["ema_half_life"], old["brain_ml_range"]
    body = {k: v for k, v in old.items() if k not in ("hash", "mslpipe_version", "context_slices")}
    body["augmentation"] = {k: v for k, v in body["augmentation"].items()
                            if k not in ("p_low_res", "low_res_zoom", "p_bias_field", "bias_field_coeff")}
    old["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, default=list).encode()).hexdigest()[:16]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = load_plan(path)
    assert loaded.ema_half_life == 0.0
    on = apply_overrides(loaded, {"ema_half_life": 0.05})
    assert on.hash != loaded.hash and on.ema_half_life == 0.05


def test_plans_written_before_lesion_sampling_keep_their_hash(tmp_path):
    """Plans saved before foreground_sampling existed draw lesion slices uniformly, hash intact; "lesion" re-hashes."""
    plan = _plan().finalised()
    old = plan.to_dict()
    del old["foreground_sampling"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = load_plan(path)
    assert loaded.foreground_sampling == "slice" and loaded.hash == plan.hash
    on = apply_overrides(loaded, {"foreground_sampling": "lesion"})
    assert on.hash != loaded.hash and on.foreground_sampling == "lesion"


def test_plans_written_before_bias_field_augmentation_keep_their_hash(tmp_path):
    """Plans saved before p_bias_field existed load with it off, hash intact; turning it on re-hashes."""
    plan = _plan().finalised()
    old = plan.to_dict()
    for key in ("p_bias_field", "bias_field_coeff"):
        del old["augmentation"][key]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = load_plan(path)
    assert loaded.augmentation.p_bias_field == 0.0 and loaded.hash == plan.hash
    on = apply_overrides(loaded, {"augmentation": dataclasses.replace(loaded.augmentation, p_bias_field=0.3)})
    assert on.hash != loaded.hash and on.augmentation.p_bias_field == 0.3
    wider = apply_overrides(on, {"augmentation": dataclasses.replace(on.augmentation, bias_field_coeff=(0.0, 0.2))})
    assert wider.hash != on.hash


def test_brain_volume_range_is_quality_control_only(tmp_path):
    """brain_ml_range changes no training or preprocessing: not hashed; plans without it load with no range."""
    plan = _plan().finalised()
    ranged = apply_overrides(plan, {"brain_ml_range": [1100.0, 1500.0]})
    assert ranged.hash == plan.hash and ranged.preprocessing_hash() == plan.preprocessing_hash()
    old = plan.to_dict()
    del old["brain_ml_range"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert load_plan(path).brain_ml_range is None


@pytest.mark.parametrize("value", [-0.1, 1.5, "half"])
def test_invalid_ema_half_life_is_refused(tmp_path, value):
    path = _saved(tmp_path)
    _edit(path, ema_half_life=value, hash="")
    with pytest.raises(MslpipeError) as info:
        load_plan(path)
    _check_error(info, path, "invalid plan", "ema_half_life" if value != "half" else "")


@pytest.mark.parametrize("change", [{"p_low_res": 1.5}, {"p_low_res": -0.1}, {"low_res_zoom": [0.0, 1.0]},
                                    {"low_res_zoom": [0.5, 1.5]}, {"low_res_zoom": [0.5]}, {"p_bias_field": 1.5},
                                    {"p_bias_field": -0.2}, {"bias_field_coeff": [-0.1, 0.1]},
                                    {"bias_field_coeff": [0.0, 2.0]}, {"bias_field_coeff": [0.1]}])
def test_invalid_low_res_or_bias_field_augmentation_is_refused(tmp_path, change):
    path = _saved(tmp_path)
    d = json.loads(path.read_text())
    _edit(path, augmentation={**d["augmentation"], **change}, hash="")
    with pytest.raises(MslpipeError) as info:
        load_plan(path)
    _check_error(info, path, "invalid plan", next(iter(change)))



def test_an_unknown_loss_is_refused(tmp_path):
    """``loss`` names one of LOSSES: a typo is refused, not trained with the default."""
    path = _saved(tmp_path)
    _edit(path, loss="dice_bce", hash="")
    with pytest.raises(MslpipeError) as info:
        load_plan(path)
    _check_error(info, path, "invalid plan", "loss must be one of")

def test_hash_ignores_mslpipe_version(tmp_path):
    plan = _plan().finalised()
    other = Plan.from_dict({**plan.to_dict(), "mslpipe_version": "9.9.9"})
    assert other.compute_hash() == plan.hash


def test_newer_plan_version_is_refused(tmp_path):
    path = _saved(tmp_path)
    _edit(path, version=PLAN_VERSION + 1)
    with pytest.raises(MslpipeError) as info:
        load_plan(path)
    _check_error(info, path, f"plan version {PLAN_VERSION + 1}", f"plan version {PLAN_VERSION} or older",
                 "upgrade")


def test_plan_without_version_is_refused(tmp_path):
    path = _saved(tmp_path)
    d = json.loads(path.read_text())
    del d["version"]
    path.write_text(json.dumps(d))
    with pytest.raises(MslpipeError) as info:
        load_plan(path)
    _check_error(info, path, "version")


def test_unknown_fields_are_refused(tmp_path):
    path = _saved(tmp_path)
    _edit(path, learning_rate=0.1, hash="")
    with pytest.raises(MslpipeError) as info:
        load_plan(path)
    _check_error(info, path, "unknown fields", "learning_rate")


def test_unknown_augmentation_fields_are_refused(tmp_path):
    path = _saved(tmp_path)
    d = json.loads(path.read_text())
    d["augmentation"]["p_flip"] = 0.5
    d["hash"] = ""
    path.write_text(json.dumps(d))
    with pytest.raises(MslpipeError) as info:
        load_plan(path)
    _check_error(info, path, "augmentation", "p_flip")


def test_hand_edited_plan_is_refused(tmp_path):
    path = _saved(tmp_path)
    _edit(path, epochs=7)
    with pytest.raises(MslpipeError) as info:
        load_plan(path)
    _check_error(info, path, "edited by hand", "hash")
    # clearing the hash accepts the edit
    _edit(path, hash="")
    assert load_plan(path).epochs == 7


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("label_policy", "majority", ("label_policy",)),
        ("patch_size", [64], ("patch_size",)),
        ("patch_size", [0, 64], ("patch_size",)),
        ("patch_size", [-32, 64], ("patch_size",)),
        ("patch_size", [64.5, 64], ("patch_size",)),
        ("patch_size", 64, ("patch_size",)),
        ("patch_size", ["a", "b"], ("patch_size",)),
        ("slice_axis", 3, ("slice_axis",)),
        ("channels", [], ("channel",)),
        ("batch_size", 0, ("batch_size",)),
        ("batch_size", "many", ("invalid plan",)),
        ("oversample_foreground", 1.5, ("oversample_foreground",)),
        ("postprocessing", {"connectivity": 4}, ("connectivity",)),
        ("context_slices", -1, ("context_slices",)),
        ("context_slices", 5, ("context_slices",)),
        ("context_slices", 1.0, ("context_slices",)),
        ("context_slices", True, ("context_slices",)),
    ],
)
def test_invalid_values_are_refused(tmp_path, field, value, words):
    path = _saved(tmp_path)
    _edit(path, **{field: value, "hash": ""})
    with pytest.raises(MslpipeError) as info:
        load_plan(path)
    _check_error(info, path, "invalid plan", *words)


@pytest.mark.parametrize("bad", [[], None, 5, [["p_rotate", 0.5]]])
def test_augmentation_that_is_not_an_object_is_refused(tmp_path, bad):
    path = _saved(tmp_path)
    _edit(path, augmentation=bad, hash="")
    with pytest.raises(MslpipeError) as info:
        load_plan(path)
    _check_error(info, path, "plan")


def test_invalid_json_and_missing_plan(tmp_path):
    with pytest.raises(MslpipeError) as info:
        load_plan(tmp_path / "plans.json")
    _check_error(info, tmp_path / "plans.json", "mslpipe plan")
    (tmp_path / "plans.json").write_text("[1, 2]")
    with pytest.raises(MslpipeError) as info:
        load_plan(tmp_path / "plans.json")
    _check_error(info, tmp_path / "plans.json", "not a json object")


def test_apply_overrides_changes_the_hash():
    plan = _plan().finalised()
    new = apply_overrides(plan, {"crop_margin": 2, "epochs": None})
    assert new.crop_margin == 2 and new.epochs == plan.epochs  # None means "keep"
    assert new.hash != plan.hash and new.hash == new.compute_hash()
    assert new.preprocessing_hash() != plan.preprocessing_hash()
    assert plan.crop_margin == 4  # the original is untouched
    only_training = apply_overrides(plan, {"epochs": 3})
    assert only_training.hash != plan.hash
    assert only_training.preprocessing_hash() == plan.preprocessing_hash()
    assert apply_overrides(plan, {}).hash == plan.hash


def test_apply_overrides_of_one_augmentation_field():
    """``augmentation.NAME`` replaces that field alone; an unknown one or an invalid value is refused."""
    plan = _plan().finalised()
    plan.augmentation.p_rotate = 0.5
    new = apply_overrides(plan.finalised(), {"augmentation.p_bias_field": 0.4, "augmentation.p_noise": None})
    assert new.augmentation.p_bias_field == 0.4 and new.augmentation.p_rotate == 0.5
    assert new.augmentation.p_noise == plan.augmentation.p_noise and new.hash != plan.hash
    with pytest.raises(MslpipeError, match=r"unknown plan fields \['augmentation.p_wobble'\]"):
        apply_overrides(plan, {"augmentation.p_wobble": 0.1})
    with pytest.raises(MslpipeError, match="p_bias_field must lie in"):
        apply_overrides(plan, {"augmentation.p_bias_field": 2.0})


def test_apply_overrides_refuses_unknown_and_invalid():
    plan = _plan().finalised()
    with pytest.raises(MslpipeError, match="unknown plan fields.*lr"):
        apply_overrides(plan, {"lr": 0.1})
    with pytest.raises(MslpipeError, match="label_policy"):
        apply_overrides(plan, {"label_policy": "vote"})
    with pytest.raises(MslpipeError, match="patch_size"):
        apply_overrides(plan, {"patch_size": [64, 0]})


# ---------------------------------------------------------------------------- Workdirs
_ENV = {"raw": "MSLPIPE_RAW", "plans": "MSLPIPE_PLANS", "preprocessed": "MSLPIPE_PREPROCESSED",
        "results": "MSLPIPE_RESULTS"}
_DEFAULT = {"raw": "raw_data", "plans": "plans", "preprocessed": "preprocessed", "results": "results"}


def test_workdirs_defaults(monkeypatch):
    for env in _ENV.values():
        monkeypatch.delenv(env, raising=False)
    d = Workdirs.resolve()
    for name, default in _DEFAULT.items():
        assert getattr(d, name) == Path(default)


def test_workdirs_env_over_default_and_option_over_env(monkeypatch, tmp_path):
    for name, env in _ENV.items():
        monkeypatch.setenv(env, str(tmp_path / f"env_{name}"))
    d = Workdirs.resolve()
    for name in _ENV:
        assert getattr(d, name) == tmp_path / f"env_{name}"
    d = Workdirs.resolve(raw=tmp_path / "opt_raw", results=str(tmp_path / "opt_results"))
    assert d.raw == tmp_path / "opt_raw" and d.results == tmp_path / "opt_results"
    assert d.plans == tmp_path / "env_plans" and d.preprocessed == tmp_path / "env_preprocessed"


def test_workdirs_empty_env_falls_back_to_default(monkeypatch):
    monkeypatch.setenv("MSLPIPE_RAW", "")
    assert Workdirs.resolve().raw == Path("raw_data")


def test_workdirs_expand_user_and_sub_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MSLPIPE_PLANS", "~/p")
    d = Workdirs.resolve(results="~/r")
    assert d.plans == tmp_path / "p" and d.results == tmp_path / "r"
    assert d.plan_dir("ms") == tmp_path / "p" / "ms"
    assert d.fold_dir("ms", "leaky_unet", 3) == tmp_path / "r" / "ms" / "leaky_unet" / "fold_3"


def test_apply_overrides_of_one_normalization_key():
    """``normalization.KEY`` replaces that key alone (0 flat field hashes as none); an unknown key or an invalid
    value is refused."""
    plan = _plan().finalised()
    new = apply_overrides(plan, {"normalization.scheme": "brain_percentile_median_iqr",
                                 "normalization.flatfield_mm": None})
    assert new.normalization == {**plan.normalization, "scheme": "brain_percentile_median_iqr"}
    assert new.preprocessing_hash() != plan.preprocessing_hash()
    assert apply_overrides(plan, {"normalization.flatfield_mm": 0}).hash == plan.hash
    flat = apply_overrides(plan, {"normalization.flatfield_mm": 25})
    assert flat.normalization["flatfield_mm"] == 25 and flat.normalization["upper_pct"] == 99.5
    with pytest.raises(MslpipeError, match=r"unknown plan fields \['normalization.gamma'\]"):
        apply_overrides(plan, {"normalization.gamma": 2})
    with pytest.raises(MslpipeError, match="flatfield_mm"):
        apply_overrides(plan, {"normalization.flatfield_mm": -3})
    assert apply_overrides(plan, {"normalization.n4_levels": 0}).hash == plan.hash
    assert apply_overrides(plan, {"normalization.n4_levels": 3}).normalization["n4_levels"] == 3
    n4 = apply_overrides(flat, {"normalization.n4_levels": 3})  # one shading correction given alone replaces the other
    assert n4.normalization["n4_levels"] == 3 and not n4.normalization["flatfield_mm"]
    assert apply_overrides(n4, {"normalization.flatfield_mm": 25}).normalization["n4_levels"] == 0
    with pytest.raises(MslpipeError, match="not both"):
        apply_overrides(plan, {"normalization.n4_levels": 3, "normalization.flatfield_mm": 25})
