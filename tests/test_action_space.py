"""An action space that grows linearly with the number of assets (issue 18): `MultiDiscrete([3]*N)` in the environments, the joint
action id (base 3, first asset most significant) everywhere else, old `Discrete(3**N)` models deciding as before.
`trader train --symbols AAPL,MSFT,IBM,GOOG` end to end is in test_four_assets.py."""
from itertools import product
import numpy as np
import pytest
from fastcore.test import test_eq as _test_eq, test_fail as _test_fail
from gymnasium import spaces

from trader.core.config import EnvSettings, RiskSettings
from trader.core.data import load_sample
from trader.research.env import (BUY, HOLD, SELL, RiskCheckedEnv, TradingEnv, action_codes, action_table, apply_action, decode_action,
                                 describe_action, encode_action)
from trader.research.features import Normaliser, build_features
from trader.research.risk import RiskEngine
from trader.research.vecenv import BatchedTradingEnv

SYMS4 = ('AAPL', 'MSFT', 'IBM', 'GOOG')
SMALL = dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), lstm_hidden_size=32)


@pytest.fixture(scope='module')
def four():
    "The four sample stocks from GOOG's first bar (2004-08-19), features and a normaliser fit on the training window."
    fs = build_features(load_sample(SYMS4, start='2004-08-19'), SYMS4)
    return fs, Normaliser.fit(fs.features[fs.window(None, '2009-12-31')])


def _env(four, **kw):
    fs, norm = four
    rs = kw.pop('risk', RiskSettings())
    return TradingEnv(fs, norm, None, '2009-12-31', kw.pop('es', EnvSettings()), rs, **kw)


# -- the joint id ---------------------------------------------------------------------------------------------------------
def test_joint_id_is_the_former_numbering():
    "decode/encode are the former `action_table` (itertools.product, first asset most significant), both ways, for 1..6 assets."
    for n in range(1, 7):
        _test_eq([decode_action(a, n) for a in range(3**n)], list(product(range(3), repeat=n)))
        _test_eq([encode_action(c) for c in product(range(3), repeat=n)], list(range(3**n)))
    _test_eq(describe_action(7, ['AAPL', 'MSFT']), 'AAPL BUY, MSFT HOLD')
    _test_eq(describe_action(np.array([BUY, HOLD]), ['AAPL', 'MSFT']), 'AAPL BUY, MSFT HOLD')


def test_no_table_of_3_to_the_n():
    "Ten and twenty assets: decoding, describing and applying an action never enumerate the joint actions (3^20 ~ 3.5e9)."
    _test_eq(decode_action(3**20 - 1, 20), (BUY,)*20)
    _test_eq(encode_action([SELL]*19 + [BUY]), 2)
    t = action_table(20)
    _test_eq(len(t), 3**20); _test_eq(t[5], (SELL,)*18 + (HOLD, BUY))
    sizes = (0.05,)*20
    _test_eq(apply_action((0.0,)*20, 3**20 - 1, sizes, False, t), sizes)                      # callers that still pass a table
    _test_eq(apply_action((0.05,)*20, [SELL]*10 + [HOLD]*10, sizes, True), (-0.05,)*10 + (0.05,)*10)
    _test_eq(describe_action(encode_action([HOLD]*9 + [BUY]), [f'S{i}' for i in range(10)]).split(', ')[-1], 'S9 BUY')
    _test_fail(lambda: decode_action(3**10, 10), contains='outside 0..59048')
    _test_fail(lambda: action_codes([0, 1, 5], 3), contains='not SELL 0')
    _test_fail(lambda: action_codes([0, 1], 3), contains='2 codes for 3 assets')


# -- the environments ------------------------------------------------------------------------------------------------------
def test_four_asset_env_is_multidiscrete(four):
    env = _env(four)
    _test_eq(env.action_space, spaces.MultiDiscrete([3, 3, 3, 3])); _test_eq(env.observation_space.shape, (52,))
    _test_eq(_env(four, joint_actions=True).action_space, spaces.Discrete(81))
    from gymnasium.utils.env_checker import check_env
    check_env(env, skip_render_check=True)


def test_codes_and_joint_ids_step_alike(four):
    "The compiled step applies `apply_action`'s rule; a joint id (either space) steps exactly as its codes."
    fs = four[0]
    a, b, c = _env(four, es=EnvSettings(allow_short=True)), _env(four, es=EnvSettings(allow_short=True)), _env(four, es=EnvSettings(allow_short=True), joint_actions=True)
    for e in (a, b, c): e.reset(options={'start': fs.index_of('2006-01-03')})
    rng = np.random.default_rng(0)
    for _ in range(400):
        codes = rng.integers(0, 3, 4)
        want = apply_action(a._w, codes, a.sizes, True)
        ra, rb, rc = a.step(codes), b.step(tuple(int(x) for x in codes)), c.step(encode_action(codes))
        _test_eq(ra[4]['weights'], want)
        for r in (rb, rc):
            np.testing.assert_array_equal(ra[0], r[0]); _test_eq(ra[1:], r[1:])
        if ra[2] or ra[3]: break
    before = a._w
    _test_fail(lambda: a.step([BUY, BUY, BUY, 3]), contains='not SELL 0, HOLD 1 or BUY 2')
    _test_fail(lambda: a.step(81), contains='outside 0..80')
    _test_eq(a._w, before)


def test_batched_four_assets_equal_singles(four):
    "Env i of a batch stepped with (n_envs, 4) codes is TradingEnv i, rules and guardian on, through auto-resets; joint ids decode alike."
    fs, norm = four
    rs = RiskSettings(guardian_day_drawdown=0.01)
    make = lambda joint=False: RiskCheckedEnv(TradingEnv(fs, norm, None, '2009-12-31', EnvSettings(episode_len=50), rs, joint_actions=joint), RiskEngine(rs))
    for joint in (False, True):
        bat = BatchedTradingEnv(make(joint), 6, seed=1)
        obs = bat.reset()
        _test_eq(bat.action_space, spaces.Discrete(81) if joint else spaces.MultiDiscrete([3]*4))
        singles = [make(joint) for _ in range(6)]
        for i, e in enumerate(singles): np.testing.assert_array_equal(e.reset(options={'start': int(bat.starts[i])})[0], obs[i])
        rng, episodes = np.random.default_rng(2), 0
        for _ in range(300):
            codes, nxt = rng.integers(0, 3, (6, 4)), bat._next.copy()
            acts = np.array([encode_action(c) for c in codes]) if joint else codes
            obs, rew, done, infos = bat.step(acts)
            for i, e in enumerate(singles):
                o, r, term, trunc, info = e.step(acts[i])
                assert r == rew[i] and done[i] == (term or trunc) and info['equity'] == bat.equity[i]
                if term or trunc:
                    np.testing.assert_array_equal(infos[i]['terminal_observation'], o)
                    o, _ = e.reset(options={'start': int(nxt[i])}); episodes += 1
                np.testing.assert_array_equal(o, obs[i])
        assert episodes > 10
    _test_fail(lambda: bat.step(np.zeros((6, 3), np.int64)), contains='expected (6, 4) per-asset codes or (6,) joint ids')


@pytest.mark.parametrize('resume', [0, 2])
def test_halt_ends_the_episode_only_for_good(four, resume):
    "A guardian halt ends the episode when it waits for a person (halt_resume_sessions 0); lifted after N sessions, the episode goes on."
    fs, norm = four
    rs = RiskSettings(guardian_day_drawdown=0.005, halt_resume_sessions=resume, max_drawdown=0.5)
    env = RiskCheckedEnv(TradingEnv(fs, norm, None, '2009-12-31', EnvSettings(), rs, episode_len=0), RiskEngine(rs))
    env.reset(options={'start': fs.index_of('2008-09-02')})
    fired = halted = 0
    for k in range(80):
        *_, term, trunc, info = env.step([BUY]*4)
        fired += bool(info['guardian_fired']); halted += info['risk_halted']
        if term: break
    assert fired >= 1
    if resume == 0: assert term and info['risk_halted'] and k < 79
    else: assert not term and k == 79 and fired >= 2 and halted < 80      # halts came and went; the episode ran on
    bat = BatchedTradingEnv(env, 2, seed=0); bat.reset(starts=[fs.index_of('2008-09-02')]*2)
    ends = sum(bool(bat.step(np.full((2, 4), BUY))[2].any()) for _ in range(80))
    assert (ends > 0) if resume == 0 else (ends == 0)


# -- the policy --------------------------------------------------------------------------------------------------------------
def _meta(fs, norm, syms):
    return {'id': 'test', 'symbols': list(syms), 'normaliser': norm.to_dict(), 'env': EnvSettings().model_dump(), 'risk': RiskSettings().model_dump()}


def _decide_vs_predict(pol, env, steps=200):
    obs, _ = env.reset(seed=7)
    state, sb3, start = pol.initial_state(), None, np.ones((1,), bool)
    for i in range(steps):
        a, state, conf = pol.decide(obs, state)
        b, sb3 = pol.model.predict(obs, state=sb3, episode_start=start, deterministic=True); start[:] = False
        assert a == (encode_action(b) if pol.per_asset else int(b)), (i, a, b)
        assert 0 < conf <= 1
        obs, _, term, trunc, _ = env.step(a)
        if term or trunc: obs, _ = env.reset(); state, start[:] = pol.initial_state(), True


def test_policy_four_assets_matches_sb3(four):
    "A MultiDiscrete model trained a little on four assets: 12 logits; decide == predict; the confidence is the product of per-asset probabilities."
    from sb3_contrib import RecurrentPPO
    from trader.research.policy import Policy
    fs, norm = four
    env = _env(four)
    model = RecurrentPPO('MlpLstmPolicy', env, seed=0, device='cpu', n_steps=64, batch_size=64, n_epochs=1, policy_kwargs=SMALL).learn(128)
    _test_eq(model.policy.action_net.out_features, 12)
    pol = Policy(model, _meta(fs, norm, SYMS4))
    _test_eq((pol.per_asset, pol.n_actions, pol.n_assets), (True, 81, 4))
    _decide_vs_predict(pol, env)
    obs, _ = env.reset(seed=1)
    a, _, conf = pol.decide(obs, pol.initial_state())
    lt, *_ = pol._torch_step(np.asarray(obs, np.float32), pol.initial_state())
    L = lt.reshape(4, 3).astype(np.float64); p = np.exp(L - L.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    _test_eq(decode_action(a, 4), tuple(p.argmax(1)))
    assert abs(conf - p.max(1).prod()) < 1e-5
    from trader.research.policy import evaluate
    ev = evaluate(pol, fs, '2010-01-01', '2011-12-31')
    assert ev.actions.max() < 81 and ev.metrics['bars'] > 400


def test_old_discrete_model_decides_as_before(four, tmp_path):
    "A model of the former joint space Discrete(3**N), saved and loaded: decide is the argmax of its 3^N logits with that probability,"
    " as before the change, equal to SB3's predict; its env is the joint one."
    from sb3_contrib import RecurrentPPO
    from trader.research.policy import Policy
    fs, norm = four
    fs2 = build_features(load_sample(['AAPL', 'MSFT']), 'AAPL,MSFT'); norm2 = Normaliser.fit(fs2.features[fs2.window(None, '2009-12-31')])
    env = TradingEnv(fs2, norm2, None, '2009-12-31', EnvSettings(), RiskSettings(), joint_actions=True)
    RecurrentPPO('MlpLstmPolicy', env, seed=0, device='cpu', n_steps=64, batch_size=64, n_epochs=1, policy_kwargs=SMALL).learn(128).save(tmp_path/'old.zip')
    model = RecurrentPPO.load(tmp_path/'old.zip', device='cpu')
    _test_eq(model.action_space, spaces.Discrete(9))
    pol = Policy(model, _meta(fs2, norm2, ('AAPL', 'MSFT')))
    _test_eq((pol.per_asset, pol.n_actions), (False, 9))
    _test_eq(pol.make_env(fs2).action_space, spaces.Discrete(9))
    _decide_vs_predict(pol, env)
    obs, _ = env.reset(seed=3); st = pol.initial_state()
    for _ in range(100):                                 # the former `decide`, written out
        logits, h, c = pol._torch_step(np.asarray(obs, np.float32), st)
        z = np.exp(logits - logits.max()); probs = z/z.sum()
        a, st, conf = pol.decide(obs, st)
        _test_eq(a, int(np.argmax(probs))); assert abs(conf - float(probs[a])) < 1e-5
        obs, *_ = env.step(a)
    _test_fail(lambda: Policy(model, _meta(fs, norm, SYMS4)), contains='not one for its 4 assets')


def test_recurrent_ppo_trains_on_four_assets_batched(four):
    "RecurrentPPO on the batched four-asset env (rules and guardian on): the action head has 3 x 4 logits, not 81."
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.vec_env import VecMonitor
    fs, norm = four
    rs = RiskSettings()
    venv = VecMonitor(BatchedTradingEnv(RiskCheckedEnv(TradingEnv(fs, norm, None, '2009-12-31', EnvSettings(episode_len=50), rs), RiskEngine(rs)), 8, seed=0))
    m = RecurrentPPO('MlpLstmPolicy', venv, seed=0, device='cpu', n_steps=64, batch_size=256, n_epochs=1, policy_kwargs=SMALL).learn(1024)
    _test_eq(m.num_timesteps, 1024); _test_eq(m.policy.action_net.out_features, 12)
    assert len(m.ep_info_buffer) > 0

