"""A scan's output directory: its document (scan.json: schema, how it is made and read) and the
ranked table beside it (scan.csv). The scan writes them, the report reads scan.json; neither imports
the other."""

import csv
import io
from pathlib import Path

from .files import read_document, write_atomic, write_json

SCHEMA = "orchestrate.scan/1"
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
    return read_document(directory, FILE, SCHEMA, "scan")
