"""A wheel built with `pip wheel --no-deps .` carries the report templates and the dashboard notebook (package data copied
from nbs/ at build time, without the outputs nbs/ commits), and `trader gate` runs from it: the imported `trader` is the wheel's, not the editable checkout's.
Offline: no build isolation (the venv's setuptools), no index.

`test_wheel_installed_in_a_clean_venv_runs_the_demo`: `pip install --no-deps` of the wheel into a new virtualenv made
without system site-packages, then the venv's own `trader` console script runs `trader demo --no-serve` (small budgets in
a trader.toml) from an unrelated folder with TRADER_HOME set, through every stage. What it proves: the wheel installs
with pip, its entry point works, and everything the demo needs from the project (code, report templates, the dashboard
notebook) comes from the installed wheel (the sample bars are the `bokeh-sampledata` dependency's): the checkout is not on sys.path (no PYTHONPATH, no editable
install's .pth is read), and the test checks the imported `trader` lives in the new venv. What it does not prove: that
the dependencies resolve from an index; they are the shared venv's (the versions requirements.lock pins, checked by
`make lock-check`), reached through one `.pth` line that appends that site-packages folder (offline: nothing is
downloaded)."""
import json, os, re, shutil, subprocess, sys, sysconfig, zipfile
from pathlib import Path
import pandas as pd
import pytest
from trader.core.config import load_settings
from trader.core.runs import Runs
from trader.core.store import Store

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = {'trader/ops/templates/backtest.ipynb': 'nbs/reports/backtest.ipynb',
            'trader/ops/templates/daily_gate.ipynb': 'nbs/reports/daily_gate.ipynb',
            'trader/ops/templates/experiment.ipynb': 'nbs/reports/experiment.ipynb',
            'trader/ops/templates/power.ipynb': 'nbs/reports/power.ipynb',
            'trader/ops/templates/dashboard.ipynb': 'nbs/dashboard.ipynb'}
SKIP = {'.git', '.venv', 'var', '.cache', '.test-home', 'build', 'dist', '_docs', '_proc', '__pycache__',
        '.pytest_cache', '.hypothesis', '.ipynb_checkpoints', 'benchmarks', 'monitoring', 'tests'}
SKIP_AT_ROOT = {'reports'}    # generated reports (nbs/reports holds the templates and is kept)

@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    "`pip wheel --no-deps .` on a copy of the checkout (the build writes build/ and egg-info; the shared checkout stays untouched)."
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp/'src'
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith('.egg-info')
                                                        or (Path(d) == ROOT and n in SKIP_AT_ROOT)])
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '.', '-w', str(tmp/'dist')],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (whl,) = (tmp/'dist').glob('trader-*.whl')
    return whl

def test_wheel_carries_the_templates(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for inside, source in PACKAGED.items():
            assert inside in names, sorted(n for n in names if not n.endswith('.py'))
            shipped, committed = json.loads(z.read(inside)), json.loads((ROOT/source).read_bytes())
            assert any(c.get('outputs') for c in committed['cells']), f'{source} is committed without outputs'
            # a build-time copy of the notebook in nbs/: the same cells and metadata (the parameters tag), no outputs
            strip = lambda c: {k: v for k, v in c.items() if k not in ('outputs', 'execution_count')}
            assert [strip(c) for c in shipped['cells']] == [strip(c) for c in committed['cells']], f"{inside} differs from {source}"
            assert shipped['metadata'] == committed['metadata']
            assert not any(c.get('outputs') or c.get('execution_count') for c in shipped['cells']), f'{inside} ships outputs'
        ep = next(n for n in names if n.endswith('entry_points.txt'))
        assert 'trader = trader.ops.cli:main' in z.read(ep).decode()
    # the checkout itself commits no copies: nbs/ is the one place they are edited
    assert not (ROOT/'trader'/'ops'/'templates').exists()

def test_trader_gate_runs_from_the_wheel(wheel, tmp_path):
    site = tmp_path/'site'
    with zipfile.ZipFile(wheel) as z: z.extractall(site)
    home = tmp_path/'home'
    s = load_settings({'TRADER_HOME': str(home), 'TRADER_DB_URL': ''})
    with Store(settings=s) as store:                 # a finished backtest with a known equity path; no stored quality report: RED (exit 3)
        runs = Runs(store)
        idx = pd.bdate_range('2012-06-01', periods=80, tz='UTC')
        eq = pd.Series(100_000*(1.002**pd.Series(range(80))).to_numpy(), index=idx)
        eq.iloc[-1] = eq.iloc[-2]*0.98
        rid = runs.create('backtest', ['AAPL', 'MSFT'], None, idx[0], idx[-1])
        runs.save_series(rid, pd.DataFrame({'equity': eq})); runs.finish(rid, {})
    elsewhere = tmp_path/'elsewhere'; elsewhere.mkdir()          # not the checkout: no settings.ini above, no nbs/ to fall back on
    (home/'none.toml').write_text('')
    env = {**os.environ, 'PYTHONPATH': str(site), 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_REPORTS': str(tmp_path/'reports'),
           'TRADER_CONFIG': str(home/'none.toml'), 'PYTHONNOUSERSITE': '1'}
    probe = ("import json, sys, trader; from trader.ops.reports import packaged_notebook;"
             "print(json.dumps({'trader': trader.__file__, 'gate': str(packaged_notebook('daily_gate')), 'dashboard': str(packaged_notebook('dashboard'))}))")
    r = subprocess.run([sys.executable, '-c', probe], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    where = json.loads(r.stdout)
    for k, v in where.items(): assert Path(v).resolve().is_relative_to(site.resolve()), (k, v, 'not imported from the wheel')
    out = tmp_path/'gates'
    cli = "import sys, trader; assert trader.__file__.startswith(sys.argv.pop(1)), trader.__file__; from trader.ops.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, '-c', cli, str(site), 'gate', '--run', rid, '--output-dir', str(out)],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-3000:]        # RED: the exit code from Python, not from the notebook
    day = f'{idx[-1]:%Y-%m-%d}'
    assert f'daily gate {day}  run {rid} (backtest)  ->  RED' in r.stdout and 'data quality' in r.stdout
    for ext in ('json', 'ipynb', 'html'): assert (out/f'{day}.{ext}').stat().st_size > 500, ext
    assert json.loads((out/f'{day}.json').read_text())['status'] == 'RED'
    nb = json.loads((out/f'{day}.ipynb').read_text())
    assert any('verdict' in ''.join(c['source']) for c in nb['cells'])      # the executed template is the render-only one

DEMO_TOML = ('[demo]\ntrain_steps = 256\nwalkforward_steps = 256\nwalkforward_folds = 1\nwalkforward_seeds = 1\n'
             '[train]\nn_steps = 128\nbatch_size = 64\nn_epochs = 1\ncheckpoint_every = 0\n')
STAGES = ['ingest', 'train', 'walk-forward', 'backtest', 'paper', 'drill', 'gate', 'audit']

@pytest.mark.slow   # the whole demo from an installed wheel (2-3 min): CI time; run with --runslow
def test_wheel_installed_in_a_clean_venv_runs_the_demo(wheel, tmp_path):
    venv = tmp_path/'venv'
    r = subprocess.run([sys.executable, '-m', 'venv', str(venv)], capture_output=True, text=True, timeout=300)  # ensurepip: offline
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'include-system-site-packages = false' in (venv/'pyvenv.cfg').read_text()
    py = venv/'bin'/'python'
    site = Path(subprocess.run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site/'deps-from-shared-venv.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')   # a plain path: that folder's .pth files are not read
    env = {k: v for k, v in os.environ.items() if not k.startswith(('PYTHON', 'TRADER_', 'JUPYTER', 'VIRTUAL_ENV'))}
    home, elsewhere = tmp_path/'home', tmp_path/'elsewhere'
    home.mkdir(); elsewhere.mkdir(); (home/'trader.toml').write_text(DEMO_TOML)
    env.update({'PYTHONNOUSERSITE': '1', 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_REPORTS': str(tmp_path/'reports'),
                'JUPYTER_PATH': str(tmp_path/'jupyter'), 'JUPYTER_DATA_DIR': str(tmp_path/'jupyter'), 'JUPYTER_CONFIG_DIR': str(tmp_path/'jupyter-config'),
                'NUMBA_CACHE_DIR': str(tmp_path/'numba'), 'MPLBACKEND': 'Agg', 'PATH': f"{venv/'bin'}:{env.get('PATH', '')}"})
    r = subprocess.run([str(py), '-m', 'pip', 'install', '-q', '--no-deps', '--no-index', str(wheel)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    probe = "import json, sys, trader; print(json.dumps({'trader': trader.__file__, 'path': sys.path}))"
    r = subprocess.run([str(py), '-c', probe], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert Path(got['trader']).resolve().is_relative_to(site.resolve()), got['trader']
    assert not any(Path(p).resolve() == ROOT.resolve() for p in got['path'] if p), got['path']     # the checkout is not importable
    r = subprocess.run([str(venv/'bin'/'trader'), 'demo', '--no-serve'], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=1500)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    for n, stage in enumerate(STAGES, 1): assert re.search(rf'^\[{n}\] {re.escape(stage)}\s', r.stdout, re.M), (stage, r.stdout[-3000:])
    assert 'FAILED' not in r.stdout and 'demo finished in' in r.stdout, r.stdout[-3000:]
    assert 'without encryption' not in out      # papermill's kernel runs over IPC (trader.ops.reports.run_template)
    assert str(home/'trader.db') in r.stdout and not (elsewhere/'var').exists()
    for rel in ('reports/experiments/demo-walkforward/report.html',): assert (tmp_path/rel).stat().st_size > 1000, rel
    (bt,) = (tmp_path/'reports'/'backtest').glob('*/backtest.ipynb')          # the packaged template, executed by the venv's kernel
    assert (bt.parent/'report.html').stat().st_size > 1000
    assert list((tmp_path/'reports'/'gates').glob('*.html'))
