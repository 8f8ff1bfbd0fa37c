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


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _flips(f: dict | None) -> str:
    """Three table cells: the flips each way, the difference of accuracy, McNemar's p."""
    if not f:
        return "– | – | –"
    p = f"{f['p']:.2g}" if f["p"] >= 1e-4 else "<1e-4"
    return (f"{f['right_to_wrong']} / {f['wrong_to_right']} | {100 * f['difference']:+.1f} "
            f"[{100 * f['lo']:+.1f}, {100 * f['hi']:+.1f}] | {p}")


def render_tasks(doc: dict) -> list[str]:
    tasks = doc.get("tasks") or {}
    if not tasks:
        return []
    lines = ["## Task answers", "",
             "Every variant answered the same questions. *Accuracy*: the share answered right, with its 95% "
             "Wilson interval. *Flips* against the base and against the reference: questions the variant gets "
             "wrong that the other gets right (right→wrong) and the reverse (wrong→right); *Δ accuracy* "
             "(points) with Newcombe's paired interval; *p*: McNemar's exact test, which uses the pairing (two "
             "variants with equal accuracy can still disagree on many answers). Questions are the units: each "
             "test is on its own, without correction for the number of variants.", ""]
    for label, t in tasks.items():
        lines += [f"### {label}", "",
                  f"`{t['file']}` (sha256 `{t['sha256'][:16]}…`): {t['questions']} questions, {t['mode']} format.", "",
                  f"| variant | accuracy (%) | right→wrong / wrong→right vs base `{t['base']}` | Δ accuracy | p "
                  f"| right→wrong / wrong→right vs reference `{t['reference'] or 'none'}` | Δ accuracy | p |",
                  "|" + "---|" * 8]
        for name, v in t["variants"].items():
            lines.append(f"| {name} | {_pct(v['accuracy'])} [{_pct(v['lo'])}, {_pct(v['hi'])}] | "
                         f"{_flips(v.get('vs_base'))} | {_flips(v.get('vs_reference'))} |")
        lines.append("")
    return lines
