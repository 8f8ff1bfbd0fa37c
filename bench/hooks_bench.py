"""Benchmark of the histogram hooks (issue: quantization hooks).

Quantizes the demo base to Q4_0 with the same fork binary, hooks off (no configuration)
and histograms on (MODE = simple, HIST_OUT set), interleaved, and prints the median time
of each and their ratio. Target: ratio <= 1.03.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator import demo  # noqa: E402
from orchestrator.fork import build  # noqa: E402
from orchestrator.study.base import prepare_base  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "7"))


def main() -> None:
    fork = build.build(quiet=True)
    base = prepare_base(demo.demo_model(), fork).path
    binary = str(fork.binary("llama-quantize"))
    threads = str(os.cpu_count() or 1)
    times = {"off": [], "hist": []}
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "hist.conf"
        conf.write_text(f"MODE = simple\nHIST_OUT = {tmp}/hist.json\n")
        env_off = {k: v for k, v in os.environ.items() if k != "PABLO_CONF"}
        env_hist = {**env_off, "PABLO_CONF": str(conf)}
        for i in range(RUNS):
            for name, env in (("off", env_off), ("hist", env_hist)) if i % 2 == 0 else (("hist", env_hist), ("off", env_off)):
                t0 = time.monotonic()
                subprocess.run([binary, str(base), f"{tmp}/out.gguf", "Q4_0", threads], env=env, cwd=tmp,
                               check=True, capture_output=True)
                times[name].append(time.monotonic() - t0)
    off, hist = statistics.median(times["off"]), statistics.median(times["hist"])
    print(f"demo base -> Q4_0, {RUNS} interleaved runs each, {threads} threads")
    print(f"hooks off:       median {off:.3f} s")
    print(f"histograms on:   median {hist:.3f} s")
    print(f"ratio on/off:    {hist / off:.3f}   (target <= 1.03)")


if __name__ == "__main__":
    main()
