"""Task files (orchestrator.taskfiles) and cloze tasks (orchestrator.cloze): the three formats written and
read back, and hostile files refused in one line. (That the counts equal what llama-perplexity reads is
tested on real runs in tests/test_tasks.py.)"""

import struct

import pytest

from conftest import orchestrate
from orchestrator import cloze, taskfiles
from orchestrator.errors import OrchestrateError
from orchestrator.taskfiles import Question

TEXT = " ".join(f"w{i}" for i in range(2000))  # every word distinct: overlaps are visible


def test_cloze_questions_are_true_continuations_with_wrong_endings_from_elsewhere():
    qs = cloze.questions(TEXT, 10, seed=3, context_words=20, ending_words=5)
    words = TEXT.split()
    assert len(qs) == 10
    for q in qs:
        start = words.index(q.context.split()[0])
        window = set(words[start:start + 25])
        assert q.endings[q.gold].split() == words[start + 20:start + 25]  # the true continuation
        for k, e in enumerate(q.endings):
            if k != q.gold:
                assert not set(e.split()) & window  # never from the question's own passage
                assert words.index(e.split()[0]) % 25 == 20  # an ending of another passage
    assert len({q.gold for q in qs}) > 1
    assert cloze.questions(TEXT, 10, seed=3, context_words=20, ending_words=5) == qs  # deterministic
    assert cloze.questions(TEXT, 10, seed=4, context_words=20, ending_words=5) != qs


def test_cloze_refuses_a_text_too_short():
    with pytest.raises(OrchestrateError, match="needs at least"):
        cloze.questions("a few words only", 5, 1)


@pytest.mark.parametrize("mode", ["hellaswag", "winogrande", "mc"])
def test_written_files_read_back(tmp_path, mode):
    qs = cloze.questions(TEXT, 12, seed=1, context_words=20, ending_words=6)
    data = {"hellaswag": taskfiles.hellaswag_bytes, "mc": taskfiles.mc_bytes,
            "winogrande": lambda q: taskfiles.winogrande_bytes(q, 3)}[mode](qs)
    (tmp_path / "t").write_bytes(data)
    t = taskfiles.parse_spec(f"{mode}:t", tmp_path)
    assert (t.questions, t.mode, t.label) == (12, mode, f"{mode}:t")


def test_mc_bytes_layout():
    data = taskfiles.mc_bytes([Question("q?", ("a", "bb"), 1)])
    n, offset = struct.unpack_from("<II", data)
    assert (n, offset) == (1, 8)
    assert data[8:8 + 4 + 2] == struct.pack("<I", 2) + b"q?"
    assert data.endswith(struct.pack("<ii", 0, 1) + struct.pack("<I", 0))  # labels; no multiple-answer set


def test_winogrande_counts_the_lines_llama_perplexity_reads(tmp_path):
    lines = ["index,sentence,option1,option2,answer",          # header: its answer is no number
             '1,"He said, _ went home.",John,Mary,1',            # quoted comma
             "2,no blank here,John,Mary,2",                      # no _
             "3,_ is here.,A,B, +2",                             # `>> int` reads " +2"
             "4,_ is there.,A,B,3",                              # not 1 or 2
             "5,_ was last.,A,B,1"]                              # the last line: not read (no empty line after)
    (tmp_path / "w.csv").write_text("\n".join(lines) + "\n")
    assert taskfiles.read("winogrande", tmp_path / "w.csv").questions == 2
    (tmp_path / "w2.csv").write_text("\n".join(lines) + "\n\n")
    assert taskfiles.read("winogrande", tmp_path / "w2.csv").questions == 3


@pytest.mark.parametrize("mode, data, words", [
    ("hellaswag", b"ctx\n0\na\nb\nc\n", "6 lines per question; it has 5 lines"),
    ("hellaswag", b"ctx\n4\na\nb\nc\nd\n", "line 2 (question 1): the gold ending's index must be 0-3, not '4'"),
    ("hellaswag", b"", "no hellaswag questions"),
    ("winogrande", b"0,no blank,a,b,1\n\n", "no winogrande questions"),
    ("mc", b"\x01\x00", "no question count and offsets"),
    ("mc", struct.pack("<II", 1, 8) + struct.pack("<I", 50), "question 1 is cut short"),
    ("mc", taskfiles.mc_bytes([Question("q", ("a", ""), 0)]), "question 1 has an empty answer"),
    ("mc", taskfiles.mc_bytes([Question("q", tuple("x" * 101), 0)]), "101 answers"),
    ("mc", struct.pack("<I", 0), "no mc questions"),
])
def test_hostile_task_files_are_refused_in_one_line(tmp_path, mode, data, words):
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(OrchestrateError) as e:
        taskfiles.read(mode, tmp_path / "bad")
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec, words", [("nosuch:f", "MODE one of hellaswag, winogrande, mc"), ("hellaswag", "MODE:FILE"),
                                         ("hellaswag:", "MODE:FILE"), ("hellaswag:missing.txt", "does not exist")])
def test_bad_task_specs(tmp_path, spec, words):
    with pytest.raises(OrchestrateError, match=words):
        taskfiles.parse_spec(spec, tmp_path)


def test_task_make_from_the_command_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    res = orchestrate("task", "make", "t.txt", "--out", "q.mc", "--format", "mc", "--questions", "7", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert taskfiles.read("mc", tmp_path / "q.mc").questions == 7 and "7 mc questions" in res.stdout
    again = orchestrate("task", "make", "t.txt", "--out", "q.mc", cwd=tmp_path)
    assert again.returncode == 1 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    same = orchestrate("task", "make", "t.txt", "--out", "t.txt", cwd=tmp_path)
    assert same.returncode == 1 and text.read_text() == TEXT
    sweep = orchestrate("sweep", "--task", "hellaswag:q.mc", "--plan", cwd=tmp_path)
    assert sweep.returncode == 1 and "6 lines per question" in sweep.stderr
