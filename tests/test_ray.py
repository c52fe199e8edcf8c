"""Experiments on Ray give the local run's trials and numbers, and spread over a cluster's nodes.

Ray is started only inside a network namespace with nothing but loopback (outside one, Ray binds to the machine's
own network address): the module fixture starts, each in its own namespace and at the same time, `unshare -n sh -c
'ip link set lo up && exec python tests/test_ray.py PART HOME OUT'` for the two parts of `ray_side` (the grid on a
private instance, the Optuna search on a two-node cluster), which run against the same store and write what they saw
to OUT, and runs the same specs locally meanwhile. That needs root, `unshare` (util-linux) and `ip` (iproute2): without
them the tests are skipped, except in CI (CI=true), where that is a failure (.ci/run installs iproute2).

The time goes to starting processes, not to training: on the idle 2-core machine a Ray start takes about 10 s, and each
process that runs trials (a Ray worker, a Tune trial's actor) first imports torch, sb3 and vectorbt, 4-7 s, against well
under a second for one of these trials. So the specs are the smallest that still prove the point: the least training the
trainer takes (64 steps: one rollout, one gradient step), one walk-forward fold, the grid's 2 seeds (2 trials) and the
Optuna search's 3 configurations x 3 seeds (3 seeds are the least a search takes, 3 configurations the least with which
the median pruner, after its 2 start-up trials, can prune: here it prunes the third). Ray starts twice, each start running
a different path once: the private instance (`ray=True`, what `trader experiment run --ray` starts) runs the grid as
tasks; the cluster (`address=`) runs the Optuna search as a Tune Tuner, its trials' tasks spread over both nodes.
"""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest

TINY = {'n_steps': 64, 'batch_size': 64, 'n_epochs': 1, 'checkpoint_every': 0, 'n_envs': 1}  # 64 steps: one rollout, one update
FOLDS = {'n': 1, 'start': '2003-01-02'}                                                 # one fold: trains 2003-2010, tests 2011
GRID = {'seeds': 2, 'steps': 64, 'folds': FOLDS}                                        # 1 fold x 2 seeds: 2 trials
OPTUNA = {'seeds': 3, 'steps': 64, 'folds': FOLDS,                                      # 3 configurations x 3 seeds x 1 fold: 9 trials;
          'optuna': {'trials': 3, 'seed': 0, 'pruner_warmup': 0,                        # no warm-up, so the median pruner judges fold 0
                     'params': {'env.turnover_penalty': {'low': 0.0, 'high': 0.5}}}}
SUMMARY_KEYS = ('iqm', 'ci', 'dsr', 'n_trials', 'pbo', 'max_drawdown_iqm', 'share_beating_buy_hold', 'best', 'folds')
PARTS = ('private', 'cluster')                                                         # the two Ray sides (see ray_side)
HANG = 900                                                                              # seconds: a hang guard, not an expectation
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

def ray_side(part:str, home:Path, out:Path):
    """Runs inside a loopback-only namespace. 'private': the grid spec on a private local Ray instance (`ray=True`, what
    `trader experiment run --ray` starts); 'cluster': the Optuna spec as a Tune Tuner on a two-node cluster (`address=`),
    one CPU per node."""
    t0 = time.perf_counter()
    import ray
    s, store = _setup(home)
    res = {'links': subprocess.run(['ip', '-o', 'link', 'show'], capture_output=True, text=True).stdout.split('\n'), 'seconds': {}}
    lap = lambda what: res['seconds'].__setitem__(what, round(time.perf_counter() - t0 - sum(res['seconds'].values()), 1))
    if part == 'private':
        ex = _experiment('grid-ray', GRID, s, store)
        lap('imports')
        res['grid'] = {'summary': ex.run(ray=True, workers=1, say=quiet), 'placement': ex.placement}
        assert not ray.is_initialized()                         # the private instance was shut down
        lap('grid on a private instance')
    else:
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={'num_cpus': 1, 'node_ip_address': '127.0.0.1', 'include_dashboard': False})
        try:
            cluster.add_node(num_cpus=1, node_ip_address='127.0.0.1')
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)  # run() uses (and leaves) this session, so the nodes can be listed after it
            lap('cluster start')
            ex, lines = _experiment('optuna-cluster', OPTUNA, s, store), []
            res['optuna'] = {'summary': ex.run(address=cluster.address, say=lines.append), 'placement': ex.placement, 'lines': lines,
                             'study': [[t.params, t.state.name, t.value] for t in ex.study.trials]}
            lap('optuna on the cluster')
            res['nodes'] = [{'id': n['NodeID'], 'address': n['NodeManagerAddress'], 'alive': n['Alive']} for n in ray.nodes()]
        finally:
            if ray.is_initialized(): ray.shutdown()
            cluster.shutdown()
        lap('shutdown')
    out.write_text(json.dumps(res, default=str))

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    problem = _netns_problem()
    if problem:
        if os.environ.get('CI') == 'true': pytest.fail(f"the Ray tests need a loopback-only network namespace in CI, but {problem}", pytrace=False)
        pytest.skip(f"Ray tests skipped: {problem}")
    home = tmp_path_factory.mktemp('ray-home')
    s, store = _setup(home)                                     # the bars are stored before the Ray sides read them
    t0, procs = time.perf_counter(), {}
    def start(part):                                            # in its own namespace, and its own process group (so that a failure here stops all of it)
        inner = f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()} {part} {home} {home/part}.json"
        with open(home/f'{part}.log', 'w') as f:
            procs[part] = subprocess.Popen(['unshare', '-n', 'sh', '-c', inner], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for part in PARTS: start(part)                          # both at once; the local runs meanwhile
        local = {'grid': _experiment('grid-local', GRID, s, store).run(workers=1, say=quiet)}
        ex = _experiment('optuna-local', OPTUNA, s, store)
        local['optuna'] = ex.run(workers=1, say=quiet)
        local['study'] = [[t.params, t.state.name, t.value] for t in ex.study.trials]
        local_seconds = round(time.perf_counter() - t0, 1)
        rc = {}
        for part, p in procs.items():                           # a hang guard only, several times what it takes on a busy machine
            try: rc[part] = p.wait(timeout=max(1, HANG - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired: rc[part] = f'still running after {HANG} s'
    finally:
        for p in procs.values():
            if p.poll() is None: os.killpg(p.pid, signal.SIGKILL); p.wait()
    ray_ = {}
    for part in PARTS:
        log = (home/f'{part}.log').read_text(errors='replace')
        assert rc[part] == 0 and (home/f'{part}.json').is_file(), f"the Ray side {part!r} failed (exit {rc[part]}):\n{log[-8000:]}"
        ray_[part] = json.loads((home/f'{part}.json').read_text())
    print(f"local runs {local_seconds} s; both Ray sides done after {time.perf_counter() - t0:.1f} s:", {part: r['seconds'] for part, r in ray_.items()})
    yield {'local': local, 'ray': ray_, 'store': store}
    store.close()

def test_namespace_is_loopback_only(runs):
    for part, r in runs['ray'].items():
        links = [l for l in r['links'] if l.strip()]
        assert len(links) == 1 and ': lo:' in links[0], (part, links)

def test_grid_on_ray_equals_local(runs):
    "The grid as Ray tasks on a private local instance (`ray=True`): the same trials and summary as locally."
    store, ray_ = runs['store'], runs['ray']['private']['grid']
    local_trials, ray_trials = _trials(store, 'grid-local'), _trials(store, 'grid-ray')
    assert len(local_trials) == 2 and set(ray_trials) == set(local_trials)           # the same trial keys: 1 fold x 2 seeds
    for k, v in local_trials.items(): assert ray_trials[k] == v, k                   # config, seed, fold, metrics, per-bar returns
    assert _numbers(ray_['summary']) == _numbers(runs['local']['grid'])              # iqm, ci, dsr, n_trials, pbo, ...
    assert set(ray_['placement']) == set(local_trials)                               # every trial ran on Ray
    assert len(set(ray_['placement'].values())) == 1                                  # on the private instance's one node

def test_optuna_on_ray_equals_local(runs):
    "An Optuna search as a Tune Tuner (on the two-node cluster): the same configurations, pruning, trials and summary as locally."
    store, ray_ = runs['store'], runs['ray']['cluster']['optuna']
    assert ray_['study'] == json.loads(json.dumps(runs['local']['study']))           # the same configurations, states, values
    states = [st for _, st, _ in ray_['study']]
    assert len(states) == 3, states        # pruned or not as locally (the study's states are equal above); whether the third prunes depends on the trials' values
    local_trials, ray_trials = _trials(store, 'optuna-local'), _trials(store, 'optuna-cluster')
    assert set(ray_trials) == set(local_trials) and len(local_trials) == 9           # 3 configurations x 3 seeds x 1 fold
    for k, v in local_trials.items(): assert ray_trials[k] == v, k
    assert _numbers(ray_['summary']) == _numbers(runs['local']['optuna'])
    assert set(ray_['placement']) == set(local_trials)                               # every trial ran on Ray
    assert sum(l.startswith('optuna trial ') for l in ray_['lines']) == 3
    assert sum(l.startswith('  pruned after fold ') for l in ray_['lines']) == states.count('PRUNED')

def test_cluster_trials_land_on_both_nodes(runs):
    o, store, nodes = runs['ray']['cluster']['optuna'], runs['store'], runs['ray']['cluster']['nodes']
    assert {n['address'] for n in nodes} == {'127.0.0.1'} and sum(n['alive'] for n in nodes) == 2
    assert set(o['placement']) == set(_trials(store, 'optuna-local'))
    assert len(set(o['placement'].values())) == 2, o['placement']                    # two distinct nodes ran trials
    assert set(o['placement'].values()) <= {n['id'] for n in nodes}
    assert _trials(store, 'optuna-cluster') == _trials(store, 'optuna-local')
    assert _numbers(o['summary']) == _numbers(runs['local']['optuna'])

if __name__ == '__main__':
    ray_side(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
