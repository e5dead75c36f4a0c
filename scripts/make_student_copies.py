"""Make the handout: each solutions notebook with its answers taken out.

    python scripts/make_student_copies.py                  # -> build/student/NN_name_exercises.ipynb
    python scripts/make_student_copies.py --out handout/   # elsewhere: refuses to overwrite without --force

For every notebooks/solutions/NN_name_solutions.ipynb:
- each code cell tagged "solution" becomes a stub: `# your code here`, the signatures of the functions
  it defined (body `...`), and its answer variables set to None (`answer = None`), so the checker
  cell after it says "not attempted yet" instead of failing; the tag becomes "exercise";
- a markdown cell tagged "solution" becomes "_Your answer here._";
- `assert fb.ok, ...` lines are dropped (the learner's first run is meant to be not yet right) and
  the feedback is displayed instead;
- outputs and execution counts are cleared; the title says "exercises" and the Colab badge points at
  the lesson notebook (notebooks/NN_name.ipynb), never at the solutions.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO / "notebooks" / "solutions"
DEFAULT_OUT = REPO / "build" / "student"
STUB = "# your code here"
MARKDOWN_STUB = "_Your answer here._"
ANSWER_NAME = re.compile(r"answer\w*")


def stub_code(source: str) -> str:
    """The stub for one solution cell: function signatures kept, answer variables set to None."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        names = sorted(set(re.findall(r"^(?:%\w+\s+)?(answer\w*)\s*=", source, flags=re.M)))
        return "\n".join([STUB, *(f"{name} = None" for name in names)])
    functions = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    out = [STUB]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ANSWER_NAME.fullmatch(node.name):
            # A function that is the answer: its signature as a hint, the name None until written.
            out += [*(f"# {line}" for line in _signature(node).splitlines()), f"{node.name} = None"]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out += ["", _signature(node), ""]
        for name, value in _answer_assignments(node):
            hint = f"  # once {value.id} works: {name} = {value.id}" if isinstance(value, ast.Name) \
                and value.id in functions else ""
            out.append(f"{name} = None{hint}")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def _signature(node) -> str:
    """A function's decorators, signature and docstring, with `...` for its body."""
    docstring = node.body[:1] if ast.get_docstring(node, clean=False) is not None else []
    shell = type(node)(name=node.name, args=node.args, body=[*docstring, ast.Expr(ast.Constant(...))],
                       decorator_list=node.decorator_list, returns=node.returns, type_params=[])
    text = ast.unparse(ast.fix_missing_locations(shell))
    return text.removesuffix("...") + f"...  {STUB}"


def _answer_assignments(node):
    """(name, value) of top-level assignments to answer-like names in one statement."""
    if isinstance(node, ast.Assign):
        targets, value = node.targets, node.value
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        targets, value = [node.target], node.value
    else:
        return []
    return [(t.id, value) for t in targets if isinstance(t, ast.Name) and ANSWER_NAME.fullmatch(t.id)]


def drop_ok_asserts(source: str) -> str:
    """Remove top-level `assert X.ok ...` statements; display X instead when the cell doesn't already."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    lines = source.splitlines()
    asserts = [n for n in tree.body if isinstance(n, ast.Assert) and isinstance(n.test, ast.Attribute)
               and n.test.attr == "ok" and isinstance(n.test.value, ast.Name)]
    if not asserts:
        return source
    for node in reversed(asserts):
        name = node.test.value.id
        shown = re.search(rf"^\s*(display\(\s*{name}\s*\)|{name})\s*$", source, flags=re.M)
        lines[node.lineno - 1:node.end_lineno] = [] if shown else [f"display({name})"]
    return "\n".join(lines).rstrip() + "\n"


def student_copy(nb):
    """A student copy of a solutions notebook (a new NotebookNode; the input is left as it was)."""
    copy = nbformat.from_dict(nb)
    copy = nbformat.reads(nbformat.writes(copy), as_version=4)  # deep copy
    for cell in copy.cells:
        tags = cell.metadata.get("tags", [])
        if "solution" in tags:
            cell.source = stub_code(cell.source) if cell.cell_type == "code" else MARKDOWN_STUB
            cell.metadata["tags"] = ["exercise" if t == "solution" else t for t in tags]
        elif cell.cell_type == "code":
            cell.source = drop_ok_asserts(cell.source)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    if copy.cells and copy.cells[0].cell_type == "markdown":
        head = copy.cells[0]
        head.source = re.sub(r"notebooks/solutions/(\w+)_solutions\.ipynb", r"notebooks/\1.ipynb", head.source)
        head.source = re.sub(r"^(#[^\n]*?):? solutions[ \t]*$", r"\1: exercises", head.source, count=1, flags=re.M)
    return copy


def student_name(path: Path) -> str:
    """NN_name_solutions.ipynb -> NN_name_exercises.ipynb"""
    stem = path.stem.removesuffix("_solutions")
    return f"{stem}_exercises.ipynb"


def make_copies(source: Path, out: Path, force: bool = False) -> list[Path]:
    """Write a student copy of every *_solutions.ipynb under source into out; return the written paths.

    Files already in out are replaced only when out is the default handout folder or force is set."""
    solutions = sorted(Path(source).glob("*_solutions.ipynb"))
    if not solutions:
        raise FileNotFoundError(f"no *_solutions.ipynb in {source}")
    out = Path(out)
    targets = [out / student_name(p) for p in solutions]
    ours = out.resolve() == DEFAULT_OUT.resolve()
    clashes = [t for t in targets if t.exists()] if not (ours or force) else []
    if clashes:
        raise FileExistsError(f"would overwrite {', '.join(map(str, clashes))}; pass --force to replace them")
    if out.resolve() == Path(source).resolve():
        raise ValueError("--out must not be the solutions folder itself")
    out.mkdir(parents=True, exist_ok=True)
    for path, target in zip(solutions, targets):
        nbformat.write(student_copy(nbformat.read(path, as_version=4)), target)
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder of *_solutions.ipynb")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="handout folder (default build/student)")
    parser.add_argument("--force", action="store_true", help="replace existing files outside build/student")
    args = parser.parse_args(argv)
    try:
        written = make_copies(args.source, args.out, args.force)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
