"""scripts/make_figures.py draws every README figure, and the committed copies are all there."""
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_figures", REPO / "scripts" / "make_figures.py")
make_figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_figures)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_draws_every_figure(tmp_path):
    written = make_figures.make_figures(tmp_path)
    assert [p.name for p in written] == list(make_figures.FIGURES)
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, f"{path.name} is not a drawn PNG"
        assert b"Matplotlib version" not in data, "PNG metadata must not carry the software version"


def test_committed_figures_match_the_script_and_the_readme():
    committed = sorted(p.name for p in (REPO / "docs" / "figures").glob("*.png"))
    assert committed == sorted(make_figures.FIGURES), "rerun scripts/make_figures.py and commit docs/figures/"
    shown = re.findall(r"!\[[^\]]*\]\(docs/figures/([^)]+)\)", (REPO / "README.md").read_text())
    assert sorted(shown) == committed, "the README shows every committed figure once"
