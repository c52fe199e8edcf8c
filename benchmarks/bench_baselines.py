"""Baselines on equal terms (issue 18): what judging every baseline through the engine costs an experiment.

- per fold, the baselines the old way (buy-and-hold on the `Book`, the crossover's test window in vectorbt with fractional
  target-percent sizing and no rules) against the new way (`fold_baselines`: buy-and-hold, vol-targeted buy-and-hold, the
  crossover and the supervised classifier, each walked by the engine with the guardian as set and again with it off), warm,
  on the default spec's AAPL + MSFT folds; the old path is rebuilt here from the functions that remain (`buy_and_hold`,
  `ma_sweep`, `ma_baseline_equity`), so both are timed in the same run;
- an experiment of the same spec, run once the new way; its old wall time is that run less the extra baseline time and
  less the trials' second walk (guardian off), timed per trial on the trials' own models.
Target: the experiment's wall time at most 1.2x the old one; exit status 1 if missed.
Usage: python benchmarks/bench_baselines.py [--steps N] [--folds N] [--seeds N] [--workers N] [--folds-only]   (default: the
default spec, 4 folds x 3 seeds x 50,000 steps, on every core)
"""
import argparse, os, sys, tempfile, time
os.environ.setdefault('NUMBA_CACHE_DIR', os.path.join(os.path.dirname(__file__), '..', '.cache', 'numba'))

def old_fold_baselines(bars, symbols, fold, s) -> dict:
    "The per-fold baselines as experiments computed them before issue 18 (kept here only to time them)."
    from trader.research.backtest import buy_and_hold
    from trader.research.features import build_features
    from trader.research.sweep import ma_sweep, ma_baseline_equity
    from trader.research.experiments import _evaluate, _returns_json
    fees, slip = s.env.fees_bps, s.env.slippage_bps
    fs = build_features(bars[bars.ts <= fold.test[1]], symbols)
    bh = buy_and_hold(fs, fold.test[0], fold.test[1], 100_000.0, fees, slip)
    out = {'buy_hold': {'metrics': _evaluate(bh, None, len(symbols)), 'test_returns': _returns_json(bh), 'params': None}}
    sw = ma_sweep(bars[bars.ts <= fold.train[1]], symbols, start=fold.train[0], end=fold.train[1], fees_bps=fees, slippage_bps=slip)
    eq = ma_baseline_equity(bars[bars.ts <= fold.test[1]], symbols, sw.best['fast'], sw.best['slow'], start=fold.test[0], end=fold.test[1],
                            fees_bps=fees, slippage_bps=slip)
    eq.index = eq.index.tz_localize('UTC') if eq.index.tz is None else eq.index
    eq = eq.reindex(bh.index).ffill()
    out['ma_cross'] = {'metrics': _evaluate(eq, None, 0), 'test_returns': _returns_json(eq), 'params': {'fast': int(sw.best['fast']), 'slow': int(sw.best['slow'])}}
    return out

def _best(f, k:int=3) -> float:
    "Best of k timings of f() (the machine is shared: the minimum is the figure least disturbed by other work)."
    out = []
    for _ in range(k):
        t = time.perf_counter(); f(); out.append(time.perf_counter() - t)
    return min(out)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--steps', type=int, default=50_000); ap.add_argument('--folds', type=int, default=4)
    ap.add_argument('--seeds', type=int, default=3); ap.add_argument('--workers', type=int, default=os.cpu_count() or 1)
    ap.add_argument('--folds-only', action='store_true', help='time the per-fold baselines only (no experiment, no target)')
    a = ap.parse_args()
    from trader.core.config import load_settings
    from trader.core.data import load_sample
    from trader.core.quality import DataQualityGate
    from trader.core.store import Store
    from trader.core.registry import Registry
    from trader.research.experiments import Experiment, parse_spec, fold_baselines
    from trader.research.backtest import simulate
    from trader.research.features import build_features
    from trader.research.policy import Policy
    with tempfile.TemporaryDirectory() as home:
        s = load_settings({'TRADER_HOME': home}, train={'checkpoint_every': 0})
        store = Store(settings=s)
        store.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
        spec = parse_spec({'name': 'bench', 'seeds': a.seeds, 'steps': a.steps, 'folds': {'n': a.folds}}, s)
        ex = Experiment(spec, s, store)
        syms = spec.symbols
        old_fold_baselines(ex.bars, syms, ex.folds[0], ex.base); fold_baselines(ex.bars, syms, ex.folds[0], ex.base)     # warm-up: imports, numba
        old = [_best(lambda: old_fold_baselines(ex.bars, syms, f, ex.base)) for f in ex.folds]
        new = [_best(lambda: fold_baselines(ex.bars, syms, f, ex.base)) for f in ex.folds]
        print(f"per-fold baselines ({len(ex.folds)} folds, warm, best of 3 each):")
        print(f"  old: buy-and-hold (Book) + crossover (vectorbt, target percent, no rules)     {sum(old)/len(old):6.2f} s a fold")
        print(f"  new: 4 baselines through the engine, guardian as set ({s.risk.guardian}) and off   {sum(new)/len(new):6.2f} s a fold "
              f"({sum(new)/sum(old):.2f}x)")
        if a.folds_only: return 0
        t0 = time.perf_counter()
        summ = ex.run(workers=a.workers, say=lambda *x: None)
        wall = time.perf_counter() - t0
        # the trials' second walk (guardian off), timed on each trial's own model and test window
        tr = store.frame("SELECT model_id, fold, seconds FROM exp_trials WHERE experiment = 'bench'")
        reg = Registry(store, s)
        fss = {f.index: build_features(store.read_bars(syms, end=f.test[1]), syms) for f in ex.folds}
        second = 0.0
        for r in tr.itertuples():
            p, f = Policy.load(r.model_id, reg), ex.folds[r.fold]
            second += _best(lambda: simulate(p, fss[r.fold], f.test[0], f.test[1], s.risk, 100_000.0, s.env.fees_bps, s.env.slippage_bps, guardian=False), 1)
        par = min(a.workers, len(tr))
        old_wall = wall - (sum(new) - sum(old)) - second/par
        ratio = wall/old_wall
        print(f"experiment {a.folds} folds x {a.seeds} seeds x {a.steps:,} steps ({len(tr)} trials, {a.workers} worker processes):")
        print(f"  wall time, new                          {wall:7.1f} s")
        print(f"  of which: baselines, extra over the old {sum(new) - sum(old):7.1f} s ({len(ex.folds)} folds, in the driver before the trials)")
        print(f"            trials' guardian-off walk     {second:7.1f} s summed ({second/len(tr):.2f} s a trial; {second/par:.1f} s of wall over {par} workers)")
        print(f"  wall time, old (the new less both)      {old_wall:7.1f} s")
        print(f"experiment wall time new/old: {ratio:.3f}x   target <= 1.20x: {'ok' if ratio <= 1.2 else 'MISSED'}")
        print(f"  verdict: {summ['verdict']}")
        return 0 if ratio <= 1.2 else 1

if __name__ == '__main__':
    sys.exit(main())
