"""Benchmark of `orchestrate sweep` (issue: the sweep).

Runs one sweep with a fresh run cache (sharing only facts about files: downloads, demo files, the
F16 base, model memos), then the same sweep again fully cached, and prints: total wall time, the time spent
inside llama-* processes, the orchestration overhead as a ratio (target <= 2%), and the wall
time of the cached re-run (target <= 3 s). Settings: BENCH_ARGS (default: the demo main job).
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

ARGS = shlex.split(os.environ.get("BENCH_ARGS", "--radius 0..3"))


def sweep(env, out) -> float:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", *ARGS, "--out", str(out)], env=env,
                         capture_output=True, text=True)
    dt = time.monotonic() - t0
    if res.returncode != 0:
        sys.exit(f"sweep failed:\n{res.stderr[-3000:]}")
    return dt


def main() -> None:
    # make sure the fork, the demo files and the base exist, so only the sweep itself is measured
    subprocess.run([sys.executable, "-m", "orchestrator", "sweep", "--radius", "none", "--tables", "none",
                    "--types", "none", "--chunks", "1", "--ctx", "64", "--out", tempfile.mkdtemp()], check=True,
                   capture_output=True)
    with tempfile.TemporaryDirectory(prefix="orchestrate-bench-") as tmp:
        env = {**os.environ, "ORCHESTRATE_CACHE": str(paths.fresh_cache(Path(tmp) / "cache"))}
        out = Path(tmp) / "out"
        total = sweep(env, out)
        doc = json.loads((out / "results.json").read_text())
        # a variant scored under another's name (identical tensors) shares that run's perplexity seconds
        inside = sum(r.get("quantize_seconds", 0) + (r.get("perplexity_seconds", 0) if r.get("scored_for") in
                                                     (None, r["name"]) else 0) for r in doc["variants"])
        analysis = sum(r.get("analysis_seconds") or 0 for r in doc["variants"])
        cached = sweep(env, out)
    print(f"sweep {' '.join(ARGS)}: {len(doc['variants'])} variants")
    print(f"total wall time:            {total:8.1f} s")
    print(f"inside llama-* processes:   {inside:8.1f} s")
    print(f"Python analysis of files:   {analysis:8.1f} s   (tensor key and zstd: one read per file)")
    print(f"orchestration overhead:     {(total - inside - analysis) / total:8.2%}   (target <= 2%; wall - llama-* - analysis)")
    print(f"overhead incl. analysis:    {(total - inside) / total:8.2%}")
    print(f"fully cached re-run:        {cached:8.2f} s   (target <= 3 s)")


if __name__ == "__main__":
    main()
