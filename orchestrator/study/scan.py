"""A sensitivity scan's groups, each scored adaptively: where does an encoding hurt?

For each group g of tensors, the model "reference R with encoding E on g only" is assembled from R's
and E's files (study.groups) and scored against the base in rounds of chunks (llama-perplexity's
window, patch 0007); after each round its effect — per chunk, the group model's mean KLD (or NLL)
minus R's on the same tokens — gets an interval, and the group stops as the sequential rule says
(study.sequential). Rounds already scored are kept in the group's scan directory (study.runs), so an
interrupted scan, or a later one with another threshold, never scores a chunk twice.
"""

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import OrchestrateError, ToolError
from ..files import read_json, write_json
from ..tools import perplexity
from ..tools.quantize import run_quantize
from . import groups, scores, sequential
from .groups import Group
from .runs import Inputs, ScanDir, scan_dir

logger = logging.getLogger(__name__)
QUANTITIES = ("kld", "nll")   # the first decides when to stop


@dataclass(frozen=True)
class Side:
    """R or E: its model, llama-quantize type, tensor key and per-token scores over all the scan's chunks."""
    name: str
    model: Path
    qtype: str
    tensors: str
    scores: Path | None   # (None on a cluster node: groups are compared with the driver's R)


@dataclass(frozen=True)
class Rule:
    looks: tuple[int, ...]
    threshold: float | None
    width: float | None


@dataclass(frozen=True)
class Effect:
    mean: float
    lo: float | None
    hi: float | None


@dataclass(frozen=True)
class GroupResult:
    group: Group
    chunks: int                  # chunks scored
    verdict: str                 # sequential.Look.verdict
    effects: dict                # quantity -> Effect (the interval of the look where it stopped)
    seconds: float               # llama-perplexity seconds spent on it (0 when all its rounds were kept)
    scan_dir: str
    per_chunk: dict              # quantity -> its per-chunk differences to R, chunks 0.. (recipes add them up)

    def to_dict(self) -> dict:
        return {"name": self.group.name, "layer": self.group.layer, "kind": self.group.kind,
                "tensors": list(self.group.tensors), "chunks": self.chunks, "verdict": self.verdict,
                "effects": {q: asdict(e) for q, e in self.effects.items()}, "seconds": self.seconds,
                "scan_dir": self.scan_dir, "per_chunk": self.per_chunk}


def chunk_means(s: scores.Scores, quantity: str) -> np.ndarray:
    return s.arrays[quantity].astype(np.float64).mean(axis=1)


def _make_model(inp: Inputs, d: ScanDir, ref: Side, enc: Side, g: Group) -> None:
    """R with E on g: assembled from their files (same layout), or quantized with g's types from E's."""
    if groups.shared_layout(ref.model, enc.model) is not None:
        groups.assemble(ref.model, enc.model, g.tensors, d.model)
        return
    types = groups.type_file(g.tensors, groups.tensor_types(enc.model), d.path / "tensor-types.txt")
    run_quantize(inp.fork, inp.base.path, d.model, ref.qtype, threads=inp.threads, progress=False,
                 extra=["--tensor-type-file", str(types)], env=inp.llama_env, log_path=d.path / "quantize.log")


def _round(inp: Inputs, d: ScanDir, ref: Side, enc: Side, g: Group, a: int, b: int, kld_base: Path) -> float:
    """Score chunks a..b-1 of the group's model (making it first if needed); llama seconds."""
    if not d.model.exists():
        _make_model(inp, d, ref, enc, g)
    res = perplexity.run(inp.fork, d.model, inp.scoring, d.log(a, b), d.scores(a, b),
                         {**inp.llama_env, "PABLO_CHUNKS": f"{a}:{b}"}, kld_base=kld_base)
    return float(res["seconds"])


def _rounds(d: ScanDir, looks: tuple[int, ...], upto: int) -> list[scores.Scores]:
    return [scores.read(d.scores(a, b)) for a, b in zip((0,) + looks, looks) if b <= upto]


def _diffs(d: ScanDir, ref_means: dict, looks: tuple[int, ...], upto: int) -> dict[str, np.ndarray]:
    """Per quantity, the group's per-chunk mean minus R's, over the rounds scored up to chunk `upto`."""
    parts = _rounds(d, looks, upto)
    return {q: np.concatenate([chunk_means(p, q) for p in parts]) - ref_means[q][:upto] for q in QUANTITIES}


def group_tokens(scan_dir: Path, looks: tuple[int, ...], chunks: int, quantity: str) -> np.ndarray:
    """A finished group's per-token scores of quantity, (chunks, tokens), from its kept rounds."""
    return np.concatenate([p.arrays[quantity] for p in _rounds(ScanDir(Path(scan_dir)), looks, chunks)])


def scan_group(inp: Inputs, ref: Side, enc: Side, g: Group, rule: Rule, ref_means: dict, kld_base: Path,
               say) -> GroupResult:
    """One group, from where a previous scan of it stopped (its kept rounds) to its verdict."""
    d = group_dir(inp, ref, enc, g)
    d.path.mkdir(parents=True, exist_ok=True)
    with d.lock:
        if (done := finished(d, g, rule)) is not None:
            return done
        seconds = 0.0
        try:
            for a, b in zip((0,) + rule.looks, rule.looks):
                if not d.scores(a, b).exists():
                    say(g, f"chunks {a}..{b - 1}")
                    seconds += _round(inp, d, ref, enc, g, a, b, kld_base)
                diffs = _diffs(d, ref_means, rule.looks, b)
                v = sequential.look(diffs[QUANTITIES[0]], len(rule.looks), b == rule.looks[-1], rule.threshold,
                                    rule.width)
                if v.verdict != "more":
                    break
        except OrchestrateError as e:
            raise ToolError(f"scan group {g.name}: {e}", d.path) from None
        alpha = (1 - sequential.CONFIDENCE) / len(rule.looks)  # the stopping look's level, for every quantity
        effects = {q: Effect(*sequential.interval(x, alpha)) for q, x in diffs.items()}
        kept = {"rule": _rule_key(rule), "chunks": v.chunks, "verdict": v.verdict,
                "effects": {q: asdict(e) for q, e in effects.items()}, "seconds": seconds,
                "per_chunk": {q: [float(v) for v in x] for q, x in diffs.items()}}
        write_json(d.result, kept)
        d.model.unlink(missing_ok=True)
        return _result(g, kept, d)


def group_dir(inp: Inputs, ref: Side, enc: Side, g: Group) -> ScanDir:
    return scan_dir(inp, ref.tensors, enc.tensors, g.tensors)


def _rule_key(rule: Rule) -> list:
    return [list(rule.looks), rule.threshold, rule.width]


def finished(d: ScanDir, g: Group, rule: Rule) -> GroupResult | None:
    """The group's result when a scan under the same rule finished it here, else None."""
    if d.result.exists():
        kept = read_json(d.result)
        if kept["rule"] == _rule_key(rule) and "per_chunk" in kept:  # (older results: made again from the rounds)
            return _result(g, kept, d)
    return None


def _result(g: Group, kept: dict, d: ScanDir) -> GroupResult:
    return GroupResult(g, kept["chunks"], kept["verdict"], {q: Effect(**e) for q, e in kept["effects"].items()},
                       kept["seconds"], str(d.path), kept["per_chunk"])


def screened(gs: list[Group], parents: list[GroupResult]) -> dict[str, GroupResult]:
    """The groups that need not be scored (name -> the parent that screens them): those whose tensors
    are some of a larger group's whose whole effect was decided below the threshold. This assumes that
    the encoding on part of a group hurts no more than on all of it (effects of the group's parts that
    are not negative, or small beside the rest): what screening rests on, and what a full scan checks."""
    out = {}
    for g in gs:
        inside = [p for p in parents if p.verdict == "below" and set(g.tensors) < set(p.group.tensors)]
        if inside:
            out[g.name] = min(inside, key=lambda p: p.effects["kld"].hi)
    return out


def reference_means(ref: Side, rule: Rule) -> dict[str, np.ndarray]:
    """R's per-chunk means, per quantity: what every group is compared with."""
    ref_scores = scores.read(ref.scores)
    if ref_scores.n_chunk < rule.looks[-1] or "kld" not in ref_scores.arrays:
        raise OrchestrateError(f"{ref.name}'s scores hold {ref_scores.n_chunk} chunks without KLD; the scan needs "
                               f"KLD over {rule.looks[-1]}")
    return {q: chunk_means(ref_scores, q) for q in QUANTITIES}


def run_scan(inp: Inputs, ref: Side, enc: Side, gs: list[Group], rule: Rule, kld_base: Path) -> list[GroupResult]:
    """Every group in turn (each to its own verdict), saying which round runs."""
    ref_means = reference_means(ref, rule)
    out = []
    t0 = time.monotonic()
    for i, g in enumerate(gs):
        def say(group, what, i=i):
            logger.info("scan %d/%d %s: %s (%.0f s so far)", i + 1, len(gs), group.name, what, time.monotonic() - t0)
        out.append(scan_group(inp, ref, enc, g, rule, ref_means, kld_base, say))
    return out
