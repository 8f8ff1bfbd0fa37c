"""Benchmark of the Python analysis of quantized files (issue: compressibility and damage).

On the demo model quantized to Q4_0 and Q8_0: throughput of the histogram/entropy pass in
MB/s of tensor data (target >= 1000 MB/s), of the sweep's one read of the file (analysis.scan:
tensor key and zstd), of the Python recounts that check the hooks (entropy and zero-run code; the
per-tensor damage pass), and the peak RSS of an analysis process relative to the file size.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator import demo  # noqa: E402
from orchestrator.fork import build  # noqa: E402
from orchestrator.tools.quantize import run_quantize  # noqa: E402
from orchestrator.study import analysis, stats  # noqa: E402
from orchestrator.study.base import prepare_base  # noqa: E402

CHILD = """
import resource, sys, json
from orchestrator.study import analysis, stats
analysis.scan(sys.argv[1])
stats.recount(sys.argv[1], sys.argv[2])
stats.damage(sys.argv[3], sys.argv[1])
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def timed(fn, *args):
    t0 = time.monotonic()
    fn(*args)
    return time.monotonic() - t0


def main() -> None:
    fork = build.build(quiet=True)
    base = prepare_base(demo.demo_model(), fork).path
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in ("Q4_0", "Q8_0"):
            path = Path(tmp) / f"{qtype}.gguf"
            run_quantize(fork, base, path, qtype, progress=False, log_path=Path(tmp) / "q.log")
            reader = analysis.open_model(path)  # metadata parsing is not part of the passes
            tensors = analysis.hooked_tensors(reader)
            mb = sum(int(t.n_bytes) for t in tensors) / 1e6
            all_mb = sum(int(t.n_bytes) for t in reader.tensors) / 1e6

            def hist_pass():
                for t in tensors:
                    stats.entropy_bits(stats.value_counts(t)[0])
            timed(hist_pass)  # warm the page cache
            h = min(timed(hist_pass) for _ in range(3))
            scan = timed(analysis.scan, path)
            c = timed(stats.recount, path, qtype)
            d = timed(stats.damage, base, path)
            res = subprocess.run([sys.executable, "-c", CHILD, str(path), qtype, str(base)], capture_output=True,
                                 text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
            rss = json.loads(res.stdout.strip().splitlines()[-1])["maxrss_kib"] * 1024
            size = path.stat().st_size
            print(f"{qtype}: {mb:.0f} MB of Q4_0/Q8_0 tensor data ({all_mb:.0f} MB in all)")
            print(f"  histogram/entropy pass:  {mb / h:8.0f} MB/s   (target >= 1000 MB/s)")
            print(f"  scan (sweep):            {all_mb / scan:8.0f} MB/s   (tensor key and zstd, one read)")
            print(f"  recount (check):         {all_mb / c:8.0f} MB/s   (entropy, zero-run code)")
            print(f"  per-tensor damage:       {all_mb / d:8.0f} MB/s   (check: against the F16 base)")
            print(f"  analysis process peak RSS {rss / 1e6:.0f} MB = {rss / size:.2f} x the {size / 1e6:.0f} MB file")


if __name__ == "__main__":
    main()
