"""The `orchestrate` command line: a thin layer over the pipeline modules.

Every path argument means what it means in the user's shell: `~` is expanded and a
relative path is made absolute against the current directory before anything else runs.
Whatever goes wrong ends in one line on stderr and a non-zero exit: the message of an
error the user can act on, or, for anything unexpected, its kind and the path of a log
with the full trace.
"""

import datetime
import functools
import json
import logging
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import click

from . import paths
from .errors import OrchestrateError
from .fork import build as build_mod
from .fork import patches as patches_mod
from .fork import upstream
from .taskfiles import MODES


class UserPath(click.Path):
    """A path as the user typed it: `~` expanded, made absolute against the current directory."""

    def __init__(self, **kw):
        super().__init__(path_type=Path, **kw)

    def convert(self, value, param, ctx):
        value = os.path.abspath(os.path.expanduser(os.fspath(value)))
        return super().convert(value, param, ctx)


def _llama_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise OrchestrateError(f"--llama-env takes KEY=VALUE, got '{p}'")
        env[key] = value
    return env


LLAMA_ENV = click.option("--llama-env", "llama_env", multiple=True, metavar="KEY=VALUE",
                         help="An environment variable for the llama-* tools (repeatable). Others that "
                              "change their results (LLAMA_*, GGML_*, PABLO_*) are removed; these are "
                              "part of each run's cache key.")


@click.group()
@click.version_option(package_name="orchestrate")
def cli():
    """Manage a patched llama.cpp fork for quantization research."""


EXECUTOR = click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                        help="Run the work here one piece after another, or as Ray tasks on a cluster "
                             "(pip install -e '.[ray]').")
RAY_ADDRESS = click.option("--ray-address", default=None,
                           help="The Ray cluster's head HOST:PORT (default: $RAY_ADDRESS, else a local Ray "
                                "started for this run).")


def _on_cluster(executor: str, address: str | None) -> bool:
    """Whether to run on Ray: connected first, so that a bad address fails in one line before any work."""
    if executor == "ray":
        from .study import cluster
        cluster.connect(address)
        return True
    if address:
        raise OrchestrateError("--ray-address needs --executor ray")
    return False


BACKEND = click.option("--backend", type=click.Choice(list(build_mod.BACKENDS)), default="cpu", show_default=True,
                       help="Where llama-perplexity runs (each backend is built in its own directory).")


@cli.command()
@click.option("-j", "--jobs", type=click.IntRange(1), default=None, help="Parallel compile jobs (default: all cores).")
@BACKEND
def build(jobs, backend):
    """Fetch the pinned llama.cpp, apply patches/, compile the fork."""
    fork = build_mod.build(jobs=jobs, say_up_to_date=True, backend=backend)
    click.echo(fork.build_dir / "bin")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(as_json):
    """Where the binaries are, the upstream version and the applied patches."""
    fork = build_mod.current()
    data = {
        "fork_id": fork.id,
        "build_dir": str(fork.build_dir),
        "binaries": {t: str(fork.binary(t)) for t in build_mod.TARGETS},
        "upstream": fork.stamp["pin"],
        "patches": fork.stamp["applied"],
        "uncommitted_edits": fork.stamp["uncommitted"] is not None,
        "cmake_options": fork.stamp["cmake_options"],
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"fork       {data['fork_id']}{'  (with uncommitted edits)' if data['uncommitted_edits'] else ''}")
    click.echo(f"upstream   {data['upstream']}")
    for t, p in data["binaries"].items():
        click.echo(f"{t:<11}{p}")
    click.echo("patches    " + ("\n           ".join(data["patches"]) or "(none)"))


@cli.group()
def patches():
    """Manage the patch series in patches/ over vendor/llama.cpp."""


def _vendor_repo():
    return upstream.ensure_vendor(upstream.load_pin())


@patches.command("list")
def patches_list():
    """The series, in order, with each patch's subject and the lines it changes in upstream
    files and in our own files."""
    series = patches_mod.read_series(paths.patches_dir())
    for i, (p, (up, own)) in enumerate(zip(series, patches_mod.footprint(series)), 1):
        click.echo(f"{i:2d}. {p.name}  {p.subject}  [upstream files: {up} lines, own files: {own} lines]")


@patches.command("status")
def patches_status():
    """Which patches are applied, and any edits in vendor/ that no patch holds."""
    st = patches_mod.status(_vendor_repo(), paths.patches_dir())
    for p, state in st.patches:
        click.echo(f"{state:<22}{p.name}")
    for c in st.foreign:
        click.echo(f"{'drifted: commit':<22}{c}")
    for d in st.dirty:
        click.echo(f"{'drifted: uncommitted':<22}{d}")
    if st.drifted:
        click.echo(f"vendor/llama.cpp has edits no patch holds; {patches_mod.KEEP_OR_DROP}")


@patches.command("apply")
def patches_apply():
    """Apply the whole series in order, each patch a commit on top of upstream."""
    done = patches_mod.apply_series(_vendor_repo(), paths.patches_dir())
    click.echo(f"applied: {', '.join(done)}" if done else "series already applied")


@patches.command("unapply")
@click.option("--discard", is_flag=True, help="Also throw away edits in vendor/ that no patch holds.")
def patches_unapply(discard):
    """Return vendor/llama.cpp to the pristine upstream."""
    patches_mod.unapply(_vendor_repo(), paths.patches_dir(), discard=discard)
    click.echo("vendor/llama.cpp is pristine upstream")


@patches.command("export")
def patches_export():
    """Write the commits in vendor/llama.cpp back into patches/ (how a patch is edited)."""
    names = patches_mod.export(_vendor_repo(), paths.patches_dir())
    click.echo(f"exported {len(names)} patch(es) to {paths.patches_dir()}")


def _pin_option(sdist_version, sha256, git_url, commit) -> "upstream.Pin | None":
    if sdist_version and git_url:
        raise OrchestrateError("give either --sdist-version or --git-url, not both")
    if sdist_version:
        return upstream.sdist_pin(sdist_version, sha256)
    if git_url:
        if not commit or len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit.lower()):
            raise OrchestrateError("--git-url needs --commit with a full 40-hex commit id")
        return upstream.Pin("git", url=git_url, commit=commit)
    return None


def _pin_options(fn):
    for opt in reversed([
            click.option("--sdist-version", help="A llama-cpp-python sdist version (its vendored llama.cpp)."),
            click.option("--sha256", help="sha256 of that sdist (without it: the download's, trusted on first use)."),
            click.option("--git-url", help="A git repository of llama.cpp ..."),
            click.option("--commit", help="... at this commit.")]):
        fn = opt(fn)
    return fn


def _report(results) -> None:
    for r in results:
        click.echo(r.line())


@patches.command("check")
@_pin_options
def patches_check(sdist_version, sha256, git_url, commit):
    """Dry run: replay the series with 3-way merges onto the pinned upstream (or another one) and
    report every patch. vendor/ is not touched."""
    from .fork import port
    current = upstream.load_pin()
    pin = _pin_option(sdist_version, sha256, git_url, commit) or current
    if pin.source == "sdist" and not pin.sha256:
        click.echo("note: no --sha256 given, the download is not verified", err=True)
    results = port.check(paths.patches_dir(), pin, current, vendor=paths.vendor_dir())
    _report(results)
    bad = [r.name for r in results if r.outcome == port.CONFLICT]
    if bad:
        raise OrchestrateError(f"{len(bad)} of {len(results)} patch(es) conflict with {pin.ident()}: {', '.join(bad)}")
    click.echo(f"all {len(results)} patch(es) apply to {pin.ident()}")


@cli.group("upstream")
def upstream_group():
    """Move the fork to another upstream llama.cpp."""


def _finish_bump(repo) -> None:
    from . import demo
    from .fork import port
    from .study import selftest
    from .study.base import prepare_base

    def build_and_check(pin):
        fork = build_mod.build(pin=pin)
        for name in selftest.run(fork, prepare_base(demo.demo_model(), fork).path):
            click.echo(f"selftest: {name}: ok")
    pin = port.finish(repo, paths.patches_dir(), upstream.pin_file(), build_and_check)
    click.echo(f"upstream is now {pin.ident()} (pinned in {upstream.pin_file()})")


def _replayed(fn) -> None:
    """Run a replay step and print every patch's outcome, also when it stops on a conflict."""
    from .fork import port
    try:
        results = fn()
    except port.Stopped as e:
        click.echo("\n".join(e.report))
        raise
    _report(results)


@upstream_group.command("bump")
@_pin_options
def upstream_bump(sdist_version, sha256, git_url, commit):
    """Lay a new upstream down in vendor/llama.cpp, replay the series onto it with 3-way merges,
    then export, build, run the canary and pin it. Stops on a conflict like git rebase."""
    from .fork import port
    pin = _pin_option(sdist_version, sha256, git_url, commit)
    if pin is None:
        raise OrchestrateError("give the new upstream: --sdist-version V [--sha256 H] or --git-url U --commit C")
    pin = port.resolve_sha256(pin)
    repo = upstream.ensure_vendor(upstream.load_pin())
    _replayed(lambda: port.start(repo, paths.patches_dir(), pin, upstream.pin_file()))
    _finish_bump(repo)


@upstream_group.command("continue")
def upstream_continue():
    """Go on with a bump after resolving a conflict (and `git add`), or after an interruption."""
    from .fork import port
    repo = port.vendor_repo()
    state = port.read_bump(repo)
    if state is None:
        raise OrchestrateError("no upstream bump is in progress")
    if state["phase"] != "replayed":
        _replayed(lambda: port.resume(repo, paths.patches_dir(), upstream.pin_file()))
    _finish_bump(repo)


@upstream_group.command("abort")
def upstream_abort():
    """Undo a bump: vendor/, patches/ and the pin exactly as they were before it."""
    from .fork import port
    port.abort(port.vendor_repo(), paths.patches_dir(), upstream.pin_file())
    click.echo("bump aborted; vendor/llama.cpp, patches/ and the pin are as they were")


@cli.command()
@click.option("--model", type=UserPath(), default=None, help="Base model (default: the built-in demo model).")
@click.option("--threads", type=click.IntRange(1), default=None)
def selftest(model, threads):
    """The canary: check that the built fork's hooks still do their job (about 20 s on the demo)."""
    from . import demo
    from .study import selftest as canary
    from .study.base import prepare_base
    fork = build_mod.current()
    for name in canary.run(fork, prepare_base(model or demo.demo_model(), fork).path, threads):
        click.echo(f"ok: {name}")


@cli.group()
def conf():
    """pablo.conf hook configuration files."""


@conf.command("check")
@click.argument("files", nargs=-1, required=True, type=UserPath())
def conf_check(files):
    """Validate configuration files with the same rules as the fork's reader."""
    from .files import check_not_special
    from .hooks.conf import parse_conf
    for f in files:
        c = parse_conf(check_not_special(f, "configuration"))
        table = c.table.name if c.table else "off"
        click.echo(f"{f}: ok (MODE={c.mode} Q4_0_RADIUS={c.radius} TABLE_MODE={table}"
                   f" HIST_OUT={c.hist_out or '(none)'}"
                   + (f"; {len(c.rules)} TENSOR rule{'s' * (len(c.rules) != 1)}" if c.rules else "") + ")")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("base", type=UserPath())
@click.argument("out", type=UserPath())
@click.argument("qtype", metavar="TYPE")
@click.option("--mode", type=click.Choice(["simple", "pablo"]), default=None,
              help="simple: stock values; pablo: the experiments (default: pablo when --radius/--table is given).")
@click.option("--radius", type=click.IntRange(0, 7), default=0, help="Q4_0 zero radius (pablo mode).")
@click.option("--table", default=None, help="Q8_0 translation table: a name in conf/tables or a .table file.")
@click.option("--rule", "rules", multiple=True, metavar="'PATTERN [Q4_0_RADIUS=N] [TABLE_MODE=T]'",
              help="Per-tensor setting for the tensors whose names match PATTERN (* and ? wildcards); "
                   "repeatable, the first that matches wins (pablo mode).")
@click.option("--recipe", "recipe_file", type=UserPath(), default=None,
              help="A recipe file (`orchestrate recipe`): its type must be TYPE; its rules are added.")
@click.option("--hist", type=UserPath(), default=None, help="Write the value and zero-run histograms (JSON) here.")
@click.option("--threads", type=click.IntRange(1), default=None, help="llama-quantize threads (default: all cores).")
@LLAMA_ENV
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def quantize(base, out, qtype, mode, radius, table, rules, recipe_file, hist, threads, llama_env, extra):
    """Quantize BASE to OUT as TYPE (any llama-quantize type) with the fork's hooks. Extra
    llama-quantize arguments go after `--`."""
    from .files import check_input_file, refuse_overwrite
    from .hooks.conf import Hooks, rule_arg, table_arg
    from .tools.quantize import canonical_type, needs_imatrix, run_quantize
    from .study.base import prepare_base
    refuse_overwrite({"output": out, "histogram file": hist, "log": out.with_name(out.name + ".log")},
                     {"model": check_input_file(base, "model")})
    types_file = None
    if recipe_file is not None:
        from .recipes import read_recipe
        from .study.groups import type_file
        _, recipe_type, recipe_rules, recipe_types = read_recipe(recipe_file)
        if recipe_type.upper() != qtype.upper():
            raise OrchestrateError(f"{recipe_file} is a {recipe_type} recipe; quantize it as {recipe_type}")
        rules = tuple(rules) + tuple(recipe_rules)
        if recipe_types:  # beside the output, as llama-quantize's --tensor-type-file
            types_file = type_file(tuple(recipe_types), recipe_types, out.with_name(f".{out.name}.tensor-types"))
            extra = (*extra, "--tensor-type-file", str(types_file))
    experiment = mode == "pablo" or (mode is None and (radius > 0 or table is not None or bool(rules)))
    hooks = Hooks(experiment, radius, table_arg(table) if table else None, tuple(rule_arg(r) for r in rules))
    fork = build_mod.current()
    qtype = canonical_type(fork, qtype)
    b = prepare_base(base, fork)
    if "--imatrix" not in extra and needs_imatrix(fork, b.path, b.sha256, qtype):
        raise OrchestrateError(f"{qtype} needs an importance matrix for {base.name}: pass one after `--` "
                               "(-- --imatrix FILE)")
    try:
        res = run_quantize(fork, b.path, out, qtype, hooks, hist=hist,
                           threads=threads, extra=list(extra), env=_llama_env(llama_env))
    finally:
        if types_file is not None:
            types_file.unlink(missing_ok=True)
    size = f"{res['quant_mib']:.2f} MiB" + (f" ({res['quant_bpw']:.2f} BPW)" if "quant_bpw" in res else "")
    click.echo(f"wrote {out}: {size} in {res['seconds']:.1f} s" + (f"; histograms: {hist}" if hist else ""))


@cli.command()
@click.option("--radius", default=None, help="Zero radii of centred Q4_0: 0..3, 1,3, 2 or none.")
@click.option("--tables", default=None, help="Q8_0 translation tables: names in conf/tables or .table files, comma-separated, or none.")
@click.option("--types", default=None, help="Stock quantization types, any llama-quantize accepts, comma-separated (e.g. Q4_0,Q4_K_M), or none.")
@click.option("--config", "config", type=UserPath(), default=None,
              help="Experiment file (default: conf/experiments/thesis.yaml).")
@click.option("--model", type=UserPath(), default=None, help="Base model GGUF (default: the built-in demo model).")
@click.option("--text", type=UserPath(), default=None,
              help="Text to score, e.g. wiki.test.raw (default: the built-in demo text).")
@click.option("--out", type=UserPath(), default=None, help="Output directory (default: plots/<experiment>-<model>).")
@click.option("--ctx", type=click.IntRange(16), default=None, help="Tokens per perplexity chunk (-c).")
@click.option("--chunks", type=click.IntRange(0), default=None, help="Chunks to score (0 = the whole text).")
@click.option("--kld", is_flag=True, help="Also KL divergence and same-top-token rate against the base.")
@click.option("--task", "tasks", multiple=True, metavar="MODE:FILE",
              help="Also answer this multiple-choice task (MODE hellaswag, winogrande or mc, in llama-perplexity's "
                   "formats; repeatable; replaces the experiment's tasks). `orchestrate task make` writes one.")
@click.option("--keep-models", is_flag=True, help="Keep the quantized models after scoring.")
@click.option("--split-text", "split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              metavar="SHARE", help="Hold back the first SHARE of the text for fitting and score only the rest.")
@click.option("--imatrix", "use_imatrix", is_flag=True,
              help="Also quantize every variant with an importance matrix made on the held-back text (its -imat "
                   "twin; --split-text 0.5 unless given). Types that need one become possible.")
@click.option("--threads", type=click.IntRange(1), default=None, help="Threads for llama-* (default: all cores).")
@click.option("--damage", "damage_variant", default=None,
              help="Variant whose per-tensor weight error is drawn as a heat-map (default: the largest radius).")
@click.option("--reference", default=None,
              help="Variant every other is compared with, token by token (default: q4_0, stock Q4_0).")
@EXECUTOR
@RAY_ADDRESS
@click.option("--plan", "plan_only", is_flag=True,
              help="Say what would run, the disk at its peak and the time; run nothing (at most a one-chunk calibration).")
@click.option("--force", is_flag=True, help="Start even when the disk looks too small for the sweep.")
@BACKEND
@click.option("--gpu-layers", type=click.IntRange(0), default=None,
              help="Layers llama-perplexity offloads to the GPU (-ngl; default: all, with a GPU backend).")
@LLAMA_ENV
def sweep(radius, tables, types, config, model, text, out, ctx, chunks, kld, tasks, keep_models, split, use_imatrix,
          threads, damage_variant,
          reference, executor, ray_address, plan_only, force, backend, gpu_layers, llama_env):
    """Quantize and score every variant of an experiment; write results, figures and a report."""
    from . import driver
    from .study import experiment
    from .study.runner import run_local
    exp = experiment.override(experiment.load_experiment(config), radius=radius, tables=tables, types=types,
                              ctx=ctx, chunks=chunks, tasks=tasks, imatrix=use_imatrix)
    opts = driver.Options(kld=kld, keep_models=keep_models, threads=threads, llama_env=_llama_env(llama_env),
                          backend=backend, gpu_layers=gpu_layers, split=split)
    if plan_only:
        for line in driver.plan_sweep(exp, model, text, opts):
            click.echo(line)
        return
    execute = run_local
    if _on_cluster(executor, ray_address):
        from .study import cluster
        execute = functools.partial(cluster.run, address=ray_address)
    out_dir, doc = driver.sweep(exp, model, text, out, opts, damage_variant=damage_variant, reference=reference,
                                execute=execute, force=force)
    failed = [r["name"] for r in doc["variants"] if r["status"] != "ok"]
    click.echo(f"report: {out_dir / 'report.md'}")
    if failed:
        raise OrchestrateError(f"{len(failed)} variant(s) failed: {', '.join(failed)} (see the report)")


@cli.command()
@click.option("--radius", type=click.IntRange(1, 7), default=None, help="Encoding: this zero radius on Q4_0.")
@click.option("--table", default=None, help="Encoding: this Q8_0 translation table (a name in conf/tables, "
                                            "balanced-fit, optimal, or a .table file).")
@click.option("--type", "qtype", default=None,
              help="Encoding: this llama-quantize type, given to one group of tensors at a time of a --reference model.")
@click.option("--reference", default=None,
              help="With --type: the stock type of the rest of the model (default Q8_0).")
@click.option("--by", type=click.Choice(["kind", "layer", "layer-kind", "tensor"]), default="kind", show_default=True,
              help="How the tensors the encoding changes are grouped; each group is scored alone.")
@click.option("--threshold", type=float, default=None,
              help="Stop scoring a group once its KLD effect's interval is wholly above or below this (nats/token).")
@click.option("--width", type=click.FloatRange(0, min_open=True), default=None,
              help="Stop scoring a group once its KLD effect's interval half-width is at most this.")
@click.option("--screen", is_flag=True,
              help="With --by layer-kind or tensor and --threshold: scan each layer and each kind whole first, and "
                   "skip the groups inside one whose whole effect is below the threshold.")
@click.option("--model", type=UserPath(), default=None, help="Base model GGUF (default: the built-in demo model).")
@click.option("--text", type=UserPath(), default=None, help="Text to score (default: the built-in demo text).")
@click.option("--out", type=UserPath(), default=None, help="Output directory (default: plots/scan-<encoding>-<by>-<model>).")
@click.option("--ctx", type=click.IntRange(16), default=512, show_default=True, help="Tokens per chunk (-c).")
@click.option("--chunks", type=click.IntRange(0), default=64, show_default=True,
              help="The most chunks a group is scored on (0 = the whole text).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Threads for llama-* (default: all cores).")
@click.option("--split-text", "split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              metavar="SHARE", help="Scan on the first SHARE of the text only; the rest is held out (for `recipe`).")
@click.option("--plan", "plan_only", is_flag=True,
              help="Say what the scan would run (groups, chunks, disk, time); run nothing.")
@EXECUTOR
@RAY_ADDRESS
@BACKEND
@LLAMA_ENV
def scan(radius, table, qtype, reference, by, threshold, width, screen, model, text, out, ctx, chunks, threads, split,
         plan_only, executor, ray_address, backend, llama_env):
    """Where does an encoding hurt? Apply it to one group of tensors at a time (against stock Q4_0 for a
    radius, stock Q8_0 for a table, --reference for a type) and score each group's model against the base,
    adaptively."""
    from . import driver
    from .study.experiment import Experiment
    if sum(x is not None for x in (radius, table, qtype)) != 1:
        raise OrchestrateError("give the encoding to scan: --radius N, --table NAME or --type TYPE")
    if reference is not None and qtype is None:
        raise OrchestrateError("--reference is for a --type scan (a radius is scanned on Q4_0, a table on Q8_0)")
    if screen and (threshold is None or by not in ("layer-kind", "tensor")):
        raise OrchestrateError("--screen needs --threshold and --by layer-kind or tensor (it screens them by "
                               "their layers and kinds)")
    if qtype is not None:
        reference = reference or "Q8_0"
        if reference.upper() == qtype.upper():
            raise OrchestrateError(f"--type {qtype} is the reference itself: nothing to scan")
        exp = Experiment(f"scan-{qtype.lower()}", types=[reference.upper(), qtype.upper()], ctx=ctx, chunks=chunks)
    else:
        name = f"scan-r{radius}" if radius is not None else f"scan-{Path(table).stem}"
        exp = Experiment(name, types=["Q4_0" if radius is not None else "Q8_0"],
                         radius=[radius] if radius is not None else [], tables=[table] if table else [],
                         ctx=ctx, chunks=chunks)
    opts = driver.Options(threads=threads, llama_env=_llama_env(llama_env), backend=backend, split=split)
    if plan_only:
        for line in driver.plan_scan(exp, by, model, text, opts, screen=screen):
            click.echo(line)
        return
    on_cluster = _on_cluster(executor, ray_address)
    out_dir, doc = driver.scan(exp, by, model, text, out, opts, threshold=threshold, width=width,
                               address=ray_address, on_cluster=on_cluster, screen=screen)
    top = doc["groups"] and max(doc["groups"], key=lambda g: g["effects"]["kld"]["mean"])
    screened = len(doc["screen"]["screened"]) if doc.get("screen") else 0
    click.echo(f"{len(doc['groups'])} groups scanned" + (f", {screened} screened out" if screened else "")
               + (f"; most sensitive: {top['name']}" if top else ""))
    click.echo(f"report: {out_dir / 'scan.md'}")


@cli.command()
@click.argument("directory", type=UserPath())
@click.option("--damage", "damage_variant", default=None, help="Variant for the weight-error heat-map.")
def plot(directory, damage_variant):
    """Redraw a sweep's figures and report from its results.json."""
    from .driver import redraw
    for title, path in redraw(directory, damage_variant):
        click.echo(f"{directory / path}  ({title})")


@cli.command()
@click.argument("directory", type=UserPath())
@click.argument("a")
@click.argument("b")
def compare(directory, a, b):
    """Compare variants A and B of a sweep token by token: ln(PPL ratio) with its paired error
    and bootstrap interval (and KL divergence, same top token with --kld)."""
    from . import results
    from .study import paired, scores
    doc = results.load(directory)
    found = {}
    for name in (a, b):
        row = next((r for r in doc["variants"] if r["name"] == name), None)
        if row is None:
            raise OrchestrateError(f"no variant {name} in {directory} (variants: "
                                   + ", ".join(r["name"] for r in doc["variants"]) + ")")
        if row["status"] != "ok":
            raise OrchestrateError(f"variant {name} failed in that sweep: nothing to compare")
        found[name] = scores.read(results.scores_path(directory, name))
    for line in paired.report_pair(a, b, found[a], found[b]):
        click.echo(line)


@cli.group("cache")
def cache_group():
    """What the run cache holds, and clearing it."""


@cache_group.command("list")
def cache_list():
    """Run and score directories per sweep, with sizes and last use."""
    from .study import cache
    for line in cache.listing(cache.entries(paths.cache_dir())):
        click.echo(line)


@cache_group.command("gc")
@click.option("--older-than", default=None, help="Remove what was last used longer ago than this (30d, 12h, 2w).")
@click.option("--keep-last", type=click.IntRange(1), default=None,
              help="Keep everything the N most recently used sweeps used.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
def cache_gc(older_than, keep_last, dry_run):
    """Remove run and score directories no longer wanted (never one a live sweep holds)."""
    import time

    from .study import cache
    age = cache.parse_age(older_than) if older_than is not None else None
    items = cache.doomed(cache.entries(paths.cache_dir()), age, keep_last, time.time())
    freed, busy = 0, []
    for e in items:
        if cache.in_use(e) or (not dry_run and not cache.remove(e)):
            busy.append(e)
            continue
        freed += e.size
        click.echo(f"{'would remove' if dry_run else 'removed'} {e.kind} {e.name} {cache.human(e.size)} "
                   f"(last used {cache.when(e.last_use)}): {e.path}")
    for e in busy:
        click.echo(f"kept {e.kind} {e.name}: a live sweep holds it ({e.path})")
    click.echo(f"{'would free' if dry_run else 'freed'} {cache.human(freed)} in {len(items) - len(busy)} directories")


@cli.command()
@click.argument("scan_dirs", nargs=-1, required=True, type=UserPath())
@click.option("--budget", "budget", required=True, metavar="QUANTITY=LIMIT[,LIMIT...]",
              help="kld=0.05 (mean KLD over the reference's) or nll=0.02 (ln PPL ratio); several limits: a frontier.")
@click.option("--text", type=UserPath(), default=None,
              help="Text to measure the recipes on (default: the part of the scan's text it held out, --split-text).")
@click.option("--model", type=UserPath(), default=None, help="The scan's model, if it has moved.")
@click.option("--out", type=UserPath(), default=None, help="Output directory (default: plots/recipe-<scans>).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Threads for llama-* (default: all cores).")
@LLAMA_ENV
def recipe(scan_dirs, budget, text, model, out, threads, llama_env):
    """The most zeros (or fewest bits) for a damage you accept: from one or more scans (radius, table or type)
    against one reference, a recipe per budget — which group takes which encoding — written as a file,
    built, and measured on text the scans never saw."""
    from . import driver
    from .study.recipe import parse_budgets
    budgets = parse_budgets(budget)
    out_dir, doc = driver.recipe(list(scan_dirs), budgets, out, text,
                                 driver.Options(threads=threads, llama_env=_llama_env(llama_env)), model=model)
    for r in doc["recipes"]:
        v = r["verdict"] or {}
        x = f"zeros {100 * r['x']:.2f}%" if doc["axis"] == "zero_fraction" else f"{r['x']:.3f} bits per weight"
        click.echo(f"{r['name']}: {len(r['groups'])} groups, {x}, budget "
                   f"{v.get('budget', '?')}, additive {v.get('additive', '?')}" + (f" -> {r['file']}" if r["file"] else ""))
    click.echo(f"report: {out_dir / 'recipe.md'}")


@cli.command("imatrix")
@click.option("--model", type=UserPath(), default=None, help="Base model GGUF (default: the built-in demo model).")
@click.option("--text", type=UserPath(), default=None, help="Calibration text (default: the demo text).")
@click.option("--split-text", "split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, metavar="SHARE", help="Calibrate on the first SHARE of the text (what a sweep "
              "with --imatrix holds back); 1 is not allowed: use --text with a text of its own.")
@click.option("--ctx", type=click.IntRange(16), default=512, show_default=True)
@click.option("--chunks", type=click.IntRange(1), default=20, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None)
@LLAMA_ENV
def imatrix_cmd(model, text, split, ctx, chunks, threads, llama_env):
    """Make (or find in the cache) the importance matrix of MODEL on the first part of TEXT, as a sweep
    with --imatrix does; print its path (for `orchestrate quantize ... -- --imatrix FILE`)."""
    from . import driver
    im = driver.importance_matrix(model, text, split, ctx, chunks,
                                  driver.Options(threads=threads, llama_env=_llama_env(llama_env)),
                                  say=lambda what: click.echo(what, err=True))
    click.echo(im.path)


@cli.group()
def task():
    """Multiple-choice tasks that sweeps answer (`sweep --task MODE:FILE`)."""


@task.command("make")
@click.argument("text", type=UserPath(), required=False)
@click.option("--out", type=UserPath(), required=True, help="The task file to write (refused if it exists).")
@click.option("--format", "mode", type=click.Choice(list(MODES)), default="hellaswag",
              show_default=True, help="llama-perplexity's format to write it in.")
@click.option("--questions", type=click.IntRange(1), default=200, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True, help="Chooses the passages and the wrong endings.")
@click.option("--context-words", type=click.IntRange(4), default=40, show_default=True)
@click.option("--ending-words", type=click.IntRange(4), default=12, show_default=True)
def task_make(text, out, mode, questions, seed, context_words, ending_words):
    """Write a cloze task from TEXT (default: the demo text): a passage, its true continuation and
    continuations from elsewhere in the text. A proxy for real tasks, which are used the same way."""
    from . import cloze, demo, taskfiles
    from .files import check_input_file, check_writable, read_text, refuse_overwrite, write_atomic
    source = check_input_file(text or demo.demo_text(), "text")
    refuse_overwrite({"task file": out}, {"text": source})
    if out.exists():
        raise OrchestrateError(f"{out} exists; choose another --out (a task file is never overwritten)")
    check_writable(out, "task file")
    qs = cloze.questions(read_text(source), questions, seed, context_words, ending_words)
    data = {"hellaswag": lambda: taskfiles.hellaswag_bytes(qs), "mc": lambda: taskfiles.mc_bytes(qs),
            "winogrande": lambda: taskfiles.winogrande_bytes(qs, 3)}[mode]()
    write_atomic(out, data)
    made = taskfiles.read(mode, out)
    click.echo(f"{out}: {made.questions} {mode} questions from {source.name} (seed {seed}); "
               f"use it with `orchestrate sweep --task {mode}:{out}`")


@cli.group()
def tables():
    """Translation tables for the Q8_0 -> 4-bit experiments."""


@tables.command("fit")
@click.argument("base", type=UserPath())
@click.option("--out", type=UserPath(), default="tables", help="Where to write the .table files (default: ./tables).")
@click.option("--threads", type=click.IntRange(1), default=None)
def tables_fit(base, out, threads):
    """Fit balanced-fit and optimal tables to BASE's own Q8_0 value distribution."""
    from .files import check_input_file, check_writable, refuse_overwrite
    from .hooks.conf import load_table
    from .hooks.tables import FITTED, code_masses, expected_sq_error, fit, write_table
    from .study.base import measured_histogram, prepare_base
    for name in FITTED:
        refuse_overwrite({"table file": out / f"{base.stem}-{name}.table"}, {"model": check_input_file(base, "model")})
        check_writable(out / f"{base.stem}-{name}.table", "table file")
    fork = build_mod.build(quiet=True)
    b = prepare_base(base, fork)
    hist = measured_histogram(fork, b.path, b.sha256, threads)
    click.echo(f"{'table':<14}{'E[(q - level)^2]':>18}  code masses (%, min..max)")
    shown = [load_table(paths.conf_dir() / "tables" / f"{n}.table", n) for n in ("basic", "balanced")]
    for name in FITTED:
        note = f"{name} table fitted to the Q8_0 values of {base.name} (sha256 {b.source_sha256[:16]})"
        shown.append(write_table(fit(name, hist), out / f"{base.stem}-{name}.table", note))
    for t in shown:
        m = 100 * code_masses(t, hist)
        where = f"  -> {t.path}" if t.name in FITTED else ""
        click.echo(f"{t.name:<14}{expected_sq_error(t, hist):>18.3f}  {m.min():.2f}..{m.max():.2f}{where}")


def _say(message: str) -> None:
    """One line on stderr, bytes as they came (a config file's bytes are shown as the C reader shows them)."""
    line = f"error: {' '.join(str(message).split())}\n"
    try:
        data = line.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        data = line.encode("utf-8", "backslashreplace")
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.write(2, data)


def _trace_log(exc: BaseException) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for d in (paths.cache_dir() / "errors", Path(tempfile.gettempdir())):
        try:
            d.mkdir(parents=True, exist_ok=True)
            log = d / f"orchestrate-{stamp}-{os.getpid()}.log"
            log.write_text(f"$ orchestrate {' '.join(sys.argv[1:])}\n" + "".join(traceback.format_exception(exc)),
                           encoding="utf-8", errors="backslashreplace")  # argv may hold undecodable bytes
            return log
        except (OSError, ValueError):
            continue
    return Path("(no writable place for a log)")


_received: list[int] = []


def _interrupt(signum, frame) -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every temporary file and lock is cleaned up."""
    _received.append(signum)
    raise KeyboardInterrupt


# Where the library's notes (logging) reach the terminal, one plain line each: a study's notes and the
# laying down of an upstream beside the results on stdout; everything else (builds, downloads, the base)
# with the progress on stderr.
STDOUT_LOGGERS = ("orchestrator.driver", "orchestrator.fork.upstream")


def _route_logging() -> None:
    def handler(stream) -> logging.Handler:
        h = logging.StreamHandler(stream)
        h.setFormatter(logging.Formatter("%(message)s"))
        return h
    root = logging.getLogger("orchestrator")
    root.setLevel(logging.INFO)
    root.addHandler(handler(sys.stderr))
    for name in STDOUT_LOGGERS:
        logging.getLogger(name).addHandler(handler(sys.stdout))
        logging.getLogger(name).propagate = False


def main(argv: list[str] | None = None) -> None:
    _route_logging()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        _main(argv)
    except SystemExit:
        raise
    except BaseException as e:  # the handler itself failed: still one line, if stderr takes it, and exit 1
        try:
            os.write(2, f"error: {type(e).__name__} while reporting an error\n".encode("ascii", "replace"))
        finally:
            os._exit(1)


def _main(argv: list[str] | None) -> None:
    try:
        rc = cli.main(args=argv, prog_name="orchestrate", standalone_mode=False)
    except OrchestrateError as e:
        _say(e)
        sys.exit(1)
    except click.exceptions.Abort:
        sig = _received[-1] if _received else signal.SIGINT
        how = f" ({signal.Signals(sig).name})" if _received else ""
        _say(f"interrupted{how}; run the same command again to resume")
        sys.exit(128 + sig)
    except click.ClickException as e:  # usage errors: one line, click's exit code
        _say(e.format_message())
        sys.exit(e.exit_code)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        _say(f"{e.strerror or e}{where}; full trace: {_trace_log(e)}")
        sys.exit(1)
    except Exception as e:
        _say(f"internal error: {type(e).__name__}: {e}; full trace: {_trace_log(e)}")
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)
