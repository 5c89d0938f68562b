"""The search space: which `digits train` options vary between trials, and over what.

A space maps option names, as `digits train` spells them (`learning-rate`, `batch-size`), to a
list of values to choose from, or to a range `{min: A, max: B}` (numbers only; `log: true`
samples it evenly in log scale; an integer option's range gives integers). It comes from a
YAML or JSON file (`--space`) or from the preset's default below, and is checked here in full
(keys, types, every value and both ends of every range as `digits train` would check them)
before Ray starts. Ray Tune's sampling objects are made from it only in the search
(`to_tune`), so this module imports neither Ray nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

from digit_models.config import MODELS_WITH_DROPOUT, TrainConfig
from digit_models.errors import DigitsError
from digit_models.storage.files import open_binary, read_at_most

# The options that may differ between trials. The others are either the search's frame (the
# data, the validation split and seed every trial is ranked on, the workers and resources) or
# say how a run is carried out rather than what it learns.
TUNABLE = (
    "model",
    "epochs",
    "batch_size",
    "accumulate",
    "learning_rate",
    "scale_learning_rate",
    "lr_schedule",
    "augment",
    "label_smoothing",
    "dropout",
    "weight_average",
    "recompute_batchnorm",
    "all_reduce_dtype",
)

# The space searched when no --space is given, by preset: the settings docs/accuracy.md found
# to matter most for each preset's model, around the preset's own values. An option given on
# the command line is left out of it (it is fixed), and so is a dropout rate when no model of
# the search has dropout layers.
DEFAULT_SPACES: dict[str | None, dict] = {
    None: {
        "learning-rate": {"min": 3e-4, "max": 1e-2, "log": True},
        "batch-size": [32, 64, 128],
        "label-smoothing": [0.0, 0.1],
    },
    "fast": {
        "learning-rate": {"min": 1e-3, "max": 1e-2, "log": True},
        "batch-size": [64, 128, 256],
        "label-smoothing": [0.0, 0.05, 0.1],
    },
    "best": {
        "learning-rate": {"min": 5e-4, "max": 5e-3, "log": True},
        "batch-size": [32, 64, 128],
        "dropout": {"min": 0.1, "max": 0.4},
        "label-smoothing": [0.0, 0.1],
        "weight-average": [0.0, 0.99, 0.999],
        "augment": [True, False],
    },
}

SPACE_FILE_BYTES = 1 << 20  # far more than any space; a larger file is not one


def option(field: str) -> str:
    """A TrainConfig field as `digits train` spells the option."""
    return field.replace("_", "-")


def read_space(location: str) -> dict:
    """A --space file's mapping (YAML, of which JSON is a subset)."""
    import yaml

    with open_binary(location) as stream:
        text = read_at_most(stream, SPACE_FILE_BYTES, location, "a search space")
    try:
        space = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DigitsError(f"{location}: not YAML or JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(space, dict) or not space:
        raise DigitsError(
            f"{location}: expected a mapping of `digits train` option names to values "
            "or ranges, e.g. `learning-rate: {min: 0.0005, max: 0.01, log: true}`"
        )
    return space


def checked_space(space: dict, base: TrainConfig, fixed: dict, where: str) -> dict[str, dict]:
    """The space, keyed by TrainConfig field, each entry {"values": [...]} or {"min", "max",
    "log"}; refused (DigitsError, one line naming `where` and the option) at its first
    problem. `base` is a trial's configuration before sampling; `fixed`, the fields given on
    the command line, which cannot vary as well."""
    kinds = typing.get_type_hints(TrainConfig)
    checked: dict[str, dict] = {}
    for key, spec in space.items():
        field = _field(key, where)
        if field in fixed:
            raise DigitsError(
                f"{where}: {key}: given on the command line as well (--{option(field)}); give it in one place"
            )
        kind = next(t for t in typing.get_args(kinds[field]) or (kinds[field],) if t is not type(None))
        checked[field] = _checked_entry(spec, kind, f"{where}: {key}")
    models = [value for value in checked.get("model", {}).get("values", [base.model])]
    if "dropout" in checked and not any(model in MODELS_WITH_DROPOUT for model in models):
        raise DigitsError(
            f"{where}: dropout: no model of the search has dropout layers (these do: {', '.join(MODELS_WITH_DROPOUT)})"
        )
    for field, entry in checked.items():
        # With a dropout rate, a model that has dropout layers: the rate is dropped for trials
        # of the other models (trial_settings).
        frame = {"model": MODELS_WITH_DROPOUT[0]} if field == "dropout" else {}
        for value in entry.get("values", [entry.get("min"), entry.get("max")]):
            try:
                dataclasses.replace(base, **frame, **{field: value}).validate()
            except DigitsError as exc:
                raise DigitsError(f"{where}: {option(field)}: {exc}") from None
    return checked


def default_space(preset: str | None, base: TrainConfig, fixed: dict) -> dict[str, dict]:
    """The preset's default space, less the options fixed on the command line and, when no
    model of the search has dropout layers, the dropout rate."""
    space = {
        key: spec
        for key, spec in DEFAULT_SPACES[preset].items()
        if key.replace("-", "_") not in fixed and not (key == "dropout" and base.model not in MODELS_WITH_DROPOUT)
    }
    if not space:
        raise DigitsError(
            f"every option of the default search space{f' of --preset {preset}' if preset else ''} "
            f"({', '.join(DEFAULT_SPACES[preset])}) is fixed on the command line; "
            "give a --space of options to vary"
        )
    return checked_space(space, base, fixed, "the default search space")


def trial_settings(sampled: dict, model: str) -> dict:
    """A trial's sampled settings as TrainConfig fields: a dropout rate only for a model with
    dropout layers (a space may vary both the model and the rate; `model` is the trials' own
    unless sampled)."""
    if sampled.get("model", model) not in MODELS_WITH_DROPOUT:
        return {field: value for field, value in sampled.items() if field != "dropout"}
    return dict(sampled)


def to_tune(space: dict[str, dict]) -> dict:
    """Ray Tune's sampling objects for a checked space."""
    from ray import tune

    def sampler(entry: dict):
        if "values" in entry:
            return tune.choice(entry["values"])
        low, high = entry["min"], entry["max"]
        if isinstance(low, int) and isinstance(high, int):  # both ends included
            return tune.lograndint(low, high + 1) if entry["log"] else tune.randint(low, high + 1)
        return tune.loguniform(low, high) if entry["log"] else tune.uniform(low, high)

    return {field: sampler(entry) for field, entry in space.items()}


def _field(key, where: str) -> str:
    name = str(key).removeprefix("--")
    field = name.replace("-", "_")
    if field in TUNABLE:
        return field
    every = [f.name for f in dataclasses.fields(TrainConfig)]
    if field in every:
        raise DigitsError(
            f"{where}: {key}: cannot vary between trials (give it on the command line "
            f"to fix it for all); these can: {', '.join(map(option, TUNABLE))}"
        )
    close = difflib.get_close_matches(name, [option(f) for f in TUNABLE], n=1)
    raise DigitsError(
        f"{where}: {key}: not a `digits train` option that can vary"
        + (f"; did you mean {close[0]}?" if close else f"; these can: {', '.join(map(option, TUNABLE))}")
    )


def _checked_entry(spec, kind: type, where: str) -> dict:
    if isinstance(spec, list):
        if not spec:
            raise DigitsError(f"{where}: an empty list; give at least one value")
        return {"values": [_value(value, kind, where) for value in spec]}
    if isinstance(spec, dict) and {"min", "max"} <= set(spec) <= {"min", "max", "log"}:
        if kind not in (int, float):
            raise DigitsError(f"{where}: a range, but the option takes {_kind_name(kind)}; give a list of values")
        low, high = _value(spec["min"], kind, where), _value(spec["max"], kind, where)
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise DigitsError(f"{where}: log: {log!r}; expected true or false")
        if not low < high:
            raise DigitsError(f"{where}: min {low} is not below max {high}")
        if log and low <= 0:
            raise DigitsError(f"{where}: min {low}: a log-scale range must be above 0")
        return {"min": low, "max": high, "log": log}
    raise DigitsError(
        f"{where}: {' '.join(repr(spec).split())[:80]}: expected a list of values or "
        "{min: A, max: B} (with log: true for a log scale)"
    )


def _value(value, kind: type, where: str):
    """The value as the option's type: an integer for an integer option, a number (made a
    float) for a float option, true or false for a switch, text for a choice."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise DigitsError(f"{where}: {value!r} is not {_kind_name(kind)}")


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}[kind]
