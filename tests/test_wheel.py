"""A wheel built with `pip wheel --no-deps .` carries the report templates and the dashboard notebook (package data copied
from nbs/ at build time), and `trader gate` runs from it: the imported `trader` is the wheel's, not the editable checkout's.
Offline: no build isolation (the venv's setuptools), no index."""
import json, os, shutil, subprocess, sys, zipfile
from pathlib import Path
import pandas as pd
import pytest
from trader.core.config import load_settings
from trader.core.runs import Runs
from trader.core.store import Store

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = {'trader/ops/templates/backtest.ipynb': 'nbs/reports/backtest.ipynb',
            'trader/ops/templates/daily_gate.ipynb': 'nbs/reports/daily_gate.ipynb',
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
            assert z.read(inside) == (ROOT/source).read_bytes(), f"{inside} differs from {source} (it must be a build-time copy)"
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
