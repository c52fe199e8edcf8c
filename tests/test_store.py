"""`trader.core.store.Store` on both engines: schema and migrations, idempotent and atomic ingest, exact round trips,
stored quality reports, and readers/writers in different sessions.

Tests taking `store` or `db_url` run once on SQLite and once on PostgreSQL (see conftest.py); the PostgreSQL runs
skip without a server unless CI=true.
"""
import json, subprocess, sys, threading, time
import numpy as np, pandas as pd
import pytest
from conftest import hang_guard
from trader.core.config import QualitySettings
from trader.core.data import BAR_COLUMNS, bars_sha256, load_sample
from trader.core.quality import CORRUPTIONS, DataQualityGate, QualityGateBlocked, corrupt
import trader.core.audit, trader.core.runs, trader.core.registry, trader.live.broker   # the owners register their tables
from trader.core.store import MIGRATIONS, Store, StoreError, _SCHEMAS, json_text, register_schema

SAMPLE_BARS = 6540   # real AAPL + MSFT daily bars, 3270 each

@pytest.fixture(scope='module')
def gate():
    return DataQualityGate(QualitySettings())   # default thresholds, whatever trader.toml says

@pytest.fixture(scope='module')
def sample_report(gate):
    rep = gate.check(load_sample(['AAPL', 'MSFT']), '1Day', source='sample AAPL,MSFT')
    assert not rep.blocked and rep.n_bars == SAMPLE_BARS
    return rep

def bars_of(symbols, **kw) -> pd.DataFrame:
    return load_sample(symbols, **kw).drop(columns='adj_close')

def tables(store) -> set[str]: return store.tables()

def all_migrations() -> list[tuple[str, int]]:
    return [(o, v) for o, ms in _SCHEMAS.items() for v, _, _ in ms]

def state(store) -> dict[str, int]:
    "Row counts of the tables an ingest writes."
    return {t: int(store.query(f'SELECT COUNT(*) FROM {t}')[0][0]) for t in ('bars', 'quality_reports', 'quality_symbols')}

def expected(frame:pd.DataFrame) -> pd.DataFrame:
    "`frame` as read_bars returns it: sorted by symbol and time."
    return frame[BAR_COLUMNS].sort_values(['symbol', 'ts'], kind='stable').reset_index(drop=True)

# -- schema and migrations ---------------------------------------------------------------------------

def test_migrations_create_schema_and_are_idempotent(db_url):
    first = Store(db_url, migrate=False)
    assert first.migrate() == all_migrations()
    assert ('core.store', 1) in all_migrations() and [v for v, _, _ in MIGRATIONS] == [1]
    assert {'schema_migrations', 'bars', 'quality_reports', 'quality_symbols', 'runs', 'run_series', 'run_orders', 'run_decisions',
            'models', 'champion_history', 'audit_log', 'broker_orders', 'broker_positions', 'broker_accounts',
            'gate_history', 'loop_state', 'heartbeats', 'risk_events', 'controls'} <= tables(first)
    assert sorted(first.query('SELECT owner, version FROM schema_migrations')) == sorted(all_migrations())
    assert first.migrate() == []                       # same connection, again
    first.close()
    with Store(db_url) as second:                      # opening twice applies nothing the second time
        assert second.migrate() == []
        assert int(second.query('SELECT COUNT(*) FROM schema_migrations')[0][0]) == len(all_migrations())
        assert second.count_bars() == 0

def test_concurrent_first_opens_migrate_once(db_url):
    "Several sessions opening a new database at the same moment: none fails, the schema is applied once."
    n, errors, barrier = 6, [], threading.Barrier(6)
    def open_store():
        try:
            barrier.wait(10)
            Store(db_url).close()
        except Exception as e: errors.append(e)
    threads = [threading.Thread(target=open_store) for _ in range(n)]
    for t in threads: t.start()
    for t in threads: t.join(60)
    assert errors == []
    with Store(db_url) as s:
        assert int(s.query('SELECT COUNT(*) FROM schema_migrations')[0][0]) == len(all_migrations())

# -- ingest: idempotent, upserting, atomic --------------------------------------------------------------

def test_ingesting_the_same_sample_twice_leaves_the_row_count_unchanged(store, gate, sample_report):
    assert store.ingest(sample_report) == SAMPLE_BARS
    assert store.count_bars() == SAMPLE_BARS
    first = store.read_bars(['AAPL', 'MSFT'])
    again = gate.check(load_sample(['AAPL', 'MSFT']), '1Day', source='sample AAPL,MSFT')   # a new batch, same data
    assert store.ingest(again) == SAMPLE_BARS
    assert store.count_bars() == SAMPLE_BARS
    assert store.count_bars('AAPL') == store.count_bars('MSFT') == SAMPLE_BARS // 2
    pd.testing.assert_frame_equal(store.read_bars(['AAPL', 'MSFT']), first, check_exact=True)
    assert state(store) == {'bars': SAMPLE_BARS, 'quality_reports': 2, 'quality_symbols': 4}

def test_chunked_ingest_twice_is_idempotent(store, sample_report):
    "Large batches are written in chunks inside one transaction; every chunk of the re-ingest takes the upsert path."
    for _ in range(2):
        assert store.ingest(sample_report, progress=True, chunk=1000) == SAMPLE_BARS
        assert store.count_bars() == SAMPLE_BARS
    pd.testing.assert_frame_equal(store.read_bars(), expected(sample_report.frame), check_exact=True)

def test_overlapping_range_upserts(store, gate):
    old = bars_of('AAPL', end='2010-12-31')
    new = bars_of('AAPL', start='2010-01-01')
    for c in ('open', 'high', 'low', 'close'): new[c] = new[c]*1.01     # changed values in the overlap (and after it)
    new['volume'] = new['volume'] + 7
    store.ingest(gate.check(old, '1Day'))
    store.ingest(gate.check(new, '1Day'))
    union = pd.concat([old[old.ts < new.ts.min()], new], ignore_index=True)
    assert len(old) + len(new) > len(union) == len(bars_of('AAPL'))
    assert store.count_bars() == len(union)
    got = store.read_bars('AAPL')
    pd.testing.assert_frame_equal(got, expected(union), check_exact=True)
    overlap = got[(got.ts >= new.ts.min()) & (got.ts <= old.ts.max())]
    assert len(overlap) > 200 and (overlap.volume.to_numpy() == new.set_index('ts').loc[overlap.ts, 'volume'].to_numpy()).all()

def test_overlapping_writes_in_one_transaction(store):
    "Three writes of overlapping ranges in one transaction: each replaces what the previous one wrote."
    b = bars_of('IBM').iloc[:200].reset_index(drop=True)
    changed = b.iloc[100:200].assign(close=lambda d: d.close + 0.5, high=lambda d: d.high + 0.5)
    with store.transaction():
        store.write_bars(b.iloc[:100])
        store.write_bars(b.iloc[50:150])
        store.write_bars(changed)
    assert store.count_bars() == 200
    pd.testing.assert_frame_equal(store.read_bars('IBM'), expected(pd.concat([b.iloc[:100], changed])), check_exact=True)

def test_write_bars_keeps_timeframes_apart(store):
    b = bars_of('IBM').iloc[:50]
    store.write_bars(b, '1Day'); store.write_bars(b, '1Hour')
    assert store.count_bars(timeframe='1Day') == store.count_bars(timeframe='1Hour') == 50
    assert store.count_bars() == 100

# -- exact round trips ----------------------------------------------------------------------------------

def awkward_minute_bars() -> pd.DataFrame:
    "Minute bars with microsecond timestamps and floats that do not survive a decimal round trip by accident."
    ts = pd.to_datetime(['2024-01-02 14:30:00', '2024-01-02 14:31:00.000001', '2024-01-02 20:59:59.999999',
                         '1999-12-31 23:59:00', '1970-01-01 00:00:00', '1969-07-20 20:17:40.5', '2038-01-19 03:14:08'], utc=True, format='ISO8601')
    n = len(ts)
    close = np.array([0.1 + 0.2, 1/3, np.nextafter(1.0, 2.0), 1e-300, 123456789.12345679, 5e-324, 1.7976931348623157e308])
    return pd.DataFrame({'symbol': ['ZZ']*n, 'ts': ts.astype('datetime64[ns, UTC]'), 'open': close, 'high': close*1, 'low': close,
                         'close': close, 'volume': np.array([0.0, 1.0, 2.5, 1e15, 3.0, 7.0, 9.0])})

def test_read_bars_round_trips_exactly(store):
    bars = awkward_minute_bars()
    store.write_bars(bars, '1Min')
    got = store.read_bars('ZZ', timeframe='1Min')
    assert str(got.ts.dtype) == 'datetime64[ns, UTC]' and all(got[c].dtype == np.float64 for c in BAR_COLUMNS[2:])
    pd.testing.assert_frame_equal(got, expected(bars), check_exact=True)
    assert (got[BAR_COLUMNS[2:]].to_numpy().view('int64') == expected(bars)[BAR_COLUMNS[2:]].to_numpy().view('int64')).all()  # bit for bit
    # inclusive bounds, given as strings or Timestamps
    e = expected(bars)
    inside = store.read_bars('ZZ', start='2024-01-02 14:31:00.000001', end=e.ts.max(), timeframe='1Min')
    pd.testing.assert_frame_equal(inside, e[(e.ts >= pd.Timestamp('2024-01-02 14:31:00.000001', tz='UTC'))].reset_index(drop=True), check_exact=True)
    assert store.read_bars('ZZ', timeframe='1Day').empty

def test_sample_round_trips_exactly(store, sample_report):
    store.ingest(sample_report)
    pd.testing.assert_frame_equal(store.read_bars(['AAPL', 'MSFT']), expected(sample_report.frame), check_exact=True)
    assert bars_sha256(store.read_bars()) == sample_report.data_sha256

def test_postgresql_round_trip_ignores_session_time_zone(pg_store):
    bars = awkward_minute_bars()
    pg_store.write_bars(bars, '1Min')
    pg_store.execute("SET TIME ZONE 'America/New_York'")
    pd.testing.assert_frame_equal(pg_store.read_bars('ZZ', timeframe='1Min'), expected(bars), check_exact=True)
    s = pg_store.bar_summary()
    assert s['first'].iloc[0] == bars.ts.min() and s['last'].iloc[0] == bars.ts.max()

# -- blocked batches and failures write nothing ---------------------------------------------------------------

@pytest.mark.parametrize('kind', sorted(CORRUPTIONS))
def test_blocked_report_writes_nothing(store, gate, sample_report, kind):
    store.ingest(sample_report)
    before = state(store)
    bad = gate.check(corrupt(load_sample('MSFT', start='2012-01-01'), kind), '1Day')
    assert bad.blocked
    with pytest.raises(QualityGateBlocked):
        store.ingest(bad)
    assert state(store) == before

def test_failure_inside_a_transaction_rolls_back(store, sample_report):
    store.ingest(sample_report)
    before = state(store)
    with pytest.raises(RuntimeError, match='crash'):
        with store.transaction():
            store.write_bars(bars_of('IBM'))
            store.write_bars(bars_of('AAPL').assign(close=lambda d: d.close*2, high=lambda d: d.high*2))   # an upsert, too
            with store.transaction():                        # a nested block joins the outer transaction
                store.save_quality_report(sample_report, 'check')
            raise RuntimeError('crash after writing')
    assert state(store) == before
    pd.testing.assert_frame_equal(store.read_bars(['AAPL', 'MSFT']), expected(sample_report.frame), check_exact=True)

def test_database_error_rolls_back_and_the_store_stays_usable(store, sample_report):
    with pytest.raises(Exception):
        with store.transaction():
            store.write_bars(bars_of('IBM'))
            store.execute('INSERT INTO no_such_table VALUES (1)')
    assert store.count_bars() == 0
    assert store.ingest(sample_report) == SAMPLE_BARS     # no transaction left open or aborted
    assert store.count_bars() == SAMPLE_BARS

def test_ingest_is_atomic_when_storing_the_report_fails(store, sample_report, monkeypatch):
    def boom(self, *a, **kw): raise RuntimeError('crash while saving the report')
    monkeypatch.setattr(Store, 'save_quality_report', boom)
    with pytest.raises(RuntimeError, match='crash'):
        store.ingest(sample_report)
    assert state(store) == {'bars': 0, 'quality_reports': 0, 'quality_symbols': 0}

# -- quality reports ----------------------------------------------------------------------------------------

def test_quality_report_and_per_symbol_scores_are_stored_with_the_data_sha256(store, sample_report):
    store.ingest(sample_report)
    reps = store.quality_reports()
    assert len(reps) == 1
    r = reps.iloc[0]
    assert r.kind == 'ingest' and r.symbols == 'AAPL,MSFT' and r.timeframe == '1Day' and r.source == 'sample AAPL,MSFT'
    assert int(r.n_bars) == int(r.rows_written) == SAMPLE_BARS and int(r.blocked) == 0
    assert r.score == pytest.approx(sample_report.score)
    assert r.data_sha256 == sample_report.data_sha256 == bars_sha256(sample_report.frame) and len(r.data_sha256) == 64
    assert sample_report.id == int(r.id)                         # ingest exposes the stored id (INSERT ... RETURNING)
    doc = store.query('SELECT report FROM quality_reports WHERE id = ?', (int(r.id),))[0][0]
    assert isinstance(doc, dict)                                 # decoded on both engines
    assert doc['data_sha256'] == sample_report.data_sha256 and doc['blocked'] is False
    assert {c['name'] for c in doc['checks']} == {c.name for c in sample_report.checks}
    by = store.quality_by_symbol().set_index('symbol')
    assert list(by.index) == ['AAPL', 'MSFT']
    for sym, p in sample_report.per_symbol.items():
        assert int(by.loc[sym, 'n_bars']) == p['bars'] and by.loc[sym, 'score'] == pytest.approx(p['score'])
        assert int(by.loc[sym, 'report_id']) == int(r.id)

def test_report_with_nan_examples_is_stored(store, gate):
    "A blocked re-check is stored too; NaN in its examples (not JSON) is stored as null."
    bad = gate.check(corrupt(load_sample('MSFT', start='2012-01-01'), 'nan_close'), '1Day', source='check')
    assert bad.blocked and any(isinstance(v, float) and np.isnan(v) for e in bad.check('nan_inf').examples for v in e.values())
    rid = store.save_quality_report(bad, 'check')
    doc = store.query('SELECT report FROM quality_reports WHERE id = ?', (rid,))[0][0]
    assert isinstance(doc, dict)
    assert rid == int(store.quality_reports(kind='check').iloc[0].id)   # the id comes from RETURNING
    ex = next(c for c in doc['checks'] if c['name'] == 'nan_inf')['examples'][0]
    assert ex['close'] is None
    assert store.quality_reports(kind='check').iloc[0].blocked == 1

# -- concurrent sessions ---------------------------------------------------------------------------------------

def test_concurrent_writers_of_the_same_range_both_succeed(db_url):
    "A second session writing the same bars while the first holds its transaction waits, then upserts."
    a, b = Store(db_url), Store(db_url)
    try:
        bars = bars_of('IBM')
        later = bars.assign(close=bars.close + 1, high=bars.high + 1)
        errors = []
        def other():
            try: b.write_bars(later)
            except Exception as e: errors.append(e)
        with a.transaction():
            a.write_bars(bars)
            t = threading.Thread(target=other); t.start()
            time.sleep(1.0)                                  # b is now waiting for a
            assert t.is_alive()
        t.join(60)
        assert errors == [] and not t.is_alive()
        assert a.count_bars() == len(bars)
        pd.testing.assert_frame_equal(a.read_bars('IBM'), expected(later), check_exact=True)   # b committed last
    finally: a.close(); b.close()

def test_sqlite_reader_in_another_process_is_not_blocked_by_a_writer(sqlite_store, sample_report):
    "WAL: while a writer holds a transaction open, another process opens the store and reads the last commit."
    assert sqlite_store.query('PRAGMA journal_mode')[0][0] == 'wal'
    sqlite_store.ingest(sample_report)
    read = ("import sys; from trader.core.store import Store; s = Store(sys.argv[1]); "
            "print(s.count_bars(), len(s.read_bars('AAPL')), len(s.quality_reports()))")
    def reader():
        return subprocess.run([sys.executable, '-c', read, sqlite_store.url], capture_output=True, text=True, timeout=hang_guard(10))
    with sqlite_store.transaction():
        sqlite_store.write_bars(bars_of('IBM'))
        sqlite_store.save_quality_report(sample_report, 'check')
        # not blocked: it answers while the transaction is still open (blocked, it would wait for the commit that only comes
        # after it answered, until its own busy timeout of 60 s, and fail with 'database is locked')
        out = reader()
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(SAMPLE_BARS), str(SAMPLE_BARS // 2), '1']   # the last commit, not the open transaction
    out = reader()
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(SAMPLE_BARS + 3270), str(SAMPLE_BARS // 2), '2']

# -- values: timestamps, JSON, RETURNING ids, bulk inserts (the store is the only place that knows the representation) ----

TIMES = [pd.Timestamp('2011-08-08 14:30:00.123456789', tz='UTC'), pd.Timestamp('1999-12-31', tz='UTC'),
         pd.Timestamp('2026-03-05 09:30', tz='America/New_York'), '2012-01-03', pd.Timestamp('2012-01-03 10:00')]

@pytest.mark.parametrize('t', TIMES, ids=str)
def test_ts_param_and_ts_value_round_trip(store, t):
    want = pd.Timestamp(t)
    want = want.tz_localize('UTC') if want.tzinfo is None else want.tz_convert('UTC')
    if store.engine == 'postgresql': want = want.floor('us')          # TIMESTAMPTZ keeps microseconds
    store.execute('INSERT INTO loop_state (run_id, last_bar_ts, state, updated) VALUES (?,?,?,?)', ('r', store.ts_param(t), store.json_param({}), 'now'))
    got = store.query('SELECT last_bar_ts FROM loop_state')[0][0]
    assert store.ts_value(got) == want and str(store.ts_value(got).tz) == 'UTC'
    # and as a parameter of a comparison, the same value finds the row
    assert store.query('SELECT run_id FROM loop_state WHERE last_bar_ts = ?', (store.ts_param(t),)) == [('r',)]

def test_ts_null_values_and_series(store):
    assert store.ts_param(None) is None and store.ts_param(pd.NaT) is None and store.ts_value(None) is None
    ts = pd.date_range('2011-08-01', periods=4, freq='D', tz='UTC')
    rows = [('r', str(i), store.ts_param(t), 'k', 1, store.json_param({'i': i})) for i, t in enumerate(ts)] + [('r', 'x', None, 'k', 1, '{}')]
    assert store.executemany('INSERT INTO risk_events (run_id, ts, bar_ts, kind, level, detail) VALUES (?,?,?,?,?,?)', rows) == 5
    df = store.frame('SELECT bar_ts, detail FROM risk_events ORDER BY id')
    s = store.ts_series(df.bar_ts)
    assert str(s.dtype) == 'datetime64[ns, UTC]' and s.iloc[:4].tolist() == list(ts) and pd.isna(s.iloc[4])
    assert df.detail.tolist() == [{'i': 0}, {'i': 1}, {'i': 2}, {'i': 3}, {}]
    assert store.ts_params(ts) == [store.ts_param(t) for t in ts]
    assert store.ts_series(store.frame('SELECT bar_ts FROM risk_events WHERE 1=0').bar_ts).empty

def test_json_columns_come_back_decoded_on_both_engines(store):
    doc = {'sharpe': float('nan'), 'n': np.int64(3), 'x': np.float32(0.5), 'list': [1, float('inf')], 'nested': {'a': None}}
    rid = store.insert_returning('INSERT INTO gate_history (created, date, run_id, status, figures) VALUES (?,?,?,?,?)',
                                 ('now', '2026-03-05', None, 'pass', store.json_param(doc)))
    want = {'sharpe': None, 'n': 3, 'x': 0.5, 'list': [1, None], 'nested': {'a': None}}
    assert store.query('SELECT figures FROM gate_history WHERE id = ?', (rid,)) == [(want,)]
    assert store.frame('SELECT id, figures AS figures FROM gate_history').figures.tolist() == [want]
    assert store.query('SELECT status FROM gate_history') == [('pass',)]              # text columns stay text
    store.execute('INSERT INTO risk_events (run_id, ts, bar_ts, kind, level, detail) VALUES (?,?,?,?,?,?)', ('r', 'now', None, 'k', 1, json_text([1, 'a'])))
    assert store.query('SELECT detail FROM risk_events') == [([1, 'a'],)]

def test_insert_returning_gives_each_row_its_own_id(store):
    ids = []
    with store.transaction():
        for i in range(3):
            ids.append(store.insert_returning('INSERT INTO gate_history (created, date, run_id, status, figures) VALUES (?,?,?,?,?)',
                                              ('now', f'2026-03-0{i+1}', None, 'pass', '{}')))
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == 3
    assert [r[0] for r in store.query('SELECT date FROM gate_history WHERE id IN (?,?,?) ORDER BY id', ids)] == ['2026-03-01', '2026-03-02', '2026-03-03']
    other = Store(store.url)          # another session's insert does not change the id this one got
    try:
        a = store.insert_returning('INSERT INTO gate_history (created, date, run_id, status, figures) VALUES (?,?,?,?,?)', ('now', 'a', None, 'pass', '{}'))
        b = other.insert_returning('INSERT INTO gate_history (created, date, run_id, status, figures) VALUES (?,?,?,?,?)', ('now', 'b', None, 'pass', '{}'))
        assert store.query('SELECT date FROM gate_history WHERE id = ?', (a,)) == [('a',)] and b != a
    finally: other.close()

def test_executemany_joins_the_callers_transaction(store):
    rows = [('r', str(i), None, 'k', 1, '{}') for i in range(10)]
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.executemany('INSERT INTO risk_events (run_id, ts, bar_ts, kind, level, detail) VALUES (?,?,?,?,?,?)', rows)
            raise RuntimeError('crash')
    assert store.query('SELECT COUNT(*) FROM risk_events') == [(0,)]
    assert store.executemany('INSERT INTO risk_events (run_id, ts, bar_ts, kind, level, detail) VALUES (?,?,?,?,?,?)', []) == 0

def test_a_module_registers_its_own_tables(db_url):
    owner = 'tests.widgets'
    register_schema(owner, [(1, 'widgets', ["CREATE TABLE IF NOT EXISTS test_widgets (id {id}, spec {json} NOT NULL)"])])
    try:
        with Store(db_url, migrate=False) as s:
            s.migrate(['core.store'])
            assert 'test_widgets' not in s.tables()
            s.ensure_schema(owner); s.ensure_schema(owner)                      # applied once, idempotent
            assert 'test_widgets' in s.tables() and s.migrate([owner]) == []
            wid = s.insert_returning('INSERT INTO test_widgets (spec) VALUES (?)', (s.json_param({'a': [1]}),))
            assert s.query('SELECT spec FROM test_widgets WHERE id = ?', (wid,)) == [({'a': [1]},)]
        # a new version is applied on the next open, the old one is not re-run
        register_schema(owner, [(1, 'widgets', ["CREATE TABLE IF NOT EXISTS test_widgets (id {id}, spec {json} NOT NULL)"]),
                                (2, 'widget names', ["ALTER TABLE test_widgets ADD COLUMN name TEXT"])])
        with Store(db_url) as s:
            assert s.query("SELECT version FROM schema_migrations WHERE owner = ? ORDER BY version", (owner,)) == [(1,), (2,)]
            assert s.query('SELECT name FROM test_widgets') == [(None,)]
        with pytest.raises(StoreError, match='JSON in one table'):   # a JSON column name means JSON everywhere
            register_schema('tests.bad', [(1, 'clash', ["CREATE TABLE IF NOT EXISTS test_bad (metrics TEXT)"])])
        with pytest.raises(StoreError, match='numbered'):
            register_schema('tests.bad', [(2, 'gap', [])])
        assert 'tests.bad' not in _SCHEMAS
    finally: _SCHEMAS.pop(owner, None)

def test_an_older_database_is_brought_under_per_owner_migrations(sqlite_url):
    "A database made with the old numbered `schema_version` (all tables in the store) opens, keeps its rows and records the owners."
    import sqlite3
    from trader.core.store import _TYPES
    with Store(sqlite_url) as s:
        s.execute('INSERT INTO controls (key, value, updated, reason) VALUES (?,?,?,?)', ('halt', '1', 'now', 'test'))
        s.execute('DROP TABLE schema_migrations')
        s.execute('CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied TEXT NOT NULL)')
    with Store(sqlite_url) as s:
        assert s.query('SELECT key FROM controls') == [('halt',)]
        assert sorted(s.query('SELECT owner, version FROM schema_migrations')) == sorted(all_migrations())
