"""pablo.conf and table rules on the Python side (the fork's reader is checked against the
same files in test_hooks.py)."""

from pathlib import Path

import numpy as np
import pytest

from orchestrator.hooks import conf

DATA = Path(__file__).parent / "data"
BAD = sorted((DATA / "bad_confs").glob("*.conf"))
TABLES = Path(__file__).resolve().parent.parent / "conf" / "tables"


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_conf_is_rejected_naming_the_file(path):
    with pytest.raises(conf.ConfError) as e:
        conf.parse_conf(path)
    msg = str(e.value)
    assert msg.startswith("pablo config error: ")
    assert str(path) in msg or "tables/" in msg  # the conf, or the table file it names
    assert "\n" not in msg


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
    assert (c.mode, c.radius, c.table.name, c.hist_out) == ("pablo", 3, "basic", tmp_path / "out" / "h.json")
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
    assert (c.experiment, c.radius, c.table.level, c.hist_out) == (True, 2, t.level, tmp_path / "h.json")
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
