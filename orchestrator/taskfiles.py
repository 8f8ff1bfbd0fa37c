"""Task files for llama-perplexity's multiple-choice modes: the one owner of their three formats.

- hellaswag (`--hellaswag`): six lines per question: the context, the gold ending's index (0-3), the
  four endings. llama-perplexity asks the questions in an order of its own (a fixed shuffle).
- winogrande (`--winogrande`): CSV lines `index,sentence,choice1,choice2,answer`; the sentence holds one
  `_` where a choice goes, the answer is 1 or 2. Only the sentence may be quoted; choices hold no comma.
  llama-perplexity skips lines it cannot read, and never reads a file's last line unless the file ends
  with an empty line (it reads the file without its final newline, then stops at the end of the text).
- mc (`--multiple-choice`, a binary file given with -bf): a uint32 count of questions, their uint32 byte
  offsets, then per question a string (uint32 length, bytes), the single-answer set (uint32 count, the
  answers as strings, one int32 label each: 1 correct, 0 not) and a multiple-answer set (same layout,
  unused). All little-endian.

read() checks a file as llama-perplexity will read it and counts the questions it will ask, so that a
bad file is refused in one line before any model is scored.
"""

import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import OrchestrateError
from .files import check_input_file

MODES = {"hellaswag": "--hellaswag", "winogrande": "--winogrande", "mc": "--multiple-choice"}
MAX_ANSWERS = 100  # llama-perplexity's limit per multiple-choice question
ANSWER = re.compile(rb"\s*\+?0*[12](?!\d)")  # what `stream >> int` reads as 1 or 2


@dataclass(frozen=True)
class Question:
    context: str
    endings: tuple[str, ...]
    gold: int                 # index of the right ending


@dataclass(frozen=True)
class TaskFile:
    mode: str                 # hellaswag | winogrande | mc
    path: Path
    sha256: str
    questions: int            # how many llama-perplexity will ask

    @property
    def label(self) -> str:
        """How a sweep names the task: its mode and file name."""
        return f"{self.mode}:{self.path.name}"

    @property
    def key(self) -> str:
        """What determines its answers besides the model: its mode and content."""
        return f"{self.mode}-{self.sha256[:16]}"


def parse_spec(spec: str, relative_to: Path | None = None) -> TaskFile:
    """MODE:FILE (e.g. hellaswag:hs.txt), read and checked; a relative FILE is relative to relative_to
    (an experiment file's directory) when given."""
    mode, sep, file = spec.partition(":")
    if not sep or mode not in MODES or not file:
        raise OrchestrateError(f"task {spec!r}: give MODE:FILE with MODE one of {', '.join(MODES)}")
    path = Path(file).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    return read(mode, path)


def read(mode: str, path: Path) -> TaskFile:
    path = check_input_file(path, f"{mode} task file").resolve()
    data = path.read_bytes()
    count = {"hellaswag": _hellaswag_count, "winogrande": _winogrande_count, "mc": _mc_count}[mode](data, path)
    if count == 0:
        raise OrchestrateError(f"{path}: no {mode} questions llama-perplexity can read")
    return TaskFile(mode, path, hashlib.sha256(data).hexdigest(), count)


def _prompt_lines(data: bytes) -> list[bytes]:
    """The lines llama-perplexity splits a -f file into (its final newline dropped first)."""
    prompt = data[:-1] if data.endswith(b"\n") else data
    lines = prompt.split(b"\n")
    return lines[:-1] if lines and lines[-1] == b"" else lines


def _hellaswag_count(data: bytes, path: Path) -> int:
    lines = _prompt_lines(data)
    if len(lines) % 6:
        raise OrchestrateError(f"{path}: a hellaswag file has 6 lines per question; it has {len(lines)} lines")
    for q in range(len(lines) // 6):
        label = lines[6 * q + 1].strip()
        if label not in (b"0", b"1", b"2", b"3"):
            raise OrchestrateError(f"{path}: line {6 * q + 2} (question {q + 1}): the gold ending's index must be "
                                   f"0-3, not {label[:20].decode('utf-8', 'replace')!r}")
    return len(lines) // 6


def _winogrande_fields(line: bytes) -> list[bytes] | None:
    """The line's five fields as llama-perplexity splits them (quotes only guard commas), or None."""
    commas, quoted = [], False
    for i, c in enumerate(line):
        if c == ord('"'):
            quoted = not quoted
        elif c == ord(",") and not quoted:
            commas.append(i)
            if len(commas) == 4:
                break
    if len(commas) < 4:
        return None
    c = commas
    return [line[:c[0]], line[c[0] + 1:c[1]], line[c[1] + 1:c[2]], line[c[2] + 1:c[3]], line[c[3] + 1:]]


def _winogrande_count(data: bytes, path: Path) -> int:
    """Lines llama-perplexity will ask (it skips what it cannot read, and the last line when the file
    does not end with an empty line: see the module's note)."""
    prompt = data[:-1] if data.endswith(b"\n") else data
    lines = prompt.split(b"\n")[:-1]  # (its reading loop stops at the end of the text, dropping that line)
    count = 0
    for line in lines:
        fields = _winogrande_fields(line)
        if fields is None or b"_" not in fields[1]:
            continue
        if ANSWER.match(fields[4]):
            count += 1
    return count


def _mc_count(data: bytes, path: Path) -> int:
    def bad(why):
        return OrchestrateError(f"{path}: not a multiple-choice task file ({why})")
    try:
        (n,) = struct.unpack_from("<I", data, 0)
        offsets = struct.unpack_from(f"<{n}I", data, 4)
    except struct.error:
        raise bad("no question count and offsets") from None
    for q, at in enumerate(offsets):
        try:
            at = _mc_string(data, at)[1]
            for part in ("single", "multiple"):
                (k,) = struct.unpack_from("<I", data, at)
                if k > MAX_ANSWERS:
                    raise bad(f"question {q + 1} has {k} answers; llama-perplexity takes at most {MAX_ANSWERS}")
                at += 4
                for _ in range(k):
                    text, at = _mc_string(data, at)
                    if part == "single" and not text:
                        raise bad(f"question {q + 1} has an empty answer")
                at += 4 * k
                if at > len(data):
                    raise struct.error
                if part == "single" and k == 0:
                    raise bad(f"question {q + 1} has no answers")
        except struct.error:
            raise bad(f"question {q + 1} is cut short") from None
    return n


def _mc_string(data: bytes, at: int) -> tuple[bytes, int]:
    (size,) = struct.unpack_from("<I", data, at)
    if at + 4 + size > len(data):
        raise struct.error
    return data[at + 4:at + 4 + size], at + 4 + size


def hellaswag_bytes(questions: list[Question]) -> bytes:
    out = []
    for q in questions:
        if len(q.endings) != 4:
            raise OrchestrateError("a hellaswag question has exactly 4 endings")
        out += [q.context, str(q.gold), *q.endings]
    return ("\n".join(out) + "\n").encode()


def winogrande_bytes(questions: list[Question], words: int) -> bytes:
    """Each question as a two-choice sentence: the context, the blank, then the gold ending's words after
    its first `words`; the choices are the first `words` of the gold ending and of the first wrong one.
    Commas leave the choices (they cannot hold one) and double quotes the sentence (it is quoted)."""
    lines = []
    for i, q in enumerate(questions):
        wrong = next(k for k in range(len(q.endings)) if k != q.gold)
        gold_words = q.endings[q.gold].split()
        choices = [" ".join(q.endings[k].split()[:words]).replace(",", "") for k in (q.gold, wrong)]
        first = i % 2  # the right choice alternates between 1 and 2
        if first:
            choices.reverse()
        sentence = f"{q.context} _ {' '.join(gold_words[words:])}".replace('"', "'")
        lines.append(f'{i},"{sentence}",{choices[0]},{choices[1]},{2 if first else 1}')
    return ("\n".join(lines) + "\n\n").encode()  # the empty last line: so that the last question is read


def mc_bytes(questions: list[Question]) -> bytes:
    def string(s: str) -> bytes:
        b = s.encode()
        return struct.pack("<I", len(b)) + b
    bodies = []
    for q in questions:
        body = string(q.context) + struct.pack("<I", len(q.endings)) + b"".join(string(e) for e in q.endings)
        body += struct.pack(f"<{len(q.endings)}i", *[int(k == q.gold) for k in range(len(q.endings))])
        bodies.append(body + struct.pack("<I", 0))  # no multiple-answer set
    start = 4 + 4 * len(bodies)
    offsets, at = [], start
    for b in bodies:
        offsets.append(at)
        at += len(b)
    return struct.pack(f"<I{len(bodies)}I", len(bodies), *offsets) + b"".join(bodies)
