"""The report's sections on behaviour beyond mean perplexity: the tail of the per-token KL divergence
(study.tails) and the answers to tasks (study.answers)."""


def _value(c: dict, fmt: str, signed: bool = False) -> str:
    sign = "+" if signed else ""
    v = format(c["value"], sign + fmt)
    if c["lo"] is None:
        return v
    return f"{v} [{format(c['lo'], sign + fmt)}, {format(c['hi'], sign + fmt)}]"


def render_tails(doc: dict) -> list[str]:
    t = doc.get("tails") or {}
    if not t.get("variants"):
        return []
    conf = f"{t['confidence']:.0%}"
    levels = t["levels"]
    lines = ["## KL divergence tail", "",
             "Percentiles of the per-token KL divergence from the base (llama-perplexity's own rule, so they "
             f"match what it prints), with {conf} intervals over chunks: a variant's own from the spread of the "
             "chunks' shares of tokens below it (Woodruff's interval), a difference to the reference from a "
             f"bootstrap over chunks ({t['draws']} draws, the same for both variants: paired). The maximum is "
             "what this text showed: nothing bounds a maximum from a sample, so it has no interval.", ""]
    if any("unavailable" in c for c in t["variants"].values()):
        lines += [f"**No intervals: {next(iter(t['variants'].values()))['unavailable']}.**", ""]
    head = "| variant | " + " | ".join(f"KLD {levels[k]}" for k in levels) + " |"
    lines += [head, "|" + "---|" * (len(levels) + 1)]
    for name, c in t["variants"].items():
        lines.append(f"| {name} | " + " | ".join(_value(c[k], ".5f") for k in levels) + " |")
    if t.get("vs_reference"):
        lines += ["", f"Against the reference `{t['reference']}` (variant − reference; an interval that excludes 0 "
                  "is a difference this text can tell):", "",
                  head.replace("KLD ", "Δ KLD "), "|" + "---|" * (len(levels) + 1)]
        for name, c in t["vs_reference"].items():
            lines.append(f"| {name} | " + " | ".join(_value(c[k], ".5f", signed=True) for k in levels) + " |")
    return lines + [""]
