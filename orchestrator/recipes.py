"""A recipe's files: the one owner of their format.

- `<name>.yaml`: the recipe itself, as an experiment file with one `rules:` variant (a type, and a
  TENSOR rule per tensor that takes the encoding, or for a type recipe each such tensor's type under
  `tensor_types`), so that `orchestrate sweep --config` sweeps it and
  `orchestrate quantize --recipe` builds it.
- `recipe.json`: what the recipes were made from and what became of them (schema below): the scans
  (each with its encoding and hash), the texts, the budgets, each recipe's groups and the encoding each
  takes, its predicted and measured effects and the verdicts.
"""

from pathlib import Path

import yaml

from .documents import load_yaml
from .errors import OrchestrateError
from .files import read_document, write_atomic, write_json

SCHEMA = "orchestrate.recipe/2"   # 2: from one or more scans (`scans`, each group's `choices`)
FILE = "recipe.json"


def write_recipe(path: Path, name: str, qtype: str, rules: list[str], description: str,
                 tensor_types: dict[str, str] | None = None) -> Path:
    spec = {"type": qtype, "tensors": rules}
    if tensor_types:
        spec["tensor_types"] = tensor_types
    doc = {"name": name, "description": description, "rules": {name: spec}}
    write_atomic(path, "# an orchestrate recipe: `orchestrate quantize --recipe` builds it, `orchestrate sweep "
                       "--config` sweeps it\n" + yaml.safe_dump(doc, sort_keys=False, width=120))
    return path


def read_recipe(path: Path) -> tuple[str, str, list[str], dict[str, str]]:
    """(name, type, rules, tensor types) of a recipe file, checked."""
    doc = load_yaml(Path(path), "recipe")
    rules = doc.get("rules") if isinstance(doc, dict) else None
    if not isinstance(rules, dict) or len(rules) != 1:
        raise OrchestrateError(f"{path} is not a recipe (one `rules:` variant)")
    (name, spec), = rules.items()
    if (not isinstance(spec, dict) or not isinstance(spec.get("type"), str) or not isinstance(spec.get("tensors"), list)
            or not all(isinstance(t, str) for t in spec["tensors"])):
        raise OrchestrateError(f"{path}: the recipe's variant needs a type and a list of tensor rules")
    types = spec.get("tensor_types") or {}
    if not isinstance(types, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in types.items()):
        raise OrchestrateError(f"{path}: the recipe's tensor_types must map tensor names to types")
    return str(name), spec["type"], spec["tensors"], types


def write(out: Path, doc: dict) -> None:
    write_json(Path(out) / FILE, {"schema": SCHEMA, **doc})


def load(directory: Path) -> dict:
    return read_document(directory, FILE, SCHEMA, "recipe")
