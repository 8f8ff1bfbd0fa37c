"""A scan's figures and report, from scan.json: the layer x kind sensitivity heat-map with each
group's interval, the ranked groups with their intervals, and scan.md."""

from pathlib import Path

import numpy as np

from .. import scans
from ..files import write_atomic
from .plots import _save, plt


def _place(g, by: str) -> tuple[str, str]:
    """A group's row (its layer; a tensor outside the blocks: "other", or its own row by layer) and
    column (its kind) in the heat-map."""
    if by == "kind":
        row = "all layers"
    elif g["layer"] is not None:
        row = f"blk.{g['layer']}"
    else:
        row = g["name"] if by == "layer" else "other"
    return row, "all kinds" if by == "layer" else g["kind"]


def _grid(doc):
    """Rows (layers in order, then the rest), columns (kinds) and each group's (row, column) index: the
    scored groups', then the screened ones'."""
    by = doc["settings"]["by"]
    every = doc["groups"] + scans.screened(doc)
    places = [_place(g, by) for g in every]
    layer = {f"blk.{g['layer']}": g["layer"] for g in every if g["layer"] is not None}
    rows = sorted({r for r, _ in places}, key=lambda r: (r not in layer, layer.get(r, 0), r))
    cols = sorted({c for _, c in places})
    return rows, cols, [(rows.index(r), cols.index(c)) for r, c in places]


def fig_heatmap(doc, out: Path) -> str:
    rows, kinds, cells = _grid(doc)
    mean = np.full((len(rows), len(kinds)), np.nan)
    undecided = np.zeros_like(mean, dtype=bool)
    text = {}
    for g, (r, c) in zip(doc["groups"], cells):
        e = g["effects"]["kld"]
        mean[r, c] = e["mean"]
        undecided[r, c] = e["lo"] is None or e["lo"] <= 0 <= e["hi"]
        text[r, c] = f"{e['mean']:.3g}" + (f"\n±{(e['hi'] - e['lo']) / 2:.2g}" if e["lo"] is not None else "")
    screened = {cell: g for g, cell in zip(scans.screened(doc), cells[len(doc["groups"]):])}
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(kinds) + 2), max(2.5, 0.42 * len(rows) + 1.5)))
    top = np.nanmax(np.abs(mean)) if np.isfinite(mean).any() else 1.0
    im = ax.imshow(np.ma.masked_invalid(mean), cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto")
    for (r, c), s in text.items():
        dark = abs(mean[r, c]) > 0.55 * top  # white on the darkest cells
        ax.text(c, r, s, ha="center", va="center", fontsize=7 if len(rows) * len(kinds) < 200 else 5,
                color="white" if dark else "0.35" if undecided[r, c] else "black")
        if undecided[r, c]:
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="///", ec="0.6", lw=0))
    for (r, c), g in screened.items():  # not scored: below its layer's or kind's bound
        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, color="0.9", lw=0))
        ax.text(c, r, f"≤{g['below']:.2g}", ha="center", va="center", color="0.45", style="italic",
                fontsize=7 if len(rows) * len(kinds) < 200 else 5)
    ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    conf = doc["settings"]["confidence"]
    fig.colorbar(im, ax=ax, label="mean KLD increase vs the reference (nats per token)")
    enc, ref = doc["encoding"]["name"], doc["reference"]["name"]
    ax.set_title(f"Where does {enc} hurt? Each group alone, against {ref}\n"
                 f"cell: mean ± half of its {conf:.0%} interval (alpha spent over the looks); hatched: "
                 f"the interval holds 0" + ("; grey ≤x: screened out (its layer or kind whole is below x)"
                                            if screened else ""), fontsize=9)
    return _save(fig, out, "scan_heatmap")


def fig_ranked(doc, out: Path, top: int = 30) -> str:
    gs = scans.ranked(doc)[:top]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(gs) + 1.2)))
    y = np.arange(len(gs))[::-1]
    m = np.array([g["effects"]["kld"]["mean"] for g in gs])
    lo = np.array([g["effects"]["kld"]["lo"] if g["effects"]["kld"]["lo"] is not None else np.nan for g in gs])
    hi = np.array([g["effects"]["kld"]["hi"] if g["effects"]["kld"]["hi"] is not None else np.nan for g in gs])
    ax.errorbar(m, y, xerr=[m - lo, hi - m], fmt="o", ms=4, capsize=2)
    ax.axvline(0, color="0.5", lw=0.8)
    if doc["settings"].get("threshold") is not None:
        ax.axvline(doc["settings"]["threshold"], color="tab:red", lw=0.8, ls="--", label="threshold")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(y, [f"{g['name']} ({g['chunks']} ch)" for g in gs], fontsize=7)
    ax.set_xlabel("mean KLD increase vs the reference, with its interval")
    ax.set_title(f"The {len(gs)} most sensitive groups of {len(doc['groups'])}", fontsize=9)
    return _save(fig, out, "scan_ranked")


def _fmt(e) -> str:
    return f"{e['mean']:+.4f} [{e['lo']:+.4f}, {e['hi']:+.4f}]" if e["lo"] is not None else f"{e['mean']:+.4f}"


def render(doc, figures) -> str:
    s = doc["settings"]
    screen = doc.get("screen") or {"parents": [], "screened": []}
    fixed = (len(doc["groups"]) + len(screen["screened"])) * s["looks"][-1]
    used = sum(g["chunks"] for g in doc["groups"] + screen["parents"])
    lines = [f"# Scan: {doc['encoding']['name']} against {doc['reference']['name']}, by {s['by']}", "",
             f"- Base: `{doc['base']['path']}`; text `{doc['text']}`; -c {s['ctx']}, up to {s['looks'][-1]} chunks",
             f"- Each group: {doc['reference']['name']} with {doc['encoding']['name']} on that group's tensors only, "
             "scored against the base per token; effect = the group model's mean minus the reference's on the "
             "same chunks (KLD decides when to stop; NLL is reported beside it).",
             f"- Looks after {', '.join(map(str, s['looks']))} chunks; intervals at {s['confidence']:.0%} for the "
             f"look where each group stopped (alpha spent over the {len(s['looks'])} looks, Student t over chunks)"
             + (f"; a group stops once its interval is above or below {s['threshold']}" if s.get("threshold")
                is not None else "")
             + (f"; or once its half-width is at most {s['width']}" if s.get("width") is not None else "") + ".",
             f"- Chunks scored: {used} of the {fixed} a fixed schedule would score ({used / fixed:.2f})"
             + (" (the layers and kinds scanned whole included)" if screen["parents"] else "") + ".", ""]
    if doc.get("screen"):
        lines += [f"- Screened (`--screen`): the {len(screen['parents'])} layers and kinds were scanned whole first; "
                  f"{len(screen['screened'])} of the {len(screen['screened']) + len(doc['groups'])} groups lie inside "
                  "one whose whole effect was decided below the threshold and were not scored (their bound: that "
                  "whole's upper limit). This assumes that the encoding on part of a group hurts no more than on "
                  "all of it.", "", "| layer or kind, whole | tensors | chunks | verdict | KLD effect [interval] |",
                  "|---|---:|---:|---|---|"]
        lines += [f"| {g['name']} | {len(g['tensors'])} | {g['chunks']} | {g['verdict']} | {_fmt(g['effects']['kld'])} |"
                  for g in screen["parents"]] + [""]
    lines += [f"![{f}]({f})" for f in figures] + ["", "| rank | group | tensors | chunks | verdict | "
                                                   "KLD effect [interval] | NLL effect [interval] |",
                                                   "|---:|---|---:|---:|---|---|---|"]
    for i, g in enumerate(scans.ranked(doc), 1):
        lines.append(f"| {i} | {g['name']} | {len(g['tensors'])} | {g['chunks']} | {g['verdict']} | "
                     f"{_fmt(g['effects']['kld'])} | {_fmt(g['effects']['nll'])} |")
    return "\n".join(lines) + "\n"


def write_all(doc: dict, out: Path) -> list[str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scans.write(out, doc)
    figures = [fig_heatmap(doc, out), fig_ranked(doc, out)]
    write_atomic(out / "scan.md", render(doc, figures))
    return figures
