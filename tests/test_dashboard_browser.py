"""The dashboard in a real browser: `trader dashboard` (Voila) driven by headless Chromium through Playwright.

* read-only: the KPI tiles show the store's figures, the P&L figure is drawn with data, the gate light is shown and the
  controls are disabled;
* control mode (`--control`): the kill switch pressed on the page halts a running paper replay at its next bar, and the
  page then says so (the replay is slow enough that only a hang lets it finish before the switch is pressed; the test stops
  it at its end);
* the equity chart draws the run's baselines, labelled (buy-and-hold computed from the bars for a paper run, and the
  crossover its model's backtest chose), and the report links work: a click on the daily gate's link opens it (200),
  its PDF is served as a PDF; the reports route serves nothing else (`test_reports_route_is_read_only`, no browser).

Screenshots go to reports/dashboard-readonly.png and reports/dashboard-control.png (and the test's temporary folder).
Needs Debian's Chromium at /usr/bin/chromium (`apt-get install chromium chromium-driver`; `.ci/run` installs it):
without it the tests are skipped locally and fail in CI (CI=true). Playwright's own browser download is not used.
Everything listens on loopback ports picked at random; the browser is not allowed to fetch anything else.
"""
import json, os, re, socket, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path
import pytest
from conftest import free_port, hang_guard, stop, tail

ROOT = Path(__file__).resolve().parents[1]
TRADER = str(Path(sys.executable).parent/'trader')
CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
                 '--disable-sync', '--no-first-run', '--disable-quic']
FAST = '[train]\nn_steps = 128\nbatch_size = 64\nn_epochs = 2\ncheckpoint_every = 0\n'
REPLAY = '2012-01-03:2012-03-30'                       # the finished run the read-only page shows
# waits, each a guard against a hang (tests/conftest.py): what they wait for takes a fraction of that on an idle machine
START_WAIT = hang_guard(6)      # the paper replay's first committed bar
PAGE_WAIT = hang_guard(15)      # the dashboard listening; then the page drawn (Voila starts a kernel and executes the notebook)
SELECT_WAIT = hang_guard(2)     # the page showing the run chosen in its selector
HALT_WAIT = hang_guard(5)       # the run halted after the kill switch was pressed (its next bar), the page saying so (its next refresh)
# ~189 bars at 0.4 bars/s: ~470 s, longer than all the waits before the kill switch is pressed put together, so only a hang
# lets the replay finish first; the test stops it at its end
LIVE_REPLAY, LIVE_SPEED = '2012-04-02:2012-12-31', 0.4
assert 180/LIVE_SPEED > START_WAIT + 2*PAGE_WAIT + SELECT_WAIT
# the smallest valid PDF (one empty page), written beside a gate report where the report step did not write its own
MINIMAL_PDF = (b'%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj 2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj '
               b'3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n')
HINT = "install Debian's Chromium with `apt-get install chromium chromium-driver` (provides /usr/bin/chromium)"

def chromium() -> str:
    "Path of Debian's Chromium and a working Playwright; a missing one skips the test locally and fails it in CI."
    ci = os.environ.get('CI') == 'true'
    if not os.access(CHROMIUM, os.X_OK):
        if ci: pytest.fail(f"{CHROMIUM} is required in CI but was not found; the CI entry point (.ci/run) installs the Debian packages `chromium chromium-driver`", pytrace=False)
        pytest.skip(f"{CHROMIUM} not found; {HINT}")
    try: import playwright.sync_api  # noqa: F401
    except ImportError:
        if ci: pytest.fail("the Python package `playwright` is required in CI but is not installed (dev requirements)", pytrace=False)
        pytest.skip("the Python package `playwright` is not installed: `pip install playwright` (its browser download is not needed)")
    return CHROMIUM

def trader_env(home:Path, **extra) -> dict:
    return {**os.environ, 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(home/'trader.toml'),
            'TRADER_REPORTS': str(home/'reports'), 'NUMBA_CACHE_DIR': os.environ.get('NUMBA_CACHE_DIR', str(ROOT/'.cache'/'numba')), **extra}

def trader(home:Path, *args) -> subprocess.CompletedProcess:
    r = subprocess.run([TRADER, *args], capture_output=True, text=True, env=trader_env(home), timeout=300, cwd=ROOT)
    assert r.returncode == 0, f'trader {" ".join(args)}: {r.stdout}\n{r.stderr}'
    return r

def open_store(home:Path):
    from trader.core.store import Store
    return Store(f'sqlite:///{home}/trader.db')

WHOLE_PAGE = '''() => { let h = document.documentElement.scrollHeight;
  for (const e of document.querySelectorAll('*')) {   // Voila's page scrolls inside a container, not the document
    if (e.scrollHeight > e.clientHeight + 1 && /auto|scroll/.test(getComputedStyle(e).overflowY)) {
      e.scrollTop = 0; h = Math.max(h, e.getBoundingClientRect().top + e.scrollHeight); } }
  return Math.ceil(h); }'''

def save_shot(page, tmp:Path, name:str) -> Path:
    "The whole page: the viewport is made as tall as the content (a full-page screenshot only sees the document)."
    (ROOT/'reports').mkdir(exist_ok=True)
    h = page.evaluate(WHOLE_PAGE)
    if h + 20 > page.viewport_size['height']:
        page.set_viewport_size({'width': page.viewport_size['width'], 'height': min(h + 20, 6000)})
    wait_plot(page, None, 15)     # the figure drawn across the page (again, after a resize)
    page.screenshot(path=str(tmp/name), full_page=True)
    page.screenshot(path=str(ROOT/'reports'/name), full_page=True)
    return ROOT/'reports'/name

@pytest.fixture(scope='module')
def browser():
    "Debian's Chromium, headless, through Playwright (checked first: without it nothing else is prepared)."
    exe = chromium()
    from playwright.sync_api import sync_playwright
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try: yield b
        finally: b.close()
    finally: pw.stop()

@pytest.fixture(scope='module')
def home(browser, tmp_path_factory) -> Path:
    "A store with the sample bars, a small champion model and one finished paper replay."
    h = tmp_path_factory.mktemp('dashboard-home')
    (h/'trader.toml').write_text(FAST)
    trader(h, 'ingest', '--source', 'sample', '--symbols', 'AAPL,MSFT', '-q')
    out = trader(h, 'train', '--symbols', 'AAPL,MSFT', '--steps', '512', '-q').stdout
    m = re.search(r'registered (\S+):', out); assert m, out
    trader(h, 'models', 'champion', m.group(1))
    trader(h, 'backtest', '--model', 'champion')      # the validation window: the crossover it chooses is the paper run's baseline
    trader(h, 'paper', '--broker', 'sim', '--model', 'champion', '--replay', REPLAY, '--speed', 'max', '-q')
    store = open_store(h)
    try:
        from trader.core.runs import Runs
        rid = Runs(store).latest('paper')
    finally: store.close()
    r = subprocess.run([TRADER, 'gate', '--run', rid], capture_output=True, text=True, env=trader_env(h), timeout=300, cwd=ROOT)
    assert r.returncode in (0, 3), f'trader gate: {r.stdout}\n{r.stderr}'     # RED (3) is a verdict, not a failure
    html = max((h/'reports'/'gates').glob('*.html'))
    if not html.with_suffix('.pdf').exists(): html.with_suffix('.pdf').write_bytes(MINIMAL_PDF)
    return h

@pytest.fixture
def page(browser, tmp_path):
    "A page that may only talk to 127.0.0.1 (Voila's template links a web font from a CDN: refused, not looked up)."
    ctx = browser.new_context(viewport={'width': 1400, 'height': 1900})   # the whole page, so screenshots need no resize
    ctx.route(lambda url: not url.startswith('http://127.0.0.1:'), lambda route: route.abort())
    pg = ctx.new_page()
    pg.errors = []
    pg.on('pageerror', lambda e: pg.errors.append(str(e)))
    try: yield pg
    finally: ctx.close()

def dashboard(spawn, home:Path, control:bool=False):
    "`trader dashboard` on a free loopback port, once it accepts connections: (process, url)."
    port = free_port()
    p = spawn(TRADER, 'dashboard', '--port', str(port), *(['--control'] if control else []), env=trader_env(home), name=f'dashboard-{port}')
    end = time.monotonic() + PAGE_WAIT
    while True:
        if p.poll() is not None: pytest.fail(f'trader dashboard exited ({p.returncode}):\n{tail(p.out)}')
        try:
            with socket.create_connection(('127.0.0.1', port), timeout=1): break
        except OSError: pass
        if time.monotonic() > end: pytest.fail(f'trader dashboard did not listen on 127.0.0.1:{port} within {PAGE_WAIT:g}s:\n{tail(p.out)}')
        time.sleep(0.2)
    return p, f'http://127.0.0.1:{port}/'

PLOT_STATE = '''() => { const e = document.querySelector('.js-plotly-plot');
  if (!e || !e.data) return null;
  const svg = e.querySelector('.main-svg');
  return {traces: e.data.length, points: e.data.map(d => (d.x || []).length), dd_points: e.data.length > 3 ? (e.data[3].y || []).length : 0,
          paths: [...e.querySelectorAll('.scatterlayer .trace .lines path')].map(l => (l.getAttribute('d') || '').length),
          width: svg ? Math.round(svg.getBoundingClientRect().width) : 0, box: Math.round(e.parentElement.getBoundingClientRect().width)}; }'''
# drawn: the four traces, equity and drawdown with `n` points (any if null) and their lines on the page, across the page
# (not at plotly's default 700 px, which is what a figure drawn before its container was laid out keeps)
PLOT_DRAWN = '''n => { const s = (''' + PLOT_STATE + ''')();
  return !!s && s.traces === 4 && s.points[0] > 0 && (n === null || (s.points[0] === n && s.dd_points === n))
         && s.paths.length >= 2 && s.paths.every(d => d > 20) && s.width >= 0.9*s.box; }'''

BASELINES_DRAWN = '''n => { const e = document.querySelector('.js-plotly-plot');
  return !!e && !!e.data && [1, 2].every(k => e.data[k].visible !== false && (e.data[k].x || []).length === n); }'''

def wait_plot(page, n:int|None, timeout:float):
    try: page.wait_for_function(PLOT_DRAWN, arg=n, timeout=timeout*1000)
    except Exception as e:
        pytest.fail(f'the P&L figure was not drawn ({type(e).__name__}; expected {n} points): {page.evaluate(PLOT_STATE)}')

def load(page, url:str, proc, n_points:int|None=None):
    "Open the page and wait until the tiles (and, given `n_points`, the P&L figure with that many points) are drawn."
    t0 = time.monotonic()
    try:
        page.goto(url, timeout=PAGE_WAIT*1000)
        page.wait_for_selector('.kpi-equity', timeout=max(1.0, PAGE_WAIT - (time.monotonic() - t0))*1000)
        if n_points is not None:
            wait_plot(page, n_points, 30)
    except Exception as e:
        body = page.inner_text('body') if page.query_selector('body') else ''
        pytest.fail(f'the dashboard did not render ({type(e).__name__}: {e}):\npage: {body[-3000:]}\nJS errors: {page.errors}\nvoila: {tail(proc.out)}')
    body = page.inner_text('body')
    assert 'Traceback' not in body and 'refresh failed' not in body, body[-3000:]
    assert not page.errors, page.errors
    return time.monotonic() - t0

def disabled(page, cls:str) -> bool:
    return page.eval_on_selector(f'.{cls}', "e => e.disabled || !!e.querySelector('button[disabled]')")

def test_readonly_page_shows_the_store(home, spawn, page, tmp_path):
    from trader.core.runs import Runs
    from trader.ops.dashboard import snapshot
    from trader.core.config import load_settings
    store = open_store(home)
    try:
        rid = Runs(store).latest('paper')
        eq = Runs(store).load(rid).equity
        snap = snapshot(store, rid, load_settings(trader_env(home)), verify_audit=False)
    finally: store.close()
    proc, url = dashboard(spawn, home)
    took = load(page, url, proc, n_points=len(eq))
    # the selected run and its figures
    assert rid in page.eval_on_selector('.trader-run-selector select', 's => s.options[s.selectedIndex].text')
    assert 'replay of historical bars 2012-01-03 to 2012-03-30' in page.inner_text('.trader-run-label')
    want = f'${eq.iloc[-1]:,.2f}'
    shown = page.inner_text('.kpi-equity .v')
    assert shown == want, (shown, want)
    assert page.inner_text('.kpi-pnl .v').startswith(('+$', '-$'))
    for k in ('kpi-today', 'kpi-sharpe', 'kpi-maxdd'): assert page.inner_text(f'.{k} .v').strip() not in ('', '-'), k
    light = page.inner_text('.kpi-gate .trader-light')
    m = re.search(r'\b(GREEN|YELLOW|RED)\b', light); assert m, light
    assert m.group(1) == snap['gate']['status'], (light, snap['gate'])
    # the P&L figure: equity and drawdown drawn with every point of the run
    xs = page.eval_on_selector('.js-plotly-plot', 'e => e.data.map(d => (d.x || []).length)')
    assert xs[0] == xs[3] == len(eq), xs
    assert 'Equity ($) and drawdown (%)' in page.inner_text('.js-plotly-plot')
    # the baselines (computed in the page's thread, drawn at a refresh after the first): labelled traces with a point at every
    # bar of the run, their names in the chart's legend
    try: page.wait_for_function(BASELINES_DRAWN, arg=len(eq), timeout=60_000)
    except Exception as e: pytest.fail(f"the baselines were not drawn ({type(e).__name__}): {page.inner_text('.trader-chart-note')}; {page.evaluate(PLOT_STATE)}")
    xs = page.eval_on_selector('.js-plotly-plot', 'e => e.data.map(d => (d.x || []).length)')
    names = page.eval_on_selector('.js-plotly-plot', 'e => e.data.map(d => d.name)')
    assert names[1:3] == [snap['baseline_labels']['buy_hold'], snap['baseline_labels']['ma_cross']], (names, snap['baseline_labels'])
    assert names[1] == 'buy & hold AAPL+MSFT' and names[2].startswith('MA crossover '), names
    assert xs[1] == xs[2] == len(eq), xs
    legend = page.eval_on_selector_all('.js-plotly-plot .legendtext', 'ls => ls.map(l => l.textContent)')
    assert names[1] in legend and names[2] in legend, legend
    assert 'computed from the stored bars' in page.inner_text('.trader-chart-note')
    # the report links: the run's daily gate (HTML and PDF) opens from the page, through the dashboard's own server
    gate = max((home/'reports'/'gates').glob('*.html'))
    link = page.wait_for_selector('.trader-reports a.trader-report-html', timeout=10_000)
    assert f'daily gate {gate.stem}' in page.inner_text('.trader-reports')
    href = link.get_attribute('href'); assert href == f'trader/reports/gates/{gate.name}', href
    with page.context.expect_event('response', lambda r: '/trader/reports/' in r.url, timeout=30_000) as got, page.expect_popup() as pop:
        link.click()
    resp, popup = got.value, pop.value
    assert resp.status == 200 and resp.url == url + href, (resp.status, resp.url)
    popup.wait_for_load_state()
    assert f'Daily gate {gate.stem}' in popup.title(), popup.title()
    pdf_href = page.get_attribute('.trader-reports a.trader-report-pdf', 'href')
    r = page.request.get(url + pdf_href)
    assert r.status == 200 and r.headers['content-type'] == 'application/pdf' and r.body() == gate.with_suffix('.pdf').read_bytes(), (r.status, r.headers)
    # read-only: every control is disabled
    for cls in ('trader-kill', 'trader-resume', 'trader-drill'): assert disabled(page, cls), cls
    assert 'read-only' in page.inner_text('body')
    shot = save_shot(page, tmp_path, 'dashboard-readonly.png')
    print(f'\nread-only page drawn in {took:.1f}s: equity {shown}, gate {m.group(1)}, {len(eq)} points; screenshot {shot}')

def test_control_mode_kill_switch_halts_the_loop(home, spawn, page, tmp_path):
    from trader.core.runs import Runs
    from trader.live.loop import status_report
    store, paper = open_store(home), None
    try:
        before = Runs(store).latest('paper')
        # the guardian off for this replay: on a loaded machine the page can take long enough for the guardian to halt the
        # replay first (a 3-day loss), and then there is nothing left for the kill switch to halt; the kill switch does not need it
        (home/'no-guardian.toml').write_text(FAST + '[risk]\nguardian = false\n')
        paper = spawn(TRADER, 'paper', '--broker', 'sim', '--model', 'champion', '--replay', LIVE_REPLAY, '--speed', str(LIVE_SPEED), '-q',
                      env=trader_env(home, TRADER_CONFIG=str(home/'no-guardian.toml')), name='paper')
        proc, url = dashboard(spawn, home, control=True)
        # the new run is in the store (with a committed bar) before the page is built, so the selector lists it first
        end, rid = time.monotonic() + START_WAIT, None
        while not rid:
            if paper.poll() is not None: pytest.fail(f'the paper replay exited ({paper.returncode}) early:\n{tail(paper.out)}')
            if time.monotonic() > end: pytest.fail(f'the paper replay did not start within {START_WAIT:g}s:\n{tail(paper.out)}')
            new = Runs(store).latest('paper')
            if new != before and store.query('SELECT 1 FROM loop_state WHERE run_id = ?', (new,)): rid = new
            else: time.sleep(0.2)
        took = load(page, url, proc)
        sel = '.trader-run-selector select'
        opts = page.eval_on_selector(sel, 's => [...s.options].map(o => o.text)')
        label = next((o for o in opts if rid in o), None); assert label, (rid, opts)
        if rid not in page.eval_on_selector(sel, 's => s.options[s.selectedIndex].text'):
            page.select_option(sel, label=label)
            page.wait_for_function('rid => document.querySelector(".trader-run-label").innerText.includes(rid)', arg=rid, timeout=SELECT_WAIT*1000)
        label = label.replace('\xa0', ' ')      # the dropdown shows its options with non-breaking spaces
        assert 'replay of historical bars 2012-04-02' in label and 'simulated fills' in label, label
        assert rid in page.inner_text('.trader-run-label')
        assert 'control mode' in page.inner_text('body')
        for cls in ('trader-kill', 'trader-resume', 'trader-drill'): assert not disabled(page, cls), cls
        rep = status_report(store, rid)
        assert not rep['halted'], f"halted before the kill switch was pressed: {rep['halt_reason']} (last bar {rep['last_bar']})"
        assert 'HALTED' not in page.inner_text('.trader-risk-state')
        assert paper.poll() is None, f'the replay finished before the kill switch could be pressed (page took {took:.0f}s):\n{tail(paper.out)}'
        # press the kill switch on the page
        t0 = time.monotonic()
        page.click('.trader-kill')
        page.wait_for_selector('.trader-kill-sent', timeout=10_000)
        while not status_report(store, rid)['halted']:
            if time.monotonic() - t0 > HALT_WAIT:
                pytest.fail(f'run {rid} not halted {HALT_WAIT:g}s after the kill switch was pressed: {status_report(store, rid)}\n{tail(paper.out)}')
            time.sleep(0.2)
        halted_after = time.monotonic() - t0
        rep = status_report(store, rid)
        assert 'kill switch' in rep['halt_reason'], rep['halt_reason']
        try:      # the page shows it after its next refresh (every 3 s)
            page.wait_for_function("() => document.querySelector('.trader-risk-state').innerText.includes('HALTED')",
                                   timeout=max(1.0, HALT_WAIT - (time.monotonic() - t0))*1000)
        except Exception as e:
            pytest.fail(f'the page did not show HALTED ({type(e).__name__}): {page.inner_text(".trader-risk-state")}')
        assert 'HALTED' in page.inner_text('.kpi-equity')
        assert 'kill switch pressed on the dashboard' in page.inner_text('.trader-risk-state')
        body = page.inner_text('body')
        assert 'Traceback' not in body and 'refresh failed' not in body, body[-3000:]
        assert not page.errors, page.errors
        shot = save_shot(page, tmp_path, 'dashboard-control.png')
        print(f'\ncontrol page drawn in {took:.1f}s; run {rid} halted {halted_after:.1f}s after the kill switch was pressed, '
              f'page showed it {time.monotonic() - t0:.1f}s after; screenshot {shot}')
    finally:
        store.close()
        if paper is not None: stop(paper)       # the replay (halted, or not if the test failed first) has most of its bars to go

def _get(url:str, method:str='GET'):
    "(status, headers, body) of one request."
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method, data=b'' if method == 'POST' else None), timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e: return e.code, dict(e.headers), e.read()

def test_reports_route_is_read_only(spawn, tmp_path):
    "`trader dashboard` serves the reports folder's HTML and PDF files and nothing else (no browser needed: plain requests)."
    home = tmp_path/'home'; reports = home/'reports'
    (reports/'gates').mkdir(parents=True); (reports/'backtest'/'2026-12-01-m a').mkdir(parents=True)
    (reports/'gates'/'2012-03-30.html').write_text('<!doctype html><title>Daily gate 2012-03-30</title>')
    (reports/'gates'/'2012-03-30.pdf').write_bytes(MINIMAL_PDF)
    (reports/'gates'/'2012-03-30.json').write_text(json.dumps({'run_id': 'x'}))
    (reports/'backtest'/'2026-12-01-m a'/'report.html').write_text('<p>backtest</p>')
    (reports/'.hidden.html').write_text('hidden')
    (home/'secret.html').write_text('outside the reports folder')
    os.symlink(home/'secret.html', reports/'link.html')
    (home/'trader.toml').write_text(FAST)
    proc, url = dashboard(spawn, home)
    base = url + 'trader/reports/'
    st, hd, body = _get(base + 'gates/2012-03-30.html')
    assert st == 200 and body.startswith(b'<!doctype html>') and hd['Content-Type'].startswith('text/html'), (st, hd)
    assert 'sandbox' in hd['Content-Security-Policy'] and hd['X-Content-Type-Options'] == 'nosniff', hd
    st, hd, body = _get(base + 'gates/2012-03-30.pdf')
    assert (st, hd['Content-Type'], body) == (200, 'application/pdf', MINIMAL_PDF), (st, hd)
    assert _get(base + 'backtest/2026-12-01-m%20a/report.html')[0] == 200
    assert _get(base + 'gates/2012-03-30.pdf', 'HEAD')[0] == 200
    for bad in ('gates/2012-03-30.json', '.hidden.html', 'link.html', '../secret.html', '%2e%2e/secret.html', '..%2ftrader.toml',
                'gates/', 'gates/2099-01-01.html', '../trader.toml'):
        st = _get(base + bad)[0]
        assert st in (403, 404), (bad, st)
    assert _get(base + 'gates/2012-03-30.html', 'POST')[0] in (403, 405)
    assert _get(base + 'gates/2012-03-30.html', 'DELETE')[0] in (403, 405)
    assert (reports/'gates'/'2012-03-30.html').exists()
