"""Task answers on the real fork (issue 24): a cloze task made from the demo text in llama-perplexity's
three formats, answered by every variant of a real sweep; the per-question records against what
llama-perplexity prints, the demo's accuracies and flips, and answers scored once per tensor content."""

import json
import re
from pathlib import Path

import pytest

from conftest import orchestrate
from orchestrator import taskfiles
from orchestrator.errors import ToolError
from orchestrator.tools import perplexity

QUESTIONS = {"hellaswag": 100, "winogrande": 40, "mc": 40}


@pytest.fixture(scope="module")
def task_sweep(fork, demo_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    for mode, n in QUESTIONS.items():
        orchestrate("task", "make", "--out", f"cloze.{mode}", "--format", mode, "--questions", n, cwd=d, check=True)
    args = ["sweep", "--radius", "0..3", "--tables", "none", "--types", "Q4_0", "--chunks", "8", "--ctx", "128",
            "--threads", "2", "--out", "out", *[a for m in QUESTIONS for a in ("--task", f"{m}:cloze.{m}")]]
    res = orchestrate(*args, cwd=d)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((d / "out" / "results.json").read_text())
    return d, args, doc, {r["name"]: r for r in doc["variants"]}


def printed_score(mode: str, log: str) -> str:
    """The score llama-perplexity printed last, read here on its own terms."""
    final = re.search(r"(?:Final Winogrande score\(\d+ tasks\)|Final result): ([\d.]+)", log)
    if final:
        return final.group(1)
    last = re.findall(r"(?m)^\d+\t([\d.]+)", log)[-1]
    assert mode == "hellaswag" or QUESTIONS[mode] < 100, "a final line was expected"
    return last


def test_accuracy_from_the_records_equals_the_printed_score(task_sweep):
    _, _, doc, rows = task_sweep
    for mode in QUESTIONS:
        t = doc["tasks"][f"{mode}:cloze.{mode}"]
        assert t["questions"] == QUESTIONS[mode]
        for name, v in t["variants"].items():
            key = f"{mode}-{t['sha256'][:16]}"
            log = (Path(rows[name]["score_dir"]) / f"answers-{key}.log").read_text()
            shown = printed_score(mode, log)
            ours = 100 * v["right"] / v["questions"]
            assert f"{ours:.{len(shown.split('.')[1])}f}" == shown, (mode, name, ours, shown)
            assert len(t["answers"][name]) == QUESTIONS[mode]


def test_the_base_knows_the_text_and_radius_3_does_not(task_sweep):
    _, _, doc, _ = task_sweep
    t = doc["tasks"]["hellaswag:cloze.hellaswag"]["variants"]
    acc = {n: round(100 * v["accuracy"], 1) for n, v in t.items()}
    flips = {n: t[n]["vs_base"]["right_to_wrong"] for n in ("q4_0-r1", "q4_0-r2", "q4_0-r3")}
    print("cloze accuracy (%)", acc, "right->wrong against the base", flips)
    assert t["base"]["lo"] > 0.25 + 0.15           # clearly above chance (4 endings)
    assert t["q4_0-r3"]["lo"] <= 0.35              # near chance
    assert flips["q4_0-r1"] <= flips["q4_0-r2"] <= flips["q4_0-r3"] and flips["q4_0-r1"] < flips["q4_0-r3"]
    assert t["q4_0-r3"]["vs_base"]["p"] < 0.05 and t["q4_0-r3"]["vs_base"]["hi"] < 0


def test_answers_are_made_once_per_tensor_content(task_sweep):
    d, args, doc, rows = task_sweep
    assert rows["q4_0"]["score_dir"] == rows["q4_0-r0"]["score_dir"]  # radius 0 is stock Q4_0
    shared = Path(rows["q4_0"]["score_dir"])
    assert len(list(shared.glob("answers-*.json"))) == len(QUESTIONS)
    for mode in QUESTIONS:
        t = doc["tasks"][f"{mode}:cloze.{mode}"]
        assert t["answers"]["q4_0"] == t["answers"]["q4_0-r0"]
        assert t["variants"]["q4_0-r0"]["vs_reference"]["right_to_wrong"] == 0
    again = orchestrate(*args, cwd=d)
    assert again.returncode == 0 and "answer " not in again.stdout + again.stderr  # nothing answered again
    assert sum("--hellaswag" in c for c in rows["q4_0-r1"]["commands"]) == 1


def test_the_report_shows_the_answers(task_sweep):
    d, _, _, _ = task_sweep
    report = (d / "out" / "report.md").read_text()
    assert "## Task answers" in report and "### mc:cloze.mc" in report
    assert all((d / "out" / f"task-{i}.png").exists() for i in range(len(QUESTIONS)))


def test_a_question_too_long_for_the_context_is_an_error(fork, demo_base, tmp_path):
    long = " ".join(["word"] * 3000)
    (tmp_path / "long.txt").write_text(f"{long}\n0\na\nb\nc\nd\n")
    task = taskfiles.read("hellaswag", tmp_path / "long.txt")
    with pytest.raises(ToolError, match="does not fit in the context window"):
        perplexity.answer(fork, demo_base, task, perplexity.Scoring(tmp_path, 128, 0, 2),
                          tmp_path / "long.log", {})


def test_our_count_of_a_winogrande_file_is_llama_perplexitys(fork, demo_base, tmp_path):
    lines = ["index,sentence,option1,option2,answer", '1,"He said, _ went home.",John,Mary,1',
             "2,no blank here,John,Mary,2", "3,_ is here in the house.,A,B, +2", "4,_ is there.,A,B,3",
             "5,_ was last.,A,B,1"]
    (tmp_path / "w.csv").write_text("\n".join(lines) + "\n")
    task = taskfiles.read("winogrande", tmp_path / "w.csv")
    res = perplexity.answer(fork, demo_base, task, perplexity.Scoring(tmp_path, 128, 0, 2),
                            tmp_path / "w.log", {})  # (it checks the count against llama-perplexity's)
    assert res["questions"] == task.questions == 2
