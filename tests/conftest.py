"""Shared fixtures: a hermetic TRADER_HOME for every test, and stores on SQLite and PostgreSQL.

PostgreSQL tests need a server: `make test PG=1` or `.ci/with-postgres pytest tests/` starts a throwaway one and
exports TRADER_TEST_PG_URL. Without it they are skipped locally and fail in CI (CI=true), where PostgreSQL is required.
"""
import os, uuid
import pytest
from trader.core.store import Store

PG_HINT = "run `make test PG=1` or `.ci/with-postgres pytest tests/` to start a throwaway PostgreSQL 15"

@pytest.fixture(autouse=True)
def _hermetic_home(tmp_path_factory, monkeypatch):
    "No test reads or writes ./var or a developer's configured database: TRADER_HOME is a fresh temporary directory."
    monkeypatch.setenv('TRADER_HOME', str(tmp_path_factory.mktemp('trader-home')))
    for k in ('TRADER_DB_URL', 'TRADER_CONFIG'): monkeypatch.delenv(k, raising=False)

def _pg_unavailable(why:str):
    if os.environ.get('CI') == 'true':
        pytest.fail(f"PostgreSQL is required in CI but {why}; the CI entry point (.ci/run) starts one with .ci/with-postgres", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {why}; {PG_HINT}")

@pytest.fixture(scope='session')
def pg_url() -> str:
    "TRADER_TEST_PG_URL, once the server there has answered."
    url = os.environ.get('TRADER_TEST_PG_URL')
    if not url: _pg_unavailable('TRADER_TEST_PG_URL is not set')
    import psycopg
    try:
        with psycopg.connect(url, connect_timeout=5) as c: c.execute('SELECT 1')
    except Exception as e:
        _pg_unavailable(f"the server at TRADER_TEST_PG_URL does not answer ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
    return url

def _with_dbname(url:str, name:str) -> str:
    "`url` pointing at database `name` instead (query string kept)."
    base, _, query = url.partition('?')
    head, _, _ = base.rpartition('/')
    return f"{head}/{name}" + (f"?{query}" if query else '')

@pytest.fixture
def pg_database(pg_url) -> str:
    "URL of a new, empty PostgreSQL database that is dropped after the test."
    import psycopg
    name = f"trader_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_url, autocommit=True) as c: c.execute(f'CREATE DATABASE "{name}"')
    try: yield _with_dbname(pg_url, name)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as c: c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

@pytest.fixture
def pg_store(pg_database) -> Store:
    "A fresh, migrated `Store` on an empty PostgreSQL database."
    s = Store(pg_database)
    yield s
    s.close()

@pytest.fixture
def sqlite_url(tmp_path) -> str:
    "URL of a new SQLite database file in the test's temporary directory."
    return f"sqlite:///{tmp_path}/store/trader.db"

@pytest.fixture
def sqlite_store(sqlite_url) -> Store:
    "A fresh, migrated `Store` on a new SQLite file."
    s = Store(sqlite_url)
    yield s
    s.close()

@pytest.fixture(params=['sqlite', 'postgresql'])
def db_url(request) -> str:
    "An empty database on each engine in turn (PostgreSQL ones skip without a server)."
    return request.getfixturevalue('sqlite_url' if request.param == 'sqlite' else 'pg_database')

@pytest.fixture
def store(db_url) -> Store:
    "A fresh, migrated `Store` on each engine in turn."
    s = Store(db_url)
    yield s
    s.close()


# -- the `slow` marker: long training budgets, skipped unless asked for (`pytest -m slow` or `--runslow`) --------
def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False, help='also run tests marked slow')

def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: long-running (training budgets); run with `pytest -m slow` or `--runslow`')
    if getattr(config.option, 'dist', 'no') in ('loadfile', 'loadscope'):   # the controller schedules: keep _xdist_layout's
        config.option.loadscopereorder = False                               # order (longest first), not xdist's by test count

def pytest_collection_modifyitems(config, items):
    _xdist_layout(config, items)
    if config.getoption('--runslow') or 'slow' in (config.getoption('-m') or ''): return
    skip = pytest.mark.skip(reason='slow: run with --runslow or -m slow')
    for item in items:
        if 'slow' in item.keywords: item.add_marker(skip)


# -- pytest-xdist: `make pytest` runs `pytest -n 3 --dist loadfile` (see the README's "Test time") ---------------------------
# Each worker is a process with its own TRADER_HOME per test (tmp_path_factory is per worker), its own PostgreSQL
# databases (pg_database makes a uniquely named one per test), free ports only, and its own temporary folders.
# `--dist loadfile`: a module's tests run on one worker, so a module-scoped fixture (a trained model, a prepared home, the
# Ray runs: test_ray.py is the only module that starts Ray) is built once. (`--dist loadgroup` with xdist_group marks
# does not group anything with pytest 9.2 and xdist 3.8: xdist appends the group to `item._nodeid`, which pytest 9 no
# longer reads.) The modules start longest first (seconds measured on the 2-core CI machine, serial, fixture set-up
# included): a long module started last would otherwise run alone at the end.
MODULE_SECONDS = {'test_experiments': 190, 'test_reports_gate_promote': 140, 'test_power': 130, 'test_power_study': 140, 'test_train_cli': 120,
                  'test_dashboard_browser': 120, 'test_service_alpaca': 115, 'test_recovery': 110,
                  'test_docs_browser': 100, 'test_service': 90, 'test_nbrun': 90, 'test_drills': 80,
                  'test_nightly': 80, 'test_ray': 70, 'test_holdout': 70, 'test_drift': 70, 'test_cli': 60,
                  'test_alerts': 60, 'test_monitoring': 40, 'test_parity': 40, 'test_alpaca_e2e': 40, 'test_reports_pdf': 40}

def _xdist_layout(config, items):
    "On an xdist worker (they all collect, the controller schedules in their order): the long modules first."
    if not hasattr(config, 'workerinput'): return
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.module.__name__, 0))     # stable: the order within a module is kept


# -- prepared models: registered models whose policy always takes one action (see trader.research.train.fixed_action_model) --
from trader.research.train import fixed_action_model  # noqa: E402,F401  (re-exported for the tests)


# -- background processes and loopback servers shared by the end-to-end tests ---------------------------------------
import signal, socket, subprocess, threading, time
from contextlib import contextmanager
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def tail(path:Path, n:int=40) -> str:
    return '\n'.join(path.read_text(errors='replace').splitlines()[-n:]) if path.exists() else ''

def children(pid:int) -> list[int]:
    "Every descendant of `pid` (from /proc), so processes that leave the group (Voila's kernels) can be stopped too."
    kids = {}
    for d in Path('/proc').iterdir():
        if not d.name.isdigit(): continue
        try: ppid = int((d/'stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError): continue
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []): out.append(k); todo.append(k)
    return out

def alive(pid:int) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    try: return (Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]) != 'Z'
    except OSError: return False

def stop(p:subprocess.Popen):
    """Stop `p`, started in its own session, with everything it started: SIGTERM to the group (Voila shuts its kernels
    down), SIGKILL to whatever is left. `trader dashboard` runs Voila as a child; signalling only `p` would orphan it."""
    if getattr(p, 'stopped', False): return
    p.stopped = True
    desc = children(p.pid)
    if p.poll() is None or any(alive(d) for d in desc):
        try:   # a session leader gets the signal with its whole group; any other process on its own
            if os.getpgid(p.pid) == p.pid: os.killpg(p.pid, signal.SIGTERM)
            else: p.terminate()
        except ProcessLookupError: pass
        end = time.monotonic() + 15
        while time.monotonic() < end and (p.poll() is None or any(alive(d) for d in desc)): time.sleep(0.2)
        for pid in [p.pid, *desc]:
            if pid == p.pid and p.poll() is not None: continue
            if alive(pid):
                try: os.kill(pid, signal.SIGKILL)
                except ProcessLookupError: pass
    try: p.wait(10)
    except subprocess.TimeoutExpired: pass

@pytest.fixture
def spawn(tmp_path):
    "Start background processes in their own sessions (output to files); all of them, and their children, are stopped at teardown."
    procs = []
    def start(*cmd, env=None, name='proc'):
        out = tmp_path/f'{name}.out'
        with open(out, 'wb') as f:
            p = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        p.out = out; procs.append(p)
        return p
    yield start
    for p in reversed(procs): stop(p)

@contextmanager
def loopback_server(server_cls, handler_cls, fake):
    "Serve `fake` (its `url` set) with `handler_cls` on a free 127.0.0.1 port in a thread; stopped on exit."
    httpd = server_cls(('127.0.0.1', 0), handler_cls)
    httpd.fake = fake
    fake.url = f'http://127.0.0.1:{httpd.server_address[1]}'
    t = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.02}, name='fake-server', daemon=True)
    t.start()
    try: yield fake
    finally: httpd.shutdown(); httpd.server_close(); t.join(5)


# -- waits on a process, a server or a clock: a deadline only guards against a hang ------------------------------------
# A test waits for what it needs (a READY notification, a committed bar, a page drawn), never for a fixed time, and never
# fails because the machine is slow: each wait gives up only after HANG_FACTOR times what it takes on an idle machine.
HANG_FACTOR = 10

def hang_guard(idle_s:float) -> float:
    "Seconds a wait may take before the test calls it a hang: `HANG_FACTOR` times `idle_s`, what it takes on an idle machine."
    return HANG_FACTOR*idle_s
