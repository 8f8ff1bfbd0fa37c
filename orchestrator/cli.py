"""The `orchestrate` command line: a thin layer over the pipeline modules."""

import functools
import json
import sys
from pathlib import Path

import click

from . import build as build_mod
from . import patches as patches_mod
from . import paths, upstream
from .errors import OrchestrateError


def friendly(fn):
    """Turn OrchestrateError into a one-line error and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OrchestrateError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
    return wrapper


@click.group()
@click.version_option(package_name="orchestrate")
def main():
    """Manage a patched llama.cpp fork for quantization research."""


@main.command()
@click.option("-j", "--jobs", type=int, default=None, help="Parallel compile jobs (default: all cores).")
@friendly
def build(jobs):
    """Fetch the pinned llama.cpp, apply patches/, compile the fork."""
    fork = build_mod.build(jobs=jobs)
    click.echo(fork.build_dir / "bin")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly
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


@main.group()
def patches():
    """Manage the patch series in patches/ over vendor/llama.cpp."""


def _vendor_repo():
    return upstream.ensure_vendor(upstream.load_pin())


@patches.command("list")
@friendly
def patches_list():
    """The series, in order, with each patch's subject."""
    for i, p in enumerate(patches_mod.read_series(paths.patches_dir()), 1):
        click.echo(f"{i:2d}. {p.name}  {p.subject}")


@patches.command("status")
@friendly
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
@friendly
def patches_apply():
    """Apply the whole series in order, each patch a commit on top of upstream."""
    done = patches_mod.apply_series(_vendor_repo(), paths.patches_dir())
    click.echo(f"applied: {', '.join(done)}" if done else "series already applied")


@patches.command("unapply")
@click.option("--discard", is_flag=True, help="Also throw away edits in vendor/ that no patch holds.")
@friendly
def patches_unapply(discard):
    """Return vendor/llama.cpp to the pristine upstream."""
    patches_mod.unapply(_vendor_repo(), paths.patches_dir(), discard=discard)
    click.echo("vendor/llama.cpp is pristine upstream")


@patches.command("export")
@friendly
def patches_export():
    """Write the commits in vendor/llama.cpp back into patches/ (how a patch is edited)."""
    names = patches_mod.export(_vendor_repo(), paths.patches_dir())
    click.echo(f"exported {len(names)} patch(es) to {paths.patches_dir()}")


@patches.command("check")
@click.option("--sdist-version", help="Check against another llama-cpp-python sdist version.")
@click.option("--sha256", help="sha256 of that sdist (without it the download is not verified).")
@click.option("--git-url", help="Check against a git repository ...")
@click.option("--commit", help="... at this commit.")
@friendly
def patches_check(sdist_version, sha256, git_url, commit):
    """Dry run: does the whole series apply to the pinned upstream (or another one)?"""
    if sdist_version and git_url:
        raise OrchestrateError("give either --sdist-version or --git-url, not both")
    if sdist_version:
        pin = upstream.sdist_pin(sdist_version, sha256)
        if not sha256:
            click.echo("note: no --sha256 given, the download is not verified", err=True)
    elif git_url:
        if not commit:
            raise OrchestrateError("--git-url needs --commit")
        pin = upstream.Pin("git", url=git_url, commit=commit)
    else:
        pin = upstream.load_pin()
    names = patches_mod.check(paths.patches_dir(), pin, vendor=paths.vendor_dir())
    click.echo(f"all {len(names)} patch(es) apply to {pin.ident()}")


@main.group()
def conf():
    """pablo.conf hook configuration files."""


@conf.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@friendly
def conf_check(files):
    """Validate configuration files with the same rules as the fork's reader."""
    from .conf import parse_conf
    for f in files:
        c = parse_conf(f)
        table = c.table.name if c.table else "off"
        click.echo(f"{f}: ok (MODE={c.mode} Q4_0_RADIUS={c.radius} TABLE_MODE={table}"
                   f" HIST_OUT={c.hist_out or '(none)'})")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("qtype", metavar="TYPE")
@click.option("--mode", type=click.Choice(["simple", "pablo"]), default=None,
              help="simple: stock values; pablo: the experiments (default: pablo when --radius/--table is given).")
@click.option("--radius", type=click.IntRange(0, 7), default=0, help="Q4_0 zero radius (pablo mode).")
@click.option("--table", default=None, help="Q8_0 translation table: a name in conf/tables or a .table file.")
@click.option("--hist", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the value and zero-run histograms (JSON) here.")
@click.option("--threads", type=int, default=None, help="llama-quantize threads (default: all cores).")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
@friendly
def quantize(base, out, qtype, mode, radius, table, hist, threads, extra):
    """Quantize BASE to OUT as TYPE with the fork's hooks. Extra llama-quantize
    arguments go after `--`."""
    from .conf import table_arg
    from .quantize import prepare_base, run_quantize
    pablo = mode == "pablo" or (mode is None and (radius > 0 or table is not None))
    tbl = table_arg(table) if table else None
    fork = build_mod.current()
    b = prepare_base(base, fork)
    res = run_quantize(fork, b.path, out, qtype, pablo=pablo, radius=radius, table=tbl, hist=hist,
                       threads=threads, extra=list(extra))
    size = f"{res['quant_mib']:.2f} MiB" + (f" ({res['quant_bpw']:.2f} BPW)" if "quant_bpw" in res else "")
    click.echo(f"wrote {out}: {size} in {res['seconds']:.1f} s" + (f"; histograms: {hist}" if hist else ""))


@main.command()
@click.option("--radius", default=None, help="Zero radii of centred Q4_0: 0..3, 1,3, 2 or none.")
@click.option("--tables", default=None, help="Q8_0 translation tables: names in conf/tables or .table files, comma-separated, or none.")
@click.option("--types", default=None, help="Stock quantization types, comma-separated (e.g. Q4_0,Q8_0), or none.")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Experiment file (default: conf/experiments/thesis.yaml).")
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Base model GGUF (default: the built-in demo model).")
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Text to score, e.g. wiki.test.raw (default: the built-in demo text).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory (default: plots/<experiment>-<model>).")
@click.option("--ctx", type=click.IntRange(16), default=None, help="Tokens per perplexity chunk (-c).")
@click.option("--chunks", type=click.IntRange(0), default=None, help="Chunks to score (0 = the whole text).")
@click.option("--kld", is_flag=True, help="Also KL divergence and same-top-token rate against the base.")
@click.option("--keep-models", is_flag=True, help="Keep the quantized models after scoring.")
@click.option("--threads", type=int, default=None, help="Threads for llama-* (default: all cores).")
@click.option("--damage", "damage_variant", default=None,
              help="Variant whose per-tensor weight error is drawn as a heat-map (default: the largest radius).")
@friendly
def sweep(radius, tables, types, config, model, text, out, ctx, chunks, kld, keep_models, threads, damage_variant):
    """Quantize and score every variant of an experiment; write results, figures and a report."""
    from . import experiment, sweep as sweep_mod
    exp = experiment.override(experiment.load_experiment(config), radius=radius, tables=tables, types=types,
                              ctx=ctx, chunks=chunks)
    out_dir, doc = sweep_mod.sweep(exp, model, text, out, kld=kld, keep_models=keep_models, threads=threads,
                                   damage_variant=damage_variant)
    failed = [r["name"] for r in doc["variants"] if r["status"] != "ok"]
    click.echo(f"report: {out_dir / 'report.md'}")
    if failed:
        click.echo(f"error: {len(failed)} variant(s) failed: {', '.join(failed)} (see the report)", err=True)
        sys.exit(1)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--damage", "damage_variant", default=None, help="Variant for the weight-error heat-map.")
@friendly
def plot(directory, damage_variant):
    """Redraw a sweep's figures and report from its results.json."""
    from .report import redraw
    for title, path in redraw(directory, damage_variant):
        click.echo(f"{directory / path}  ({title})")


@main.group()
def tables():
    """Translation tables for the Q8_0 -> 4-bit experiments."""


@tables.command("fit")
@click.argument("base", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("tables"),
              help="Where to write the .table files (default: ./tables).")
@click.option("--threads", type=int, default=None)
@friendly
def tables_fit(base, out, threads):
    """Fit balanced-fit and optimal tables to BASE's own Q8_0 value distribution."""
    from . import assets
    from .conf import load_table
    from .quantize import prepare_base
    from .tables import code_masses, expected_sq_error, fit, measured_histogram, write_table
    fork = build_mod.build(quiet=True)
    b = prepare_base(base, fork)
    hist = measured_histogram(fork, b.path, assets.model_id(b.path), threads)
    stem = Path(base).stem
    click.echo(f"{'table':<14}{'E[(q - level)^2]':>18}  code masses (%, min..max)")
    shown = [load_table(paths.conf_dir() / "tables" / f"{n}.table", n) for n in ("basic", "balanced")]
    for name in ("balanced-fit", "optimal"):
        note = f"{name} table fitted to the Q8_0 values of {Path(base).name} (sha256 {assets.model_id(b.path)[:16]})"
        shown.append(write_table(fit(name, hist), out / f"{stem}-{name}.table", note))
    for t in shown:
        m = 100 * code_masses(t, hist)
        where = f"  -> {t.path}" if t.name in ("balanced-fit", "optimal") else ""
        click.echo(f"{t.name:<14}{expected_sq_error(t, hist):>18.3f}  {m.min():.2f}..{m.max():.2f}{where}")
