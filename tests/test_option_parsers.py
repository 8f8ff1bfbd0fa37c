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


@settings(max_examples=500, deadline=None)
@given(st.one_of(TEXT, st.from_regex(r"\s*\d{1,3}\s*(\.\.\s*\d{1,3}|(,\s*\d{1,3})*)\s*", fullmatch=True)))
def test_radius_ranges(text):
    try:
        radii = parse_radius(text)
    except OrchestrateError as e:
        assert "radius" in str(e)
        return
    assert radii == sorted(set(radii)) and all(0 <= r <= 7 for r in radii)
    assert radii or text.strip() == "none"


@given(st.integers(0, 7), st.integers(0, 7))
def test_a_radius_range_is_every_radius_in_it(a, b):
    if a > b:  # an empty range is an error, not "no radius"
        try:
            parse_radius(f"{a}..{b}")
        except OrchestrateError:
            return
        raise AssertionError(f"{a}..{b} accepted")
    assert parse_radius(f"{a}..{b}") == list(range(a, b + 1))


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_type_lists(text):
    names = parse_list(text)
    assert all(n and n == n.strip() and "," not in n for n in names)


@settings(max_examples=500, deadline=None)
@given(st.one_of(TEXT, st.from_regex(r"\s*\d{1,4}(\.\d{1,3})?\s*[mhdwy]?\s*", fullmatch=True)))
def test_durations(text):
    try:
        seconds = parse_age(text)
    except OrchestrateError as e:
        assert "--older-than" in str(e)
        return
    assert math.isfinite(seconds) and seconds >= 0


@settings(max_examples=500, deadline=None)
@given(st.lists(TEXT, max_size=4))
def test_llama_env(pairs):
    try:
        env = _llama_env(tuple(pairs))
    except OrchestrateError as e:
        assert "--llama-env" in str(e)
        return
    for p in pairs:
        key, _, value = p.partition("=")
        assert key and key.replace("_", "").isalnum() and key in env
    assert set(env) <= {p.partition("=")[0] for p in pairs}
