"""Backtest and report figures (issue: backtests and reports).

- a policy backtest over the full sample (3,270 bars of AAPL + MSFT, real daily data) in seconds, warm;
- the daily gate notebook through papermill, wall time, warm (target under 15 s).
Runs in a temporary TRADER_HOME with a small trained model (the figure is about the machinery, not the model).
"""
import os, sys, tempfile, time
from pathlib import Path
os.environ.setdefault('NUMBA_CACHE_DIR', str(Path(__file__).resolve().parents[1]/'.cache'/'numba'))

def main():
    tmp = tempfile.mkdtemp(prefix='trader-bench-bt-')
    os.environ['TRADER_HOME'] = tmp; os.environ['TRADER_REPORTS'] = str(Path(tmp)/'reports'); os.environ.pop('TRADER_DB_URL', None)
    from trader.core.config import load_settings
    from trader.core.data import load_sample
    from trader.core.quality import DataQualityGate
    from trader.core.store import Store
    from trader.research.train import train
    from trader.core.registry import Registry
    from trader.research.backtest import backtest
    s = load_settings(train={'n_steps': 128, 'batch_size': 64, 'n_epochs': 2, 'checkpoint_every': 0})
    store = Store(settings=s)
    store.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
    mid = train('AAPL,MSFT', steps=1024, seed=0, settings=s, store=store, progress=False).model_id
    Registry(store, s).set_champion(mid, 'bench')
    full = '2000-03-01:2011-12-31'     # every bar before the sealed holdout (a backtest never reads it)
    backtest(mid, full, settings=s, store=store, baselines=False, save=False)          # warm-up: numba, imports
    times = []
    for _ in range(3):
        t = time.perf_counter(); r = backtest(mid, full, settings=s, store=store, baselines=False, save=False); times.append(time.perf_counter() - t)
    print(f"backtest, the sample up to the holdout ({len(r.equity)} bars after the 252-bar warm-up, 2 symbols, policy + engine with guardian + vectorbt check): "
          f"{min(times):.2f} s (best of 3)")
    t = time.perf_counter(); r = backtest(mid, None, settings=s, store=store); t_h = time.perf_counter() - t
    print(f"backtest, validation window with both baselines and the 350-combination MA sweep on the two years before, stored: {t_h:.2f} s")
    from trader.ops import reports as R
    out = Path(tmp)/'reports'/'gates'
    R.run_template('daily_gate', out, {'run_id': r.run_id, 'output_dir': str(out), 'demo_if_empty': False}, out_name='cold.ipynb')
    times = []
    for i in range(3):
        t = time.perf_counter()
        R.run_template('daily_gate', out, {'run_id': r.run_id, 'output_dir': str(out), 'demo_if_empty': False}, out_name=f'warm{i}.ipynb')
        times.append(time.perf_counter() - t)
    print(f"daily gate notebook through papermill, warm: {min(times):.2f} s (best of 3; median {sorted(times)[1]:.2f} s)   target < 15 s")

if __name__ == '__main__':
    main()
