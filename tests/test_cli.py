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


# -- every value checked up front: one line naming the argument, exit code 2, nothing written --------------------------
import socket
from trader.ops.cli import main as cli_main

def run_main(capsys, home, *argv):
    "The CLI in-process (fast): (exit code, stderr)."
    os.environ['TRADER_HOME'] = str(home)       # conftest's autouse fixture restores it after the test
    os.environ['TRADER_DB_URL'] = ''
    try: code = cli_main(list(argv))
    except SystemExit as e: code = e.code
    return code, capsys.readouterr().err

def store_state(home):
    "Row counts of every table, the store file's existence and the run ids (the observable state a bad argument must not touch)."
    db = Path(home)/'trader.db'
    # rows of every table that holds any (a migration applied on opening adds empty tables and a schema_migrations row: schema, not data)
    tables, runs = {k: n for k, n in db_state(home).items() if n and k != 'schema_migrations'}, []
    if 'runs' in db_state(home):                        # the runs table exists once the runs module has migrated the store
        c = sqlite3.connect(db)
        try: runs = sorted(r[0] for r in c.execute('select id from runs'))
        finally: c.close()
    return {'exists': db.exists(), 'tables': tables, 'runs': runs}

BAD = [   # (argv, the argument the message must name)
    (['paper', '--cash', '-5'], '--cash'), (['paper', '--cash', '0'], '--cash'), (['paper', '--cash', 'nan'], '--cash'),
    (['paper', '--cash', 'lots'], '--cash'), (['paper', '--speed', '0'], '--speed'), (['paper', '--speed', 'fast'], '--speed'),
    (['paper', '--replay', '2013-03-01:2012-01-03'], '--replay'), (['paper', '--replay', '2012-01-03'], '--replay'),
    (['paper', '--replay', 'jan:feb'], '--replay'), (['paper', '--metrics-port', '70000'], '--metrics-port'),
    (['paper', '--metrics-port', 'x'], '--metrics-port'), (['paper', '--model', '../../etc'], '--model'),
    (['paper', '--broker', 'ib'], '--broker'), (['paper', '--live'], '--live'),
    (['backtest', '--fees-bps', '-1'], '--fees-bps'), (['backtest', '--slippage-bps', '5000'], '--slippage-bps'),
    (['backtest', '--cash', '-100'], '--cash'), (['backtest', '--window', '2012-01-01:x'], '--window'),
    (['train', '--steps', '0'], '--steps'), (['train', '--steps', '1.5'], '--steps'), (['train', '--seed', '-1'], '--seed'),
    (['train', '--symbols', 'AA PL'], '--symbols'), (['train', '--symbols', ','], '--symbols'),
    (['train', '--train-window', '2009-12-31:2000-03-01'], '--train-window'), (['train', '--valid-window', '2010'], '--valid-window'),
    (['train', '--resume', 'a/b'], '--resume'), (['train', '--warm-start', '.hidden'], '--warm-start'),
    (['ingest', '--start', 'not-a-date'], '--start'), (['ingest', '--start', '2013-01-01', '--end', '2012-01-01'], '--end'),
    (['ingest', '--source', 'csv'], '--path'), (['ingest', '--source', 'csv', '--path', '/nonexistent.csv'], '--path'),
    (['ingest', '--source', 'yahoo'], '--source'), (['ingest', '--source', 'alpaca', '--start', '2024-01-02'], '--symbols'),
    (['ingest', '--timeframe', '3Day'], '--timeframe'),
    (['bars', '--symbol', 'AAPL', '--tail', '0'], '--tail'), (['bars', '--symbol', 'A/B'], '--symbol'), (['bars'], '--symbol'),
    (['quality', '--end', 'yesterday-ish'], '--end'),
    (['sweep', 'ma', '--fast', '5:3'], '--fast'), (['sweep', 'ma', '--slow', 'a:b:c'], '--slow'), (['sweep', 'ma', '--top', '0'], '--top'),
    (['sweep', 'rsi'], 'kind'),
    (['report', 'backtest', '--cash', '-1'], '--cash'), (['report', 'backtest', '--fees-bps', 'inf'], '--fees-bps'),
    (['gate', '--date', '2012-13-45'], '--date'), (['gate', '--run', 'a b'], '--run'), (['gate', '--output-dir', ''], '--output-dir'),
    (['promote'], '--challenger'), (['promote', '--challenger', 'x', '--window', '2010-01-01'], '--window'),
    (['runs', '--limit', '0'], '--limit'), (['runs', '--kind', 'live'], '--kind'), (['status', '--run', 'x/y'], '--run'),
    (['resume'], '--reason'), (['resume', '--reason', '  '], '--reason'), (['kill', '--reason', ''], '--reason'),
    (['drill', 'flood'], 'kind'), (['drill', 'outage', '--model', '../m'], '--model'),
    (['audit', 'verify', '--from-seq', '-1'], '--from-seq'), (['audit', 'export', '--from', 'then'], '--from'),
    (['dashboard', '--port', '0'], '--port'), (['nightly', '--steps', '-5'], '--steps'), (['nightly', '--challenger', 'a b'], '--challenger'),
    (['models', 'show'], 'ID'), (['models', 'show', '../x'], 'ID'), (['models', 'rename'], 'action'),
]

@pytest.mark.parametrize('argv,arg', BAD, ids=[' '.join(a) for a, _ in BAD])
def test_bad_value_refused_up_front(capsys, home, tmp_path, argv, arg):
    "On a store with data and on an empty home: exit 2, one line naming the argument, no run, no row, no store file created."
    for h in (home, tmp_path/'empty'):
        before = store_state(h)
        code, err = run_main(capsys, h, *argv)
        assert code == 2, (argv, err)
        assert err.startswith('error: ') and err.strip().count('\n') == 0, err
        assert f'argument {arg}: ' in err or f'arguments are required: {arg}' in err, (arg, err)
        assert 'Traceback' not in err and 'unexpected' not in err
        assert store_state(h) == before, argv

@pytest.fixture(scope='module')
def model_home(home):
    "The sample store with a prepared model as champion (for the reference checks that need one)."
    from conftest import fixed_action_model
    from trader.core.config import load_settings
    from trader.core.registry import Registry
    from trader.core.store import Store
    s = load_settings({'TRADER_HOME': str(home), 'TRADER_DB_URL': ''})
    with Store(settings=s) as st:
        mid = fixed_action_model(st, s, 8)
        Registry(st, s).set_champion(mid, 'test: reference checks')
    return home

BAD_REFS = [   # references looked up read-only before anything is created
    (['paper', '--model', 'no-such-model'], '--model', 'no model'),
    (['paper', '--replay', '1990-01-02:1990-03-01'], '--replay', 'no stored bars'),
    (['backtest', '--model', 'no-such-model'], '--model', 'no model'),
    (['report', 'backtest', '--model', 'no-such-model'], '--model', 'no model'),
    (['train', '--resume', 'no-such-model', '--steps', '64'], '--resume', 'no model'),
    (['train', '--warm-start', 'no-such-model', '--steps', '64'], '--warm-start', 'no model'),
    (['promote', '--challenger', 'no-such-model'], '--challenger', 'no model'),
    (['nightly', '--challenger', 'no-such-model'], '--challenger', 'no model'),
    (['drill', 'outage', '--model', 'no-such-model'], '--model', 'no model'),
    (['models', 'show', 'no-such-model'], 'ID', 'no model'),
    (['models', 'champion', 'no-such-model'], 'ID', 'no model'),
    (['gate', '--run', 'no-such-run'], '--run', "no run 'no-such-run'"),
    (['status', '--run', 'no-such-run'], '--run', "no run 'no-such-run'"),
]

@pytest.mark.parametrize('argv,arg,why', BAD_REFS, ids=[' '.join(a) for a, _, _ in BAD_REFS])
def test_bad_reference_refused_up_front(capsys, model_home, argv, arg, why):
    before = store_state(model_home)
    code, err = run_main(capsys, model_home, *argv)
    assert code == 2 and err.startswith(f'error: argument {arg}: ') and why in err and err.strip().count('\n') == 0, err
    assert store_state(model_home) == before

def test_port_in_use_refused_up_front(capsys, home):
    with socket.socket() as so:
        so.bind(('127.0.0.1', 0)); so.listen(1)
        port = str(so.getsockname()[1])
        for argv, arg in ((['paper', '--metrics-port', port], '--metrics-port'), (['dashboard', '--port', port], '--port')):
            before = store_state(home)
            code, err = run_main(capsys, home, *argv)
            assert code == 2 and f'argument {arg}: 127.0.0.1:{port} is already in use' in err, err
            assert store_state(home) == before

def test_paper_negative_cash_writes_nothing(home, tmp_path):
    "The issue's example, as a real process: `trader paper --cash -5` used to create a run, process a bar and fail with 'unexpected ValueError'."
    for h in (home, tmp_path):
        before = store_state(h)
        r = trader(h, 'paper', '--cash', '-5')
        assert r.returncode == 2 and r.stderr.strip() == "error: argument --cash: must be > 0, got -5 (see `trader paper --help`)", r.stderr
        assert store_state(h) == before
    assert not (tmp_path/'trader.db').exists()

def test_good_values_still_parse():
    from trader.ops.cli import build_parser
    a = build_parser().parse_args(['paper', '--cash', '2500.5', '--speed', '20', '--replay', '2012-01-03:2012-02-01', '--metrics-port', '9999'])
    assert (a.cash, a.speed, a.replay, a.metrics_port) == (2500.5, 20.0, '2012-01-03:2012-02-01', 9999)
    a = build_parser().parse_args(['train', '--symbols', ' aapl,msft ', '--steps', '512', '--seed', '7'])
    assert (a.symbols, a.steps, a.seed) == ('AAPL,MSFT', 512, 7)
    assert build_parser().parse_args(['paper']).speed == 'max'
