"""Parse what llama-quantize and llama-perplexity print (stdout and stderr merged).

Formats drift between llama.cpp versions (log prefixes with timestamps, the BPW suffix,
the KL-divergence table instead of "Final estimate"), so each figure is looked for by a
pattern that tolerates those differences. A missing final estimate is an error, never 0.
"""

import math
import re

from .errors import OrchestrateError

NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf|-nan|-inf))"
PM = r"\s*(?:±|\+/-)\s*"
CHUNK = r"\[(\d+)\]" + NUM + ","  # llama-perplexity's running estimate after chunk k: "[k]ppl,"


class ParseError(OrchestrateError):
    pass


def _f(s: str) -> float:
    return float(s.replace("-nan", "nan"))


def _value_pm(text: str, label: str) -> tuple[float, float] | None:
    m = re.search(re.escape(label) + r"\s*:\s*" + NUM + PM + NUM, text)
    return (_f(m.group(1)), _f(m.group(2))) if m else None


def parse_perplexity(text: str) -> dict:
    """The final perplexity ± error, the per-chunk running series, and KLD statistics if any."""
    out: dict = {}
    m = re.search(r"Final estimate: PPL = " + NUM + PM + NUM, text)
    if m:
        out["ppl"], out["ppl_err"] = _f(m.group(1)), _f(m.group(2))
    else:
        pm = _value_pm(text, "Mean PPL(Q)")  # --kl-divergence prints this instead
        if pm is None:
            raise ParseError("llama-perplexity printed no final estimate (too little text for one chunk, "
                             "or the run was cut short)")
        out["ppl"], out["ppl_err"] = pm
    if not math.isfinite(out["ppl"]):
        raise ParseError(f"llama-perplexity's final estimate is not finite ({out['ppl']})")

    chunks = [(int(i), _f(v)) for i, v in re.findall(CHUNK, text)]
    if not chunks:  # KL-divergence table rows: "   3     43.87 ±   3.07  ..."
        chunks = [(int(i), _f(v)) for i, v, _ in re.findall(r"(?m)^\s*(\d+)\s+" + NUM + PM + NUM, text)]
    out["chunks"] = [v for _, v in sorted(dict(chunks).items())]

    kld = _value_pm(text, "Mean    KLD") or _value_pm(text, "Mean KLD")
    if kld:
        out["kld"], out["kld_err"] = kld
        same = re.search(r"Same top p\s*:\s*" + NUM + PM + NUM + r"\s*%", text)
        if same:
            out["same_top"], out["same_top_err"] = _f(same.group(1)), _f(same.group(2))
        rms = re.search(r"RMS Δp\s*:\s*" + NUM + PM + NUM + r"\s*%", text)
        if rms:
            out["rms_dp"], out["rms_dp_err"] = _f(rms.group(1)), _f(rms.group(2))
    return out


class PerplexityProgress:
    """Chunks done (and in all, once said) of a running llama-perplexity, from its output fed in
    pieces cut anywhere: "[k]ppl," entries, or the --kl-divergence table's rows."""

    TAIL = 256  # kept from the last piece: longer than an entry, a row's start or the "over N chunks" line

    def __init__(self):
        self.done, self.total, self.per_pass, self._tail = 0, None, 1, ""

    def feed(self, text: str) -> bool:
        """True when more chunks are done than before."""
        s = self._tail + text
        self._tail = s[-self.TAIL:]
        if self.total is None and (m := re.search(r"over (\d+) chunks.*?(?:n_seq\s*=\s*(\d+))?\n", s)):
            self.total, self.per_pass = int(m.group(1)), int(m.group(2) or 1)
        seen = [int(k) for k, _ in re.findall(CHUNK, s)]
        # a row after a newline: the kept tail starts anywhere, maybe inside a row
        seen += [int(k) for k, _, _ in re.findall(r"\n[ \t]*(\d+)[ \t]+" + NUM + PM + NUM, s)]
        done = max(seen, default=0)
        moved, self.done = done > self.done, max(done, self.done)
        return moved

    def seconds_left(self, elapsed: float) -> float | None:
        """From the passes done in `elapsed` seconds: a pass scores per_pass chunks at once, and
        prints them one by one, so counting chunks would make the first of each look slow."""
        if not self.total or not self.done:
            return None
        done, passes = -(-self.done // self.per_pass), -(-self.total // self.per_pass)
        return elapsed / done * (passes - done)


def parse_quantize(text: str) -> dict:
    """Sizes before/after (MiB, and bits per weight when printed) and per-tensor target types."""
    out: dict = {}
    for key, label in (("model", "model size"), ("quant", "quant size")):
        m = re.search(label + r"\s*=\s*" + NUM + r"\s*MiB(?:\s*\(\s*" + NUM + r"\s*BPW\))?", text)
        if m:
            out[f"{key}_mib"] = _f(m.group(1))
            if m.group(2):
                out[f"{key}_bpw"] = _f(m.group(2))
    if "quant_mib" not in out:
        raise ParseError("llama-quantize printed no quant size (it did not finish)")
    tensors = {}
    for name, typ, new in re.findall(
            r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type =\s*(\w+),\s*(?:converting to (\w+))?", text):
        tensors[name] = new or typ
    out["tensor_types"] = tensors
    return out


def quantize_progress(line: str) -> tuple[int, int] | None:
    """(done, total) from a llama-quantize tensor line, for a progress display."""
    m = re.search(r"\[\s*(\d+)/\s*(\d+)\]", line)
    return (int(m.group(1)), int(m.group(2))) if m else None


_DRY_RUN_TENSOR = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-.*->.*\((\w+)\)\s*$", re.M)


def dry_run_types(text: str) -> dict[str, str]:
    """llama-quantize --dry-run's output -> the type each quantized tensor would get (lowercase, as it
    prints them); tensors it would copy are absent."""
    return {m.group(1): m.group(2) for m in _DRY_RUN_TENSOR.finditer(text)}


TASK_LINES = {  # one line per question, in the order asked: its number, the running accuracy (%), ...
    "hellaswag": re.compile(r"(?m)^(\d+)\t(\d+\.\d+)%\t\["),
    "winogrande": re.compile(r"(?m)^(\d+)\t(\d+\.\d+)\t\s*\S+\s+\S+\s+([12])\s+([12])\s*$"),  # ..., chosen, right
    "mc": re.compile(r"(?m)^(\d+)\t(\d+\.\d+)\s*$"),
}
TASK_COUNT = re.compile(r"(?:loaded|selecting|there are) (\d+) (?:randomized |random |the first )?tasks")
TASK_FINAL = re.compile(r"(?:Final Winogrande score\(\d+ tasks\)|Final result): " + NUM)
TASK_ERROR = re.compile(r"(?m)^.*?(\w+ ?: (?:task \d+ does not fit|task \d+ requires|number of lines|no tasks"
                        r"|failed to read|found \d+ malformed|found bad task|found empty answer)[^\n]*)")


def parse_answers(mode: str, text: str) -> dict:
    """Which questions of a --hellaswag / --winogrande / --multiple-choice run the model answered right,
    in the order asked: exactly, from the running accuracy printed after each question (hellaswag,
    mc) or the chosen and right choice it prints (winogrande). Also the score llama-perplexity printed
    last, to check against."""
    counts = TASK_COUNT.findall(text)
    lines = TASK_LINES[mode].findall(text)
    if not counts or len(lines) != int(counts[-1]) or [int(x[0]) for x in lines] != list(range(1, len(lines) + 1)):
        err = TASK_ERROR.search(text)
        why = err.group(1).strip() if err else f"{len(lines)} answers printed for {counts[-1] if counts else '?'} questions"
        raise ParseError(f"llama-perplexity did not answer every {mode} question: {why}")
    if mode == "winogrande":
        correct = [chosen == right for _, _, chosen, right in lines]
        tally = 0
        for k, ((_, shown, _, _), ok) in enumerate(zip(lines, correct), 1):
            tally += ok
            if abs(100 * tally / k - float(shown)) > 0.51e-4:
                raise ParseError(f"winogrande answer {k}: running accuracy {shown}% does not follow its answers")
    else:
        right = [round(float(shown) * k / 100) for k, (_, shown, *_) in enumerate(lines, 1)]
        steps = [b - a for a, b in zip([0, *right], right)]
        if any(step not in (0, 1) for step in steps):
            raise ParseError(f"{mode}: the running accuracy does not follow one answer at a time")
        correct = [step == 1 for step in steps]
    final = TASK_FINAL.search(text)
    printed = _f(final.group(1)) if final else float(lines[-1][1])
    return {"correct": "".join("1" if c else "0" for c in correct), "questions": len(correct), "printed": printed,
            "printed_as": final.group(1) if final else lines[-1][1]}
