"""pablo.conf and table rules on the Python side (the fork's reader is checked against the
same files in test_hooks.py)."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from orchestrator.hooks import conf

DATA = Path(__file__).parent / "data"
BAD = sorted((DATA / "bad_confs").glob("*.conf"))
TABLES = Path(__file__).resolve().parent.parent / "conf" / "tables"
# Each bad file's one error, pinned: the file (the conf, or the table it names) with the line, and the
# specific problem, as both readers word it.
REASONS = {
    'bad_mode': "bad_mode.conf:1: MODE must be 'simple' or 'pablo', got 'fancy'",
    'duplicate_key': 'duplicate_key.conf:3: Q4_0_RADIUS is set twice',
    'empty_value': 'empty_value.conf:2: HIST_OUT has no value',
    'garbage_line': 'garbage_line.conf:2: expected `KEY = value` (or the legacy one-line form `MODE RADIUS TABLE`)',
    'hist_out_no_such_dir': 'hist_out_no_such_dir.conf:2: HIST_OUT no/such/dir/h.json cannot be written: No such file or directory',
    'legacy_mixed': 'legacy_mixed.conf:2: the legacy one-line form cannot be mixed with `KEY = value` lines',
    'legacy_radius_too_big': "legacy_radius_too_big.conf:1: legacy RADIUS must be an integer 0..7, got '9'",
    'legacy_two_lines': 'legacy_two_lines.conf:2: expected `KEY = value` (or the legacy one-line form `MODE RADIUS TABLE`)',
    'legacy_unknown_table': "legacy_unknown_table.conf:1: legacy TABLE must be 0 (off), 1 (basic) or 2 (balanced), got '3'",
    'line_too_long': 'line_too_long.conf:2: line too long (more than 4096 bytes)',
    'missing_mode': 'missing_mode.conf: MODE is missing (MODE = simple or MODE = pablo)',
    'nul_byte': 'nul_byte.conf:2: NUL byte in the line',
    'radius_negative': "radius_negative.conf:2: Q4_0_RADIUS must be an integer 0..7, got '-1'",
    'radius_not_a_number': "radius_not_a_number.conf:2: Q4_0_RADIUS must be an integer 0..7, got 'two'",
    'radius_too_big': "radius_too_big.conf:2: Q4_0_RADIUS must be an integer 0..7, got '8'",
    'radius_trailing_junk': "radius_trailing_junk.conf:2: Q4_0_RADIUS must be an integer 0..7, got '2x'",
    'table_codes_out_of_order': 'tables/codes_out_of_order.table:2: codes must run -8..7 in order: expected -7, got -6',
    'table_fifteen_codes': 'tables/fifteen_codes.table: has 15 codes, a table needs 16 (-8..7)',
    'table_first_not_min': 'tables/first_not_min.table:1: the first range must start at -128, not -127',
    'table_gap': 'tables/gap.table:11: gap: range starts at 3 but the previous one ended at 1',
    'table_last_not_max': 'tables/last_not_max.table:16: the last range must end at 127, not 126',
    'table_level_outside_int8': 'tables/level_outside_int8.table:16: level 200 is outside int8 (-128..127)',
    'table_levels_not_increasing': 'tables/levels_not_increasing.table:12: levels must increase strictly (1 after 2)',
    'table_mode_too_long': 'table_mode_too_long.conf:2: TABLE_MODE value too long (more than 255 bytes)',
    'table_not_numbers': 'tables/not_numbers.table:9: expected 4 integers `code lo hi level` with code in -8..7',
    'table_overlap': 'tables/overlap.table:11: overlap: range starts at 1 but the previous one ended at 1',
    'table_range_outside_int8': 'tables/range_outside_int8.table:1: range [-200, -65] is outside int8 (-128..127)',
    'unknown_key': "unknown_key.conf:3: unknown key 'RADIOUS' (known: MODE, Q4_0_RADIUS, TABLE_MODE, TABLE_DIR, HIST_OUT, TENSOR)",
    'unknown_table': "unknown_table.conf:2: unknown table 'nosuchtable': no readable file tables/nosuchtable.table",
    'rule_no_setting': 'rule_no_setting.conf:2: TENSOR needs a pattern and a setting, as in '
                       '`TENSOR = blk.*.ffn_down.weight Q4_0_RADIUS=2`',
    'rule_bad_pattern': "rule_bad_pattern.conf:2: bad tensor pattern 'blk.0=x' (at most 255 bytes of printable "
                        "ASCII other than '=')",
    'rule_radius_too_big': "rule_radius_too_big.conf:2: Q4_0_RADIUS must be an integer 0..7, got '8'",
    'rule_unknown_table': "rule_unknown_table.conf:3: unknown table 'nosuch': no readable file tables/nosuch.table",
    'rule_unknown_setting': "rule_unknown_setting.conf:2: unknown rule setting 'RADIUS' (known: Q4_0_RADIUS=N, "
                            "TABLE_MODE=T)",
}


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_conf_is_rejected_naming_the_file(path):
    with pytest.raises(conf.ConfError) as e:
        conf.parse_conf(path)
    assert str(e.value).replace(f"{path.parent}/", "") == f"pablo config error: {REASONS[path.stem]}"
    assert set(REASONS) == {p.stem for p in BAD}  # every fixture has its reason


def test_errors_name_the_line(tmp_path):
    p = tmp_path / "pablo.conf"
    p.write_text("# comment\n\nMODE = pablo\nQ4_0_RADIUS = 9\n")
    with pytest.raises(conf.ConfError, match=rf"{p}:4: Q4_0_RADIUS must be an integer 0..7, got '9'"):
        conf.parse_conf(p)
    t = DATA / "bad_confs" / "tables" / "gap.table"
    with pytest.raises(conf.ConfError, match=rf"{t}:11: gap: range starts at 3 but the previous one ended at 1"):
        conf.load_table(t)


def test_key_value_form(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "basic.table").write_text((TABLES / "basic.table").read_text())
    (tmp_path / "out").mkdir()
    p = tmp_path / "pablo.conf"
    p.write_text("MODE = pablo   # the experiments\nQ4_0_RADIUS = 3\nTABLE_MODE = basic\nHIST_OUT = out/h.json\n")
    c = conf.parse_conf(p)
    assert (c.mode, c.radius, c.table.name, c.hist_out) == ("pablo", 3, "basic", str(tmp_path / "out" / "h.json"))
    p.write_text(f"MODE = simple\nTABLE_DIR = {TABLES}\nTABLE_MODE = balanced\n")
    c = conf.parse_conf(p)
    assert (c.mode, c.table.name, c.table.path) == ("simple", "balanced", TABLES / "balanced.table")


def test_legacy_one_line_form(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "balanced.table").write_text((TABLES / "balanced.table").read_text())
    p = tmp_path / "pablo.conf"
    p.write_text("1 2 0\n")
    c = conf.parse_conf(p)
    assert (c.mode, c.radius, c.table) == ("pablo", 2, None)
    p.write_text("# old file\n0 0 2\n")
    c = conf.parse_conf(p)
    assert (c.mode, c.radius, c.table.name) == ("simple", 0, "balanced")


def test_builtin_tables_are_the_thesis_tables():
    basic = conf.load_table(TABLES / "basic.table")
    assert basic.level == (-128, -64, -32, -16, -8, -4, -2, -1, 0, 1, 2, 4, 8, 16, 32, 64)
    # every range decodes to its lower bound
    assert basic.level == basic.lo
    assert basic.hi == (-65, -33, -17, -9, -5, -3, -2, -1, 0, 1, 3, 7, 15, 31, 63, 127)
    bal = conf.load_table(TABLES / "balanced.table")
    assert bal.level == (-127, -65, -50, -38, -28, -19, -10, -1, 0, 9, 18, 27, 37, 49, 64, 127)
    assert bal.lo == (-128, -86, -64, -49, -37, -27, -18, -9, 0, 9, 18, 27, 37, 49, 64, 86)
    assert bal.hi == (-87, -65, -50, -38, -28, -19, -10, -1, 8, 17, 26, 36, 48, 63, 85, 127)


def test_table_translation_follows_the_ranges():
    basic = conf.load_table(TABLES / "basic.table")
    q = np.arange(-128, 128, dtype=np.int8)
    codes = basic.codes(q)
    for c in range(-8, 8):
        sel = q[codes == c]
        assert sel.min() == basic.lo[c + 8] and sel.max() == basic.hi[c + 8]
    out = basic.translate(q)
    assert out.dtype == np.int8
    assert out[q == 127][0] == 64 and out[q == 5][0] == 4 and out[q == -3][0] == -4 and out[q == 0][0] == 0


def test_write_then_parse_round_trips(tmp_path):
    t = conf.load_table(TABLES / "balanced.table")
    p = conf.write_conf(tmp_path / "pablo.conf", conf.Hooks(True, 2, t), tmp_path / "h.json")
    c = conf.parse_conf(p)
    assert (c.experiment, c.radius, c.table.level, c.hist_out) == (True, 2, t.level, str(tmp_path / "h.json"))
    assert [x.name for x in tmp_path.iterdir()] == ["pablo.conf"]  # no temp file left


def test_conf_check_cli(tmp_path):
    from conftest import orchestrate
    good = tmp_path / "good.conf"
    good.write_text("MODE = pablo\nQ4_0_RADIUS = 1\n")
    res = orchestrate("conf", "check", good)
    assert res.returncode == 0 and "MODE=pablo Q4_0_RADIUS=1 TABLE_MODE=off" in res.stdout
    bad = DATA / "bad_confs" / "radius_too_big.conf"
    res = orchestrate("conf", "check", good, bad)
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: pablo config error: {bad}:2: Q4_0_RADIUS must be an integer 0..7, got '8'"


def _glob_by_regex(pattern: str, name: str) -> bool:
    """What a TENSOR pattern means, the slow way (exponential on many `*`: small inputs only)."""
    import re
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx.encode(), name.encode(), re.DOTALL) is not None


@settings(max_examples=3000, deadline=None)
@given(pattern=st.text("ab.*?", max_size=8), name=st.text("ab.", max_size=10))
def test_tensor_patterns_match_as_globs(pattern, name):
    assert conf.glob_match(pattern, name) == _glob_by_regex(pattern, name)


@pytest.mark.timeout(60)
def test_a_pattern_of_many_stars_is_matched_at_once():
    """A hostile pattern (a regular expression backtracks through 120 stars for ever) against a real name."""
    pattern = "*a" * 120 + "*b"
    assert len(pattern) <= conf.PATTERN_MAX
    assert not conf.glob_match(pattern, "blk.0." + "a" * 60 + ".weight")
    assert conf.glob_match(pattern[:-2] + "*", "a" * 120)
