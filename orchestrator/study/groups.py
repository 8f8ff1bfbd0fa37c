"""Groups of tensors for a sensitivity scan, and how a group's model is made.

A scan asks what an encoding E does when applied to one group of tensors only, against a reference
R (the stock type E is built on). When E keeps every tensor's type (a radius, a table), the model
"R with E on group g" is R's file with g's tensor data taken from E's file: both come from one base
with the same types, so they have the same header and layout, and each tensor's bytes are what
quantizing the base with E's setting as a per-tensor rule for g gives (tests check that equality).
When E is another type, a group's model is quantized: R's type with llama-quantize's own
--tensor-type-file giving g's tensors the types they have in E's file.
"""

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import stream
from ..errors import OrchestrateError
from ..files import write_atomic
from ..hooks.conf import PATTERN_MAX
from . import analysis

BY = ("kind", "layer", "layer-kind", "tensor")
_BLOCK = re.compile(r"blk\.(\d+)\.(.+?)(?:\.weight)?$")
_LITERAL = re.compile(r"[!-~]+")  # printable ASCII, no space: a rule pattern's bytes


@dataclass(frozen=True)
class Group:
    name: str                  # e.g. "ffn_down", "blk.3", "blk.3.ffn_down"
    layer: int | None          # None: all layers, or not a block tensor
    kind: str | None           # None: all kinds
    tensors: tuple[str, ...]   # in file order


def place(tensor: str) -> tuple[int | None, str]:
    """(layer, kind) of a tensor name: blk.3.ffn_down.weight -> (3, "ffn_down"); token_embd.weight ->
    (None, "token_embd")."""
    m = _BLOCK.fullmatch(tensor)
    if m:
        return int(m.group(1)), m.group(2)
    return None, tensor.removesuffix(".weight")


def make_groups(tensors: list[str], by: str) -> list[Group]:
    """The tensors (those the encoding changes) grouped by kind, by layer, by layer and kind, or each
    alone; groups in order of first appearance (layers numerically)."""
    if by not in BY:
        raise OrchestrateError(f"bad grouping '{by}' (choose from {', '.join(BY)})")
    found: dict[tuple, list[str]] = {}
    for t in tensors:
        layer, kind = place(t)
        key = {"kind": (None, kind), "layer": (layer, None if layer is not None else kind),
               "layer-kind": (layer, kind), "tensor": (t,)}[by]
        found.setdefault(key, []).append(t)
    out = []
    for key, names in found.items():
        if by == "tensor":
            layer, kind = place(key[0])
            out.append(Group(key[0], layer, kind, tuple(names)))
            continue
        layer, kind = key
        name = ".".join(p for p in (None if layer is None else f"blk.{layer}", kind) if p)
        out.append(Group(name, layer, kind, tuple(names)))
    return sorted(out, key=lambda g: (g.layer is None, g.layer or 0, g.kind or ""))


def _layout(path: Path):
    reader = analysis.open_model(path)
    return reader, {t.name: (int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}


def _header(path: Path, data_offset: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(data_offset)


def shared_layout(ref: Path, enc: Path) -> dict[str, tuple[int, int]] | None:
    """The tensors' (offset, bytes) when ref and enc have the same header (metadata, tensor names,
    types, shapes, offsets), else None."""
    a, la = _layout(ref)
    b, lb = _layout(enc)
    same = a.data_offset == b.data_offset and la == lb and _header(ref, a.data_offset) == _header(enc, b.data_offset)
    return la if same else None


def _digest(path: Path, offset: int, n: int) -> bytes:
    h = hashlib.sha256()
    try:
        for block in stream.read_span(path, offset, n):
            h.update(block)
    except EOFError as e:
        raise OrchestrateError(str(e)) from None
    return h.digest()


def tensor_types(path: Path) -> dict[str, str]:
    """Each tensor's type, lowercase as llama-quantize spells it, in file order."""
    return {t.name: t.tensor_type.name.lower() for t in analysis.open_model(path).tensors}


def changed_tensors(ref: Path, enc: Path) -> list[str]:
    """Names of the tensors E changes, in file order: whose bytes differ (same layout), or whose type
    differs (E another type)."""
    layout = shared_layout(ref, enc)
    if layout is None:
        a, b = tensor_types(ref), tensor_types(enc)
        if a.keys() != b.keys():
            raise OrchestrateError(f"{enc.name} and {ref.name} do not hold the same tensors")
        return [n for n in a if a[n] != b[n]]
    return [name for name, span in layout.items() if _digest(ref, *span) != _digest(enc, *span)]


def rule_pattern(tensor: str) -> str:
    """A tensor's name as a TENSOR rule pattern matching it alone."""
    if not _LITERAL.fullmatch(tensor) or any(c in tensor for c in "=*?") or len(tensor) > PATTERN_MAX:
        raise OrchestrateError(f"tensor name {tensor!r} cannot be written as a rule pattern")
    return tensor


def assemble(ref: Path, enc: Path, tensors: tuple[str, ...], out: Path) -> Path:
    """ref's file with the named tensors' data taken from enc, written atomically to out."""
    layout = shared_layout(ref, enc)
    if layout is None:
        raise OrchestrateError(f"{enc.name} and {ref.name} do not have the same layout (tensor types, shapes or "
                               "metadata differ): a group's model cannot be assembled from them")
    missing = [t for t in tensors if t not in layout]
    if missing:
        raise OrchestrateError(f"{ref.name} has no tensor {missing[0]}")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        shutil.copyfile(ref, tmp)
        with open(tmp, "r+b") as dst:
            for t in tensors:
                offset, n = layout[t]
                dst.seek(offset)
                try:
                    for block in stream.read_span(enc, offset, n):
                        dst.write(block)
                except EOFError as e:
                    raise OrchestrateError(str(e)) from None
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def type_file(tensors: tuple[str, ...], types: dict[str, str], out: Path) -> Path:
    """llama-quantize's --tensor-type-file giving each of the tensors its type in `types` (patterns that
    match that whole name only: llama-quantize searches them as regular expressions)."""
    lines = [f"^{re.escape(t)}$={types[t]}" for t in tensors]
    if any(c.isspace() for line in lines for c in line):
        raise OrchestrateError("a tensor name with a space cannot be given to --tensor-type-file")
    write_atomic(out, "\n".join(lines) + "\n")
    return out
