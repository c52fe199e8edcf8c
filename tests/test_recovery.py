"""Crash recovery of the paper-trading loop, end to end (the issue's acceptance test).

"Kill the replay at 10 random points (restarting each time); the final ledger equals an uninterrupted run's; no
client_order_id appears twice at the broker; `trader audit verify` passes."

How:

* A store is prepared once: the AAPL+MSFT sample, a small trained model that trades dozens of times over the holdout
  (champion), and two prepared models before it in the champion lineage (so a guardian rollback has somewhere to go, and a
  rollback done twice would be visible).
* Reference: an uninterrupted `trader paper` replay of the holdout (the real console script) in a copy of the prepared home.
* Crash run, in another copy: `trader paper ... --speed 200` is started, killed with SIGKILL, restarted with the same
  arguments, 11 times (one kill at start-up or on the first bar, ten while bars are being processed), then left to finish;
  `trader audit verify` (the console script) at the end. The kill points are drawn with a seeded random: a target bar
  spread over the replay, and a way of killing: from outside after a random delay, from outside as soon as the store shows the broker ahead of the ledger (an order or an
  open that the loop has not committed), or at an exact point inside the process (it sends itself SIGKILL right after the
  broker accepted an order, right after the broker filled orders at the open, inside the bar's transaction after the ledger
  rows were written, right after a bar committed, right after the guardian's model rollback).
* The restarts are forked from a process that has already imported `trader` (a multiprocessing fork server), so that eleven
  restarts do not pay eleven times the ~8 s import; each one is a separate OS process running `trader.ops.cli.main` with the
  `trader paper` arguments, exactly what the console script runs, and it dies by a real SIGKILL.

Checked against the reference: the ledger (run_orders) row for row, every run series (equity, cash, shares, weights, P&L) at
every bar, the decisions, the risk events, the per-bar audit entries, the orders at the broker, the champion history; and
no client_order_id twice at the broker, every filled broker order in the ledger exactly once, the run 'done', one paper run
only, >= 10 processes that died by SIGKILL, `trader audit verify` exit 0. Two variants: guardian off (orders keep flowing
all through the replay) and guardian on (it fires mid-replay: flatten, halt, rollback; kills are aimed at that bar too).

A third run has partial fills: the simulated broker (`PartialSimBroker`, patched in for `SimBroker` in the forked processes)
fills half of each market-on-open order at the open and expires the rest at the close; kills land right after a partial
fill, right after an expiry, inside and after the commit; the ledger must book exactly each order's filled half, once, at
its price, as the uninterrupted run with the same broker does.
"""
import json, math, multiprocessing as mp, os, random, re, shutil, signal, sqlite3, subprocess, sys, time
from pathlib import Path
import pandas as pd
import pytest

TRADER = str(Path(sys.executable).parent/'trader')
WINDOW = '2012-01-03:2013-03-01'
PAPER = ['paper', '--broker', 'sim', '--model', 'champion', '--replay', WINDOW, '-q']
SPEED = '200'                    # bars per second for the crash runs: the ~291 bars take ~1.5 s, so kills land mid-run
SEED = 20240611
TOML = '[train]\nn_steps = 128\nbatch_size = 64\nn_epochs = 2\ncheckpoint_every = 0\n\n[risk]\nguardian = {g}\n'
MIN_ORDERS = 24                  # "dozens of orders" over the holdout

# ---------------------------------------------------------------------------------------------------------------------
# processes: the real console script for the references and `audit verify`; forked `trader.ops.cli.main` for the crash runs
def _env(home) -> dict:
    return {'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(Path(home)/'trader.toml')}

def trader(home, *args, timeout=120):
    "The `trader` console script in a subprocess."
    return subprocess.run([TRADER, *args], capture_output=True, text=True, env={**os.environ, **_env(home)}, timeout=timeout)

_CTX = []
def _ctx():
    if not _CTX:
        ctx = mp.get_context('forkserver')
        # the fork server imports these once; every child starts from there (this module: for `_child` below)
        ctx.set_forkserver_preload([__name__, 'trader.ops.cli', 'trader.live.loop', 'trader.live.journal', 'trader.research.train', 'sb3_contrib', 'torch._dynamo'])
        _CTX.append(ctx)
    return _CTX[0]

def _die(): os.kill(os.getpid(), signal.SIGKILL)

def _arm(hook:dict):
    "In the child: the broker of hook['partial'] (if given), and SIGKILL at an exact point of the first bar at or after hook['from_ns']."
    from trader.live import broker as B, journal as J
    from trader.core import registry as R, runs as RU
    if hook.get('partial'):       # `trader paper --broker sim` gets a broker that fills part of each market-on-open order
        import functools
        from trader.live import loop as L
        L.SimBroker = functools.partial(B.PartialSimBroker, **hook['partial'])
    if 'at' not in hook: return
    t0, at = pd.Timestamp(hook['from_ns'], tz='UTC'), hook['at']
    if at == 'expire':           # the broker has expired the unfilled rest of orders at the close; the ledger does not know yet
        orig_close = B.PartialSimBroker.on_close
        def on_close(self, ts, closes):
            n = len(self._orders(('new', 'partially_filled')))
            orig_close(self, ts, closes)
            if pd.Timestamp(ts) >= t0 and len(self._orders(('new', 'partially_filled'))) < n: _die()
        B.PartialSimBroker.on_close = on_close
    elif at == 'order':            # the broker has accepted (committed) an order of a bar the loop has not committed
        orig_submit = B.SimBroker.submit
        def submit(self, o):
            st = orig_submit(self, o)
            if o.bar_ts is not None and pd.Timestamp(o.bar_ts) >= t0: _die()
            return st
        B.SimBroker.submit = submit
    elif at == 'fill':           # the broker has filled market-on-open orders; the ledger does not have them yet
        orig_open = B.SimBroker.on_open
        def on_open(self, ts, opens):
            r = orig_open(self, ts, opens)
            if r and pd.Timestamp(ts) >= t0: _die()
            return r
        B.SimBroker.on_open = on_open
    elif at == 'mid_commit':     # inside the bar's transaction: ledger rows written, not committed
        orig_fills = RU.Runs.append_fills
        def append_fills(self, run_id, fills):
            orig_fills(self, run_id, fills)
            if fills and pd.Timestamp(fills[0]['ts']) >= t0: _die()
        RU.Runs.append_fills = append_fills
    elif at == 'after_commit':   # the bar is committed; the next one not started
        orig_commit = J.Journal.commit
        def commit(self, rec, *a, **kw):
            orig_commit(self, rec, *a, **kw)
            if rec.ts >= t0: _die()
        J.Journal.commit = commit
    elif at == 'rollback':       # the guardian has just rolled the champion back
        orig_set = R.Registry.set_champion
        def set_champion(self, model_id, reason, action='set', metrics=None):
            r = orig_set(self, model_id, reason, action, metrics)
            if action == 'rollback': _die()
            return r
        R.Registry.set_champion = set_champion
    else: raise ValueError(at)

def _child(argv, env, log, hook=None):
    "Entry point of a forked child: `trader <argv>` as the console script runs it, output to `log`."
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1); os.dup2(fd, 2)
    if hook: _arm(hook)
    from trader.ops.cli import main
    rc = main(argv)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(rc)

def fork_trader(home, argv, log, hook=None):
    p = _ctx().Process(target=_child, args=(list(argv), _env(home), str(log), hook), daemon=True)
    p.start()
    return p

def run_forked(home, argv, log, timeout=120) -> int:
    p = fork_trader(home, argv, log)
    p.join(timeout)
    if p.is_alive(): p.kill(); p.join(5); pytest.fail(f"`trader {' '.join(argv)}` did not end within {timeout}s")
    if p.exitcode != 0: pytest.fail(f"`trader {' '.join(argv)}` exited {p.exitcode}:\n{Path(log).read_text()[-3000:]}")
    return p.exitcode

# ---------------------------------------------------------------------------------------------------------------------
# reading a store (sqlite3 directly: WAL, so reading never blocks the loop)
def _db(home) -> str: return str(Path(home)/'trader.db')

def q(home, sql, params=()):
    c = sqlite3.connect(_db(home), timeout=30)
    try: return c.execute(sql, params).fetchall()
    finally: c.close()

def paper_runs(home): return q(home, "SELECT id, status FROM runs WHERE kind = 'paper' ORDER BY created")

def snapshot(home) -> dict:
    "Everything the two runs must agree on, with the run id replaced by RUN."
    (rid, status), = paper_runs(home)
    norm = lambda v: json.loads(json.dumps(v).replace(rid, 'RUN')) if v is not None else None
    ledger = q(home, 'SELECT seq, ts, symbol, side, qty, price, fees, slippage, client_order_id, decision_ts, reference_price, status '
                     'FROM run_orders WHERE run_id = ? ORDER BY seq', (rid,))
    series = {}
    for name, ts, v in q(home, 'SELECT series, ts, value FROM run_series WHERE run_id = ? ORDER BY series, ts', (rid,)):
        series.setdefault(name, []).append((ts, v))
    broker = q(home, 'SELECT client_order_id, symbol, side, qty, order_type, status, bar_ts, reference_price, filled_ts, fill_price, fees '
                     'FROM broker_orders WHERE broker = ? ORDER BY bar_ts, client_order_id', (f'sim-{rid}',))
    decisions = q(home, 'SELECT ts, action, label, confidence, model_id, targets, breaches FROM run_decisions WHERE run_id = ? ORDER BY ts', (rid,))
    events = q(home, 'SELECT bar_ts, kind, level, detail FROM risk_events WHERE run_id = ? ORDER BY id', (rid,))
    audit = [(k, json.loads(p)) for k, p in q(home, 'SELECT kind, payload FROM audit_log ORDER BY seq')]
    per_bar = [(k, p) for k, p in audit if p.get('run_id') == rid and k not in ('session', 'model_load')]
    (state,), = q(home, 'SELECT state FROM loop_state WHERE run_id = ?', (rid,))[0:1] or [(None,)]
    return {'run_id': rid, 'status': status,
            'ledger': [tuple(norm(list(r))) for r in ledger], 'series': series,
            'broker': [tuple(norm(list(r))) for r in broker],
            'broker_ids': [r[0] for r in q(home, 'SELECT client_order_id FROM broker_orders WHERE broker = ?', (f'sim-{rid}',))],
            'decisions': [tuple(norm(list(r))) for r in decisions],
            'events': [(b, k, l, norm(json.loads(d))) for b, k, l, d in events],
            'audit_per_bar': norm(per_bar),
            'champions': [tuple(r) for r in q(home, 'SELECT model_id, previous, action FROM champion_history ORDER BY seq')],
            'state': json.loads(state) if state else None,
            'broker_cash': q(home, 'SELECT cash FROM broker_accounts WHERE broker = ?', (f'sim-{rid}',))[0][0],
            'broker_pos': {s: v for s, v in q(home, 'SELECT symbol, qty FROM broker_positions WHERE broker = ?', (f'sim-{rid}',)) if v != 0}}

def close(a, b, rel=1e-9) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None: return a is b
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    return a == b

def first_diff(a:list, b:list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if not close(x, y): return f"row {i}: crash run {x!r} != reference {y!r}"
    return f"lengths differ: crash run {len(a)}, reference {len(b)}"

# ---------------------------------------------------------------------------------------------------------------------
# preparation
def _write_toml(home, guardian:bool): (Path(home)/'trader.toml').write_text(TOML.format(g='true' if guardian else 'false'))

def copy_home(src, dst, guardian:bool):
    shutil.copytree(src, dst)
    _write_toml(dst, guardian)
    return dst

def reference_runs(base, dsts:dict) -> dict:
    "Uninterrupted replays with the real console script, in copies of `base` (guardian off and on, side by side)."
    procs = {}
    for guardian, dst in dsts.items():
        home = copy_home(base, dst, guardian)
        procs[guardian] = (home, subprocess.Popen([TRADER, *PAPER, '--speed', 'max'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                  text=True, env={**os.environ, **_env(home)}))
    out = {}
    for guardian, (home, p) in procs.items():
        try: _, err = p.communicate(timeout=180)
        except subprocess.TimeoutExpired: p.kill(); p.communicate(); pytest.fail('the reference replay did not end within 180 s')
        assert p.returncode == 0, err
        out[guardian] = snapshot(home)
        assert out[guardian]['status'] == 'done'
    return out

@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    "A home with the sample, champion lineage [P, A, B] (B: a trained model that trades often), and the two references."
    from trader.core.config import load_settings
    from trader.core.store import Store
    from trader.research.train import fixed_action_model
    root = tmp_path_factory.mktemp('recovery')
    base = root/'base'; base.mkdir()
    _write_toml(base, False)
    t0 = time.perf_counter()
    run_forked(base, ['ingest', '--source', 'sample', '--symbols', 'AAPL,MSFT', '-q'], root/'ingest.log')
    s = load_settings(env=_env(base))
    with Store(settings=s) as store:
        before = [fixed_action_model(store, s, a, ('AAPL', 'MSFT'), note=f'recovery test: lineage {a}') for a in (0, 4)]
    for m in before: run_forked(base, ['models', 'champion', m], root/'champion.log')
    for seed in (0, 1, 2):
        log = root/f'train{seed}.log'
        run_forked(base, ['train', '--symbols', 'AAPL,MSFT', '--steps', '1024', '--seed', str(seed), '-q'], log)
        model = re.search(r'registered (\S+):', Path(log).read_text()).group(1)
        run_forked(base, ['models', 'champion', model], root/'champion.log')
        refs = reference_runs(base, {False: root/f'ref-off-{seed}', True: root/f'ref-on-{seed}'})
        if len(refs[False]['ledger']) >= MIN_ORDERS: break
    else: pytest.fail(f"no 1024-step model traded >= {MIN_ORDERS} times over the holdout")
    print(f"\nprepared in {time.perf_counter() - t0:.1f}s: model {model} (seed {seed}), lineage {before + [model]}; "
          f"references: guardian off {len(refs[False]['ledger'])} fills, guardian on {len(refs[True]['ledger'])} fills")
    return {'root': root, 'base': base, 'model': model, 'lineage': before + [model], 'ref_off': refs[False], 'ref_on': refs[True]}

# ---------------------------------------------------------------------------------------------------------------------
# the crash loop
def bar_times(ref) -> list[int]:
    return [ts for ts, _ in ref['series']['equity']]

def events_from_ref(ref, times) -> dict:
    "Bars (indexes) where the reference had something for each in-process kill point."
    idx = {t: i for i, t in enumerate(times)}
    broker = ref['broker']   # (cid, symbol, side, qty, order_type, status, bar_ts, ref price, filled_ts, fill_price, fees)
    out = {'order': sorted({idx[o[6]] for o in broker if o[6] in idx}),
           'fill': sorted({idx[o[8]] for o in broker if o[4] == 'opg' and o[5] == 'filled' and o[8] in idx}),
           'mid_commit': sorted({idx[r[1]] for r in ref['ledger'] if r[1] in idx}),
           'after_commit': list(range(len(times))),
           'rollback': sorted({idx[b] for b, k, *_ in ref['events'] if k == 'guardian' and b in idx})}
    return out

class Probe:
    "Where the crash run is, read from its store."
    def __init__(self, home, times):
        self.c = sqlite3.connect(_db(home), timeout=30, isolation_level=None)
        self.idx = {t: i for i, t in enumerate(times)}
        self.rid = None
    def run_id(self):
        if self.rid is None:
            r = self.c.execute("SELECT id FROM runs WHERE kind = 'paper'").fetchall()
            if r: self.rid = r[0][0]
        return self.rid
    def committed(self) -> int:
        "Index of the last committed bar (-1: none)."
        if self.run_id() is None: return -1
        r = self.c.execute('SELECT last_bar_ts FROM loop_state WHERE run_id = ?', (self.rid,)).fetchall()
        return self.idx.get(r[0][0], -1) if r else -1
    def broker_opened(self) -> int:
        "Index of the last bar the broker opened (filled market-on-open orders at)."
        if self.run_id() is None: return -1
        r = self.c.execute('SELECT last_bar_ts FROM broker_accounts WHERE broker = ?', (f'sim-{self.rid}',)).fetchall()
        return self.idx.get(r[0][0], -1) if r and r[0][0] is not None else -1
    def landing(self) -> dict:
        "What the store holds after a kill: committed bar, broker ahead of the ledger or not."
        c = self.committed()
        if self.run_id() is None: return {'committed': -1, 'run': False}
        last = [t for t, i in self.idx.items() if i == c]
        ahead = self.c.execute('SELECT client_order_id, status, order_type FROM broker_orders WHERE broker = ? AND bar_ts > ?',
                               (f'sim-{self.rid}', last[0] if last else -1)).fetchall()
        unledgered = self.c.execute("SELECT COUNT(*) FROM broker_orders b WHERE b.broker = ? AND b.filled_qty > 0 AND NOT EXISTS "
                                    "(SELECT 1 FROM run_orders r WHERE r.run_id = ? AND r.client_order_id = b.client_order_id)",
                                    (f'sim-{self.rid}', self.rid)).fetchone()[0]
        champ = self.c.execute('SELECT model_id FROM champion_history ORDER BY seq DESC LIMIT 1').fetchone()[0]
        return {'committed': c, 'run': True, 'broker_opened': self.broker_opened(), 'orders_ahead': len(ahead),
                'fills_not_in_ledger': unledgered, 'champion': champ}
    def close(self): self.c.close()

def plan_kills(rng, n_bars, events, n=10, guardian_bar=None) -> list[dict]:
    "A start-up kill, then n kills at target bars spread over the replay, each with a way of killing."
    modes = ['timed', 'poll_order', 'poll_open', 'order', 'fill', 'mid_commit', 'after_commit']
    if guardian_bar is None:
        kinds = modes + [rng.choice(['timed', 'timed', 'order', 'poll_order']) for _ in range(n - len(modes))]
        rng.shuffle(kinds)
        edges = [2 + (n_bars - 8)*k//n for k in range(n + 1)]
        targets = [rng.randrange(edges[k], edges[k + 1]) for k in range(n)]
    else:
        # before the guardian fires: spread; at its bar: the flatten order, the rollback, inside the commit, after it;
        # after it (halted, nothing traded): spread again
        g = guardian_bar
        pre = 4
        kinds = rng.sample(modes, pre) + ['order', 'rollback', 'mid_commit', 'after_commit']
        edges = [2 + (g - 4)*k//pre for k in range(pre + 1)]
        targets = [rng.randrange(edges[k], edges[k + 1]) for k in range(pre)] + [g]*4
        rest = n - len(kinds)
        edges = [g + 2 + (n_bars - g - 8)*k//rest for k in range(rest + 1)]
        kinds += ['timed']*rest
        targets += [rng.randrange(edges[k], edges[k + 1]) for k in range(rest)]
    return [{'kind': 'startup', 'delay': rng.uniform(0.02, 0.3)}] + \
           [{'kind': k, 'target': t, 'jitter': rng.uniform(0.0, 0.008)} for k, t in zip(kinds, targets)]

def crash_loop(home, ref, plan, logdir, events, extra:dict|None=None) -> list[dict]:
    "Start, kill, restart as planned (every process armed with `extra` too, e.g. a partial-fill broker); returns one record per process."
    times = bar_times(ref)
    probe = Probe(home, times)
    records = []
    try:
        for k, spec in enumerate(plan):
            c0 = probe.committed()
            kind, hook, how = spec['kind'], None, ''
            if kind in ('order', 'fill', 'mid_commit', 'after_commit', 'rollback', 'expire'):
                # the first bar at or after the target (and after the last committed one) where the reference had that event
                frm = [i for i in events[kind] if i >= max(spec['target'], c0 + 1)]
                if frm: hook = {'at': kind, 'from_ns': times[frm[0]]}; how = f"in-process at '{kind}' from bar {frm[0]}"
                else: kind = 'timed'
            log = Path(logdir)/f'run{k:02d}.log'
            t_start = time.perf_counter()
            p = fork_trader(home, [*PAPER, '--speed', SPEED], log, {**(extra or {}), **(hook or {})} or None)
            deadline = t_start + 30
            if kind == 'startup':
                time.sleep(spec['delay']); how = f"{spec['delay']*1e3:.0f} ms after start"
                os.kill(p.pid, signal.SIGKILL)
            elif hook is None:
                # from outside: wait for the target bar (and progress past the last committed bar), then kill
                goal = max(spec['target'], c0 + 1)
                while p.is_alive() and probe.committed() < goal and time.perf_counter() < deadline: time.sleep(0.0005)
                if kind == 'timed':
                    time.sleep(spec['jitter']); how = f"{spec['jitter']*1e3:.1f} ms after bar {goal} was committed"
                else:
                    # as soon as the broker is ahead of the ledger: an order (poll_order) or an open (poll_open) of an uncommitted bar
                    t1 = time.perf_counter()
                    how = f"{kind}: first moment the broker was ahead of the ledger after bar {goal}"
                    while p.is_alive() and time.perf_counter() < min(deadline, t1 + 0.25):
                        c = probe.committed()
                        if c >= len(times) - 4: how += ' (near the end: killed now)'; break    # never let it finish
                        if kind == 'poll_open' and probe.broker_opened() > c: break
                        if kind == 'poll_order' and probe.run_id() and probe.c.execute(
                                'SELECT 1 FROM broker_orders WHERE broker = ? AND bar_ts > ? LIMIT 1',
                                (f'sim-{probe.rid}', times[c] if c >= 0 else -1)).fetchall(): break
                    else: how += ' (not seen within 0.25 s: killed anyway)'
                if p.is_alive(): os.kill(p.pid, signal.SIGKILL)
            p.join(max(1.0, deadline - time.perf_counter()))
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL); p.join(5)
                how += ' (TIMEOUT: killed by the deadline)'
            rec = {'k': k, 'kind': kind, 'how': how, 'rc': p.exitcode, 'seconds': time.perf_counter() - t_start,
                   'committed_before': c0, **probe.landing()}
            records.append(rec)
            day = lambda i: 'none' if i < 0 else f"{i} ({pd.Timestamp(times[i], tz='UTC'):%Y-%m-%d})"
            print(f"  kill {k:2d} {kind:<12} rc {rec['rc']} at {rec['seconds']:.2f}s; last committed bar {day(c0)} -> {day(rec['committed'])}"
                  + (f"; broker had opened bar {rec['broker_opened']}, {rec['orders_ahead']} order(s) and {rec['fills_not_in_ledger']} fill(s) "
                     f"not in the ledger" if rec['run'] else '; no run yet') + f"; {how}")
            if p.exitcode not in (-signal.SIGKILL,):
                pytest.fail(f"restart {k} ended with {p.exitcode} instead of being killed:\n{log.read_text()[-3000:]}")
    finally: probe.close()
    return records

def check_against(crash:dict, ref:dict, records:list[dict], home):
    assert crash['status'] == 'done'
    assert len(paper_runs(home)) == 1, f"restarts created new runs: {paper_runs(home)}"
    killed = [r for r in records if r['rc'] == -signal.SIGKILL]
    assert len(killed) >= 10, f"only {len(killed)} processes died by SIGKILL"
    # the ledger, row for row (client_order_ids exactly, with the run id replaced)
    assert len(crash['ledger']) == len(ref['ledger']) and close(crash['ledger'], ref['ledger']), \
        'ledger differs: ' + first_diff(crash['ledger'], ref['ledger'])
    assert [r[8] for r in crash['ledger']] == [r[8] for r in ref['ledger']]
    # every series at every bar
    assert crash['series'].keys() == ref['series'].keys()
    for name in ref['series']:
        a, b = crash['series'][name], ref['series'][name]
        assert [t for t, _ in a] == [t for t, _ in b], f"{name}: bars differ"
        assert close([v for _, v in a], [v for _, v in b]), f"{name}: " + first_diff([v for _, v in a], [v for _, v in b])
    # the broker: no client_order_id twice, nothing more or less than the reference sent, every fill in the ledger once
    ids = crash['broker_ids']
    assert len(ids) == len(set(ids)), 'a client_order_id appears twice at the broker'
    assert close(crash['broker'], ref['broker']), 'broker orders differ: ' + first_diff(crash['broker'], ref['broker'])
    filled = sorted(o[0] for o in crash['broker'] if o[5] == 'filled')
    in_ledger = [r[8] for r in crash['ledger']]
    assert sorted(in_ledger) == filled and len(set(in_ledger)) == len(in_ledger)
    assert close(crash['broker_cash'], ref['broker_cash']) and close(crash['broker_pos'], ref['broker_pos'])
    assert close(crash['state']['cash'], crash['broker_cash'], 1e-9)
    # the decisions, risk events, per-bar audit entries and the champion history: as if nothing had happened
    assert close(crash['decisions'], ref['decisions']), 'decisions differ: ' + first_diff(crash['decisions'], ref['decisions'])
    assert close(crash['events'], ref['events']), 'risk events differ: ' + first_diff(crash['events'], ref['events'])
    assert close(crash['audit_per_bar'], ref['audit_per_bar']), 'audit entries differ: ' + first_diff(crash['audit_per_bar'], ref['audit_per_bar'])
    assert crash['champions'] == ref['champions'], f"champion history differs: {crash['champions']} != {ref['champions']}"
    st, rs = dict(crash['state']), dict(ref['state'])
    for k in ('halted_at', 'control_seen'): st.pop(k, None); rs.pop(k, None)
    assert close(st, rs), f"loop state differs: { {k: (st[k], rs.get(k)) for k in st if not close(st[k], rs.get(k))} }"
    # the audit chain
    r = trader(home, 'audit', 'verify')
    assert r.returncode == 0, r.stdout + r.stderr

def crash_and_check(prepared, ref, guardian:bool, name:str):
    root = prepared['root']
    home = copy_home(prepared['base'], root/f'crash-{name}', guardian)
    logdir = root/f'logs-{name}'; logdir.mkdir()
    times = bar_times(ref)
    events = events_from_ref(ref, times)
    rng = random.Random(f'{SEED}-{name}')
    g = events['rollback'][0] if guardian else None
    plan = plan_kills(rng, len(times), events, 10, g)
    print(f"\n{name}: {len(times)} bars, reference {len(ref['ledger'])} fills" + (f", guardian fires at bar {g}" if g is not None else ''))
    t0 = time.perf_counter()
    records = crash_loop(home, ref, plan, logdir, events)
    # the last restart, left to finish
    log = logdir/'final.log'
    run_forked(home, [*PAPER, '--speed', SPEED], log)
    out = log.read_text()
    assert 'resumed' in out, out
    print(f"{name}: {sum(x['rc'] == -9 for x in records)} kills, finished in {time.perf_counter() - t0:.1f}s: {out.splitlines()[0]}")
    crash = snapshot(home)
    check_against(crash, ref, records, home)
    mid = [x for x in records if x['committed'] >= 0 and (x['orders_ahead'] or x['broker_opened'] > x['committed'] or x['fills_not_in_ledger'])]
    assert mid, 'no kill landed with the broker ahead of the ledger'
    return records

# ---------------------------------------------------------------------------------------------------------------------
def test_kill_and_resume_guardian_off(prepared):
    "Orders flow all through the replay; 11 kills (1 at start-up, 10 mid-replay); the result is the uninterrupted run's."
    ref = prepared['ref_off']
    assert len(ref['ledger']) >= MIN_ORDERS
    crash_and_check(prepared, ref, False, 'guardian-off')

def test_kill_and_resume_guardian_on(prepared):
    "The guardian fires mid-replay (flatten, halt, rollback within the bar): kills at that bar too."
    ref = prepared['ref_on']
    fired = [e for e in ref['events'] if e[1] == 'guardian']
    # the prepared model and the holdout are fixed (seeded training, the sample's bars): the guardian fires on this host, and
    # a change that stops it firing must fail here rather than skip the test that checks recovery through it
    assert fired, f"the guardian did not fire with the prepared model over {WINDOW}: nothing to recover through ({len(ref['events'])} risk events)"
    assert isinstance(fired[0][3].get('rollback'), dict), f"the reference's guardian did not roll back: {fired[0]}"
    crash_and_check(prepared, ref, True, 'guardian-on')

# ---------------------------------------------------------------------------------------------------------------------
PARTIAL = {'fraction': 0.5, 'then': 'expired'}

def run_forked_with(home, argv, log, hook, timeout=180):
    p = fork_trader(home, argv, log, hook)
    p.join(timeout)
    if p.is_alive(): p.kill(); p.join(5); pytest.fail(f"`trader {' '.join(argv)}` did not end within {timeout}s")
    if p.exitcode != 0: pytest.fail(f"`trader {' '.join(argv)}` exited {p.exitcode}:\n{Path(log).read_text()[-3000:]}")

def broker_fills(home, rid) -> dict:
    "Per client_order_id at the broker: (qty, filled_qty, average fill price, fees, status)."
    return {c: (q_, f, p, fe, st) for c, q_, f, p, fe, st in
            q(home, 'SELECT client_order_id, qty, filled_qty, fill_price, fees, status FROM broker_orders WHERE broker = ?', (f'sim-{rid}',))}

def check_partial_ledger(home, snap):
    "The ledger books each order's filled quantity exactly once (in parts that add up), at its average price; the loop's cash is the broker's."
    fills = broker_fills(home, snap['run_id'])
    per = {}
    for r in snap['ledger']:     # (seq, ts, symbol, side, qty, price, fees, slippage, client_order_id, ...)
        v = per.setdefault(r[8].replace('RUN', snap['run_id']), [0.0, 0.0, 0.0]); v[0] += r[4]; v[1] += r[4]*r[5]; v[2] += r[6]
    assert set(per) == {c for c, v in fills.items() if v[1] > 0}
    for c, (qty, filled, price, fees, status) in fills.items():
        if filled > 0:
            assert math.isclose(per[c][0], filled, rel_tol=1e-12), (c, per[c], filled)
            assert math.isclose(per[c][1]/filled, price, rel_tol=1e-9) and math.isclose(per[c][2], fees, rel_tol=1e-9, abs_tol=1e-12)
    assert close(snap['state']['cash'], snap['broker_cash'], 1e-9)
    assert close(dict(zip(('AAPL', 'MSFT'), snap['state']['shares'])), {s: snap['broker_pos'].get(s, 0.0) for s in ('AAPL', 'MSFT')})
    return fills

def test_partial_fills_kill_and_resume(prepared):
    "Half of each market-on-open order fills at the open, the rest expires at the close; killed around that, the resumed run's ledger is the uninterrupted one's."
    root = prepared['root']
    ref_home = copy_home(prepared['base'], root/'partial-ref', False)
    run_forked_with(ref_home, [*PAPER, '--speed', 'max'], root/'partial-ref.log', {'partial': PARTIAL})
    ref = snapshot(ref_home)
    assert ref['status'] == 'done'
    fills = check_partial_ledger(ref_home, ref)
    part = [c for c, (qty, filled, *_ , st) in fills.items() if st == 'expired' and 0 < filled < qty]
    assert len(part) >= 10, f"only {len(part)} partially filled and expired orders"
    assert all(v[1] == math.floor(v[0]*0.5) for v in fills.values() if v[4] == 'expired')     # whole shares, half rounded down
    times = bar_times(ref)
    idx = {t: i for i, t in enumerate(times)}
    opg = sorted({idx[o[8]] for o in ref['broker'] if o[4] == 'opg' and o[8] in idx})       # bars whose open filled part of an order
    events = {'fill': opg, 'expire': opg, 'mid_commit': sorted({idx[r[1]] for r in ref['ledger'] if r[1] in idx}), 'after_commit': list(range(len(times)))}
    rng = random.Random(f'{SEED}-partial')
    kinds = ['fill', 'expire', 'mid_commit', 'after_commit', 'fill', 'expire', 'poll_open', 'timed']
    edges = [2 + (len(times) - 8)*k//len(kinds) for k in range(len(kinds) + 1)]
    plan = [{'kind': 'startup', 'delay': rng.uniform(0.02, 0.3)}] + \
           [{'kind': k, 'target': rng.randrange(edges[i], edges[i + 1]), 'jitter': rng.uniform(0.0, 0.008)} for i, k in enumerate(kinds)]
    home = copy_home(prepared['base'], root/'partial-crash', False)
    logdir = root/'logs-partial'; logdir.mkdir()
    print(f"\npartial fills: {len(times)} bars, reference {len(ref['ledger'])} booked fills, {len(part)} orders partly filled then expired")
    records = crash_loop(home, ref, plan, logdir, events, extra={'partial': PARTIAL})
    run_forked_with(home, [*PAPER, '--speed', SPEED], logdir/'final.log', {'partial': PARTIAL})
    crash = snapshot(home)
    assert crash['status'] == 'done' and len(paper_runs(home)) == 1
    assert sum(r['rc'] == -signal.SIGKILL for r in records) >= 8
    assert sum(r['kind'] in ('fill', 'expire') for r in records) >= 3, [r['kind'] for r in records]
    assert any(r.get('fills_not_in_ledger') for r in records), 'no kill landed with a partial fill at the broker and not in the ledger'
    check_partial_ledger(home, crash)
    assert close(crash['ledger'], ref['ledger']), 'ledger differs: ' + first_diff(crash['ledger'], ref['ledger'])
    assert len(crash['broker_ids']) == len(set(crash['broker_ids']))
    assert close(crash['broker'], ref['broker']), 'broker orders differ: ' + first_diff(crash['broker'], ref['broker'])
    for name in ref['series']:
        assert close([v for _, v in crash['series'][name]], [v for _, v in ref['series'][name]]), name
    assert close(crash['audit_per_bar'], ref['audit_per_bar']), 'audit entries differ: ' + first_diff(crash['audit_per_bar'], ref['audit_per_bar'])
    r = trader(home, 'audit', 'verify')
    assert r.returncode == 0, r.stdout + r.stderr
