"""The contract of the library-backed statistics of `trader.research.stats` (rliable through the seeded adapter, arch's SPA and MCS,
PBO over configurations) that the experiment summary and its JSON rely on; the worked examples and the derivations are in nbs/10a_stats.ipynb."""
import inspect, json
import numpy as np
import pandas as pd
import pytest
from arch.bootstrap import SPA
from rliable import library as rly
from trader.research import stats
from trader.research.stats import (SeededStratifiedBootstrap, aggregate, model_confidence_set, pbo, pbo_over_configs, performance_profile,
                                   probability_of_improvement, spa_test, stratified_bootstrap_ci)

def test_signatures():
    sig = lambda f: list(inspect.signature(f).parameters)
    assert sig(probability_of_improvement) == ['x', 'y', 'seed', 'reps']
    assert sig(performance_profile) == ['score_dict', 'taus', 'seed', 'reps']
    assert sig(spa_test) == ['benchmark', 'models', 'reps', 'seed', 'studentize', 'block_size']
    assert inspect.signature(spa_test).parameters['studentize'].default is True
    assert sig(model_confidence_set) == ['returns', 'size', 'reps', 'seed', 'block_size']
    assert inspect.signature(model_confidence_set).parameters['size'].default == 0.1
    assert sig(pbo_over_configs) == ['mean_returns', 'S'] and inspect.signature(pbo_over_configs).parameters['S'].default == 16
    assert {'probability_of_improvement', 'performance_profile', 'spa_test', 'model_confidence_set', 'pbo_over_configs', 'interval_estimates'} <= set(stats.__all__)

def test_json_ready_and_seeded():
    rng = np.random.default_rng(0)
    s, bh = rng.normal(1.0, 0.5, (3, 4)), rng.normal(0.8, 0.5, 4)                     # 3 seeds x 4 folds, buy-and-hold per fold
    r = pd.DataFrame(rng.normal(0.0004, 0.01, (300, 3)), columns=['a', 'b', 'c'])
    out = {'poi': probability_of_improvement(s, bh, reps=200), 'profile': performance_profile({'cfg': s, 'bh': bh[None, :]}, reps=200),
           'spa': spa_test(r['a'].to_numpy(), r, reps=100), 'mcs': model_confidence_set(r, reps=100), 'pbo': pbo_over_configs(r)}
    json.dumps(out, allow_nan=False)
    assert list(out['poi']) == ['p', 'ci'] and list(out['profile']) == ['taus', 'profiles']
    assert list(out['spa']) == ['pvalue', 'lower', 'upper', 'n_models', 'best', 'best_excess', 'studentize', 'block_size', 'reps']
    assert list(out['mcs']) == ['included', 'excluded', 'pvalues', 'size', 'block_size'] and set(out['mcs']['pvalues']) == {'a', 'b', 'c'}
    assert list(out['pbo']) == ['pbo', 'logits', 'n_combinations', 'n_chunks', 'n_configs', 'why'] and out['pbo']['why'] is None
    assert out['poi'] == probability_of_improvement(s, bh, reps=200) and out['spa'] == spa_test(r['a'].to_numpy(), r, reps=100)
    assert out['mcs'] == model_confidence_set(r, reps=100)

def test_adapter_stratified_seeded_and_equal_to_hand_written():
    s = np.random.default_rng(1).normal(1.0, 0.5, (5, 4))
    strata = np.array([[0., 10], [1, 11], [0, 10], [1, 11]])
    for (x,), _ in SeededStratifiedBootstrap(strata, random_state=3).bootstrap(100):
        assert np.isin(x[:, 0], [0, 1]).all() and np.isin(x[:, 1], [10, 11]).all()
    np.random.seed(0); before = np.random.random(); np.random.seed(0)
    assert aggregate(s, seed=3) == aggregate(s, seed=3)
    assert np.random.random() == before                                                 # the global NumPy state is not used
    assert np.allclose(aggregate(s, seed=3)['ci'], stratified_bootstrap_ci(s, seed=3), rtol=0, atol=1e-12)

def test_upstream_behaviour_the_code_relies_on():
    "Canaries: when rliable runs on arch 8 as shipped, or arch's SPA starts to use `studentize`, revisit the adapter and `spa_test`."
    with pytest.raises(TypeError, match='random_state'):
        rly.get_interval_estimates({'a': np.ones((3, 2))}, lambda x: x.mean(), reps=5)
    rng = np.random.default_rng(2)
    b, m = rng.normal(0, 0.01, 400), rng.normal(0, 0.01, (400, 3)) * [1, 3, 5]
    runs = [SPA(-b, -m, reps=200, seed=1, studentize=st) for st in (True, False)]
    for r in runs: r.compute()
    assert runs[0].pvalues.tolist() == runs[1].pvalues.tolist()

def test_undefined_and_degenerate_cases():
    one = pbo_over_configs(np.random.default_rng(0).normal(0, 0.01, (400, 1)))
    assert one['pbo'] is None and 'one configuration' in one['why']
    flat = pd.DataFrame({'a': np.random.default_rng(3).normal(0, 0.01, 300), 'flat1': 0.0, 'flat2': 0.0})
    mc = model_confidence_set(flat, reps=100)                                           # arch alone raises on identical columns
    assert mc['pvalues']['flat1'] == mc['pvalues']['flat2']
    b = np.random.default_rng(4).normal(0, 0.01, 300)
    assert spa_test(b, np.c_[b, b], reps=50)['pvalue'] == 1.0
    m = np.random.default_rng(5).normal(0, 0.01, (300, 4))
    assert pbo_over_configs(m, 4)['logits'] == pbo(m, 4)['logits'].tolist()
