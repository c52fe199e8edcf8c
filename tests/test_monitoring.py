"""Monitoring: the alert rules (`monitoring/alerts.yml`) under promtool, and a real Prometheus scraping a paper replay.

Needs `promtool` and `prometheus` (Debian: `apt-get install prometheus`; `.ci/run` installs it). Without them the tests
are skipped locally and fail in CI (CI=true). Everything listens on loopback ports picked at random.
"""
import json, os, re, shutil, signal, subprocess, sys, time, urllib.parse, urllib.request
from pathlib import Path
import pytest
from conftest import free_port, hang_guard, stop, tail

ROOT = Path(__file__).resolve().parents[1]
RULES, RULES_TEST = ROOT/'monitoring'/'alerts.yml', ROOT/'monitoring'/'alerts_test.yml'
TRADER = str(Path(sys.executable).parent/'trader')
FAST = '[train]\nn_steps = 128\nbatch_size = 64\nn_epochs = 2\ncheckpoint_every = 0\n'
ALERTS = {'GuardianFired', 'KillSwitchFired', 'DailyGateRed', 'HeartbeatStale', 'DecisionLatencyP95High', 'OrderLatencyP99High',
          'DataQualityLow', 'DrawdownHigh', 'RiskLimitBreached', 'ModelInputDrift'}
WAIT = hang_guard(6)                            # bound of every wait loop, seconds: Prometheus ready, a target seen, a rule evaluated
SCRAPED_WAIT = hang_guard(12)                   # the paper replay's start (~8 s idle) until two scrapes of it with a bar counted
# ~250 bars at 1 bar/s: ~250 s of serving, longer than SCRAPED_WAIT, so only a hang lets the replay end before Prometheus has
# scraped it twice while it serves; the test stops it (SIGTERM) as soon as it has
REPLAY, SPEED = '2012-01-03:2012-12-31', 1
HINT = "install it with `apt-get install prometheus` (Debian; provides /usr/bin/prometheus and /usr/bin/promtool)"

def binary(name:str) -> str:
    "Path of `name`; a missing one skips the test locally and fails it in CI."
    path = shutil.which(name) or (f'/usr/bin/{name}' if os.access(f'/usr/bin/{name}', os.X_OK) else None)
    if path: return path
    if os.environ.get('CI') == 'true':
        pytest.fail(f"{name} is required in CI but was not found; the CI entry point (.ci/run) installs the Debian package `prometheus`", pytrace=False)
    pytest.skip(f"{name} not found; {HINT}")

# -- the rules under promtool ----------------------------------------------------------------------------------------
def test_promtool_check_rules():
    r = subprocess.run([binary('promtool'), 'check', 'rules', str(RULES)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f'SUCCESS: {len(ALERTS)} rules found' in r.stdout + r.stderr

def test_promtool_test_rules():
    "Each alert fires above its threshold and stays silent at or below it (see monitoring/alerts_test.yml)."
    r = subprocess.run([binary('promtool'), 'test', 'rules', str(RULES_TEST)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and 'SUCCESS' in r.stdout + r.stderr, r.stdout + r.stderr
    names = set(re.findall(r'alertname:\s*(\w+)', RULES_TEST.read_text()))
    assert names == ALERTS, f'alerts_test.yml tests {sorted(names)}, the rules are {sorted(ALERTS)}'

def test_example_config_is_valid():
    r = subprocess.run([binary('promtool'), 'check', 'config', str(ROOT/'monitoring'/'prometheus.yml')], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr

# -- a real Prometheus scraping `trader paper --metrics-port` ----------------------------------------------------------
class Prom:
    "A Prometheus server on 127.0.0.1:port scraping the trading loop on 127.0.0.1:metrics_port every second."
    def __init__(self, tmp:Path):
        self.exe, self.tmp = binary('prometheus'), tmp
        self.port, self.metrics_port = free_port(), free_port()
        while self.metrics_port == self.port: self.metrics_port = free_port()
        self.config = tmp/'prometheus.yml'
        self.config.write_text(json.dumps({      # JSON is YAML
            'global': {'scrape_interval': '1s', 'scrape_timeout': '1s', 'evaluation_interval': '1s'},
            'rule_files': [str(RULES)],
            'scrape_configs': [{'job_name': 'trader', 'static_configs': [{'targets': [f'127.0.0.1:{self.metrics_port}']}]}]}, indent=1))
        self.log = tmp/'prometheus.log'
        with open(self.log, 'wb') as log:
            self.proc = subprocess.Popen([self.exe, f'--config.file={self.config}', f'--storage.tsdb.path={tmp/"data"}',
                                          f'--web.listen-address=127.0.0.1:{self.port}'], stdout=log, stderr=subprocess.STDOUT, cwd=tmp)

    def get(self, path:str, **params):
        url = f'http://127.0.0.1:{self.port}{path}' + ('?' + urllib.parse.urlencode(params) if params else '')
        with urllib.request.urlopen(url, timeout=5) as r: body = r.read().decode()
        return json.loads(body) if path.startswith('/api/') else body

    def api(self, path:str, **params):
        r = self.get(path, **params)
        assert r['status'] == 'success', r
        return r['data']

    def wait(self, what:str, cond, timeout:float=WAIT, every:float=0.2):
        "Poll `cond()` until it returns something truthy (returned), at most `timeout` seconds."
        end, last = time.monotonic() + timeout, None
        while time.monotonic() < end:
            if self.proc.poll() is not None: pytest.fail(f'prometheus exited ({self.proc.returncode}) while waiting for {what}:\n{tail(self.log)}')
            try:
                v = cond()
                if v: return v
            except OSError as e: last = e
            time.sleep(every)
        pytest.fail(f'timed out after {timeout:g}s waiting for {what} (last error: {last})\n{tail(self.log)}')

    def targets(self) -> list:
        return self.api('/api/v1/targets')['activeTargets']

@pytest.fixture(scope='module')
def prometheus(tmp_path_factory):
    "Started first, so it discovers its (not yet running) target while the store is being prepared."
    p = Prom(tmp_path_factory.mktemp('prometheus'))
    try:
        p.wait('prometheus to be ready', lambda: p.get('/-/ready'))
        yield p
    finally: stop(p.proc)

def trader_env(home:Path) -> dict:
    return {**os.environ, 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(home/'trader.toml'),
            'TRADER_REPORTS': str(home/'reports'), 'NUMBA_CACHE_DIR': os.environ.get('NUMBA_CACHE_DIR', str(ROOT/'.cache'/'numba'))}

def trader(home:Path, *args) -> subprocess.CompletedProcess:
    r = subprocess.run([TRADER, *args], capture_output=True, text=True, env=trader_env(home), timeout=300)
    assert r.returncode == 0, f'trader {" ".join(args)}: {r.stdout}\n{r.stderr}'
    return r

@pytest.fixture(scope='module')
def home(tmp_path_factory) -> Path:
    "A store with the sample bars and a small champion model."
    h = tmp_path_factory.mktemp('monitor-home')
    (h/'trader.toml').write_text(FAST)
    trader(h, 'ingest', '--source', 'sample', '--symbols', 'AAPL,MSFT', '-q')
    out = trader(h, 'train', '--symbols', 'AAPL,MSFT', '--steps', '512', '-q').stdout
    m = re.search(r'registered (\S+):', out); assert m, out
    trader(h, 'models', 'champion', m.group(1))
    return h

def series(prom:Prom, name:str) -> dict:
    "Raw samples {timestamp: value} of `name` over the last 5 minutes (a range query: staleness markers left out)."
    res = prom.api('/api/v1/query', query=f'{name}[5m]')['result']
    assert len(res) <= 1, res
    return {float(t): float(v) for t, v in res[0]['values']} if res else {}

def test_prometheus_scrapes_paper_replay(prometheus, home, spawn):
    prom = prometheus
    # the target is known (down: nothing serves yet) before the loop starts, so no scrape slot is lost to discovery
    prom.wait('the scrape target to be discovered', lambda: [t for t in prom.targets() if t['labels'].get('job') == 'trader'])
    paper = spawn(TRADER, 'paper', '--broker', 'sim', '--model', 'champion', '--replay', REPLAY, '--speed', str(SPEED),
                  '--metrics-port', str(prom.metrics_port), env=trader_env(home), name='paper')
    def scraped_twice() -> bool:
        try: return len([v for v in series(prom, 'trader_decision_latency_seconds_count').values() if v > 0]) >= 2
        except OSError: return False
    seen_up, counts, end = False, [], time.monotonic() + SCRAPED_WAIT
    while not scraped_twice():
        # while the loop serves: target up, then the count as Prometheus has it, until two scrapes counted a bar
        assert paper.poll() is None, f'the paper replay ended ({paper.returncode}) before Prometheus scraped it twice:\n{tail(paper.out)}'
        assert time.monotonic() < end, f'Prometheus did not scrape the paper replay twice within {SCRAPED_WAIT:g}s:\n{tail(paper.out)}\n{prom.targets()}'
        try:
            if any(t['health'] == 'up' for t in prom.targets()):
                seen_up = True
                res = prom.api('/api/v1/query', query='trader_decision_latency_seconds_count')['result']
                if res: counts.append(float(res[0]['value'][1]))
        except OSError: pass
        time.sleep(0.2)
    paper.send_signal(signal.SIGTERM)           # done: it stops after the bar in progress, its endpoint lingers a few seconds
    assert paper.wait(hang_guard(5)) == 0, tail(paper.out)
    out = paper.out.read_text(errors='replace')
    assert 'stopped (SIGTERM)' in out, out
    m = re.search(r'(\d+) bars in', out); assert m, out
    bars = int(m.group(1))
    assert seen_up, f'prometheus never reported the target 127.0.0.1:{prom.metrics_port} up:\n{prom.targets()}\n{out}'
    assert counts and max(counts) > 0, f'trader_decision_latency_seconds_count as queried while the loop ran: {counts}'
    # every scrape: one decision-latency observation per processed bar. The loop observes the latency, commits the bar,
    # then counts it, and a scrape can fall in between: the histogram may be one ahead of the counter, never more.
    lat, done = series(prom, 'trader_decision_latency_seconds_count'), series(prom, 'trader_bars_processed_total')
    assert len(lat) >= 2, f'fewer than 2 scrapes landed while the loop ran: {lat}'
    assert lat.keys() == done.keys(), (lat, done)
    for t in lat: assert 0 <= lat[t] - done[t] <= 1, (t, lat[t], done[t])
    vals = [lat[t] for t in sorted(lat)]
    assert vals == sorted(vals) and 0 < vals[-1] <= bars, (vals, bars)
    print(f'\nprometheus saw trader_decision_latency_seconds_count up to {max(counts):g} while serving (queried), '
          f'{len(lat)} scrapes {vals} vs bars {[done[t] for t in sorted(done)]}; the run processed {bars} bars')
    # the alert rules were loaded and evaluate without errors
    def rules_ok():
        groups = prom.api('/api/v1/rules')['groups']
        rules = {r['name']: r for g in groups if g['name'] == 'trader' for r in g['rules']}
        return rules if set(rules) == ALERTS and all(r['health'] == 'ok' for r in rules.values()) else None
    rules = prom.wait('the trader alert rules to be loaded and evaluated', rules_ok)
    assert all(r['type'] == 'alerting' and r['state'] in ('inactive', 'pending', 'firing') for r in rules.values()), rules
