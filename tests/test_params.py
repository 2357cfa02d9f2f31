import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scfg_ext import (
    FIELDS,
    ScfgParamError,
    ScfgParams,
    from_infotext,
    from_script_args,
    make_params,
    to_infotext,
)
from scfg_ext.params import infotext_key, parse_levels, sanitize_infotext
from scfg_ext.webapi import api_args_error


def test_defaults_are_the_authors():
    p = ScfgParams()
    assert (p.enabled, p.preset, p.refine_power, p.min_rate, p.max_rate, p.max_scale) == \
        (False, "official", 4, 0.8, 3.0, 15.0)
    named_only = ("api_previews", "raw_maps", "test_fault")
    assert [f.name for f in FIELDS] == [n for n in ScfgParams.__dataclass_fields__ if n not in named_only]
    assert all(getattr(p, f.name) == f.default for f in FIELDS)


valid = st.fixed_dictionaries({
    "enabled": st.booleans(),
    "strength": st.floats(0, 3).map(lambda x: round(x, 3)),
    "preset": st.sampled_from(["official", "paper"]),
    "refine_power": st.integers(1, 8),
    "region": st.sampled_from(["foreground", "mean"]),
    "min_rate": st.floats(0, 2).map(lambda x: round(x, 3)),
    "max_rate": st.floats(2, 10).map(lambda x: round(x, 3)),
    "max_scale": st.floats(1, 100).map(lambda x: round(x, 3)),
    "start": st.floats(0, 0.5).map(lambda x: round(x, 3)),
    "end": st.floats(0.5, 1).map(lambda x: round(x, 3)),
    "levels": st.sampled_from(["auto", "4", "4,8", "2,4"]),
    "hires": st.sampled_from(["same", "off", "own"]),
    "hires_strength": st.floats(0, 3).map(lambda x: round(x, 3)),
    "show_maps": st.booleans(),
    "overlay": st.booleans(),
})


@given(valid)
def test_infotext_round_trip(values):
    params = make_params(**{**values, "enabled": True})
    pairs = to_infotext(params)
    assert all(k.startswith("S-CFG") and not k.startswith("SCFG") for k in pairs)
    assert from_infotext(pairs) == params


@given(valid)
def test_positional_and_named_args_agree(values):
    positional = [values.get(f.name, f.default) for f in FIELDS]
    assert from_script_args(positional) == from_script_args([values]) == make_params(**values)


def test_infotext_without_scfg_means_off():
    assert from_infotext({"Steps": "20"}) == ScfgParams()


def test_named_form_ignores_the_ui_defaults_the_api_appends():
    defaults = [f.default for f in FIELDS][1:]
    assert from_script_args([{"enabled": True, "max_rate": 2.0}, *defaults]) == \
        ScfgParams(enabled=True, max_rate=2.0)


def test_missing_trailing_args_take_defaults():
    assert from_script_args([True, 1.5]) == ScfgParams(enabled=True, strength=1.5)


@pytest.mark.parametrize("name,value,message", [
    ("min_rate", 7, r"'min_rate' must be in \[0.0, 5.0\], got 7"),
    ("preset", "fancy", "'preset' must be one of official, paper"),
    ("refine_power", 2.5, r"'refine_power' must be in \[1, 8\]"),
    ("refine_power", 0, r"'refine_power' must be in \[1, 8\]"),
    ("strength", "strong", r"'strength' must be in \[0.0, 3.0\]"),
    ("enabled", "maybe", "'enabled'"),
    ("levels", "3", "'levels' must be 'auto' or comma-separated"),
    ("test_fault", "elsewhere", "'test_fault'"),
])
def test_bad_values_name_the_parameter_and_range(name, value, message):
    with pytest.raises(ScfgParamError, match=message):
        make_params(**{name: value})


def test_inconsistent_pairs_and_unknown_names():
    with pytest.raises(ScfgParamError, match=r"'min_rate' .* must not exceed 'max_rate'"):
        make_params(min_rate=2.0, max_rate=1.0)
    with pytest.raises(ScfgParamError, match=r"'start' .* must not exceed 'end'"):
        make_params(start=0.8, end=0.2)
    with pytest.raises(ScfgParamError, match=r"unknown S-CFG parameter\(s\) \['strenght'\]"):
        from_script_args([{"strenght": 1}])
    with pytest.raises(ScfgParamError, match="at most 17 positional args"):
        from_script_args([True] * 18)


def test_levels_and_hires_and_window():
    assert parse_levels("auto") is None and parse_levels(" 8, 4 ") == (4, 8)
    p = make_params(hires="own", hires_strength=0.5, hires_min_rate=0.9, hires_max_rate=2.0)
    hr = p.for_hires()
    assert (hr.strength, hr.min_rate, hr.max_rate) == (0.5, 0.9, 2.0)
    assert make_params(hires="off").for_hires() is None and p.for_hires() is not p
    assert make_params(hires="same").for_hires() == make_params(hires="same")
    w = make_params(start=0.2, end=0.6)
    assert [w.active_at(step, 11) for step in (1, 2, 6, 7)] == [False, True, True, False]
    every = make_params()
    assert all(every.active_at(step, 5) for step in range(5)) and every.active_at(0, 1)


def test_api_args_error():
    args = [True, 1.0, "official", 4, "foreground", 7]
    body = {"prompt": "x", "alwayson_scripts": {"S-CFG": {"args": args}}}
    assert "'min_rate' must be in [0.0, 5.0]" in api_args_error(body)
    named = [{"enabled": True, "max_scale": 20}]
    assert api_args_error({"alwayson_scripts": {"s-cfg": {"args": named}}}) is None
    assert api_args_error({"alwayson_scripts": {"ControlNet": {"args": [1, 2, 3]}}}) is None
    assert api_args_error({"prompt": "no scripts"}) is None
    assert "must be a list" in api_args_error({"alwayson_scripts": {"S-CFG": {"args": "x"}}})


def test_old_name_of_refine_power_is_accepted_in_named_args_and_infotext():
    """`steps` (R of eq. 10) was renamed: old API clients and old images' infotexts still work."""
    assert from_script_args([{"enabled": True, "steps": 3}]).refine_power == 3
    assert from_infotext({"S-CFG": "True", "S-CFG R": "2"}).refine_power == 2
    new = to_infotext(make_params(enabled=True, refine_power=5))
    assert new["S-CFG refine power"] == "5" and "S-CFG R" not in new
    assert from_infotext({**new, "S-CFG R": "2"}).refine_power == 5  # the new key wins
    with pytest.raises(ScfgParamError, match="'steps' is the old name of 'refine_power'"):
        make_params(steps=2, refine_power=3)
    with pytest.raises(ScfgParamError, match=r"'refine_power' must be in \[1, 8\]"):
        make_params(steps=9)


HOSTILE = ["nan", "inf", "-inf", "1e400", "4,8; rm -rf /", "<script>", "${jndi:x}", "' OR 1=1 --", "auto",
           "0.8", "True"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(max_size=20)
    | st.sampled_from(HOSTILE),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from([f.name for f in FIELDS] + ["api_previews", "raw_maps", "test_fault"]),
       value=JSON_VALUES)
def test_any_json_value_is_taken_or_refused_naming_the_parameter(name, value):
    """What an API client can send for one parameter: a valid ScfgParams or ScfgParamError naming it."""
    try:
        params = make_params(**{name: value})
    except ScfgParamError as error:
        assert f"'{name}'" in str(error) and len(str(error)) < 400
        return
    field = next((f for f in FIELDS if f.name == name), None)
    if field is not None and field.low is not None:
        got = getattr(params, name)
        assert field.low <= got <= field.high and not isinstance(value, (bool, list, dict, type(None)))


@settings(max_examples=200, deadline=None)
@given(args=st.lists(JSON_VALUES, max_size=20))
def test_any_positional_args_list_is_taken_or_refused_cleanly(args):
    try:
        from_script_args(args)
    except ScfgParamError as error:
        assert "S-CFG" in str(error)


@pytest.mark.parametrize("value", [None, True, float("nan"), float("inf"), [1], {"a": 1}, 1e400])
def test_wrong_types_for_numbers_are_refused(value):
    for name in ("strength", "refine_power", "max_scale"):
        with pytest.raises(ScfgParamError, match=f"'{name}'"):
            make_params(**{name: value})


@settings(max_examples=200, deadline=None)
@given(garbage=st.dictionaries(st.sampled_from([infotext_key(f) for f in FIELDS[1:]] + ["S-CFG R"]),
                               st.text(max_size=12) | st.floats(0, 10).map(str), max_size=6))
def test_a_garbled_infotext_pastes_with_defaults_for_the_bad_keys(garbage):
    good = to_infotext(make_params(enabled=True, max_rate=2.5, preset="paper"))
    clean, problems = sanitize_infotext({**good, **garbage, "Steps": "20"})
    params = from_infotext(clean)  # never raises once sanitised
    assert clean["Steps"] == "20" and params.enabled
    assert len(problems) <= len(garbage) + 3  # one per bad key, one per inconsistent pair


def test_sanitize_names_the_key_and_the_default():
    clean, problems = sanitize_infotext({"S-CFG": "True", "S-CFG max rate": "lots", "S-CFG levels": "3;x"})
    assert clean["S-CFG max rate"] == "3.0" and clean["S-CFG levels"] == "auto"
    assert any("'max_rate'" in p and "3.0" in p for p in problems) and len(problems) == 2


def test_positional_args_only_ever_grow():
    """The API's positional args and old infotexts depend on the field order: append, never reorder."""
    first = ["enabled", "strength", "preset", "refine_power", "region", "min_rate", "max_rate",
             "max_scale", "start", "end", "levels", "hires", "hires_strength", "hires_min_rate",
             "hires_max_rate", "show_maps"]
    assert [f.name for f in FIELDS][:len(first)] == first
    assert [f.name for f in FIELDS][len(first):] == ["overlay"]
    old_client = [True, 1.5] + [f.default for f in FIELDS[2:len(first)]]  # a client from before overlay
    assert from_script_args(old_client) == make_params(enabled=True, strength=1.5)


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["enabled", "show_maps", "overlay", "api_previews", "raw_maps"]),
       value=JSON_VALUES)
def test_a_switch_takes_a_bool_0_1_or_a_yes_no_word_only(name, value):
    words = ("true", "false", "1", "0", "yes", "no", "on", "off")
    meant = isinstance(value, bool) or (type(value) in (int, float) and value in (0, 1)) \
        or (isinstance(value, str) and value.strip().lower() in words)
    try:
        make_params(**{name: value})
    except ScfgParamError as error:
        assert not meant and f"'{name}'" in str(error)
        return
    assert meant, f"{name}={value!r} was taken"
