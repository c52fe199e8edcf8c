"""The `trader` command end to end, in subprocesses, on a temporary TRADER_HOME."""
import json, os, sqlite3, subprocess, sys
from pathlib import Path
import pandas as pd
import pytest
from trader.core.data import load_sample
from trader.core.quality import CORRUPTIONS, corrupt

TRADER = str(Path(sys.executable).parent/'trader')

def trader(home, *args, env=None):
    e = {**os.environ, 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', **(env or {})}
    return subprocess.run([TRADER, *args], capture_output=True, text=True, env=e, timeout=300)

def db_state(home):
    "Row counts of every table (the store's observable state)."
    db = Path(home)/'trader.db'
    if not db.exists(): return {}
    c = sqlite3.connect(db)
    try:
        tables = [r[0] for r in c.execute("select name from sqlite_master where type='table'")]
        return {t: c.execute(f'select count(*) from "{t}"').fetchone()[0] for t in tables}
    finally: c.close()

@pytest.fixture(scope='module')
def home(tmp_path_factory):
    "A store holding the adjusted AAPL+MSFT sample."
    h = tmp_path_factory.mktemp('home')
    r = trader(h, 'ingest', '--source', 'sample', '--symbols', 'AAPL,MSFT')
    assert r.returncode == 0, r.stderr
    return h

def test_sample_ingest_prints_score(home):
    r = trader(home, 'quality', '--symbols', 'AAPL,MSFT')
    assert r.returncode == 0, r.stderr
    assert 'PASSED' in r.stdout and 'AAPL' in r.stdout and 'MSFT' in r.stdout
    assert 'score 99.' in r.stdout

def test_ingest_twice_is_idempotent(home):
    before = db_state(home)['bars']
    r = trader(home, 'ingest', '--source', 'sample', '--symbols', 'AAPL,MSFT', '-q')
    assert r.returncode == 0, r.stderr
    assert db_state(home)['bars'] == before == 6540

def test_raw_sample_blocked_on_splits(home):
    before = db_state(home)
    r = trader(home, 'ingest', '--source', 'sample', '--symbols', 'AAPL', '--raw')
    assert r.returncode == 2
    assert 'splits' in r.stderr and 'likely unadjusted split' in r.stderr
    for day in ('2000-06-21', '2005-02-28'): assert day in r.stderr
    assert 'market move' in r.stderr           # 2000-09-29 is reported as a genuine move, not a split
    assert r.stderr.startswith('error: ') and 'Traceback' not in r.stderr
    assert db_state(home) == before

@pytest.mark.parametrize('kind', list(CORRUPTIONS))
def test_bad_file_rejected(home, tmp_path, kind):
    "Each kind of bad file: exit 2, the failing check named, the store unchanged."
    good = load_sample('MSFT', start='2012-01-01', end='2012-06-30').drop(columns=['adj_close', 'symbol'])
    bad = corrupt(good.assign(symbol='MSFT'), kind).drop(columns='symbol', errors='ignore')
    p = tmp_path/f'{kind}.csv'
    if kind == 'empty': p.write_text('')
    else: bad.assign(ts=pd.to_datetime(bad.ts).dt.strftime('%Y-%m-%d')).rename(columns={'ts': 'Date'}).to_csv(p, index=False)
    before = db_state(home)
    r = trader(home, 'ingest', '--source', 'csv', '--path', str(p), '--symbol', 'MSFT')
    assert r.returncode == 2, (kind, r.stdout, r.stderr)
    assert f'{CORRUPTIONS[kind]:<20} FAIL' in r.stderr, (kind, r.stderr)
    assert 'nothing was written' in r.stderr
    assert 'Traceback' not in r.stderr
    assert db_state(home) == before

def test_good_file_accepted(tmp_path):
    p = tmp_path/'ibm.csv'
    load_sample('IBM', start='2010-01-01', end='2010-12-31').drop(columns=['adj_close', 'symbol']).to_csv(p, index=False)
    r = trader(tmp_path, 'ingest', '--source', 'csv', '--path', str(p), '--symbol', 'IBM', '-q')
    assert r.returncode == 0, r.stderr
    assert db_state(tmp_path)['bars'] == 252

def test_parquet_with_symbol_column(tmp_path):
    p = tmp_path/'two.parquet'
    load_sample(['AAPL', 'MSFT'], start='2012-01-01', end='2012-03-31').drop(columns='adj_close').to_parquet(p)
    r = trader(tmp_path, 'ingest', '--source', 'parquet', '--path', str(p), '-q')
    assert r.returncode == 0, r.stderr
    assert 'AAPL 62, MSFT 62' in r.stdout   # Q1 2012: 62 NYSE sessions

def test_bars_output(home):
    r = trader(home, 'bars', '--symbol', 'AAPL', '--start', '2013-02-25', '--format', 'json')
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert [x['ts'][:10] for x in rows] == ['2013-02-25', '2013-02-26', '2013-02-27', '2013-02-28', '2013-03-01']
    assert abs(rows[-1]['close'] - 56.137353) < 1e-4    # adjusted close on 2013-03-01

def test_errors_are_one_line(tmp_path):
    r = trader(tmp_path, 'bars', '--symbol', 'TSLA')
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and r.stderr.startswith('error: ')
    r = trader(tmp_path, 'ingest', '--source', 'alpaca', '--symbols', 'AAPL', '--start', '2024-01-02',
               env={'APCA_API_KEY_ID': '', 'APCA_API_SECRET_KEY': ''})
    assert r.returncode == 2 and 'APCA_API_KEY_ID' in r.stderr and 'APCA_API_SECRET_KEY' in r.stderr
    (tmp_path/'trader.toml').write_text('[quality]\nmin_score = "high"\n')
    r = trader(tmp_path, 'quality')
    assert r.returncode == 2 and 'quality.min_score' in r.stderr and 'Traceback' not in r.stderr

def test_verbose_shows_detail(tmp_path):
    r = trader(tmp_path, 'bars', '--symbol', 'TSLA', '-v')
    assert r.returncode == 2 and 'Traceback' in r.stderr

@pytest.mark.parametrize('cmd', ['ingest', 'quality', 'bars', 'demo'])
def test_help(cmd, tmp_path):
    r = trader(tmp_path, cmd, '--help')
    assert r.returncode == 0 and 'usage: trader' in r.stdout and '--verbose' in r.stdout
