"""Moving-average sweep: `trader.research.sweep.ma_sweep` against the bare vectorbt call it wraps.

The plans' grid, fast 5:53:2 x slow 20:180:10 (384 pairs, 350 with fast < slow simulated), on the
AAPL + MSFT equal-weight portfolio over the validation window 2010-01-01..2011-12-31, real daily bars.
- sweep: `ma_sweep` from long bars to the finished table (pivot, moving averages, one vectorbt
  simulation, equity, Sharpe, drawdown, trades, the deflated Sharpe ratio of the best pair);
- bare: `bare_sweep`, the minimal vectorbt version on the same prepared (time x symbol) arrays
  (`vbt.MA.run` + the same `Portfolio.from_orders` call), returning the Portfolio, no statistics.
Both run once first (numba compilation, caches), then best of 3 each, interleaved.
"""
import os, time
os.environ.setdefault('NUMBA_CACHE_DIR', os.path.join(os.path.dirname(__file__), '..', '.cache', 'numba'))
import numpy as np
from trader.core.config import load_settings
from trader.core.data import load_sample
from trader.research.sweep import _prepare, bare_sweep, ma_grid, ma_sweep, parse_range

FAST, SLOW, START, END = '5:53:2', '20:180:10', '2010-01-01', '2011-12-31'

def main():
    bars = load_sample(['AAPL', 'MSFT'])
    env = load_settings().env
    fees, slip = env.fees_bps*1e-4, env.slippage_bps*1e-4
    _, _, close, open_, lo = _prepare(bars, 'AAPL,MSFT', START, END)
    fw, sw = parse_range(FAST), parse_range(SLOW)
    sweep = lambda: ma_sweep(bars, 'AAPL,MSFT', FAST, SLOW, START, END)
    bare = lambda: bare_sweep(close, open_, fw, sw, lo, fees, slip)
    res, pf = sweep(), bare()                                   # warm-up: compile and fill caches
    np.testing.assert_array_equal(np.asarray(pf.value()), res.equity.to_numpy())   # the same simulation
    ts, tb = [], []
    for _ in range(3):
        t = time.perf_counter(); sweep(); ts.append(time.perf_counter() - t)
        t = time.perf_counter(); bare(); tb.append(time.perf_counter() - t)
    s, b = min(ts), min(tb)
    pairs, dropped = ma_grid(FAST, SLOW)
    print(f"MA crossover sweep, AAPL+MSFT equal weight, {START}..{END}, {len(fw)} fast x {len(sw)} slow windows"
          f" ({len(pairs)} simulated, {dropped} with fast >= slow excluded), best of 3, warm")
    print(f"sweep {len(fw)*len(sw)} combos: {s:.2f} s; bare vectorbt call: {b:.2f} s; ratio {s/b:.2f} (target <= 1.20)")
    print(f"best on validation: fast {res.best['fast']}, slow {res.best['slow']}, Sharpe {res.best['sharpe']:.2f}, DSR {res.best['dsr']:.3f}")

if __name__ == '__main__':
    main()
