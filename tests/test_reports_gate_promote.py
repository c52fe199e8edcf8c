"""Backtest reports through papermill, the daily gate's files and exit codes, and promotion (issue: backtests and reports)."""
import json, os, subprocess, sys
from pathlib import Path
import pandas as pd
import pytest
from conftest import fixed_action_model
from test_reports_pdf import check_pdf
from trader.core.config import load_settings
from trader.core.data import load_sample
from trader.core.quality import DataQualityGate
from trader.core.registry import Registry
from trader.core.runs import Runs
from trader.core.store import Store

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]

def env_for(home):
    (Path(home)/'none.toml').touch()
    return {**os.environ, 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_REPORTS': str(Path(home)/'reports'),
            'TRADER_CONFIG': str(Path(home)/'none.toml')}

def trader(home, *args):
    (Path(home)/'none.toml').touch()
    return subprocess.run([str(BIN/'trader'), *args], capture_output=True, text=True, env=env_for(home), timeout=600)

@pytest.fixture(scope='module')
def home(tmp_path_factory):
    "A store with the sample and prepared models: flat (0: SELL SELL), AAPL only (6), MSFT only (2), both (8)."
    h = tmp_path_factory.mktemp('rep')
    s = load_settings({'TRADER_HOME': str(h), 'TRADER_REPORTS': str(h/'reports')})
    store = Store(settings=s)
    store.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
    ids = {name: fixed_action_model(store, s, a) for name, a in (('flat', 0), ('aapl', 6), ('msft', 2), ('both', 8))}
    (h/'ids.json').write_text(json.dumps(ids))
    store.close()
    return h

def ids(home): return json.loads((Path(home)/'ids.json').read_text())

def test_papermill_direct_and_trader_report(home, tmp_path):
    mid = ids(home)['aapl']
    out_dir = tmp_path/'direct'
    r = subprocess.run([str(BIN/'papermill'), str(ROOT/'nbs/reports/backtest.ipynb'), str(tmp_path/'out.ipynb'), '-p', 'model', mid,
                        '-p', 'output_dir', str(out_dir), '-p', 'demo_if_empty', 'False'],
                       capture_output=True, text=True, env=env_for(home), timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path/'out.ipynb').stat().st_size > 10_000
    for f in ('report.html', 'tearsheet.html', 'metrics.json'): assert (out_dir/f).stat().st_size > 1000, f
    r = trader(home, 'report', 'backtest', '--model', mid)
    assert r.returncode == 0, r.stderr[-3000:]
    d = Path(home)/'reports'/'backtest'/f"{pd.Timestamp.now(tz='UTC'):%Y-%m-%d}-{mid}"
    for f in ('backtest.ipynb', 'report.html', 'tearsheet.html'): assert (d/f).exists(), f
    html = (d/'report.html').read_text()
    assert 'buy-and-hold' in html and 'best MA crossover' in html and 'simulated' in html
    m = json.loads((d/'metrics.json').read_text())
    assert html.index(m['summary'].split(' with ')[0]) < html.index('class="plotly-graph-div"') < html.index('class="dataframe t"')   # words, charts, tables
    assert m['summary'].startswith('Over ') and 'for buy-and-hold' in m['summary'] and m['pdf'] == str(d/'report.pdf')
    check_pdf(d/'report.pdf', m['summary'])
    assert f"wrote {d/'report.pdf'}" in r.stdout

def test_backtest_cli_prints_model_and_baselines(home):
    r = trader(home, 'backtest', '--model', ids(home)['both'])
    assert r.returncode == 0, r.stderr
    assert 'model buy_hold ma_cross' in ' '.join(r.stdout.split()) and 'stored run ba-' in r.stdout
    assert 'on 2010-01-01..2011-12-31' in r.stdout               # the default window: validation (the holdout is sealed)
    assert 'chosen on 2008-01-01:2009-12-31' in r.stdout         # the two years before it

def test_gate_files_and_exit_codes(home):
    s = load_settings({'TRADER_HOME': str(home)})
    store = Store(settings=s); runs = Runs(store)
    idx = pd.bdate_range('2012-06-01', periods=80, tz='UTC')
    def run_with(last_day_return):
        eq = pd.Series(100_000*(1.002**pd.Series(range(80))).to_numpy(), index=idx)
        eq.iloc[-1] = eq.iloc[-2]*(1 + last_day_return)
        rid = runs.create('backtest', ['AAPL', 'MSFT'], None, idx[0], idx[-1])
        runs.save_series(rid, pd.DataFrame({'equity': eq})); runs.finish(rid, {})
        return rid
    green, yellow, red = run_with(0.001), run_with(-0.02), run_with(-0.05)
    store.close()
    for rid, status, code in ((green, 'GREEN', 0), (yellow, 'YELLOW', 0), (red, 'RED', 3)):
        r = trader(home, 'gate', '--run', rid, '--output-dir', str(Path(home)/'gates'/status))
        assert r.returncode == code, (status, r.stdout, r.stderr[-2000:])
        day = f'{idx[-1]:%Y-%m-%d}'
        for ext in ('ipynb', 'html', 'json'): assert (Path(home)/'gates'/status/f'{day}.{ext}').exists()
        data = json.loads((Path(home)/'gates'/status/f'{day}.json').read_text())
        assert data['status'] == status and data['run_id'] == rid
        check_pdf(Path(home)/'gates'/status/f'{day}.pdf', f"{status} on {day} for backtest run {rid} (no champion is set):")
        names = {f['name'] for f in data['figures']}
        assert {'cumulative P&L', 'rolling Sharpe', 'max drawdown today', 'max drawdown overall', 'uptime', 'data quality', 'model confidence'} <= names
    r = trader(home, 'gate', '--run', 'no-such-run')
    assert r.returncode == 2 and "no run 'no-such-run'" in r.stderr
    s = load_settings({'TRADER_HOME': str(home)})
    with Store(settings=s) as st:
        hist = st.frame('SELECT status FROM gate_history ORDER BY id').status.tolist()
    assert hist[-3:] == ['GREEN', 'YELLOW', 'RED']

# Promotion backtests simulate the guardian. Over the whole validation window (2010-01-01:2011-12-31) it halts every
# always-long model in January 2010 (3-day P&L below the limit), leaving no model better than another on both counts;
# on this half of the window the prepared models keep the ordering the rule is tested with (figures printed below).
VALID = '2010-07-01:2011-06-30'

def test_promote_rule_with_prepared_models(home):
    i = ids(home)
    s = load_settings({'TRADER_HOME': str(home)})
    # the prepared strategies on the promotion window, under the guardian, for the record
    from trader.research.backtest import backtest
    with Store(settings=s) as st:
        m = {k: backtest(v, VALID, settings=s, store=st, baselines=False, save=False).metrics['strategy'] for k, v in i.items()}
    print({k: (v['sharpe'], v['max_drawdown'], v['total_return']) for k, v in m.items()})    # (Sharpe, max drawdown, return)
    assert m['flat']['max_drawdown'] == 0.0 and m['flat']['sharpe'] is None and m['aapl']['sharpe'] > 0 and m['aapl']['max_drawdown'] > 0
    assert m['aapl']['sharpe'] > m['msft']['sharpe'] and m['aapl']['max_drawdown'] < m['msft']['max_drawdown']
    # no champion yet: the first valid model becomes champion
    r = trader(home, 'promote', '--challenger', i['flat'], '--window', VALID)
    assert r.returncode == 0 and 'PROMOTED' in r.stdout and 'first valid model' in r.stdout
    # better Sharpe but deeper drawdown than the flat champion: refused
    r = trader(home, 'promote', '--challenger', i['aapl'], '--window', VALID)
    assert r.returncode == 0 and 'KEPT' in r.stdout and 'higher Sharpe but deeper drawdown' in r.stdout, r.stdout
    # better on both: promoted (msft first, then aapl beats it on both)
    with Store(settings=s) as st: Registry(st, s).set_champion(i['msft'], 'test setup')
    r = trader(home, 'promote', '--challenger', i['aapl'], '--window', VALID, '--dry-run')
    assert 'WOULD PROMOTE' in r.stdout and f'window     {VALID}' in r.stdout, r.stdout
    r = trader(home, 'promote', '--challenger', i['aapl'], '--window', VALID)
    assert 'PROMOTED' in r.stdout and 'better on both' in r.stdout, r.stdout
    assert f"Sharpe {m['aapl']['sharpe']:.3f} vs {m['msft']['sharpe']:.3f}" in r.stdout, r.stdout   # the figures above decided it
    with Store(settings=s) as st:
        reg = Registry(st, s)
        assert reg.champion() == i['aapl']
        h = reg.history()
    assert h.action.tolist()[-4:] == ['promote', 'keep', 'set', 'promote']
    keep = h.metrics.iloc[-3]                       # JSON columns come back decoded
    assert keep['window'] == VALID
    assert keep['challenger']['id'] == i['aapl'] and 'sharpe' in keep['champion'] and 'higher Sharpe but deeper drawdown' in h.reason.iloc[-3]
