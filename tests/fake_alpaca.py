"""A loopback fake of Alpaca's paper-trading and market-data APIs, as documented (not the live service, which cannot be
reached from here).

`FakeAlpaca` answers alpaca-py's requests on 127.0.0.1 with the documented paths, JSON shapes, status codes and error
bodies ({"code": ..., "message": ...}) of the trading API v2 (POST/GET /v2/orders, GET /v2/orders:by_client_order_id,
GET/DELETE /v2/orders/{id}, GET /v2/positions, GET /v2/account) and the market-data API (GET /v2/stocks/bars,
GET /v2/stocks/bars/latest, GET /v1/corporate-actions). A test drives the market (`open_session`, `close_session`) and the
clock (`now`), or lets a running clock (`clock_fn`, e.g. one shared with a service in another process) drive both: with
`auto_market`, each XNYS session opens and closes at its calendar times as that clock passes them (`tick`, called on every
request and by a test's ticker thread), at the prices of the day's bar in `daily`. The fake holds orders, positions and cash
the way Alpaca's paper account does.

Rules it enforces (each one a documented Alpaca rule):

* Authentication: every request carries APCA-API-KEY-ID and APCA-API-SECRET-KEY, else 401
  {"code": 40110000, "message": "request is not authorized"}; a test can make any request answer 401, 403
  {"code": 40310000, "message": "forbidden"} or 429 {"code": 42910000, "message": "rate limit exceeded"} (`faults`).
* Order validation: side buy/sell, a known time in force, qty > 0 (42210000/40010001 bodies as Alpaca's), a known asset,
  client_order_id at most 128 characters.
* Fractional quantities only on DAY market orders: a fractional `opg` (or gtc, ioc, ...) order is refused with 422
  {"code": 42210000, "message": "fractional orders must be DAY orders"}; quantities have at most 9 decimals (422 otherwise).
* `opg` orders are accepted only outside 09:28-19:00 New York time (Alpaca rejects them in between, 422 code 42210000);
  they wait for the next session's open (status 'accepted').
* client_order_id is unique in the account, whatever the earlier order's status: 422
  {"code": 40010001, "message": "client_order_id must be unique"}.
* Buying power and shares held are checked (403 code 40310000 with Alpaca's figures: insufficient buying power /
  insufficient qty available).
* Fills: at `open_session`, waiting `opg` and DAY orders fill at the open price; `fill_share(order)` (a test's rule, default
  all) says which share of an order fills (whole shares for whole-share orders). An `opg` order's unfilled rest ends with
  the opening auction: status 'expired', filled_qty kept (Alpaca's docs say such orders are canceled after the open
  without naming the status field; the fake says 'expired', and the broker books the filled part either way); a DAY
  order's rest stays 'partially_filled' and expires at `close_session` ('expired', filled_qty kept). A DAY order sent while the market is
  open fills at once at the current price (the answer says 'pending_new').
* Cancel (DELETE /v2/orders/{id}): 204; a finished order cannot be canceled (422 code 42210000); the filled part stays.
* Order listing (GET /v2/orders): status open/closed/all, limit 1..500 (default 50), after/until (exclusive bounds on
  the submission time), direction asc/desc (default desc), symbols, side, nested.
* Bars (GET /v2/stocks/bars): 1Day bars, start/end inclusive (RFC 3339 with an offset), adjustment raw/split/dividend/all
  applied from the corporate actions below, pagination by `limit` (all symbols together) with an opaque `next_page_token`
  to pass back as `page_token`; on a free plan, SIP data of the last 15 minutes is refused (403).
* Corporate actions (GET /v1/corporate-actions): forward/reverse splits and cash dividends, filtered by symbols, types and
  ex_date in [start, end]; a split also changes positions at the open of its ex date (qty times new/old, same cost basis).
* Fills execute at whole cents (the price given, rounded); filled_avg_price is the average of an order's fills.
* Positions and account follow the fills: cash moves by qty x price, positions are signed, equity marks them at the last
  price.

It records every request (`requests`, `posts`), fails on purpose when a test asks (`faults`: an HTTP status, 'drop',
'hang', 'echo', 'echo-text', 'accept-drop'), and collects requests the real API would refuse as malformed (unknown paths or
parameters, missing fields) in `problems`, which a test asserts empty at the end.
"""
from __future__ import annotations
import base64, datetime as dt, json, math, threading, time, uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import pandas as pd

KEY = 'PKTEST7Q2L9XC4VB0N'
SECRET = 'sk-test-Zq8f3T1vR6yW2uP0aN5m'   # distinctive: a leak cannot be mistaken for ordinary words
NY = 'America/New_York'
ASSETS = {'AAPL': 'NASDAQ', 'MSFT': 'NASDAQ', 'IBM': 'NYSE', 'GOOG': 'NASDAQ'}

ERRORS = {   # Alpaca's error bodies: JSON with a code and a message
    401: {'code': 40110000, 'message': 'request is not authorized'},
    403: {'code': 40310000, 'message': 'forbidden'},
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
CA_PARAMS = {'symbols', 'cusips', 'types', 'start', 'end', 'ids', 'limit', 'sort', 'page_token'}
CA_TYPES = {'forward_split', 'reverse_split', 'unit_split', 'stock_dividend', 'cash_dividend', 'spin_off', 'cash_merger',
            'stock_merger', 'stock_and_cash_merger', 'redemption', 'name_change', 'worthless_removal', 'rights_distribution'}
FINISHED = {'filled', 'canceled', 'expired', 'rejected', 'replaced'}
BARS_MAX_PAGE = 10_000     # Alpaca's largest bars page

def iso(t) -> str: return pd.Timestamp(t).tz_convert('UTC').strftime('%Y-%m-%dT%H:%M:%S.%fZ')
def ny(t) -> pd.Timestamp: return pd.Timestamp(t, tz=NY).tz_convert('UTC')
def _qty(x:float) -> str: return f'{x:.9f}'.rstrip('0').rstrip('.') if x != int(x) else str(int(x))

def alpaca_daily(df) -> dict[str, list[dict]]:
    "Daily bars (the store's long format) as Alpaca serves them: stamped at midnight New York time."
    return {s: [{'t': pd.Timestamp(r.ts.date()).tz_localize(NY).tz_convert('UTC').strftime('%Y-%m-%dT%H:%M:%SZ'),
                 'o': r.open, 'h': r.high, 'l': r.low, 'c': r.close, 'v': int(r.volume), 'n': 1000, 'vw': r.close}
                for r in g.itertuples()] for s, g in df.groupby('symbol')}

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
    prices: dict[str, float] = field(default_factory=lambda: {'AAPL': 410.0, 'MSFT': 26.0, 'IBM': 180.0, 'GOOG': 600.0})
    market_open: bool = False
    now: pd.Timestamp | None = None      # the server's clock; None: the wall clock (or `clock_fn`)
    clock_fn: Callable[[], pd.Timestamp] | None = None   # a running clock (e.g. a ScaledClock's `now` shared with the service under test)
    auto_market: bool = False            # sessions open and close by the clock (XNYS calendar, prices from `daily`): see `tick`
    market_log: list = field(default_factory=list)               # (event, time) of the sessions `tick` opened and closed
    opg_window: bool = True              # refuse opg orders between 09:28 and 19:00 New York time (by `now`)
    free_plan: bool = False
    orders: dict[str, dict] = field(default_factory=dict)        # id -> order JSON
    positions: dict[str, list[float]] = field(default_factory=dict)   # symbol -> [signed qty, cost basis]
    latest: dict[str, dict] = field(default_factory=dict)        # symbol -> latest minute bar
    daily: dict[str, list[dict]] = field(default_factory=dict)   # symbol -> raw daily bars, oldest first
    actions: list[dict] = field(default_factory=list)            # corporate actions: {'type': 'forward_split', 'symbol', 'ex_date', 'new_rate', 'old_rate'} or cash_dividend with 'rate'
    fill_share: Callable[[dict], float] | None = None            # share of an order that fills (partial fills); None: all
    bars_page: int = BARS_MAX_PAGE                               # the most bars one page holds (tests lower it to page)
    on_accept: Callable[[dict], None] | None = None              # called when an order is accepted, before the answer is sent
    faults: list = field(default_factory=list)   # one per request, consumed in order: None, an HTTP status, 'drop',
                                                 # 'hang', 'echo', (status, body) or 'accept-drop' (POST /v2/orders: accept, then hang up)
    lookup_lag: int = 0       # answer this many coming by_client_order_id look-ups with 404 (the order not yet visible)
    hang: float = 0.6
    requests: list[Seen] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    url: str = ''

    def __post_init__(self): self._lock, self._ticked = threading.RLock(), None

    def clock(self) -> pd.Timestamp:
        if self.now is not None: return self.now
        return self.clock_fn() if self.clock_fn is not None else pd.Timestamp.now(tz='UTC')

    def tick(self) -> list[tuple[str, pd.Timestamp]]:
        "With `auto_market`: open and close the XNYS sessions the clock has passed since the last tick (each at its own time, half days' early close included), at the prices of their bars in `daily`; returns the events applied."
        if not self.auto_market: return []
        import exchange_calendars as xcals
        with self._lock:
            now = self.clock()
            last, self._ticked = self._ticked, now
            if last is None or now <= last: return []
            cal = xcals.get_calendar('XNYS', start='2000-01-01')
            events = []
            for ses in cal.sessions_in_range((last - pd.Timedelta(days=1)).tz_convert(NY).date(), now.tz_convert(NY).date()):
                day = pd.Timestamp(ses.date()).tz_localize(NY).tz_convert('UTC').strftime('%Y-%m-%dT%H:%M:%SZ')
                bars = {s: b for s, bs in self.daily.items() for b in bs if b['t'] == day}
                for kind, t in (('open', cal.session_open(ses)), ('close', cal.session_close(ses))):
                    if last < t <= now and bars: events.append((t, kind, bars))
            for t, kind, bars in sorted(events, key=lambda e: e[0]):
                if kind == 'open': self.open_session(t, {s: b['o'] for s, b in bars.items()})
                else: self.close_session(t, {s: b['c'] for s, b in bars.items()})
            done = [(k, t) for t, k, _ in sorted(events, key=lambda e: e[0])]
            self.market_log += done
            return done
    def posts(self, cid=None) -> list[Seen]:
        return [r for r in self.requests if r.method == 'POST' and (cid is None or (r.body or {}).get('client_order_id') == cid)]
    def calls(self, method, path) -> list[Seen]:
        return [r for r in self.requests if r.method == method and r.path == path]
    def by_cid(self, cid) -> dict | None: return next((o for o in self.orders.values() if o['client_order_id'] == cid), None)

    # -- the market, driven by the tests ---------------------------------------------------------------------
    def _fill(self, o:dict, qty:float, price:float, t):
        "Fill `qty` more of `o` at `price`: cash, position, filled_qty and the average price move."
        if qty <= 0: return
        price = round(price, 2)          # executions at whole cents (prices of $1 and more: no sub-penny quotes)
        q = qty * (1 if o['side'] == 'buy' else -1)
        self.cash -= q*price
        pos = self.positions.setdefault(o['symbol'], [0.0, 0.0])
        pos[1] = pos[1] + q*price if pos[0]*q >= 0 else pos[1]*(pos[0] + q)/pos[0]   # cost basis of what is left
        pos[0] = round(pos[0] + q, 9)
        if pos[0] == 0: del self.positions[o['symbol']]
        done = float(o['filled_qty'])
        avg = ((float(o['filled_avg_price'] or 0)*done + qty*price)/(done + qty))
        filled = round(done + qty, 9)
        o.update(filled_qty=_qty(filled), filled_avg_price=repr(avg), updated_at=iso(t),
                 status='filled' if filled >= float(o['qty']) else 'partially_filled')
        if o['status'] == 'filled': o['filled_at'] = iso(t)

    def _share(self, o:dict) -> float:
        "How much of `o` fills now: the test's share, whole shares for whole-share orders."
        want = float(o['qty']) - float(o['filled_qty'])
        k = 1.0 if self.fill_share is None else float(self.fill_share(dict(o)))
        q = want*min(max(k, 0.0), 1.0)
        return float(math.floor(q + 1e-9)) if float(o['qty']) == int(float(o['qty'])) else round(q, 9)

    def open_session(self, t, opens:dict[str, float]):
        "The session opens at `t`: splits take effect, then waiting opg and DAY orders fill at the open; opg rests are canceled."
        t = pd.Timestamp(t)
        with self._lock:
            day = t.tz_convert(NY).date()
            for a in self.actions:
                if a['type'] in ('forward_split', 'reverse_split') and pd.Timestamp(a['ex_date']).date() == day and a['symbol'] in self.positions:
                    self.positions[a['symbol']][0] *= a['new_rate']/a['old_rate']
            self.market_open, self.prices = True, {**self.prices, **opens}
            for o in sorted(self.orders.values(), key=lambda o: o['submitted_at']):
                if o['status'] != 'accepted': continue
                self._fill(o, self._share(o), opens[o['symbol']], t)
                if o['time_in_force'] == 'opg' and o['status'] != 'filled':   # not filled in the opening auction: it ends there
                    o.update(status='expired', expired_at=iso(t), updated_at=iso(t))
                elif o['status'] == 'accepted': o['status'] = 'new'

    def close_session(self, t, closes:dict[str, float]):
        "The session closes at `t`: DAY orders not (fully) filled expire, keeping what filled."
        with self._lock:
            self.market_open, self.prices = False, {**self.prices, **closes}
            for o in self.orders.values():
                if o['status'] in ('new', 'pending_new', 'partially_filled') and o['time_in_force'] == 'day':
                    o.update(status='expired', expired_at=iso(t), updated_at=iso(t))

    def add_orders(self, n:int, start, step=pd.Timedelta(minutes=1), symbol:str='IBM', prefix:str='old', status:str='canceled'):
        "`n` orders of another strategy (1 share of `symbol`, in `status`), submitted `step` apart from `start` (an account with a history)."
        with self._lock:
            k = sum(o['client_order_id'].startswith(prefix + '-') for o in self.orders.values())
            for i in range(n):
                t = iso(pd.Timestamp(start) + i*step)
                o = self._order({'symbol': symbol, 'side': 'buy', 'time_in_force': 'day'}, 1.0, f'{prefix}-{k + i:05d}', t)
                o['status'] = status
                if status == 'canceled': o['canceled_at'] = t
                self.orders[o['id']] = o

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
        self.tick()           # with `auto_market`: the sessions passed since the last request (or tick) open and close first
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
        if isinstance(fault, tuple): return self._send(h, seen, *fault)        # (status, body): an answer of the test's choosing
        if h.headers.get('APCA-API-KEY-ID') != self.key or h.headers.get('APCA-API-SECRET-KEY') != self.secret:
            return self._send(h, seen, 401, ERRORS[401])
        if not h.headers.get('User-Agent', '').startswith('APCA-PY/'): self.problems.append(f'{method} {u.path}: not alpaca-py')
        with self._lock:
            status, out = self._route(method, u.path, q, body)
            if status == 200 and method == 'POST' and self.on_accept is not None: self.on_accept(out)
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
            o = self.by_cid(p['client_order_id'])
            return (200, o) if o else (404, ERRORS[404])
        if path.startswith('/v2/orders/') and method in ('GET', 'DELETE'):
            oid = path.rsplit('/', 1)[1]
            try: uuid.UUID(oid)
            except ValueError: return self._bad(f'order_id {oid!r} is not a UUID', 422, 40010001)
            o = self.orders.get(oid)
            if o is None: return 404, ERRORS[404]
            if method == 'GET': return 200, o
            if o['status'] in FINISHED: return 422, {'code': 42210000, 'message': f'order is already in "{o["status"]}" state'}
            o.update(status='canceled', canceled_at=iso(self.clock()), updated_at=iso(self.clock()))
            return 204, None
        if (method, path) == ('GET', '/v2/positions'):
            if p: return self._bad(f'positions takes no parameters, got {sorted(p)}', 400)
            return 200, [self._position(s, q_, c) for s, (q_, c) in sorted(self.positions.items())]
        if (method, path) == ('GET', '/v2/account'):
            if p: return self._bad(f'account takes no parameters, got {sorted(p)}', 400)
            return 200, self._account()
        if (method, path) == ('GET', '/v2/stocks/bars/latest'): return self._latest(p)
        if (method, path) == ('GET', '/v2/stocks/bars'): return self._bars(p)
        if (method, path) == ('GET', '/v1/corporate-actions'): return self._corporate_actions(p)
        return self._bad(f'no such endpoint: {method} {path}', 404, 40410000)

    def _order(self, b:dict, qty:float, cid:str, t:str) -> dict:
        return {'id': str(uuid.uuid4()), 'client_order_id': cid, 'created_at': t, 'updated_at': t, 'submitted_at': t,
                'filled_at': None, 'expired_at': None, 'canceled_at': None, 'failed_at': None, 'replaced_at': None,
                'replaced_by': None, 'replaces': None, 'asset_id': str(uuid.uuid5(uuid.NAMESPACE_DNS, b['symbol'])),
                'symbol': b['symbol'], 'asset_class': 'us_equity', 'notional': None, 'qty': _qty(qty), 'filled_qty': '0',
                'filled_avg_price': None, 'order_class': '', 'order_type': 'market', 'type': 'market', 'side': b['side'],
                'position_intent': 'buy_to_open' if b['side'] == 'buy' else 'sell_to_close',
                'time_in_force': b['time_in_force'], 'limit_price': None, 'stop_price': None, 'status': 'accepted',
                'extended_hours': False, 'legs': None, 'trail_percent': None, 'trail_price': None, 'hwm': None}

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
        if abs(qty - round(qty, 9)) > 1e-12: return 422, {'code': 42210000, 'message': 'qty must be in increments of 0.000000001'}
        now = self.clock()
        if b['time_in_force'] == 'opg' and self.opg_window:
            local = now.tz_convert(NY)
            if dt.time(9, 28) <= local.time() < dt.time(19, 0):
                return 422, {'code': 42210000, 'message': 'opg orders are not accepted between 9:28am and 7:00pm ET'}
        cid = b.get('client_order_id') or str(uuid.uuid4())
        if len(cid) > 128: return 422, {'code': 40010001, 'message': 'client_order_id must be no more than 128 characters'}
        if self.by_cid(cid) is not None: return 422, {'code': 40010001, 'message': 'client_order_id must be unique'}
        opens = [o for o in self.orders.values() if o['status'] not in FINISHED]
        price = self.prices[b['symbol']]
        rest = lambda o: float(o['qty']) - float(o['filled_qty'])
        if b['side'] == 'buy':
            bp = self.cash - sum(rest(o)*self.prices[o['symbol']] for o in opens if o['side'] == 'buy')
            if qty*price > bp:
                return 403, {'buying_power': f'{bp:.2f}', 'code': 40310000, 'cost_basis': f'{qty*price:.2f}', 'message': 'insufficient buying power'}
        else:
            held = self.positions.get(b['symbol'], [0.0])[0]
            pending = sum(rest(o) for o in opens if o['side'] == 'sell' and o['symbol'] == b['symbol'])
            if qty > held - pending + 1e-9:
                return 403, {'code': 40310000, 'existing_qty': f'{held:g}', 'held_for_orders': f'{pending:g}',
                             'message': f'insufficient qty available for order (requested: {qty:g}, available: {held - pending:g})'}
        o = self._order(b, qty, cid, iso(now))
        self.orders[o['id']] = o
        answer = dict(o)
        if self.market_open and b['time_in_force'] == 'day':   # routed at once: the answer says pending_new, then it fills
            answer['status'] = o['status'] = 'pending_new'
            self._fill(o, self._share(o), price, now)
            if o['status'] == 'pending_new': o['status'] = 'new'
        return 200, answer

    def _list(self, p):
        if set(p) - LIST_PARAMS: return self._bad(f'unknown parameters {sorted(set(p) - LIST_PARAMS)}', 400)
        status = p.get('status', 'open')
        if status not in ('open', 'closed', 'all'): return self._bad(f'invalid status {status!r}')
        limit = int(p.get('limit', 50))
        if not 1 <= limit <= 500: return self._bad(f'limit {limit} out of range [1, 500]')
        direction = p.get('direction', 'desc')
        if direction not in ('asc', 'desc'): return self._bad(f"invalid direction {direction!r}")
        bounds = {}
        for k in ('after', 'until'):
            if k in p:
                try: bounds[k] = pd.Timestamp(p[k])
                except ValueError: return self._bad(f'{k} {p[k]!r} is not a time', 400)
                if bounds[k].tzinfo is None: bounds[k] = bounds[k].tz_localize('UTC')
        syms = set(p['symbols'].split(',')) if p.get('symbols') else None
        out = [o for o in self.orders.values()
               if (status == 'all' or (status == 'open') == (o['status'] not in FINISHED))
               and ('after' not in bounds or pd.Timestamp(o['submitted_at']) > bounds['after'])
               and ('until' not in bounds or pd.Timestamp(o['submitted_at']) < bounds['until'])
               and (syms is None or o['symbol'] in syms) and p.get('side') in (None, o['side'])]
        out.sort(key=lambda o: o['submitted_at'], reverse=direction == 'desc')
        return 200, out[:limit]

    def _position(self, sym, qty, cost):
        px = self.prices[sym]
        return {'asset_id': str(uuid.uuid5(uuid.NAMESPACE_DNS, sym)), 'symbol': sym, 'exchange': ASSETS[sym], 'asset_class': 'us_equity',
                'asset_marginable': True, 'avg_entry_price': f'{cost/qty:.4f}', 'qty': _qty(abs(qty)) if qty > 0 else '-' + _qty(abs(qty)),
                'side': 'long' if qty > 0 else 'short',
                'market_value': f'{qty*px:.2f}', 'cost_basis': f'{cost:.2f}', 'unrealized_pl': f'{qty*px - cost:.2f}',
                'unrealized_plpc': f'{(qty*px - cost)/abs(cost):.4f}', 'unrealized_intraday_pl': '0', 'unrealized_intraday_plpc': '0',
                'current_price': f'{px:.2f}', 'lastday_price': f'{px:.2f}', 'change_today': '0', 'qty_available': _qty(abs(qty))}

    def _account(self):
        long_ = sum(q*self.prices[s] for s, (q, _) in self.positions.items() if q > 0)
        short = sum(q*self.prices[s] for s, (q, _) in self.positions.items() if q < 0)
        eq = self.cash + long_ + short
        return {'id': 'e6fe16f3-64a4-4921-8928-cadf02f92f98', 'account_number': 'PA3TEST00001', 'status': 'ACTIVE',
                'crypto_status': 'ACTIVE', 'currency': 'USD', 'buying_power': f'{self.cash:.2f}', 'regt_buying_power': f'{self.cash:.2f}',
                'daytrading_buying_power': '0', 'non_marginable_buying_power': f'{self.cash:.2f}', 'cash': f'{self.cash:.6f}',
                'accrued_fees': '0', 'portfolio_value': f'{eq:.2f}', 'pattern_day_trader': False, 'trading_blocked': False,
                'transfers_blocked': False, 'account_blocked': False, 'created_at': '2024-01-02T15:00:00Z',
                'trade_suspended_by_user': False, 'multiplier': '1', 'shorting_enabled': False, 'equity': f'{eq:.6f}',
                'last_equity': f'{eq:.2f}', 'long_market_value': f'{long_:.2f}', 'short_market_value': f'{short:.2f}',
                'initial_margin': '0', 'maintenance_margin': '0', 'last_maintenance_margin': '0', 'sma': '0', 'daytrade_count': 0}

    def _check_feed(self, p, end=None):
        feed = p.get('feed')
        if feed is not None and feed not in ('sip', 'iex', 'otc', 'boats', 'overnight', 'delayed_sip'): return self._bad(f'invalid feed {feed!r}')
        if self.free_plan and feed != 'iex' and (end is None or end > self.clock() - pd.Timedelta(minutes=15)):
            return 403, {'message': 'subscription does not permit querying recent SIP data'}
        return None

    def _latest(self, p):
        if set(p) - {'symbols', 'feed', 'currency'}: return self._bad(f"unknown parameters {sorted(set(p) - {'symbols', 'feed', 'currency'})}", 400)
        syms = p.get('symbols', '').split(',')
        if not all(s and s == s.upper() for s in syms): return self._bad(f"invalid symbols {p.get('symbols')!r}", 400)
        if (r := self._check_feed(p)) is not None: return r
        return 200, {'bars': {s: self.latest[s] for s in syms if s in self.latest}}

    def _factor(self, sym:str, day, adjustment:str, closes:dict) -> float:
        "The price factor of `sym`'s bar on `day` under `adjustment` (volumes are divided by it for splits)."
        k = 1.0
        for a in self.actions:
            if a['symbol'] != sym or pd.Timestamp(a['ex_date']).date() <= day: continue
            if a['type'] in ('forward_split', 'reverse_split') and adjustment in ('split', 'all'): k *= a['old_rate']/a['new_rate']
            if a['type'] == 'cash_dividend' and adjustment in ('dividend', 'all'):
                prev = closes.get((sym, pd.Timestamp(a['ex_date']).date()))
                if prev: k *= 1 - a['rate']/prev
        return k

    def _bars(self, p):
        if set(p) - BARS_PARAMS: return self._bad(f'unknown parameters {sorted(set(p) - BARS_PARAMS)}', 400)
        syms = p.get('symbols', '').split(',')
        if not all(s and s == s.upper() for s in syms): return self._bad(f"invalid symbols {p.get('symbols')!r}", 400)
        if p.get('timeframe') != '1Day': return self._bad(f"this server has 1Day bars only, got {p.get('timeframe')!r}")
        adjustment = p.get('adjustment', 'raw')
        if adjustment not in ('raw', 'split', 'dividend', 'all'): return self._bad(f"invalid adjustment {adjustment!r}")
        limit = int(p.get('limit') or 1000)
        if not 1 <= limit <= BARS_MAX_PAGE: return self._bad(f'limit {limit} out of range [1, {BARS_MAX_PAGE}]')
        bounds = {}
        for k in ('start', 'end'):
            if k not in p: continue
            t = dt.datetime.fromisoformat(p[k].replace('Z', '+00:00'))
            if t.tzinfo is None: return self._bad(f'{k} {p[k]!r} has no UTC offset', 400)
            bounds[k] = pd.Timestamp(t).tz_convert('UTC')
        if (r := self._check_feed(p, bounds.get('end'))) is not None: return r
        lo, hi = bounds.get('start', pd.Timestamp.min.tz_localize('UTC')), bounds.get('end', pd.Timestamp.max.tz_localize('UTC'))
        rows = []
        for s in sorted(set(syms)):     # Alpaca pages bars symbol by symbol, each oldest first
            bars = self.daily.get(s, [])
            # the close before each ex date, for dividend factors
            closes = {(s, pd.Timestamp(b2['t']).tz_convert(NY).date()): b1['c'] for b1, b2 in zip(bars, bars[1:])}
            for b in bars:
                if lo <= pd.Timestamp(b['t']) <= hi:
                    k = self._factor(s, pd.Timestamp(b['t']).tz_convert(NY).date(), adjustment, closes)
                    split = self._factor(s, pd.Timestamp(b['t']).tz_convert(NY).date(), 'split', closes)
                    rows.append((s, {**b, 'o': b['o']*k, 'h': b['h']*k, 'l': b['l']*k, 'c': b['c']*k, 'vw': b['vw']*k,
                                     'v': int(round(b['v']/split)) if adjustment in ('split', 'all') else b['v']}))
        start = 0
        if p.get('page_token'):
            try: start = int(base64.urlsafe_b64decode(p['page_token'].encode()).decode().split('|')[1])
            except (ValueError, IndexError): return self._bad(f"invalid page_token {p['page_token']!r}", 400)
        n = min(limit, self.bars_page)
        page = rows[start:start + n]
        nxt = base64.urlsafe_b64encode(f'{page[-1][0]}|{start + n}'.encode()).decode() if start + n < len(rows) else None
        out = {}
        for s, b in page: out.setdefault(s, []).append(b)
        return 200, {'bars': out, 'next_page_token': nxt}

    def _corporate_actions(self, p):
        if set(p) - CA_PARAMS: return self._bad(f'unknown parameters {sorted(set(p) - CA_PARAMS)}', 400)
        types = set(p['types'].split(',')) if p.get('types') else CA_TYPES
        if types - CA_TYPES: return self._bad(f'invalid types {sorted(types - CA_TYPES)}', 400)
        syms = set(p['symbols'].split(',')) if p.get('symbols') else None
        today = self.clock().tz_convert(NY).date()
        try: lo, hi = (dt.date.fromisoformat(p[k]) if p.get(k) else today for k in ('start', 'end'))
        except ValueError: return self._bad(f"start/end must be YYYY-MM-DD, got {p.get('start')!r}, {p.get('end')!r}", 400)
        out = {}
        for a in self.actions:
            ex = pd.Timestamp(a['ex_date']).date()
            if a['type'] not in types or (syms is not None and a['symbol'] not in syms) or not lo <= ex <= hi: continue
            common = {'id': str(uuid.uuid5(uuid.NAMESPACE_URL, f"{a['type']}/{a['symbol']}/{ex}")), 'symbol': a['symbol'], 'process_date': str(ex), 'ex_date': str(ex), 'record_date': str(ex + dt.timedelta(days=1)),
                      'payable_date': str(ex + dt.timedelta(days=7))}
            if a['type'] == 'forward_split':
                rec = {**common, 'cusip': '037833100', 'new_rate': a['new_rate'], 'old_rate': a['old_rate']}
            elif a['type'] == 'reverse_split':
                rec = {**common, 'old_cusip': '037833100', 'new_cusip': '037833101', 'new_rate': a['new_rate'], 'old_rate': a['old_rate']}
            else:
                rec = {**common, 'cusip': '037833100', 'rate': a['rate'], 'special': False, 'foreign': False}
            out.setdefault(a['type'] + 's', []).append(rec)
        return 200, {'corporate_actions': out, 'next_page_token': None}

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

class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'   # keep-alive, as the real API
    timeout = 5
    def do_GET(self): self.server.fake.handle(self, 'GET')
    def do_POST(self): self.server.fake.handle(self, 'POST')
    def do_DELETE(self): self.server.fake.handle(self, 'DELETE')
    def log_message(self, *a): pass

class Server(ThreadingHTTPServer):
    block_on_close = False   # idle keep-alive connections must not hold up the fixture's teardown
    daemon_threads = True
    def handle_error(self, request, client_address):
        import sys
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):   # a client killed mid-request: expected
            super().handle_error(request, client_address)

@contextmanager
def serve(fake:FakeAlpaca|None=None):
    "`fake` (a new one by default) served on a free 127.0.0.1 port in a thread, its `url` set; stopped on exit."
    from conftest import loopback_server
    with loopback_server(Server, Handler, fake or FakeAlpaca()) as f: yield f
