"""What a sweep will do, need and take, before it runs (`sweep --plan`), and the disk check that
makes a real sweep refuse to start when its cache cannot hold it.

Disk: the base's F16 upcast (once), the quantized models (one at a time; all with --keep-models),
the base's logits with --kld, and the small artifacts, against the free space where the cache
is. Sizes of quantized models come from earlier runs of the same type on this machine (the
ratio of output to input size), else from the type's bits per weight. Time: from this
machine's earlier runs in the cache (quantize: MiB of input per second; perplexity: seconds per
token and billion parameters, from runs on models within a factor NEAR of this one's size: the
rate per parameter changes with size), else from a one-chunk calibration run of the base.
"""

import math
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ..errors import OrchestrateError
from ..files import read_json
from . import analysis, scores
from .cache import human
from .runs import RunDir, ScoreDir, quantize_type

MARGIN = 1.10           # sizes are estimates: ask for 10% more
ARTIFACTS = 2 << 20     # histograms, analysis, scores, logs per variant (bytes, generous)
NEAR = 2.0              # perplexity rates are taken from models within this factor of the model's size


@dataclass
class Need:
    upcast: int = 0     # bytes of the base's F16 upcast, when it is still to be made
    models: int = 0     # peak bytes of quantized models on disk
    logits: int = 0     # bytes of the base's logits (--kld), when still to be made
    artifacts: int = 0

    @property
    def total(self) -> int:
        return self.upcast + self.models + self.logits + self.artifacts


def _main_tensor_type(qtype: str) -> gguf.GGMLQuantizationType:
    """The tensor type a llama-quantize type (or mix, Q4_K_M) mostly writes; Q8_0 when unknown."""
    name = qtype.upper()
    for candidate in (name, name.rsplit("_", 1)[0]):
        if candidate in gguf.GGMLQuantizationType.__members__:
            return gguf.GGMLQuantizationType[candidate]
    return gguf.GGMLQuantizationType.Q8_0


def size_ratio(qtype: str, history: dict) -> float:
    """Output bytes per input (F16) byte for qtype: measured here before, else from bits per weight."""
    if history.get(qtype):
        return statistics.median(history[qtype])
    block, nbytes = gguf.GGML_QUANT_SIZES[_main_tensor_type(qtype)]
    return 8 * nbytes / block / 16


@dataclass
class History:
    """This machine's earlier runs, from the cache."""
    size: dict          # qtype -> [output MiB / input MiB]
    quantize: dict      # qtype -> [input MiB per second]
    perplexity: dict    # model file type as llama names it (Q4_0, F16, ...) -> [(parameters, seconds per token per 1e9)]
    answers: dict = field(default_factory=dict)  # task file key -> [(parameters, seconds per 1e9)]


def history(cache: Path) -> History:
    h = History({}, {}, {})
    for d in (cache / "runs").iterdir() if (cache / "runs").is_dir() else ():
        try:
            run = RunDir(d)
            d = read_json(run.quantize)
            qtype = quantize_type(d)
            if qtype and d["model_mib"] > 0 and d["seconds"] > 0:
                h.size.setdefault(qtype, []).append(d["quant_mib"] / d["model_mib"])
                h.quantize.setdefault(qtype, []).append(d["model_mib"] / d["seconds"])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
    for d in (cache / "scores").iterdir() if (cache / "scores").is_dir() else ():
        try:
            sdir = ScoreDir(d)
            seconds = read_json(sdir.perplexity)["seconds"]
            f = scores.read_header(sdir.scores)
            if seconds > 0 and f.n_params > 0:
                ftype = f.model.split(" ", 2)[-1]  # "llama 7B Q4_0" -> "Q4_0"
                h.perplexity.setdefault(ftype, []).append(
                    (f.n_params, seconds / (f.n_chunk * f.n_ctx * f.n_params / 1e9)))
                for key, a in sdir.all_answers().items():
                    h.answers.setdefault(key, []).append((f.n_params, read_json(a)["seconds"] / (f.n_params / 1e9)))
        except (OSError, ValueError, KeyError, OrchestrateError):
            continue
    return h


def model_params(path: Path) -> int:
    return analysis.model_stats(path)["elements"]


def disk_need(base_bytes: int, qtypes: list[str], keep_models: bool, logits_bytes: int, upcast_bytes: int,
              hist: History) -> Need:
    """Peak disk for quantizing base_bytes of model to each of qtypes (the variants still to run)."""
    sizes = [int(base_bytes * size_ratio(t, hist.size)) for t in qtypes]
    models = sum(sizes) if keep_models else max(sizes, default=0)
    return Need(upcast_bytes, int(models * MARGIN), int(logits_bytes * MARGIN), ARTIFACTS * (len(qtypes) + 1))


def free_bytes(where: Path) -> int:
    while not where.exists():  # the cache may not exist yet: the disk it will be on
        where = where.parent
    return shutil.disk_usage(where).free


def refuse_if_too_big(need: Need, where: Path, force: bool) -> None:
    free = free_bytes(where)
    if need.total > free and not force:
        raise OrchestrateError(f"the sweep needs about {human(need.total)} under {where} at its peak and only "
                               f"{human(free)} is free (`--plan` for the details; `--force` to run anyway)")


def duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _near(xs: list[tuple[int, float]], params: int) -> list[float]:
    """The rates of (parameters, rate) pairs measured on models within NEAR of params in size."""
    return [r for p, r in xs if abs(math.log(p / params)) <= math.log(NEAR)]


def near_rates(hist: History, params: int) -> dict[str, list[float]]:
    """Perplexity rates (per file type) of the earlier runs on models within NEAR of params in size."""
    near = {t: _near(xs, params) for t, xs in hist.perplexity.items()}
    return {t: rs for t, rs in near.items() if rs}


def _type_factor(hist: History, ftype: str) -> float:
    """How much slower per parameter than F16 a file type scored in the earlier runs (1 when unknown)."""
    own, f16 = hist.perplexity.get(ftype), hist.perplexity.get("F16")
    if not own or not f16:
        return 1.0
    return statistics.median(r for _, r in own) / statistics.median(r for _, r in f16)


def estimate(qtype: str | None, base_mib: float, tokens: int, params: int, hist: History,
             calibrated: float | None) -> tuple[float | None, float | None]:
    """(quantize seconds, perplexity seconds) of one variant (qtype None: the base, not quantized).
    calibrated: the base's measured rate, used (scaled by the type's earlier ratio to F16) when no
    earlier run was on a model of about this size."""
    q = 0.0
    if qtype:
        speeds = hist.quantize.get(qtype) or [x for xs in hist.quantize.values() for x in xs]
        q = base_mib / statistics.median(speeds) if speeds else None
    ftype = qtype or "F16"
    near = near_rates(hist, params)
    rates = near.get(ftype) or [x for xs in near.values() for x in xs]
    if rates:
        rate = statistics.median(rates)
    elif calibrated:
        rate = calibrated * _type_factor(hist, ftype)
    else:  # only runs on models of another size: better than nothing
        rate = statistics.median([r for xs in hist.perplexity.values() for _, r in xs] or [0]) or None
    return q, (rate * tokens * params / 1e9 if rate else None)


def answering(task_keys: list[str], params: int, hist: History) -> float | None:
    """Seconds to answer every task file, from earlier answers of the same files on models of about
    this size (else of any size, scaled by parameters: rough); None when a file was never answered."""
    total = 0.0
    for key in task_keys:
        xs = hist.answers.get(key) or []
        rates = _near(xs, params) or [r for _, r in xs]
        if not rates:
            return None
        total += statistics.median(rates) * params / 1e9
    return total


def render(header: str, rows: list[tuple], need: Need, keep_models: bool, where: Path, source: str) -> list[str]:
    """rows: (variant, state, quantize seconds or None, perplexity seconds or None[, answering seconds or
    None, when the study has tasks])."""
    lines = [header]
    total, unknown = 0.0, False
    for name, state, q, p, *a in rows:
        line = f"  {name:<22} {state:<8}"
        if state != "cached":
            unknown |= q is None or p is None or None in a
            total += (q or 0) + (p or 0) + sum(x or 0 for x in a)
            steps = [] if q == 0 else ["quantize " + (f"~{duration(q)}" if q is not None else "?")]
            steps.append("perplexity " + (f"~{duration(p)}" if p is not None else "?"))
            steps += ["answers " + (f"~{duration(x)}" if x is not None else "?") for x in a]
            line += " " + ", ".join(steps)
        lines.append(line)
    free = free_bytes(where)
    parts = [f"base upcast {human(need.upcast)}" if need.upcast else None,
             f"quantized models {human(need.models)} ({'all kept' if keep_models else 'one at a time'})",
             f"base logits {human(need.logits)}" if need.logits else None, f"artifacts {human(need.artifacts)}"]
    lines.append(f"disk: about {human(need.total)} at the peak under {where} ({', '.join(x for x in parts if x)}); "
                 f"free there: {human(free)}: "
                 + ("fits" if need.total <= free else "DOES NOT FIT (the sweep will refuse to start without --force)"))
    lines.append(f"time: about {duration(total)}{' (plus steps with no estimate: ?)' if unknown else ''}; {source}")
    return lines
