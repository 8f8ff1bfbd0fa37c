"""Variants completed at sweep time: the tables fitted to the base (hooks.tables.FITTED_AT_SWEEP), and
every variant's twin with an importance matrix."""

from dataclasses import replace
from pathlib import Path

from ..errors import OrchestrateError
from ..hooks.conf import Rule
from ..hooks.tables import FITTED, fit, fit_optimal, write_table
from ..tools.imatrix import Imatrix
from . import groups
from .base import measured_histogram, tensor_histograms, weighted_histogram
from .experiment import Experiment, Variant
from .runs import Inputs


def with_imatrix(variants: list[Variant], unfit: dict, im: Imatrix | None,
                 need: set[str]) -> tuple[list[Variant], dict]:
    """Every variant but the base also with the importance matrix (its "-imat" twin); the types that
    need one, only so."""
    if im is None:
        return variants, unfit
    out = []
    for v in variants:
        if v.kind == "base" or v.qtype not in need:
            out.append(v)
        if v.kind != "base":
            out.append(replace(v, name=f"{v.name}-imat", imatrix=im))
    return out, {**unfit, **{f"{n}-imat": why for n, why in unfit.items()}}


def fit_tables(variants: list[Variant], inp: Inputs, out: Path, im: Imatrix | None) -> tuple[list[Variant], dict]:
    """The fitted tables (hooks.tables.FITTED_AT_SWEEP) of the variants that name one, kept as .table
    files in the sweep directory; and why a table could not be fitted."""
    done, unfit = [], {}
    about = f"the Q8_0 values of {inp.base.path.name} (sha256 {inp.base.sha256[:16]})"
    for v in variants:
        try:
            if v.fit in FITTED:
                hist = measured_histogram(inp.fork, inp.base.path, inp.base.sha256, inp.threads)
                v = v.with_table(write_table(fit(v.fit, hist), out / "tables" / f"{v.fit}.table",
                                             f"{v.fit} table fitted to {about}"))
            elif v.fit == "optimal-weighted":
                if im is None:
                    raise OrchestrateError("the optimal-weighted table needs an importance matrix (--imatrix)")
                hist = weighted_histogram(inp.fork, inp.base.path, inp.base.sha256, im, inp.threads)
                v = v.with_table(write_table(fit_optimal(hist, v.fit), out / "tables" / f"{v.fit}.table",
                                             f"optimal table fitted to {about}, each weighted by its column's "
                                             f"importance in {im.path.name}"))
            elif v.fit == "per-tensor":
                v = replace(v, hooks=replace(v.hooks, rules=_per_tensor_rules(inp, out / "tables" / "per-tensor", about)))
        except OrchestrateError as e:
            unfit[v.name] = f"could not fit the {v.fit} table: {e}"
        done.append(v)
    return done, unfit


def _per_tensor_rules(inp: Inputs, d: Path, about: str) -> tuple[Rule, ...]:
    """An optimal table per Q8_0 tensor, fitted to its own values, as a TENSOR rule naming that tensor."""
    measured_histogram(inp.fork, inp.base.path, inp.base.sha256, inp.threads)
    rules = []
    for name, h in tensor_histograms(inp.fork, inp.base.sha256).items():
        t = write_table(fit_optimal(h, "per-tensor"), d / f"{name}.table", f"optimal table of {name} in {about}")
        rules.append(Rule(groups.rule_pattern(name), table_set=True, table=t, table_file=str(t.path)))
    return tuple(rules)


def with_tables(exp: Experiment, inp: Inputs, out: Path, im: Imatrix | None = None) -> tuple[list[Variant], dict[str, str]]:
    """The experiment's variants with their fitted tables, and why a table could not be fitted."""
    variants = exp.variants()
    if not any(v.fit for v in variants):
        return variants, {}
    return fit_tables(variants, inp, out, im)
