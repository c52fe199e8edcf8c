"""Ingest throughput of `trader.core.store.Store.write_bars` on SQLite and PostgreSQL, and the quality gate's own time.

The batch is 1,000,000 SYNTHETIC one-minute bars (4 symbols x 250,000 bars on consecutive XNYS regular-hours
minutes, random-walk prices with consistent OHLC), not market data. For each engine it times
`write_bars(df, '1Min')` into an empty table (the bulk-load path), then a re-ingest of the same bars (the upsert
path), then, for information, a re-ingest where every bar's values changed (the upsert path's worst case).
Target: >= 200,000 bars/s for the bulk load and the same-bars re-ingest on each engine; exit status 1 if one is missed.

SQLite: a temporary file. PostgreSQL: a new database on the server at TRADER_TEST_PG_URL (dropped afterwards);
without that variable the script re-executes itself under `.ci/with-postgres`, which starts a throwaway cluster.

    .venv/bin/python benchmarks/bench_ingest.py
    .ci/with-postgres .venv/bin/python benchmarks/bench_ingest.py
"""
from __future__ import annotations
import os, sys, tempfile, time, uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 200_000          # bars/s
N_SYMBOLS, PER_SYMBOL = 4, 250_000
_CHILD = '_TRADER_BENCH_UNDER_WITH_POSTGRES'

def _ensure_postgres():
    "Re-execute under .ci/with-postgres when no server is given (once; the child has TRADER_TEST_PG_URL)."
    if os.environ.get('TRADER_TEST_PG_URL'): return
    if os.environ.get(_CHILD): sys.exit("bench_ingest: .ci/with-postgres did not export TRADER_TEST_PG_URL")
    wrapper = ROOT/'.ci'/'with-postgres'
    print("bench_ingest: TRADER_TEST_PG_URL is not set; starting a throwaway PostgreSQL with .ci/with-postgres", file=sys.stderr, flush=True)
    os.environ[_CHILD] = '1'
    os.execv(str(wrapper), [str(wrapper), sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])

def synthetic_minute_bars(n_symbols:int=N_SYMBOLS, per_symbol:int=PER_SYMBOL, start:str='2020-01-02', seed:int=0):
    "SYNTHETIC bars: consecutive XNYS regular-hours minutes, a geometric random walk per symbol, consistent OHLC."
    import numpy as np, pandas as pd
    from trader.core.quality import exchange_calendar
    cal = exchange_calendar('XNYS', '1990-01-01')
    days = int(per_symbol/390*365/250) + 60                     # enough calendar days for the sessions needed
    sessions = cal.sessions_in_range(start, pd.Timestamp(start) + pd.Timedelta(days=days))
    minutes = cal.sessions_minutes(sessions[0], sessions[-1])[:per_symbol]   # open .. close-1min, early closes respected
    assert len(minutes) == per_symbol
    ts = minutes.astype('datetime64[ns, UTC]')
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_symbols):
        p0 = 20 + 180*rng.random()
        close = p0*np.exp(np.cumsum(rng.normal(0, 4e-4, per_symbol)))
        open_ = np.r_[p0, close[:-1]]
        high = np.maximum(open_, close)*(1 + np.abs(rng.normal(0, 2e-4, per_symbol)))
        low = np.minimum(open_, close)*(1 - np.abs(rng.normal(0, 2e-4, per_symbol)))
        volume = np.round(rng.lognormal(8, 0.6, per_symbol)) + 100
        frames.append(pd.DataFrame({'symbol': f'SYN{i}', 'ts': ts, 'open': open_, 'high': high, 'low': low, 'close': close, 'volume': volume}))
    return pd.concat(frames, ignore_index=True)      # sorted by (symbol, ts): the primary key's order

def _line(what:str, seconds:float, n:int, target:int|None) -> bool:
    rate = n/seconds
    ok = target is None or rate >= target
    verdict = 'informational, no target' if target is None else f"target >= {target:,} bars/s: {'ok' if ok else 'MISSED'}"
    print(f"{what:<58} {seconds:6.2f} s  {rate:>11,.0f} bars/s   ({verdict})", flush=True)
    return ok

def _timed(f):
    t = time.perf_counter(); f(); return time.perf_counter() - t

def bench_engine(url:str, engine:str, df, report=None) -> bool:
    from trader.core.store import Store
    n, ok = len(df), True
    if report is not None:   # the whole ingest as `trader ingest` does it: quality gate, then the store (fresh database)
        from trader.core.quality import DataQualityGate
        with Store(url.replace('bench.db', 'bench_e2e.db') if engine == 'sqlite' else url) as s2:
            def e2e():
                s2.ingest(DataQualityGate().check(df, '1Min', source='synthetic'))
            _line(f"{engine}: full ingest, gate + store (as trader ingest)", _timed(e2e), n, None)
            s2.execute('DELETE FROM quality_symbols'); s2.execute('DELETE FROM quality_reports'); s2.execute('DELETE FROM bars')
    changed = df.assign(**{c: df[c]*1.0001 for c in ('open', 'high', 'low', 'close')}, volume=df['volume'] + 1)
    with Store(url) as store:
        assert store.engine == engine and store.count_bars() == 0
        ok &= _line(f"{engine}: write_bars into an empty table (bulk load)", _timed(lambda: store.write_bars(df, '1Min')), n, TARGET)
        assert store.count_bars() == n
        ok &= _line(f"{engine}: re-ingest of the same bars (upsert)", _timed(lambda: store.write_bars(df, '1Min')), n, TARGET)
        assert store.count_bars() == n
        _line(f"{engine}: re-ingest, every bar's values changed (upsert)", _timed(lambda: store.write_bars(changed, '1Min')), n, None)
        assert store.count_bars() == n
        back = store.read_bars('SYN0', end=df.ts.iloc[9], timeframe='1Min')
        assert (back.close.to_numpy() == changed.close.to_numpy()[:10]).all()     # the changed values were stored
    return ok

def _pg_database(url:str):
    "A new database next to the one in `url`; returns (its url, a function that drops it)."
    import psycopg
    name = f"trader_bench_{uuid.uuid4().hex[:10]}"
    base, _, query = url.partition('?')
    new = f"{base.rpartition('/')[0]}/{name}" + (f"?{query}" if query else '')
    with psycopg.connect(url, autocommit=True) as c: c.execute(f'CREATE DATABASE "{name}"')
    def drop():
        with psycopg.connect(url, autocommit=True) as c: c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return new, drop

def main() -> int:
    _ensure_postgres()
    with tempfile.TemporaryDirectory(prefix='trader-bench-') as tmp:
        os.environ['TRADER_HOME'] = tmp           # never touch ./var
        from trader.core.quality import DataQualityGate
        t = time.perf_counter()
        df = synthetic_minute_bars()
        print(f"bench_ingest: {len(df):,} SYNTHETIC 1Min bars ({N_SYMBOLS} symbols x {PER_SYMBOL:,}, XNYS regular-hours minutes "
              f"{df.ts.min():%Y-%m-%d}..{df.ts.max():%Y-%m-%d}, random-walk OHLC; not market data), generated in {time.perf_counter()-t:.1f} s", flush=True)
        gate = DataQualityGate()
        gate.check(df.iloc[:2000], '1Min')        # warm the calendar cache
        report = None
        def check():
            nonlocal report
            report = gate.check(df, '1Min')
        _line("quality gate: DataQualityGate().check(df, '1Min')", _timed(check), len(df), None)
        print(f"  gate verdict: {report.summary()}", flush=True)
        if report.blocked: print("bench_ingest: the synthetic batch was blocked by the gate", file=sys.stderr); return 1
        ok = bench_engine(f"sqlite:///{tmp}/bench.db", 'sqlite', df, report)
        pg_url, drop = _pg_database(os.environ['TRADER_TEST_PG_URL'])
        try: ok &= bench_engine(pg_url, 'postgresql', df, report)
        finally: drop()
    print(f"bench_ingest: {'all targets met' if ok else 'TARGET MISSED'}", flush=True)
    return 0 if ok else 1

if __name__ == '__main__':
    sys.exit(main())
