"""Every notebook in a real JupyterLab, in headless Chromium: run it, move its main widget, see the output change.

How it works:
- One JupyterLab server per test session, on 127.0.0.1 with a random token, serving a temporary copy
  of notebooks/ (the files on disk are never touched; JupyterLab's settings and workspaces also live
  in the temporary folder). Debian's Chromium is driven by playwright (`executable_path=/usr/bin/chromium`).
- Each notebook opens in its own tab and kernel. To keep CI short, the test runs the notebook's cells
  in order up to and through its first widget cell (the first cell that builds an ipywidgets control,
  e.g. `interact(...)` or `widgets.IntSlider(...)`), not the cells after it: the rest of each
  notebook (training included) is executed by nbval in the notebook tests.
- A kernel error (an "error" output in any executed cell), a widget that fails to render ("Error
  displaying widget", or no `.jupyter-widgets` element in the widget cell's output) fails the test.
- Then the first control in that cell's output is operated as a learner would: a slider moved with
  the arrow keys, a dropdown set to another option, a toggle button or checkbox clicked. The test
  waits for the kernel and checks that the rendered output of the notebook (image bytes, text)
  changed. Screenshots before and after go to test-artifacts/browser/.

The kernels see QLORA_LAB_BROWSER_TEST=1: a notebook whose widget sits behind a long computation may
use it to pick smaller settings (and must say so in its first cell, per the notebook style).

Without Chromium the test is skipped locally and fails in CI (CI=true). Set QLORA_LAB_NOTEBOOK_DIR to
check another copy of the course.
"""
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = Path(os.environ.get("QLORA_LAB_NOTEBOOK_DIR", REPO / "notebooks"))
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# A cell builds a widget when it calls interact/interactive, constructs an ipywidgets control, or
# calls a package helper named *_widget(...) (e.g. qlora_lab.planner.planner_widget()).
WIDGET_CELL = re.compile(r"\binteract(ive)?(_manual|_output)?\s*\(|\bwidgets\.[A-Z]\w*\s*\(|\b\w+_widget\s*\(")
SERVER_START_S = 120
CELL_TIMEOUT_S = 600  # one notebook's cells up to its widget, on a busy 2-core machine
WIDGET_TIMEOUT_S = 120


def _widget_cell_index(path: Path) -> int:
    """Index of the first code cell that builds a widget (ValueError when the notebook has none)."""
    cells = nbformat.read(path, as_version=4).cells
    for index, cell in enumerate(cells):
        if cell.cell_type == "code" and WIDGET_CELL.search(cell.source):
            return index
    raise ValueError(f"{path.name}: no cell builds an ipywidgets control (interact(...), widgets.X(...), "
                     "or a *_widget(...) helper)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _need_chromium():
    if CHROMIUM.is_file():
        return
    reason = f"{CHROMIUM} not found: apt-get install chromium (scripts/test.sh does it as root)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """A JupyterLab server over a temporary copy of the notebooks: yields (base_url, token)."""
    _need_chromium()
    root = tmp_path_factory.mktemp("lab")
    course = root / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, course, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", QLORA_LAB_BROWSER_TEST="1",
               JUPYTER_RUNTIME_DIR=str(root / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(root / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(root / "workspaces"))
    notification = root / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env.pop("MPLBACKEND", None)  # the kernel must use the inline backend so plots reach the page
    log = open(root / "jupyter.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("jupyter")), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={course}", "--ServerApp.allow_root=True",
         "--ServerApp.terminals_enabled=False",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=course, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {server.returncode}:\n{(root / 'jupyter.log').read_text()}")
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not answer within {SERVER_START_S} s") from None
                time.sleep(0.5)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="session")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


# JavaScript run in the page. `window.jupyterapp` is the JupyterLab application (expose_app_in_browser).
JS_NOTEBOOK_READY = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!w || !w.content || !w.sessionContext || !w.sessionContext.session) return false;
  const k = w.sessionContext.session.kernel;
  return !!k && k.status === 'idle' && w.content.widgets.length > 0;
}"""
# Started, not awaited: the test polls the cells' state with its own timeout instead.
JS_RUN_THROUGH = """(index) => {
  const app = window.jupyterapp, nb = app.shell.currentWidget;
  nb.content.activeCellIndex = index;
  app.commands.execute('notebook:run-all-above').then(() => {
    nb.content.activeCellIndex = index;
    return app.commands.execute('notebook:run-cell');
  });
  return true;
}"""
JS_STATE = """(index) => {
  const nb = window.jupyterapp.shell.currentWidget;
  const kernel = nb.sessionContext.session.kernel;
  const cells = [];
  for (let i = 0; i <= index; i++) {
    const model = nb.content.widgets[i].model;
    if (model.type !== 'code') continue;
    const outputs = model.outputs.toJSON();
    cells.push({index: i, count: model.executionCount,
                errors: outputs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)});
  }
  return {kernel: kernel ? kernel.status : 'none', cells};
}"""
# What the learner sees as results: rendered outputs (images, text, HTML) anywhere in the notebook,
# hashed so a change of one pixel of a plot counts.
JS_SIGNATURE = """() => {
  const parts = [];
  window.jupyterapp.shell.currentWidget.node.querySelectorAll('.jp-OutputArea-output').forEach(el => {
    el.querySelectorAll('img').forEach(img => parts.push(img.src));
    el.querySelectorAll('.jp-RenderedText, .jp-RenderedHTMLCommon, svg').forEach(r => parts.push(r.outerHTML));
  });
  return parts.join('\\n');
}"""


# Errors raised inside a widget's callback land in its Output widget, not in the cell's own outputs.
JS_WIDGET_TRACEBACKS = """() => Array.from(window.jupyterapp.shell.currentWidget.node.querySelectorAll(
  '.widget-output .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
  .map(el => el.innerText).filter(text => text.includes('Traceback'))"""
SETTLED_S = 2.0


def _wait_settled(page, timeout_s):
    """The rendered output once it has stopped changing for SETTLED_S seconds (a plot drawn after a
    print arrives later than the print)."""
    deadline = time.monotonic() + timeout_s
    last, since = page.evaluate(JS_SIGNATURE), time.monotonic()
    while time.monotonic() - since < SETTLED_S:
        assert time.monotonic() < deadline, f"the output kept changing for {timeout_s} s"
        page.wait_for_timeout(250)
        now = page.evaluate(JS_SIGNATURE)
        if now != last:
            last, since = now, time.monotonic()
    return last


def _wait_for(page, predicate_js, arg=None, timeout_s=60.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if page.evaluate(predicate_js, arg) if arg is not None else page.evaluate(predicate_js):
            return
        page.wait_for_timeout(250)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _wait_until_executed(page, index, timeout_s):
    """Wait until every code cell up to index has run and the kernel is idle; return the state."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = page.evaluate(JS_STATE, index)
        errors = [f"cell {c['index']}: {e}" for c in state["cells"] for e in c["errors"]]
        assert not errors, "kernel error: " + "; ".join(errors)
        if state["kernel"] == "idle" and all(c["count"] is not None for c in state["cells"]):
            return state
        assert state["kernel"] not in ("dead", "none"), f"kernel is {state['kernel']}"
        assert time.monotonic() < deadline, f"cells up to {index} not done within {timeout_s} s: {state}"
        page.wait_for_timeout(500)


def _operate(control):
    """Change the value of one ipywidgets control as a learner would; return what was done."""
    slider = control.locator(".noUi-handle").first
    if control.locator(".noUi-handle").count():
        readout = control.locator(".widget-readout").first
        before = readout.inner_text() if readout.count() else None
        slider.focus()
        slider.press("ArrowRight")
        if readout.count() and readout.inner_text() == before:  # already at its maximum
            slider.press("ArrowLeft")
            slider.press("ArrowLeft")
        return f"moved slider {before!r} -> {readout.inner_text() if readout.count() else '?'}"
    select = control.locator("select").first
    if control.locator("select").count():
        options = select.locator("option")
        current = select.input_value()
        values = [options.nth(i).get_attribute("value") for i in range(options.count())]
        other = next(v for v in values if v != current)
        select.select_option(other)
        return f"set dropdown {current!r} -> {other!r}"
    toggles = control.locator(".widget-toggle-button, .jupyter-button")
    if toggles.count():
        target = toggles.nth(1) if toggles.count() > 1 else toggles.first
        target.click()
        return f"clicked button {target.inner_text()!r}"
    checkbox = control.locator("input[type=checkbox]")
    if checkbox.count():
        checkbox.first.click()
        return "clicked checkbox"
    raise AssertionError("no slider, dropdown, button or checkbox found in the widget output")


CONTROLS = (".widget-slider, .widget-hslider, .widget-dropdown, .widget-toggle-buttons, .widget-button, "
            ".widget-checkbox, .widget-radio")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_widget_in_browser(path, lab, browser):
    base, token = lab
    index = _widget_cell_index(path)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    console_errors = []
    page.on("pageerror", lambda err: console_errors.append(str(err)))
    try:
        started = time.monotonic()
        # A workspace of its own, reset, so no tab of an earlier notebook is restored beside it.
        page.goto(f"{base}/lab/workspaces/{path.stem}/tree/{path.name}?reset&token={token}",
                  wait_until="domcontentloaded")
        _wait_for(page, JS_NOTEBOOK_READY, timeout_s=180, what="the notebook and an idle kernel")
        page.evaluate(JS_RUN_THROUGH, index)
        _wait_until_executed(page, index, CELL_TIMEOUT_S)
        notebook = page.locator(".jp-NotebookPanel:visible .jp-Notebook")
        cell = notebook.locator(".jp-Cell").nth(index)
        cell.scroll_into_view_if_needed()
        output = cell.locator(".jp-OutputArea")
        widget = output.locator(".jupyter-widgets").first
        try:
            widget.wait_for(state="visible", timeout=WIDGET_TIMEOUT_S * 1000)
        except Exception:
            raise AssertionError(f"{path.name}: cell {index} shows no rendered widget (.jupyter-widgets)") from None
        assert "Error displaying widget" not in notebook.inner_text(), (
            f"{path.name}: 'Error displaying widget' on the page")
        before = _wait_settled(page, WIDGET_TIMEOUT_S)  # let an interact's first draw land
        cell.screenshot(path=str(ARTIFACTS / f"{path.stem}_before.png"))
        assert not page.evaluate(JS_WIDGET_TRACEBACKS), f"{path.name}: the widget's first draw raised"
        control = output.locator(CONTROLS).first
        assert control.count(), f"{path.name}: cell {index} has a widget but no control to operate"
        action = _operate(control)
        deadline = time.monotonic() + WIDGET_TIMEOUT_S
        while page.evaluate(JS_SIGNATURE) == before:
            assert time.monotonic() < deadline, f"{path.name}: {action}, but no output changed in {WIDGET_TIMEOUT_S} s"
            page.wait_for_timeout(250)
        _wait_until_executed(page, index, WIDGET_TIMEOUT_S)
        after = _wait_settled(page, WIDGET_TIMEOUT_S)
        cell.screenshot(path=str(ARTIFACTS / f"{path.stem}_after.png"))
        assert "Error displaying widget" not in notebook.inner_text()
        tracebacks = page.evaluate(JS_WIDGET_TRACEBACKS)
        assert not tracebacks, f"{path.name}: the widget's callback raised: {tracebacks[0][:2000]}"
        assert after != before, f"{path.name}: {action}, but once the kernel settled the output was as before"
        (ARTIFACTS / f"{path.stem}.json").write_text(json.dumps({
            "notebook": path.name, "widget_cell": index, "action": action,
            "seconds": round(time.monotonic() - started, 1),
            "images_in_widget_cell_after": output.locator("img").count(),
            "output_before_sha256": hashlib.sha256(before.encode()).hexdigest(),
            "output_after_sha256": hashlib.sha256(after.encode()).hexdigest(),
            "page_errors": console_errors}, indent=2))
    except BaseException:
        with contextlib.suppress(Exception):  # the failure itself matters more than its picture
            page.screenshot(path=str(ARTIFACTS / f"{path.stem}_failure.png"), full_page=True)
        raise
    finally:
        _shutdown_kernels(base, token)
        context.close()


def _shutdown_kernels(base, token):
    """Stop every kernel of the server so notebooks don't pile up in memory."""
    headers = {"Authorization": f"token {token}"}
    with urllib.request.urlopen(urllib.request.Request(f"{base}/api/kernels", headers=headers), timeout=10) as r:
        kernels = json.load(r)
    for kernel in kernels:
        request = urllib.request.Request(f"{base}/api/kernels/{kernel['id']}", method="DELETE", headers=headers)
        urllib.request.urlopen(request, timeout=30).read()
