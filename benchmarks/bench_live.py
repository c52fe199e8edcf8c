"""Paper-trading figures (issue: paper trading).

- decision latency p50/p99 (bar in -> orders out) with SimBroker (target p99 under 2 ms);
- replay throughput in bars/s with every bar committed to SQLite (target at least 1,000 bars/s).
A small model trained in a temporary TRADER_HOME replays 2001-03-01..2013-03-01 of real AAPL+MSFT daily bars (3,018 bars).
The throughput is the loop's own (bars / time in TradingLoop.run); the session's start-up and final report are printed apart.
"""
import os, sys, tempfile, time
from pathlib import Path
os.environ.setdefault('NUMBA_CACHE_DIR', str(Path(__file__).resolve().parents[1]/'.cache'/'numba'))

def main():
    tmp = tempfile.mkdtemp(prefix='trader-bench-live-')
    os.environ['TRADER_HOME'] = tmp; os.environ.pop('TRADER_DB_URL', None)
    from trader.core.config import load_settings
    from trader.core.data import load_sample
    from trader.core.quality import DataQualityGate
    from trader.core.store import Store
    from trader.research.train import train
    from trader.core.registry import Registry
    from trader.live.loop import paper_session
    s = load_settings(train={'n_steps': 128, 'batch_size': 64, 'n_epochs': 2, 'checkpoint_every': 0}, risk={'guardian': False})
    store = Store(settings=s)
    store.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
    mid = train('AAPL,MSFT', steps=1024, seed=0, settings=s, store=store, progress=False).model_id
    Registry(store, s).set_champion(mid, 'bench')
    paper_session('sim', mid, '2012-01-03:2012-03-30', settings=s, store=store, tag='warm-up')     # imports, numba cache
    best = None
    for i in range(3):
        t = time.perf_counter()
        out = paper_session('sim', mid, '2001-03-01:2013-03-01', settings=s, store=store, tag=f'bench {i}')
        total = time.perf_counter() - t
        r = (out['bars']/out['seconds'], out['metrics']['latency_p50_ms'], out['metrics']['latency_p99_ms'], total, out['bars'], len(store.query(
            'SELECT 1 FROM run_orders WHERE run_id = ?', (out['run_id'],))))
        if best is None or r[0] > best[0]: best = r
    bps, p50, p99, total, bars, fills = best
    print(f"paper replay, SimBroker, SQLite, {bars} bars ({fills} fills), every bar committed (best of 3):")
    print(f"  replay throughput   {bps:,.0f} bars/s   target >= 1,000 bars/s")
    print(f"  decision latency    p50 {p50:.2f} ms, p99 {p99:.2f} ms   target p99 < 2 ms")
    print(f"  whole session       {total:.2f} s (start-up, replay, final metrics)")

if __name__ == '__main__':
    main()
