"""Experiments on Ray give the local run's trials and numbers, and spread over a cluster's nodes.

Ray is started only inside a network namespace with nothing but loopback (outside one, Ray binds to the machine's
own network address): the module fixture runs the local experiments here, then re-executes this file under
`unshare -n sh -c 'ip link set lo up && exec python tests/test_ray.py HOME OUT'`, which runs the same specs on Ray
against the same store and writes what it saw to OUT. That needs root, `unshare` (util-linux) and `ip` (iproute2):
without them the tests are skipped, except in CI (CI=true), where that is a failure (.ci/run installs iproute2).
"""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest

TINY = {'n_steps': 128, 'batch_size': 64, 'n_epochs': 2, 'checkpoint_every': 0, 'n_envs': 1}
FOLDS = {'n': 2, 'start': '2003-01-02'}
GRID = {'seeds': 2, 'steps': 256, 'folds': FOLDS}                                    # 2 folds x 2 seeds
OPTUNA = {'seeds': 3, 'steps': 128, 'folds': FOLDS,                                   # 3 configurations x 3 seeds x 2 folds, median pruner
          'optuna': {'trials': 3, 'seed': 0, 'params': {'env.turnover_penalty': {'low': 0.0, 'high': 0.5}}}}
SUMMARY_KEYS = ('iqm', 'ci', 'dsr', 'n_trials', 'pbo', 'max_drawdown_iqm', 'share_beating_buy_hold', 'best', 'folds')
quiet = lambda *a, **k: None

def _netns_problem() -> str|None:
    "Why a loopback-only network namespace cannot be made here (None: it can)."
    if not hasattr(os, 'geteuid') or os.geteuid() != 0: return "not root (unshare -n needs root)"
    for tool in ('unshare', 'ip'):
        if not shutil.which(tool): return f"`{tool}` is missing (apt-get install {'util-linux' if tool == 'unshare' else 'iproute2'})"
    r = subprocess.run(['unshare', '-n', 'sh', '-c', 'ip link set lo up && ip -o link show up'], capture_output=True, text=True)
    if r.returncode != 0: return f"unshare -n failed: {r.stderr.strip()[:200]}"
    return None

def _setup(home:Path):
    "Settings with a tiny training budget and a store with the sample bars (idempotent)."
    from trader.core.config import load_settings
    from trader.core.store import Store
    s = load_settings({'TRADER_HOME': str(home)}, train=TINY)
    store = Store(settings=s)
    if store.read_bars(['AAPL', 'MSFT']).empty:
        from trader.core.data import load_sample
        from trader.core.quality import DataQualityGate
        store.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
    return s, store

def _experiment(name:str, d:dict, s, store):
    from trader.research.experiments import Experiment, parse_spec
    return Experiment(parse_spec({**d, 'name': name}, s), s, store)

def _trials(store, name:str) -> dict:
    "{trial key: (config, seed, fold, metrics, test returns)} of an experiment."
    return {r[0]: tuple(r[1:]) for r in store.query('SELECT trial_key, config, seed, fold, metrics, test_returns FROM exp_trials WHERE experiment = ?', (name,))}

def _numbers(summ:dict) -> dict:
    "A summary's figures, the per-configuration ones included (everything but names)."
    out = {k: summ[k] for k in SUMMARY_KEYS}
    out['configs'] = sorted(({k: v for k, v in c.items()} for c in summ['configs']), key=lambda c: c['config_id'])
    return json.loads(json.dumps(out, default=str))

def ray_side(home:Path, out:Path):
    """Runs inside the loopback-only namespace: the grid spec on a private local Ray instance (`ray=True`), then the grid
    and the Optuna spec on a two-node cluster (`address=`), one CPU per node."""
    import ray
    from ray.cluster_utils import Cluster
    s, store = _setup(home)
    res = {'links': subprocess.run(['ip', '-o', 'link', 'show'], capture_output=True, text=True).stdout.split('\n')}
    ex = _experiment('grid-ray', GRID, s, store)
    res['grid'] = {'summary': ex.run(ray=True, workers=2, say=quiet), 'placement': ex.placement}
    assert not ray.is_initialized()                             # the private instance was shut down
    cluster = Cluster(initialize_head=True, head_node_args={'num_cpus': 1, 'node_ip_address': '127.0.0.1', 'include_dashboard': False})
    try:
        cluster.add_node(num_cpus=1, node_ip_address='127.0.0.1')
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)  # run() uses (and leaves) this session, so the nodes can be listed after it
        ex = _experiment('grid-cluster', GRID, s, store)
        res['cluster'] = {'summary': ex.run(address=cluster.address, say=quiet), 'placement': ex.placement}
        ex, lines = _experiment('optuna-cluster', OPTUNA, s, store), []
        res['optuna'] = {'summary': ex.run(address=cluster.address, say=lines.append), 'placement': ex.placement, 'lines': lines,
                         'study': [[t.params, t.state.name, t.value] for t in ex.study.trials]}
        res['nodes'] = [{'id': n['NodeID'], 'address': n['NodeManagerAddress'], 'alive': n['Alive']} for n in ray.nodes()]
    finally:
        if ray.is_initialized(): ray.shutdown()
        cluster.shutdown()
    out.write_text(json.dumps(res, default=str))

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    problem = _netns_problem()
    if problem:
        if os.environ.get('CI') == 'true': pytest.fail(f"the Ray tests need a loopback-only network namespace in CI, but {problem}", pytrace=False)
        pytest.skip(f"Ray tests skipped: {problem}")
    home = tmp_path_factory.mktemp('ray-home')
    s, store = _setup(home)
    local = {'grid': _experiment('grid-local', GRID, s, store).run(workers=1, say=quiet)}
    ex = _experiment('optuna-local', OPTUNA, s, store)
    local['optuna'] = ex.run(workers=1, say=quiet)
    local['study'] = [[t.params, t.state.name, t.value] for t in ex.study.trials]
    out = home/'ray.json'
    inner = f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()} {home} {out}"
    r = subprocess.run(['unshare', '-n', 'sh', '-c', inner], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0 and out.is_file(), f"the Ray side failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    yield {'local': local, 'ray': json.loads(out.read_text()), 'store': store}
    store.close()

def test_namespace_is_loopback_only(runs):
    links = [l for l in runs['ray']['links'] if l.strip()]
    assert len(links) == 1 and ': lo:' in links[0], links

def test_grid_on_ray_equals_local(runs):
    store, ray_ = runs['store'], runs['ray']['grid']
    local_trials, ray_trials = _trials(store, 'grid-local'), _trials(store, 'grid-ray')
    assert len(local_trials) == 4 and set(ray_trials) == set(local_trials)           # the same trial keys: 2 folds x 2 seeds
    for k, v in local_trials.items(): assert ray_trials[k] == v, k                   # config, seed, fold, metrics, per-bar returns
    assert _numbers(ray_['summary']) == _numbers(runs['local']['grid'])              # iqm, ci, dsr, n_trials, pbo, ...
    assert set(ray_['placement']) == set(local_trials)                               # every trial ran on Ray

def test_optuna_on_ray_equals_local(runs):
    "An Optuna search as a Tune Tuner (on the two-node cluster): the same configurations, pruning, trials and summary as locally."
    store, ray_ = runs['store'], runs['ray']['optuna']
    assert ray_['study'] == json.loads(json.dumps(runs['local']['study']))           # the same configurations, states, values
    local_trials, ray_trials = _trials(store, 'optuna-local'), _trials(store, 'optuna-cluster')
    assert set(ray_trials) == set(local_trials) and len(local_trials) >= 12
    for k, v in local_trials.items(): assert ray_trials[k] == v, k
    assert _numbers(ray_['summary']) == _numbers(runs['local']['optuna'])
    assert set(ray_['placement']) == set(local_trials)                               # every trial ran on Ray
    assert sum(l.startswith('optuna trial ') for l in ray_['lines']) == 3

def test_cluster_trials_land_on_both_nodes(runs):
    c, store, nodes = runs['ray']['cluster'], runs['store'], runs['ray']['nodes']
    assert {n['address'] for n in nodes} == {'127.0.0.1'} and sum(n['alive'] for n in nodes) == 2
    assert set(c['placement']) == set(_trials(store, 'grid-local'))
    assert len(set(c['placement'].values())) == 2, c['placement']                    # two distinct nodes ran trials
    assert set(c['placement'].values()) <= {n['id'] for n in nodes}
    assert _trials(store, 'grid-cluster') == _trials(store, 'grid-local')
    assert _numbers(c['summary']) == _numbers(runs['local']['grid'])

if __name__ == '__main__':
    ray_side(Path(sys.argv[1]), Path(sys.argv[2]))
