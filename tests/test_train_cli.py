"""`trader train` and `trader models` end to end (issue: research core)."""
import json, os, re, subprocess, sys
from pathlib import Path
import pytest

TRADER = str(Path(sys.executable).parent/'trader')
FAST = '[train]\nn_steps = 128\nbatch_size = 64\nn_epochs = 2\ncheckpoint_every = 512\n'

def trader(home, *args):
    env = {**os.environ, 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(Path(home)/'trader.toml')}
    return subprocess.run([TRADER, *args], capture_output=True, text=True, env=env, timeout=900)

def registered(out):
    m = re.search(r'registered (\S+):', out); assert m, out
    return m.group(1)

@pytest.fixture(scope='module')
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp('train')
    (h/'trader.toml').write_text(FAST)
    r = trader(h, 'ingest', '--source', 'sample', '--symbols', 'AAPL,MSFT', '-q'); assert r.returncode == 0, r.stderr
    return h

def params_hash(home, mid):
    return json.loads((Path(home)/'models'/mid/'metadata.json').read_text())['params_sha256']

def test_same_seed_same_weights(home):
    a = registered(trader(home, 'train', '--symbols', 'AAPL,MSFT', '--steps', '1024', '--seed', '0', '-q').stdout)
    b = registered(trader(home, 'train', '--symbols', 'AAPL,MSFT', '--steps', '1024', '--seed', '0', '-q').stdout)
    c = registered(trader(home, 'train', '--symbols', 'AAPL,MSFT', '--steps', '1024', '--seed', '1', '-q').stdout)
    assert a != b and params_hash(home, a) == params_hash(home, b) != params_hash(home, c)
    meta = json.loads((Path(home)/'models'/a/'metadata.json').read_text())
    for k in ('id', 'parent', 'created', 'seed', 'steps', 'symbols', 'features', 'normaliser', 'windows', 'data', 'package_version',
              'artifact_sha256', 'params_sha256', 'validation', 'train'):
        assert k in meta, k
    assert meta['train']['net_arch'] == [64, 64] and meta['train']['lstm_hidden'] == 32
    assert meta['n_envs'] == 8 and meta['steps'] == 1024           # the batched env: 8 envs x 128-step rollouts fit the 1,024-step budget
    assert meta['data']['last'].startswith('2011-12-30')          # nothing from the holdout was read
    assert (Path(home)/'models'/a/'learning_curve.csv').exists()

def test_resume_continues_step_count(home):
    a = registered(trader(home, 'train', '--symbols', 'AAPL,MSFT', '--steps', '1024', '-q').stdout)
    r = trader(home, 'train', '--resume', a, '--steps', '512', '-q')
    assert r.returncode == 0, r.stderr
    b = registered(r.stdout)
    meta = json.loads((Path(home)/'models'/b/'metadata.json').read_text())
    assert (meta['steps'], meta['parent'], meta['kind']) == (1536, a, 'resume')

def test_resume_keeps_parent_seed_unless_given(home):
    "`--resume` keeps the parent's seed (it used to record and use 0, the --seed default) and records the seed it used truthfully."
    p = registered(trader(home, 'train', '--symbols', 'AAPL,MSFT', '--steps', '256', '--seed', '5', '-q').stdout)
    r = trader(home, 'train', '--resume', p, '--steps', '256', '-q'); assert r.returncode == 0, r.stderr
    kept = registered(r.stdout)
    assert 'seed 5,' in r.stdout, r.stdout
    r = trader(home, 'train', '--resume', p, '--steps', '256', '--seed', '5', '-q'); assert r.returncode == 0, r.stderr
    same = registered(r.stdout)
    r = trader(home, 'train', '--resume', p, '--steps', '256', '--seed', '2', '-q'); assert r.returncode == 0, r.stderr
    given = registered(r.stdout)
    meta = {m: json.loads((Path(home)/'models'/m/'metadata.json').read_text()) for m in (p, kept, same, given)}
    assert (meta[kept]['seed'], meta[kept]['seed_from'], meta[kept]['parent']) == (5, 'parent', p)
    assert (meta[same]['seed'], meta[same]['seed_from']) == (5, 'argument')
    assert (meta[given]['seed'], meta[given]['seed_from']) == (2, 'argument')
    assert meta[kept]['params_sha256'] == meta[same]['params_sha256'] != meta[given]['params_sha256']   # the seed recorded is the seed used
    shown = json.loads(trader(home, 'models', 'show', kept).stdout)
    assert shown['seed'] == 5
    assert meta[p]['seed_from'] == 'argument'

def test_resume_seed_api(tmp_path):
    "The same through `train()`: resume without a seed uses and records the parent's."
    from trader.core.config import load_settings
    from trader.core.data import load_sample
    from trader.core.quality import DataQualityGate
    from trader.core.registry import Registry
    from trader.core.store import Store
    from trader.research.train import train
    s = load_settings({'TRADER_HOME': str(tmp_path)}, train={'n_steps': 128, 'batch_size': 64, 'n_epochs': 1, 'checkpoint_every': 0})
    with Store(settings=s) as store:
        store.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
        p = train('AAPL,MSFT', steps=128, seed=9, settings=s, store=store, progress=False)
        kept = train(resume=p.model_id, steps=128, settings=s, store=store, progress=False)
        same = train(resume=p.model_id, steps=128, seed=9, settings=s, store=store, progress=False)
        assert (kept.meta['seed'], kept.meta['seed_from']) == (9, 'parent')
        assert kept.meta['params_sha256'] == same.meta['params_sha256']
        assert int(Registry(store, s).list().set_index('id').seed[kept.model_id]) == 9

def test_warm_start_single_to_dual(home):
    one = registered(trader(home, 'train', '--symbols', 'AAPL', '--steps', '512', '-q').stdout)
    r = trader(home, 'train', '--symbols', 'AAPL,MSFT', '--steps', '512', '--warm-start', one, '-q')
    assert r.returncode == 0, r.stderr
    assert re.search(r'warm start from \S+: copied \d+ tensors, not copied \d+', r.stdout)
    assert 'copied   lstm_actor.weight_hh_l0' in r.stdout
    assert 'skipped  lstm_actor.weight_ih_l0 (128, 26) (source (128, 13))' in r.stdout
    assert 'skipped  action_net.weight (6, 64) (source (3, 64))' in r.stdout   # 3 logits per asset

def test_holdout_refused_without_flag(home):
    r = trader(home, 'train', '--steps', '256', '--train-window', '2005-01-01:2012-06-30', '-q')
    assert r.returncode == 2 and 'overlaps the holdout' in r.stderr and '--allow-holdout' in r.stderr
    r = trader(home, 'train', '--steps', '256', '--train-window', '2005-01-01:2012-06-30', '--valid-window', '2012-07-01:2012-12-31', '--allow-holdout', '-q')
    assert r.returncode == 0, r.stderr
    meta = json.loads((Path(home)/'models'/registered(r.stdout)/'metadata.json').read_text())
    assert meta['windows']['allow_holdout'] is True and meta['windows']['used_holdout'] is True

def test_models_commands_and_tamper(home):
    mid = registered(trader(home, 'train', '--steps', '256', '-q').stdout)
    r = trader(home, 'models', 'list'); assert r.returncode == 0 and mid in r.stdout
    r = trader(home, 'models', 'show', mid); assert json.loads(r.stdout)['id'] == mid
    r = trader(home, 'models', 'champion', mid); assert r.returncode == 0 and 'champion is now' in r.stdout
    assert trader(home, 'models', 'champion').stdout.strip() == mid
    art = Path(home)/'models'/mid/'model.zip'
    art.write_bytes(art.read_bytes() + b'tampered')
    r = trader(home, 'train', '--resume', mid, '--steps', '128', '-q')
    assert r.returncode == 2 and 'sha256 mismatch' in r.stderr
    r = trader(home, 'models', 'champion', mid)
    assert r.returncode == 2 and 'sha256 mismatch' in r.stderr

def test_batched_and_single_env_api(tmp_path):
    "n_envs from settings: the batched env by default, one TradingEnv with n_envs = 1; a resume may change n_envs; portfolio features need one env."
    from trader.core.config import load_settings
    from trader.core.data import load_sample
    from trader.core.quality import DataQualityGate
    from trader.core.store import Store
    from trader.research.train import TrainError, train
    s = load_settings({'TRADER_HOME': str(tmp_path)}, train={'n_steps': 32, 'batch_size': 128, 'n_epochs': 1, 'checkpoint_every': 0})
    one = s.model_copy(update={'train': s.train.model_copy(update={'n_envs': 1})})
    with Store(settings=s) as store:
        store.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
        b = train('AAPL,MSFT', steps=512, seed=3, settings=s, store=store, progress=False)
        b2 = train('AAPL,MSFT', steps=512, seed=3, settings=s, store=store, progress=False)
        o = train('AAPL,MSFT', steps=512, seed=3, settings=one, store=store, progress=False)
        assert (b.meta['n_envs'], o.meta['n_envs'], b.meta['steps'], o.meta['steps']) == (16, 1, 512, 512)
        assert b.meta['params_sha256'] == b2.meta['params_sha256'] != o.meta['params_sha256']
        r = train(resume=o.model_id, steps=256, settings=s, store=store, progress=False)      # one env -> 8 envs
        assert (r.meta['steps'], r.meta['n_envs'], r.meta['parent']) == (768, 8, o.model_id)
        pf = s.model_copy(update={'env': s.env.model_copy(update={'portfolio_features': True})})
        with pytest.raises(TrainError, match='portfolio_features'):
            train('AAPL,MSFT', steps=512, seed=0, settings=pf, store=store, progress=False)
        pf1 = pf.model_copy(update={'train': one.train})
        assert train('AAPL,MSFT', steps=64, seed=0, settings=pf1, store=store, progress=False).meta['obs_dim'] == 29

@pytest.mark.slow
def test_acceptance_20k_twice_same_hash(tmp_path):
    "The issue's own figure: 20,000 steps twice with seed 0 give identical weights, default hyperparameters (the batched env)."
    (tmp_path/'trader.toml').write_text('')
    r = trader(tmp_path, 'ingest', '--source', 'sample', '--symbols', 'AAPL,MSFT', '-q'); assert r.returncode == 0
    a = registered(trader(tmp_path, 'train', '--symbols', 'AAPL,MSFT', '--steps', '20000', '--seed', '0', '-q').stdout)
    b = registered(trader(tmp_path, 'train', '--symbols', 'AAPL,MSFT', '--steps', '20000', '--seed', '0', '-q').stdout)
    assert params_hash(tmp_path, a) == params_hash(tmp_path, b)
    print(f"20,000 steps twice, seed 0: params sha256 {params_hash(tmp_path, a)[:16]} == {params_hash(tmp_path, b)[:16]}")
