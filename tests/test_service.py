"""The paper-trading service end to end, through the real `trader` console script (issue 11, acceptance 2 and 3).

* Two copies of the same session started together: one runs the replay to its end, the other exits 6 with one line
  naming the holder (host, pid, since); the ledger equals the broker (SimBroker) at the end; one run only.
* `trader paper --pace`: the service replays stored bars on a clock running one simulated day per two real seconds, from
  Thursday 2012-06-28 to Friday 2012-07-13: two weekends, the half day of July 3rd and the July 4th holiday. It heartbeats
  between bars (liveness rows while it waits through the weekend and the holiday), tells systemd READY/WATCHDOG/STOPPING
  over a NOTIFY_SOCKET the test binds, stops with exit 0 on SIGTERM within one bar (committed, lease released), and a
  restart resumes from the committed state to the end of the window, with ledger = broker.
* The systemd unit in deploy/ passes `systemd-analyze verify`.

The same service against the Alpaca fake (tests/fake_alpaca.py) is tests/test_service_alpaca.py.
Nothing here depends on the machine's speed: a paced replay's clock starts when the service first reads it (after READY), and
each wait gives up only after `hang_guard` (tests/conftest.py) of what it takes on an idle machine.
"""
import json, math, os, shutil, signal, socket, sqlite3, subprocess, sys, tempfile, threading, time
from pathlib import Path
import pandas as pd
import pytest
from fastcore.test import test_eq as _test_eq
from conftest import hang_guard

ROOT = Path(__file__).resolve().parents[1]
TRADER = str(Path(sys.executable).parent/'trader')
TOML = '[train]\nn_steps = 128\nbatch_size = 64\nn_epochs = 2\ncheckpoint_every = 0\n\n[service]\nheartbeat_s = {hb}\nlease_ttl = 30.0\n'

def _env(home, **extra) -> dict:
    return {**os.environ, 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(Path(home)/'trader.toml'), **extra}

def q(home, sql, params=()):
    c = sqlite3.connect(Path(home)/'trader.db', timeout=30)
    try: return c.execute(sql, params).fetchall()
    finally: c.close()

@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    "A home with the AAPL+MSFT sample and a small trained champion that trades."
    from trader.core.config import load_settings
    from trader.core.data import load_sample
    from trader.core.quality import DataQualityGate
    from trader.core.registry import Registry
    from trader.core.store import Store
    from trader.research.train import train
    base = tmp_path_factory.mktemp('service')/'base'; base.mkdir()
    (base/'trader.toml').write_text(TOML.format(hb=1800.0))
    s = load_settings(env=_env(base))
    with Store(settings=s) as store:
        store.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
        mid = train('AAPL,MSFT', steps=1024, seed=0, settings=s, store=store, progress=False).model_id
        Registry(store, s).set_champion(mid, 'service test')
    return base

def home_copy(prepared, dst) -> Path:
    shutil.copytree(prepared, dst)
    return dst

def paper_runs(home): return q(home, "SELECT id, status FROM runs WHERE kind = 'paper' ORDER BY created")

def assert_ledger_is_broker(home, rid):
    "The loop's committed cash and shares equal the sim broker's account; every filled broker order is in the ledger once; no client_order_id twice."
    (state,), = q(home, 'SELECT state FROM loop_state WHERE run_id = ?', (rid,))
    st = json.loads(state)
    (cash,), = q(home, 'SELECT cash FROM broker_accounts WHERE broker = ?', (f'sim-{rid}',))
    pos = dict(q(home, 'SELECT symbol, qty FROM broker_positions WHERE broker = ?', (f'sim-{rid}',)))
    syms = ['AAPL', 'MSFT']
    assert math.isclose(st['cash'], cash, rel_tol=1e-9, abs_tol=1e-6), (st['cash'], cash)
    for i, s in enumerate(syms): assert math.isclose(st['shares'][i], pos.get(s, 0.0), rel_tol=1e-9, abs_tol=1e-9), (s, st['shares'][i], pos.get(s))
    filled = [r[0] for r in q(home, "SELECT client_order_id FROM broker_orders WHERE broker = ? AND status = 'filled'", (f'sim-{rid}',))]
    ledger = [r[0] for r in q(home, 'SELECT client_order_id FROM run_orders WHERE run_id = ?', (rid,))]
    assert filled and sorted(filled) == sorted(ledger), (len(filled), len(ledger))
    ids = [r[0] for r in q(home, 'SELECT client_order_id FROM broker_orders WHERE broker = ?', (f'sim-{rid}',))]
    _test_eq(len(ids), len(set(ids)))
    return len(ledger)

# ---------------------------------------------------------------------------------------------------------------------
def test_two_copies_second_refused(prepared, tmp_path):
    home = home_copy(prepared, tmp_path/'home')
    cmd = [TRADER, 'paper', '--broker', 'sim', '--model', 'champion', '--replay', '2012-01-03:2012-08-31', '--speed', '12', '-q']
    ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(home), cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=hang_guard(60)) for p in ps]
    codes = [p.returncode for p in ps]
    _test_eq(sorted(codes), [0, 6])
    win, lose = codes.index(0), codes.index(6)
    err = outs[lose][1].strip()
    assert err.startswith('error: paper:') and '\n' not in err, err
    assert f"is already running: held by host {socket.gethostname()} pid {ps[win].pid} since " in err, err
    assert outs[lose][0] == '', outs[lose][0]                 # refused before it printed or wrote anything
    (rid, status), = paper_runs(home)                          # one run, finished by the winner
    _test_eq(status, 'done')
    n = assert_ledger_is_broker(home, rid)
    assert n >= 5, n
    bars = q(home, "SELECT COUNT(*) FROM run_series WHERE run_id = ? AND series = 'equity'", (rid,))[0][0]
    import exchange_calendars as xcals
    _test_eq(bars, len(xcals.get_calendar('XNYS', start='2012-01-01').sessions_in_range('2012-01-03', '2012-08-31')))   # every session, once
    _test_eq(q(home, 'SELECT COUNT(*) FROM leases')[0][0], 0)

# ---------------------------------------------------------------------------------------------------------------------
SESSIONS = ['2012-06-28', '2012-06-29', '2012-07-02', '2012-07-03', '2012-07-05', '2012-07-06', '2012-07-09', '2012-07-10',
            '2012-07-11', '2012-07-12', '2012-07-13']
PACE = ['paper', '--broker', 'sim', '--model', 'champion', '--replay', '2012-06-28:2012-07-13', '--pace', '43200']

class NotifyListener:
    "A NOTIFY_SOCKET for the service: a unix datagram socket the test binds, collecting the messages."
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix='notify-', dir='/tmp')
        self.path = f'{self.dir}/notify'
        self.so = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); self.so.bind(self.path); self.so.settimeout(0.2)
        self.msgs, self._stop = [], threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True); self.t.start()
    def _run(self):
        while not self._stop.is_set():
            try: self.msgs.append((time.monotonic(), self.so.recv(4096).decode()))
            except socket.timeout: pass
    def close(self):
        self._stop.set(); self.t.join(2); self.so.close(); shutil.rmtree(self.dir, ignore_errors=True)

def committed(home):
    r = q(home, 'SELECT run_id, last_bar_ts FROM loop_state')
    return (r[0][0], pd.Timestamp(r[0][1], tz='UTC')) if r and r[0][1] is not None else (None, None)

def bar_days(home, rid):
    return [pd.Timestamp(t, tz='UTC').strftime('%Y-%m-%d') for (t,) in q(home, "SELECT ts FROM run_series WHERE run_id = ? AND series = 'equity' ORDER BY ts", (rid,))]

def test_service_weekend_holiday_sigterm_resume(prepared, tmp_path, monkeypatch, capsys):
    from trader.core.config import load_settings
    from trader.core.store import Store
    from trader.live.loop import heartbeat_timeout, status_report, uptime_pct
    home = home_copy(prepared, tmp_path/'home')
    nl = NotifyListener()
    try:
        log = open(tmp_path/'first.out', 'w')
        p = subprocess.Popen([TRADER, *PACE], stdout=log, stderr=subprocess.STDOUT, env=_env(home, NOTIFY_SOCKET=nl.path), cwd=ROOT)
        # wait until the bar of Thursday 2012-07-05 (after the weekend and July 4th) is committed; look at the service meanwhile
        end, seen_status, rid, last = time.monotonic() + hang_guard(25), None, None, None   # ~25 s idle: the launch, then a week at 2 s a day
        while time.monotonic() < end and p.poll() is None:
            rid, last = committed(home)
            if last is not None and seen_status is None:
                with Store(f"sqlite:///{home}/trader.db", settings=load_settings(env=_env(home))) as st: seen_status = status_report(st, rid)
            if last is not None and last >= pd.Timestamp('2012-07-05', tz='UTC'): break
            time.sleep(0.02)
        assert p.poll() is None and last is not None and last >= pd.Timestamp('2012-07-05', tz='UTC'), (tmp_path/'first.out').read_text()
        before = bar_days(home, rid)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(hang_guard(4))                                 # 2-4 s idle: the summary, then the interpreter's exit
        log.close()
        out1 = (tmp_path/'first.out').read_text()
        _test_eq(rc, 0)
        after = bar_days(home, rid)
        assert len(after) - len(before) <= 1, (before, after)      # stopped within one bar: the bar in progress, no more
        assert 'stopped (SIGTERM)' in out1, out1
        _test_eq(after, SESSIONS[:len(after)])                     # no bar on a weekend or on July 4th; none skipped
        assert len(after) < len(SESSIONS)
        _test_eq(q(home, 'SELECT COUNT(*) FROM leases')[0][0], 0)  # released
        _test_eq(paper_runs(home), [(rid, 'running')])              # the run stays open for the restart
        # while it ran, `trader status` named the holder, the next bar due and a fresh heartbeat
        l = seen_status['lease']
        assert l and l['pid'] == p.pid and l['host'] == socket.gethostname() and not l['expired'], seen_status
        assert seen_status['next_bar_due'] and pd.Timestamp(seen_status['next_bar_due']) > pd.Timestamp(seen_status['last_bar'])
        # a heartbeat of this process (written after it took the lease), not stale (its age is the machine's speed: not asserted)
        assert seen_status['last_heartbeat'] and pd.Timestamp(seen_status['last_heartbeat']) >= pd.Timestamp(l['since']), seen_status
        assert not seen_status['heartbeat_stale'], seen_status
        # heartbeats between bars: liveness rows while waiting through the weekend (last bar Friday 06-29) and the holiday (07-03)
        hb = q(home, 'SELECT ts, bar_ts FROM heartbeats WHERE run_id = ? ORDER BY ts', (rid,))
        by_bar = pd.Series([pd.Timestamp(b, tz='UTC').strftime('%Y-%m-%d') if b is not None else None for _, b in hb]).value_counts()
        # every 30 simulated minutes of waiting (~69 h from Friday's bar to Monday's, ~51 h over July 4th, ~21 h from Monday's
        # to the half day's), less the simulated time the service's own work takes at this pace (a real ms is 43 simulated s):
        # at least one per 3 hours, which only heartbeats stalling for a quarter of a real second each fall short of; a service
        # that slept through a wait without heartbeats would write one
        night, weekend, holiday = (by_bar.get(d, 0) for d in ('2012-07-02', '2012-06-29', '2012-07-03'))
        assert weekend >= 69/3 and holiday >= 51/3 and night >= 21/3, by_bar
        # systemd: READY first, a WATCHDOG with every heartbeat and every bar, STOPPING last
        msgs = [m for _, m in nl.msgs]
        assert msgs and msgs[0].startswith('READY=1') and msgs[-1] == 'STOPPING=1', msgs[:3] + msgs[-3:]
        assert 'X_CLOCK_EPOCH=' not in msgs[0], msgs[0]                 # a paced replay's clock is its own: nothing to share
        assert sum(m == 'WATCHDOG=1' for m in msgs) >= len(hb) + len(after), (len(msgs), len(hb), msgs[:20])
        # `trader status` after the stop: nobody holds the session, the next bar due is Friday's (its close + 15 min)
        for k, v in _env(home).items():
            if k.startswith('TRADER'): monkeypatch.setenv(k, v)
        from trader.ops.cli import main
        capsys.readouterr()
        _test_eq(main(['status']), 0)
        txt = capsys.readouterr().out
        assert 'service: no process holds this session; next bar due 2012-07-06 20:15:00+00:00' in txt, txt
        assert 'heartbeat ' in txt and 's ago (' in txt
        _test_eq(main(['status', '--json']), 0)
        js = json.loads(capsys.readouterr().out)
        assert js['lease'] is None and js['next_bar_due'].startswith('2012-07-06 20:15') and js['last_heartbeat'], js
        # restart: resumes from the committed state and finishes the window
        r2 = subprocess.run([TRADER, *PACE], capture_output=True, text=True, env=_env(home), cwd=ROOT, timeout=hang_guard(30))
        _test_eq(r2.returncode, 0)
        assert f'paper run {rid} (resumed' in r2.stdout and 'finished' in r2.stdout, r2.stdout + r2.stderr
        _test_eq(paper_runs(home), [(rid, 'done')])
        _test_eq(bar_days(home, rid), SESSIONS)
        assert_ledger_is_broker(home, rid)
        s_home = load_settings(env=_env(home))
        with Store(f"sqlite:///{home}/trader.db", settings=s_home) as st:
            up, why = uptime_pct(st, rid, timeout=heartbeat_timeout(s_home))
            from trader.core.audit import Audit
            assert Audit(st).verify().ok
        # no heartbeat gap counts as down: the longest, the restart's (the service was stopped for seconds), is far below the
        # heartbeat timeout (2 x heartbeat_s = 3600 s); only a hang would reach it
        _test_eq((up, why.split(', ')[1]), (100.0, '0 gap(s) > 3600s'))
        kinds = [json.loads(d).get('event') for (d,) in q(home, "SELECT payload FROM audit_log WHERE kind = 'session'")]
        _test_eq(kinds, ['started', 'stopped', 'resumed', 'finished'])
    finally:
        nl.close()

# ---------------------------------------------------------------------------------------------------------------------
def _ci_installs_systemd() -> bool:
    return 'systemd' in (ROOT/'.ci'/'run').read_text()

def test_unit_file_verifies(tmp_path):
    "deploy/trader-paper.service passes `systemd-analyze verify` (ExecStart pointed at this venv's trader, which verify requires to exist)."
    exe = shutil.which('systemd-analyze')
    if exe is None:
        if os.environ.get('CI') == 'true' and _ci_installs_systemd(): pytest.fail('systemd-analyze is missing in CI, but .ci/run installs systemd')
        pytest.skip('systemd-analyze is not installed (apt-get install systemd)')
    unit = (ROOT/'deploy'/'trader-paper.service').read_text()
    for key in ('Type=notify', 'WatchdogSec=', 'Restart=on-failure', 'EnvironmentFile=', 'ExecStart=/srv/trader/.venv/bin/trader paper'):
        assert key in unit, key
    (tmp_path/'trader-paper.service').write_text(unit.replace('/srv/trader/.venv/bin/trader', TRADER))
    r = subprocess.run([exe, 'verify', str(tmp_path/'trader-paper.service')], capture_output=True, text=True, timeout=120)
    mine = [l for l in (r.stdout + r.stderr).splitlines() if 'trader-paper.service' in l]
    assert r.returncode == 0 and not mine, r.stdout + r.stderr
    # and verify does catch a broken unit
    (tmp_path/'bad.service').write_text(unit.replace('WatchdogSec=', 'WatchdogSecs='))
    r = subprocess.run([exe, 'verify', str(tmp_path/'bad.service')], capture_output=True, text=True, timeout=120)
    assert "Unknown key 'WatchdogSecs'" in r.stdout + r.stderr
