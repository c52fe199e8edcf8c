"""Agents on four stocks (issue 18): the sample's AAPL, MSFT, IBM and GOOG, GOOG listed only from 2004-08-19.

A dataset covers the span all its symbols share (`trader.research.features.pivot_bars`): the earlier rows of the others are
dropped with a warning, a hole after that start or a symbol that ends early still raises.
"""
import json, logging, os, re, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd
import pytest
from fastcore.test import test_eq as _test_eq, test_fail as _test_fail

SYMS = ['AAPL', 'MSFT', 'IBM', 'GOOG']
TRADER = str(Path(sys.executable).parent/'trader')
FAST = '[train]\nn_steps = 128\nbatch_size = 64\nn_epochs = 1\ncheckpoint_every = 0\n'

@pytest.fixture(scope='module')
def bars4():
    from trader.core.data import load_sample
    return load_sample(SYMS).drop(columns='adj_close')

@pytest.fixture(scope='module')
def fs4(bars4):
    from trader.research.features import build_features
    return build_features(bars4, SYMS)

def test_starts_at_googs_first_bar(bars4, fs4, caplog):
    from trader.research.features import WARMUP, pivot_bars, price_set, _SAID
    goog = bars4[bars4.symbol == 'GOOG']
    _test_eq(goog.ts.min(), pd.Timestamp('2004-08-19', tz='UTC'))
    _SAID.clear()
    with caplog.at_level(logging.WARNING, logger='trader.research.features'):
        w = pivot_bars(bars4, SYMS)
    _test_eq(w['ts'][0], goog.ts.min())
    _test_eq((len(w['ts']), w['dropped']), (len(goog), 1122))
    assert 'starts on 2004-08-19, the first bar of GOOG; 1122 earlier bars of AAPL, MSFT, IBM are dropped' in caplog.text
    _test_eq((fs4.ts[0], len(fs4), fs4.dropped_rows, fs4.features.shape), (goog.ts.min(), len(goog), 1122, (len(goog), 4, 12)))
    np.testing.assert_array_equal(fs4.close[:, 3], goog.close.to_numpy())
    np.testing.assert_array_equal(fs4.close[:, 1], bars4[(bars4.symbol == 'MSFT') & (bars4.ts >= goog.ts.min())].close.to_numpy())
    assert np.isfinite(fs4.features[WARMUP - 1:]).all() and np.isnan(fs4.features[WARMUP - 2, :, 11]).all()
    _test_eq(price_set(bars4, SYMS).ts, fs4.ts)
    # the default training window (from 2000-03-01) begins a warm-up after GOOG's listing
    _test_eq(fs4.ts[fs4.window('2000-03-01', '2009-12-31').start], pd.Timestamp('2005-08-17', tz='UTC'))

def test_gaps_inside_the_span_and_early_ends_raise(bars4):
    from trader.research.features import build_features, pivot_bars
    goog = bars4.index[bars4.symbol == 'GOOG']
    _test_fail(lambda: pivot_bars(bars4.drop(index=goog[100]), SYMS), contains='1 timestamps missing for some symbol (GOOG) after all have started on 2004-08-19')
    aapl = bars4.index[bars4.symbol == 'AAPL']
    _test_fail(lambda: build_features(bars4.drop(index=aapl[[2000, 2500]]), SYMS), contains='2 timestamps missing for some symbol (AAPL)')
    _test_eq(pivot_bars(bars4.drop(index=goog[0]), SYMS)['dropped'], 1123)     # a later start is a start, not a gap
    short = bars4[~((bars4.symbol == 'IBM') & (bars4.ts > '2013-01-01'))]
    _test_fail(lambda: pivot_bars(short, SYMS), contains='IBM ends 2012-12-31, before the last bar of the others (2013-03-01)')

def test_default_folds_fit_four_stocks(bars4, fs4):
    "Every default fold has at least min_train_bars training rows after the warm-up on the common span (fold 0: 592)."
    from trader.research.experiments import FoldSpec, make_folds
    from trader.research.train import parse_window
    spec = FoldSpec()
    folds = make_folds(spec, parse_window('2012-01-01:2013-03-01'), pd.DatetimeIndex(sorted(bars4.ts.unique())))
    rows = [(lambda w: w.stop - w.start)(fs4.window(*f.train)) for f in folds]
    _test_eq(rows, [592, 843, 1095, 1347])
    assert min(rows) >= spec.min_train_bars
    assert all((lambda w: w.stop - w.start)(fs4.window(*f.test)) >= spec.min_test_bars for f in folds)

def _trader(home, *args):
    env = {**os.environ, 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(Path(home)/'trader.toml')}
    return subprocess.run([TRADER, *args], capture_output=True, text=True, env=env, timeout=900)

def test_train_four_stocks_cli(tmp_path):
    "`trader train --symbols AAPL,MSFT,IBM,GOOG` trains a per-asset (linear) action space: MultiDiscrete([3]*4), 81 joint ids counted."
    (tmp_path/'trader.toml').write_text(FAST)
    r = _trader(tmp_path, 'ingest', '--source', 'sample', '--symbols', ','.join(SYMS), '-q'); assert r.returncode == 0, r.stderr
    r = _trader(tmp_path, 'train', '--symbols', ','.join(SYMS), '--steps', '256', '-q'); assert r.returncode == 0, r.stderr
    assert 'the dataset starts on 2004-08-19, the first bar of GOOG' in r.stderr, r.stderr
    m = re.search(r'registered (\S+):', r.stdout); assert m, r.stdout
    d = tmp_path/'models'/m.group(1)
    meta = json.loads((d/'metadata.json').read_text())
    _test_eq((meta['symbols'], meta['n_actions'], meta['action_space']), (SYMS, 81, 'per_asset'))
    assert np.isfinite(meta['validation']['sharpe'])
    from sb3_contrib import RecurrentPPO
    from gymnasium import spaces
    model = RecurrentPPO.load(d/'model.zip', device='cpu')
    assert isinstance(model.action_space, spaces.MultiDiscrete)
    _test_eq(model.action_space.nvec.tolist(), [3, 3, 3, 3])

def test_experiment_folds_count_the_shared_bars(bars4, tmp_path):
    "A fold's training window is checked on the bars every symbol has after the warm-up, not on any symbol's timestamps."
    from trader.core.config import load_settings
    from trader.core.store import Store
    from trader.research.experiments import Experiment, ExperimentError, parse_spec
    from trader.research.features import WARMUP
    s = load_settings().model_copy(update={'home': tmp_path, 'db_url': f"sqlite:///{tmp_path/'t.db'}"})
    with Store(settings=s) as store:
        store.write_bars(bars4)
        # train 2000-03-01..2005-12-20: ~1,460 AAPL bars, but only ~340 that GOOG shares after its 2004-08-19 listing and the warm-up
        spec = {'name': 'g', 'symbols': SYMS, 'seeds': 1, 'steps': 64, 'folds': {'n': 1, 'start': '2000-03-01', 'end': '2006-12-31', 'min_train_bars': 500}}
        with pytest.raises(ExperimentError, match=r'fold 0: training window 2000-03-01:2005-12-\d\d has (\d+) bars \(< 500\)') as e:
            Experiment(parse_spec(spec, s), s, store)
        n = int(re.search(r'has (\d+) bars', str(e.value)).group(1))
        goog = bars4[(bars4.symbol == 'GOOG') & (bars4.ts <= pd.Timestamp('2005-12-31', tz='UTC'))]
        assert n <= len(goog) - (WARMUP - 1), n
        Experiment(parse_spec({**spec, 'folds': {**spec['folds'], 'min_train_bars': n}}, s), s, store)     # exactly n: accepted
