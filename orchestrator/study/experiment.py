"""Experiment files (conf/experiments/*.yaml): which variants a sweep quantizes and scores.

A table given as a file in an experiment file is relative to that file's directory; on the
command line, to the current directory. Variant names must be unique (case-insensitively:
they name files), which is checked before any work starts.
"""

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import paths
from ..documents import load_yaml
from ..errors import OrchestrateError
from ..files import check_name
from ..hooks.conf import STOCK, Hooks, Table, rule_arg, table_arg
from ..hooks.tables import FITTED_AT_SWEEP
from ..taskfiles import TaskFile, parse_spec
from ..tools.imatrix import Imatrix

EXPERIMENT = Hooks(True)  # the experiments' mode with nothing set (a table is fitted in later)
KEYS = {"name", "description", "types", "tables", "radius", "rules", "perplexity", "tasks", "imatrix"}
RULE_KEYS = {"type", "radius", "table", "tensors", "tensor_types"}
PPL_KEYS = {"ctx", "chunks"}


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str                  # base | stock | table | radius | rules
    qtype: str | None = None   # llama-quantize type; None for the base
    hooks: Hooks = STOCK       # what the hooks do to its values
    fit: str | None = None     # a table fitted to the base at sweep time (balanced-fit, optimal)
    imatrix: Imatrix | None = None  # the importance matrix llama-quantize is given
    tensor_types: tuple[tuple[str, str], ...] = ()  # whole-name type overrides (--tensor-type-file)

    @property
    def radius(self) -> int | None:
        """The zero radius of a radius variant (None for the others)."""
        return self.hooks.radius if self.kind == "radius" else None

    @property
    def table(self) -> Table | None:
        return self.hooks.table

    def with_table(self, table: Table) -> "Variant":
        return replace(self, hooks=replace(self.hooks, table=table))

    def spec(self) -> dict:
        """Everything about the variant that determines its weights (part of its run key)."""
        spec = {"name": self.name, "kind": self.kind, "type": self.qtype, "mode": self.hooks.mode,
                "radius": self.radius, "table": _table_spec(self.table)}
        if self.imatrix:  # (absent otherwise, as the rules)
            spec["imatrix"] = self.imatrix.sha256
        if self.tensor_types:
            spec["tensor_types"] = [list(x) for x in self.tensor_types]
        if self.hooks.rules:  # (absent otherwise: the keys of earlier runs stay as they were)
            spec["default_radius"] = self.hooks.radius
            spec["rules"] = [{"pattern": r.pattern, "radius": r.radius, "table_set": r.table_set,
                              "table": _table_spec(r.table)} for r in self.hooks.rules]
        return spec


def _table_spec(t: Table | None) -> dict | None:
    return None if t is None else {"name": t.name, "lo": t.lo, "hi": t.hi, "level": t.level}


@dataclass(frozen=True)
class RuleSet:
    """A variant of per-tensor rules (an experiment's `rules:` entry): a type, the file's own radius and
    table for the tensors no rule matches, and TENSOR rules in the pablo.conf grammar."""
    name: str
    qtype: str
    radius: int = 0
    table: str | None = None
    tensors: tuple[str, ...] = ()
    tensor_types: tuple[tuple[str, str], ...] = ()  # (tensor name, llama-quantize type) via --tensor-type-file


@dataclass(frozen=True)
class Experiment:
    name: str
    types: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    radius: list[int] = field(default_factory=list)
    rules: list[RuleSet] = field(default_factory=list)
    ctx: int = 512
    chunks: int = 20
    description: str = ""
    table_dir: Path = field(default_factory=Path.cwd)  # what relative table files are relative to
    tasks: tuple[TaskFile, ...] = ()  # multiple-choice tasks every variant answers
    imatrix: bool = False             # also every variant with an importance matrix (its "-imat" twin)

    def variants(self) -> list[Variant]:
        out = [Variant("base", "base")]
        out += [Variant(t.lower(), "stock", t) for t in self.types]
        for name in self.tables:
            if name in FITTED_AT_SWEEP:
                out.append(Variant(f"q8_0-{name}", "table", "Q8_0", EXPERIMENT, fit=name))
            else:
                t = table_arg(name, self.table_dir)
                out.append(Variant(f"q8_0-{t.name}", "table", "Q8_0", Hooks(True, table=t)))
        out += [Variant(f"q4_0-r{r}", "radius", "Q4_0", Hooks(True, radius=r)) for r in self.radius]
        for rs in self.rules:
            table = table_arg(rs.table, self.table_dir) if rs.table else None
            rules = tuple(rule_arg(t, self.table_dir) for t in rs.tensors)
            out.append(Variant(rs.name, "rules", rs.qtype, Hooks(bool(rules) or rs.radius > 0 or table is not None,
                                                                 rs.radius, table, rules), tensor_types=rs.tensor_types))
        seen: dict[str, Variant] = {}
        for v in out:
            check_name(v.name, "variant name" + (f" (from the table file {v.table.path})" if v.table else ""))
            twin = seen.setdefault(v.name.lower(), v)
            if twin is not v:
                what = (f"two tables named '{v.table.name}' ({twin.table.path} and {v.table.path}): rename one file"
                        if v.table and twin.table else f"'{twin.qtype or twin.name}' and '{v.qtype or v.name}' "
                        "are the same variant: list it once")
                raise OrchestrateError(f"two variants would be named {v.name}: {what}")
        return out

    def with_types(self, canonical) -> "Experiment":
        """The experiment with each stock type spelled as llama-quantize spells it (checked)."""
        exp = replace(self, types=[canonical(t) for t in self.types])
        exp.variants()
        return exp


def default_file() -> Path:
    return paths.conf_dir() / "experiments" / "thesis.yaml"


def parse_radius(text: str) -> list[int]:
    """`0..3`, `1,3`, `2` or `none` -> sorted radii in 0..7."""
    text = text.strip()
    if text == "none":
        return []
    m = re.fullmatch(r"(\d+)\.\.(\d+)", text)
    try:
        values = list(range(int(m.group(1)), int(m.group(2)) + 1)) if m else [int(x) for x in text.split(",")]
    except ValueError:
        raise OrchestrateError(f"bad radius '{text}': use a range like 0..3, a list like 1,3, or one number") from None
    if not values or any(not 0 <= r <= 7 for r in values):
        raise OrchestrateError(f"bad radius '{text}': radii are 0..7")
    return sorted(set(values))


def parse_list(text: str) -> list[str]:
    return [] if text.strip() == "none" else [x.strip() for x in text.split(",") if x.strip()]


def load_experiment(path: Path | None = None) -> Experiment:
    path = Path(path or default_file()).expanduser()
    data = load_yaml(path, "experiment")
    if not isinstance(data, dict):
        raise OrchestrateError(f"{path}: an experiment is a mapping of {', '.join(sorted(KEYS))}")
    unknown = set(data) - KEYS
    if unknown:
        raise OrchestrateError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(KEYS))})")
    for key in ("name", "description"):  # free text: a string, or absent
        if data.get(key) is not None and not isinstance(data[key], str):
            raise OrchestrateError(f"{path}: {key} must be a string")
    ppl = data.get("perplexity") or {}
    if not isinstance(ppl, dict) or set(ppl) - PPL_KEYS:
        raise OrchestrateError(f"{path}: perplexity takes {', '.join(sorted(PPL_KEYS))}")

    def str_list(key):
        v = data.get(key) or []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise OrchestrateError(f"{path}: {key} must be a list of names")
        return v
    radius = data.get("radius") or []
    if not isinstance(radius, list) or not all(isinstance(r, int) and 0 <= r <= 7 for r in radius):
        raise OrchestrateError(f"{path}: radius must be a list of integers 0..7")
    for key in ("ctx", "chunks"):
        if key in ppl and (not isinstance(ppl[key], int) or ppl[key] < (16 if key == "ctx" else 0)):
            raise OrchestrateError(f"{path}: perplexity.{key} must be a whole number"
                                   + (" >= 16" if key == "ctx" else " >= 0"))
    exp = Experiment(name=check_name(data.get("name") or path.stem, f"{path}: experiment name"),
                     types=[t.upper() for t in str_list("types")],
                     tables=str_list("tables"), radius=sorted(set(radius)), rules=_rule_sets(path, data.get("rules")),
                     ctx=ppl.get("ctx", 512),
                     chunks=ppl.get("chunks", 20), description=(data.get("description") or "").strip(),
                     table_dir=path.resolve().parent,
                     tasks=parse_tasks(str_list("tasks"), path.resolve().parent),
                     imatrix=_flag(path, data, "imatrix"))
    exp.variants()  # resolves the tables now: a bad name is an error before any work starts
    return exp


def _flag(path: Path, data: dict, key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise OrchestrateError(f"{path}: {key} must be true or false")
    return value


def _rule_sets(path: Path, data) -> list[RuleSet]:
    """The experiment's `rules:`: a mapping of variant name to {type, radius, table, tensors}."""
    if data is None:
        return []
    if not isinstance(data, dict):
        raise OrchestrateError(f"{path}: rules is a mapping of variant names to {{type, radius, table, tensors}}")
    out = []
    for name, spec in data.items():
        where = f"{path}: rules.{name}"
        if (not isinstance(spec, dict) or set(spec) - RULE_KEYS or "type" not in spec
                or not ({"tensors", "tensor_types"} & set(spec))):
            raise OrchestrateError(f"{where}: takes type and tensors (or tensor_types), and optionally radius and table")
        tensors, radius, table = spec.get("tensors", []), spec.get("radius", 0), spec.get("table")
        types = spec.get("tensor_types", {})
        if not isinstance(spec["type"], str):
            raise OrchestrateError(f"{where}: type must be a quantization type, like Q4_0")
        if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors) or not (tensors or types):
            raise OrchestrateError(f"{where}: tensors must be a list of rules like 'blk.*.ffn_down.weight Q4_0_RADIUS=2'")
        if (not isinstance(types, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in types.items())
                or any(c.isspace() for x in types.items() for c in "".join(x))):
            raise OrchestrateError(f"{where}: tensor_types maps whole tensor names to types, like "
                                   "{blk.0.ffn_down.weight: Q4_K}")
        if not isinstance(radius, int) or isinstance(radius, bool) or not 0 <= radius <= 7:
            raise OrchestrateError(f"{where}: radius must be an integer 0..7")
        if table is not None and not isinstance(table, str):
            raise OrchestrateError(f"{where}: table must be a table name or file")
        out.append(RuleSet(str(name), spec["type"].upper(), radius, None if table in (None, "off") else table,
                           tuple(tensors), tuple((k, v.lower()) for k, v in types.items())))
    return out


def parse_tasks(specs, relative_to: Path) -> tuple[TaskFile, ...]:
    """MODE:FILE task specs, each file read and checked; two tasks may not share a label."""
    tasks = tuple(parse_spec(s, relative_to) for s in specs)
    labels = [t.label for t in tasks]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise OrchestrateError(f"task {twice[0]} is given twice (tasks are told apart by mode and file name)")
    return tasks


def override(exp: Experiment, radius: str | None = None, tables: str | None = None, types: str | None = None,
             ctx: int | None = None, chunks: int | None = None, tasks: tuple[str, ...] = (),
             imatrix: bool = False) -> Experiment:
    """The experiment with command-line selections applied (tasks given replace the experiment's)."""
    changes = {"imatrix": True} if imatrix else {}
    if tasks:
        changes["tasks"] = parse_tasks(tasks, Path.cwd())
    if radius is not None:
        changes["radius"] = parse_radius(radius)
    if tables is not None:
        changes["tables"], changes["table_dir"] = parse_list(tables), Path.cwd()
    if types is not None:
        changes["types"] = [t.upper() for t in parse_list(types)]
    if ctx is not None:
        changes["ctx"] = ctx
    if chunks is not None:
        changes["chunks"] = chunks
    exp = replace(exp, **changes)
    exp.variants()
    return exp
