"""Drills run in a sandbox (issue 9): `trader drill crash-day`, `trader drill outage` and the dashboard's drill button
(all three call `crash_day_drill` / `outage_drill` with the production settings and store) leave the production
champion, champion history, runs, ledger and a running session byte-for-byte unchanged, also when the drill's
expectation fails or the drill raises. Production's audit trail gets exactly one entry per drill: that it ran, where, and how it ended.
"""
import hashlib, json, sqlite3
from contextlib import closing
from pathlib import Path
import pytest
from trader.core.audit import Audit
from trader.core.config import load_settings
from trader.core.data import load_sample
from trader.core.quality import DataQualityGate
from trader.core.registry import Registry
from trader.core.runs import Runs
from trader.core.store import Store
from trader.live.drills import DrillResult, crash_day_drill, outage_drill
from trader.live.loop import paper_session
from trader.research.train import fixed_action_model, train

TINY = {'n_steps': 128, 'batch_size': 64, 'n_epochs': 2, 'checkpoint_every': 0, 'n_envs': 1}

def _raw(store) -> sqlite3.Connection:
    "A read-only connection of our own to the production SQLite file: rows exactly as stored (JSON as its text), nothing decoded."
    assert store.engine == 'sqlite'
    return sqlite3.connect(f"file:{store.url[len('sqlite:///'):]}?mode=ro", uri=True)

def snapshot(store, settings) -> dict:
    "Every table but the audit trail, row by row as stored, plus every file of the production models directory (sha256)."
    with closing(_raw(store)) as c:
        tables = sorted(r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"))
        snap = {t: sorted(repr(r) for r in c.execute(f'SELECT * FROM "{t}"')) for t in tables if t != 'audit_log'}
    for t in ('models', 'champion_history', 'runs', 'run_series', 'run_orders', 'run_decisions', 'loop_state', 'broker_orders', 'audit_log'):
        assert t in tables or t == 'audit_log', t
    snap['files:models'] = {str(p.relative_to(settings.models_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
                            for p in sorted(settings.models_dir.rglob('*')) if p.is_file()}
    return snap

def audit_rows(store) -> list[tuple]:
    with closing(_raw(store)) as c: return c.execute('SELECT seq, ts, kind, payload, prev_hash, hash FROM audit_log ORDER BY seq').fetchall()

@pytest.fixture(scope='module')
def prod(tmp_path_factory):
    "A production home: the AAPL+MSFT sample, a champion (with history: set, then a second model promoted), and a paper session still running."
    home = tmp_path_factory.mktemp('prod')
    s = load_settings({'TRADER_HOME': str(home)}, train=TINY)
    store = Store(settings=s)
    store.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
    reg = Registry(store, s)
    first = train('AAPL,MSFT', steps=512, seed=0, settings=s, store=store, progress=False).model_id
    reg.set_champion(first, 'test: the first champion')
    # a prepared always-BUY model: certain to hold positions in the session, so there is a ledger to protect
    champ = fixed_action_model(store, s, 8, ('AAPL', 'MSFT'), note='test: always BUY both')
    reg.set_champion(champ, 'test: promoted', 'promote')
    out = paper_session('sim', 'champion', '2012-01-03:2012-03-30', settings=s, store=store, max_bars=15, metrics_linger=0, tag='production')
    assert not out['finished'] and Runs(store).meta(out['run_id']).status == 'running'
    assert len(Runs(store).orders(out['run_id'])) > 0, 'the production session should have a ledger to protect'
    yield s, store, champ, out['run_id']
    store.close()

def check_unchanged(s, store, before:dict, audit_before:list, drill:str, result:DrillResult|None=None):
    after = snapshot(store, s)
    assert after.keys() == before.keys()
    changed = [k for k in before if after[k] != before[k]]
    assert not changed, f"the {drill} drill changed production: {changed}"
    audit_after = audit_rows(store)
    assert audit_after[:len(audit_before)] == audit_before, 'the production audit trail was rewritten'
    new = audit_after[len(audit_before):]
    assert [r[2] for r in new] == ['drill'], f"production's audit trail should get exactly one 'drill' entry, got {[r[2] for r in new]}"
    assert Audit(store).verify().ok
    p = json.loads(new[0][3])
    assert p['drill'] == drill
    if result is not None:
        assert p['passed'] == result.passed and p['run_id'] == result.run_id and p['sandbox'] == result.sandbox
    return p

def check_sandbox(s, r:DrillResult):
    "The drill's run, champion changes and audit chain are in its sandbox under TRADER_HOME/drills/."
    box = Path(r.sandbox)
    assert box.parent == s.home/'drills' and (box/'trader.db').is_file(), r.sandbox
    assert r.sandbox in r.render()
    with Store(f"sqlite:///{box/'trader.db'}", settings=s) as sb:
        assert Runs(sb).meta(r.run_id).params['drill']['name'] == r.name
        assert Audit(sb).verify().ok
        return Registry(sb, s).history()

def test_crash_day_drill_leaves_production_unchanged(prod):
    s, store, champ, running = prod
    before, audit_before = snapshot(store, s), audit_rows(store)
    r = crash_day_drill(s, store)
    print(r.render())
    assert r.passed, r.render()
    check_unchanged(s, store, before, audit_before, 'crash-day', r)
    hist = check_sandbox(s, r)
    # in the sandbox: the production champion copied, the drill model crowned, then rolled back by the guardian
    assert hist.action.tolist() == ['set', 'drill', 'rollback'] and hist.model_id.iloc[0] == hist.model_id.iloc[-1] == champ
    assert Registry(store, s).champion() == champ and Runs(store).meta(running).status == 'running'

def test_crash_day_drill_failing_expectation_leaves_production_unchanged(prod):
    "A gap too small to fire the guardian at that bar: the drill fails; in the sandbox the always-BUY model was crowned; production does not move."
    s, store, champ, _ = prod
    before, audit_before = snapshot(store, s), audit_rows(store)
    r = crash_day_drill(s, store, gap=-0.001)
    print(r.render())
    assert not r.passed
    failed = {what for what, ok, _ in r.checks if not ok}
    assert 'the guardian fired within the gap bar' in failed, r.render()
    p = check_unchanged(s, store, before, audit_before, 'crash-day', r)
    assert p['passed'] is False
    hist = check_sandbox(s, r)
    assert hist.action.tolist()[:2] == ['set', 'drill'] and Registry(store, s).champion() == champ

def test_outage_drill_leaves_production_unchanged(prod):
    s, store, champ, _ = prod
    before, audit_before = snapshot(store, s), audit_rows(store)
    r = outage_drill(s, store, model=champ)
    print(r.render())
    check_unchanged(s, store, before, audit_before, 'outage', r)
    check_sandbox(s, r)
    # the plumbing expectations that do not depend on how often this model trades
    ok = {what: passed for what, passed, _ in r.checks}
    for what in ('cached bars served and marked stale during the feed outage', 'every filled order at the broker is in the ledger exactly once',
                 'no client_order_id twice at the broker', 'ledger positions equal the broker positions', 'the audit chain verifies'):
        assert ok[what], r.render()

def test_outage_drill_trains_its_model_in_the_sandbox(prod):
    "Without --model the drill trains a small model: it is registered in the sandbox, not in production."
    s, store, _, _ = prod
    before, audit_before = snapshot(store, s), audit_rows(store)
    r = outage_drill(s, store)
    print(r.render())
    assert r.passed, r.render()
    check_unchanged(s, store, before, audit_before, 'outage', r)
    check_sandbox(s, r)

def test_drill_that_raises_leaves_production_unchanged(prod):
    "A drill that fails half-way (no bars in its replay window, after its sandbox was seeded and its model crowned) changes nothing in production either."
    s, store, _, _ = prod
    before, audit_before = snapshot(store, s), audit_rows(store)
    with pytest.raises(Exception) as e:
        crash_day_drill(s, store, window='1990-01-02:1990-03-30', gap_at='1990-02-01')
    p = check_unchanged(s, store, before, audit_before, 'crash-day')
    assert p['passed'] is False and type(e.value).__name__ in p['error']
    assert Path(p['sandbox']).parent == s.home/'drills'

def test_crash_day_drill_without_champion_refused(tmp_path):
    "Nothing to roll back to: refused before a sandbox is made; the refusal is recorded."
    s = load_settings({'TRADER_HOME': str(tmp_path)}, train=TINY)
    with Store(settings=s) as store:
        with pytest.raises(Exception, match='needs a champion'): crash_day_drill(s, store)
        assert not (s.home/'drills').exists()
        assert [r[2] for r in audit_rows(store)] == ['drill']
