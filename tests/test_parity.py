"""Backtest and paper replay agree: same model, same bars, same costs -> the same equity at every bar (issue: paper trading)."""
import numpy as np
import pytest
from trader.core.config import load_settings
from trader.core.data import load_sample
from trader.core.quality import DataQualityGate
from trader.core.store import Store
from trader.research.train import train
from trader.core.registry import Registry
from trader.research.backtest import backtest
from trader.live.loop import paper_session
from trader.core.runs import Runs

@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    home = tmp_path_factory.mktemp('parity')
    # the guardian is an operational kill switch the backtest does not simulate; everything else (risk engine, sizing,
    # fills, fees, slippage) is shared, and that is what parity proves
    s = load_settings({'TRADER_HOME': str(home)}, train={'n_steps': 128, 'batch_size': 64, 'n_epochs': 2, 'checkpoint_every': 0},
                      risk={'guardian': False})
    store = Store(settings=s)
    store.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
    mid = train('AAPL,MSFT', steps=1024, seed=0, settings=s, store=store, progress=False).model_id
    Registry(store, s).set_champion(mid, 'parity test')
    return s, store, mid

@pytest.mark.parametrize('window,fees,slip', [('2012-01-03:2013-03-01', 1.0, 2.0), ('2008-06-02:2009-06-30', 5.0, 10.0)])
def test_paper_replay_equals_backtest(prepared, window, fees, slip):
    s, store, mid = prepared
    s2 = s.model_copy(update={'env': s.env.model_copy(update={'fees_bps': fees, 'slippage_bps': slip})})
    bt = backtest(mid, window, settings=s2, store=store, baselines=False)
    out = paper_session('sim', mid, window, settings=s2, store=store, tag=f'parity {window}')
    paper = Runs(store).load(out['run_id'])
    be, pe = bt.equity, paper.equity
    assert len(be) == len(pe) > 200 and (be.index == pe.index).all()
    rel = ((pe - be).abs()/be).max()
    assert rel < 1e-6, f'max relative difference {rel:.2e}'
    assert len(bt.orders) >= 10, 'the model must trade for the comparison to mean anything'
    po = paper.orders
    assert len(po) == len(bt.orders)
    np.testing.assert_allclose(po.price.to_numpy(), bt.orders.price.to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(po.qty.to_numpy(), bt.orders.qty.to_numpy(), rtol=1e-9)
    assert (po.symbol.to_numpy() == bt.orders.symbol.to_numpy()).all()
