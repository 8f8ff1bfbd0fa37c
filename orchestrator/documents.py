"""Reading the small YAML documents users write (experiment files): bounded in size, one meaning per
key, no aliases.

A YAML alias can make a few hundred bytes expand into gigabytes (nested anchors), and a duplicated
key silently keeps the last value: both are refused with the line they are on.
"""

from pathlib import Path

import yaml

from .errors import OrchestrateError
from .files import check_input_file

MAX_BYTES = 1 << 20  # an experiment file is a few lines; anything near this is a mistake


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases and duplicate keys."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.MarkedYAMLError(problem="anchors and aliases (&, *) are not allowed",
                                       problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: Path, what: str):
    """The document in path, or a one-line error naming the file and the problem."""
    path = check_input_file(path, what)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise OrchestrateError(f"{what} {path} is {size} bytes; at most {MAX_BYTES} are read")
    try:
        text = path.read_bytes().decode("utf-8")
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except OSError as e:
        raise OrchestrateError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise OrchestrateError(f"{what} {path} is not UTF-8 (byte {e.start})") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise OrchestrateError(f"{what} {path}{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise OrchestrateError(f"{what} {path} is not valid YAML: {' '.join(str(e).split())}") from None
