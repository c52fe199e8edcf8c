"""`trader experiment`: bad specs refused before anything is written; a SIGKILLed experiment continues without re-running
finished trials and ends with exactly the results of an uninterrupted run; `show --json` carries the statistics."""
import json, os, signal, sqlite3, subprocess, sys, time
from pathlib import Path
import pytest

TRADER = str(Path(sys.executable).parent/'trader')
TINY = '[train]\nn_steps = 128\nbatch_size = 64\nn_epochs = 2\ncheckpoint_every = 0\nn_envs = 1\n'
SPEC = 'symbols = ["AAPL", "MSFT"]\nseeds = 2\nsteps = 512\n[folds]\nn = 2\nstart = "2003-01-02"\n'

def trader(home, *args, timeout=600):
    e = {**os.environ, 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(Path(home)/'trader.toml')}
    return subprocess.run([TRADER, *args], capture_output=True, text=True, env=e, timeout=timeout)

def rows(home, q):
    c = sqlite3.connect(Path(home)/'trader.db')
    try: return c.execute(q).fetchall()
    except sqlite3.OperationalError: return []
    finally: c.close()

@pytest.fixture(scope='module')
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp('exp-home')
    (h/'trader.toml').write_text(TINY)
    (h/'spec.toml').write_text(SPEC)
    r = trader(h, 'ingest', '--source', 'sample', '--symbols', 'AAPL,MSFT')
    assert r.returncode == 0, r.stderr
    return h

BAD = {'unknown key': ('seedz = 2\n', 'unknown key'),
       'zero seeds': ('seeds = 0\n', 'at least one'),
       'holdout inside a fold': ('[folds]\nn = 2\nend = "2012-06-30"\n', 'overlaps the holdout'),
       'too few bars': ('[folds]\nn = 2\nstart = "2007-06-01"\nend = "2008-06-30"\ntest_months = 6\n', 'bars (<'),
       'unknown setting': ('[grid]\n"train.lr" = [0.001]\n', 'is not a setting')}

@pytest.mark.parametrize('case', list(BAD))
def test_bad_spec_refused(home, case, tmp_path):
    text, msg = BAD[case]
    spec = tmp_path/'bad.toml'; spec.write_text(text)
    count = lambda t: (rows(home, f'SELECT COUNT(*) FROM {t}') or [(0,)])[0][0]      # a table not created yet holds no rows
    before = count('experiments'), count('exp_trials'), count('models'), count('runs')
    r = trader(home, 'experiment', 'run', str(spec), '--name', 'bad-' + case.replace(' ', '-'))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (count('experiments'), count('exp_trials'), count('models'), count('runs')) == before

def _trials(home, name):
    return {k: (m, json.loads(x)) for k, m, x in rows(home, f"SELECT trial_key, model_id, metrics FROM exp_trials WHERE experiment = '{name}'")}

def test_sigkill_then_resume_equals_uninterrupted(home):
    spec = str(home/'spec.toml')
    r = trader(home, 'experiment', 'run', spec, '--name', 'ref', '--workers', '1')
    assert r.returncode == 0, r.stderr
    ref = json.loads(trader(home, 'experiment', 'show', 'ref', '--json').stdout)
    assert len(_trials(home, 'ref')) == 4
    # the same spec under another name, killed as soon as its first trial is stored
    e = {**os.environ, 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(home/'trader.toml')}
    p = subprocess.Popen([TRADER, 'experiment', 'run', spec, '--name', 'killed', '--workers', '1'], env=e, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < 300 and p.poll() is None and len(_trials(home, 'killed')) < 1: time.sleep(0.2)
    assert p.poll() is None, f"the experiment ended before it could be killed: {p.stderr.read()}"
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    before = _trials(home, 'killed')
    assert 1 <= len(before) < 4
    r = trader(home, 'experiment', 'run', spec, '--name', 'killed', '--workers', '1')
    assert r.returncode == 0, r.stderr
    after = _trials(home, 'killed')
    assert len(after) == 4
    assert all(after[k][0] == before[k][0] for k in before), 'a finished trial was re-run (its model changed)'
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in _trials(home, 'ref').items()}
    got = json.loads(trader(home, 'experiment', 'show', 'killed', '--json').stdout)
    for k in ('iqm', 'ci', 'dsr', 'n_trials', 'pbo'): assert got[k] == ref[k], k
    assert [f['model'] for f in got['folds']] == [f['model'] for f in ref['folds']]
    assert len(got['folds']) == 2 and {'buy_hold', 'ma_cross'} <= set(got['folds'][0])

def test_list_show_report(home):
    r = trader(home, 'experiment', 'list')
    assert r.returncode == 0 and 'ref' in r.stdout, r.stderr
    r = trader(home, 'experiment', 'show', 'ref')
    assert r.returncode == 0 and 'buy-and-hold' in r.stdout, r.stderr
    r = trader(home, 'experiment', 'show', 'nope')
    assert r.returncode == 2 and 'no experiment' in r.stderr
    r = trader(home, 'experiment', 'report', 'ref')
    assert r.returncode == 0, r.stderr
    html = [l for l in r.stdout.splitlines() if l.endswith('report.html')]
    assert html and Path(html[0].split()[-1]).stat().st_size > 10_000
    from test_reports_pdf import check_pdf
    summ = json.loads((Path(html[0].split()[-1]).parent/'summary.json').read_text())
    assert summ['verdict'].startswith('Over 2 walk-forward folds')
    check_pdf(Path(html[0].split()[-1]).with_suffix('.pdf'), summ['verdict'])

def test_promotion_from_an_experiment(home, tmp_path):
    "The best configuration replaces the champion's only if its IQM Sharpe is higher and its IQM max drawdown lower; the decision is recorded with both sets of figures."
    spec = tmp_path/'grid.toml'
    spec.write_text(SPEC + '[grid]\n"train.learning_rate" = [0.0003, 0.003]\n')
    r = trader(home, 'experiment', 'run', str(spec), '--name', 'grid', '--workers', '2')
    assert r.returncode == 0, r.stderr
    summ = json.loads(trader(home, 'experiment', 'show', 'grid', '--json').stdout)
    by = {json.dumps(c['config'], sort_keys=True): c for c in summ['configs']}
    default, other = by['{"train.learning_rate": 0.0003}'], by['{"train.learning_rate": 0.003}']
    champ = rows(home, f"SELECT model_id FROM exp_trials WHERE experiment = 'grid' AND config_id = '{default['config_id']}' ORDER BY trial_key LIMIT 1")[0][0]
    assert trader(home, 'models', 'champion', champ, '--reason', 'test: a default-configuration champion').returncode == 0
    r = trader(home, 'promote', '--experiment', 'grid')
    assert r.returncode == 0, r.stderr
    better = other['sharpe']['iqm'] > default['sharpe']['iqm'] and other['max_drawdown']['iqm'] < default['max_drawdown']['iqm']
    best_is_other = other['sharpe']['iqm'] > default['sharpe']['iqm']
    assert r.stdout.startswith('PROMOTED' if (best_is_other and better) else 'KEPT'), r.stdout
    assert f"{other['sharpe']['iqm']:.3f}" in r.stdout and f"{default['sharpe']['iqm']:.3f}" in r.stdout
    hist = rows(home, 'SELECT action, metrics FROM champion_history ORDER BY ts')
    assert hist[-1][0] == ('promote' if (best_is_other and better) else 'keep') and json.loads(hist[-1][1])['evidence']['experiment'] == 'grid'
    audit = rows(home, "SELECT payload FROM audit_log WHERE kind = 'promotion' ORDER BY seq")
    assert json.loads(audit[-1][0])['metrics']['evidence']['challenger']['sharpe_ci'] is not None
    r = trader(home, 'promote', '--experiment', 'grid', '--challenger', champ)
    assert r.returncode == 2 and '--challenger' in r.stderr
