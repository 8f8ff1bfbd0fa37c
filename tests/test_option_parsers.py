"""The option parsers against anything a user (or an attacker) types: each either returns a value that
obeys its rules or raises the one error type the CLI prints as a line, never anything else."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.cli import _llama_env
from orchestrator.errors import OrchestrateError
from orchestrator.study.cache import parse_age
from orchestrator.study.experiment import parse_list, parse_radius

TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


def parsed(parse, value, option: str):
    """parse(value), or None when it raised the CLI's error naming the option (anything else fails)."""
    try:
        return parse(value)
    except OrchestrateError as e:
        assert option in str(e)
        return None


@settings(max_examples=500, deadline=None)
@given(st.one_of(TEXT, st.from_regex(r"\s*\d{1,3}\s*(\.\.\s*\d{1,3}|(,\s*\d{1,3})*)\s*", fullmatch=True)))
def test_radius_ranges(text):
    radii = parsed(parse_radius, text, "radius")
    if radii is None:
        return
    assert radii == sorted(set(radii)) and all(0 <= r <= 7 for r in radii)
    assert radii or text.strip() == "none"


@given(st.integers(0, 7), st.integers(0, 7))
def test_a_radius_range_is_every_radius_in_it(a, b):
    expected = list(range(a, b + 1)) or None  # an empty range is an error, not "no radius"
    assert parsed(parse_radius, f"{a}..{b}", "radius") == expected


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_type_lists(text):
    names = parse_list(text)
    assert all(n and n == n.strip() and "," not in n for n in names)


@settings(max_examples=500, deadline=None)
@given(st.one_of(TEXT, st.from_regex(r"\s*\d{1,4}(\.\d{1,3})?\s*[mhdwy]?\s*", fullmatch=True)))
def test_durations(text):
    seconds = parsed(parse_age, text, "--older-than")
    if seconds is None:
        return
    assert math.isfinite(seconds) and seconds >= 0


@settings(max_examples=500, deadline=None)
@given(st.lists(TEXT, max_size=4))
def test_llama_env(pairs):
    env = parsed(_llama_env, tuple(pairs), "--llama-env")
    if env is None:
        return
    for p in pairs:
        key, _, value = p.partition("=")
        assert key and key.replace("_", "").isalnum() and key in env
    assert set(env) <= {p.partition("=")[0] for p in pairs}
