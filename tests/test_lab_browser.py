"""JupyterLab in a real browser: the command `make lab` runs (its recipe, printed by `make -n`) serves the checkout on
127.0.0.1, the project's kernel (`trader`) is the default, and headless Chromium (Playwright) opens nbs/index.ipynb there
and sees the notebook's first heading rendered.

The server gets a random loopback port and a random token (JUPYTER_TOKEN), and private Jupyter config/data/runtime folders
with the `trader` kernelspec installed into them (as `make install` installs it into the venv), so neither the developer's
Jupyter settings nor the shared venv are touched. Needs Debian's Chromium at /usr/bin/chromium (`.ci/run` installs it):
without it the test is skipped locally and fails in CI (CI=true), as in tests/test_dashboard_browser.py.
"""
import json, os, re, secrets, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest
from conftest import free_port, tail
from test_dashboard_browser import CHROMIUM_ARGS, chromium

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_WAIT = 90.0

def lab_command(port:int) -> str:
    "The shell command of `make lab` (install taken as done: `-o install`), for this Python's venv and `port`."
    r = subprocess.run(['make', '--no-print-directory', '-n', '-o', 'install', 'lab', f'BIN={BIN}', f'LAB_PORT={port}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.replace('\\\n', ' ').strip()
    assert cmd.startswith(f'{BIN}/jupyter lab ') and '--ip=127.0.0.1' in cmd, cmd
    return cmd

def first_heading(nb:Path) -> str:
    "The text of the first markdown heading in a notebook."
    for c in json.loads(nb.read_text())['cells']:
        if c['cell_type'] != 'markdown': continue
        m = re.search(r'^#{1,6}\s+(.+)$', ''.join(c['source']), re.M)
        if m: return m[1].strip()
    raise AssertionError(f'{nb} has no markdown heading')

@pytest.fixture
def lab(spawn, tmp_path):
    "`make lab`'s JupyterLab on a free loopback port with a fresh token, once it answers: (base url, token)."
    jup, token, port = tmp_path/'jupyter', secrets.token_hex(16), free_port()
    r = subprocess.run([sys.executable, '-m', 'ipykernel', 'install', '--prefix', str(jup), '--name', 'trader',
                        '--display-name', 'Python (trader)'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, 'JUPYTER_TOKEN': token, 'JUPYTER_PATH': str(jup/'share'/'jupyter'), 'JUPYTER_CONFIG_DIR': str(jup/'config'),
           'JUPYTER_DATA_DIR': str(jup/'data'), 'JUPYTER_RUNTIME_DIR': str(jup/'runtime')}
    checkpoints = ROOT/'nbs'/'.ipynb_checkpoints'      # JupyterLab checkpoints a notebook it opens: leave none behind
    had_checkpoints = checkpoints.exists()
    p = spawn('bash', '-c', 'exec ' + lab_command(port), env=env, name=f'lab-{port}')
    base, end = f'http://127.0.0.1:{port}', time.monotonic() + START_WAIT
    while True:
        if p.poll() is not None: pytest.fail(f'jupyter lab exited ({p.returncode}):\n{tail(p.out)}')
        try:
            with urllib.request.urlopen(f'{base}/api/status?token={token}', timeout=2) as resp:
                if resp.status == 200: break
        except OSError: pass
        if time.monotonic() > end: pytest.fail(f'jupyter lab did not answer on 127.0.0.1:{port} within {START_WAIT:g}s:\n{tail(p.out)}')
        time.sleep(0.3)
    try: yield base, token
    finally:      # the fixture `spawn` stops the server and its kernels
        if not had_checkpoints: shutil.rmtree(checkpoints, ignore_errors=True)

def test_lab_opens_index_with_the_project_kernel(lab, tmp_path):
    exe = chromium()
    base, token = lab
    port = int(base.rsplit(':', 1)[1])
    with pytest.raises(OSError): socket.create_connection(('127.0.0.2', port), timeout=1).close()   # loopback 127.0.0.1 only
    with urllib.request.urlopen(f'{base}/api/kernelspecs?token={token}', timeout=10) as resp: specs = json.load(resp)
    assert specs['default'] == 'trader' and 'trader' in specs['kernelspecs'], specs
    try:
        with urllib.request.urlopen(f'{base}/api/contents/nbs/index.ipynb', timeout=10): pass
        pytest.fail('the server answered without the token')
    except urllib.error.HTTPError as e: assert e.code == 403, e.code
    want = first_heading(ROOT/'nbs'/'index.ipynb')
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            ctx = b.new_context(viewport={'width': 1400, 'height': 1000})
            ctx.route(lambda url: not url.startswith(base), lambda route: route.abort())   # nothing but this server
            page = ctx.new_page()
            page.goto(f'{base}/lab/tree/nbs/index.ipynb?token={token}', timeout=60_000)
            h = page.locator('.jp-NotebookPanel .jp-RenderedMarkdown h1').first
            h.wait_for(timeout=60_000)
            assert h.inner_text().replace('¶', '').strip() == want
            page.screenshot(path=str(tmp_path/'lab-index.png'))
        finally: b.close()
