"""Fast training (issue 10): the batched environment against the single-env path, measured in the same run.

(a) RecurrentPPO steps/s with the default settings (`BatchedTradingEnv`, train.n_envs envs) vs the single-env path
    (one TradingEnv, the pre-batch hyperparameters: n_steps 256, batch 128), printed as `train speed-up batched/single: N.Nx`;
(b) the batched environment alone: env-steps/s summed over 64 envs (RiskCheckedEnv rules and guardian on, random actions);
(c) learning quality at equal timesteps: validation Sharpe (2010-2011) over 5 seeds, batched default vs single-env, mean and spread;
(d) the same seed trains the same weights twice (params sha256).
Data: the embedded AAPL + MSFT sample, ingested into a temporary store. Nothing here asserts a time.
Options: --steps N (per quality run, default 20,000), --seeds N (default 5), --batched k=v,... (override the batched configuration).
"""
import os, sys, time, tempfile, argparse
os.environ.setdefault('NUMBA_CACHE_DIR', os.path.join(os.path.dirname(__file__), '..', '.cache', 'numba'))
import numpy as np

SINGLE = {'n_envs': 1, 'n_steps': 256, 'batch_size': 128}        # the single-env path with the hyperparameters it had before the batch

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--steps', type=int, default=20_000); ap.add_argument('--seeds', type=int, default=5)
    ap.add_argument('--batched', default='', help='k=v,... overrides of [train] for the batched configuration')
    a = ap.parse_args()
    from trader.core.config import load_settings
    from trader.core.data import load_sample
    from trader.core.quality import DataQualityGate
    from trader.core.store import Store
    from trader.research.train import train
    from trader.research.features import build_features, Normaliser
    from trader.research.env import TradingEnv, RiskCheckedEnv
    from trader.research.risk import RiskEngine
    from trader.research.vecenv import BatchedTradingEnv

    home = tempfile.mkdtemp(prefix='bench_train_')
    base = load_settings({'TRADER_HOME': home}, train={'checkpoint_every': 0})
    over = {k: type(getattr(base.train, k))(v) for k, v in (kv.split('=') for kv in a.batched.split(',') if kv)}
    bs = base.model_copy(update={'train': base.train.model_copy(update=over)})
    ss = base.model_copy(update={'train': base.train.model_copy(update=SINGLE)})
    t = bs.train
    print(f"fast training benchmark (AAPL + MSFT sample; {os.cpu_count()} cores; torch threads {t.torch_threads})")
    print(f"  batched: n_envs {t.n_envs}, n_steps {t.n_steps}, batch {t.batch_size}, epochs {t.n_epochs}, lr {t.learning_rate:g}")
    print(f"  single:  n_envs 1, n_steps {SINGLE['n_steps']}, batch {SINGLE['batch_size']}, epochs {ss.train.n_epochs}, lr {ss.train.learning_rate:g}")
    store = Store(settings=base)
    store.ingest(DataQualityGate(base.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))

    # (b) the batched environment alone
    fs = build_features(load_sample(['AAPL', 'MSFT']), 'AAPL,MSFT')
    tw = base.train.train_window.split(':')
    norm = Normaliser.fit(fs.features[fs.window(*tw)])
    venv = BatchedTradingEnv(RiskCheckedEnv(TradingEnv(fs, norm, *tw, base.env, base.risk), RiskEngine(base.risk)), 64, seed=0)
    venv.reset()
    acts = np.random.default_rng(0).integers(0, 3, (3000, 64, len(venv.symbols)))   # one SELL/HOLD/BUY code per asset
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for x in acts: venv.step_async(x); venv.step_wait()
        best = max(best, acts.shape[0]*acts.shape[1]/(time.perf_counter() - t0))   # env-steps: bars x envs
    print(f"batched env alone: {best:,.0f} env-steps/s summed over 64 envs (rules and guardian on; best of 3 x 3,000 steps; target >= 1,000,000)")

    # (c) learning quality at equal timesteps, and (a) the speed of both, from the same runs
    rows = {}
    for name, s in (('batched', bs), ('single', ss)):
        rows[name] = []
        for seed in range(a.seeds):
            r = train('AAPL,MSFT', steps=a.steps, seed=seed, settings=s, store=store, progress=False)
            v = r.meta['validation']
            rows[name].append((seed, v['sharpe'], v['max_drawdown'], r.fps, r.meta['params_sha256'], r.meta['n_envs']))
            print(f"  {name:7s} seed {seed}: validation Sharpe {'-' if v['sharpe'] is None else format(v['sharpe'], '6.2f')}, "
                  f"max drawdown {v['max_drawdown']:6.2%}, {r.fps:8,.0f} steps/s ({r.meta['n_envs']} envs, {r.meta['steps']:,} steps)", flush=True)
    fps = {k: float(np.median([x[3] for x in v])) for k, v in rows.items()}
    print(f"RecurrentPPO steps/s (median over {a.seeds} runs of {a.steps:,} steps): batched {fps['batched']:,.0f}, single {fps['single']:,.0f}")
    print(f"train speed-up batched/single: {fps['batched']/fps['single']:.1f}x")
    print(f"validation Sharpe (2010-2011) at {a.steps:,} timesteps over {a.seeds} seeds (a flat policy counts as 0):")
    for k, v in rows.items():
        sh = np.array([0.0 if x[1] is None else x[1] for x in v])
        dd = np.array([x[2] for x in v])
        print(f"  {k:7s}: mean {sh.mean():5.2f}, std {sh.std(ddof=1) if len(sh) > 1 else 0.0:4.2f}, min {sh.min():5.2f}, max {sh.max():5.2f}; "
              f"mean max drawdown {dd.mean():.2%}; per seed {', '.join(f'{x:.2f}' for x in sh)}")

    # (d) the same seed twice
    again = train('AAPL,MSFT', steps=a.steps, seed=0, settings=bs, store=store, progress=False).meta['params_sha256']
    first = rows['batched'][0][4]
    print(f"same seed twice (batched, seed 0, {a.steps:,} steps): params sha256 {first[:16]} / {again[:16]}: {'identical' if first == again else 'DIFFERENT'}")
    if first != again: sys.exit(1)

if __name__ == '__main__':
    main()
