"""The resume policy after a guardian halt (issue 18): `RiskSettings.halt_resume_sessions`.

In research a guardian halt may be lifted after N sessions, at the caution level, so that one halt does not zero out the
rest of a test window; live sessions keep the plans' manual resume (`trader resume`). On the AAPL+MSFT sample, with the
plans' limits and a policy that always buys (30% of each), the guardian fires at the close of 2011-05-16 and, resumed,
again and again in the August 2011 sell-off:

* the engine: with N = 3 the halt lasts to the start of the third session after the firing (2011-05-19), trading resumes
  at the caution level (the first decision grows positions by half), the 3-day rule counts from the resume, the peak is
  kept, and the resume is a risk event; with N = 0 the halt lasts to the end; the kill switch and the max-drawdown halt
  are never lifted; the compiled kernel does the same bar for bar (the hypothesis property test with the policy is in
  nbs/13a_engine.ipynb);
* live: the trading loop as a live session builds it (`auto_resume` off) stays halted with N = 3 until `trader resume`'s
  control, and a drill replay through `paper_session` stays halted to its end;
* parity: a backtest and a SimBroker paper replay of a prepared always-BUY model with N = 3, over 2011-05-02..2011-12-30,
  give the same equity at every bar (1e-9 relative), the same orders and the same risk events, firings and resumes.
"""
import numpy as np
import pandas as pd
import pytest
from fastcore.test import test_eq as _test_eq
from trader.core.config import RiskSettings, load_settings
from trader.core.data import load_sample
from trader.core.domain import RunKind
from trader.research.features import build_features
from trader.research.engine import (BarPrices, KernelState, MarketArrays, SimExecution, TradingEngine, engine_advance_nb, engine_step_nb,
                                    kernel_params, market_arrays, _value_nb, _HALT, _LEVEL, _CAUT)

WINDOW = '2011-05-02:2011-12-30'
FIRED, RESUMED = '2011-05-16', '2011-05-19'       # the first firing (at the close) and, with N = 3, the resume

@pytest.fixture(scope='module')
def fs():
    return build_features(load_sample(['AAPL', 'MSFT']), ['AAPL', 'MSFT'])

def _bar(fs, t): return BarPrices(str(fs.ts[t].date()), fs.open[t].tolist(), fs.close[t].tolist(), fs.close[t - 1].tolist())

def walk(fs, limits, lo='2011-05-02', hi='2011-06-30', kill_at=None, guardian=True):
    "Always ask for 30% of each; per bar (day, halted, level, targets after the decision, events); `kill_at`: the kill switch at that day's open."
    e, ex, rows = TradingEngine(2, 100_000, limits, guardian=guardian, names=('AAPL', 'MSFT'), lot=1), SimExecution(), []
    a0, a1 = fs.index_of(lo), fs.index_of(hi)
    for t in range(a0, a1 + 1):
        b = _bar(fs, t)
        a = e.advance(b, ex, kill='test' if b.day == kill_at else None)
        d = e.decide(b, (0.3, 0.3), None, ex, place=t < a1)
        rows.append((b.day, e.state.halted, e.state.level, tuple(e.state.targets), a.events + d.events, e.value(fs.close[t])))
    return e, pd.DataFrame(rows, columns=['day', 'halted', 'level', 'targets', 'events', 'equity']).set_index('day')

def resumes(frame): return [(day, ev.detail) for day, evs in frame.events.items() for ev in evs if 'resume' in ev.detail]

@pytest.mark.parametrize('n,resumed', [(1, '2011-05-17'), (3, RESUMED)])
def test_engine_resumes_after_n_sessions_at_caution(fs, n, resumed):
    e, r = walk(fs, RiskSettings(halt_resume_sessions=n))
    fired = [day for day, evs in r.events.items() for ev in evs if ev.kind == 'guardian']
    _test_eq(fired[0], FIRED)
    halted = r.loc[FIRED:resumed, 'halted'].tolist()
    _test_eq(halted, [True]*(len(halted) - 1) + [False])           # halted from the firing to the N-th session after it
    _test_eq(r.loc[resumed, ['level', 'targets']].tolist(), [2, (0.15, 0.15)])   # caution: the increase sized at half
    nxt = r.index[r.index.get_loc(resumed) + 1]
    _test_eq(r.loc[nxt, 'targets'], (0.3, 0.3))                 # the next session: the level is the guardian's verdict again
    day, detail = resumes(r)[0]
    _test_eq((day, detail['resume'], detail['sessions']), (resumed, f'auto-resume after {n} sessions', n))
    assert detail['halt_reason'].startswith('at the close: 3-day P&L')
    # the peak is the account's: the pre-halt high-water mark is kept through the resume
    assert e.state.peak >= r.loc[:FIRED, 'equity'].max() - 1e-6

def test_engine_resume_resets_the_three_day_window(fs):
    "With N = 1 the loss that fired the guardian is still in its 3-day window at the resume: it counts from the resume instead."
    lim = RiskSettings(halt_resume_sessions=1)
    e = TradingEngine(2, 100_000, lim, names=('AAPL', 'MSFT'), lot=1)
    ex = SimExecution()
    for t in range(fs.index_of('2011-05-02'), fs.index_of('2011-05-17') + 1):
        b = _bar(fs, t)
        a = e.advance(b, ex)
        if b.day == '2011-05-17':
            assert not e.state.halted and not a.fired
            flat = e.value(fs.close[t - 1])
            assert all(abs(c[1] - flat) < 1e-6 for c in e.state.closes), e.state.closes
        e.decide(b, (0.3, 0.3), None, ex)

def test_engine_manual_rule_and_other_halts(fs):
    e0, r0 = walk(fs, RiskSettings(halt_resume_sessions=0))
    assert r0.loc[FIRED:, 'halted'].all() and not resumes(r0)    # N = 0: the plans' rule, halted to the end of the window
    ek, rk = walk(fs, RiskSettings(halt_resume_sessions=1), hi='2011-05-13', kill_at='2011-05-05')
    assert rk.loc['2011-05-05':, 'halted'].all() and not resumes(rk) and not ek.state.resumable   # the kill switch: a person's
    em, rm = walk(fs, RiskSettings(halt_resume_sessions=1, max_drawdown=0.02), guardian=False)
    assert rm.halted.any() and rm.halted.iloc[-1] and not resumes(rm) and not em.state.resumable   # the max-drawdown halt

def test_kernel_equals_engine_through_resumes(fs):
    lim = RiskSettings(halt_resume_sessions=3)
    day, atr, corr = market_arrays(fs)
    op, cl = np.ascontiguousarray(fs.open), np.ascontiguousarray(fs.close)
    ks, P = KernelState.new(100_000, 2), kernel_params(lim, 1.0, 2.0, True, lot=1.0)
    e, ex = TradingEngine(2, 100_000, lim, 1.0, 2.0, guardian=True, names=('AAPL', 'MSFT'), lot=1), SimExecution()
    mkt = MarketArrays(fs)
    lo, hi = fs.index_of('2011-05-02'), fs.index_of('2011-12-30')
    e.advance(_bar(fs, lo), ex)
    engine_advance_nb(ks.s, ks.shares, ks.targets, ks.opened, ks.pending, lo, op, cl, day, P)
    n_resumes, worst = 0, 0.0
    for t in range(lo, hi):
        e.decide(_bar(fs, t), (0.3, 0.3), mkt.at(t), ex); a = e.advance(_bar(fs, t + 1), ex)
        n_resumes += sum('resume' in x.detail for x in a.events)
        engine_step_nb(ks.s, ks.shares, ks.targets, ks.opened, ks.pending, np.array([0.3, 0.3]), t, op, cl, day, atr, corr, P)
        eq = e.value(fs.close[t + 1])
        worst = max(worst, abs(eq - _value_nb(ks.s, ks.shares, cl[t + 1]))/eq)
        _test_eq((bool(ks.s[_HALT]), int(ks.s[_LEVEL]), bool(ks.s[_CAUT]), ks.shares.tolist()),
                 (e.state.halted, e.state.level, e.state.caution, e.state.shares))
    assert worst < 1e-9 and n_resumes >= 3, (worst, n_resumes)

# ---------------------------------------------------------------------------------------------------------------------
# the trading loop
@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    "A home with the sample, N = 3 in its settings, and a prepared model that always buys both assets."
    from trader.core.quality import DataQualityGate
    from trader.core.store import Store
    from trader.research.train import fixed_action_model
    home = tmp_path_factory.mktemp('resume')
    s = load_settings({'TRADER_HOME': str(home)}, risk={'halt_resume_sessions': 3})
    store = Store(settings=s)
    store.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
    mid = fixed_action_model(store, s, 3**2 - 1, ('AAPL', 'MSFT'), note='resume policy test: always BUY both')
    return s, store, mid

def risk_events(store, run_id) -> list:
    ev = store.frame('SELECT bar_ts, kind, level, detail FROM risk_events WHERE run_id = ? ORDER BY id', (run_id,))
    return [(str(ts.date()), k, int(l), 'resume' in d) for ts, k, l, d in zip(store.ts_series(ev.bar_ts), ev.kind, ev.level, ev.detail)]

def test_paper_replay_equals_backtest_with_the_policy(prepared):
    from trader.research.backtest import backtest
    from trader.live.loop import paper_session
    from trader.core.runs import Runs
    s, store, mid = prepared
    bt = backtest(mid, WINDOW, settings=s, store=store, baselines=False)
    out = paper_session('sim', mid, WINDOW, settings=s, store=store, tag='resume policy parity')
    be, pe = bt.equity, Runs(store).load(out['run_id']).equity
    assert len(be) == len(pe) > 100 and (be.index == pe.index).all()
    rel = float(((pe - be).abs()/be).max())
    assert rel < 1e-9, f'max relative difference {rel:.2e}'
    po = Runs(store).load(out['run_id']).orders
    _test_eq(len(po), len(bt.orders))
    np.testing.assert_allclose(po.qty.to_numpy(), bt.orders.qty.to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(po.price.to_numpy(), bt.orders.price.to_numpy(), rtol=1e-12)
    # the same firings and resumes, at the same bars
    ev_bt = [(str(ts.date()), k, int(l), 'resume' in d) for ts, k, l, d in zip(bt.risk_events.bar_ts, bt.risk_events.kind, bt.risk_events.level, bt.risk_events.detail)]
    ev_p = risk_events(store, out['run_id'])
    _test_eq(ev_p, ev_bt)
    fired = [e[0] for e in ev_bt if e[1] == 'guardian']
    resumed = [e[0] for e in ev_bt if e[3]]
    print(f'backtest vs paper replay, halt_resume_sessions=3, {WINDOW}: max relative equity difference {rel:.1e} over {len(be)} bars, '
          f'{len(po)} orders, guardian fired {len(fired)}x, resumed {len(resumed)}x')
    assert fired[0] == FIRED and resumed[0] == RESUMED and len(fired) >= 3 and len(resumed) >= 3, (fired, resumed)
    assert any(o > pd.Timestamp(RESUMED, tz='UTC') for o in bt.orders.ts[bt.orders.tag == '']), 'trading resumed'

def test_live_session_waits_for_manual_resume(prepared):
    from trader.core.runs import Runs
    from trader.live.controls import set_control
    from trader.live.execution import SimulatedMarket
    from trader.live.feeds import ReplayFeed
    from trader.live.loop import TradingLoop, auto_resume, make_broker, paper_session
    from trader.live.monitor import LoopMetrics
    s, store, mid = prepared
    syms = ('AAPL', 'MSFT')
    # which sessions lift a halt by themselves: a replay on the simulated broker only
    _test_eq([auto_resume('sim', None), auto_resume('alpaca', None), auto_resume('alpaca', WINDOW), auto_resume('sim', WINDOW, {'name': 'x'}),
              auto_resume('sim', WINDOW)], [False, False, False, False, True])
    # the loop as a live session builds it (paper_session passes auto_resume('alpaca' or 'sim', None) = False), fed stored bars
    lo, hi = pd.Timestamp('2011-05-02', tz='UTC'), pd.Timestamp('2011-06-30', tz='UTC')
    rid = Runs(store).create(RunKind.PAPER, list(syms), None, lo, hi, {'test': 'live rule'})
    b = make_broker('sim', store, rid, s, 100_000.0, s.env.fees_bps, s.env.slippage_bps)
    loop = TradingLoop(store, b, ReplayFeed(store, syms, lo, hi), rid, syms, mid, s, LoopMetrics(), lo - pd.Timedelta(seconds=1), SimulatedMarket(b))
    assert s.risk.halt_resume_sessions == 3 and loop.engine.limits.halt_resume_sessions == 0
    seen = []
    loop.run(max_bars=20, on_bar=lambda r: seen.append((str(r['ts'].date()), r['halted'], r['level'])))
    halted = [d for d, h, l in seen if h]
    _test_eq(halted[0], FIRED)
    assert all(h for d, h, l in seen if d >= FIRED) and sum(d > FIRED for d in halted) >= 5, seen   # N = 3 would have resumed on the 19th
    set_control(store, '0', 'test: manual resume')
    loop.run(max_bars=1, on_bar=lambda r: seen.append((str(r['ts'].date()), r['halted'], r['level'])))
    _test_eq(seen[-1][1:], (False, 0))                     # `trader resume`: trading resumes at the next bar
    # a drill replays like a live session: its halt waits for a person too
    out = paper_session('sim', mid, '2011-05-02:2011-06-30', settings=s, store=store, drill={'name': 'resume test'}, tag='resume policy drill')
    assert out['state'].halted and out['state'].halt_reason.startswith('at the close: 3-day P&L')
    assert not any(r for *_, r in risk_events(store, out['run_id']))
