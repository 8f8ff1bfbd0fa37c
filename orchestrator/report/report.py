"""The sweep's outputs: results.json, results.csv, histogram copies, figures, report.md."""

import csv
import io
import math
import re
from pathlib import Path

from .. import results, texts
from ..files import read_json, read_text, write_atomic, write_json
from ..results import fmt_ppl
from . import plots
from .behaviour import render_tails, render_tasks

def _zstd_how(doc: dict) -> str:
    """How the zstd sizes were measured (the settings results.json records): on all the data, or on
    samples of it (which share)."""
    m = doc.get("measurement")
    level = f"level {m['zstd_level']}" if m else "level not recorded"
    rows = doc["variants"]
    shares = [r["zstd_sampled"] for r in rows if r.get("zstd_sampled") is not None and r["zstd_sampled"] < 1]
    if not shares:
        return f"{level}, each tensor on its own, measured on all of it"
    if not m:
        return f"{level}, each tensor on its own, estimated from samples ({100 * min(shares):.2g}–{100 * max(shares):.2g}% of the data)"
    return (f"{level}, each tensor on its own, estimated from evenly spaced {m['segment_bytes'] >> 20} MiB segments "
            f"of every tensor ({100 * min(shares):.2g}–{100 * max(shares):.2g}% of the data, depending on the "
            f"variant) where a model has more than {m['zstd_budget_bytes'] >> 20} MiB of tensor data, measured "
            "on all of it otherwise")


def write_csv(doc: dict, path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, results.CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in doc["variants"]:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in results.CSV_COLUMNS})
    write_atomic(path, buf.getvalue())


def _fmt(v, spec: str, empty: str = "–") -> str:
    return empty if v is None else format(v, spec)


def render_report(doc: dict, figures: list[tuple[str, str]]) -> str:
    rows = doc["variants"]
    base = next((r for r in rows if r["kind"] == "base" and r["status"] == "ok"), None)
    lines = [f"# Sweep `{doc['name']}`", ""]
    if doc.get("description"):
        lines += [doc["description"], ""]
    lines += [f"- Model: `{doc['model']}` (sha256 `{doc['model_sha256'][:16]}…`)"]
    if doc["base_upcast_from"]:
        lines += [f"- **Base: an F16 upcast of a {doc['base_upcast_from']} model.** The model was already "
                  f"quantized, so its \"F16\" reference is that {doc['base_upcast_from']} model's weights in F16, "
                  "not an original full-precision model; every variant is a re-quantization of those weights."]
    else:
        lines += [f"- Base: the model as given (`{doc['base']}`)"]
    p = doc["perplexity"]
    lines += [f"- Text: `{doc['text']}` (sha256 `{doc['text_sha256'][:16]}…`); llama-perplexity `-c {p['ctx']}`"
              f" over {p['chunks'] or 'all'} chunks" + ("; KL divergence against the base" if p["kld"] else ""),
              *render_texts(doc),
              f"- Fork: `{doc['fork']['id']}` — {doc['fork']['upstream']}; patches: "
              + ", ".join(f"`{x}`" for x in doc["fork"]["patches"]),
              f"- Made: {doc['created']}", "", "## Results", ""]
    head = ("| variant | type | mode | radius | table | perplexity | vs base | bits/weight | zstd bits/weight "
            "| value entropy (bits) | weight error | zeros | isolated zeros |")
    if p["kld"]:
        head += " KLD | same top token |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r.get('type') or ''} | | | | **failed** |" + " |" * (head.count("|") - 7))
            continue
        delta = "" if not base or r is base else ("+" if r["ppl"] >= base["ppl"] else "") + fmt_ppl(r["ppl"] - base["ppl"])
        line = (f"| {r['name']} | {r['type']} | {r['mode']} | {_fmt(r['radius'], 'd', '')} | {r['table'] or ''} | "
                f"{fmt_ppl(r['ppl'])} ± {fmt_ppl(r['ppl_err'])} | {delta} | {_fmt(r['bpw'], '.3f')} | "
                f"{_fmt(r.get('zstd_bpw'), '.3f')} | {_fmt(r.get('entropy_bpw'), '.3f')} | "
                f"{_fmt(r.get('weight_rel_rmse'), '.4f')} | "
                f"{_fmt(r['zero_fraction'] and 100 * r['zero_fraction'], '.2f')}{'%' if r['zero_fraction'] is not None else ''} | "
                f"{_fmt(r['isolated_zero_share'] and 100 * r['isolated_zero_share'], '.2f')}{'%' if r['isolated_zero_share'] is not None else ''} |")
        if p["kld"]:
            line += f" {_fmt(r.get('kld'), '.6f')} | {_fmt(r.get('same_top'), '.2f')}{'%' if r.get('same_top') is not None else ''} |"
        lines.append(line)
    lines += ["", "± is llama-perplexity's own standard error. Do not compare two variants by it: every variant "
              "scores the same tokens, so their errors are strongly correlated; the paired comparisons below "
              "tell variants apart.", "",
              "*bits/weight*: tensor data as stored; *zstd bits/weight*: the same bytes compressed with zstd "
              f"({_zstd_how(doc)}); *value entropy*: Shannon entropy of the stored values of the variant's main "
              "type, in bits per weight (scales not included); *weight error*: RMSE of all weights against the "
              "base, relative to the base's RMS; *zeros*: share of the main type's values stored as 0; "
              "*isolated zeros*: share of those zeros with no zero neighbour in their row (runs of length 1).", ""]
    lines += render_paired(doc)
    lines += render_tails(doc)
    lines += render_tasks(doc)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["## Failures", ""] + [f"- `{r['name']}`: {r['reason']}" + (f" (log: `{r['log']}`)" if r.get("log") else "")
                                        for r in failed] + [""]
    lines += ["## Figures", ""]
    for title, path in figures:
        lines += [f"### {title}", "", f"![{title}]({path})", ""]
    lines += ["## Commands run", ""]
    for r in rows:
        for c in r.get("commands") or []:
            lines.append(f"- `{r['name']}`: `{' '.join(c)}`")
    return "\n".join(lines) + "\n"


def render_texts(doc: dict) -> list[str]:
    """What scored and what was fitted on what, and a warning where they share text."""
    t = doc.get("texts")
    if not t:
        return []
    score = t["score"]
    out = [f"- Scored on {score['part']}" + (" (the rest held back for fitting)" if t["fit"] else "")] if "part" in score else []
    for f in t["fit"]:
        source = f["from"] if "from" in f else f"{f.get('part') or '`' + f['file'] + '`'} (sha256 `{f['sha256'][:16]}…`)"
        out.append(f"- {f['for']}: {source}")
        if "sha256" in f and texts.overlaps(f, score):
            out.append(f"- **Warning: the text fitted on ({source}) is also scored**: what was fitted on it scores "
                       "better here than it would elsewhere (use `--split-text`, or another text to score)")
    return out


def _ci(c: dict, scale: float = 1, fmt: str = "+.4f") -> str:
    if c["lo"] is None:  # too few chunks for an interval
        return f"{scale * c['mean']:{fmt}} (no interval)"
    return f"{scale * c['mean']:{fmt}} [{scale * c['lo']:{fmt}}, {scale * c['hi']:{fmt}}]"


def _ratio(c: dict) -> str:
    if c["lo"] is None:
        return f"{fmt_ppl(math.exp(c['mean']))} (no interval)"
    return f"{fmt_ppl(math.exp(c['mean']))} [{fmt_ppl(math.exp(c['lo']))}, {fmt_ppl(math.exp(c['hi']))}]"


def render_paired(doc: dict) -> list[str]:
    """The paired comparisons: against the base and the reference, the ranking, the groups."""
    pr = doc.get("paired") or {}
    lines = ["## Paired comparisons", ""]
    if "error" in pr or not pr.get("ranking"):
        return lines + [f"Not available: {pr.get('error', 'no variant was scored')}", ""]
    conf = f"{pr['confidence']:.0%}"
    if pr.get("unavailable"):
        lines += [f"**No intervals, verdicts or groups: {pr['unavailable']}.** Over fewer chunks a bootstrap "
                  "interval covers the true difference far less often than it claims; the mean differences "
                  "below are shown without one.", ""]
    lines += [f"Each variant is compared token by token with the base and with the reference "
              f"(`{pr['reference'] or 'none'}`) on the same scored tokens: the mean difference of negative "
              f"log-likelihood, which is ln(PPL ratio), with its {conf} interval from a bootstrap over chunks "
              f"({pr['draws']} draws; chunks, not tokens, are the independent units), and the same as a "
              "perplexity ratio. An interval that excludes 0 (ratio 1) is a difference this text can tell. "
              "(The interval is the expanded percentile bootstrap, which widens the plain one as Student's t "
              "would for few chunks.)", ""]
    head = "| variant | ln(PPL / PPL base) | PPL / PPL base | ln(PPL / PPL ref) | PPL / PPL ref |"
    kld = any("kld" in c for c in pr["vs_reference"].values())
    if kld:
        head += " KLD | same top (%) | KLD − ref KLD | same top − ref (points) |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name in pr["ranking"]:
        vb, vr = pr["vs_base"].get(name), pr["vs_reference"].get(name)
        line = (f"| {name} | {_ci(vb) if vb else '–'} | {_ratio(vb) if vb else '–'} | "
                f"{_ci(vr['nll']) if vr else '–'} | {_ratio(vr['nll']) if vr else '–'} |")
        if kld:
            alone = pr["alone"].get(name) or {}
            line += (f" {_ci(alone['kld'], fmt='.5f') if 'kld' in alone else '–'} | "
                     f"{_ci(alone['top'], 100, '.2f') if 'top' in alone else '–'} | "
                     f"{_ci(vr['kld'], fmt='+.5f') if vr and 'kld' in vr else '–'} | "
                     f"{_ci(vr['top'], 100, '+.2f') if vr and 'top' in vr else '–'} |")
        lines.append(line)
    if pr["groups"] is None:
        return lines + ["", "**Ranking** (lowest perplexity first): " + ", ".join(f"`{n}`" for n in pr["ranking"])
                        + " (no groups: too few chunks to tell variants apart)", ""]
    letters = {}
    for i, group in enumerate(pr["groups"]):
        for name in group:
            letters.setdefault(name, []).append(chr(ord("a") + i) if i < 26 else f"g{i + 1}")
    lines += ["", f"**Ranking** (lowest perplexity first) and groups that cannot be told apart at {conf} "
              "(variants sharing a letter are not distinguishable; each pair is tested on its own, "
              "without correction for the number of pairs): "
              + ", ".join(f"`{n}` ({''.join(letters[n])})" for n in pr["ranking"]), ""]
    shared: dict[str, list[str]] = {}
    for r in doc["variants"]:
        if r["status"] == "ok" and r.get("scored_for"):
            shared.setdefault(r["tensor_key"], []).append(r["name"])
    for names in shared.values():
        if len(names) > 1:
            lines += [f"- {', '.join(f'`{n}`' for n in names)} have byte-identical tensors and were scored once."]
    return lines + [""]


def _unchanged(doc: dict, out: Path, damage_variant: str | None) -> bool:
    """True when results.json already says the same (a fully cached re-run): the figures and
    report on disk are then still right and drawing them again would only cost time."""
    path = out / results.FILE
    if damage_variant or not path.exists() or not (out / "report.md").exists():
        return False
    old = read_json(path)
    strip = lambda d: {k: v for k, v in d.items() if k != "created"}  # noqa: E731
    if strip(old) != strip(doc):
        return False
    figures = re.findall(r"\]\(([^)]+\.png)\)", read_text(out / "report.md"))
    return all((out / f).exists() and (out / f).with_suffix(".svg").exists() for f in figures)


def write_all(doc: dict, out: Path, damage_variant: str | None = None) -> None:
    if _unchanged(doc, out, damage_variant):
        return
    write_json(out / results.FILE, doc)
    write_csv(doc, out / "results.csv")
    figures = plots.draw_all(doc, out, damage_variant)
    write_atomic(out / "report.md", render_report(doc, figures))


def redraw(out: Path, damage_variant: str | None = None) -> list[tuple[str, str]]:
    """`orchestrate plot DIR`: figures and report again from results.json (under the sweep lock)."""
    out = Path(out)
    doc = results.load(out)
    with results.locked(out):
        figures = plots.draw_all(doc, out, damage_variant)
        write_atomic(out / "report.md", render_report(doc, figures))
    return figures
