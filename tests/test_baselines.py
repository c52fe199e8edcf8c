"""Baselines on equal terms (issue 18): every baseline is a schedule of target weights judged by the engine as the model is.

- `simulate_weights` of a constant equal-weight schedule is `buy_and_hold` (exactly, once the one sizing difference is removed);
  with the rules and the guardian off its equity is vectorbt's simulation of its orders to 1e-9; with the rules on a schedule
  asking for more than `risk.max_position` is cut;
- every choice a baseline makes reads the training window only: moving the test window's bars changes none;
- an experiment stores the four baselines per fold, with the guardian as set and off, and `trader experiment show NAME --json`
  carries them under `buy_hold`, `vol_target`, `ma_cross`, `supervised`, with the data-snooping figures over them (the SPA test
  against buy-and-hold's stored test returns, the model confidence set with the stored baselines as candidates); an experiment
  stored before them still shows.
"""
import json, os, subprocess, sys
from dataclasses import replace
from pathlib import Path
import numpy as np, pandas as pd
import pytest
from fastcore.test import test_eq as _test_eq

SYMS = ['AAPL', 'MSFT']
TEST = (pd.Timestamp('2010-01-01', tz='UTC'), pd.Timestamp('2010-12-31', tz='UTC'))
TRAIN = (pd.Timestamp('2003-01-02', tz='UTC'), pd.Timestamp('2009-12-21', tz='UTC'))

@pytest.fixture(scope='module')
def data():
    from trader.core.config import load_settings
    from trader.core.data import load_sample
    from trader.research.features import build_features
    from trader.research.engine import MarketArrays
    s = load_settings()
    bars = load_sample(SYMS)
    bars = bars[bars.ts <= TEST[1]]
    fs = build_features(bars, SYMS)
    return s, bars, fs, MarketArrays(fs, s.env.corr_window)

def _vbt_gap(fs, frame, orders, s) -> float:
    from trader.research.backtest import vectorbt_portfolio
    pf = vectorbt_portfolio(fs, frame, orders, 100_000.0, s.env.fees_bps, s.env.slippage_bps)
    return float(np.max(np.abs(pf.value().to_numpy()[2::3] - frame.equity.to_numpy())/frame.equity.to_numpy()))

def test_constant_schedule_is_buy_and_hold(data):
    "Rules and guardian off, whole shares both: the same equity at every bar once the first open equals the deciding close."
    from trader.research.backtest import simulate_weights, buy_and_hold
    s, _, fs, market = data
    lo = fs.window(*TEST).start
    w = np.full((len(fs), 2), 0.5)
    # buy_and_hold sizes at the open it fills at (Book.rebalance), the engine at the close it decides at: make them one price
    fs0 = replace(fs, open=fs.open.copy()); fs0.open[lo + 1] = fs.close[lo]
    frame, orders, _ = simulate_weights(w, fs0, *TEST, s.risk, 100_000.0, 1.0, 2.0, guardian=False, risk_checks=False, lot=1.0, market=market)
    bh = buy_and_hold(fs0, *TEST, 100_000.0, 1.0, 2.0, lot=1.0)
    _test_eq(list(frame.index), list(bh.index))
    assert np.max(np.abs(frame.equity.to_numpy() - bh.to_numpy())) < 1e-9
    _test_eq(len(orders), 2)                                       # constant targets: bought once, held
    # on the real bars the one difference is the share count: floor(0.5 x cash / deciding close) against / next open
    frame, orders, _ = simulate_weights(w, fs, *TEST, s.risk, 100_000.0, 1.0, 2.0, guardian=False, risk_checks=False, lot=1.0, market=market)
    _test_eq(orders.signed_qty.tolist(), [float(np.floor(50_000/c)) for c in fs.close[lo]])
    bh = buy_and_hold(fs, *TEST, 100_000.0, 1.0, 2.0, lot=1.0)
    assert abs(frame.equity.iloc[-1]/bh.iloc[-1] - 1) < 0.01

def test_rules_off_equals_vectorbt(data):
    "A schedule that trades every 10 bars, rules and guardian off: vectorbt's simulation of the orders is the engine's equity to 1e-9."
    from trader.research.backtest import simulate_weights
    s, _, fs, market = data
    rng = np.random.default_rng(1)
    w = np.full((len(fs), 2), np.nan)
    w[::10] = rng.uniform(0, 0.5, (len(w[::10]), 2))
    for lot in (1.0, 0.0):
        frame, orders, events = simulate_weights(w, fs, *TEST, s.risk, 100_000.0, 1.0, 2.0, guardian=False, risk_checks=False, lot=lot, market=market)
        assert len(orders) > 30 and events.empty
        assert _vbt_gap(fs, frame, orders, s) < 1e-9
        # rules off: the targets are what was asked
        asked = pd.DataFrame(w[fs.index_of(frame.index[0]):fs.index_of(frame.index[-1]) + 1]).ffill().to_numpy()   # what the walk saw
        ok = ~np.isnan(asked).any(axis=1)
        assert np.allclose(frame[['target:AAPL', 'target:MSFT']].to_numpy()[ok], asked[ok])

def test_rules_cut_an_oversized_schedule(data):
    from trader.research.backtest import simulate_weights
    s, _, fs, market = data
    w = np.full((len(fs), 2), 0.9)
    frame, orders, _ = simulate_weights(w, fs, *TEST, s.risk, 100_000.0, 1.0, 2.0, guardian=False, market=market)
    t = frame[['target:AAPL', 'target:MSFT']].to_numpy()
    assert t.max() <= s.risk.max_position + 1e-12 and (frame.cuts > 0).all()
    assert frame[['weight:AAPL', 'weight:MSFT']].to_numpy().max() < 0.9*0.5
    off, _, _ = simulate_weights(w, fs, *TEST, s.risk, 100_000.0, 1.0, 2.0, guardian=False, risk_checks=False, market=market)
    assert off[['target:AAPL', 'target:MSFT']].to_numpy().min() == 0.9

def test_each_baseline_through_the_engine_matches_vectorbt(data):
    "Every baseline's orders, rules and guardian off, whole shares: vectorbt agrees to 1e-9."
    from trader.research.backtest import simulate_weights
    from trader.research.baselines import schedules, BASELINES
    s, bars, fs, market = data
    sch = schedules(fs, bars, SYMS, TRAIN, TEST, s.env, s.risk)
    _test_eq(list(sch), list(BASELINES))
    for name, (w, params) in sch.items():
        frame, orders, _ = simulate_weights(w, fs, *TEST, s.risk, 100_000.0, s.env.fees_bps, s.env.slippage_bps, guardian=False, risk_checks=False,
                                            lot=s.env.lot, market=market)
        assert len(orders) >= 2, name
        assert _vbt_gap(fs, frame, orders, s) < 1e-9, name
        json.dumps(params)                                         # stored as JSON

def _moved(bars, after):
    "The bars with every price after `after` scaled by a different factor per bar (the future rewritten)."
    b = bars.copy()
    later = b.ts > after
    k = np.random.default_rng(7).uniform(0.7, 1.4, int(later.sum()))
    for c in ('open', 'high', 'low', 'close'): b.loc[later, c] = b.loc[later, c].to_numpy()*k
    return b

def test_choices_read_the_training_window_only(data):
    "Moving every bar after the training window changes no choice: the pair, the classifiers, the normaliser."
    from trader.research.baselines import schedules, fit_supervised, BASELINES
    from trader.research.features import build_features
    s, bars, fs, _ = data
    moved = _moved(bars, TRAIN[1])
    fs2 = build_features(moved, SYMS)
    a = schedules(fs, bars, SYMS, TRAIN, TEST, s.env, s.risk)
    b = schedules(fs2, moved, SYMS, TRAIN, TEST, s.env, s.risk)
    for name in BASELINES: _test_eq(b[name][1], a[name][1])
    m1, m2 = fit_supervised(fs, *TRAIN), fit_supervised(fs2, *TRAIN)
    for x, y in zip(m1.models, m2.models): _test_eq(x.coef_.tolist(), y.coef_.tolist()); _test_eq(x.intercept_.tolist(), y.intercept_.tolist())
    _test_eq(m1.normaliser.mean.tolist(), m2.normaliser.mean.tolist())
    g1, g2 = fit_supervised(fs, *TRAIN, kind='gbm', seed=5), fit_supervised(fs2, *TRAIN, kind='gbm', seed=5)
    rows = range(fs.window(*TRAIN).start, fs.window(*TRAIN).stop)
    _test_eq(g1.proba(fs, rows).tolist(), g2.proba(fs, rows).tolist())

@pytest.mark.parametrize('cut', ['2010-03-15', '2010-08-02'])
def test_weights_at_a_close_read_bars_up_to_it(data, cut):
    "Every schedule's weight at row t is the same whatever the bars after t are (the test window's decisions are causal too)."
    from trader.research.baselines import schedules, BASELINES
    from trader.research.features import build_features
    s, bars, fs, _ = data
    t = fs.index_of(pd.Timestamp(cut, tz='UTC'))
    moved = _moved(bars, fs.ts[t])
    a = schedules(fs, bars, SYMS, TRAIN, TEST, s.env, s.risk)
    b = schedules(build_features(moved, SYMS), moved, SYMS, TRAIN, TEST, s.env, s.risk)
    for name in BASELINES:
        _test_eq(np.nan_to_num(a[name][0][:t + 1], nan=-1.0).tolist(), np.nan_to_num(b[name][0][:t + 1], nan=-1.0).tolist())

def test_vol_target_and_supervised_rules(data):
    from trader.research.baselines import vol_target_weights, realised_vol, VolTarget, fit_supervised, decision_rows, next_bar_up
    s, _, fs, _ = data
    w = vol_target_weights(fs, *TEST, s.risk.max_position)
    rows = decision_rows(fs, *TEST)
    asked = np.flatnonzero(~np.isnan(w[:, 0]))
    assert asked[0] == rows[0] and len(asked) < len(rows)/4
    v = realised_vol(fs.close)
    for t in asked: assert abs(w[t, 0] - min(min(0.15/v[t], 1.0)/2, s.risk.max_position)) < 1e-12
    assert (np.abs(np.diff(w[asked, 0])) > VolTarget().band).all()
    m = fit_supervised(fs, *TRAIN)
    last = fs.window(*TRAIN).stop - 1
    assert m.trained_on[1] == f"{fs.ts[last - 1]:%Y-%m-%d}"        # the last label used is the window's last bar
    p = m.proba(fs, rows)
    sw = m.weights(fs, *TEST, (0.3, 0.3))
    want = np.where(p > 0.52, 0.3, 0.0)
    held = pd.DataFrame(sw[np.asarray(rows)]).ffill().to_numpy()
    assert np.array_equal(held, want)                              # the schedule asks exactly the mapped probabilities' changes
    y = next_bar_up(fs)
    assert np.array_equal(y[:-1], (fs.close[1:] > fs.open[1:]).astype(float))

def test_standing_weights_asked_again_after_a_resume(data):
    "When the guardian's halt is lifted (research's automatic resume), a schedule's standing weights are asked again."
    from trader.core.config import RiskSettings
    from trader.research.backtest import simulate_weights
    if 'halt_resume_sessions' not in RiskSettings.model_fields: pytest.skip('this engine has no automatic resume')
    s, _, fs, market = data
    w = np.full((len(fs), 2), np.nan); w[fs.window(*TEST).start] = 0.3
    lim = s.risk.model_copy(update={'halt_resume_sessions': 3})
    frame, orders, events = simulate_weights(w, fs, *TEST, lim, 100_000.0, 1.0, 2.0, guardian=True, market=market)
    fired = events[events.kind == 'guardian']
    assert len(fired) >= 1
    after = frame.loc[frame.index > fired.bar_ts.iloc[0]]
    assert (after[['shares:AAPL', 'shares:MSFT']].abs().sum(axis=1) > 0).any()     # bought again after the resume
    stay, _, ev2 = simulate_weights(w, fs, *TEST, s.risk.model_copy(update={'halt_resume_sessions': 0}), 100_000.0, 1.0, 2.0, guardian=True, market=market)
    first = ev2[ev2.kind == 'guardian'].bar_ts.iloc[0]
    assert (stay.loc[stay.index > first, ['shares:AAPL', 'shares:MSFT']].abs().sum(axis=1) == 0).all()

# -- experiments: the summary and `show --json` ------------------------------------------------------------------------

TRADER = str(Path(sys.executable).parent/'trader')
SPEC = {'name': 'bl', 'seeds': 2, 'steps': 64, 'folds': {'n': 2, 'start': '2003-01-02'}}

def _fake_trials(ex, store, guardian_off:bool=True):
    "Trial rows without training (the summary only reads rows): a model that earns a fixed small return each bar."
    from trader.research.experiments import TrialKey, config_id, _returns_json
    now = pd.Timestamp.now(tz='UTC').isoformat(timespec='seconds')
    for t in ex.trials():
        ts = pd.DatetimeIndex(ex.bars.ts.drop_duplicates().sort_values())
        ts = ts[(ts >= t.fold.test[0]) & (ts <= t.fold.test[1])]
        eq = pd.Series(100_000.0*np.cumprod(np.r_[1.0, np.full(len(ts) - 1, 1 + 1e-4*(t.seed + 1 + t.fold.index))]), index=ts)
        m = {'total_return': float(eq.iloc[-1]/eq.iloc[0] - 1), 'sharpe': 1.0 + 0.1*t.seed + 0.2*t.fold.index, 'sortino': 1.0, 'max_drawdown': 0.01,
             'exposure': 0.5, 'n_trades': 4, 'bars': len(eq), 'guardian_fired': []}
        if guardian_off: m['guardian_off'] = {**m, 'sharpe': m['sharpe'] + 0.5}
        store.execute('INSERT INTO exp_trials (experiment, trial_key, config_id, config, seed, fold, model_id, metrics, test_returns, curve, seconds, created) '
                      'VALUES (?,?,?,?,?,?,?,?,?,?,?,?)', (ex.name, t.key(ex.spec, ex.base), config_id(t.config), store.json_param(t.config), t.seed, t.fold.index,
                                                          'm', store.json_param(m), store.json_param(_returns_json(eq)), None, 1.0, now))

@pytest.fixture(scope='module')
def exp_home(tmp_path_factory):
    from trader.core.config import load_settings
    from trader.core.data import load_sample
    from trader.core.quality import DataQualityGate
    from trader.core.store import Store
    from trader.research.experiments import Experiment, parse_spec
    home = tmp_path_factory.mktemp('bl-home')
    s = load_settings({'TRADER_HOME': str(home)})
    store = Store(settings=s)
    store.ingest(DataQualityGate(s.quality).check(load_sample(SYMS), source='sample'))
    ex = Experiment(parse_spec(SPEC, s), s, store)
    ex._register(); ex._baselines(); _fake_trials(ex, store)
    old = Experiment(parse_spec({**SPEC, 'name': 'old'}, s), s, store)      # as stored before issue 18
    old._register()
    for r in store.frame("SELECT * FROM exp_baselines WHERE experiment = 'bl' AND baseline IN ('buy_hold', 'ma_cross')").itertuples():
        store.execute('INSERT INTO exp_baselines (experiment, fold, baseline, metrics, test_returns, params) VALUES (?,?,?,?,?,?)',
                      ('old', r.fold, r.baseline, store.json_param({k: v for k, v in r.metrics.items() if k not in ('guardian_off', 'guardian_fired')}),
                       store.json_param(r.test_returns), store.json_param(None if r.baseline == 'buy_hold' else {k: r.params[k] for k in ('fast', 'slow', 'chosen_on', 'n_trials')})))
    _fake_trials(old, store, guardian_off=False)
    store.close()
    return home

def _show(home, name):
    e = {**{k: v for k, v in os.environ.items() if k != 'TRADER_CONFIG'}, 'TRADER_HOME': str(home), 'TRADER_DB_URL': ''}
    r = subprocess.run([TRADER, 'experiment', 'show', name, '--json'], capture_output=True, text=True, env=e, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)

def test_show_json_has_every_baseline_per_fold(exp_home):
    got = _show(exp_home, 'bl')
    assert len(got['folds']) == 2
    for f in got['folds']:
        for b in ('buy_hold', 'vol_target', 'ma_cross', 'supervised'):
            m = f[b]
            assert m['params']['judged_by'] == 'engine' and m['params']['guardian'] is True, b
            for k in ('total_return', 'sharpe', 'max_drawdown', 'exposure', 'n_trades', 'bars'): assert k in m and k in m['guardian_off'], (b, k)
            assert m['bars'] > 200
        assert f['model']['guardian_off']['sharpe'] == pytest.approx(f['model']['sharpe'] + 0.5)
    _test_eq(sorted(got['baselines']), sorted(['buy_hold', 'vol_target', 'ma_cross', 'supervised']))
    assert got['baselines_missing'] == [] and got['iqm_guardian_off'] == pytest.approx(got['iqm'] + 0.5)
    v = got['verdict']
    for name in ('vol-targeted buy-and-hold', 'the best MA crossover', 'the supervised classifier', 'Every baseline was judged by the same engine',
                 'With the guardian off its Sharpe IQM is'):
        assert name in v, (name, v)
    # the data-snooping figures: over the one configuration, against buy-and-hold's stored test returns on the same bars
    assert got['pbo'] is None and got['pbo_why'].startswith('one configuration')
    assert 0 <= got['spa_pvalue'] <= 1 and got['spa']['n_models'] == 1 and got['spa']['bars_unmatched'] == 0
    assert got['spa']['bars'] == sum(f['buy_hold']['bars'] - 1 for f in got['folds'])
    _test_eq(got['mcs']['baselines'], ['buy_hold', 'vol_target', 'ma_cross', 'supervised'])
    assert set(got['mcs']['pvalues']) == {got['best']['config_id'], 'buy_hold', 'vol_target', 'ma_cross', 'supervised'}
    assert all(got['baselines'][b]['prob_improvement']['p'] >= 0 for b in got['baselines']) and got['prob_improvement'] == got['baselines']['buy_hold']['prob_improvement']
    assert got['evidence']['why'] in v and isinstance(got['evidence']['promote'], bool)

def test_an_experiment_stored_before_still_shows(exp_home):
    got = _show(exp_home, 'old')
    _test_eq(got['baselines_missing'], ['vol_target', 'supervised'])
    assert all(f['vol_target'] is None and f['supervised'] is None and f['buy_hold'] and f['ma_cross'] for f in got['folds'])
    assert got['iqm_guardian_off'] is None and got['baselines']['vol_target'] is None
    v = got['verdict']
    assert 'were not stored for this experiment' in v and 'simulated by vectorbt' in v and 'With the guardian off' not in v, v
    # the data-snooping figures come from its stored rows: the baselines it has are the set's candidates, the others are not
    _test_eq(got['mcs']['baselines'], ['buy_hold', 'ma_cross']); assert got['spa_pvalue'] is not None and got['spa_why'] is None
    _test_eq(set(got['performance_profile']['profiles']), {got['best']['config_id'], 'buy_hold', 'ma_cross'})
    assert got['evidence']['promote'] in (True, False) and 'SPA p' in got['evidence']['why']
