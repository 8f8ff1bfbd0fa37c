"""Benchmark of `orchestrate build` (issue: the fork pipeline).

Prints, from one run on a scratch copy of the project (your vendor/ is not touched):
cold build time (ccache disabled), no-op build time, and the rebuild time after one patch
changes, as a ratio to cold. Targets: no-op <= 2 s, one-patch rebuild <= 0.25 x cold.
Takes about as long as two cold builds' worth of compiling on 2 cores (~7 minutes).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed_build(env) -> float:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "orchestrator", "build"], env=env, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if res.returncode != 0:
        sys.exit(f"build failed:\n{res.stderr[-3000:]}")
    return dt


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="orchestrate-bench-") as tmp:
        proj = Path(tmp) / "proj"
        proj.mkdir()
        for sub in ("conf", "patches"):
            shutil.copytree(ROOT / sub, proj / sub)
        env = {**os.environ, "ORCHESTRATE_HOME": str(proj), "CCACHE_DISABLE": "1"}
        cold = timed_build(env)
        noop = timed_build(env)
        # change one patch the way a developer would: a line of code in the last patch
        patch = sorted((proj / "patches").glob("*.patch"))[-1]
        text = patch.read_text()
        marker = "+#define PABLO_RUN_BINS 16\n"
        assert marker in text, f"{patch.name} no longer has the line this benchmark edits"
        patch.write_text(text.replace(marker, "+#define PABLO_RUN_BINS (16) // bench edit\n", 1))
        one = timed_build(env)
    print(f"cold build (ccache off, incl. laying down upstream): {cold:8.1f} s")
    print(f"no-op build:                                         {noop:8.2f} s   (target <= 2 s)")
    print(f"rebuild after one patch changed:                     {one:8.1f} s")
    print(f"one-patch rebuild / cold:                            {one / cold:8.3f}     (target <= 0.25)")


if __name__ == "__main__":
    main()
