"""A recipe's report and frontier figure, from recipe.json: each budget's recipe, its predicted and
measured effect (held-out text) with intervals, whether it kept its budget and whether the additive
prediction held, against the reference and each global encoding on the same axes."""

from pathlib import Path
from typing import NamedTuple

from ..files import write_atomic
from .plots import _save, plt

LABEL = {"kld": "mean KLD − reference's", "nll": "ln(PPL / PPL reference)"}


def _label(doc: dict) -> str:
    """The budget's quantity in words (a tail's from recipe.json: `quantity_label`)."""
    return LABEL.get(doc["quantity"]) or f"the model's own {doc['quantity_label']}"


def _ci(c: dict | None, fmt: str = "+.4f") -> str:
    if not c:
        return "–"
    if c.get("lo") is None:
        return f"{c['mean']:{fmt}} (no interval)"
    return f"{c['mean']:{fmt}} [{c['lo']:{fmt}}, {c['hi']:{fmt}}]"


class Axis(NamedTuple):
    """What a recipe's x is called: on the figure's axis, as a unit, as what a recipe gains, as a column."""
    label: str
    unit: str
    gain: str
    column: str
    scale: float  # from recipe.json's figure to the one shown


AXES = {"zero_fraction": Axis("zeros among the main type's values (%)", "zeros", "zeros added", "zeros", 100),
        "bpw": Axis("bits per weight (tensor data)", "bits", "bits saved", "bits/weight", 1)}


def _x(doc: dict, x) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.2f}%" if doc["axis"] == "zero_fraction" else f"{x:.3f}"


def _plotted(doc: dict, x: float) -> float:
    return AXES[doc["axis"]].scale * x


def _how(doc: dict) -> str:
    """What the columns mean, for the budget's kind (an effect over the reference's, or a tail percentile)."""
    gain, unit = AXES[doc["axis"]].gain, AXES[doc["axis"]].unit
    which = "an" if len(doc["scans"]) > 1 else "the"
    if doc["quantity"].startswith("kld_"):
        return (f"Each recipe takes {which} encoding on the groups of most {gain} whose predicted percentile "
                f"({_label(doc)}) is at most the budget: the mean-KLD choices at {len(doc['recipes'])} "
                "budget(s) were tried, each predicted token by token (the reference's per-token KLD plus each "
                "chosen group's per-token change, on the chunks they were all scored on; Woodruff's interval). "
                "*Measured*: the recipe's model's own percentile on the held-out text, with Woodruff's interval. "
                "*Additive*: whether the two intervals meet (token-by-token additivity).")
    return (f"Each recipe takes {which} encoding on the groups of most {gain} whose scanned effects sum to at "
            f"most the budget ({_label(doc)}). *Predicted*: the groups' differences to the reference "
            "added chunk by chunk, averaged over the chunks every chosen group was scored on, with the scan's own "
            "interval (which allows for groups hurt alike by the same chunks). *Measured*: the recipe's model "
            "against the reference on the held-out text, paired by token, 95% bootstrap interval over chunks. "
            "*Additive*: whether the two intervals meet. *Against the global settings*: the recipe minus the "
            f"straight line between the two measured global settings whose {unit} bracket its own (per chunk, "
            f"paired; 95% bootstrap): negative, the mix beats a uniform setting of its {unit}.")


def _vs(c: dict | None, doc: dict) -> str:
    if doc["quantity"].startswith("kld_"):
        return "– (percentiles do not add up along a line)"
    if not c:
        return "– (no two global settings bracket it)"
    return f"{_ci(c['difference'])}: {c['verdict']} (between {' and '.join(c['between'])})"


def _encodings(doc: dict) -> str:
    return " / ".join(sc["encoding"]["name"] for sc in doc["scans"])


def fig_frontier(doc: dict, out: Path) -> str:
    """Zeros (or bits) against the measured effect: every recipe with its interval (hollow: the prediction), and the
    reference and each global encoding."""
    fig, ax = plt.subplots(figsize=(7, 4.6), layout="constrained")
    for i, r in enumerate(doc["recipes"]):
        m, p = r["measured"], r["predicted"]
        if m:
            err = None if m.get("lo") is None else [[m["mean"] - m["lo"]], [m["hi"] - m["mean"]]]
            ax.errorbar(_plotted(doc, r["x"]), m["mean"], yerr=err, fmt="o", color="C0", capsize=3,
                        label="recipe, measured on held-out text" if i == 0 else None)
        if p and p.get("lo") is not None:  # (a little to the right of the measurement, to be seen)
            ax.errorbar(_plotted(doc, r["x"]) * 1.005, p["mean"], yerr=[[p["mean"] - p["lo"]], [p["hi"] - p["mean"]]],
                        fmt="o", mfc="none", color="C1", capsize=3, alpha=0.8, label="recipe, predicted" if i == 0 else None)
        ax.axhline(r["budget"]["limit"], color="0.6", lw=0.8, ls=":")
        ax.annotate(r["name"], (_plotted(doc, r["x"]), m["mean"] if m else 0), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    line = sorted((_plotted(doc, g["x"]), g["measured"]["mean"] if g["measured"] else 0.0)
                  for g in doc["globals"].values())
    ax.plot(*zip(*line), "--", color="C3", lw=0.8, alpha=0.6, label="between global settings")
    for n, g in doc["globals"].items():
        y = g["measured"]["mean"] if g["measured"] else 0.0
        ax.plot(_plotted(doc, g["x"]), y, "s", color="C3", ms=6)
        ax.annotate(f"{n} (global)", (_plotted(doc, g["x"]), y), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set_xlabel(AXES[doc["axis"]].label)
    ax.set_ylabel(f"{_label(doc)} (held-out text)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"Recipes of {_encodings(doc)} on {doc['reference']['name']}: "
                 f"{AXES[doc['axis']].unit} against damage (dotted: the budgets)", fontsize=9)
    return _save(fig, out, "frontier")


def render(doc: dict, figure: str) -> str:
    q = doc["quantity"]
    lines = [f"# Recipes: {_encodings(doc)} on {doc['reference']['name']}", "",
             *(f"- Scan of {sc['encoding']['name']}: `{sc['dir']}`" for sc in doc["scans"]),
             f"- Scanned on: `{doc['texts']['scan']['file']}`",
             f"- Measured on: `{doc['texts']['verify']['file']}` (sha256 `{doc['texts']['verify']['sha256'][:16]}…`), "
             "text the scan did not see; the verifying sweep is in `verify/`", "",
             _how(doc), "",
             f"| recipe | groups | {AXES[doc['axis']].column} | predicted | measured "
             "| budget | additive | against the global settings |", "|---|---|---|---|---|---|---|---|"]
    recipes = doc["recipes"]
    for r in recipes:
        v = r["verdict"] or {}
        lines.append(f"| `{r['name']}` | {len(r['groups'])} | {_x(doc, r['x'])} | {_ci(r['predicted'])} | "
                     f"{_ci(r['measured'])} | {v.get('budget', '–')} | {v.get('additive', '–')} | {_vs(r.get('vs_globals'), doc)} |")
    for n, g in doc["globals"].items():
        lines.append(f"| `{n}` (global) | – | {_x(doc, g['x'])} | – | "
                     f"{'0 (the reference)' if n == doc['reference']['name'] and not q.startswith('kld_') else _ci(g['measured'])}"
                     " | – | – | – |")
    lines.append("")
    for i, r in enumerate(recipes):
        if r["verdict"] and r["verdict"]["budget"] == "broken":
            down = next((x for x in reversed(recipes[:i]) if x["verdict"] and x["verdict"]["budget"] == "kept"), None)
            lines.append(f"- **`{r['name']}` broke its budget on the held-out text.** "
                         + (f"The next recipe down that kept its own is `{down['name']}` ({down['file']})."
                            if down else "The reference itself is above it: no recipe can keep it." if not r["groups"]
                            else "No smaller recipe kept its budget: try a smaller one."))
        spared = [g for g in recipes[-1]["groups"] if g not in r["groups"]]
        several = len(doc["scans"]) > 1
        lines.append(f"- `{r['name']}` ({r['file'] or 'no group fits: the reference itself'}) encodes "
                     f"{', '.join(f'{g} ({e})' if several else g for g, e in r['choices'].items()) or 'nothing'}"
                     + (f"; it spares {', '.join(spared)}, which the largest budget takes" if spared else ""))
    lines += ["", f"![frontier]({figure})", ""]
    return "\n".join(lines)


def write_all(doc: dict, out: Path) -> None:
    figure = fig_frontier(doc, Path(out))
    write_atomic(Path(out) / "recipe.md", render(doc, figure))
