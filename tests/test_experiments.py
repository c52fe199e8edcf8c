"""`trader experiment`: bad specs refused before anything is written; a SIGKILLed experiment continues without re-running
finished trials and ends with exactly the results of an uninterrupted run; `show --json` carries the statistics, the data-snooping
ones included (PBO over configurations: null for one; Hansen's SPA p-value; the model confidence set; the promotion rule `evidence`);
`[optuna] enqueue_default` makes the default configuration the search's first trial."""
import json, os, signal, sqlite3, subprocess, sys, time
from pathlib import Path
import pytest

TRADER = str(Path(sys.executable).parent/'trader')
TINY = '[train]\nn_steps = 128\nbatch_size = 64\nn_epochs = 2\ncheckpoint_every = 0\nn_envs = 1\n'
SPEC = 'symbols = ["AAPL", "MSFT"]\nseeds = 2\nsteps = 512\n[folds]\nn = 2\nstart = "2003-01-02"\n'

def trader(home, *args, timeout=600):
    e = {**os.environ, 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(Path(home)/'trader.toml'),
         'TRADER_REPORTS': str(Path(home)/'reports')}                      # reports in the test's home, not the checkout's reports/
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
       'unknown setting': ('[grid]\n"train.lr" = [0.001]\n', 'is not a setting'),
       'default outside the search': ('seeds = 3\n[settings]\n"train.learning_rate" = 0.01\n[optuna]\ntrials = 2\nenqueue_default = true\n'
                                      '[optuna.params]\n"train.learning_rate" = {low = 0.0001, high = 0.003, log = true}\n', 'outside its search range')}

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
    assert f"{default['sharpe']['iqm']:.3f}" in r.stdout                     # the champion's configuration's figures
    if best_is_other: assert f"{other['sharpe']['iqm']:.3f}" in r.stdout     # and the challenger's, when the best is another configuration
    hist = rows(home, 'SELECT action, metrics FROM champion_history ORDER BY ts')
    assert hist[-1][0] == ('promote' if (best_is_other and better) else 'keep') and json.loads(hist[-1][1])['evidence']['experiment'] == 'grid'
    audit = rows(home, "SELECT payload FROM audit_log WHERE kind = 'promotion' ORDER BY seq")
    assert json.loads(audit[-1][0])['metrics']['evidence']['challenger']['sharpe_ci'] is not None
    r = trader(home, 'promote', '--experiment', 'grid', '--challenger', champ)
    assert r.returncode == 2 and '--challenger' in r.stderr

def _run_show(home, spec, name, workers='1'):
    r = trader(home, 'experiment', 'run', str(spec), '--name', name, '--workers', workers)      # nothing to do when it is complete
    assert r.returncode == 0, r.stderr
    r = trader(home, 'experiment', 'show', name, '--json')
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)

def test_show_json_data_snooping(home, tmp_path):
    "One configuration: `pbo` null with the reason; two: a number. Both: `spa_pvalue`, `mcs` over the configurations and the baselines, `evidence`."
    one = _run_show(home, home/'spec.toml', 'ref')
    grid = tmp_path/'grid.toml'; grid.write_text(SPEC + '[grid]\n"train.learning_rate" = [0.0003, 0.003]\n')
    two = _run_show(home, grid, 'grid', '2')
    baselines = ['buy_hold', 'vol_target', 'ma_cross', 'supervised']
    for got, n in ((one, 1), (two, 2)):
        for f in got['folds']: assert all(f[b] and 'sharpe' in f[b] for b in baselines), f
        assert 0 <= got['spa_pvalue'] <= 1 and got['spa']['n_models'] == n and got['spa']['n_trials'] == got['n_trials'] == 2*n
        assert got['spa']['bars'] > 400 and got['spa']['bars_unmatched'] == 0 and got['spa']['benchmark'] == 'buy_hold'
        ids = [c['config_id'] for c in got['configs']]
        assert sorted(got['mcs']['included'] + got['mcs']['excluded']) == sorted(ids + baselines) and set(got['mcs']['pvalues']) == set(ids + baselines)
        assert got['mcs']['included'] and all(0 <= p <= 1 for p in got['mcs']['pvalues'].values())
        ev = got['evidence']
        assert ev['promote'] is (got['ci'][0] > got['buy_hold_sharpe_iqm'] and got['spa_pvalue'] < 0.05) and f"SPA p {got['spa_pvalue']:.3f}" in ev['why']
        assert f"over {n} configuration" in ev['why'] and got['verdict'].endswith(ev['why'] + '.')
        assert 0 <= got['prob_improvement']['p'] <= 1 and set(got['performance_profile']['profiles']) == {got['best']['config_id'], *baselines}
    assert one['pbo'] is None and one['pbo_why'].startswith('one configuration') and one['pbo_logits'] == []
    assert 'probability of backtest overfitting is not defined here (one configuration' in one['verdict']
    assert 0 <= two['pbo'] <= 1 and two['pbo_why'] is None and two['pbo_n_configs'] == 2 and len(two['pbo_logits']) == 12870

def test_enqueue_default_puts_the_defaults_first(home, tmp_path):
    "With `[optuna] enqueue_default = true` the first configuration trained is the default (the base settings with the spec's [settings])."
    spec = tmp_path/'opt.toml'
    spec.write_text('symbols = ["AAPL", "MSFT"]\nseeds = 3\nsteps = 128\n[folds]\nn = 1\nstart = "2003-01-02"\n[settings]\n"train.learning_rate" = 0.0007\n'
                    '[optuna]\ntrials = 2\nseed = 0\nenqueue_default = true\n[optuna.params]\n"train.learning_rate" = {low = 0.0001, high = 0.003, log = true}\n')
    got = _run_show(home, spec, 'opt')
    configs = [json.loads(c) for c, in rows(home, "SELECT config FROM exp_trials WHERE experiment = 'opt' ORDER BY rowid")]
    assert len(configs) == 6 and configs[:3] == [{'train.learning_rate': 0.0007}]*3, configs
    assert configs[3]['train.learning_rate'] != 0.0007 and len({json.dumps(c) for c in configs}) == 2
    assert got['spa']['n_models'] == 2 and got['pbo'] is not None
    assert {json.dumps(c['config']) for c in got['configs']} == {json.dumps(c) for c in configs}

def test_evidence_rule():
    "The promotion rule on hand-made summaries: both conditions, in words."
    from trader.research.experiments import evidence
    s = {'ci': [0.42, 1.31], 'buy_hold_sharpe_iqm': 0.27, 'spa_pvalue': 0.012, 'spa': {'n_models': 3, 'n_configs_tried': 3}}
    assert evidence(s) == (True, "interval 0.42..1.31 above buy-and-hold's 0.27 and SPA p 0.012 < 0.05 over 3 configurations")
    assert evidence(s, alpha=0.01) == (False, "interval 0.42..1.31 above buy-and-hold's 0.27 and SPA p 0.012 >= 0.01 over 3 configurations")
    assert evidence({**s, 'ci': [0.27, 1.31]}) == (False, "interval 0.27..1.31 not above buy-and-hold's 0.27 and SPA p 0.012 < 0.05 over 3 configurations")
    ok, why = evidence({**s, 'spa': {'n_models': 1, 'n_configs_tried': 4}})
    assert ok and why.endswith('over 1 configuration (4 tried)'), why
    ok, why = evidence({k: v for k, v in s.items() if k not in ('spa_pvalue', 'spa')})                       # stored before the SPA test
    assert not ok and why.startswith("interval 0.42..1.31 above buy-and-hold's 0.27, but no SPA p-value: the summary predates"), why
    ok, why = evidence({**s, 'spa_pvalue': None, 'spa': None, 'spa_why': 'no buy-and-hold baseline was stored for every fold'})
    assert not ok and why.endswith('no SPA p-value: no buy-and-hold baseline was stored for every fold'), why
    assert evidence({**s, 'buy_hold_sharpe_iqm': None})[0] is False and 'no buy-and-hold' in evidence({**s, 'buy_hold_sharpe_iqm': None})[1]
    assert evidence({'name': 'x', 'status': 'no complete configuration yet', 'configs': []}) == \
        (False, 'no complete configuration yet, so there is nothing to judge')
