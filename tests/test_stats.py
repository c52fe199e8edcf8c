"""The contract of `trader.research.stats` that the experiment runner and its JSON rely on (the worked examples are in nbs/10a_stats.ipynb)."""
import inspect, json, sys, time
import numpy as np
import pytest
from trader.research import stats
from trader.research.stats import aggregate, dsr_trials, iqm, pbo, share_beating, stratified_bootstrap_ci

def test_signatures():
    sig = lambda f: list(inspect.signature(f).parameters)
    assert sig(iqm) == ['x']
    assert sig(stratified_bootstrap_ci) == ['scores', 'stat', 'n_boot', 'ci', 'seed']
    assert inspect.signature(stratified_bootstrap_ci).parameters['stat'].default is iqm
    assert sig(aggregate) == ['scores', 'seed'] and sig(share_beating) == ['scores', 'baseline']
    assert sig(dsr_trials) == ['returns', 'trial_sharpes', 'periods_per_year'] and sig(pbo) == ['returns', 'n_chunks']
    assert {'iqm', 'stratified_bootstrap_ci', 'aggregate', 'share_beating', 'dsr_trials', 'pbo'} <= set(stats.__all__)

def test_json_ready():
    s = np.random.default_rng(0).normal(1.0, 0.5, (3, 2))                        # 3 seeds x 2 folds
    a = aggregate(s)
    assert list(a) == ['iqm', 'ci', 'mean', 'median', 'n'] and a['n'] == 6 and len(a['ci']) == 2
    r = np.random.default_rng(1).normal(0.0005, 0.01, 500)
    d = dsr_trials(r, [0.5, 1.0, 1.5])
    assert list(d) == ['dsr', 'n_trials', 'sharpe_var'] and d['n_trials'] == 3
    json.dumps({**a, **d, 'beat': share_beating(s, [0.9, 1.1])}, allow_nan=False)
    assert a == aggregate(s) and stratified_bootstrap_ci(s, seed=5) == stratified_bootstrap_ci(s, seed=5)   # seeded

def test_pbo_keys_and_vectorised():
    "12,870 combinations in a few dozen Python calls: vectorised (a loop over the combinations would make at least one call each), whatever the machine's speed."
    m = np.random.default_rng(2).normal(0.0, 0.01, (2000, 20))
    calls = [0]
    def count(frame, event, arg):
        if event in ('call', 'c_call'): calls[0] += 1
    sys.setprofile(count)
    try: p = pbo(m)
    finally: sys.setprofile(None)
    assert list(p) == ['pbo', 'logits', 'n_combinations', 'n_chunks', 'n_configs']
    assert (p['n_combinations'], p['n_chunks'], p['n_configs']) == (12_870, 16, 20) and p['logits'].shape == (12_870,)
    assert 0.0 <= p['pbo'] <= 1.0 and calls[0] < 1_000, calls

def test_refuses_missing_scores():
    with pytest.raises(ValueError, match='missing'): aggregate([[1.0, None], [0.5, 0.7]])
    with pytest.raises(ValueError, match='missing'): pbo(np.full((64, 3), np.nan))
