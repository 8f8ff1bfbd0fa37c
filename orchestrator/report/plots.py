"""Figures of a sweep, drawn from results.json and the histogram files (PNG and SVG)."""

import atexit
import ctypes
import io
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _writable_config_dir() -> None:
    """Give matplotlib a private temporary configuration directory when its own cannot be written
    (HOME read-only or unset): it would otherwise warn on stderr, in several lines, on every run."""
    if os.environ.get("MPLCONFIGDIR"):
        return
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    own = os.path.join(base, "matplotlib")
    try:
        os.makedirs(own, exist_ok=True)
        if os.access(own, os.W_OK | os.X_OK):
            return
    except OSError:
        pass
    tmp = tempfile.mkdtemp(prefix="orchestrate-matplotlib-")
    atexit.register(shutil.rmtree, tmp, True)
    os.environ["MPLCONFIGDIR"] = tmp


_writable_config_dir()
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..files import printable, read_json, write_atomic  # noqa: E402
from ..hooks.tables import CODEBOOKS, FITTED_AT_SWEEP  # noqa: E402
from ..results import fmt_ppl  # noqa: E402
from ..study.tails import LEVELS  # noqa: E402

RUN_LABELS = [str(i) for i in range(1, 16)] + ["≥16"]
PR_SET_PDEATHSIG = 1  # prctl(2), Linux


def _save(fig, out: Path, stem: str) -> str:
    """Write stem.png and stem.svg atomically, cropped to what is drawn; return the PNG's name."""
    try:
        # One crop for both files: bbox_inches="tight" draws each file twice to find it, and the
        # drawing (text layout mostly) is what a report's time goes on.
        if fig.get_layout_engine() is not None:
            fig.draw_without_rendering()  # the layout moves the axes: crop to where they end up
        crop = fig.get_tightbbox(fig.canvas.get_renderer()).padded(matplotlib.rcParams["savefig.pad_inches"])
        for ext in ("png", "svg"):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, dpi=130, bbox_inches=crop)
            write_atomic(out / f"{stem}.{ext}", buf.getvalue())
    finally:
        plt.close(fig)
    return f"{stem}.png"


def _ok(doc):
    return [r for r in doc["variants"] if r["status"] == "ok"]


def _subtitle(doc) -> str:
    s = f"{Path(doc['model']).name}, {Path(doc['text']).name}, -c {doc['perplexity']['ctx']}, " \
        f"{doc['perplexity']['chunks'] or 'all'} chunks"
    if doc["base_upcast_from"]:
        s += f"\nbase = F16 upcast of a {doc['base_upcast_from']} model"
    return printable(s)  # (a file name's undecodable bytes cannot be drawn)


def _yerr(rows):
    """Asymmetric error bars that stay above zero (they are drawn on a log axis too)."""
    return [[min(r["ppl_err"], 0.95 * r["ppl"]) for r in rows], [r["ppl_err"] for r in rows]]


def _ppl_axis(ax, rows):
    """Log scale when perplexities span more than a factor of 10 (a broken variant would flatten the rest)."""
    values = [r["ppl"] for r in rows if r["ppl"] > 0]
    log = bool(values) and max(values) / min(values) > 10
    if log:
        ax.set_yscale("log")
    ax.set_ylabel("perplexity (± standard error)" + (", log scale" if log else ""))


def _base_line(ax, base):
    if base:
        ax.axhline(base["ppl"], color="k", ls="--", lw=1, label=f"base {base['ppl']:.3f}")
        ax.axhspan(base["ppl"] - base["ppl_err"], base["ppl"] + base["ppl_err"], color="k", alpha=0.08)


def fig_perplexity(doc, out):
    rows = [r for r in _ok(doc) if r["kind"] != "base"]
    base = next((r for r in _ok(doc) if r["kind"] == "base"), None)
    if not rows:
        return None
    colors = {"stock": "tab:blue", "table": "tab:orange", "radius": "tab:red"}
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    x = np.arange(len(rows))
    for kind, c in colors.items():
        idx = [i for i, r in enumerate(rows) if r["kind"] == kind]
        if idx:
            ax.errorbar(x[idx], [rows[i]["ppl"] for i in idx], yerr=_yerr([rows[i] for i in idx]), fmt="o",
                        capsize=4, color=c, label={"stock": "stock", "table": "Q8_0 + table", "radius": "centred Q4_0 + radius"}[kind])
    _base_line(ax, base)
    ax.set_xticks(x, [r["name"] for r in rows], rotation=30, ha="right")
    _ppl_axis(ax, rows + ([base] if base else []))
    ax.set_title("Perplexity per variant\n" + _subtitle(doc), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, "perplexity")


def fig_radius(doc, out):
    rows = sorted((r for r in _ok(doc) if r["kind"] == "radius"), key=lambda r: r["radius"])
    if not rows:
        return None
    base = next((r for r in _ok(doc) if r["kind"] == "base"), None)
    stock = next((r for r in _ok(doc) if r["name"] == "q4_0"), None)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.errorbar([r["radius"] for r in rows], [r["ppl"] for r in rows], yerr=_yerr(rows),
                fmt="o-", capsize=4, color="tab:red", label="centred Q4_0")
    if stock:
        ax.axhline(stock["ppl"], color="tab:blue", ls=":", lw=1, label=f"stock Q4_0 {stock['ppl']:.3f}")
    _base_line(ax, base)
    ax.set_xlabel("zero radius r (|v| ≤ r becomes 0)")
    ax.set_xticks([r["radius"] for r in rows])
    _ppl_axis(ax, rows + [r for r in (base, stock) if r])
    ax.set_title("Perplexity against zero radius\n" + _subtitle(doc), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out, "perplexity_vs_radius")


def _hist(out: Path, row) -> dict | None:
    if not row.get("hist"):
        return None
    path = out / row["hist"]
    return read_json(path) if path.exists() else None


def _main(hist, row):
    """The hooks' whole-model histogram of the variant's main type (None if not hooked)."""
    main = row.get("main_type") or row["type"]
    return hist["model"].get(main.lower()) if hist else None


def fig_values(doc, out, row):
    m = _main(_hist(out, row), row)
    if not m or len(m["values"]) != 16:
        return None
    vals = np.array(m["values"], dtype=float)
    share = 100 * vals / vals.sum()
    labels = np.arange(m["bin_min"], m["bin_min"] + 16)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.bar(labels, share, color="tab:red" if row["kind"] == "radius" else "tab:orange" if row["kind"] == "table" else "tab:blue")
    ax.set_xticks(labels)
    what = "table code" if m["bins"] == "code" else "centred value v = q − 8"
    ax.set_xlabel(what)
    ax.set_ylabel("share of weights (%)")
    zero = row.get("zero_fraction")
    ax.set_title(f"Value histogram, {row['name']} (whole model, {row['type']} tensors)"
                 + (f"\nzeros: {100 * zero:.2f}%" if zero is not None else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, f"values-{row['name']}")


def fig_q8_values(doc, out):
    row = next((r for r in _ok(doc) if r["name"] == "q8_0"), None)
    m = _main(_hist(out, row), row) if row else None
    if not m or len(m["values"]) != 256:
        return None
    vals = np.array(m["values"], dtype=float)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(np.arange(-128, 128), 100 * vals / vals.sum(), width=1.0, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("Q8_0 value q (int8)")
    ax.set_ylabel("share of weights (%), log scale")
    ax.set_title("Stock Q8_0 value histogram (256 bins, whole model)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, "q8_0_values")


def fig_table_codes(doc, out):
    rows = [r for r in _ok(doc) if r["kind"] == "table"]
    hists = [(r, _main(_hist(out, r), r)) for r in rows]
    hists = [(r, m) for r, m in hists if m and m["bins"] == "code"]
    if not hists:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(hists)
    codes = np.arange(-8, 8)
    for i, (r, m) in enumerate(hists):
        v = np.array(m["values"], dtype=float)
        ax.bar(codes + (i - (len(hists) - 1) / 2) * width, 100 * v / v.sum(), width=width, label=r["table"])
    ax.axhline(100 / 16, color="k", ls=":", lw=1, label="uniform (1/16)")
    ax.set_xticks(codes)
    ax.set_xlabel("table code")
    ax.set_ylabel("share of weights (%)")
    ax.set_title("How often each 4-bit code is used, per translation table", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, "table_codes")


def fig_zero_runs(doc, out):
    rows = [r for r in _ok(doc) if r["kind"] == "radius" or r["name"] == "q4_0"]
    rows = [(r, _main(_hist(out, r), r)) for r in sorted(rows, key=lambda r: (r["radius"] is not None, r["radius"] or 0))]
    rows = [(r, m) for r, m in rows if m and sum(m["zero_runs"])]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(rows), figsize=(3.3 * len(rows), 3.6), sharey=True, squeeze=False)
    for ax, (r, m) in zip(axes[0], rows):
        runs = np.array(m["zero_runs"], dtype=float)
        ax.bar(np.arange(16), 100 * runs / runs.sum(), color="tab:red")
        ax.set_xticks(np.arange(16), RUN_LABELS, fontsize=6)
        ax.set_xlabel("zero-run length")
        iso = r.get("isolated_zero_share")
        ax.set_title(f"{r['name']}" + (f"\nisolated zeros: {100 * iso:.2f}%" if iso is not None else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("share of zero runs (%)")
    fig.suptitle("Zero-run histograms (runs of consecutive zero values within a row)", fontsize=10, y=1.08)
    return _save(fig, out, "zero_runs")


OFF_CHART = 10  # times the base's perplexity
FAMILIES = {"base": "k", "legacy quants": "tab:blue", "K-quants": "tab:cyan", "IQ quants": "tab:purple",
            "thesis tables": "tab:orange", "standard codebooks (tables)": "tab:green",
            "fitted tables": "tab:olive", "Q4_0 + zero radius": "tab:red", "per-tensor rules": "tab:brown"}


def family(r: dict) -> str:
    """The codebook family a variant belongs to, for the trade-off chart."""
    kind, table, qtype = r["kind"], r.get("table") or "", (r.get("type") or "").upper()
    if kind == "base":
        return "base"
    if kind == "radius":
        return "Q4_0 + zero radius"
    if kind == "table":
        return ("standard codebooks (tables)" if table in CODEBOOKS
                else "fitted tables" if table in FITTED_AT_SWEEP or not table else "thesis tables")
    if kind != "stock":
        return "per-tensor rules"
    return "IQ quants" if qtype.startswith("IQ") else "K-quants" if "_K" in qtype else "legacy quants"


def fig_tradeoff(doc, out):
    """Perplexity against measured bits per weight: stored (hollow) and zstd-compressed (filled), coloured by
    codebook family, diamonds for variants made with an importance matrix; beyond 12 variants the points
    carry numbers and a key lists them (names beside the points overlap)."""
    rows = [r for r in _ok(doc) if r.get("zstd_bpw")]
    if len(rows) < 2:
        return None
    base = next((r for r in rows if r["kind"] == "base"), None)
    # the base is a line (its 16 bits per weight would squeeze the rest to one side), and a variant the
    # encoding broke (perplexity over 10x the base's) is named beside the chart, not drawn
    broken = [r for r in rows if base and r is not base and r["ppl"] > OFF_CHART * base["ppl"]]
    rows = [r for r in rows if r is not base and r not in broken]
    if not rows:
        return None
    numbered = len(rows) > 12
    fig, ax = plt.subplots(figsize=(9.5 if numbered else 7.5, 5.2), layout="constrained")
    seen = set()
    rows = sorted(rows, key=lambda r: r["zstd_bpw"])
    for i, r in enumerate(rows, 1):
        fam = family(r)
        c, mark = FAMILIES[fam], "D" if r["name"].endswith("-imat") else "o"
        ax.plot([r["bpw"], r["zstd_bpw"]], [r["ppl"], r["ppl"]], color=c, lw=0.8, alpha=0.5)
        ax.plot(r["bpw"], r["ppl"], mark, mfc="none", color=c, ms=5)
        ax.plot(r["zstd_bpw"], r["ppl"], mark, color=c, ms=5, label=fam if fam not in seen else None)
        if r.get("code_bpw"):  # a table variant as 4-bit codes, its tables included
            ax.plot(r["code_bpw"], r["ppl"], "x", color=c, ms=6)
        seen.add(fam)
        ax.annotate(str(i) if numbered else printable(r["name"]), (r["zstd_bpw"], r["ppl"]), textcoords="offset points",
                    xytext=(3, 3), fontsize=7)
    key = [f"{i:>2} {printable(r['name'])}" for i, r in enumerate(rows, 1)] if numbered else []
    if broken:
        key += ["", f"off the chart (perplexity > {OFF_CHART:g}x the base's):"]
        key += [f"   {printable(r['name'])} ({fmt_ppl(r['ppl'])})" for r in broken]
    if key:
        fig.text(1.0, 0.5, "\n".join(key), fontsize=6.5, family="monospace", va="center", ha="left", transform=ax.transAxes)
    _base_line(ax, base)
    _ppl_axis(ax, rows + ([base] if base else []))
    ax.legend(fontsize=7, loc="center right", title="family (◇: with an importance matrix)", title_fontsize=7)
    ax.set_xlabel("bits per weight: as stored (hollow) → compressed with zstd (filled); × tables as 4-bit codes")
    ax.set_title("Perplexity against effective bits per weight\n" + _subtitle(doc), fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, out, "ppl_vs_bits")


def default_damage_variant(doc) -> str | None:
    """The variant whose damage map is drawn by default: the largest radius, else the last."""
    rows = [r for r in _ok(doc) if r.get("damage")]
    radius = [r for r in rows if r["kind"] == "radius"]
    if radius:
        return max(radius, key=lambda r: r["radius"])["name"]
    return rows[-1]["name"] if rows else None


def fig_damage(doc, out, name):
    row = next((r for r in _ok(doc) if r["name"] == name and r.get("damage")), None)
    if row is None or not (out / row["damage"]).exists():
        return None
    tensors = [t for t in read_json(out / row["damage"])["tensors"] if t["layer"] is not None and t["rel_rmse"] is not None]
    if not tensors:
        return None
    kinds = sorted({t["kind"] for t in tensors}, key=lambda k: (not k.startswith("attn"), k))
    layers = sorted({t["layer"] for t in tensors})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for t in tensors:
        grid[layers.index(t["layer"]), kinds.index(t["kind"])] = t["rel_rmse"]
    fig, ax = plt.subplots(figsize=(1.0 * len(kinds) + 2.5, 0.22 * len(layers) + 2))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    step = max(1, len(layers) // 16)
    ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="RMSE / RMS of the base tensor")
    ax.set_title(f"Where the damage is: {name}\n(weight error per tensor against the base)", fontsize=10)
    return _save(fig, out, f"damage-{name}")


def fig_forest(doc, out: Path) -> str | None:
    """Paired differences of ln(PPL) with their intervals, against the base and the reference."""
    pr = doc.get("paired") or {}
    panels = [(f"against the base ({pr.get('base')})", pr.get("vs_base") or {}, lambda c: c),
              (f"against the reference ({pr.get('reference')})", pr.get("vs_reference") or {}, lambda c: c["nll"])]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    names = [n for n in reversed(pr["ranking"])]  # best at the top
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 1.6 + 0.32 * len(names)), squeeze=False,
                             sharey=True, layout="constrained")
    y = np.arange(len(names))
    for ax, (title, comparisons, pick) in zip(axes[0], panels):
        for i, n in enumerate(names):
            if n in comparisons:
                c = pick(comparisons[n])
                if c["lo"] is None:  # too few chunks: the mean alone, hollow
                    ax.plot(c["mean"], i, "o", mfc="none", color="0.4", ms=4)
                    continue
                apart = not (c["lo"] <= 0 <= c["hi"])
                ax.errorbar(c["mean"], i, xerr=[[c["mean"] - c["lo"]], [c["hi"] - c["mean"]]], fmt="o",
                            color="C3" if apart and c["mean"] > 0 else "C2" if apart else "0.4", capsize=3, ms=4)
        ax.axvline(0, color="k", lw=1)
        ax.set_title(title, fontsize=10)
        widest = max(max(abs(pick(c)["lo"] if pick(c)["lo"] is not None else pick(c)["mean"]),
                         abs(pick(c)["hi"] if pick(c)["hi"] is not None else pick(c)["mean"]))
                     for c in comparisons.values())
        scale = ""
        if widest > 2:  # a broken variant far out would squeeze the close ones onto the zero line
            ax.set_xscale("symlog", linthresh=0.1)
            scale = "\n(linear within ±0.1, logarithmic beyond)"
        ax.margins(x=0.06)
        ax.set_xlabel(f"ln(PPL ratio){scale}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, names)
    axes[0][0].set_ylim(-0.6, len(names) - 0.4)
    what = (f"Paired differences: NO INTERVALS ({pr['unavailable']}; hollow: the mean alone)" if pr.get("unavailable")
            else f"Paired differences with {pr['confidence']:.0%} bootstrap intervals over chunks "
                 "(right of 0: worse; grey: cannot be told apart)")
    fig.suptitle(what + "\n" + _subtitle(doc), fontsize=9)
    return _save(fig, out, "paired_forest")


def fig_kld_tail(doc, out: Path) -> str | None:
    """Each variant's quantile curve of per-token KLD, the tail stretched on a log axis of 1 - level."""
    t = doc.get("tails") or {}
    curve = t.get("curve")
    if not curve:
        return None
    beyond = np.asarray(curve["beyond"])
    fig, ax = plt.subplots(figsize=(7.5, 4.6), layout="constrained")
    for i, (name, values) in enumerate(curve["variants"].items()):
        values = np.maximum(np.asarray(values), 1e-7)  # (a KLD of 0 has no place on a log axis)
        ax.plot(beyond, values, color=f"C{i % 10}", ls=("-", "--", ":")[i // 10 % 3], lw=1.4, label=printable(name))
        for k, mark in (("p99", "o"), ("p999", "s")):
            c = t["variants"][name][k]
            if c["lo"] is not None:
                x = 1 - LEVELS[k]
                ax.errorbar(x, max(c["value"], 1e-7), yerr=[[c["value"] - c["lo"]], [c["hi"] - c["value"]]],
                            fmt=mark, color=f"C{i % 10}", ms=3.5, capsize=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()  # the tail to the right
    ticks = [0.5, 0.1, 0.01, 0.001, 1e-4, 1e-5]
    ticks = [x for x in ticks if x >= beyond[-1]]
    ax.set_xticks(ticks, [f"{100 * (1 - x):g}%" for x in ticks])
    ax.set_xlabel("percentile of tokens (logarithmic in the share of tokens beyond it)")
    ax.set_ylabel("KL divergence from the base (nats)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2 if len(curve["variants"]) > 8 else 1, loc="upper left")
    ax.set_title(f"Per-token KLD by percentile; 99% (o) and 99.9% (s) with {t['confidence']:.0%} intervals over "
                 f"chunks\n{_subtitle(doc)}", fontsize=9)
    return _save(fig, out, "kld_tail")


def fig_task(doc, out: Path, label: str, index: int) -> str | None:
    """One task: each variant's accuracy with its interval, and its flips against the base."""
    t = doc["tasks"][label]
    names = list(t["variants"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 1.6 + 0.32 * len(names)), sharey=True, layout="constrained")
    y = np.arange(len(names))[::-1]
    for i, n in zip(y, names):
        v = t["variants"][n]
        left.errorbar(100 * v["accuracy"], i, xerr=[[100 * (v["accuracy"] - v["lo"])], [100 * (v["hi"] - v["accuracy"])]],
                      fmt="o", color="C0", capsize=3, ms=4)
        f = v.get("vs_base")
        if f:
            first = not right.get_legend_handles_labels()[0]
            right.barh(i + 0.18, f["right_to_wrong"], height=0.34, color="C3", label="right→wrong" if first else None)
            right.barh(i - 0.18, f["wrong_to_right"], height=0.34, color="C2", label="wrong→right" if first else None)
    chance = {"hellaswag": 25.0, "winogrande": 50.0}.get(t["mode"])
    if chance:
        left.axvline(chance, color="0.5", ls="--", lw=1, label=f"chance ({chance:g}%)")
        left.legend(fontsize=8, loc="best")
    left.set_yticks(y, [printable(n) for n in names])
    left.set_xlabel("accuracy (%), 95% Wilson interval")
    left.grid(axis="x", alpha=0.3)
    right.set_xlabel(f"questions flipped against the base ({t['base']})")
    right.grid(axis="x", alpha=0.3)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{printable(label)}: {t['questions']} questions\n{_subtitle(doc)}", fontsize=9)
    return _save(fig, out, f"task-{index}")


def _figures(doc: dict, out: Path, damage_variant: str | None) -> list[tuple[str, object, tuple]]:
    """(title, drawing function, its arguments) of every figure a sweep can have."""
    figs = [("Perplexity per variant", fig_perplexity, ()),
            ("Paired differences (forest plot)", fig_forest, ()),
            ("KL divergence tail", fig_kld_tail, ()),
            ("Perplexity against effective bits per weight", fig_tradeoff, ()),
            ("Perplexity against zero radius", fig_radius, ()),
            ("Zero-run histograms", fig_zero_runs, ()),
            ("Stock Q8_0 values (256 bins)", fig_q8_values, ()),
            ("Table code usage", fig_table_codes, ())]
    if damage_variant:
        figs.append((f"Weight error per tensor: {damage_variant}", fig_damage, (damage_variant,)))
    figs += [(f"Task answers: {label}", fig_task, (label, i)) for i, label in enumerate(doc.get("tasks") or {})]
    figs += [(f"Value histogram: {r['name']}", fig_values, (r,)) for r in _ok(doc) if r["kind"] != "base"]
    return [(title, fn, (doc, out, *args)) for title, fn, args in figs]


def _draw(fn, args):
    try:
        return fn(*args)
    except SystemExit:  # its parent went (below): unwound, so write_atomic left no temporary file
        os._exit(1)     # (returning would wait on a queue nobody writes to any more)


STOPS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_started = [False]  # (in a drawing process) its initializer has run


def _parent_gone(*_):
    if not _started[0]:  # still starting: nothing to unwind (and an exception here would be logged)
        os._exit(1)
    # SIGALRM (default action: end the process) in case the exit below is lost on its way: the pool's
    # worker loop catches everything raised while it sends a result back, then waits for work
    if not signal.getitimer(signal.ITIMER_REAL)[0]:
        signal.alarm(2)
    raise SystemExit(1)


def _exit_again(u) -> None:
    """An exit that a callback swallowed (a weakref's, a __del__): raised again a moment later (SIGPROF,
    after 1 ms of drawing), outside it, and not printed."""
    if isinstance(u.exc_value, SystemExit):
        signal.setitimer(signal.ITIMER_PROF, 0.001)
    else:
        sys.__unraisablehook__(u)


def _die_with_parent(parent: int) -> None:
    """A drawing process goes when the one that started it does (a killed sweep leaves none
    behind): the kernel sends it SIGTERM, which unwinds it. Ctrl-C reaches the whole process group:
    the parent, interrupted, ends its drawing processes itself (SIGTERM)."""
    signal.signal(signal.SIGTERM, _parent_gone)
    signal.signal(signal.SIGHUP, _parent_gone)
    signal.signal(signal.SIGPROF, _parent_gone)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.unraisablehook = _exit_again
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it went before the line above
        os._exit(1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # (held back by draw_all while the pool started)
    _started[0] = True


def _end(workers) -> None:
    """Interrupted: the drawing processes go now, each unwinding (SIGTERM), not after their figures."""
    for p in workers:
        p.terminate()
    for p in workers:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


def _workers(n: int) -> int:
    """Processes to draw n figures in: one per core, where forking is safe (Linux, and no other
    thread, such as a Ray driver's, could hold a lock the copy needs); else none. Drawing is Python
    (text layout mostly), so threads would take turns on the GIL."""
    if sys.platform != "linux" or threading.active_count() > 1:
        return 0
    return min(n, len(os.sched_getaffinity(0)))


def draw_all(doc: dict, out: Path, damage_variant: str | None = None) -> list[tuple[str, str]]:
    """Every figure the results allow, drawn on every core; returns (title, PNG file name) pairs."""
    out = Path(out)
    figs = _figures(doc, out, damage_variant or default_damage_variant(doc))
    workers = _workers(len(figs))
    if workers < 2:
        names = [fn(*args) for _, fn, args in figs]
    else:
        before = set(multiprocessing.active_children())
        # Interrupts are held back while the workers are forked and given their figures: one in the
        # middle of that left the pool half made (a worker it never learnt of, which the interpreter's
        # exit then waited on for ever). They come when released, or to the workers once started.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_die_with_parent, initargs=(os.getpid(),))
        try:  # (not pool.map: its futures, cancelled when it is interrupted, break Python 3.11's pool as
            # it ends the workers killed below: a traceback from its thread)
            try:
                futures = [pool.submit(_draw, fn, args) for _, fn, args in figs]
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            names = [f.result() for f in futures]
        except (KeyboardInterrupt, SystemExit):
            _end(set(multiprocessing.active_children()) - before)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return [(title, name) for (title, _, _), name in zip(figs, names) if name]
