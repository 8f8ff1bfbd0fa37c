"""Benchmark of `orchestrate scan` (issue: per-tensor scans). Figures printed, not a timed test.

With a fresh run cache each (sharing only facts about files: the fork, the demo files, the F16 base):
a default thesis sweep of the demo, then a scan of radius 1 by layer x kind with a threshold and
`--screen` (each layer and kind whole first), and prints:
- llama-* seconds of the scan / llama-* seconds of the default sweep (goal <= 2.0);
- chunks the scan scored / chunks a fixed schedule (every group on every chunk) would score (goal <= 0.5);
- seconds to assemble one group's model / seconds to quantize it with llama-quantize and its rules.
Then (BENCH_SCAN_FULL=1, the default; 0 to skip) the same scan without `--screen` in the same cache (the
groups the screened scan scored are not scored again, and count with the seconds they took): its
llama-* seconds against the sweep's, and the check of what screening assumes — how many screened-out
groups, scored on their own, are above the threshold (decided) or have a mean above their bound.
Settings: BENCH_SCAN_ARGS (default: --radius 1 --by layer-kind --threshold 0.05 --ctx 128 --chunks 64).
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator import paths  # noqa: E402
from orchestrator.hooks import conf  # noqa: E402
from orchestrator.study import groups  # noqa: E402

ARGS = shlex.split(os.environ.get("BENCH_SCAN_ARGS",
                                  "--radius 1 --by layer-kind --threshold 0.05 --ctx 128 --chunks 64"))


def run(args, env) -> None:
    res = subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"orchestrate {' '.join(args)} failed:\n{res.stderr[-3000:]}")


def llama_seconds(variants: list[dict]) -> float:
    """A variant scored under another's name (identical tensors) shares that run's perplexity seconds."""
    return sum(r.get("quantize_seconds", 0) + (r.get("perplexity_seconds", 0) if r.get("scored_for") in
                                               (None, r["name"]) else 0) for r in variants)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="orchestrate-scan-bench-") as tmp:
        tmp = Path(tmp)
        fresh = lambda name: {**os.environ, "ORCHESTRATE_CACHE": str(paths.fresh_cache(tmp / name))}  # noqa: E731
        run(["sweep", "--out", str(tmp / "sweep")], fresh("sweep-cache"))
        sweep_s = llama_seconds(json.loads((tmp / "sweep" / "results.json").read_text())["variants"])
        t0 = time.monotonic()
        env = fresh("scan-cache")
        run(["scan", *ARGS, "--screen", "--out", str(tmp / "scan")], env)
        wall = time.monotonic() - t0
        doc = json.loads((tmp / "scan" / "scan.json").read_text())
        scored = doc["groups"] + doc["screen"]["parents"]
        scan_s = llama_seconds(doc["variants"]) + sum(g["seconds"] for g in scored)
        used = sum(g["chunks"] for g in scored)
        fixed = (len(doc["groups"]) + len(doc["screen"]["screened"])) * doc["settings"]["looks"][-1]
        full = None
        if os.environ.get("BENCH_SCAN_FULL", "1") != "0":
            run(["scan", *ARGS, "--out", str(tmp / "full")], env)
            full = json.loads((tmp / "full" / "scan.json").read_text())

        ref, enc = (Path(r["run_dir"]) / "model.gguf" for r in doc["variants"][1:3])
        g = doc["groups"][0]
        t0 = time.monotonic()
        groups.assemble(ref, enc, tuple(g["tensors"]), tmp / "assembled.gguf")
        assemble_s = time.monotonic() - t0
        from orchestrator.fork import build
        from orchestrator.tools.quantize import run_quantize
        rules = tuple(conf.Rule(groups.rule_pattern(t), radius=doc["encoding"]["radius"]) for t in g["tensors"])
        t0 = time.monotonic()
        run_quantize(build.current(), Path(doc["base"]["path"]), tmp / "quantized.gguf", doc["reference"]["type"],
                     conf.Hooks(True, rules=rules), progress=False)
        quantize_s = time.monotonic() - t0
    print(f"scan {' '.join(ARGS)} --screen: {len(doc['groups'])} groups scored, {len(doc['screen']['screened'])} "
          f"screened out by {len(doc['screen']['parents'])} layers and kinds, looks {doc['settings']['looks']}, "
          f"wall {wall:.0f} s")
    print(f"llama-* seconds: scan {scan_s:.0f} s / default sweep {sweep_s:.0f} s = {scan_s / sweep_s:.2f}   (goal <= 2.0)")
    print(f"chunks scored: {used} / fixed schedule {fixed} = {used / fixed:.2f}   (goal <= 0.5)")
    print(f"one group's model: assembled in {assemble_s:.2f} s / quantized in {quantize_s:.2f} s = "
          f"{assemble_s / quantize_s:.2f}")
    if full:
        full_s = llama_seconds(full["variants"]) + sum(g["seconds"] for g in full["groups"])
        print(f"without --screen: {len(full['groups'])} groups, llama-* seconds {full_s:.0f} s / default sweep "
              f"{sweep_s:.0f} s = {full_s / sweep_s:.2f}")
        own = {g["name"]: g["effects"]["kld"] for g in full["groups"]}
        threshold = doc["settings"]["threshold"]
        out = doc["screen"]["screened"]
        above = [g["name"] for g in out if own[g["name"]]["lo"] is not None and own[g["name"]]["lo"] > threshold]
        over = [g["name"] for g in out if own[g["name"]]["mean"] > g["below"]]
        print(f"what screening assumes, checked: of {len(out)} screened-out groups, {len(above)} are above the "
              f"threshold on their own ({', '.join(above) or 'none'}); {len(over)} have a mean above their bound "
              f"({', '.join(over) or 'none'})")


if __name__ == "__main__":
    main()
