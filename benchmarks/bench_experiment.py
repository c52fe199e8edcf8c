"""Walk-forward experiment wall time: 4 folds x 3 seeds x 50,000 steps (AAPL + MSFT, the default configuration) on this machine,
against the same work done the old way (sequential single-env training), estimated from the single env's fps measured in the
same run. Target: under 3 minutes. Usage: python benchmarks/bench_experiment.py [--steps N] [--folds N] [--seeds N] [--workers N]
"""
import argparse, os, sys, tempfile, time
os.environ.setdefault('NUMBA_CACHE_DIR', os.path.join(os.path.dirname(__file__), '..', '.cache', 'numba'))

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--steps', type=int, default=50_000); ap.add_argument('--folds', type=int, default=4)
    ap.add_argument('--seeds', type=int, default=3); ap.add_argument('--workers', type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    from trader.core.config import load_settings
    from trader.core.data import load_sample
    from trader.core.quality import DataQualityGate
    from trader.core.store import Store
    from trader.research.experiments import Experiment, parse_spec
    from trader.research.train import train
    with tempfile.TemporaryDirectory() as home:
        s = load_settings({'TRADER_HOME': home}, train={'checkpoint_every': 0})
        store = Store(settings=s)
        store.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
        # the reference: the single-env path's training speed, measured now (a short run; fps after start-up)
        single = s.model_copy(update={'train': s.train.model_copy(update={'n_envs': 1, 'n_steps': 256, 'batch_size': 128})})
        r1 = train('AAPL,MSFT', steps=6_144, seed=0, settings=single, store=store, progress=False)
        spec = parse_spec({'name': 'bench', 'seeds': a.seeds, 'steps': a.steps, 'folds': {'n': a.folds}}, s)
        ex = Experiment(spec, s, store)
        t0 = time.perf_counter()
        summ = ex.run(workers=a.workers, say=lambda *x: None)
        wall = time.perf_counter() - t0
        n = len(ex.trials())
        tr = store.frame("SELECT seconds FROM exp_trials WHERE experiment = 'bench'")
        old = n*a.steps/r1.fps
        print(f"walk-forward experiment, {a.folds} folds x {a.seeds} seeds x {a.steps:,} steps ({n} trials, batched env, {a.workers} worker processes):")
        print(f"  wall time              {wall:,.0f} s   target < 180 s")
        print(f"  per trial              {tr.seconds.median():.1f} s median (training, evaluation through the engine, storage)")
        print(f"  the old way (estimate) {old:,.0f} s: {n} x {a.steps:,} steps sequentially on the single env at {r1.fps:,.0f} steps/s (measured now), training only")
        print(f"experiment speed-up new/old: {old/wall:.1f}x")
        print(f"  verdict: {summ['verdict']}")

if __name__ == '__main__':
    main()
