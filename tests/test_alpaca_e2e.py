"""Acceptance 1 of issue 11: the trading loop on Alpaca's rules, end to end, against the loopback fake.

The full `TradingLoop` (built as `paper_session` builds it for broker 'alpaca': `make_broker('alpaca', ...)` gives an
`AlpacaBroker` pointed at the fake by TRADER_ALPACA_TRADING_URL, and an `AlpacaFeed` on `settings.alpaca.data_url` inside a
`ResilientFeed`) trades AAPL and MSFT through `tests/fake_alpaca.py` over simulated sessions of July 2012, on the real sample
prices (bokeh sample, `load_sample`). The store holds the history up to 2012-06-29; Alpaca's bars begin after it, with a
synthetic 2:1 AAPL split on 2012-07-02 (raw prices halved from that day, and the split in corporate actions).

Each session the test moves the fake's clock and market: the open at 09:30 New York (waiting `opg` orders fill at the open
price), the close at 16:00 (DAY orders expire), then 19:05, when the feed hands over the day's bar and the loop processes it
(fills booked, a decision, whole-share `opg` orders for the next open). The champion alternates between two prepared
models (always BUY both / always SELL both), so every session trades, at targets that would be fractional shares.

Along the way: a partial fill (half of an AAPL order fills at the open, the rest expires), an expired order (an MSFT order
that does not fill at all), more than 500 orders of another strategy already in the account and more arriving during a
session (reconciliation must page), a SIGKILL of the loop's process right after Alpaca accepted an order and before the
bar was committed, then a restart whose look-up of the order misses once, so the order is posted again and refused with 422
code 40010001 (a duplicate submission, adopted). At the end: the ledger (the run's committed cash and shares) equals the
broker (the fake's cash and positions), every client_order_id was accepted once, and the history the loop started from
shows no split "move".
"""
from __future__ import annotations
import collections, json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np, pandas as pd, pytest
from fake_alpaca import KEY, SECRET, FakeAlpaca, alpaca_daily, ny, serve

SYMS = ('AAPL', 'MSFT')
HIST_END = pd.Timestamp('2012-06-29', tz='UTC')
SPLIT = pd.Timestamp('2012-07-02', tz='UTC')
N_SESSIONS = 10
PARTIAL, EXPIRE, CROWD, KILL = 2, 4, 5, 7      # session indexes of the events

# ---------------------------------------------------------------------------------------------------------------------
# the loop, built as paper_session builds it for broker 'alpaca'

def build_loop(s, store, run_id:str, clock):
    "TradingLoop on AlpacaBroker (make_broker) and AlpacaFeed; the loop takes its history from `feed_history` (the feed's price basis)."
    from trader.live.loop import LiveMarket, TradingLoop, make_broker
    from trader.live.alpaca import AlpacaFeed
    from trader.live.feeds import ResilientFeed
    from trader.live.monitor import LoopMetrics

    broker = make_broker('alpaca', store, run_id, s, 100_000.0, 0.0, 0.0)
    feed = ResilientFeed(AlpacaFeed(SYMS, settings=s, clock=clock), None, stale_after=300)
    return TradingLoop(store, broker, feed, run_id, SYMS, 'champion', s, LoopMetrics(), HIST_END, LiveMarket())   # its history: feed_history

def child_main():
    "In a subprocess: process the bar due at the clock given in argv (the test kills it with SIGKILL mid-bar)."
    from trader.core.config import load_settings
    from trader.core.store import Store
    now = pd.Timestamp(sys.argv[2])
    s = load_settings()
    with Store(settings=s) as store:
        loop = build_loop(s, store, sys.argv[1], lambda: now)
        print('ready', flush=True)
        loop.run()
    print('finished', flush=True)

# ---------------------------------------------------------------------------------------------------------------------
# the market

def market_bars() -> pd.DataFrame:
    "Alpaca's raw daily bars of July 2012: the sample's, with AAPL split 2:1 from 2012-07-02."
    from trader.core.data import BAR_COLUMNS, load_sample
    raw = load_sample(list(SYMS), start='2012-06-01', end='2012-08-31')[BAR_COLUMNS]
    m = (raw.symbol == 'AAPL') & (raw.ts >= SPLIT)
    raw.loc[m, ['open', 'high', 'low', 'close']] /= 2
    raw.loc[m, 'volume'] *= 2
    return raw

@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "A home with the sample history up to 2012-06-29 and two prepared models (BUY both, SELL both); the fake's market."
    from trader.core.config import load_settings
    from trader.core.data import load_sample
    from trader.core.quality import DataQualityGate
    from trader.core.registry import Registry
    from trader.core.store import Store
    from trader.research.train import fixed_action_model
    home = tmp_path_factory.mktemp('alpaca-e2e')
    t0 = time.perf_counter()
    env = {'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(home/'trader.toml'),
           'APCA_API_KEY_ID': KEY, 'APCA_API_SECRET_KEY': SECRET}
    (home/'trader.toml').write_text('[train]\nn_steps = 64\nbatch_size = 64\nn_epochs = 1\ncheckpoint_every = 0\n')
    s = load_settings(env=env)
    with Store(settings=s) as store:
        store.ingest(DataQualityGate().check(load_sample(list(SYMS), end=HIST_END), source='sample'))
        models = {a: fixed_action_model(store, s, a, SYMS, note=f'alpaca e2e: always {a}') for a in (8, 0)}
        Registry(store, s).set_champion(models[8], 'alpaca e2e: start buying')
    print(f"\nprepared in {time.perf_counter() - t0:.1f}s: models {models}")
    return {'home': home, 'env': env, 'models': models}

def sessions(raw:pd.DataFrame) -> list[pd.Timestamp]:
    return sorted(raw[raw.ts >= SPLIT].ts.unique())[:N_SESSIONS]

def prices(raw, day, col) -> dict[str, float]:
    r = raw[raw.ts == day]
    return dict(zip(r.symbol, r[col]))

# ---------------------------------------------------------------------------------------------------------------------

def test_trading_loop_end_to_end_on_alpaca_rules(world, monkeypatch, tmp_path):
    from trader.core.config import load_settings
    from trader.core.domain import RunKind
    from trader.core.registry import Registry
    from trader.core.runs import Runs
    from trader.core.store import Store
    from trader.live.journal import Journal
    from trader.live.loop import LoopState

    raw = market_bars()
    days = sessions(raw)
    fake = FakeAlpaca(prices=prices(raw, days[0], 'open'))
    fake.daily, fake.now = alpaca_daily(raw[raw.ts <= days[-1]]), ny(f'{days[0]:%Y-%m-%d} 08:00')
    fake.actions = [{'type': 'forward_split', 'symbol': 'AAPL', 'ex_date': '2012-07-02', 'new_rate': 2.0, 'old_rate': 1.0}]
    fake.add_orders(650, ny('2012-06-01 10:00'), prefix='other')        # another strategy's history: > 500 orders already
    for k, v in world['env'].items(): monkeypatch.setenv(k, v)
    for k in ('NO_PROXY', 'no_proxy'): monkeypatch.setenv(k, '127.0.0.1,localhost')

    with serve(fake):
        monkeypatch.setenv('TRADER_ALPACA_TRADING_URL', fake.url)
        with open(world['home']/'trader.toml', 'a') as f: f.write(f'\n[alpaca]\ndata_url = "{fake.url}"\n')
        s = load_settings()
        store = Store(settings=s)
        reg = Registry(store, s)
        run_id = Runs(store).create(RunKind.PAPER, list(SYMS), None, None, None,
                                    {'broker': 'alpaca', 'model': 'champion', 'replay': None, 'symbols': list(SYMS), 'tag': 'e2e'})
        mine = lambda o: o['client_order_id'].startswith(run_id + '-')
        loop, first_history, killed = None, None, None
        for i, day in enumerate(days):
            d = f'{day:%Y-%m-%d}'
            # the session: the open fills waiting orders (a partial fill, an order that does not fill at all), the close
            if i == PARTIAL: fake.fill_share = lambda o: 0.5 if mine(o) and o['symbol'] == 'AAPL' else 1.0
            if i == EXPIRE: fake.fill_share = lambda o: 0.0 if mine(o) and o['symbol'] == 'MSFT' else 1.0
            fake.now = ny(f'{d} 09:30'); fake.open_session(fake.now, prices(raw, day, 'open'))
            fake.fill_share = None
            fake.now = ny(f'{d} 16:00'); fake.close_session(fake.now, prices(raw, day, 'close'))
            if i == CROWD: fake.add_orders(520, ny(f'{d} 17:00'), step=pd.Timedelta(seconds=1), prefix='other')
            # the evening: the champion changes (BUY both <-> SELL both), the bar is handed over, the loop processes it
            reg.set_champion(world['models'][8 if i % 2 == 0 else 0], f'alpaca e2e: session {i}')
            fake.now = ny(f'{d} 19:05')
            if i == KILL:
                loop = None                   # the service's process dies mid-bar: a subprocess killed right after Alpaca took an order
                killed = kill_mid_bar(fake, run_id, fake.now, mine, tmp_path)
                fake.lookup_lag = 1           # the restart's look-up misses the order once: posted again, refused with 40010001
            if loop is None: loop = build_loop(s, store, run_id, lambda: fake.now)
            summary = loop.run()
            if first_history is None: first_history = loop._h['close'][:loop._n].copy()     # the stored history + the first live bar
            assert summary['bars'] == 1, (d, summary)
            assert loop.state.last_ts == str(day), (d, loop.state.last_ts)

        # ---- ledger = broker -------------------------------------------------------------------------------------
        st = LoopState.from_json(Journal(store, run_id, SYMS, reg).load_state())
        broker_pos = {sym: fake.positions.get(sym, [0.0])[0] for sym in SYMS}
        assert dict(zip(SYMS, st.shares)) == pytest.approx(broker_pos, abs=1e-9), (st.shares, broker_pos)
        assert st.cash == pytest.approx(fake.cash, abs=1e-6), (st.cash, fake.cash)
        ours = [o for o in fake.orders.values() if mine(o)]
        filled = [o for o in ours if float(o['filled_qty']) > 0]
        ledger = store.frame('SELECT client_order_id, qty, price FROM run_orders WHERE run_id = ?', (run_id,))
        assert set(ledger.client_order_id) == {o['client_order_id'] for o in filled}
        for o in filled:                     # each order booked exactly as Alpaca filled it: its filled quantity at its average price
            rows = ledger[ledger.client_order_id == o['client_order_id']]
            q = rows.qty.abs().sum()
            assert q == pytest.approx(float(o['filled_qty'])) and (rows.qty.abs()*rows.price).sum()/q == pytest.approx(float(o['filled_avg_price']))

        # ---- what happened at the broker -------------------------------------------------------------------------
        accepted = collections.Counter(r.body['client_order_id'] for r in fake.posts() if r.status == 200)
        assert accepted and max(accepted.values()) == 1                              # no client_order_id accepted twice
        assert collections.Counter(o['client_order_id'] for o in fake.orders.values()).most_common(1)[0][1] == 1
        refused = [r for r in fake.posts() if r.status == 422]
        assert len(refused) == 1 and refused[0].body['client_order_id'] == killed['cid']   # the duplicate submission, adopted
        assert all(float(r.body['qty']) == int(float(r.body['qty'])) for r in fake.posts() if r.body['time_in_force'] == 'opg')
        assert len(ours) >= 2*(N_SESSIONS - 1) - 2                                   # it traded (nearly) every session
        statuses = collections.Counter((o['status'], float(o['filled_qty']) > 0) for o in ours)
        assert statuses[('expired', True)] >= 1 and statuses[('expired', False)] >= 1, statuses   # a partial fill; an expired order
        assert not fake.problems, fake.problems
        lists = [r.params for r in fake.calls('GET', '/v2/orders') if r.params.get('status') == 'all']
        print('order listings:', [(p.get('after'), p['limit']) for p in lists])
        assert [p for p in lists if 'after' not in p] == lists[:1]        # only the first bar reads the whole account (650 orders: 2 pages)
        assert pd.Timestamp(lists[1]['after']) < pd.Timestamp(days[0])
        assert all(p['limit'] == '500' and p['direction'] == 'asc' for p in lists)
        crowd = pd.Timestamp(f'{days[CROWD]:%Y-%m-%d}', tz='UTC')        # the bar after the crowd reads 520 + ours since its last bar: 2 pages
        assert sum(pd.Timestamp(p['after']) >= crowd for p in lists if 'after' in p) >= 2
        # ---- one price basis: the split between the stored history and the first live bar is not a move ---------
        aapl = first_history[:, SYMS.index('AAPL')]
        r = aapl[1:]/aapl[:-1] - 1
        assert np.nanmax(np.abs(r[-250:])) < 0.15                                     # no 50% "move" at the first live bar
        assert aapl[-2] == pytest.approx(prices(raw, HIST_END, 'close')['AAPL']/2) and aapl[-1] == prices(raw, days[0], 'close')['AAPL']
        assert killed['returncode'] == -signal.SIGKILL
        store.close()

def kill_mid_bar(fake:FakeAlpaca, run_id:str, now, mine, tmp_path) -> dict:
    "Run the loop for the bar due at `now` in a subprocess; SIGKILL it as soon as Alpaca has accepted its first order."
    log = tmp_path/'child.log'
    code = f"import sys; sys.path[:0] = [{str(Path(__file__).parent)!r}]; import test_alpaca_e2e as t; t.child_main()"
    with open(log, 'w') as out:
        p = subprocess.Popen([sys.executable, '-c', code, run_id, now.isoformat()], stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        got = {}
        def on_accept(o):
            if mine(o) and not got:
                got['cid'] = o['client_order_id']
                os.kill(p.pid, signal.SIGKILL)        # before Alpaca's answer reaches the loop, before the bar is committed
        fake.on_accept = on_accept
        try: rc = p.wait(timeout=300)
        finally:
            fake.on_accept = None
            if p.poll() is None: p.kill()
    assert got, f"the child sent no order before it ended (exit {rc}):\n{log.read_text()[-3000:]}"
    return {**got, 'returncode': rc}
