"""Synthetic markets (trader.research.synthetic) and the two new ingest sources: what the generator makes passes the quality gate,
is reproducible, carries the edge it was asked for (and none when asked for none), and `trader ingest` stores it, labelled."""
import json, os, sqlite3, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from fastcore.test import test_eq as _test_eq, test_fail as _test_fail
from trader.core.config import QualitySettings
from trader.core.data import bars_sha256
from trader.core.quality import DataQualityGate
from trader.research.synthetic import PRESETS, EdgeKind, SyntheticError, edge_strength, generate

TRADER = str(Path(sys.executable).parent/'trader')

def trader(home, *args):
    env = {**os.environ, 'TRADER_HOME': str(home), 'TRADER_DB_URL': ''}
    return subprocess.run([TRADER, *args], capture_output=True, text=True, env=env, timeout=300)

def query(home, sql):
    db = Path(home)/'trader.db'
    if not db.exists(): return []
    c = sqlite3.connect(db)
    try: return c.execute(sql).fetchall()
    finally: c.close()

@pytest.mark.parametrize('kind', [k.value for k in EdgeKind])
@pytest.mark.parametrize('noise', ['garch', 'bootstrap'])
def test_bars_pass_the_quality_gate(kind, noise):
    for seed in (0, 11):
        m = generate(kind, 'strong', seed=seed, n_assets=3, noise=noise)
        r = DataQualityGate(QualitySettings()).check(m.bars, '1Day', source=m.description)
        assert not r.blocked and r.score > 99, r.render()
        b = m.bars
        assert (b.high >= b[['open', 'close']].max(axis=1)).all() and (b.low <= b[['open', 'close']].min(axis=1)).all()
        assert (b.volume > 0).all()
        _test_eq(sorted(b.symbol.unique()), ['SYN0', 'SYN1', 'SYN2'])

def test_same_arguments_same_bars_and_null_shares_the_noise():
    a = generate('momentum', 'weak', seed=5, noise='bootstrap')
    _test_eq(bars_sha256(a.bars), bars_sha256(generate('momentum', 'weak', seed=5, noise='bootstrap').bars))
    assert bars_sha256(a.bars) != bars_sha256(generate('momentum', 'weak', seed=6, noise='bootstrap').bars)
    edged, null = generate('ar1', 'strong', seed=5), generate('null', seed=5)
    gap = lambda m: np.log(m.features().open[1:]/m.features().close[:-1])
    np.testing.assert_allclose(gap(edged), gap(null), atol=1e-12)     # the overnight noise, draw for draw
    assert not null.edge.any()

def test_the_edge_is_what_the_features_show():
    "AR(1): the oracle's expectation is strength x ret_1 (less the drift); lead-lag: strength x the leader's ret_1, scaled."
    m = generate('ar1', 0.3, seed=2)
    c = m.features().close
    np.testing.assert_allclose(m.edge[1:], 0.3*(np.log(c[1:]/c[:-1]) - m.drift), atol=1e-9)
    m = generate('leadlag', 0.3, seed=2, n_assets=3)
    c = m.features().close
    lead = np.log(c[1:, 0]/c[:-1, 0]) - m.drift
    vol = np.log(c[1:]/c[:-1]).std(axis=0)
    assert not m.edge[:, 0].any()
    for i in (1, 2):
        k = m.edge[1:, i]/lead
        assert np.allclose(k, k[0]) and 0.3*0.6 < k[0]/(vol[i]/vol[0]) < 0.3*1.6     # 0.3 x the ratio of the assets' volatilities

def test_oracle_through_the_engine():
    m = generate('ar1', 'strong', seed=4)
    o = m.oracle_sharpe('2010-01-01', '2011-12-31')
    assert o.gross >= o.net > 0.8, o
    assert abs(o.gross - o.analytic_gross) < 0.6 and o.trades > 50 and not o.halted
    w = m.oracle_weights(m.features())
    _test_eq(set(np.unique(w)), {0.0, 0.3})
    n = generate('null', seed=4).oracle_sharpe('2010-01-01', '2011-12-31')
    _test_eq((n.gross, n.net, n.trades), (0.0, 0.0, 0))

def test_bad_requests():
    _test_fail(lambda: edge_strength('ar1', 'enormous'), contains="'strong', 'weak'")
    _test_fail(lambda: generate('ar1', symbols='MSFT,SYN1'), contains='must start with SYN')
    _test_fail(lambda: generate('leadlag', n_assets=1), contains='at least 2 assets')
    _test_eq(edge_strength('momentum', 'weak'), (PRESETS[EdgeKind.MOMENTUM]['weak'], 'weak'))
    assert issubclass(SyntheticError, Exception) and SyntheticError.exit_code == 2

@pytest.fixture(scope='module')
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp('home')
    r = trader(h, 'ingest', '--source', 'synthetic', '--edge', 'leadlag', '--strength', 'weak', '--seed', '3', '--assets', '3', '-q')
    assert r.returncode == 0, r.stderr
    return h

def test_ingest_synthetic_stores_a_labelled_market(home):
    _test_eq(query(home, 'select symbol, count(*) from bars group by symbol order by symbol'), [('SYN0', 3270), ('SYN1', 3270), ('SYN2', 3270)])
    stored = query(home, "select report from quality_reports order by id desc limit 1")
    src = json.loads(stored[0][0])['source']
    weak = PRESETS[EdgeKind.LEADLAG]['weak']
    assert src.startswith(f'synthetic (not real prices) SYN0,SYN1,SYN2: edge=leadlag strength={weak:g} (weak)') and 'seed=3' in src, src
    m = generate('leadlag', 'weak', seed=3, n_assets=3)                       # the same arguments make the same bars again
    _test_eq(json.loads(stored[0][0])['data_sha256'], bars_sha256(m.bars))

def test_ingest_indices(home):
    r = trader(home, 'ingest', '--source', 'indices', '--symbols', 'SPX,NDX', '--start', '2008-01-01', '--end', '2008-12-31', '-q')
    assert r.returncode == 0, r.stderr
    assert 'stored 506 bars (SPX 253, NDX 253)' in r.stdout, r.stdout
    src = json.loads(query(home, "select report from quality_reports order by id desc limit 1")[0][0])['source']
    assert 'SPX=S&P 500' in src and 'NDX=NASDAQ Composite, not the NASDAQ-100' in src, src

@pytest.mark.parametrize('args, why', [
    (('--source', 'synthetic', '--edge', 'ar1', '--strength', '1.5'), 'argument --strength: the ar1 strength is a coefficient below 1'),
    (('--source', 'synthetic', '--symbols', 'AAPL,SYN1'), 'argument --symbols: synthetic symbols must start with SYN'),
    (('--source', 'synthetic', '--edge', 'leadlag', '--assets', '1'), 'argument --assets: a lead-lag market needs at least 2 assets'),
    (('--source', 'synthetic', '--timeframe', '1Hour'), 'argument --timeframe: --source synthetic has daily bars only'),
    (('--source', 'sample', '--seed', '3'), 'argument --seed: only with --source synthetic'),
    (('--source', 'indices', '--symbols', 'SPX,DJI'), 'argument --symbols: --source indices has SPX (S&P 500), NDX'),
])
def test_bad_ingest_arguments_write_nothing(home, args, why):
    before = query(home, 'select count(*) from bars')
    r = trader(home, 'ingest', *args)
    assert r.returncode == 2 and why in r.stderr and 'Traceback' not in r.stderr, r.stderr
    _test_eq(query(home, 'select count(*) from bars'), before)

def test_ingest_help_names_the_new_sources(tmp_path):
    r = trader(tmp_path, 'ingest', '--help')
    assert r.returncode == 0
    for s in ('--source synthetic --edge ar1 --strength strong --seed 7', '--source indices --symbols SPX,NDX',
              'NASDAQ Composite (not the NASDAQ-100)', '{null,ar1,momentum,leadlag}', '{garch,bootstrap}'):
        assert s in r.stdout, (s, r.stdout)
