"""Benchmark of `sweep --executor ray` (issue: sweeps on a cluster).

In one run, with fresh run caches (sharing only the downloads, demo files and the F16 base):
the demo sweep with the local executor (one variant at a time, all cores), then the same sweep on a
Ray head node started here with 2 CPUs, as 2 single-thread tasks at a time. Prints both wall
times and their ratio, and Ray's overhead per variant: from the moment a task could start (its
submission, or the end of the task whose CPU it took) to its start, and from its start to its first
llama-* step. Settings: BENCH_ARGS (default: the demo main job). Needs root (the cluster lives in
its own network namespace, on loopback).
"""

import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator import paths  # noqa: E402

ARGS = shlex.split(os.environ.get("BENCH_ARGS", "--radius 0..3"))
PORT = 6398


def timed(cmd, env) -> float:
    t0 = time.monotonic()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd[:6])} … failed:\n{res.stderr[-3000:]}")
    return time.monotonic() - t0


def main() -> None:
    # killed (timeout, a scheduler) as well as interrupted: unwind, so the cluster below is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # the fork, the demo files and the base exist first, so only the sweeps are measured
    subprocess.run([sys.executable, "-m", "orchestrator", "sweep", "--radius", "none", "--tables", "none",
                    "--types", "none", "--chunks", "1", "--ctx", "64", "--out", tempfile.mkdtemp()], check=True,
                   capture_output=True)
    sweep = [sys.executable, "-m", "orchestrator", "sweep", *ARGS]
    with tempfile.TemporaryDirectory(prefix="orchestrate-ray-bench-") as tmp:
        tmp = Path(tmp)
        local = timed([*sweep, "--out", str(tmp / "local")],
                      {**os.environ, "ORCHESTRATE_CACHE": str(paths.fresh_cache(tmp / "local-cache"))})
        env = {**os.environ, "ORCHESTRATE_CACHE": str(paths.fresh_cache(tmp / "ray-cache")),
               "RAY_USAGE_STATS_ENABLED": "0"}
        holder = subprocess.Popen(["unshare", "-n", "bash", "-c", "ip link set lo up && exec ray start --head --block "
                                   f"--node-ip-address=127.0.0.1 --port={PORT} --num-cpus=2 --disable-usage-stats "
                                   "--include-dashboard=false"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        enter = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]
        try:
            while subprocess.run([*enter, "ray", "status", f"--address=127.0.0.1:{PORT}"], env=env,
                                 capture_output=True).returncode != 0:
                time.sleep(1)
            on_ray = timed([*enter, *sweep, "--out", str(tmp / "ray"), "--threads", "1", "--executor", "ray",
                            "--ray-address", f"127.0.0.1:{PORT}"], env)
        finally:
            subprocess.run([*enter, "ray", "stop", "--force"], env=env, capture_output=True)
            os.killpg(holder.pid, signal.SIGKILL)
        rows = json.loads((tmp / "ray" / "results.json").read_text())["variants"]
    ran = sorted((r["ran_on"] for r in rows if r.get("ran_on")), key=lambda r: r["start"])
    # a task that waited for a CPU starts when an earlier one ends: the gap is Ray's dispatch time
    gaps = [r["start"] - max([r["submitted"]] + [q["end"] for q in ran if q["end"] <= r["start"]]) for r in ran]
    to_tool = [r["first_tool"] - r["start"] for r in ran if r["first_tool"]]
    print(f"sweep {' '.join(ARGS)}: {len(rows)} variants")
    print(f"local executor (all cores, one variant at a time): {local:7.1f} s")
    print(f"Ray, 2 single-thread tasks at a time:              {on_ray:7.1f} s   (ratio {on_ray / local:.2f})")
    print(f"task start after its CPU was free (submission, or the end of the task before it): "
          f"median {statistics.median(gaps):6.3f} s, max {max(gaps):6.3f} s")
    print(f"task start to first llama-* step: median {statistics.median(to_tool):6.3f} s, max {max(to_tool):6.3f} s "
          "(node checks; the base's includes its analysis)")


if __name__ == "__main__":
    main()
