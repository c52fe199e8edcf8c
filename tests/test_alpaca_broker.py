"""Contract test of `AlpacaBroker` and `AlpacaFeed` (`trader.live.alpaca`, nbs/19a_alpaca.ipynb).

Nothing here reaches Alpaca. Each test gets its own `FakeAlpaca` (tests/fake_alpaca.py: a loopback fake of Alpaca's
documented trading and market-data REST shapes and rules, listed in its docstring) on a free 127.0.0.1 port, and checks
what alpaca-py sent over the wire as well as what the broker and the feed made of the answers. Requests the real API would
refuse as malformed are collected by the fake in `problems`, which must be empty at the end of each test.
"""
from __future__ import annotations
import datetime as dt, json, logging, traceback, uuid

import pandas as pd, pytest
from conftest import free_port
from fake_alpaca import KEY, SECRET, NY, FakeAlpaca, alpaca_daily, ny, serve

from trader.live.alpaca import AlpacaBroker, AlpacaFeed
from trader.live.broker import Broker, BrokerError, BrokerUnavailable, Order
from trader.core.config import ConfigError, load_settings
from trader.core.data import BAR_COLUMNS, load_sample
from trader.live.feeds import BarSet, Feed, FeedError, ResilientFeed

EVENING = ny('2024-01-02 20:00')   # the fake's clock: after 19:00 New York time, when Alpaca takes opg orders for the next open


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    "Loopback is never proxied, and no trading URL from the developer's shell leaks in."
    for k in ('NO_PROXY', 'no_proxy'): monkeypatch.setenv(k, '127.0.0.1,localhost')
    monkeypatch.delenv('TRADER_ALPACA_TRADING_URL', raising=False)

@pytest.fixture
def server():
    with serve(FakeAlpaca(now=EVENING)) as fake: yield fake
    assert not fake.problems, f"requests the real Alpaca API would refuse: {fake.problems}"

def settings_for(tmp_path, server, key=KEY, secret=SECRET, **alpaca):
    return load_settings({'TRADER_HOME': str(tmp_path), 'APCA_API_KEY_ID': key, 'APCA_API_SECRET_KEY': secret},
                         alpaca={'data_url': server.url if server else None, **alpaca})

def broker_for(tmp_path, server, timeout=5.0, **kw) -> AlpacaBroker:
    return AlpacaBroker(settings_for(tmp_path, server, **kw), url_override=server.url, timeout=timeout)

T1 = pd.Timestamp('2024-01-03 14:30', tz='UTC')   # 09:30 New York

# ---------------------------------------------------------------------------------------------------------------
# Orders, positions, account

def test_submit_get_positions_account(tmp_path, server):
    b = broker_for(tmp_path, server)
    assert isinstance(b, Broker) and b.name == 'alpaca-paper'
    o = b.submit(Order('run1-20240102-AAPL', 'AAPL', 'buy', 100, 'opg', reference_price=405.0, bar_ts=pd.Timestamp('2024-01-02', tz='UTC')))
    assert (o.status, o.order_type, o.qty, o.symbol, o.side, o.fill_price) == ('new', 'opg', 100.0, 'AAPL', 'buy', None)
    assert o.reference_price == 405.0 and o.bar_ts == pd.Timestamp('2024-01-02', tz='UTC')
    assert str(uuid.UUID(o.broker_order_id)) == o.broker_order_id
    # what went over the wire: a look-up of the id (not there yet), then one market-on-open order
    assert [(r.method, r.path, r.status) for r in server.requests] == [('GET', '/v2/orders:by_client_order_id', 404), ('POST', '/v2/orders', 200)]
    assert server.requests[0].params == {'client_order_id': 'run1-20240102-AAPL'}
    assert server.requests[1].body == {'symbol': 'AAPL', 'qty': 100.0, 'side': 'buy', 'type': 'market', 'time_in_force': 'opg',
                                       'client_order_id': 'run1-20240102-AAPL'}
    assert all(r.headers['APCA-API-KEY-ID'] == KEY and r.headers['APCA-API-SECRET-KEY'] == SECRET for r in server.requests)
    assert [x.client_order_id for x in b.open_orders()] == ['run1-20240102-AAPL']
    assert server.calls('GET', '/v2/orders')[-1].params == {'status': 'open', 'limit': '500', 'direction': 'asc'}
    assert b.positions() == {} and b.account().cash == 100_000.0

    server.open_session(T1, {'AAPL': 410.5})
    got = b.get_order('run1-20240102-AAPL')
    assert (got.status, got.fill_price, got.filled_ts, got.broker_order_id) == ('filled', 410.5, T1, o.broker_order_id)
    assert got.reference_price is None    # ours, not Alpaca's: only submit() knows it
    assert b.open_orders() == [] and b.positions() == {'AAPL': 100.0}
    server.close_session(T1 + pd.Timedelta(hours=6.5), {'AAPL': 412.0})
    acct = b.account()
    assert acct.cash == pytest.approx(100_000 - 100*410.5) and acct.equity == pytest.approx(100_000 - 100*410.5 + 100*412.0)
    assert b.get_order('never-sent') is None

def test_market_order_fills_at_once_in_the_session(tmp_path, server):
    b = broker_for(tmp_path, server)
    server.open_session(T1, {'MSFT': 26.5})
    o = b.submit(Order('guard-flatten-MSFT', 'MSFT', 'buy', 10, 'market'))
    assert server.posts()[0].body['time_in_force'] == 'day'
    assert o.status == 'new' and o.order_type == 'market'       # Alpaca answers pending_new, then fills
    assert b.get_order('guard-flatten-MSFT').status == 'filled' and b.positions() == {'MSFT': 10.0}
    s = b.submit(Order('guard-sell-MSFT', 'MSFT', 'sell', 4, 'market'))
    assert b.get_order(s.client_order_id).fill_price == 26.5 and b.positions() == {'MSFT': 6.0}

def test_positions_are_signed(tmp_path, server):
    server.positions = {'AAPL': [100.0, 41_000.0], 'MSFT': [-20.0, -520.0]}
    assert broker_for(tmp_path, server).positions() == {'AAPL': 100.0, 'MSFT': -20.0}

# ---------------------------------------------------------------------------------------------------------------
# Idempotency and reconciliation

def test_resubmitting_the_same_id_sends_nothing(tmp_path, server):
    b = broker_for(tmp_path, server)
    first = b.submit(Order('run1-20240102-AAPL', 'AAPL', 'buy', 100, 'opg'))
    again = b.submit(Order('run1-20240102-AAPL', 'AAPL', 'buy', 100, 'opg', reference_price=999.0))
    assert again.broker_order_id == first.broker_order_id and again.status == 'new'
    assert len(server.posts('run1-20240102-AAPL')) == 1 and len(server.orders) == 1
    b.submit(Order('run1-20240102-MSFT', 'MSFT', 'buy', 50, 'opg'))
    server.open_session(T1, {'AAPL': 410.0, 'MSFT': 26.0})
    for _ in range(3):                                        # a loop replaying its decision after the fills
        assert b.submit(Order('run1-20240102-AAPL', 'AAPL', 'buy', 100, 'opg')).status == 'filled'
        assert b.submit(Order('run1-20240102-MSFT', 'MSFT', 'buy', 50, 'opg')).status == 'filled'
    assert {cid: len(server.posts(cid)) for cid in ('run1-20240102-AAPL', 'run1-20240102-MSFT')} == {'run1-20240102-AAPL': 1, 'run1-20240102-MSFT': 1}
    assert b.positions() == {'AAPL': 100.0, 'MSFT': 50.0}

def test_reconciliation_after_a_crash(tmp_path, server):
    "Alpaca takes the order but the answer is lost; a restarted loop knows only the client_order_id."
    cid = 'run1-20240102-AAPL'
    server.faults = [None, 'accept-drop']       # the look-up is answered; the POST is accepted, then the connection drops
    with pytest.raises(BrokerUnavailable, match='may have reached Alpaca.*same client_order_id'):
        broker_for(tmp_path, server).submit(Order(cid, 'AAPL', 'buy', 100, 'opg'))
    assert len(server.orders) == 1
    restarted = broker_for(tmp_path, server)          # a new process: nothing in memory
    found = restarted.get_order(cid)
    assert (found.status, found.symbol, found.qty, found.side) == ('new', 'AAPL', 100.0, 'buy')
    assert restarted.submit(Order(cid, 'AAPL', 'buy', 100, 'opg')).broker_order_id == found.broker_order_id
    assert len(server.posts(cid)) == 1
    server.open_session(T1, {'AAPL': 410.0})
    assert restarted.get_order(cid).status == 'filled' and restarted.positions() == {'AAPL': 100.0}   # bought once, not twice

def test_duplicate_refusal_is_reconciled(tmp_path, server):
    "The look-up misses an order Alpaca already has; the post is refused with 422 and the existing order is adopted."
    b = broker_for(tmp_path, server)
    first = b.submit(Order('run1-20240102-IBM', 'IBM', 'buy', 10, 'opg'))
    server.lookup_lag = 1
    again = b.submit(Order('run1-20240102-IBM', 'IBM', 'buy', 10, 'opg'))
    assert again.broker_order_id == first.broker_order_id and len(server.orders) == 1
    assert [r.status for r in server.posts('run1-20240102-IBM')] == [200, 422]
    assert [(r.method, r.status) for r in server.requests[-3:]] == [('GET', 404), ('POST', 422), ('GET', 200)]

# ---------------------------------------------------------------------------------------------------------------
# Cancel

def test_cancel(tmp_path, server):
    b = broker_for(tmp_path, server)
    o = b.submit(Order('run1-20240102-AAPL', 'AAPL', 'buy', 10, 'opg'))
    assert b.cancel('run1-20240102-AAPL') is True
    assert [r.status for r in server.calls('DELETE', f'/v2/orders/{o.broker_order_id}')] == [204]
    assert b.get_order('run1-20240102-AAPL').status == 'canceled' and b.open_orders() == []
    n = len(server.requests)
    assert b.cancel('run1-20240102-AAPL') is False and b.cancel('never-sent') is False
    assert not [r for r in server.requests[n:] if r.method == 'DELETE']   # nothing to cancel: no DELETE sent
    b.submit(Order('run1-20240103-AAPL', 'AAPL', 'buy', 10, 'opg'))
    server.open_session(T1, {'AAPL': 410.0})
    assert b.cancel('run1-20240103-AAPL') is False and b.positions() == {'AAPL': 10.0}
    assert b.submit(Order('run1-20240102-AAPL', 'AAPL', 'buy', 10, 'opg')).status == 'canceled'   # a canceled id stays used

# ---------------------------------------------------------------------------------------------------------------
# Errors

def test_bad_credentials(tmp_path, server):
    b = broker_for(tmp_path, server, key='PKWRONGKEY0000000', secret='sk-wrong-9f8e7d6c5b4a')
    with pytest.raises(BrokerError) as e: b.account()
    assert not isinstance(e.value, BrokerUnavailable)
    msg = str(e.value)
    assert 'HTTP 401' in msg and 'request is not authorized' in msg and 'APCA_API_KEY_ID' in msg and 'APCA_API_SECRET_KEY' in msg
    assert 'sk-wrong-9f8e7d6c5b4a' not in msg and 'PKWRONGKEY0000000' not in msg

def test_insufficient_buying_power_and_shares(tmp_path, server):
    b = broker_for(tmp_path, server)
    with pytest.raises(BrokerError, match=r'HTTP 403: insufficient buying power \(buying_power 100000.00, cost_basis 410000.00\)') as e:
        b.submit(Order('run1-big', 'AAPL', 'buy', 1000, 'opg'))
    assert not isinstance(e.value, BrokerUnavailable) and 'run1-big' in str(e.value) and server.orders == {}
    with pytest.raises(BrokerError, match=r'HTTP 403: insufficient qty available for order \(requested: 5, available: 0\)'):
        b.submit(Order('run1-short', 'MSFT', 'sell', 5, 'opg'))

@pytest.mark.parametrize('order,expect', [
    (Order('bad-asset', 'ZZZZ', 'buy', 1, 'opg'), 'HTTP 422: asset "ZZZZ" not found'),
    (Order('x'*129, 'AAPL', 'buy', 1, 'opg'), 'HTTP 422: client_order_id must be no more than 128 characters'),
])
def test_invalid_orders(tmp_path, server, order, expect):
    with pytest.raises(BrokerError) as e: broker_for(tmp_path, server).submit(order)
    assert expect in str(e.value) and 'rejected the request as invalid' in str(e.value) and not isinstance(e.value, BrokerUnavailable)
    assert server.orders == {}

def test_invalid_quantity_is_refused_before_sending(tmp_path, server):
    b = broker_for(tmp_path, server)
    for qty in (0, -5, float('nan')):
        with pytest.raises(BrokerError, match='quantity must be positive'): b.submit(Order('bad-qty', 'AAPL', 'buy', qty, 'opg'))
    with pytest.raises(BrokerError, match='side must be buy or sell'): b.submit(Order('bad-side', 'AAPL', 'hold', 1, 'opg'))
    assert server.requests == []

@pytest.mark.parametrize('fault,expect', [(500, 'HTTP 500: internal server error'), (502, 'HTTP 502: bad gateway'),
                                          (503, 'HTTP 503: service unavailable'), (429, 'HTTP 429: rate limit exceeded'),
                                          ('drop', 'cannot reach'), ('hang', 'no answer')])
def test_outages_are_broker_unavailable(tmp_path, server, fault, expect):
    b = broker_for(tmp_path, server, timeout=0.3)
    server.faults = [fault]
    server.hang = 600.0     # 'hang': no answer for 10 minutes, so 'no answer' can only be the client's 0.3 s timeout
    with pytest.raises(BrokerUnavailable, match=expect): b.account()
    assert len(server.requests) == 1, server.requests                # alpaca-py's own retries are off
    assert b.account().cash == 100_000.0                               # and the next call works

def test_connection_refused_is_broker_unavailable(tmp_path):
    s = load_settings({'TRADER_HOME': str(tmp_path), 'APCA_API_KEY_ID': KEY, 'APCA_API_SECRET_KEY': SECRET})
    b = AlpacaBroker(s, url_override=f'http://127.0.0.1:{free_port()}', timeout=2)
    for call in (b.account, b.positions, b.open_orders, lambda: b.get_order('x'), lambda: b.cancel('x'),
                 lambda: b.submit(Order('run1-AAPL', 'AAPL', 'buy', 1))):
        with pytest.raises(BrokerUnavailable, match='cannot reach http://127.0.0.1'): call()

def test_submit_outage_on_post_says_resubmit(tmp_path, server):
    server.faults = [None, 503]
    with pytest.raises(BrokerUnavailable, match='HTTP 503.*may have reached Alpaca'):
        broker_for(tmp_path, server).submit(Order('run1-AAPL', 'AAPL', 'buy', 1, 'opg'))

def test_the_secret_never_appears(tmp_path, server, caplog):
    "Whatever fails, and however the error is shown (message, repr, full traceback), the keys are not in it."
    caplog.set_level(logging.DEBUG)
    texts = []
    def capture(fn):
        try: fn()
        except Exception as e:
            texts.append(''.join(traceback.format_exception(e)) + repr(e))
            return e
        raise AssertionError('expected a failure')
    b = broker_for(tmp_path, server, timeout=0.3)
    texts.append(repr(b))
    server.faults = ['echo', 'echo-text', None, 'echo', 500, 'hang', 'drop']
    assert isinstance(capture(b.account), BrokerUnavailable)
    assert isinstance(capture(lambda: b.get_order('x')), BrokerUnavailable)
    assert isinstance(capture(lambda: b.submit(Order('run1-AAPL', 'AAPL', 'buy', 1, 'opg'))), BrokerUnavailable)
    for fn in (b.positions, b.open_orders, b.account): capture(fn)
    capture(broker_for(tmp_path, server, secret=SECRET + 'x').account)            # 401 with a wrong secret
    feed = AlpacaFeed('AAPL', settings_for(tmp_path, server), timeframe='1Min')
    texts.append(repr(feed))
    server.faults = ['echo', 'echo-text']
    assert isinstance(capture(feed.next_bar), FeedError) and isinstance(capture(feed.next_bar), FeedError)
    assert sum('upstream failed for' in t and "'APCA-API-SECRET-KEY': '***'" in t for t in texts) == 3   # echoed, and masked
    assert sum('bad gateway: APCA-API-SECRET-KEY=*** APCA-API-KEY-ID=***' in t for t in texts) == 2
    for text in texts + [caplog.text]:
        assert SECRET not in text and KEY not in text

def test_paper_only_and_url_from_the_environment(tmp_path, server, monkeypatch):
    s = settings_for(tmp_path, server)
    with pytest.raises(ConfigError, match='paper only'): AlpacaBroker(s, url_override='https://api.alpaca.markets')
    monkeypatch.setenv('TRADER_ALPACA_TRADING_URL', 'https://api.alpaca.markets/')
    with pytest.raises(ConfigError, match='paper only'): AlpacaBroker(s)
    monkeypatch.setenv('TRADER_ALPACA_TRADING_URL', server.url)
    assert AlpacaBroker(s).account().equity == 100_000.0 and len(server.requests) == 1
    with pytest.raises(ConfigError, match='APCA_API_KEY_ID and APCA_API_SECRET_KEY'):
        AlpacaBroker(load_settings({'TRADER_HOME': str(tmp_path)}))

# ---------------------------------------------------------------------------------------------------------------
# AlpacaFeed

SAMPLE = load_sample(['AAPL', 'MSFT'], start='2012-01-03', end='2012-01-20', adjusted=False)[BAR_COLUMNS]

def sample_row(sym, day):
    r = SAMPLE[(SAMPLE.symbol == sym) & (SAMPLE.ts == pd.Timestamp(day, tz='UTC'))].iloc[0]
    return (r.open, r.high, r.low, r.close, r.volume)

@pytest.fixture
def clock():
    class Clock:
        t = ny('2012-01-05 11:00')
        def __call__(self): return self.t
    return Clock()

def daily_feed(tmp_path, server, clock, **kw):
    server.daily = alpaca_daily(SAMPLE)
    return AlpacaFeed('AAPL,MSFT', settings_for(tmp_path, server), clock=clock, **kw)

def test_daily_feed_returns_final_bars_once(tmp_path, server, clock):
    feed = daily_feed(tmp_path, server, clock)
    assert isinstance(feed, Feed)
    b = feed.next_bar()                     # 11:00 on 01-05: today's bar is still forming; 01-04 is the latest final one
    assert isinstance(b, BarSet) and b.source == 'alpaca' and not b.stale
    assert b.ts == pd.Timestamp('2012-01-04', tz='UTC') and b.symbols == ('AAPL', 'MSFT')
    for i, sym in enumerate(b.symbols):
        assert (b.open[i], b.high[i], b.low[i], b.close[i], b.volume[i]) == sample_row(sym, '2012-01-04')
    r = server.calls('GET', '/v2/stocks/bars')[-1]
    end = pd.Timestamp(dt.datetime.fromisoformat(r.params['end']))
    assert r.params['symbols'] == 'AAPL,MSFT' and r.params['timeframe'] == '1Day' and r.params['adjustment'] == 'raw'
    assert end == clock.t - pd.Timedelta(minutes=15) and pd.Timestamp(dt.datetime.fromisoformat(r.params['start'])) == end - pd.Timedelta(days=10)
    assert feed.next_bar() is None                     # nothing new
    clock.t = ny('2012-01-05 16:10')
    assert feed.next_bar() is None                     # closed, but not settled yet
    clock.t = ny('2012-01-05 18:59')
    assert feed.next_bar() is None                     # final, but Alpaca would refuse opg orders decided on it until 19:00
    clock.t = ny('2012-01-05 19:00')
    assert feed.next_bar().ts == pd.Timestamp('2012-01-05', tz='UTC')
    clock.t = ny('2012-01-09 19:30')                   # Monday: Friday's and Monday's bars are final; the latest comes
    b = feed.next_bar()
    assert b.ts == pd.Timestamp('2012-01-09', tz='UTC') and b.prices() == {s: sample_row(s, '2012-01-09')[3] for s in b.symbols}
    assert feed.next_bar() is None

def test_daily_feed_needs_every_symbol_at_one_time(tmp_path, server, clock):
    feed = daily_feed(tmp_path, server, clock)
    server.daily['MSFT'] = [x for x in server.daily['MSFT'] if not x['t'].startswith('2012-01-04')]
    assert feed.next_bar() is None                     # MSFT's latest final bar is 01-03, AAPL's 01-04
    clock.t = ny('2012-01-05 19:00')
    assert feed.next_bar().ts == pd.Timestamp('2012-01-05', tz='UTC')

def test_daily_feed_resumes_after(tmp_path, server, clock):
    clock.t = ny('2012-01-06 20:00')
    assert daily_feed(tmp_path, server, clock, after='2012-01-06').next_bar() is None
    assert daily_feed(tmp_path, server, clock, after='2012-01-05').next_bar().ts == pd.Timestamp('2012-01-06', tz='UTC')

def test_daily_feed_on_a_free_plan(tmp_path, server, clock):
    "A free plan may not query the last 15 minutes of SIP data; the feed's `end` stays out of them."
    server.free_plan, server.now = True, clock.t
    assert daily_feed(tmp_path, server, clock).next_bar().ts == pd.Timestamp('2012-01-04', tz='UTC')
    with pytest.raises(FeedError, match="HTTP 403: subscription does not permit querying recent SIP data.*feed = 'iex'"):
        daily_feed(tmp_path, server, clock, settle=0).next_bar()

def minute_bar(t, c): return {'t': t, 'o': c - 0.1, 'h': c + 0.2, 'l': c - 0.3, 'c': c, 'v': 1200, 'n': 31, 'vw': c}

def test_minute_feed_uses_the_latest_bars(tmp_path, server):
    server.latest = {'AAPL': minute_bar('2024-01-02T15:31:00Z', 185.5), 'MSFT': minute_bar('2024-01-02T15:31:00Z', 370.25)}
    feed = AlpacaFeed(['msft', 'aapl'], settings_for(tmp_path, server, feed='iex'), timeframe='1Min')
    b = feed.next_bar()
    assert b.ts == pd.Timestamp('2024-01-02T15:31:00Z') and b.symbols == ('MSFT', 'AAPL') and b.close == (370.25, 185.5)
    assert b.open == (370.25 - 0.1, 185.5 - 0.1) and b.volume == (1200.0, 1200.0)
    r = server.calls('GET', '/v2/stocks/bars/latest')[-1]
    assert r.params == {'symbols': 'MSFT,AAPL', 'feed': 'iex'}
    assert feed.next_bar() is None
    server.latest['AAPL'] = minute_bar('2024-01-02T15:32:00Z', 185.7)
    assert feed.next_bar() is None                     # MSFT has no 15:32 bar yet
    server.latest['MSFT'] = minute_bar('2024-01-02T15:32:00Z', 370.0)
    assert feed.next_bar().prices() == {'MSFT': 370.0, 'AAPL': 185.7}
    del server.latest['MSFT']
    assert feed.next_bar() is None                     # no bar at all for a symbol

@pytest.mark.parametrize('fault,expect', [(401, 'HTTP 401: request is not authorized.*APCA_API_KEY_ID'), (500, 'HTTP 500'),
                                          ('drop', 'cannot reach'), ('echo', 'HTTP 500: upstream failed'), ('echo-text', 'HTTP 502')])
def test_feed_failures_are_feed_errors(tmp_path, server, clock, fault, expect):
    feed = daily_feed(tmp_path, server, clock)
    server.faults = [fault]
    with pytest.raises(FeedError, match=expect) as e: feed.next_bar()
    assert SECRET not in str(e.value)
    assert feed.next_bar().ts == pd.Timestamp('2012-01-04', tz='UTC')   # and the next poll works

def test_feed_connection_refused_and_resilient_fallback(tmp_path, clock):
    s = load_settings({'TRADER_HOME': str(tmp_path), 'APCA_API_KEY_ID': KEY, 'APCA_API_SECRET_KEY': SECRET},
                      alpaca={'data_url': f'http://127.0.0.1:{free_port()}'})
    feed = AlpacaFeed('AAPL', s, clock=clock, timeout=2)
    with pytest.raises(FeedError, match='cannot reach'): feed.next_bar()
    rf = ResilientFeed(feed, cache=None)
    assert rf.next_bar() is None and rf.state == 'down' and 'cannot reach' in rf.last_error

# ---------------------------------------------------------------------------------------------------------------
# Alpaca's order rules: sizes, the opg window, partial fills, expiries, duplicates by code, pagination

def test_fractional_opg_is_refused_before_sending(tmp_path, server):
    b = broker_for(tmp_path, server)
    with pytest.raises(BrokerError, match='fractional quantities on DAY orders only, so an opg .* must be whole shares') as e:
        b.submit(Order('run1-frac', 'AAPL', 'buy', 184.10555385087451, 'opg'))
    assert not isinstance(e.value, BrokerUnavailable) and server.requests == []
    # what Alpaca itself says to such an order (sent past the broker's check): 422, code 42210000
    from alpaca.common.exceptions import APIError
    from alpaca.trading.requests import MarketOrderRequest
    with pytest.raises(APIError) as e:
        b.client.submit_order(MarketOrderRequest(symbol='AAPL', qty=1.5, side='buy', time_in_force='opg', client_order_id='raw-frac'))
    assert e.value.status_code == 422 and json.loads(str(e.value)) == {'code': 42210000, 'message': 'fractional orders must be DAY orders'}

def test_fractional_day_order_goes_with_9_decimals(tmp_path, server):
    b = broker_for(tmp_path, server)
    server.open_session(T1, {'AAPL': 100.0})
    o = b.submit(Order('run1-day', 'AAPL', 'buy', 184.10555385087451, 'market'))
    assert server.posts()[0].body['qty'] == 184.105553851 and server.posts()[0].body['time_in_force'] == 'day'
    got = b.get_order('run1-day')
    assert (got.status, got.qty, got.filled_qty, got.fill_price) == ('filled', 184.105553851, 184.105553851, 100.0)
    assert b.positions() == {'AAPL': 184.105553851} and b.account().cash == pytest.approx(100_000 - 18_410.5553851)
    assert o.order_type == 'market'

def test_opg_orders_only_outside_the_auction_window(tmp_path, server):
    "Alpaca refuses opg orders submitted between 09:28 and 19:00 New York time."
    b = broker_for(tmp_path, server)
    server.now = ny('2024-01-03 10:00')
    with pytest.raises(BrokerError, match='HTTP 422: opg orders are not accepted between 9:28am and 7:00pm ET'):
        b.submit(Order('run1-late', 'AAPL', 'buy', 1, 'opg'))
    server.now = ny('2024-01-03 09:27')
    assert b.submit(Order('run1-early', 'AAPL', 'buy', 1, 'opg')).status == 'new'

def test_partial_fill_then_expiry_books_what_filled(tmp_path, server):
    "An opg order filled 60 of 100 in the auction, the rest expires; a DAY order part-filled expires at the close."
    b = broker_for(tmp_path, server)
    server.fill_share = lambda o: 0.6 if o['client_order_id'].endswith('AAPL') else 0.25
    b.submit(Order('run1-d1-AAPL', 'AAPL', 'buy', 100, 'opg'))
    b.submit(Order('run1-d1-MSFT', 'MSFT', 'buy', 10.5, 'market'))       # a DAY order sent overnight: queued for the open
    server.open_session(T1, {'AAPL': 400.0, 'MSFT': 26.0})
    a, m = b.get_order('run1-d1-AAPL'), b.get_order('run1-d1-MSFT')
    assert (a.status, a.qty, a.filled_qty, a.fill_price) == ('expired', 100.0, 60.0, 400.0)
    assert (m.status, m.filled_qty, m.fill_price) == ('partially_filled', 2.625, 26.0)
    assert [o.client_order_id for o in b.open_orders()] == ['run1-d1-MSFT']
    server.close_session(T1 + pd.Timedelta(hours=6.5), {'AAPL': 401.0, 'MSFT': 26.5})
    m = b.get_order('run1-d1-MSFT')
    assert (m.status, m.filled_qty, m.fill_price) == ('expired', 2.625, 26.0) and b.open_orders() == []
    assert b.positions() == {'AAPL': 60.0, 'MSFT': 2.625}
    assert b.account().cash == pytest.approx(100_000 - 60*400.0 - 2.625*26.0)

def test_partial_fill_then_cancel(tmp_path, server):
    b = broker_for(tmp_path, server)
    server.open_session(T1, {'MSFT': 26.0})
    server.fill_share = lambda o: 0.5
    b.submit(Order('run1-part', 'MSFT', 'buy', 40, 'market'))
    assert b.get_order('run1-part').status == 'partially_filled'
    assert b.cancel('run1-part') is True
    c = b.get_order('run1-part')
    assert (c.status, c.filled_qty, c.fill_price) == ('canceled', 20.0, 26.0) and b.positions() == {'MSFT': 20.0}
    assert b.cancel('run1-part') is False

def test_average_price_of_fills(tmp_path, server):
    "A DAY order filled in two parts at two prices reports their weighted average."
    b = broker_for(tmp_path, server)
    server.fill_share = lambda o: 0.25
    b.submit(Order('run1-avg', 'IBM', 'buy', 8, 'market'))
    server.open_session(T1, {'IBM': 100.0})                   # 2 of 8 at 100
    server.fill_share, server.prices['IBM'] = None, 110.0
    with server._lock: server._fill(server.by_cid('run1-avg'), 6.0, 110.0, T1 + pd.Timedelta(hours=1))   # the other 6 at 110
    got = b.get_order('run1-avg')
    assert (got.status, got.filled_qty) == ('filled', 8.0) and got.fill_price == pytest.approx((2*100 + 6*110)/8)

def test_duplicate_recognised_by_code_not_text(tmp_path, server):
    b = broker_for(tmp_path, server)
    first = b.submit(Order('run1-dup', 'IBM', 'buy', 1, 'opg'))
    server.lookup_lag = 1                                     # the look-up misses it; the post is refused, reworded
    server.faults = [None, (422, {'code': 40010001, 'message': 'an order with this id exists (reworded)'})]
    assert b.submit(Order('run1-dup', 'IBM', 'buy', 1, 'opg')).broker_order_id == first.broker_order_id
    # the same code for another reason (no order has the id): Alpaca's refusal is raised, nothing is adopted
    server.faults = [None, (422, {'code': 40010001, 'message': 'qty is required'})]
    with pytest.raises(BrokerError, match='HTTP 422: qty is required.*rejected the request as invalid'):
        b.submit(Order('run1-other', 'IBM', 'buy', 1, 'opg'))
    # the words without the code are not a duplicate either
    server.lookup_lag = 1
    server.faults = [None, (422, {'code': 42210000, 'message': 'client_order_id must be unique'})]
    with pytest.raises(BrokerError, match='HTTP 422: client_order_id must be unique'):
        b.submit(Order('run1-dup', 'IBM', 'buy', 1, 'opg'))
    assert len([o for o in server.orders.values() if o['client_order_id'] == 'run1-dup']) == 1

def test_orders_page_through_a_large_account(tmp_path, server):
    "1,234 orders of another strategy, then ours: `orders(since)` reads after `since`, 500 a page, until done."
    b = broker_for(tmp_path, server)
    t0 = pd.Timestamp('2024-01-02 15:00', tz='UTC')
    server.add_orders(1234, t0)
    server.now = ny('2024-01-03 20:00')
    b.submit(Order('run1-ours', 'AAPL', 'buy', 1, 'opg'))
    n = len(server.requests)
    everything = b.orders()
    assert len(everything) == 1235 and everything[-1].client_order_id == 'run1-ours'
    assert len({o.broker_order_id for o in everything}) == 1235
    lists = [r.params for r in server.requests[n:]]
    assert len(lists) == 3 and all(p['status'] == 'all' and p['limit'] == '500' and p['direction'] == 'asc' for p in lists)
    assert 'after' not in lists[0] and pd.Timestamp(lists[1]['after']) < pd.Timestamp(lists[2]['after'])
    since = t0 + pd.Timedelta(minutes=1000)                   # reconciliation: only what came after the last committed bar
    n = len(server.requests)
    recent = b.orders(since)
    assert [o.client_order_id for o in recent][-1] == 'run1-ours' and len(recent) == 1234 - 1001 + 1
    assert pd.Timestamp(server.requests[n].params['after']) == since and len(server.requests) - n == 1

def test_orders_at_one_instant_across_a_page_boundary(tmp_path, server):
    b = broker_for(tmp_path, server)
    t0 = pd.Timestamp('2024-01-02 15:00', tz='UTC')
    server.add_orders(499, t0)
    server.add_orders(10, t0 + pd.Timedelta(minutes=499), step=pd.Timedelta(0))      # 10 orders submitted at the same instant
    got = b.orders()
    assert len(got) == 509 and len({o.broker_order_id for o in got}) == 509
    server.add_orders(501, t0 + pd.Timedelta(days=1), step=pd.Timedelta(0), prefix='burst')
    with pytest.raises(BrokerError, match='more than 500 orders submitted at .*cannot page past them'): b.orders()

def test_open_orders_page_too(tmp_path, server):
    b = broker_for(tmp_path, server)
    server.add_orders(730, pd.Timestamp('2024-01-02 15:00', tz='UTC'), status='accepted')
    assert len(b.open_orders()) == 730 and len(server.calls('GET', '/v2/orders')) == 2

def test_forbidden_and_rate_limited_bodies(tmp_path, server):
    b = broker_for(tmp_path, server)
    server.faults = [403]
    with pytest.raises(BrokerError, match='HTTP 403: forbidden.*APCA_API_KEY_ID') as e: b.account()
    assert not isinstance(e.value, BrokerUnavailable)
    server.faults = [429]
    with pytest.raises(BrokerUnavailable, match='HTTP 429: rate limit exceeded'): b.positions()

def test_a_split_changes_positions_at_the_open(tmp_path, server):
    b = broker_for(tmp_path, server)
    server.positions = {'AAPL': [10.0, 4000.0]}
    server.actions = [{'type': 'forward_split', 'symbol': 'AAPL', 'ex_date': '2024-01-03', 'new_rate': 4.0, 'old_rate': 1.0}]
    server.open_session(T1, {'AAPL': 100.0})
    assert b.positions() == {'AAPL': 40.0} and b.account().equity == pytest.approx(100_000 + 40*100.0)

# ---------------------------------------------------------------------------------------------------------------
# The minute feed: regular sessions only

@pytest.mark.parametrize('t,kept', [('2024-01-02T14:29:00Z', False),    # 09:29 New York: pre-market
                                    ('2024-01-02T14:30:00Z', True),     # 09:30: the open
                                    ('2024-01-02T20:59:00Z', True),     # 15:59: the last regular minute
                                    ('2024-01-02T21:00:00Z', False),    # 16:00: after hours
                                    ('2024-07-03T17:05:00Z', False),    # 13:05 on a half day (closed at 13:00)
                                    ('2024-07-03T16:59:00Z', True),     # 12:59 on the half day
                                    ('2024-07-04T15:00:00Z', False),    # Independence Day
                                    ('2024-01-06T15:00:00Z', False)])   # a Saturday
def test_minute_feed_keeps_regular_session_bars_only(tmp_path, server, t, kept):
    server.latest = {'AAPL': minute_bar(t, 185.5)}
    b = AlpacaFeed('AAPL', settings_for(tmp_path, server), timeframe='1Min').next_bar()
    assert (b is not None) == kept and (b is None or b.ts == pd.Timestamp(t))

# ---------------------------------------------------------------------------------------------------------------
# Corporate actions: history on the live basis; bars paginate

JULY = load_sample(['AAPL', 'MSFT'], start='2012-06-01', end='2012-07-13')[BAR_COLUMNS]
SPLIT = pd.Timestamp('2012-07-02', tz='UTC')        # a synthetic 2:1 split of AAPL on the first session after the stored history

def split_market(server):
    "Alpaca's raw bars with AAPL split 2:1 from 2012-07-02 (prices halved, volume doubled), and the split in corporate actions."
    raw = JULY.copy()
    m = (raw.symbol == 'AAPL') & (raw.ts >= SPLIT)
    raw.loc[m, ['open', 'high', 'low', 'close']] /= 2
    raw.loc[m, 'volume'] *= 2
    server.daily = alpaca_daily(raw)
    server.actions = [{'type': 'forward_split', 'symbol': 'AAPL', 'ex_date': '2012-07-02', 'new_rate': 2.0, 'old_rate': 1.0}]
    return raw

def test_history_is_rebased_through_a_split(tmp_path, server):
    from trader.core.quality import DataQualityGate
    from trader.core.store import Store
    from trader.live.feeds import feed_history
    split_market(server)
    store = Store(f'sqlite:///{tmp_path}/s.db')
    store.ingest(DataQualityGate().check(JULY[JULY.ts < SPLIT], source='sample'))        # the stored history ends 2012-06-29
    server.now = ny('2012-07-05 20:00')
    feed = AlpacaFeed('AAPL,MSFT', settings_for(tmp_path, server), clock=lambda: server.now)
    first_live = feed.next_bar()
    assert first_live.ts == pd.Timestamp('2012-07-05', tz='UTC')
    h = feed_history(ResilientFeed(feed, None), store, ('AAPL', 'MSFT'), end=pd.Timestamp('2012-07-03', tz='UTC'))
    aapl = h[h.symbol == 'AAPL'].set_index('ts').close
    assert aapl.index[-1] == pd.Timestamp('2012-07-03', tz='UTC')     # 07-02 and 07-03 came from Alpaca (not in the store)
    want = JULY[(JULY.symbol == 'AAPL') & (JULY.ts <= '2012-07-03')].set_index('ts').close/2
    assert (aapl - want).abs().max() < 1e-9                            # all of it on the post-split basis
    closes = list(aapl) + [first_live.prices()['AAPL']]
    assert max(abs(b/a - 1) for a, b in zip(closes, closes[1:])) < 0.1  # no 50% "move" anywhere, first live bar included
    report = DataQualityGate().check(h, source='alpaca')
    assert not report.blocked and [c.name for c in report.checks if not (c.passed or c.skipped)] == []
    naive = pd.concat([store.read_bars(('AAPL', 'MSFT')), h[h.ts > '2012-06-29']]).sort_values(['symbol', 'ts'], ignore_index=True)
    assert [c.name for c in DataQualityGate().check(naive, source='alpaca').checks if not (c.passed or c.skipped)] != []   # a split flagged
    assert h[h.symbol == 'MSFT'].close.tolist() == JULY[(JULY.symbol == 'MSFT') & (JULY.ts <= '2012-07-03')].close.tolist()
    ca = server.calls('GET', '/v1/corporate-actions')[-1].params
    assert (ca['symbols'], ca['start'], ca['end']) == ('AAPL,MSFT', '2012-06-30', '2012-07-05') and 'forward_split' in ca['types']
    # without the re-basing, the stored bars and the first live bar are 50% apart
    stored = store.read_bars('AAPL').close.iloc[-1]
    assert first_live.prices()['AAPL']/stored < 0.55

def test_bars_paginate_with_page_tokens(tmp_path, server):
    from trader.core.data import alpaca_bars
    split_market(server)
    server.bars_page, server.now = 7, ny('2012-07-20 20:00')
    df = alpaca_bars('AAPL,MSFT', '2012-06-01', '2012-07-13', adjustment='split', settings=settings_for(tmp_path, server))
    calls = server.calls('GET', '/v2/stocks/bars')
    assert len(calls) == -(-len(JULY)//7) and 'page_token' not in calls[0].params and all('page_token' in c.params for c in calls[1:])
    assert len(df) == len(JULY)
    got = df[df.symbol == 'AAPL'].close.to_numpy()
    assert abs(got - JULY[JULY.symbol == 'AAPL'].close.to_numpy()/2).max() < 1e-9     # adjustment='split': the whole range on today's basis
