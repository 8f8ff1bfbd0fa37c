"""How well does the patch series follow upstream? (a benchmark, not a test)

For each of the last llama-cpp-python releases: the 3-way replay of every patch (applied
cleanly / merged (3-way) / conflict), as `orchestrate patches check` does it. Then, for the
releases named in BENCH_BUILD (default: the two newest other than the pin), a real
`orchestrate upstream bump` in a scratch copy of the project: replay, export, build the
fork and run the canary (`orchestrate selftest`), which must pass.

Targets: the whole series replays onto at least 6 of the 7 releases without a manual edit;
the canary passes after building on at least 2 of them.

    python bench/port_matrix.py            # BENCH_VERSIONS=0.3.30,...  BENCH_BUILD=0.3.35,0.3.34
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator import paths  # noqa: E402
from orchestrator.fork import port, upstream  # noqa: E402

VERSIONS = os.environ.get("BENCH_VERSIONS", "0.3.30,0.3.31,0.3.32,0.3.33,0.3.34,0.3.35,0.3.36").split(",")
SHORT = {port.CLEAN: "clean", port.MERGED: "3-way", port.CONFLICT: "CONFLICT"}


def replay_matrix(current: upstream.Pin) -> dict[str, list]:
    rows = {}
    for v in VERSIONS:
        t0 = time.monotonic()
        try:
            rows[v] = port.check(paths.patches_dir(), upstream.sdist_pin(v, None), current, vendor=paths.vendor_dir())
        except Exception as e:  # a release that cannot even be fetched is a row too
            rows[v] = str(e)
        print(f"  replayed onto {v} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return rows


def bump_in_scratch(version: str) -> tuple[bool, float, str]:
    """A real bump in a copy of conf/ and patches/: (canary passed, seconds, last line)."""
    with tempfile.TemporaryDirectory(prefix="port-matrix-") as tmp:
        proj = Path(tmp) / "proj"
        for sub in ("conf", "patches"):
            shutil.copytree(paths.project() / sub, proj / sub)
        env = {**os.environ, "ORCHESTRATE_HOME": str(proj)}
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "orchestrator", "upstream", "bump", "--sdist-version", version],
                             env=env, capture_output=True, text=True)
        seconds = time.monotonic() - t0
        out = (res.stdout + res.stderr).strip().splitlines()
        passed = res.returncode == 0 and sum("selftest:" in line and line.endswith(": ok") for line in out) == 4
        return passed, seconds, (out[-1] if out else "no output")


def main() -> None:
    current = upstream.load_pin()
    series = [p.name for p in port.patches_mod.read_series(paths.patches_dir())]
    rows = replay_matrix(current)
    width = max(len(s) for s in series)
    print(f"{'patch':<{width}}  " + "  ".join(f"{v:>8}" for v in VERSIONS))
    for i, name in enumerate(series):
        cells = [SHORT.get(r[i].outcome, r[i].outcome) if isinstance(r, list) else "fetch?" for r in rows.values()]
        print(f"{name:<{width}}  " + "  ".join(f"{c:>8}" for c in cells))
    whole = [v for v, r in rows.items() if isinstance(r, list) and all(x.outcome != port.CONFLICT for x in r)]
    print(f"series replays without a manual edit onto {len(whole)} of {len(VERSIONS)} releases: {', '.join(whole)}"
          f"   (target >= 6 of 7)")
    others = [v for v in reversed(whole) if v != current.version]
    builds = [v.strip() for v in os.environ.get("BENCH_BUILD", ",".join(others[:2])).split(",") if v.strip()]
    passed = []
    for v in builds:
        ok, seconds, last = bump_in_scratch(v)
        print(f"bump to {v}: replay + export + build + canary {'PASSED' if ok else 'FAILED'} in {seconds:.0f} s ({last})")
        if ok:
            passed.append(v)
    print(f"canary passed after building on {len(passed)} release(s): {', '.join(passed) or 'none'}   (target >= 2)")


if __name__ == "__main__":
    main()
