"""Benchmark at a real model size (issue: real model sizes).

Makes, once, a synthetic F16 GGUF with the shapes of Llama-2-7B (llama architecture, 32 layers,
4096 hidden, 11008 FFN, 32000 vocabulary; random weights, written tensor by tensor with the gguf
package's writer: 13.5 GB, cached under <cache>/bench), and prints, measured in this run:

- llama-quantize with the hooks measuring (histograms + error sums) / hooks off, Q4_0 and Q8_0,
  BENCH_PAIRS (default 5) alternating pairs each (target <= 1.03): the median and the spread of the
  ratios, and the CPU seconds the hooks added (the steadiest figure on a shared machine, where one
  pair's wall ratio can be off by 0.05);
- the Python work per variant in a one-chunk sweep of the model (analysis + bookkeeping: the
  sweep's wall time outside llama-* processes) / llama-quantize's wall time (target <= 0.10);
- the peak anonymous memory of that sweep's orchestrate process (target <= 1 GiB), and the peak of
  the file pages it had mapped;
- the Q4_0 model's zstd size measured as sweeps do (segments of each tensor above
  analysis.ZSTD_BUDGET) against compressing all of it, with the time each took. The weights are
  random, so every segment of a tensor looks alike: this checks the scaling and the time saved, not
  how well segments stand for a real model's tensors (tests/test_analysis.py does that on the demo);
- llama-perplexity seconds per 512-token chunk (Q4_0 model), and the `--plan` estimate for a
  default sweep's perplexity against that measured chunk, made as on a machine that never ran this
  model (a run cache without runs: the plan calibrates on one chunk of the base);
- then bench/sweep_bench.py: the demo sweep's overhead (time outside llama-* / total; target <= 2%).

Needs about 35 GB free disk and an hour or more on 2 cores. BENCH_SKIP_SWEEP=1 skips both sweeps;
BENCH_ONLY_HOOKS=1 stops after the llama-quantize pairs; BENCH_SKIP_HOOKS=1 skips them.
"""

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf  # noqa: E402

from orchestrator import demo, paths  # noqa: E402
from orchestrator.fork import build  # noqa: E402
from orchestrator.study import analysis  # noqa: E402

LAYERS, HIDDEN, FFN, VOCAB, HEADS = 32, 4096, 11008, 32000, 32


def vocab() -> tuple[list[bytes], list[float], list[int]]:
    """A sentencepiece-style vocabulary: specials, the 256 byte tokens, then filler pieces."""
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    i = 0
    while len(tokens) < VOCAB:
        piece = "\u2581" + letters[i % 26] + letters[(i // 26) % 26] + (letters[(i // 676) % 26] if i >= 676 else "")
        tokens.append(f"{piece}{i // 17576 if i >= 17576 else ''}".encode())
        types.append(1)
        i += 1
    scores = [0.0] * 259 + [-float(k) for k in range(VOCAB - 259)]
    return tokens, scores, types


def shapes() -> list[tuple[str, tuple[int, ...]]]:
    out = [("token_embd.weight", (VOCAB, HIDDEN))]
    for b in range(LAYERS):
        out += [(f"blk.{b}.attn_norm.weight", (HIDDEN,)), (f"blk.{b}.attn_q.weight", (HIDDEN, HIDDEN)),
                (f"blk.{b}.attn_k.weight", (HIDDEN, HIDDEN)), (f"blk.{b}.attn_v.weight", (HIDDEN, HIDDEN)),
                (f"blk.{b}.attn_output.weight", (HIDDEN, HIDDEN)), (f"blk.{b}.ffn_norm.weight", (HIDDEN,)),
                (f"blk.{b}.ffn_gate.weight", (FFN, HIDDEN)), (f"blk.{b}.ffn_up.weight", (FFN, HIDDEN)),
                (f"blk.{b}.ffn_down.weight", (HIDDEN, FFN))]
    return out + [("output_norm.weight", (HIDDEN,)), ("output.weight", (VOCAB, HIDDEN))]


def make_model(path: Path) -> None:
    """Write the synthetic model tensor by tensor (never all of it in memory)."""
    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, scores, types = vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    specs = shapes()
    for name, shape in specs:
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape in specs:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            w.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))
    w.close()
    os.replace(tmp, path)


def timed(cmd, env=None, cpu: list | None = None) -> float:
    """Wall seconds of a command; its CPU seconds (user + system) appended to cpu when given."""
    t0, r0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{(res.stdout + res.stderr)[-2000:]}")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return time.monotonic() - t0


PAIRS = int(os.environ.get("BENCH_PAIRS", "5"))


def peak_rss_kib(pid: int, stop: threading.Event, peak: dict) -> None:
    """Poll /proc/PID/status for RssAnon (anonymous) and RssFile (mapped file pages) until stop."""
    while not stop.is_set():
        try:
            text = Path(f"/proc/{pid}/status").read_text()
            for key in peak:
                peak[key] = max(peak[key], int(re.search(key + r":\s+(\d+)", text).group(1)))
        except (OSError, AttributeError):
            pass
        time.sleep(0.2)


def zstd_sampled_vs_full(path: Path) -> None:
    t0 = time.monotonic()
    part = analysis.scan(path)
    t1 = time.monotonic()
    full = analysis.scan(path, budget=path.stat().st_size)
    t2 = time.monotonic()
    print(f"zstd of the Q4_0 model: from {part['zstd_sampled']:.1%} of its tensor bytes {part['zstd_bpw']:.4f} bpw "
          f"in {t1 - t0:.1f} s; from all of them {full['zstd_bpw']:.4f} bpw in {t2 - t1:.1f} s: "
          f"difference {part['zstd_bpw'] / full['zstd_bpw'] - 1:+.3%}", flush=True)


def main() -> None:
    fork = build.build(quiet=True)
    where = paths.cache_dir() / "bench"
    where.mkdir(parents=True, exist_ok=True)
    model = where / "llama-2-7b-shaped-f16.gguf"
    if not model.exists():
        t0 = time.monotonic()
        make_model(model)
        print(f"made {model} ({model.stat().st_size / 1e9:.1f} GB) in {time.monotonic() - t0:.0f} s", flush=True)
    quantize = fork.binary("llama-quantize")
    threads = str(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        tmp = Path(tmp)
        conf = tmp / "pablo.conf"
        conf.write_text(f"MODE = simple\nHIST_OUT = {tmp / 'hist.json'}\n")
        quiet = {k: v for k, v in os.environ.items() if not k.startswith("PABLO_")}
        with open(model, "rb") as f:  # into the page cache first: a cold first run measured 52 s against 35 s warm
            while f.read(1 << 26):
                pass
        for qtype in () if os.environ.get("BENCH_SKIP_HOOKS") else ("Q4_0", "Q8_0"):
            # one run unmeasured: a type's first run was 10-15% slower than the next ones, whichever it was
            timed([quantize, model, tmp / "warm.gguf", qtype, threads], quiet)
            (tmp / "warm.gguf").unlink()
            ratios, cpu_ratios, added = [], [], []
            for i in range(PAIRS):  # alternating, the order swapped each time
                runs = [("off", {**quiet}), ("on", {**quiet, "PABLO_CONF": str(conf)})]
                secs, cpu = {}, {}
                for k, e in (runs if i % 2 == 0 else runs[::-1]):
                    cpu[k] = []
                    secs[k] = timed([quantize, model, tmp / f"{k}.gguf", qtype, threads], e, cpu[k])
                    (tmp / f"{k}.gguf").unlink()  # two 7 GB outputs would push the model out of the page cache
                ratios.append(secs["on"] / secs["off"])
                cpu_ratios.append(cpu["on"][0] / cpu["off"][0])
                added.append(cpu["on"][0] - cpu["off"][0])
                print(f"llama-quantize {qtype} pair {i + 1}: hooks off {secs['off']:6.1f} s ({cpu['off'][0]:.1f} s CPU), "
                      f"histograms + error sums {secs['on']:6.1f} s ({cpu['on'][0]:.1f} s CPU): ratio {ratios[-1]:.3f} "
                      f"(CPU {cpu_ratios[-1]:.3f})", flush=True)
            print(f"llama-quantize {qtype}: median ratio {statistics.median(ratios):.3f} over {PAIRS} pairs "
                  f"({min(ratios):.3f}-{max(ratios):.3f}; target <= 1.03); CPU time {statistics.median(cpu_ratios):.3f}, "
                  f"{statistics.median(added):+.1f} s CPU with the hooks (median)", flush=True)
        if os.environ.get("BENCH_ONLY_HOOKS"):
            return
        timed([quantize, model, tmp / "q4_0.gguf", "Q4_0", threads], quiet)
        zstd_sampled_vs_full(tmp / "q4_0.gguf")
        chunk = timed([fork.binary("llama-perplexity"), "-m", tmp / "q4_0.gguf", "-f", demo.demo_text(), "-c", "512",
                       "--chunks", "1", "-t", threads])
        print(f"llama-perplexity, Q4_0, one 512-token chunk (load included): {chunk:.1f} s", flush=True)
        plan = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", "--radius", "0..3", "--model", model,
                               "--plan"], capture_output=True, text=True,
                              env={**os.environ, "ORCHESTRATE_CACHE": str(paths.fresh_cache(tmp / "plan-cache"))})
        m = re.search(r"q4_0\s+to run\s+quantize \S+, perplexity ~(\d+)h(\d+)m", plan.stdout)
        m2 = re.search(r"q4_0\s+to run\s+quantize \S+, perplexity ~(\d+)m(\d+)s", plan.stdout)
        if m or m2:
            est = int(m.group(1)) * 3600 + int(m.group(2)) * 60 if m else int(m2.group(1)) * 60 + int(m2.group(2))
            source = plan.stdout.strip().splitlines()[-1].split("; ", 1)[-1]
            print(f"--plan: Q4_0 perplexity of a default sweep (20 chunks) ~{est} s = {est / 20:.1f} s per chunk, "
                  f"against {chunk:.1f} s measured for one chunk: ratio {est / 20 / chunk:.2f} ({source})", flush=True)
        else:
            print("--plan output:\n" + plan.stdout + plan.stderr[-1000:], flush=True)
        if os.environ.get("BENCH_SKIP_SWEEP"):
            return
        out = tmp / "sweep"
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", "--radius", "1", "--tables", "none",
                                 "--types", "Q4_0", "--chunks", "1", "--model", str(model), "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                # no runs from earlier benchmarks: a cached sweep would measure nothing
                                env={**os.environ, "ORCHESTRATE_CACHE": str(paths.fresh_cache(tmp / "sweep-cache"))})
        stop, peak = threading.Event(), {"RssAnon": 0, "RssFile": 0}
        watcher = threading.Thread(target=peak_rss_kib, args=(proc.pid, stop, peak))
        watcher.start()
        t0 = time.monotonic()
        err = proc.communicate()[1]
        wall = time.monotonic() - t0
        stop.set()
        watcher.join()
        if proc.returncode != 0:
            sys.exit(f"sweep failed:\n{err[-2000:]}")
        rows = [r for r in json.loads((out / "results.json").read_text())["variants"] if r["status"] == "ok"]
        inside = sum(r["quantize_seconds"] + r["perplexity_seconds"] for r in rows)
        q_wall = sum(r["quantize_seconds"] for r in rows if r["kind"] != "base")
        variants = len([r for r in rows if r["kind"] != "base"])
        print(f"one-chunk sweep of {len(rows)} variants: {wall:.0f} s; outside llama-*: {wall - inside:.0f} s; "
              f"per quantized variant: {(wall - inside) / max(variants, 1):.1f} s of Python against "
              f"{q_wall / max(variants, 1):.1f} s of llama-quantize: ratio {(wall - inside) / max(q_wall, 1e-9):.2f} "
              "(target <= 0.10; includes preparing the base and the report)", flush=True)
        per = [(r["analysis_seconds"], r["quantize_seconds"]) for r in rows if r["kind"] != "base"]
        print("analysis per quantized variant / its llama-quantize: "
              + ", ".join(f"{a:.1f} s / {q:.1f} s = {a / q:.2f}" for a, q in per) + " (target <= 0.10)", flush=True)
        print(f"peak anonymous memory of the orchestrate process: {peak['RssAnon'] / 1024:.0f} MiB (target <= 1024 MiB); "
              f"peak of the file pages it had mapped: {peak['RssFile'] / 1024:.0f} MiB", flush=True)
    import sweep_bench  # the demo sweep's overhead
    sweep_bench.main()


if __name__ == "__main__":
    main()
