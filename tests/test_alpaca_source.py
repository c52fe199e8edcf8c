"""Contract test of the Alpaca historical-bars source (`trader.core.data.alpaca_bars`, nbs/01_data.ipynb).

Nothing here reaches Alpaca: a real HTTP server on 127.0.0.1 (a free port, one per test) answers alpaca-py's
`GET /v2/stocks/bars` the way the market-data v2 API does, and fails on purpose (429, 5xx, dropped connections,
401/403/422) when a test asks it to. The server checks what alpaca-py sends (path, query parameters, auth headers,
page tokens) and filters bars by `start`/`end` inclusively, as Alpaca does. The bars it serves are real: raw daily
AAPL and MSFT bars of 2012-01-03..2012-01-20 from the embedded sample, stamped at midnight New York time (05:00Z in
winter, 04:00Z in summer) as Alpaca stamps daily bars.
"""
from __future__ import annotations
import base64, datetime as dt, json, logging, os, subprocess, sys, threading, time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np, pandas as pd, pytest
from conftest import loopback_server

from trader.core.config import ConfigError, TraderError, load_settings
from trader.core.data import BAR_COLUMNS, DataError, alpaca_bars, load_sample
from trader.core.store import Store

REPO = Path(__file__).resolve().parents[1]
TRADER = Path(sys.executable).parent/'trader'     # the console script of the interpreter running the tests
KEY = 'PKTEST7Q2L9XC4VB0N'
SECRET = 'sk-test-Zq8f3T1vR6yW2uP0aN5m'   # distinctive: a leak cannot be mistaken for ordinary words
START, END = '2012-01-03', '2012-01-20'   # 13 XNYS sessions; 2012-01-16 (Martin Luther King Jr. Day) was a holiday
NY = 'America/New_York'

# ---------------------------------------------------------------------------------------------------------------
# Bars as Alpaca serves them

SAMPLE = load_sample(['AAPL', 'MSFT'], start=START, end=END, adjusted=False)[BAR_COLUMNS]

def alpaca_t(session:pd.Timestamp) -> str:
    "Alpaca's timestamp of the daily bar of `session`: midnight New York time, in UTC."
    return pd.Timestamp(session.date()).tz_localize(NY).tz_convert('UTC').strftime('%Y-%m-%dT%H:%M:%SZ')

def to_alpaca(df:pd.DataFrame) -> dict[str, list[dict]]:
    "Bars in the bar schema -> the per-symbol lists of a v2 multi-symbol bars answer."
    out = {}
    for sym, g in df.groupby('symbol', sort=True):
        out[sym] = [{'t': alpaca_t(r.ts), 'o': float(r.open), 'h': float(r.high), 'l': float(r.low), 'c': float(r.close),
                     'v': int(r.volume), 'n': int(r.volume)//180, 'vw': round((r.high + r.low + r.close)/3, 4)}
                    for r in g.sort_values('ts').itertuples()]
    return out

BARS = to_alpaca(SAMPLE)

def test_served_bars_look_like_alpaca():
    assert sorted(BARS) == ['AAPL', 'MSFT'] and [len(BARS[s]) for s in BARS] == [13, 13]
    assert BARS['AAPL'][0] == {'t': '2012-01-03T05:00:00Z', 'o': 409.4, 'h': 412.5, 'l': 409.0, 'c': 411.23, 'v': 10793600,
                               'n': 59964, 'vw': 410.91}
    assert '2012-01-16T05:00:00Z' not in {b['t'] for b in BARS['MSFT']}   # MLK day: no session
    assert BARS['MSFT'][-1]['t'] == '2012-01-20T05:00:00Z'

# ---------------------------------------------------------------------------------------------------------------
# The fake market-data server

ERROR_BODIES = {   # what Alpaca answers (JSON with an error code and a message)
    400: {'code': 40010001, 'message': 'invalid request'},
    401: {'code': 40110000, 'message': 'request is not authorized'},
    403: {'message': 'forbidden'},
    404: {'message': 'Not Found'},
    422: {'code': 42210000, 'message': 'invalid timeframe'},
    429: {'code': 42910000, 'message': 'rate limit exceeded'},
    500: {'code': 50010000, 'message': 'internal server error'},
    502: {'message': 'bad gateway'},
    503: {'message': 'service unavailable'},
    504: {'message': 'gateway timeout'},
}
PARAMS = {'symbols', 'timeframe', 'start', 'end', 'limit', 'page_token', 'adjustment', 'feed', 'sort', 'asof', 'currency'}

@dataclass
class Seen:
    "One request as the server received it."
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    at: float

@dataclass
class FakeAlpaca:
    bars: dict[str, list[dict]]
    key: str = KEY
    secret: str = SECRET
    page_size: int = 1000            # Alpaca's default page size when no limit is sent
    faults: list = field(default_factory=list)  # one entry per request, consumed in order: None (answer), an HTTP status,
                                                # 'drop' (hang up without answering) or 'echo' (500 echoing the request headers)
    always: object = None            # the fault for every request once `faults` is used up
    requests: list[Seen] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)   # next_page_token values handed out, in order
    problems: list[str] = field(default_factory=list)  # requests the real API would have refused
    url: str = ''

    def __post_init__(self):
        self._lock, self._tokens = threading.Lock(), {}

    @property
    def tokens_sent(self): return [r.params.get('page_token') for r in self.requests]

    def handle(self, h:BaseHTTPRequestHandler):
        u = urlsplit(h.path)
        q = parse_qs(u.query, keep_blank_values=True)
        params = {k: v[-1] for k, v in q.items()}
        with self._lock:
            self.requests.append(Seen(u.path, params, dict(h.headers), time.monotonic()))
            fault = self.faults.pop(0) if self.faults else self.always
        if fault == 'drop':
            h.close_connection = True
            return
        if fault == 'echo': return self._send(h, 500, {'message': 'upstream failed', 'request_headers': dict(h.headers)})
        if fault is not None: return self._send(h, fault, ERROR_BODIES[fault])
        if h.headers.get('APCA-API-KEY-ID') != self.key or h.headers.get('APCA-API-SECRET-KEY') != self.secret:
            return self._send(h, 401, ERROR_BODIES[401])
        status, body = self._answer(u.path, q)
        if status != 200: self.problems.append(f"{status} {body['message']}: {h.path}")
        self._send(h, status, body)

    def _answer(self, path:str, q:dict[str, list[str]]) -> tuple[int, dict]:
        bad = lambda msg, status=400: (status, {'code': 40010001 if status == 400 else 42210000, 'message': msg})
        if path != '/v2/stocks/bars': return 404, ERROR_BODIES[404]
        if set(q) - PARAMS: return bad(f"unknown query parameter(s) {sorted(set(q) - PARAMS)}")
        if any(len(v) > 1 for v in q.values()): return bad('repeated query parameter')
        p = {k: v[0] for k, v in q.items()}
        syms = p.get('symbols', '').split(',')
        if not all(s and s == s.upper() and s.replace('.', '').isalpha() for s in syms): return bad(f"invalid symbols {p.get('symbols')!r}")
        if p.get('timeframe') != '1Day': return bad(f"timeframe {p.get('timeframe')!r}: this server only has 1Day bars", 422)
        if p.get('adjustment', 'raw') not in ('raw', 'split', 'dividend', 'all'): return bad(f"invalid adjustment {p['adjustment']!r}", 422)
        if p.get('feed', 'sip') not in ('sip', 'iex', 'otc', 'boats', 'overnight', 'delayed_sip'): return bad(f"invalid feed {p['feed']!r}", 422)
        bounds = {}
        for k in ('start', 'end'):
            if k not in p: continue
            try: t = dt.datetime.fromisoformat(p[k])
            except ValueError: return bad(f"{k} {p[k]!r} is not RFC-3339")
            if t.tzinfo is None: return bad(f"{k} {p[k]!r} has no UTC offset")
            bounds[k] = pd.Timestamp(t).tz_convert('UTC')
        if 'start' in bounds and 'end' in bounds and bounds['end'] < bounds['start']: return bad('end is before start', 422)
        try: limit = int(p.get('limit', 1000))
        except ValueError: return bad(f"invalid limit {p['limit']!r}")
        if not 1 <= limit <= 10_000: return bad(f"limit {limit} out of range [1, 10000]", 422)
        query = {k: v for k, v in p.items() if k != 'page_token'}
        offset = 0
        if 'page_token' in p:
            tok = self._tokens.get(p['page_token'])
            if tok is None: return bad(f"invalid page token {p['page_token']!r}")
            if tok[0] != query: return bad('page_token used with a different query')
            offset = tok[1]
        rows = [(s, b) for s in sorted(set(syms)) for b in self.bars.get(s, [])
                if bounds.get('start', pd.Timestamp.min.tz_localize('UTC')) <= pd.Timestamp(b['t']) <= bounds.get('end', pd.Timestamp.max.tz_localize('UTC'))]
        page = rows[offset:offset + min(limit, self.page_size)]
        nxt = None
        if offset + len(page) < len(rows):
            nxt = base64.b64encode(f"{page[-1][0]}|{page[-1][1]['t']}".encode()).decode()
            self._tokens[nxt] = (query, offset + len(page))
            self.issued.append(nxt)
        out = {}
        for s, b in page: out.setdefault(s, []).append(b)
        return 200, {'bars': out, 'next_page_token': nxt}

    @staticmethod
    def _send(h, status:int, body:dict):
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header('Content-Type', 'application/json; charset=UTF-8')
        h.send_header('Content-Length', str(len(data)))
        h.end_headers()
        h.wfile.write(data)

class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'   # keep-alive, as the real API
    timeout = 10                    # idle keep-alive connections do not outlive a test for long
    def do_GET(self): self.server.fake.handle(self)
    def log_message(self, *a): pass

@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    "Loopback is never sent through a proxy a CI machine may have configured."
    for k in ('NO_PROXY', 'no_proxy'): monkeypatch.setenv(k, '127.0.0.1,localhost')

@pytest.fixture
def server():
    fake = FakeAlpaca({s: list(b) for s, b in BARS.items()})
    with loopback_server(ThreadingHTTPServer, _Handler, fake): yield fake
    assert not fake.problems, f"requests the real Alpaca API would refuse: {fake.problems}"

def settings_for(tmp_path, server, key=KEY, secret=SECRET, **alpaca):
    env = {'TRADER_HOME': str(tmp_path)}
    if key is not None: env['APCA_API_KEY_ID'] = key
    if secret is not None: env['APCA_API_SECRET_KEY'] = secret
    return load_settings(env, alpaca={'data_url': server.url, 'backoff': 0.01, 'max_backoff': 0.05, **alpaca})

def fetch(tmp_path, server, symbols='AAPL,MSFT', start=START, end=END, settings=None, **alpaca):
    return alpaca_bars(symbols, start, end, settings=settings or settings_for(tmp_path, server, **alpaca))

def check_bar_schema(df:pd.DataFrame):
    assert list(df.columns) == BAR_COLUMNS
    assert str(df.ts.dtype) == 'datetime64[ns, UTC]'
    assert all(df[c].dtype == np.float64 for c in BAR_COLUMNS[2:])
    assert (df.ts == df.ts.dt.normalize()).all(), 'daily bars are stamped at 00:00 UTC of the session date'
    assert not df.duplicated(['symbol', 'ts']).any()
    assert df.equals(df.sort_values(['symbol', 'ts'], ignore_index=True))

def check_is_sample(df:pd.DataFrame, expected:pd.DataFrame=SAMPLE):
    check_bar_schema(df)
    pd.testing.assert_frame_equal(df.reset_index(drop=True), expected.reset_index(drop=True), check_exact=True)

# ---------------------------------------------------------------------------------------------------------------
# What goes over the wire

@pytest.mark.parametrize('feed,adjustment', [(None, 'all'), ('iex', 'raw'), ('sip', 'split')])
def test_request_is_what_the_v2_api_expects(tmp_path, server, feed, adjustment):
    s = settings_for(tmp_path, server, feed=feed)
    df = alpaca_bars('aapl, MSFT', START, END, adjustment=adjustment, settings=s)
    assert len(df) == 26
    [r] = server.requests
    assert r.path == '/v2/stocks/bars'
    assert r.headers['APCA-API-KEY-ID'] == KEY and r.headers['APCA-API-SECRET-KEY'] == SECRET
    assert 'Authorization' not in r.headers
    assert r.headers['User-Agent'].startswith('APCA-PY/')
    p = r.params
    assert set(p) == {'symbols', 'timeframe', 'start', 'end', 'adjustment', 'limit'} | ({'feed'} if feed else set())
    assert p['symbols'] == 'AAPL,MSFT' and p['timeframe'] == '1Day' and p['adjustment'] == adjustment and p['limit'] == '10000'
    assert p.get('feed') == feed
    start, end = (pd.Timestamp(dt.datetime.fromisoformat(p[k])) for k in ('start', 'end'))
    # Alpaca's start and end are inclusive bounds on the bar timestamps, and daily bars are stamped at midnight New York
    # time: the range must take in the bars of 2012-01-03 (05:00Z) through 2012-01-20 (05:00Z), and nothing later.
    assert pd.Timestamp('2012-01-02T05:00Z') < start <= pd.Timestamp('2012-01-03T05:00Z')
    assert pd.Timestamp('2012-01-20T05:00Z') <= end < pd.Timestamp('2012-01-21T05:00Z')

def test_end_date_is_inclusive(tmp_path, server):
    "The last requested session comes back although Alpaca stamps it hours after midnight UTC."
    df = fetch(tmp_path, server, start='2012-01-19', end='2012-01-20')
    assert df.ts.dt.strftime('%Y-%m-%d').unique().tolist() == ['2012-01-19', '2012-01-20']
    df = fetch(tmp_path, server, start='2012-01-20', end='2012-01-20')
    assert df.symbol.tolist() == ['AAPL', 'MSFT'] and (df.ts == pd.Timestamp('2012-01-20', tz='UTC')).all()

def test_daily_bars_are_stamped_at_the_session_date_across_dst(tmp_path, server):
    "05:00Z (EST) and 04:00Z (EDT, from 2012-03-11) both become 00:00 UTC of the session date."
    march = load_sample('AAPL', start='2012-03-05', end='2012-03-16', adjusted=False)[BAR_COLUMNS]
    server.bars = to_alpaca(march)
    assert {b['t'][11:] for b in server.bars['AAPL']} == {'05:00:00Z', '04:00:00Z'}
    df = fetch(tmp_path, server, symbols='AAPL', start='2012-03-05', end='2012-03-16')
    check_is_sample(df, march)

def test_no_bars_gives_an_empty_frame_in_the_bar_schema(tmp_path, server):
    df = fetch(tmp_path, server, start='2012-01-14', end='2012-01-16')   # a weekend and a holiday
    assert df.empty and list(df.columns) == BAR_COLUMNS and str(df.ts.dtype) == 'datetime64[ns, UTC]'
    assert len(server.requests) == 1

# ---------------------------------------------------------------------------------------------------------------
# 1. Pagination

def test_pagination_returns_every_bar_once(tmp_path, server):
    server.page_size = 10   # 26 bars -> pages of 10, 10 and 6; the second page holds the end of AAPL and the start of MSFT
    df = fetch(tmp_path, server)
    assert len(server.requests) == 3 and len(server.issued) == 2
    assert server.tokens_sent == [None, *server.issued]          # each page asked with the token the previous one gave
    assert all({k: v for k, v in r.params.items() if k != 'page_token'} == server.requests[0].params for r in server.requests)
    check_is_sample(df)

def test_pagination_one_bar_per_page(tmp_path, server):
    server.page_size = 1
    df = fetch(tmp_path, server, start='2012-01-03', end='2012-01-05')
    assert len(server.requests) == 6
    check_is_sample(df, SAMPLE[SAMPLE.ts <= '2012-01-05'])

# ---------------------------------------------------------------------------------------------------------------
# 2. Retries (tenacity, settings.alpaca.retries/backoff/max_backoff)

@pytest.mark.parametrize('status', [429, 500, 502, 503, 504])
def test_rate_limit_and_server_errors_are_retried(tmp_path, server, status):
    server.faults = [status, status]
    df = fetch(tmp_path, server)
    assert len(server.requests) == 3
    assert all(r.params == server.requests[0].params for r in server.requests)
    check_is_sample(df)

def test_single_503_is_retried(tmp_path, server):
    server.faults = [503]
    check_is_sample(fetch(tmp_path, server))
    assert len(server.requests) == 2

def test_dropped_connection_is_retried(tmp_path, server):
    server.faults = ['drop']
    check_is_sample(fetch(tmp_path, server))
    assert len(server.requests) == 2

def test_retry_resumes_at_the_failed_page(tmp_path, server):
    "A 429 on page 2 repeats page 2 only: starting over would spend the rate limit again on pages already fetched."
    server.page_size, server.faults = 10, [None, 429, 503]
    df = fetch(tmp_path, server)
    t1, t2 = server.issued
    assert server.tokens_sent == [None, t1, t1, t1, t2]
    check_is_sample(df)

def test_backoff_grows_and_is_capped(tmp_path, server, monkeypatch):
    "The waits between retries double from `backoff` up to `max_backoff`: asserted on the waits asked for, and that they were waited."
    me, slept, real_sleep = threading.get_ident(), [], time.sleep
    monkeypatch.setattr(time, 'sleep', lambda s: (slept.append(s) if threading.get_ident() == me else None, real_sleep(s))[1])
    server.faults = [500, 500, 500]
    check_is_sample(fetch(tmp_path, server, backoff=0.1, max_backoff=0.2))
    assert slept == pytest.approx([0.1, 0.2, 0.2]), slept        # uncapped, the third wait would be 0.4 s
    gaps = np.diff([r.at for r in server.requests])
    assert len(gaps) == 3 and (gaps >= np.array(slept) - 0.01).all(), gaps   # as long as asked, at least (longer on a busy machine)

def test_persistent_500_raises_after_all_retries(tmp_path, server):
    server.always = 500
    with pytest.raises(DataError) as e: fetch(tmp_path, server, retries=2)
    assert len(server.requests) == 3   # retries + 1 attempts
    msg = str(e.value)
    assert 'HTTP 500' in msg and 'internal server error' in msg
    assert e.value.exit_code == 2

def test_persistent_connection_drop_raises_after_all_retries(tmp_path, server):
    server.always = 'drop'
    with pytest.raises(DataError, match='unreachable after 2 retries') as e: fetch(tmp_path, server, retries=2)
    assert len(server.requests) == 3
    assert 'ConnectionError' in str(e.value)

@pytest.mark.parametrize('status', [429, 504])   # the codes alpaca-py itself would retry (after sleeping 3 s)
def test_alpaca_py_own_retry_is_off(tmp_path, server, status):
    "With retries=0 there is exactly one request: alpaca-py's built-in retry (client._retry) is switched off (it would have sent a second after 3 s)."
    server.always = status
    with pytest.raises(DataError, match=f'HTTP {status}'): fetch(tmp_path, server, retries=0)
    assert len(server.requests) == 1, server.requests           # the fetch has returned: no retry can still come

# ---------------------------------------------------------------------------------------------------------------
# 3. Client errors fail at once

def test_wrong_credentials_fail_at_once(tmp_path, server):
    with pytest.raises(DataError) as e: fetch(tmp_path, server, settings=settings_for(tmp_path, server, secret='wrong-secret'))
    assert len(server.requests) == 1
    assert 'HTTP 401' in str(e.value) and 'request is not authorized' in str(e.value)

@pytest.mark.parametrize('status', [401, 403, 422])
def test_client_errors_fail_at_once(tmp_path, server, status):
    server.always = status
    with pytest.raises(DataError) as e: fetch(tmp_path, server)
    assert len(server.requests) == 1
    assert f'HTTP {status}' in str(e.value) and ERROR_BODIES[status]['message'] in str(e.value)

# ---------------------------------------------------------------------------------------------------------------
# 4. Missing credentials

@pytest.mark.parametrize('key,secret', [(None, None), (KEY, None), (None, SECRET), ('', '')])
def test_missing_credentials(tmp_path, server, key, secret):
    s = settings_for(tmp_path, server, key=key, secret=secret)
    with pytest.raises(ConfigError) as e: alpaca_bars('AAPL', START, END, settings=s)
    assert 'APCA_API_KEY_ID' in str(e.value) and 'APCA_API_SECRET_KEY' in str(e.value)
    assert isinstance(e.value, TraderError) and e.value.exit_code == 2
    assert SECRET not in str(e.value)
    assert server.requests == []

# ---------------------------------------------------------------------------------------------------------------
# 5. The secret never shows

@pytest.mark.parametrize('fault', [500, 503, 401, 403, 422, 'drop', 'echo'])
def test_secret_never_in_errors_or_logs(tmp_path, server, caplog, fault):
    "'echo' is a 500 whose body repeats the request headers (as some proxies and debug gateways do)."
    server.always = fault
    with caplog.at_level(logging.DEBUG), pytest.raises(DataError) as e: fetch(tmp_path, server, retries=1)
    assert SECRET not in str(e.value) and SECRET not in repr(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__   # the alpaca-py exception is not chained into tracebacks
    assert SECRET not in caplog.text
    if fault == 'echo': assert SECRET in json.dumps(server.requests[0].headers)   # the server did see (and echo) it

# ---------------------------------------------------------------------------------------------------------------
# 6. End to end: `trader ingest --source alpaca` in a subprocess

def run_cli(tmp_path, server, *extra, creds=True):
    toml = tmp_path/'trader.toml'
    toml.write_text(f'[alpaca]\ndata_url = "{server.url}"\nbackoff = 0.01\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(('TRADER_', 'APCA_'))}
    env.update(TRADER_HOME=str(tmp_path), TRADER_CONFIG=str(toml), TRADER_DB_URL='', NO_PROXY='127.0.0.1,localhost',
               no_proxy='127.0.0.1,localhost')
    if creds: env.update(APCA_API_KEY_ID=KEY, APCA_API_SECRET_KEY=SECRET)
    cmd = [str(TRADER), *extra, 'ingest', '--source', 'alpaca', '--symbols', 'AAPL,MSFT', '--start', START, '--end', END]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)

def store(tmp_path) -> Store:
    return Store(f'sqlite:///{tmp_path}/trader.db', settings=load_settings({'TRADER_HOME': str(tmp_path)}))

def test_cli_ingest_stores_the_served_bars(tmp_path, server):
    server.page_size = 10
    r = run_cli(tmp_path, server)
    assert r.returncode == 0, r.stderr
    assert 'stored 26 bars (AAPL 13, MSFT 13) 2012-01-03..2012-01-20' in r.stdout
    assert len(server.requests) == 3 and server.requests[0].params['adjustment'] == 'all'
    assert all(q.headers['APCA-API-SECRET-KEY'] == SECRET for q in server.requests)
    with store(tmp_path) as st:
        assert st.count_bars() == 26 and st.count_bars('AAPL') == 13 and st.count_bars('MSFT') == 13
        got = st.read_bars(['AAPL', 'MSFT'], START, END, '1Day')
    pd.testing.assert_frame_equal(got[BAR_COLUMNS].reset_index(drop=True), SAMPLE, check_exact=True)
    assert SECRET not in r.stdout + r.stderr

def test_cli_blocks_a_missing_session(tmp_path, server):
    server.bars['MSFT'] = [b for b in server.bars['MSFT'] if b['t'] != '2012-01-10T05:00:00Z']
    r = run_cli(tmp_path, server)
    assert r.returncode == 2, r.stdout + r.stderr
    assert 'blocked' in r.stderr and 'missing_sessions' in r.stderr and 'nothing was written to the store' in r.stderr
    with store(tmp_path) as st: assert st.count_bars() == 0
    assert list((tmp_path/'quality'/'rejected').glob('*.json'))

def test_cli_api_error_exits_2_without_the_secret(tmp_path, server):
    server.always = 403
    r = run_cli(tmp_path, server, '-v')
    assert r.returncode == 2
    assert 'error: Alpaca data API error (HTTP 403)' in r.stderr
    assert len(server.requests) == 1
    assert SECRET not in r.stdout + r.stderr

def test_cli_missing_credentials(tmp_path, server):
    r = run_cli(tmp_path, server, creds=False)
    assert r.returncode == 2
    assert 'APCA_API_KEY_ID' in r.stderr and 'APCA_API_SECRET_KEY' in r.stderr
    assert server.requests == []
