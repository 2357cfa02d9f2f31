"""S-CFG parameters: defaults, validation, and the infotext round trip.

The field order of ``FIELDS`` is the order of the script's ``ui()`` components and so of the
positional API args; never reorder it, only append.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .segment import PRESETS, REGIONS

HIRES_MODES = ("same", "off", "own")
TEST_FAULTS = ("", "cross_attention", "result", "oom", "setup", "teardown", "preview")
INFOTEXT_PREFIX = "S-CFG"  # incantations writes "SCFG ..." keys; ours must never collide


class ScfgParamError(ValueError):
    """A parameter outside its allowed values; the message names it and the allowed range."""


@dataclass(frozen=True)
class Field:
    name: str
    default: object
    label: str  # infotext key suffix
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None


FIELDS: tuple[Field, ...] = (
    Field("enabled", False, ""),
    Field("strength", 1.0, "strength", 0.0, 3.0),
    Field("preset", "official", "preset", choices=PRESETS),
    Field("refine_power", 4, "refine power", 1, 8),
    Field("region", "foreground", "region", choices=REGIONS),
    Field("min_rate", 0.8, "min rate", 0.0, 5.0),
    Field("max_rate", 3.0, "max rate", 0.0, 10.0),
    Field("max_scale", 15.0, "max scale", 1.0, 100.0),
    Field("start", 0.0, "start", 0.0, 1.0),
    Field("end", 1.0, "end", 0.0, 1.0),
    Field("levels", "auto", "levels"),
    Field("hires", "same", "hires", choices=HIRES_MODES),
    Field("hires_strength", 1.0, "hires strength", 0.0, 3.0),
    Field("hires_min_rate", 0.8, "hires min rate", 0.0, 5.0),
    Field("hires_max_rate", 3.0, "hires max rate", 0.0, 10.0),
    Field("show_maps", False, "show maps"),
    Field("overlay", False, "overlay"),  # appended after show_maps: positional args keep their places
)
FIELD_BY_NAME = {f.name: f for f in FIELDS}
PAIRS = (("min_rate", "max_rate"), ("hires_min_rate", "hires_max_rate"), ("start", "end"))  # low <= high
# Earlier names, still accepted so that old API clients and old images' infotexts keep working.
OLD_NAMES = {"steps": "refine_power"}
OLD_INFOTEXT_KEYS = {f"{INFOTEXT_PREFIX} R": "refine_power"}


@dataclass(frozen=True)
class ScfgParams:
    enabled: bool = False
    strength: float = 1.0
    preset: str = "official"
    refine_power: int = 4  # R of eq. 10: how many self-attention powers are averaged
    region: str = "foreground"
    min_rate: float = 0.8
    max_rate: float = 3.0
    max_scale: float = 15.0
    start: float = 0.0
    end: float = 1.0
    levels: str = "auto"
    hires: str = "same"
    hires_strength: float = 1.0
    hires_min_rate: float = 0.8
    hires_max_rate: float = 3.0
    show_maps: bool = False
    overlay: bool = False  # the token regions drawn over the image itself
    # Named API form only. api_previews: return the previews as extra images in the API response
    # (clients that expect N images get N otherwise). test_fault, for end-to-end tests of the
    # fallback path: "cross_attention" or "result" makes that stage of every step raise, "oom" the
    # capture raise a CUDA out-of-memory error, "setup" / "teardown" / "preview" those stages raise.
    # raw_maps: keep every step's low-resolution maps (token labels, foreground, rate) of every
    # image for GET /scfg/v1/status (last_run.maps), e.g. to measure segmentation.
    api_previews: bool = False
    raw_maps: bool = False
    test_fault: str = ""

    def for_hires(self) -> ScfgParams | None:
        """The parameters of the hires-fix pass: the same, none (off), or the hires values."""
        if self.hires == "off":
            return None
        if self.hires == "same":
            return self
        return dataclasses.replace(self, strength=self.hires_strength,
                                   min_rate=self.hires_min_rate, max_rate=self.hires_max_rate)

    def active_at(self, step: int, total: int) -> bool:
        """Whether sampler call ``step`` (0-based) of ``total`` lies inside [start, end].

        Progress runs from 0 at the first call to 1 at the last, so start = 0 and end = 1 take all.
        """
        return self.start <= step / max(total - 1, 1) <= self.end

    def level_factors(self) -> tuple[int, ...] | None:
        """Explicit downsample factors, or None for the per-architecture default."""
        return parse_levels(self.levels)


def parse_levels(text: str) -> tuple[int, ...] | None:
    """"auto" -> None; "4,8" -> (4, 8). Factors must be powers of two from 1 to 64."""
    text = str(text).strip().lower()
    if text in ("", "auto"):
        return None
    try:
        values = tuple(sorted({int(v) for v in text.replace(" ", "").split(",") if v}))
    except ValueError:
        values = ()
    if not values or any(v < 1 or v > 64 or v & (v - 1) for v in values):
        raise ScfgParamError(
            f"S-CFG parameter 'levels' must be 'auto' or comma-separated downsample factors "
            f"from 1, 2, 4, 8, 16, 32, 64 (e.g. '4,8'), got {text!r}")
    return values


def _coerce(field: Field, value):
    """One value to the field's type, or ScfgParamError naming the field and its range.

    Numbers may come as numbers or numeric strings (infotexts are text); a bool where a number is
    meant, null, lists, dicts, NaN and infinities are refused; a switch takes a bool, 0 / 1 or a
    yes/no word.
    """
    default = field.default
    try:
        if value is None or isinstance(value, (list, tuple, dict, set)):
            raise ValueError(value)
        if isinstance(default, bool):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes", "on")
            if not isinstance(value, (bool, int, float)) or value not in (0, 1):  # NaN, 2, -1: refused
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number) or number != int(number):
                raise ValueError(value)
            value = int(number)
        elif isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError(value)
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(value)
        else:
            if isinstance(value, bool):
                raise ValueError(value)
            value = str(value).strip()
    except (TypeError, ValueError, OverflowError):
        message = f"S-CFG parameter '{field.name}' {_allowed(field)}, got {_shown(value)}"
        raise ScfgParamError(message) from None
    if field.choices is not None and value not in field.choices:
        raise ScfgParamError(f"S-CFG parameter '{field.name}' {_allowed(field)}, got {_shown(value)}")
    if field.low is not None and not (field.low <= value <= field.high):
        raise ScfgParamError(f"S-CFG parameter '{field.name}' {_allowed(field)}, got {_shown(value)}")
    return value


def _shown(value) -> str:
    """A value for an error message, cut short (an API client may send anything)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed(field: Field) -> str:
    if field.choices is not None:
        return f"must be one of {', '.join(map(str, field.choices))}"
    if field.low is not None:
        return f"must be in [{field.low}, {field.high}]"
    return f"must be a {type(field.default).__name__}"


def make_params(**values) -> ScfgParams:
    """Validated parameters from keyword values; unknown names are an error."""
    test_fault = str(values.pop("test_fault", "") or "")
    if test_fault not in TEST_FAULTS:
        raise ScfgParamError(f"S-CFG parameter 'test_fault' must be one of {TEST_FAULTS}, got {test_fault!r}")
    api_previews = _coerce(Field("api_previews", False, ""), values.pop("api_previews", False))
    raw_maps = _coerce(Field("raw_maps", False, ""), values.pop("raw_maps", False))
    for old, new in OLD_NAMES.items():
        if old in values:
            if new in values:
                raise ScfgParamError(f"S-CFG parameter '{old}' is the old name of '{new}': give one of them")
            values[new] = values.pop(old)
    unknown = set(values) - set(FIELD_BY_NAME)
    if unknown:
        raise ScfgParamError(f"unknown S-CFG parameter(s) {sorted(unknown)}; "
                             f"known: {', '.join(FIELD_BY_NAME)}")
    clean = {name: _coerce(FIELD_BY_NAME[name], v) for name, v in values.items()}
    params = ScfgParams(**clean, api_previews=api_previews, raw_maps=raw_maps, test_fault=test_fault)
    parse_levels(params.levels)
    for low, high in PAIRS:
        if getattr(params, low) > getattr(params, high):
            raise ScfgParamError(f"S-CFG parameter '{low}' ({getattr(params, low)}) must not exceed "
                                 f"'{high}' ({getattr(params, high)})")
    return params


def from_script_args(args: tuple | list) -> ScfgParams:
    """Parameters from the script's positional args, or from one dict (the API's named form).

    Missing trailing args take their defaults, as A1111 fills them for the API. In the named form the
    WebUI's API still fills the positions after the dict with the UI's defaults; they are ignored.
    """
    if args and isinstance(args[0], dict):
        return make_params(**args[0])
    if len(args) > len(FIELDS):
        raise ScfgParamError(f"S-CFG takes at most {len(FIELDS)} positional args "
                             f"({', '.join(f.name for f in FIELDS)}), got {len(args)}")
    return make_params(**{f.name: v for f, v in zip(FIELDS, args, strict=False)})


def infotext_key(field: Field) -> str:
    return f"{INFOTEXT_PREFIX} {field.label}" if field.label else INFOTEXT_PREFIX


def to_infotext(params: ScfgParams) -> dict[str, str]:
    """Every parameter as infotext key/value pairs (written only for enabled runs)."""
    out = {}
    for field in FIELDS:
        if field.name == "enabled":
            out[infotext_key(field)] = "True"
            continue
        value = getattr(params, field.name)
        out[infotext_key(field)] = str(value)
    return out


def sanitize_infotext(pairs: dict) -> tuple[dict, list[str]]:
    """An infotext's S-CFG keys with every unreadable value replaced by its default, and one message
    per replaced key: a garbled key must never break the paste of the rest of the infotext."""
    clean, problems = dict(pairs), []
    keys = {infotext_key(f): f for f in FIELDS[1:]}
    keys.update({key: FIELD_BY_NAME[name] for key, name in OLD_INFOTEXT_KEYS.items()})
    for key, field in keys.items():
        if key in clean:
            try:
                _coerce(field, clean[key])
                if field.name == "levels":
                    parse_levels(clean[key])
            except ScfgParamError as error:
                problems.append(f"{error}; pasted as {field.default!r}")
                clean[key] = str(field.default)
    for low, high in PAIRS:
        keys_ = [infotext_key(FIELD_BY_NAME[name]) for name in (low, high)]
        values = [float(clean.get(key, FIELD_BY_NAME[name].default))
                  for key, name in zip(keys_, (low, high), strict=True)]
        if values[0] > values[1]:
            problems.append(f"S-CFG parameter '{low}' ({values[0]}) exceeds '{high}' ({values[1]}); "
                            "both pasted as their defaults")
            for key, name in zip(keys_, (low, high), strict=True):
                clean[key] = str(FIELD_BY_NAME[name].default)
    return clean, problems


def from_infotext(pairs: dict[str, str]) -> ScfgParams:
    """Parameters from parsed infotext; keys that are absent take their defaults.

    An infotext without the "S-CFG" key means S-CFG was off.
    """
    if INFOTEXT_PREFIX not in pairs:
        return ScfgParams()
    values = {name: pairs[key] for key, name in OLD_INFOTEXT_KEYS.items() if key in pairs}
    values.update({f.name: pairs[infotext_key(f)] for f in FIELDS if infotext_key(f) in pairs})
    values["enabled"] = pairs[INFOTEXT_PREFIX]
    return make_params(**values)

