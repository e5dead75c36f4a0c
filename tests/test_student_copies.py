"""scripts/make_student_copies.py: the handout keeps the exercises and loses the answers."""
import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((REPO / "notebooks" / "solutions").glob("*_solutions.ipynb"))
_spec = importlib.util.spec_from_file_location("make_student_copies", REPO / "scripts" / "make_student_copies.py")
msc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(msc)

BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research."
         "google.com/github/qlora-lab/qlora-lab/blob/main/notebooks/solutions/99_toy_solutions.ipynb)")
CHECKER = """\
from qlora_lab.exercises import Feedback, not_attempted
def check(answer, want):
    return not_attempted("answer") if answer is None else Feedback(answer == want, f"got {answer}")"""


def _toy_solutions():
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    solution = {"tags": ["solution"]}
    code = nbformat.v4.new_code_cell("print('ran')")
    code.outputs = [nbformat.v4.new_output("stream", text="ran\n")]
    code.execution_count = 3
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# 99 · Toy: solutions\n\n{BADGE}"),
        code,
        nbformat.v4.new_code_cell(CHECKER),
        nbformat.v4.new_markdown_cell("## Check yourself"),
        nbformat.v4.new_code_cell("secret = 6 * 7\nanswer = secret  # the answer", metadata=solution),
        nbformat.v4.new_code_cell("fb = check(answer, 42)\ndisplay(fb)\nassert fb.ok, fb.message"),
        nbformat.v4.new_code_cell(
            '@staticmethod\ndef double(x: int) -> int:\n    """Twice x."""\n    return x + x\n\nanswer_fn = double',
            metadata=solution),
        nbformat.v4.new_code_cell("fb2 = check(answer_fn, None)\nassert fb2.ok, (\n    fb2.message)\nprint('end')"),
        nbformat.v4.new_markdown_cell("Because 6 times 7 is 42.", metadata=solution),
    ]
    return nb


def test_stub_keeps_signatures_and_answer_names():
    stub = msc.stub_code('def f(a, *, b=2):\n    """Doc."""\n    return a + b\n\nanswer = f\nhelper = 3')
    assert stub.startswith("# your code here")
    assert 'def f(a, *, b=2):\n    """Doc."""\n    ...  # your code here' in stub
    assert "answer = None  # once f works: answer = f" in stub
    assert "return a + b" not in stub and "helper" not in stub
    assert msc.stub_code("%time answer = 3") == "# your code here\nanswer = None"


def test_drop_ok_asserts_displays_feedback_once():
    assert msc.drop_ok_asserts("fb = c(a)\ndisplay(fb)\nassert fb.ok, fb.message") == "fb = c(a)\ndisplay(fb)\n"
    assert msc.drop_ok_asserts("fb = c(a)\nassert fb.ok\nx = 1") == "fb = c(a)\ndisplay(fb)\nx = 1\n"
    assert msc.drop_ok_asserts("assert x > 0") == "assert x > 0"  # other asserts stay


def test_toy_notebook_copy(tmp_path):
    toy = _toy_solutions()
    before = nbformat.writes(toy)
    copy = msc.student_copy(toy)
    assert nbformat.writes(toy) == before, "the solutions notebook must not change"
    head, code, _, _, first, check1, second, check2, prose = copy.cells
    assert "notebooks/99_toy.ipynb)" in head.source and "solutions" not in head.source.split("\n")[2]
    assert head.source.startswith("# 99 · Toy: exercises")
    assert code.outputs == [] and code.execution_count is None
    assert first.source == "# your code here\nanswer = None\n" and first.metadata.tags == ["exercise"]
    assert "6 * 7" not in first.source and "return x + x" not in second.source
    assert "def double(x: int) -> int:" in second.source and "answer_fn = None" in second.source
    assert "assert" not in check1.source + check2.source and "display(fb2)" in check2.source
    assert prose.source == "_Your answer here._"
    # The handout runs top to bottom and says "not attempted yet" instead of failing.
    path = tmp_path / "toy.ipynb"
    nbformat.write(copy, path)
    executed = nbformat.read(path, as_version=4)
    executed = NotebookClient(executed, timeout=120, kernel_name="python3",
                              resources={"metadata": {"path": str(tmp_path)}}).execute()
    shown = [o for o in executed.cells[5].outputs if o.output_type == "display_data"]
    assert "Fill in answer" in shown[0]["data"]["text/plain"]


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_real_solutions_lose_their_answers(path):
    solutions = nbformat.read(path, as_version=4)
    copy = msc.student_copy(solutions)
    answered = [c for c in solutions.cells if "solution" in c.metadata.get("tags", [])]
    stubs = [c for c in copy.cells if "exercise" in c.metadata.get("tags", [])]
    assert answered and len(stubs) == len(answered)
    assert not any("solution" in c.metadata.get("tags", []) for c in copy.cells)
    for answer, stub in zip(answered, stubs):
        if answer.cell_type == "code":
            assert stub.source.startswith("# your code here")
            if "answer" in answer.source:
                assert "answer = None" in stub.source
            solved = {line.strip() for line in answer.source.splitlines()
                      if line.strip() and not line.lstrip().startswith(("def ", "#", '"""', "@"))}
            assert not solved & {line.strip() for line in stub.source.splitlines()}, "a solution line survived"
    code = "\n".join(c.source for c in copy.cells if c.cell_type == "code")
    assert "assert fb.ok" not in code
    assert "notebooks/solutions/" not in copy.cells[0].source


def test_cli_writes_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    source = tmp_path / "solutions"
    source.mkdir()
    nbformat.write(_toy_solutions(), source / "99_toy_solutions.ipynb")
    out = tmp_path / "handout"
    assert msc.main(["--source", str(source), "--out", str(out)]) == 0
    target = out / "99_toy_exercises.ipynb"
    assert target.is_file() and str(target) in capsys.readouterr().out
    target.write_text("the learner's own work")
    assert msc.main(["--source", str(source), "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err and target.read_text() == "the learner's own work"
    assert msc.main(["--source", str(source), "--out", str(out), "--force"]) == 0
    assert nbformat.read(target, as_version=4).cells[0].source.startswith("# 99 · Toy: exercises")
    # The default handout folder belongs to the script: it is refreshed without --force.
    monkeypatch.setattr(msc, "DEFAULT_OUT", out)
    target.write_text("stale")
    assert msc.main(["--source", str(source), "--out", str(out)]) == 0
    assert msc.main(["--source", str(tmp_path / "nowhere")]) == 1
    assert msc.main(["--source", str(source), "--out", str(source), "--force"]) == 1
