"""Acceptance 3 of issue 11 against the Alpaca fake: `trader paper --broker alpaca --live` as a service on a simulated clock.

The real console script runs in a subprocess against `tests/fake_alpaca.py` on loopback. Both run on one simulated clock:
`trader paper --live --clock START@RATE@ready` (a rehearsal clock, accepted only because both Alpaca URLs are loopback) in the
service, the same `ScaledClock` in the fake (`clock_fn`); one simulated day passes in `DAY_S` real seconds. The clock stands at
START until the service has loaded everything: it starts it as it tells systemd READY, and the same notification carries the
Unix time it chose (`X_CLOCK_EPOCH=`), from which the test starts the fake's copy (a handshake, not an allowance for the load).
The fake's market runs by that clock (`auto_market`): each XNYS session opens at 09:30 New York (waiting
`opg` orders fill at the open) and closes at 16:00 (13:00 on the half day of July 3rd), at the prices of the real sample
(`load_sample`); the store holds the sample's history up to Thursday 2012-06-28 and the fake serves the daily bars after it.

From Friday 2012-06-29 to Tuesday 2012-07-10 the window holds a weekend, the half day of July 3rd and the July 4th holiday.
The service commits a bar for each XNYS session only (at 19:00 New York, when Alpaca's opg window opens), writes liveness
heartbeats while it waits through the weekend and the holiday, stops with exit 0 on SIGTERM (sent mid-session on Friday
07-06, before that day's bar) within one bar with its lease released, and a restart resumes from the last committed bar and
finishes the sessions. At the end the ledger (the run's committed cash and shares) equals the fake's account and positions,
every order was sent after its bar's 19:00 hand-over and filled at the first open after it, and no client_order_id was posted
twice.

While the service is down the simulated world stands still (the restart gets a clock starting where the fake's stopped), and
each clock stands still until that service is ready, so loading the model costs no simulated time however long it takes.
Nothing here depends on the machine's speed: each wait gives up only after `hang_guard` (tests/conftest.py) of what it takes
on an idle machine. At this clock rate a real second is four simulated hours, so a loaded machine processes a bar hours of
simulated time late: the fake's refusal of `opg` orders from 09:28 to 19:00 (`opg_window`) is off here, since the next
morning's half of it would measure the machine's speed; the half the service decides (not before the bar's 19:00 hand-over)
is asserted on every order.
"""
from __future__ import annotations
import collections, json, os, signal, sqlite3, subprocess, sys, threading, time
from pathlib import Path

import pandas as pd, pytest
from fastcore.test import test_eq as _test_eq
from conftest import hang_guard
from fake_alpaca import KEY, SECRET, NY, FakeAlpaca, alpaca_daily, serve
from test_service import NotifyListener

ROOT = Path(__file__).resolve().parents[1]
TRADER = str(Path(sys.executable).parent/'trader')
SYMS = ('AAPL', 'MSFT')
HIST_END = pd.Timestamp('2012-06-28', tz='UTC')
SESSIONS = ['2012-06-29', '2012-07-02', '2012-07-03', '2012-07-05', '2012-07-06', '2012-07-09', '2012-07-10']
DAY_S = 6.0                      # real seconds per simulated day
RATE = 86400/DAY_S
LOAD_S = 10.0                    # a launch until READY on an idle machine (8-11 s measured); the clock stands still meanwhile
START = pd.Timestamp('2012-06-29 15:00', tz=NY).tz_convert('UTC')
STOP_AT = pd.Timestamp('2012-07-06 11:00', tz=NY).tz_convert('UTC')     # SIGTERM: Friday mid-session, before its bar

def q(home, sql, params=()):
    c = sqlite3.connect(Path(home)/'trader.db', timeout=30)
    try: return c.execute(sql, params).fetchall()
    finally: c.close()

def committed(home):
    try: r = q(home, 'SELECT run_id, last_bar_ts FROM loop_state')
    except sqlite3.OperationalError: return None, None           # not created yet
    return (r[0][0], pd.Timestamp(r[0][1], tz='UTC')) if r and r[0][1] is not None else (None, None)

def bar_days(home, rid):
    return [pd.Timestamp(t, tz='UTC').strftime('%Y-%m-%d') for (t,) in q(home, "SELECT ts FROM run_series WHERE run_id = ? AND series = 'equity' ORDER BY ts", (rid,))]

@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "A home with the sample history up to 2012-06-28 and two prepared models (always BUY both, always SELL both)."
    from trader.core.config import load_settings
    from trader.core.data import load_sample
    from trader.core.quality import DataQualityGate
    from trader.core.registry import Registry
    from trader.core.store import Store
    from trader.research.train import fixed_action_model
    home = tmp_path_factory.mktemp('service-alpaca')
    env = {'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(home/'trader.toml'),
           'APCA_API_KEY_ID': KEY, 'APCA_API_SECRET_KEY': SECRET}
    (home/'trader.toml').write_text('[train]\nn_steps = 64\nbatch_size = 64\nn_epochs = 1\ncheckpoint_every = 0\n\n'
                                    '[service]\nheartbeat_s = 3600.0\nlease_ttl = 30.0\n')
    s = load_settings(env=env)
    with Store(settings=s) as store:
        store.ingest(DataQualityGate().check(load_sample(list(SYMS), end=HIST_END), source='sample'))
        models = {a: fixed_action_model(store, s, a, SYMS, note=f'service alpaca: always {a}') for a in (8, 0)}
        Registry(store, s).set_champion(models[8], 'service alpaca: start buying')
    return {'home': home, 'env': env, 'models': models, 'settings': s}

class Ticker:
    "Moves the fake's market along its clock every 20 ms (sessions open and close on time even when nobody calls)."
    def __init__(self, fake):
        self.fake, self._stop = fake, threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True); self.t.start()
    def _run(self):
        while not self._stop.wait(0.02): self.fake.tick()
    def close(self): self._stop.set(); self.t.join(2)

def launch(world, fake, clock, log:Path, notify:NotifyListener) -> subprocess.Popen:
    env = {**os.environ, **world['env'], 'TRADER_ALPACA_TRADING_URL': fake.url, 'NO_PROXY': '127.0.0.1,localhost', 'no_proxy': '127.0.0.1,localhost',
           'NOTIFY_SOCKET': notify.path}
    cmd = [TRADER, 'paper', '--broker', 'alpaca', '--model', 'champion', '--live', '--clock', clock.spec()]
    return subprocess.Popen(cmd, stdout=open(log, 'w'), stderr=subprocess.STDOUT, env=env, cwd=ROOT)

def start_on_ready(p, log, notify:NotifyListener, n0:int, clock, launched:float) -> float:
    "Wait for the service's READY=1 (after message `n0`), then start `clock` (the fake's) at the epoch it sent; returns that epoch."
    ready = lambda: next((m for _, m in notify.msgs[n0:] if m.startswith('READY=1')), None)
    wait_for(p, log, 'READY=1', ready, hang_guard(LOAD_S))
    fields = dict(l.split('=', 1) for l in ready().splitlines())
    assert 'X_CLOCK_EPOCH' in fields, ready()
    epoch = clock.begin(float(fields['X_CLOCK_EPOCH']))
    print(f"service ready {epoch - launched:.1f}s after its launch; the clock started then")
    return epoch

def wait_for(p, log, what, cond, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond(): return
        assert p.poll() is None, f"the service exited ({p.returncode}) while waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")

def test_live_service_on_alpaca_fake_weekend_holiday_sigterm_resume(world, tmp_path):
    from trader.core.data import load_sample, BAR_COLUMNS
    from trader.core.registry import Registry
    from trader.core.store import Store
    from trader.live.service import ScaledClock
    home, s = world['home'], world['settings']
    raw = load_sample(list(SYMS), start='2012-06-29', end='2012-07-31')[BAR_COLUMNS]
    fake = FakeAlpaca(auto_market=True)
    fake.daily = alpaca_daily(raw)
    fake.prices = {r.symbol: r.close for r in load_sample(list(SYMS), start='2012-06-28', end='2012-06-28').itertuples()}
    with serve(fake):
        with open(home/'trader.toml', 'a') as f: f.write(f'\n[alpaca]\ndata_url = "{fake.url}"\n')
        fake.opg_window = False              # see the module's docstring: asserted below on the side the service decides
        clock = ScaledClock(START, RATE, epoch='ready')                 # stands at START until the service is ready
        fake.clock_fn = clock.now
        sent, create = [], fake._create
        fake._create = lambda b: (sent.append((b.get('client_order_id', ''), fake.clock())), create(b))[1]
        ticker, notify = Ticker(fake), NotifyListener()
        try:
            # ---- the first run: through the weekend and the holiday, SIGTERM on Friday 07-06 mid-session --------------
            log1 = tmp_path/'first.out'
            t_launch, n0 = time.time(), len(notify.msgs)
            p = launch(world, fake, clock, log1, notify)
            epoch1 = start_on_ready(p, log1, notify, n0, clock, t_launch)
            wait_for(p, log1, 'the bar of 2012-07-05', lambda: (committed(home)[1] or HIST_END) >= pd.Timestamp('2012-07-05', tz='UTC'), hang_guard(7*DAY_S))
            rid = committed(home)[0]
            wait_for(p, log1, 'Friday 07-06 mid-session', lambda: clock.now() >= STOP_AT, hang_guard(DAY_S))
            before = bar_days(home, rid)
            t0 = time.monotonic(); p.send_signal(signal.SIGTERM)
            fake.now = clock.now()                   # the world stands still from the stop until the restart
            rc = p.wait(hang_guard(4)); stop_s = time.monotonic() - t0       # 2-4 s idle: the summary, then the interpreter's exit
            out1 = log1.read_text()
            _test_eq(rc, 0)
            after = bar_days(home, rid)
            print(f"\nfirst run: stopped {stop_s:.2f}s after SIGTERM, sent at {fake.now.tz_convert(NY):%a %Y-%m-%d %H:%M} New York; bars {after}")
            assert len(after) - len(before) <= 1, (before, after)       # within one bar: the bar in progress, no more
            assert ('rehearsal: simulated clock from 2012-06-29 19:00:00+00:00 at 14400x real time (loopback Alpaca); '
                    'it starts when the service is ready') in out1 and 'stopped (SIGTERM)' in out1, out1
            _test_eq(after, SESSIONS[:len(after)])             # a bar per session: none on the weekend or on July 4th, none skipped
            assert SESSIONS.index('2012-07-05') < len(after) < len(SESSIONS), after
            _test_eq(q(home, 'SELECT COUNT(*) FROM leases')[0][0], 0)                     # released
            _test_eq(q(home, "SELECT id, status FROM runs WHERE kind = 'paper'"), [(rid, 'running')])
            # heartbeats between bars: while it waited through the weekend (last bar Friday 06-29) and July 4th (last bar 07-03)
            hb = q(home, 'SELECT bar_ts FROM heartbeats WHERE run_id = ?', (rid,))
            by_bar = collections.Counter(pd.Timestamp(b, tz='UTC').strftime('%Y-%m-%d') if b is not None else None for (b,) in hb)
            weekend, holiday, night = by_bar['2012-06-29'], by_bar['2012-07-03'], by_bar['2012-07-02']
            print('heartbeats by last committed bar:', dict(by_bar))
            # one per simulated hour of waiting (~72 h, ~48 h, ~24 h), less the simulated time the service's own work takes (a
            # real millisecond is 14 simulated seconds): at least one per 6 hours, which only heartbeats stalling for more than a
            # real second each fall short of; a service that slept through a wait without heartbeats would write one
            assert weekend >= 72/6 and holiday >= 48/6 and night >= 24/6, by_bar
            # the service followed the market: bars handed over at 19:00 New York, orders filled at the next open
            # ---- the restart: resumes from the last committed bar, finishes the sessions (now selling) ------------------
            with Store(f"sqlite:///{home}/trader.db", settings=s) as st: Registry(st, s).set_champion(world['models'][0], 'service alpaca: sell')
            restart_at = fake.now
            clock = ScaledClock(restart_at, RATE, epoch='ready')
            fake.clock_fn, fake.now = clock.now, None
            log2 = tmp_path/'second.out'
            t_launch, n0 = time.time(), len(notify.msgs)
            p = launch(world, fake, clock, log2, notify)
            epoch2 = start_on_ready(p, log2, notify, n0, clock, t_launch)
            wait_for(p, log2, 'the bar of 2012-07-10', lambda: committed(home)[1] >= pd.Timestamp(SESSIONS[-1], tz='UTC'), hang_guard(5*DAY_S))
            wait_for(p, log2, 'an hour after the last bar', lambda: clock.now() >= pd.Timestamp(f'{SESSIONS[-1]} 20:00', tz=NY), hang_guard(DAY_S))
            p.send_signal(signal.SIGTERM)
            fake.now = clock.now()
            _test_eq(p.wait(hang_guard(4)), 0)
            out2 = log2.read_text()
            assert f'paper run {rid} (resumed' in out2 and 'stopped (SIGTERM)' in out2, out2
        finally:
            ticker.close(); notify.close()
            print('orders sent (New York time):', [(c[-18:], t.tz_convert(NY).strftime('%a %m-%d %H:%M')) for c, t in sent])
            if p.poll() is None: p.kill()
        _test_eq(bar_days(home, rid), SESSIONS)
        sessions = [json.loads(d) for (d,) in q(home, "SELECT payload FROM audit_log WHERE kind = 'session' ORDER BY seq")]
        _test_eq([e.get('event') for e in sessions], ['started', 'stopped', 'resumed', 'stopped'])
        # a rehearsal says so, with the clock as it ran: the epoch is the one READY carried
        _test_eq(sessions[0]['rehearsal_clock'], f'2012-06-29T19:00:00+00:00@14400@{epoch1:.6f}')
        _test_eq(sessions[2]['rehearsal_clock'], f'{restart_at.isoformat()}@14400@{epoch2:.6f}')
        assert restart_at.tz_convert(NY).strftime('%a %m-%d') == 'Fri 07-06', restart_at
        _test_eq(q(home, 'SELECT COUNT(*) FROM leases')[0][0], 0)

        # ---- the market: sessions opened and closed on XNYS days only, the half day's early close -----------------------
        log = [(k, t.tz_convert(NY).strftime('%Y-%m-%d %H:%M')) for k, t in fake.market_log]
        _test_eq(log[0], ('close', '2012-06-29 16:00'))                       # the clock started at 15:00 on Friday
        _test_eq(sorted({t[:10] for _, t in log[1:]}), SESSIONS[1:])         # then every session to 07-10, open and close
        _test_eq(len(log), 1 + 2*len(SESSIONS[1:]))
        assert ('close', '2012-07-03 13:00') in log and ('open', '2012-07-05 09:30') in log and not any(t.startswith('2012-07-04') for _, t in log), log

        # ---- ledger = broker; each order sent after its bar's hand-over, filled at the next open; no client_order_id twice --
        (state,), = q(home, 'SELECT state FROM loop_state WHERE run_id = ?', (rid,))
        st = json.loads(state)
        broker_pos = {sym: fake.positions.get(sym, [0.0])[0] for sym in SYMS}
        assert dict(zip(SYMS, st['shares'])) == pytest.approx(broker_pos, abs=1e-9), (st['shares'], broker_pos)
        assert st['cash'] == pytest.approx(fake.cash, abs=1e-6), (st['cash'], fake.cash)
        ours = [o for o in fake.orders.values() if o['client_order_id'].startswith(rid + '-')]
        sides = collections.Counter(o['side'] for o in ours)
        assert sides['buy'] >= 2 and sides['sell'] >= 2, sides                # bought in the first run, sold after the restart
        import exchange_calendars as xcals
        cal = xcals.get_calendar('XNYS', start='2012-01-01')
        for o in ours:
            sub = pd.Timestamp(o['submitted_at'])
            # sent after its bar's 19:00 New York hand-over (the bar's date is in the client_order_id: RUN-YYYYMMDDHHMM-SYMBOL);
            # how long after is the machine's speed at this clock rate (printed above), not asserted
            bar = pd.Timestamp(o['client_order_id'][len(rid) + 1:].split('-')[0][:8])
            assert o['time_in_force'] == 'opg' and sub >= pd.Timestamp(f'{bar:%Y-%m-%d} 19:00', tz=NY), o
            if o['status'] == 'filled':
                _test_eq(pd.Timestamp(o['filled_at']), cal.next_open(sub))
        filled = [o for o in ours if o['status'] == 'filled']
        assert len(filled) >= len(ours) - 2, collections.Counter(o['status'] for o in ours)   # the last bar's orders wait for 07-11
        ledger = q(home, 'SELECT client_order_id FROM run_orders WHERE run_id = ?', (rid,))
        _test_eq(sorted(c for (c,) in ledger), sorted(o['client_order_id'] for o in filled))
        posted = collections.Counter(r.body['client_order_id'] for r in fake.posts())
        assert posted and max(posted.values()) == 1, posted.most_common(3)
        assert not fake.problems, fake.problems
