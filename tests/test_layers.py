"""The package's layers: data flows one way down. A module may import its own folder, the layers below
it and the helpers at the bottom, never one above it; the driver is the only module that uses both the
study and the report."""

import ast
from pathlib import Path

import orchestrator

PKG = Path(orchestrator.__file__).parent
# top to bottom; a module of a layer imports only layers after its own (and its own folder)
LAYERS = [{"__main__"}, {"cli"}, {"driver"}, {"report"}, {"study"}, {"tools"}, {"hooks"}, {"fork"},
          {"demo", "fetch", "results", "scans", "recipes", "taskfiles", "cloze", "texts", "documents", "parse", "proc", "stream", "files", "paths", "errors"}]


def layer(module: str) -> int:
    """module: dotted name under orchestrator (e.g. study.runner)."""
    head = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if head in names)


def imports(path: Path) -> set[str]:
    """The orchestrator modules a file imports (relative and absolute), as names under the package."""
    rel = path.relative_to(PKG).with_suffix("")
    here = list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1] if node.level > 1 else here
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("orchestrator"):
                target = node.module.split(".")[1:]
            else:
                continue
            names = [target + [a.name] for a in node.names] if not node.module else [target]
            out.update(".".join(t) for t in names if t)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("orchestrator."))
    return out


def test_every_import_runs_down_the_layers():
    bad = []
    for path in PKG.rglob("*.py"):
        me = ".".join(path.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__") or "__init__"
        if me == "__init__":
            continue
        for target in imports(path):
            if target.split(".")[0] == me.split(".")[0] or layer(target) == layer(me) == len(LAYERS) - 1:
                continue  # its own folder (or itself); the helpers use one another
            if layer(target) <= layer(me):
                bad.append(f"{me} imports {target}")
    assert not bad, bad


def test_only_the_driver_uses_both_the_study_and_the_report():
    both = [p.name for p in PKG.rglob("*.py")
            if {t.split(".")[0] for t in imports(p)} >= {"study", "report"}]
    assert both == ["driver.py"], both


def test_the_walk_sees_an_import_that_runs_back_up(tmp_path):
    # the check can fail: a study module that imported the report would be caught
    fake = PKG / "study" / "_probe_for_test.py"
    fake.write_text("from ..report import report\n")
    try:
        assert "report" in imports(fake) and layer("report") < layer("study.runner")
    finally:
        fake.unlink()
