"""A scan's output directory: its document (scan.json: schema, how it is made and read) and the
ranked table beside it (scan.csv). The scan writes them, the report reads scan.json; neither imports
the other."""

import csv
import io
import math
from pathlib import Path

from .errors import OrchestrateError
from .files import read_document, write_atomic, write_json

SCHEMA = "orchestrate.scan/1"
QUANTITIES = ("kld", "nll")  # each group's effects and per-chunk differences
FILE = "scan.json"
CSV = "scan.csv"
CSV_COLUMNS = ("rank", "group", "layer", "kind", "tensors", "chunks", "verdict", "kld_effect", "kld_lo", "kld_hi",
               "nll_effect", "nll_lo", "nll_hi")


def document(settings: dict, encoding: dict, reference: dict, base, logits: Path | None, text: Path, text_sha256: str, fork,
             variants: list[dict], groups: list[dict]) -> dict:
    """settings: by, looks, threshold, width, confidence, ctx, chunks; variants: the base's, R's and E's
    rows (results.Row.to_dict()); groups: GroupResult.to_dict()s; logits: the base's, which every group
    was scored against (KLD; None when they stayed on a cluster's nodes). The scan adds `screen` (None,
    or with --screen: `parents`, the layers and kinds scanned whole, and `screened`, see screened())."""
    return {"schema": SCHEMA, "settings": settings, "encoding": encoding, "reference": reference,
            "base": {"path": str(base.path), "sha256": base.sha256, "logits": str(logits) if logits else None},
            "text": str(text), "text_sha256": text_sha256,
            "fork": fork.id, "variants": variants, "groups": groups}


def screened(doc: dict) -> list[dict]:
    """The groups `--screen` did not score: name, layer, kind, tensors, by (the parent group whose whole
    effect was below the threshold) and below (that parent's upper bound)."""
    return (doc.get("screen") or {}).get("screened", [])


def ranked(doc: dict) -> list[dict]:
    """Groups from the most hurt (largest KLD effect) to the least."""
    return sorted(doc["groups"], key=lambda g: -g["effects"]["kld"]["mean"])


def write(out: Path, doc: dict) -> None:
    write_json(Path(out) / FILE, doc)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for i, g in enumerate(ranked(doc), 1):
        k, n = g["effects"]["kld"], g["effects"]["nll"]
        w.writerow([i, g["name"], g["layer"], g["kind"], len(g["tensors"]), g["chunks"], g["verdict"],
                    k["mean"], k["lo"], k["hi"], n["mean"], n["lo"], n["hi"]])
    for g in screened(doc):  # no rank, no effect of its own: below its parent's upper bound (kld_hi)
        w.writerow(["", g["name"], g["layer"], g["kind"], len(g["tensors"]), 0, f"screened by {g['by']}",
                    "", "", g["below"], "", "", ""])
    write_atomic(Path(out) / CSV, buf.getvalue())


def load(directory: Path) -> dict:
    """scan.json, checked to be one whose groups a recipe can add up (one-line errors)."""
    doc = read_document(directory, FILE, SCHEMA, "scan")
    wrong = _malformed(doc)
    if wrong:
        raise OrchestrateError(f"{Path(directory) / FILE} is damaged: {wrong}")
    return doc


def _number(x, none_ok: bool = False) -> bool:
    return (x is None and none_ok) or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))


def _malformed(doc: dict) -> str | None:
    """What is wrong with the parts of a scan document a recipe reads, or None."""
    for key, kind in (("settings", dict), ("encoding", dict), ("reference", dict), ("base", dict), ("variants", list),
                      ("groups", list), ("text_sha256", str)):
        if not isinstance(doc.get(key), kind):
            return f"`{key}` is not {'an object' if kind is dict else 'a list' if kind is list else 'a string'}"
    if len(doc["variants"]) != 3 or not all(isinstance(v, dict) and isinstance(v.get("run_dir"), str)
                                            for v in doc["variants"]):
        return "`variants` is not the base's, R's and E's rows"
    if not isinstance(doc["encoding"].get("name"), str) or not isinstance(doc["base"].get("sha256"), str):
        return "the encoding's name or the base's sha256 is missing"
    for i, g in enumerate(doc["groups"], 1):
        if not isinstance(g, dict) or not isinstance(g.get("name"), str):
            return f"group {i} has no name"
        tensors, chunks, effects = g.get("tensors"), g.get("chunks"), g.get("effects")
        if not isinstance(tensors, list) or not tensors or not all(isinstance(t, str) for t in tensors):
            return f"group {g['name']}: `tensors` is not a list of tensor names"
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 0:
            return f"group {g['name']}: `chunks` is not a count"
        per_chunk = g.get("per_chunk") or {}  # (absent from older scans)
        if not isinstance(effects, dict) or not isinstance(per_chunk, dict):
            return f"group {g['name']}: `effects` or `per_chunk` is not an object"
        for q in QUANTITIES:
            e, per = effects.get(q), per_chunk.get(q)
            if not isinstance(e, dict) or not _number(e.get("mean")) or not all(_number(e.get(k), True) for k in ("lo", "hi")):
                return f"group {g['name']}: its {q} effect is not a finite mean with its interval"
            if per is not None and (not isinstance(per, list) or len(per) != chunks or not all(map(_number, per))):
                return f"group {g['name']}: its per-chunk {q} differences are not {chunks} finite numbers"
    return None
