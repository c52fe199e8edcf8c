"""Research-core figures: environment steps/s, training fps, Policy.decide latency.

Each figure is measured against a reference in the same run:
- dual-ticker TradingEnv steps/s (raw, and inside RiskCheckedEnv) vs a FinRL-style env that reads a
  pandas DataFrame row per step (as FinRL's StockTradingEnv does with `df.loc[day, :]`);
- RecurrentPPO training fps on the real env vs the same algorithm on a trivial constant-observation env;
- Policy.decide latency p50/p99 (one CPU thread).
Data: real AAPL + MSFT daily bars from the embedded sample.
"""
import os, sys, time
os.environ.setdefault('NUMBA_CACHE_DIR', os.path.join(os.path.dirname(__file__), '..', '.cache', 'numba'))
import numpy as np, pandas as pd
import gymnasium as gym
from gymnasium import spaces
from trader.core.config import EnvSettings, RiskSettings, TrainSettings
from trader.core.data import load_sample
from trader.research.features import FEATURE_NAMES, Normaliser, build_features
from trader.research.env import RiskCheckedEnv, TradingEnv
from trader.research.risk import RiskEngine

def steps_per_second(env, actions, repeat=3):
    best = 0.0
    for _ in range(repeat):
        env.reset(seed=0); t = time.perf_counter()
        for a in actions:
            _, _, term, trunc, _ = env.step(a)
            if term or trunc: env.reset()
        best = max(best, len(actions)/(time.perf_counter() - t))
    return best

class DataFrameEnv(gym.Env):
    "Reference: FinRL StockTradingEnv style, one DataFrame lookup per step (df.loc[day, :])."
    def __init__(self, df, tech, n_assets, episode_len=252):
        self.df, self.tech, self.n, self.episode_len = df, tech, n_assets, episode_len
        self.days = df.index.unique()
        self.action_space = spaces.Discrete(3**n_assets)
        self.observation_space = spaces.Box(-np.inf, np.inf, (n_assets*(len(tech) + 1),), np.float32)
    def _state(self):
        data = self.df.loc[self.day, :]
        feats = [data[t].values.tolist() for t in self.tech]
        return np.array(sum(([feats[j][i] for j in range(len(self.tech))] + [self.pos[i]] for i in range(self.n)), []), np.float32)
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.day = int(self.np_random.integers(0, len(self.days) - self.episode_len - 1)); self.end = self.day + self.episode_len
        self.pos = [0.0]*self.n; self.equity = 1e5
        return self._state(), {}
    def step(self, action):
        data = self.df.loc[self.day, :]
        close0 = data.close.values
        codes = [(action//3**(self.n - 1 - i)) % 3 for i in range(self.n)]
        self.pos = [0.3 if c == 2 else (0.0 if c == 0 else p) for c, p in zip(codes, self.pos)]
        self.day += 1
        close1 = self.df.loc[self.day, :].close.values
        r = float(np.dot(self.pos, close1/close0 - 1))
        self.equity *= 1 + r
        return self._state(), r, False, self.day >= self.end, {}

class ConstantEnv(gym.Env):
    "Reference for training fps: the same spaces, a constant observation, zero reward."
    def __init__(self, obs_dim, n_actions, episode_len=252):
        self.observation_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = spaces.Discrete(n_actions); self.episode_len = episode_len
        self._obs = np.zeros(obs_dim, np.float32)
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed); self.t = 0; return self._obs.copy(), {}
    def step(self, a):
        self.t += 1; return self._obs.copy(), 0.0, False, self.t >= self.episode_len, {}

def main():
    print('research core benchmark (real AAPL + MSFT daily bars, 2000-2013)')
    bars = load_sample(['AAPL', 'MSFT'])
    fs = build_features(bars, 'AAPL,MSFT')
    norm = Normaliser.fit(fs.features[fs.window(None, '2009-12-31')])
    es, rs = EnvSettings(), RiskSettings()
    env = TradingEnv(fs, norm, None, '2009-12-31', es, rs)
    wrapped = RiskCheckedEnv(env, RiskEngine(rs))
    # FinRL-style long DataFrame: index = day number, one row per ticker, feature columns
    long = pd.concat([pd.DataFrame(fs.features[:, i, :], columns=FEATURE_NAMES).assign(close=fs.close[:, i], tic=s, day=np.arange(len(fs)))
                      for i, s in enumerate(fs.symbols)]).sort_values(['day', 'tic']).set_index('day')
    long = long[long.index >= 251]; long.index = long.index - 251
    ref = DataFrameEnv(long, list(FEATURE_NAMES), 2)
    rng = np.random.default_rng(0)
    acts = rng.integers(0, 9, 200_000).tolist()
    raw = steps_per_second(env, acts)
    risk = steps_per_second(wrapped, acts)
    dfr = steps_per_second(ref, acts[:3000], repeat=1)
    print(f"env steps/s  TradingEnv (2 assets, raw)     {raw:>10,.0f}   target >= 150,000")
    print(f"env steps/s  inside RiskCheckedEnv         {risk:>10,.0f}")
    print(f"env steps/s  DataFrame reference (FinRL)   {dfr:>10,.0f}")
    print(f"env speed-up raw / DataFrame reference     {raw/dfr:>10.1f}x  target >= 10x")

    # training fps: RecurrentPPO on the real env vs on a constant-observation env, same hyperparameters
    import torch
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.monitor import Monitor
    t = TrainSettings(); torch.set_num_threads(t.torch_threads)
    def fps(e, steps=6144):
        m = RecurrentPPO('MlpLstmPolicy', Monitor(e), seed=0, device='cpu', n_steps=t.n_steps, batch_size=t.batch_size, n_epochs=t.n_epochs,
                         policy_kwargs=dict(net_arch=dict(pi=t.net_arch, vf=t.net_arch), lstm_hidden_size=t.lstm_hidden))
        m.learn(512)                                   # warm-up (allocations, first rollout)
        t0 = time.perf_counter(); m.learn(steps, reset_num_timesteps=False)
        return steps/(time.perf_counter() - t0)
    # interleaved repeats, best of each, so drift in machine load hits both alike
    real, wrapped_f, const = [], [], []
    for _ in range(2):
        const.append(fps(ConstantEnv(26, 9)))
        real.append(fps(TradingEnv(fs, norm, None, '2009-12-31', es, rs)))
        wrapped_f.append(fps(RiskCheckedEnv(TradingEnv(fs, norm, None, '2009-12-31', es, rs), RiskEngine(rs))))
    real_f, const_f, wr_f = max(real), max(const), max(wrapped_f)
    print(f"train fps    RecurrentPPO on the real env   {real_f:>10,.0f}")
    print(f"train fps    same on a constant-obs env     {const_f:>10,.0f}")
    print(f"train fps    ratio real / constant          {real_f/const_f:>10.2f}   target >= 0.90")
    print(f"train fps    real env in RiskCheckedEnv     {wr_f:>10,.0f}   ({wr_f/const_f:.2f} of the reference; risk halts end episodes early,"
          f" and sb3-contrib trains one LSTM sequence per episode segment)")

    # Policy.decide latency
    from trader.research.policy import Policy
    m = RecurrentPPO('MlpLstmPolicy', env, seed=0, device='cpu', policy_kwargs=dict(net_arch=dict(pi=t.net_arch, vf=t.net_arch), lstm_hidden_size=t.lstm_hidden))
    pol = Policy(m, {'id': 'bench', 'symbols': fs.symbols, 'normaliser': norm.to_dict(), 'env': es.model_dump(), 'risk': rs.model_dump()})
    import copy
    ref = copy.copy(pol); ref._arrays = None      # the same actor through torch's modules (the reference decide is tested against)
    def latency(p):
        obs, _ = env.reset(seed=0); state = p.initial_state(); lat = []
        for i in range(5000):
            t0 = time.perf_counter(); a, state, c = p.decide(obs, state); lat.append(time.perf_counter() - t0)
            obs, _, term, trunc, _ = env.step(a)
            if term or trunc: obs, _ = env.reset(); state = p.initial_state()
        return np.array(lat[200:])*1e6
    lat, lat_ref = latency(pol), latency(ref)
    print(f"decide       latency p50 {np.percentile(lat, 50):,.0f} us, p99 {np.percentile(lat, 99):,.0f} us   target p99 < 1,000 us")
    print(f"decide       through torch's modules, same run: p50 {np.percentile(lat_ref, 50):,.0f} us, p99 {np.percentile(lat_ref, 99):,.0f} us")

if __name__ == '__main__':
    main()
