"""The sealed holdout (issue 10, acceptance 5): backtests, promotion, nightly, sweeps and reports refuse a window touching it
(exit 2, nothing stored); `trader holdout` is the only way to evaluate on it, and every look (paper replays included) is
audited, counted, and deflates the Sharpe ratio."""
import getpass, json, os, sqlite3, subprocess, sys
from pathlib import Path
import pytest
from conftest import fixed_action_model
from trader.core.audit import Audit
from trader.core.config import load_settings
from trader.core.data import load_sample
from trader.core.quality import DataQualityGate
from trader.core.registry import Registry
from trader.core.runs import Runs
from trader.core.store import Store
from trader.research.holdout import HoldoutError, looks, overlaps_holdout, refuse_holdout

TRADER = str(Path(sys.executable).parent/'trader')
HOLDOUT = '2012-01-01:2013-03-01'
LEAKY = '2011-06-01:2012-06-30'       # half validation, half holdout

def env_for(home, **extra):
    (Path(home)/'none.toml').touch()
    return {**os.environ, 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(Path(home)/'none.toml'),
            'TRADER_REPORTS': str(Path(home)/'reports'), **extra}

def trader(home, *args, **extra):
    return subprocess.run([TRADER, *args], capture_output=True, text=True, env=env_for(home, **extra), timeout=600)

def counts(home) -> dict:
    "Rows of the tables a refused command must not touch."
    c = sqlite3.connect(Path(home)/'trader.db')
    try:
        return {t: c.execute(f'select count(*) from "{t}"').fetchone()[0]
                for t in ('runs', 'audit_log', 'champion_history', 'models') if c.execute("select 1 from sqlite_master where name = ?", (t,)).fetchone()}
    finally: c.close()

def settings(home): return load_settings({'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(Path(home)/'none.toml')})

def holdout_looks(home):
    with Store(settings=settings(home)) as st: return looks(st)

@pytest.fixture(scope='module')
def home(tmp_path_factory):
    "The sample, and prepared models: always long both (8, the champion) and AAPL only (6)."
    h = tmp_path_factory.mktemp('holdout')
    (h/'none.toml').touch()
    s = settings(h)
    with Store(settings=s) as store:
        store.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
        ids = {name: fixed_action_model(store, s, a) for name, a in (('both', 8), ('aapl', 6))}
        Registry(store, s).set_champion(ids['both'], 'test setup')
    (h/'ids.json').write_text(json.dumps(ids))
    return h

def ids(home): return json.loads((Path(home)/'ids.json').read_text())

def test_one_shared_overlap_test():
    s = load_settings()
    for w in (HOLDOUT, LEAKY, '2013-03-01:2013-12-31', '2000-01-01:2013-12-31', '2012-06-01:2012-06-01'): assert overlaps_holdout(w, s), w
    for w in ('2010-01-01:2011-12-31', '2013-03-02:2013-12-31', '2000-03-01:2009-12-31'): assert not overlaps_holdout(w, s), w
    with pytest.raises(HoldoutError, match='experiment fold 2011-06-01:2012-06-30 overlaps the holdout 2012-01-01:2013-03-01'):
        refuse_holdout(LEAKY, 'experiment fold', s)

def test_backtest_api_refuses_the_holdout(home):
    from trader.research.backtest import backtest
    s = settings(home)
    before = counts(home)
    with Store(settings=s) as st:
        for w in (HOLDOUT, LEAKY, '2013-02-01:2013-06-30'):
            with pytest.raises(HoldoutError) as ei: backtest(ids(home)['both'], w, settings=s, store=st)
            assert f"backtest window {w} overlaps the holdout {HOLDOUT}" in str(ei.value) and 'trader holdout' in str(ei.value)
            assert ei.value.exit_code == 2
        # the default is the validation window now
        res = backtest(ids(home)['both'], settings=s, store=st, baselines=False, save=False)
    assert res.window == ('2010-01-01', '2011-12-31')
    assert counts(home) == before

def test_backtest_cli_refuses_the_holdout(home):
    before = counts(home)
    r = trader(home, 'backtest', '--model', ids(home)['both'], '--window', LEAKY)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith(f'error: backtest window {LEAKY} overlaps the holdout {HOLDOUT}') and 'trader holdout' in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr and r.stdout == ''
    for args in (('report', 'backtest', '--model', ids(home)['both'], '--window', HOLDOUT), ('sweep', 'ma', '--window', LEAKY)):
        r = trader(home, *args)
        assert r.returncode == 2 and 'overlaps the holdout' in r.stderr, (args, r.stderr)
    assert counts(home) == before                                    # nothing stored, nothing audited
    assert not (Path(home)/'reports'/'backtest').exists()

def test_promotion_and_nightly_refuse_the_holdout(home):
    i = ids(home)
    before = counts(home)
    r = trader(home, 'promote', '--challenger', i['aapl'], '--window', LEAKY)
    assert r.returncode == 2 and f'promotion window {LEAKY} overlaps the holdout {HOLDOUT}' in r.stderr, r.stderr
    r = trader(home, 'nightly', '--challenger', i['aapl'], '--window', HOLDOUT)
    assert r.returncode == 2 and f'nightly evaluation window {HOLDOUT} overlaps the holdout' in r.stderr, r.stderr
    (Path(home)/'leaky.toml').write_text(f"[train]\nvalid_window = '{LEAKY}'\n")      # a validation window reaching into the holdout
    r = trader(home, 'nightly', '--challenger', i['aapl'], TRADER_CONFIG=str(Path(home)/'leaky.toml'))
    assert r.returncode == 2 and f'nightly evaluation window {LEAKY} overlaps the holdout' in r.stderr, r.stderr
    r = trader(home, 'nightly', '--steps', '64', TRADER_CONFIG=str(Path(home)/'leaky.toml'))     # refused before any training
    assert r.returncode == 2 and 'overlaps the holdout' in r.stderr, r.stderr
    assert counts(home) == before                                    # no decision, no model, no run, no audit entry
    from trader.ops.promote import promote
    s = settings(home)
    with Store(settings=s) as st, pytest.raises(HoldoutError): promote(i['aapl'], LEAKY, settings=s, store=st)
    # training keeps refusing it (its own flag, recorded, is the only way round)
    from trader.research.train import TrainError, train
    with Store(settings=s) as st, pytest.raises(TrainError, match='overlaps the holdout'):
        train('AAPL,MSFT', steps=64, seed=0, train_window='2005-01-01:2012-06-30', valid_window='2012-07-01:2012-12-31', settings=s, store=st, progress=False)

def test_trader_holdout_twice_counts_and_audits(home):
    mid = ids(home)['both']
    n0 = len(holdout_looks(home))
    outs = []
    for _ in range(2):
        r = trader(home, 'holdout', '--model', mid)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(r.stdout)
    assert f'holdout look {n0 + 1} ({n0 + 1} look' in outs[0] and f'holdout look {n0 + 2} ({n0 + 2} looks at the holdout so far' in outs[1], outs
    assert 'deflated Sharpe ratio' in outs[1] and 'buy_hold' in outs[1] and 'stored run ba-' in outs[1]
    lk = holdout_looks(home).iloc[n0:]
    assert len(lk) == 2 and list(lk.look) == [n0 + 1, n0 + 2] and list(lk.source) == ['trader holdout']*2
    with Store(settings=settings(home)) as st:
        sha = Registry(st, settings(home)).get(mid)['artifact_sha256']
        runs = Runs(st)
        metas = [runs.meta(x) for x in lk.run_id]
    first, second = (lk.iloc[k] for k in (0, 1))
    for e in (first, second):                                        # who asked, which model, when, the window, the figures
        assert e.user == getpass.getuser() and e.host and e.pid > 0 and e.caller == 'trader holdout' and 'trader holdout --model' in e.command
        assert e.model_id == mid and e.artifact_sha256 == sha and e.window == HOLDOUT and e.holdout == HOLDOUT and e['at'][:4] >= '2024'
        assert {'sharpe', 'total_return', 'max_drawdown', 'n_trades'} <= set(e.figures) and e.figures['sharpe'] is not None
    assert second.looks_of_model == first.looks_of_model + 1
    assert first.figures == second.figures                           # the same figures ...
    assert second.deflated['n_trials'] == n0 + 2 and second.deflated['dsr'] <= first.deflated['dsr']   # ... deflated by one look more
    if n0 == 0: assert second.deflated['dsr'] < first.deflated['dsr'] and first.deflated['dsr'] == first.deflated['psr']
    for m, e in zip(metas, (first, second)):                         # the stored run carries the count too
        assert m.kind == 'backtest' and m.status == 'done' and m.metrics['holdout']['looks_so_far'] == e.look
        assert m.metrics['holdout']['deflated_dsr'] == e.deflated['dsr'] and m.params['holdout_look'] == e.look
    r = trader(home, 'audit', 'verify')
    assert r.returncode == 0, r.stdout + r.stderr

def test_paper_replay_of_the_holdout_is_a_look(home):
    from trader.live.loop import paper_session
    s = settings(home)
    n0 = len(holdout_looks(home))
    with Store(settings=s) as st:
        out = paper_session('sim', ids(home)['aapl'], '2011-01-03:2011-03-31', settings=s, store=st, tag='not the holdout')
        assert out['holdout_look'] is None and len(looks(st)) == n0           # validation data: no look
        out = paper_session('sim', ids(home)['aapl'], '2012-03-01:2012-04-30', settings=s, store=st, tag='holdout replay')
        assert out['finished'] and out['holdout_look'] == n0 + 1             # replayed, not refused, and counted
        e = looks(st).iloc[-1]
        assert (e.source, e.model_id, e.window, e.replay_run_id, e.look) == ('paper replay', ids(home)['aapl'], '2012-03-01:2012-04-30', out['run_id'], n0 + 1)
        assert e.user == getpass.getuser() and 'paper_session' in e.caller
    r = trader(home, 'holdout', '--model', ids(home)['aapl'])
    assert r.returncode == 0 and f'holdout look {n0 + 2} ({n0 + 2} looks at the holdout so far' in r.stdout, r.stdout + r.stderr
    with Store(settings=s) as st: assert Audit(st).verify().ok
