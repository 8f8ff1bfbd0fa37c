"""Run the fork's llama-quantize with a hook configuration; prepare an F16 base model."""

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf

from . import assets, paths
from .analysis import open_model
from .build import Fork
from .conf import Table, write_conf
from .errors import OrchestrateError
from .parse import parse_quantize, quantize_progress
from .runner import Progress, clean_env, failure_reason, run_logged

FLOAT_TYPES = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}


@dataclass(frozen=True)
class Base:
    path: Path
    upcast_from: str | None   # e.g. "Q4_1" when the F16 base was made from a quantized model
    source: Path


def weight_types(model: Path) -> tuple[set[str], str | None]:
    """The GGML types of the model's matrices and its llama file type (e.g. "Q4_1"), read
    from the GGUF header once per file content (gguf takes seconds to parse a tokenizer)."""
    import json
    memo = paths.cache_dir() / "model-types" / f"{assets.model_id(model)}.json"
    if memo.exists():
        data = json.loads(memo.read_text())
        return set(data["types"]), data["ftype"]
    types, ftype = _read_weight_types(model)
    assets.write_atomic(memo, json.dumps({"types": sorted(types), "ftype": ftype}).encode())
    return types, ftype


def _read_weight_types(model: Path) -> tuple[set[str], str | None]:
    reader = open_model(model)
    types = {t.tensor_type.name for t in reader.tensors if len([d for d in t.shape if d > 1]) >= 2}
    field = reader.get_field("general.file_type")
    ftype = None
    if field is not None:
        try:
            ftype = gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    return types, ftype


def prepare_base(model: Path, fork: Fork) -> Base:
    """The model itself if its weights are float; else an F16 upcast made once and cached."""
    model = Path(model)
    if not model.is_file():
        raise OrchestrateError(f"model {model} does not exist")
    types, ftype = weight_types(model)
    quantized = sorted(t for t in types if gguf.GGMLQuantizationType[t] not in FLOAT_TYPES)
    if not quantized:
        return Base(model, None, model)
    dest = paths.cache_dir() / "bases" / f"{assets.model_id(model)[:16]}-{model.stem}-F16.gguf"
    label = ftype or "/".join(quantized)
    if not dest.exists():
        print(f"note: {model.name} is already quantized ({label}); making an F16 upcast of it as the base "
              f"(its 'F16' results describe an upcast of a {label} model)", file=sys.stderr)
        run_quantize(fork, model, dest, "F16", extra=["--allow-requantize"], progress=False,
                     log_path=dest.with_suffix(".log"))
    return Base(dest, label, model)


def run_quantize(fork: Fork, base: Path, out: Path, qtype: str, pablo: bool = False, radius: int = 0,
                 table: Table | None = None, hist: Path | None = None, threads: int | None = None,
                 extra: list[str] = (), progress: bool = True, log_path: Path | None = None) -> dict:
    """Quantize base -> out with the given hook settings. Nothing is left at `out` (or `hist`)
    unless the whole run succeeded. Returns the parsed sizes, the command and the wall time."""
    out, base = Path(out), Path(base)
    if not base.is_file():
        raise OrchestrateError(f"model {base} does not exist")
    if table is not None and not pablo:
        raise OrchestrateError("a translation table takes effect only in pablo mode (--mode pablo)")
    if radius and not pablo:
        raise OrchestrateError("a radius takes effect only in pablo mode (--mode pablo)")
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path or out.with_name(out.name + ".log"))
    threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        tmp_out, tmp_hist = tmp / out.name, tmp / "hist.json"
        env = clean_env()
        if pablo or hist:
            env["PABLO_CONF"] = str(write_conf(tmp / "pablo.conf", pablo, radius, table, tmp_hist if hist else None))
        cmd = [fork.binary("llama-quantize"), *extra, base, tmp_out, qtype, str(threads)]
        bar = Progress() if progress else None

        def on_line(line):
            p = quantize_progress(line)
            if bar and p:
                bar.show(f"quantize {out.name}: tensor {p[0]}/{p[1]}")
        with open(log_path, "w") as log:
            rc, seconds = run_logged(cmd, log, on_line, env=env, cwd=tmp)  # cwd: no stray ./pablo.conf
        if bar:
            bar.done()
        text = log_path.read_text(errors="replace")
        if rc != 0 or not tmp_out.exists():
            raise OrchestrateError(f"llama-quantize failed ({failure_reason(text)}); log: {log_path}")
        result = parse_quantize(text)
        if hist:
            if not tmp_hist.exists():
                raise OrchestrateError(f"llama-quantize wrote no histograms; log: {log_path}")
            Path(hist).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(tmp_hist, hist)
        os.replace(tmp_out, out)
    result.update(command=[str(c) for c in cmd], seconds=seconds, log=str(log_path))
    return result
