"""Contract test of `AlpacaBroker` and `AlpacaFeed` (`trader.live.alpaca`, nbs/19a_alpaca.ipynb).

Nothing here reaches Alpaca. A stateful HTTP server on 127.0.0.1 (a free port, one per test) speaks the documented
shapes of Alpaca's trading API v2 (POST/GET /v2/orders, GET /v2/orders:by_client_order_id, DELETE /v2/orders/{id},
GET /v2/positions, GET /v2/account) and market-data API v2 (GET /v2/stocks/bars/latest, GET /v2/stocks/bars), and is
strict the way Alpaca is:

* every request must carry the key id and secret in APCA-API-KEY-ID / APCA-API-SECRET-KEY, else 401;
* a second order with a client_order_id it already has is refused with 422 "client_order_id must be unique";
* orders are validated (side, time in force, qty > 0, fractional qty only for DAY orders, known asset, id length)
  and checked against buying power and the shares held (403, with Alpaca's error bodies);
* an `opg` order waits ('accepted') until the test opens a session (`open_session`), then fills at the open and moves
  cash and positions; a `day` market order sent while the market is open fills at once;
* a filled or canceled order cannot be canceled (422); cancel answers 204;
* on a free plan, SIP data of the last 15 minutes is refused (403), as Alpaca does.

It fails on purpose when a test asks (HTTP statuses, dropped connections, an accepted order whose answer is lost, a
server that hangs, error bodies that echo the request headers with the secret), and it records every request, so the tests
can count what alpaca-py sent. Requests the real API would refuse as malformed (unknown paths or parameters, missing
fields) are collected in `problems`, which must be empty at the end of each test.
"""
from __future__ import annotations
import datetime as dt, json, logging, threading, time, traceback, uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pandas as pd, pytest
from conftest import free_port, loopback_server

from trader.live.alpaca import AlpacaBroker, AlpacaFeed
from trader.live.broker import Broker, BrokerError, BrokerUnavailable, Order
from trader.core.config import ConfigError, load_settings
from trader.core.data import BAR_COLUMNS, load_sample
from trader.live.feeds import BarSet, Feed, FeedError, ResilientFeed

KEY = 'PKTEST7Q2L9XC4VB0N'
SECRET = 'sk-test-Zq8f3T1vR6yW2uP0aN5m'   # distinctive: a leak cannot be mistaken for ordinary words
NY = 'America/New_York'
ASSETS = {'AAPL': 'NASDAQ', 'MSFT': 'NASDAQ', 'IBM': 'NYSE'}

# ---------------------------------------------------------------------------------------------------------------
# The fake Alpaca

ERRORS = {   # Alpaca's error bodies: JSON with a code and a message
    401: {'code': 40110000, 'message': 'request is not authorized'},
    404: {'code': 40410000, 'message': 'order not found'},
    429: {'code': 42910000, 'message': 'rate limit exceeded'},
    500: {'code': 50010000, 'message': 'internal server error'},
    502: {'message': 'bad gateway'},
    503: {'message': 'service unavailable'},
}
ORDER_FIELDS = {'symbol', 'qty', 'notional', 'side', 'type', 'time_in_force', 'limit_price', 'stop_price', 'trail_price',
                'trail_percent', 'extended_hours', 'client_order_id', 'order_class', 'take_profit', 'stop_loss', 'position_intent', 'legs'}
LIST_PARAMS = {'status', 'limit', 'after', 'until', 'direction', 'nested', 'side', 'symbols'}
BARS_PARAMS = {'symbols', 'timeframe', 'start', 'end', 'limit', 'page_token', 'adjustment', 'feed', 'sort', 'asof', 'currency'}
FINISHED = {'filled', 'canceled', 'expired', 'rejected', 'replaced'}

def iso(t) -> str: return pd.Timestamp(t).tz_convert('UTC').strftime('%Y-%m-%dT%H:%M:%S.%fZ')

@dataclass
class Seen:
    "One request as the server received it, and the status it answered."
    method: str
    path: str
    params: dict[str, str]
    body: dict | None
    headers: dict[str, str]
    status: int | None = None

@dataclass
class FakeAlpaca:
    key: str = KEY
    secret: str = SECRET
    cash: float = 100_000.0
    prices: dict[str, float] = field(default_factory=lambda: {'AAPL': 410.0, 'MSFT': 26.0, 'IBM': 180.0})
    market_open: bool = False
    now: pd.Timestamp = field(default_factory=lambda: pd.Timestamp.now(tz='UTC'))   # the server's clock (free-plan SIP rule)
    free_plan: bool = False
    orders: dict[str, dict] = field(default_factory=dict)        # id -> order JSON
    positions: dict[str, list[float]] = field(default_factory=dict)   # symbol -> [signed qty, cost basis]
    latest: dict[str, dict] = field(default_factory=dict)        # symbol -> latest minute bar
    daily: dict[str, list[dict]] = field(default_factory=dict)   # symbol -> daily bars
    faults: list = field(default_factory=list)   # one per request, consumed in order: None, an HTTP status, 'drop',
                                                 # 'hang', 'echo' or 'accept-drop' (POST /v2/orders: accept, then hang up)
    lookup_lag: int = 0       # answer this many coming by_client_order_id look-ups with 404 (the order not yet visible)
    hang: float = 0.6
    requests: list[Seen] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    url: str = ''

    def __post_init__(self): self._lock = threading.Lock()

    def posts(self, cid=None) -> list[Seen]:
        return [r for r in self.requests if r.method == 'POST' and (cid is None or (r.body or {}).get('client_order_id') == cid)]
    def calls(self, method, path) -> list[Seen]:
        return [r for r in self.requests if r.method == method and r.path == path]

    # -- the market, driven by the tests ---------------------------------------------------------------------
    def _fill(self, o:dict, price:float, t):
        q = float(o['qty']) * (1 if o['side'] == 'buy' else -1)
        self.cash -= q*price
        pos = self.positions.setdefault(o['symbol'], [0.0, 0.0])
        pos[1] = pos[1] + q*price if pos[0]*q >= 0 else pos[1]*(pos[0] + q)/pos[0]   # cost basis of what is left
        pos[0] += q
        if pos[0] == 0: del self.positions[o['symbol']]
        o.update(status='filled', filled_qty=o['qty'], filled_avg_price=f'{price:.4f}', filled_at=iso(t), updated_at=iso(t))

    def open_session(self, t, opens:dict[str, float]):
        "The session opens: opg orders (and day orders queued overnight) fill at the open."
        with self._lock:
            self.market_open, self.prices = True, {**self.prices, **opens}
            for o in sorted(self.orders.values(), key=lambda o: o['submitted_at']):
                if o['status'] == 'accepted': self._fill(o, opens[o['symbol']], t)

    def close_session(self, t, closes:dict[str, float]):
        with self._lock:
            self.market_open, self.prices = False, {**self.prices, **closes}
            for o in self.orders.values():    # a day order not filled in the session expires
                if o['status'] in ('new', 'pending_new') and o['time_in_force'] == 'day':
                    o.update(status='expired', expired_at=iso(t), updated_at=iso(t))

    # -- HTTP ----------------------------------------------------------------------------------------------------
    def handle(self, h:BaseHTTPRequestHandler, method:str):
        u = urlsplit(h.path)
        q = parse_qs(u.query, keep_blank_values=True)
        n = int(h.headers.get('Content-Length') or 0)
        raw = h.rfile.read(n) if n else b''
        body = None
        if raw:
            try: body = json.loads(raw)
            except ValueError: self.problems.append(f'{method} {u.path}: body is not JSON')
        seen = Seen(method, u.path, {k: v[-1] for k, v in q.items()}, body, dict(h.headers))
        with self._lock:
            self.requests.append(seen)
            fault = self.faults.pop(0) if self.faults else None
        if fault == 'hang':
            time.sleep(self.hang); h.close_connection = True; return
        if fault == 'drop':
            h.close_connection = True; return
        if fault == 'echo':        # a careless gateway: Alpaca-style JSON whose message quotes the request headers
            return self._send(h, seen, 500, {'message': f'upstream failed for {dict(h.headers)}'})
        if fault == 'echo-text':   # the same as plain text, secret first
            return self._send(h, seen, 502, f"bad gateway: APCA-API-SECRET-KEY={h.headers.get('APCA-API-SECRET-KEY')} "
                                            f"APCA-API-KEY-ID={h.headers.get('APCA-API-KEY-ID')}")
        if isinstance(fault, int): return self._send(h, seen, fault, ERRORS[fault])
        if h.headers.get('APCA-API-KEY-ID') != self.key or h.headers.get('APCA-API-SECRET-KEY') != self.secret:
            return self._send(h, seen, 401, ERRORS[401])
        if not h.headers.get('User-Agent', '').startswith('APCA-PY/'): self.problems.append(f'{method} {u.path}: not alpaca-py')
        with self._lock:
            status, out = self._route(method, u.path, q, body)
            if fault == 'accept-drop' and status == 200 and method == 'POST':
                h.close_connection = True; seen.status = 200; return
        self._send(h, seen, status, out)

    def _bad(self, what:str, status:int=422, code:int=40010001):
        self.problems.append(what)
        return status, {'code': code, 'message': what}

    def _route(self, method, path, q, body):
        if any(len(v) > 1 for v in q.values()): return self._bad(f'repeated query parameter in {path}', 400)
        p = {k: v[0] for k, v in q.items()}
        if (method, path) == ('POST', '/v2/orders'): return self._create(body or {})
        if (method, path) == ('GET', '/v2/orders'): return self._list(p)
        if (method, path) == ('GET', '/v2/orders:by_client_order_id'):
            if set(p) != {'client_order_id'}: return self._bad(f'by_client_order_id takes client_order_id only, got {sorted(p)}')
            if self.lookup_lag > 0:
                self.lookup_lag -= 1; return 404, ERRORS[404]
            o = next((o for o in self.orders.values() if o['client_order_id'] == p['client_order_id']), None)
            return (200, o) if o else (404, ERRORS[404])
        if path.startswith('/v2/orders/') and method in ('GET', 'DELETE'):
            oid = path.rsplit('/', 1)[1]
            try: uuid.UUID(oid)
            except ValueError: return self._bad(f'order_id {oid!r} is not a UUID', 422, 40010001)
            o = self.orders.get(oid)
            if o is None: return 404, ERRORS[404]
            if method == 'GET': return 200, o
            if o['status'] in FINISHED: return 422, {'code': 42210000, 'message': f'order is already in "{o["status"]}" state'}
            o.update(status='canceled', canceled_at=iso(pd.Timestamp.now(tz='UTC')), updated_at=iso(pd.Timestamp.now(tz='UTC')))
            return 204, None
        if (method, path) == ('GET', '/v2/positions'):
            if p: return self._bad(f'positions takes no parameters, got {sorted(p)}', 400)
            return 200, [self._position(s, q_, c) for s, (q_, c) in sorted(self.positions.items())]
        if (method, path) == ('GET', '/v2/account'):
            if p: return self._bad(f'account takes no parameters, got {sorted(p)}', 400)
            return 200, self._account()
        if (method, path) == ('GET', '/v2/stocks/bars/latest'): return self._latest(p)
        if (method, path) == ('GET', '/v2/stocks/bars'): return self._bars(p)
        return self._bad(f'no such endpoint: {method} {path}', 404, 40410000)

    def _create(self, b:dict):
        if set(b) - ORDER_FIELDS: return self._bad(f'unknown order fields {sorted(set(b) - ORDER_FIELDS)}')
        missing = {'symbol', 'side', 'type', 'time_in_force'} - set(b)
        if missing or ('qty' in b) == ('notional' in b): return self._bad(f'order fields missing: {sorted(missing) or "qty or notional"}')
        if b['type'] != 'market': return self._bad(f"this server takes market orders only, got {b['type']!r}")
        if b['side'] not in ('buy', 'sell'): return 422, {'code': 42210000, 'message': 'invalid side'}
        if b['time_in_force'] not in ('day', 'gtc', 'opg', 'cls', 'ioc', 'fok'): return 422, {'code': 42210000, 'message': 'invalid time_in_force'}
        try: qty = float(b['qty'])
        except (TypeError, ValueError): return 422, {'code': 40010001, 'message': 'qty must be a number'}
        if qty <= 0: return 422, {'code': 40010001, 'message': 'qty must be > 0'}
        if b['symbol'] not in ASSETS: return 422, {'code': 40010001, 'message': f'asset "{b["symbol"]}" not found'}
        if qty != int(qty) and b['time_in_force'] != 'day': return 422, {'code': 42210000, 'message': 'fractional orders must be DAY orders'}
        cid = b.get('client_order_id') or str(uuid.uuid4())
        if len(cid) > 128: return 422, {'code': 40010001, 'message': 'client_order_id must be no more than 128 characters'}
        if any(o['client_order_id'] == cid for o in self.orders.values()):
            return 422, {'code': 40010001, 'message': 'client_order_id must be unique'}
        opens = [o for o in self.orders.values() if o['status'] not in FINISHED]
        price = self.prices[b['symbol']]
        if b['side'] == 'buy':
            bp = self.cash - sum(float(o['qty'])*self.prices[o['symbol']] for o in opens if o['side'] == 'buy')
            if qty*price > bp:
                return 403, {'buying_power': f'{bp:.2f}', 'code': 40310000, 'cost_basis': f'{qty*price:.2f}', 'message': 'insufficient buying power'}
        else:
            held = self.positions.get(b['symbol'], [0.0])[0]
            pending = sum(float(o['qty']) for o in opens if o['side'] == 'sell' and o['symbol'] == b['symbol'])
            if qty > held - pending:
                return 403, {'code': 40310000, 'existing_qty': f'{held:g}', 'held_for_orders': f'{pending:g}',
                             'message': f'insufficient qty available for order (requested: {qty:g}, available: {held - pending:g})'}
        t = iso(pd.Timestamp.now(tz='UTC'))
        o = {'id': str(uuid.uuid4()), 'client_order_id': cid, 'created_at': t, 'updated_at': t, 'submitted_at': t,
             'filled_at': None, 'expired_at': None, 'canceled_at': None, 'failed_at': None, 'replaced_at': None,
             'replaced_by': None, 'replaces': None, 'asset_id': str(uuid.uuid5(uuid.NAMESPACE_DNS, b['symbol'])),
             'symbol': b['symbol'], 'asset_class': 'us_equity', 'notional': None, 'qty': f'{qty:g}', 'filled_qty': '0',
             'filled_avg_price': None, 'order_class': '', 'order_type': 'market', 'type': 'market', 'side': b['side'],
             'position_intent': 'buy_to_open' if b['side'] == 'buy' else 'sell_to_close',
             'time_in_force': b['time_in_force'], 'limit_price': None, 'stop_price': None, 'status': 'accepted',
             'extended_hours': False, 'legs': None, 'trail_percent': None, 'trail_price': None, 'hwm': None}
        self.orders[o['id']] = o
        answer = dict(o)
        if self.market_open and b['time_in_force'] == 'day':   # routed at once: the answer says pending_new, then it fills
            answer['status'] = o['status'] = 'pending_new'
            self._fill(o, price, pd.Timestamp.now(tz='UTC'))
        return 200, answer

    def _list(self, p):
        if set(p) - LIST_PARAMS: return self._bad(f'unknown parameters {sorted(set(p) - LIST_PARAMS)}', 400)
        status = p.get('status', 'open')
        if status not in ('open', 'closed', 'all'): return self._bad(f'invalid status {status!r}')
        limit = int(p.get('limit', 50))
        if not 1 <= limit <= 500: return self._bad(f'limit {limit} out of range [1, 500]')
        if p.get('direction', 'desc') not in ('asc', 'desc'): return self._bad(f"invalid direction {p['direction']!r}")
        out = [o for o in self.orders.values()
               if status == 'all' or (status == 'open') == (o['status'] not in FINISHED)]
        out.sort(key=lambda o: o['submitted_at'], reverse=p.get('direction', 'desc') == 'desc')
        return 200, out[:limit]

    def _position(self, sym, qty, cost):
        px = self.prices[sym]
        return {'asset_id': str(uuid.uuid5(uuid.NAMESPACE_DNS, sym)), 'symbol': sym, 'exchange': ASSETS[sym], 'asset_class': 'us_equity',
                'asset_marginable': True, 'avg_entry_price': f'{cost/qty:.4f}', 'qty': f'{qty:g}', 'side': 'long' if qty > 0 else 'short',
                'market_value': f'{qty*px:.2f}', 'cost_basis': f'{cost:.2f}', 'unrealized_pl': f'{qty*px - cost:.2f}',
                'unrealized_plpc': f'{(qty*px - cost)/abs(cost):.4f}', 'unrealized_intraday_pl': '0', 'unrealized_intraday_plpc': '0',
                'current_price': f'{px:.2f}', 'lastday_price': f'{px:.2f}', 'change_today': '0', 'qty_available': f'{qty:g}'}

    def _account(self):
        long_ = sum(q*self.prices[s] for s, (q, _) in self.positions.items() if q > 0)
        short = sum(q*self.prices[s] for s, (q, _) in self.positions.items() if q < 0)
        eq = self.cash + long_ + short
        return {'id': 'e6fe16f3-64a4-4921-8928-cadf02f92f98', 'account_number': 'PA3TEST00001', 'status': 'ACTIVE',
                'crypto_status': 'ACTIVE', 'currency': 'USD', 'buying_power': f'{self.cash:.2f}', 'regt_buying_power': f'{self.cash:.2f}',
                'daytrading_buying_power': '0', 'non_marginable_buying_power': f'{self.cash:.2f}', 'cash': f'{self.cash:.2f}',
                'accrued_fees': '0', 'portfolio_value': f'{eq:.2f}', 'pattern_day_trader': False, 'trading_blocked': False,
                'transfers_blocked': False, 'account_blocked': False, 'created_at': '2024-01-02T15:00:00Z',
                'trade_suspended_by_user': False, 'multiplier': '1', 'shorting_enabled': False, 'equity': f'{eq:.2f}',
                'last_equity': f'{eq:.2f}', 'long_market_value': f'{long_:.2f}', 'short_market_value': f'{short:.2f}',
                'initial_margin': '0', 'maintenance_margin': '0', 'last_maintenance_margin': '0', 'sma': '0', 'daytrade_count': 0}

    def _check_feed(self, p, end=None):
        feed = p.get('feed')
        if feed is not None and feed not in ('sip', 'iex', 'otc', 'boats', 'overnight', 'delayed_sip'): return self._bad(f'invalid feed {feed!r}')
        if self.free_plan and feed != 'iex' and (end is None or end > self.now - pd.Timedelta(minutes=15)):
            return 403, {'message': 'subscription does not permit querying recent SIP data'}
        return None

    def _latest(self, p):
        if set(p) - {'symbols', 'feed', 'currency'}: return self._bad(f"unknown parameters {sorted(set(p) - {'symbols', 'feed', 'currency'})}", 400)
        syms = p.get('symbols', '').split(',')
        if not all(s and s == s.upper() for s in syms): return self._bad(f"invalid symbols {p.get('symbols')!r}", 400)
        if (r := self._check_feed(p)) is not None: return r
        return 200, {'bars': {s: self.latest[s] for s in syms if s in self.latest}}

    def _bars(self, p):
        if set(p) - BARS_PARAMS: return self._bad(f'unknown parameters {sorted(set(p) - BARS_PARAMS)}', 400)
        syms = p.get('symbols', '').split(',')
        if not all(s and s == s.upper() for s in syms): return self._bad(f"invalid symbols {p.get('symbols')!r}", 400)
        if p.get('timeframe') != '1Day': return self._bad(f"this server has 1Day bars only, got {p.get('timeframe')!r}")
        if p.get('adjustment', 'raw') not in ('raw', 'split', 'dividend', 'all'): return self._bad(f"invalid adjustment {p['adjustment']!r}")
        bounds = {}
        for k in ('start', 'end'):
            if k not in p: continue
            t = dt.datetime.fromisoformat(p[k])
            if t.tzinfo is None: return self._bad(f'{k} {p[k]!r} has no UTC offset', 400)
            bounds[k] = pd.Timestamp(t).tz_convert('UTC')
        if (r := self._check_feed(p, bounds.get('end'))) is not None: return r
        lo, hi = bounds.get('start', pd.Timestamp.min.tz_localize('UTC')), bounds.get('end', pd.Timestamp.max.tz_localize('UTC'))
        out = {s: [b for b in self.daily.get(s, []) if lo <= pd.Timestamp(b['t']) <= hi] for s in sorted(set(syms))}
        return 200, {'bars': {s: v for s, v in out.items() if v}, 'next_page_token': None}

    @staticmethod
    def _send(h, seen:Seen, status:int, body):
        seen.status = status
        h.send_response(status)
        if status == 204:
            h.end_headers(); return
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        h.send_header('Content-Type', 'text/plain; charset=UTF-8' if isinstance(body, str) else 'application/json; charset=UTF-8')
        h.send_header('Content-Length', str(len(data)))
        h.end_headers()
        h.wfile.write(data)

class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'   # keep-alive, as the real API
    timeout = 5
    def do_GET(self): self.server.fake.handle(self, 'GET')
    def do_POST(self): self.server.fake.handle(self, 'POST')
    def do_DELETE(self): self.server.fake.handle(self, 'DELETE')
    def log_message(self, *a): pass

class _Server(ThreadingHTTPServer):
    block_on_close = False   # idle keep-alive connections must not hold up the fixture's teardown

@pytest.fixture(autouse=True)
def _env(monkeypatch):
    "Loopback is never proxied, and no trading URL from the developer's shell leaks in."
    for k in ('NO_PROXY', 'no_proxy'): monkeypatch.setenv(k, '127.0.0.1,localhost')
    monkeypatch.delenv('TRADER_ALPACA_TRADING_URL', raising=False)

@pytest.fixture
def server():
    fake = FakeAlpaca()
    with loopback_server(_Server, _Handler, fake): yield fake
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
    (Order('bad-frac', 'AAPL', 'buy', 1.5, 'opg'), 'HTTP 422: fractional orders must be DAY orders'),
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
    t = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=expect): b.account()
    assert time.monotonic() - t < 2 and len(server.requests) == 1     # alpaca-py's own retries are off
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

def alpaca_daily(df) -> dict[str, list[dict]]:
    "Daily bars as Alpaca serves them: stamped at midnight New York time."
    return {s: [{'t': pd.Timestamp(r.ts.date()).tz_localize(NY).tz_convert('UTC').strftime('%Y-%m-%dT%H:%M:%SZ'),
                 'o': r.open, 'h': r.high, 'l': r.low, 'c': r.close, 'v': int(r.volume), 'n': 1000, 'vw': r.close}
                for r in g.itertuples()] for s, g in df.groupby('symbol')}

def ny(t) -> pd.Timestamp: return pd.Timestamp(t, tz=NY).tz_convert('UTC')

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
    clock.t = ny('2012-01-05 16:15')
    assert feed.next_bar().ts == pd.Timestamp('2012-01-05', tz='UTC')
    clock.t = ny('2012-01-09 17:00')                   # Monday: Friday's and Monday's bars are final; the latest comes
    b = feed.next_bar()
    assert b.ts == pd.Timestamp('2012-01-09', tz='UTC') and b.prices() == {s: sample_row(s, '2012-01-09')[3] for s in b.symbols}
    assert feed.next_bar() is None

def test_daily_feed_needs_every_symbol_at_one_time(tmp_path, server, clock):
    feed = daily_feed(tmp_path, server, clock)
    server.daily['MSFT'] = [x for x in server.daily['MSFT'] if not x['t'].startswith('2012-01-04')]
    assert feed.next_bar() is None                     # MSFT's latest final bar is 01-03, AAPL's 01-04
    clock.t = ny('2012-01-05 17:00')
    assert feed.next_bar().ts == pd.Timestamp('2012-01-05', tz='UTC')

def test_daily_feed_resumes_after(tmp_path, server, clock):
    clock.t = ny('2012-01-06 18:00')
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
