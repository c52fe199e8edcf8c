"""Alerts that reach someone: Alertmanager's shipped configuration under amtool, its systemd unit, and the whole path end to end.

End to end, everything real and on loopback ports picked at random: a paper session (`trader paper --metrics-port`) scraped by
Prometheus, which evaluates a copy of monitoring/alerts.yml and hands firing alerts to Alertmanager running
monitoring/alertmanager.yml, whose receivers post to a webhook receiver this module serves in a thread (no e-mail, no Slack).
The test's copies shorten only the clocks: scrape and evaluation every second, `for:` durations dropped, group_wait 1 s for
critical and 2 s for warning alerts (the shipped 10 s and 30 s, in the same order), and a heartbeat older than 1 s counts as
stale (the shipped bound is 120 s). Routes, grouping, receivers, inhibition and the rules' expressions and templates are the
shipped ones.

The session is built to trip what it is watched for: a prepared model that always buys both assets, a guardian that fires at
a 0.2% drawdown within a day (it fires on the session's 5th bar, 2012-01-09) and stays halted (`halt_resume_sessions = 0`),
gate targets no run can meet (rolling Sharpe above 100), and a replay at 0.5 bars/s, so the loop's heartbeat (set after each
bar) is up to 2 s old. The webhook must receive GuardianFired within 60 s of the halt being committed (the issue's bound; ~3 s
on an idle machine) with the session's run id, the guardian's reason and the dashboard link from the settings; the daily
gate's RED (the gate's own `run_gate`, as `trader gate` records it) and HeartbeatStale follow; RiskLimitBreached, a consequence
of the halt, is inhibited by Alertmanager and never reaches the webhook; and `trader alerts test` arrives the same way.

Needs Prometheus with promtool (Debian `prometheus`) and Alertmanager with amtool (Debian `prometheus-alertmanager`, whose
binary is /usr/bin/prometheus-alertmanager); `.ci/run` installs both. Without them the tests skip locally and fail in CI
(CI=true). Every wait polls for its condition and gives up only after `hang_guard` (tests/conftest.py) of its idle time.
"""
import http.server, json, os, re, shutil, sqlite3, subprocess, sys, threading, time, urllib.parse, urllib.request
from pathlib import Path
import pytest, yaml
from fastcore.test import test_eq as _test_eq
from conftest import free_port, hang_guard, loopback_server, stop, tail

ROOT = Path(__file__).resolve().parents[1]
MON = ROOT/'monitoring'
RULES, AM_CONFIG, AM_EXAMPLES = MON/'alerts.yml', MON/'alertmanager.yml', MON/'alertmanager.examples.yml'
UNIT = ROOT/'deploy'/'trader-alertmanager.service'
TRADER = str(Path(sys.executable).parent/'trader')
DASHBOARD = 'http://dashboard.alerts-test.invalid:8866'      # the settings' link, so its arrival proves where it came from
TOML = ('[risk]\nguardian_day_drawdown = 0.002\nhalt_resume_sessions = 0\n\n[gate]\nsharpe_min = 100.0\nsharpe_warn = 99.0\n\n'
        f'[monitor]\ndashboard_url = "{DASHBOARD}"\n')
REPLAY, SPEED, STALE_S = '2012-01-03:2012-12-31', 0.5, 1
WAIT = hang_guard(3)             # a server ready, a target discovered
HALT_WAIT = hang_guard(20)       # the paper session's start (~8 s idle) and 5 bars at 0.5 bars/s until the guardian's halt is committed
GUARDIAN_TO_WEBHOOK = 60         # the bound from the halt to the webhook (~3 s idle: scrape, evaluation, group_wait)
DELIVERY = hang_guard(8)         # any other alert from its cause to the webhook (~3 s idle; the gate's verdict is re-read every 5 s)
HINT = {'prometheus': 'prometheus', 'promtool': 'prometheus', 'prometheus-alertmanager': 'prometheus-alertmanager', 'amtool': 'prometheus-alertmanager'}

def binary(*names:str) -> str:
    "The first of `names` found (PATH or /usr/bin); none skips the test locally and fails it in CI."
    for n in names:
        p = shutil.which(n) or (f'/usr/bin/{n}' if os.access(f'/usr/bin/{n}', os.X_OK) else None)
        if p: return p
    pkg = HINT.get(names[-1], names[-1])
    if os.environ.get('CI') == 'true':
        pytest.fail(f"{' or '.join(names)} is required in CI but was not found; the CI entry point (.ci/run) installs the Debian package `{pkg}`", pytrace=False)
    pytest.skip(f"{' or '.join(names)} not found; install it with `apt-get install {pkg}`")

def amtool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([binary('amtool'), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)

# -- the shipped configuration ----------------------------------------------------------------------------------------
def test_amtool_check_config(tmp_path):
    "The shipped configuration and the e-mail/Slack examples pass `amtool check-config`; a broken copy does not."
    for f in (AM_CONFIG, AM_EXAMPLES):
        r = amtool('check-config', str(f))
        assert r.returncode == 0 and 'SUCCESS' in r.stdout + r.stderr, r.stdout + r.stderr
        assert ' - 1 inhibit rules' in r.stdout and ' - 2 receivers' in r.stdout, r.stdout
    ex = yaml.safe_load(AM_EXAMPLES.read_text())
    kinds = {k for rc in ex['receivers'] for k in rc if k.endswith('_configs')}
    assert kinds == {'email_configs', 'slack_configs'}, kinds
    bad = AM_CONFIG.read_text().replace('receiver: page', 'receiver: pager', 1)
    p = tmp_path/'bad.yml'; p.write_text(bad)
    r = amtool('check-config', str(p))
    assert r.returncode != 0 and 'undefined receiver "pager"' in r.stdout + r.stderr, r.stdout + r.stderr

def test_routes_and_inhibition():
    "critical pages, warning and anything else make a ticket (amtool's route test); a halt inhibits its consequences per session; Prometheus sends to the settings' Alertmanager."
    for labels, receiver in ((['severity=critical', 'alertname=GuardianFired'], 'page'), (['severity=warning', 'alertname=DrawdownHigh'], 'ticket'),
                             (['alertname=Unlabelled'], 'ticket')):
        for f in (AM_CONFIG, AM_EXAMPLES):
            r = amtool('config', 'routes', 'test', f'--config.file={f}', *labels)
            assert r.returncode == 0 and r.stdout.strip() == receiver, (f.name, labels, r.stdout, r.stderr)
    cfg = yaml.safe_load(AM_CONFIG.read_text())
    _test_eq(cfg['route']['group_by'], ['alertname', 'session'])
    (inh,) = cfg['inhibit_rules']
    _test_eq(inh['equal'], ['session'])
    rules = {r['alert']: r for g in yaml.safe_load(RULES.read_text())['groups'] for r in g['rules']}
    src, dst = (set(re.search(r'=~"([^"]+)"', m[0]).group(1).split('|')) for m in (inh['source_matchers'], inh['target_matchers']))
    assert src == {'GuardianFired', 'KillSwitchFired'} and dst == {'DrawdownHigh', 'RiskLimitBreached'} and src | dst <= set(rules), (src, dst)
    for name, r in rules.items():     # what every notification needs
        assert r['labels']['severity'] in ('critical', 'warning'), name
        assert 'group_left(session, dashboard) trader_session_info' in r['expr'], name
        assert {'summary', 'description', 'reason', 'dashboard'} <= set(r['annotations']), name
    from trader.core.config import MonitorSettings
    prom = yaml.safe_load((MON/'prometheus.yml').read_text())
    (target,), = [c['targets'] for am in prom['alerting']['alertmanagers'] for c in am['static_configs']]
    _test_eq(f'http://{target}', MonitorSettings().alertmanager_url)
    assert '--web.listen-address=127.0.0.1:9093' in UNIT.read_text()

def test_unit_file_verifies(tmp_path):
    "deploy/trader-alertmanager.service passes `systemd-analyze verify` (ExecStart pointed at the binary found here); a typo is caught."
    exe = shutil.which('systemd-analyze')
    if exe is None:
        if os.environ.get('CI') == 'true': pytest.fail('systemd-analyze is missing in CI, but .ci/run installs systemd')
        pytest.skip('systemd-analyze is not installed (apt-get install systemd)')
    am = binary('prometheus-alertmanager', 'alertmanager')
    unit = UNIT.read_text()
    for key in ('ExecStart=/usr/bin/prometheus-alertmanager', '--config.file=/etc/prometheus/trader-alertmanager.yml', '--cluster.listen-address=\n',
                'StateDirectory=trader-alertmanager', 'ExecReload=/bin/kill -HUP $MAINPID', 'Restart=on-failure', 'Conflicts=prometheus-alertmanager.service'):
        assert key in unit, key
    (tmp_path/'trader-alertmanager.service').write_text(unit.replace('/usr/bin/prometheus-alertmanager', am))
    r = subprocess.run([exe, 'verify', str(tmp_path/'trader-alertmanager.service')], capture_output=True, text=True, timeout=120)
    mine = [l for l in (r.stdout + r.stderr).splitlines() if 'trader-alertmanager.service' in l]
    assert r.returncode == 0 and not mine, r.stdout + r.stderr
    (tmp_path/'bad.service').write_text(unit.replace('ExecReload=', 'ExecReloads='))
    r = subprocess.run([exe, 'verify', str(tmp_path/'bad.service')], capture_output=True, text=True, timeout=120)
    assert "Unknown key 'ExecReloads'" in r.stdout + r.stderr

def test_alerts_test_unreachable(tmp_path):
    "`trader alerts test` with nothing listening at monitor.alertmanager_url: exit 1 and one line naming the address."
    port = free_port()
    (tmp_path/'trader.toml').write_text(f'[monitor]\nalertmanager_url = "http://127.0.0.1:{port}"\n')
    r = subprocess.run([TRADER, 'alerts', 'test'], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'TRADER_HOME': str(tmp_path), 'TRADER_CONFIG': str(tmp_path/'trader.toml')})
    _test_eq(r.returncode, 1)
    assert r.stderr.startswith(f'error: cannot reach Alertmanager at http://127.0.0.1:{port} (') and r.stderr.count('\n') == 1, r.stderr
    assert 'monitor.alertmanager_url' in r.stderr and r.stdout == '', r.stdout

# -- end to end: paper session -> Prometheus -> Alertmanager -> webhook ---------------------------------------------------
class Webhook:
    "What Alertmanager posts to the webhook receiver (its JSON, version 4), in arrival order."
    def __init__(self): self.posts, self.lock = [], threading.Lock()
    def alerts(self, alertname:str|None=None, status:str='firing') -> list[tuple[str, dict]]:
        "(receiver, alert) of every notification so far, of `alertname` and `status`."
        with self.lock: posts = list(self.posts)
        return [(p['receiver'], a) for _, p in posts for a in p['alerts']
                if (alertname is None or a['labels'].get('alertname') == alertname) and a['status'] == status]

class _Hook(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get('Content-Length', 0))))
        with self.server.fake.lock: self.server.fake.posts.append((time.monotonic(), body))
        self.send_response(200); self.end_headers()

class Server:
    "A Prometheus or Alertmanager process on 127.0.0.1:port, its output in a log file."
    def __init__(self, cmd:list, port:int, log:Path):
        self.port, self.log = port, log
        with open(log, 'wb') as f: self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent, start_new_session=True)
    def get(self, path:str, **params):
        url = f'http://127.0.0.1:{self.port}{path}' + ('?' + urllib.parse.urlencode(params) if params else '')
        with urllib.request.urlopen(url, timeout=5) as r: body = r.read().decode()
        return json.loads(body) if '/api/' in path else body
    def alive(self):
        if self.proc.poll() is not None: pytest.fail(f'{self.proc.args[0]} exited ({self.proc.returncode}):\n{tail(self.log)}')

def wait_for(what:str, cond, timeout:float, *servers, every:float=0.2):
    "Poll `cond()` until it returns something truthy (returned), at most `timeout` seconds; a server that died fails at once."
    end, last = time.monotonic() + timeout, None
    while time.monotonic() < end:
        for s in servers: s.alive()
        try:
            if (v := cond()): return v
        except OSError as e: last = e
        time.sleep(every)
    pytest.fail(f'timed out after {timeout:g}s waiting for {what} (last error: {last})\n' + '\n'.join(f'--- {s.log.name}\n{tail(s.log)}' for s in servers))

def _shorten(route:dict, wait:str):
    "The test's clocks on a route and its children: critical groups wait 1 s, the others 2 s (the shipped 10 s and 30 s, same order)."
    crit = any('critical' in m for m in route.get('matchers', []))
    route.update(group_wait='1s' if crit else wait, group_interval='1s')
    for r in route.get('routes', []): _shorten(r, '2s')

@pytest.fixture(scope='module')
def webhook():
    with loopback_server(http.server.ThreadingHTTPServer, _Hook, Webhook()) as w: yield w

@pytest.fixture(scope='module')
def alertmanager(tmp_path_factory, webhook):
    "Alertmanager with the shipped configuration, its receivers pointed at the webhook and its clocks shortened."
    exe, tmp = binary('prometheus-alertmanager', 'alertmanager'), tmp_path_factory.mktemp('alertmanager')
    cfg = yaml.safe_load(AM_CONFIG.read_text())
    for rc in cfg['receivers']:
        for w in rc['webhook_configs']: w['url'] = f'{webhook.url}/trader-alerts'
    _shorten(cfg['route'], '2s')
    (tmp/'alertmanager.yml').write_text(yaml.safe_dump(cfg, sort_keys=False))
    port = free_port()
    am = Server([exe, f'--config.file={tmp/"alertmanager.yml"}', f'--storage.path={tmp/"data"}', f'--web.listen-address=127.0.0.1:{port}',
                 '--cluster.listen-address='], port, tmp/'alertmanager.log')
    try:
        wait_for('alertmanager to be ready', lambda: am.get('/-/ready'), WAIT, am)
        yield am
    finally: stop(am.proc)

@pytest.fixture(scope='module')
def prometheus(tmp_path_factory, alertmanager):
    "Prometheus scraping the loop's port every second, evaluating the shipped rules every second (no `for:`, a 1 s heartbeat bound), alerting to the Alertmanager above."
    exe, tmp = binary('prometheus'), tmp_path_factory.mktemp('prometheus')
    rules = yaml.safe_load(RULES.read_text())
    for g in rules['groups']:
        for r in g['rules']:
            r.pop('for', None)
            if r['alert'] == 'HeartbeatStale':
                assert '> 120)' in r['expr'], r['expr']; r['expr'] = r['expr'].replace('> 120)', f'> {STALE_S})')
    (tmp/'alerts.yml').write_text(yaml.safe_dump(rules, sort_keys=False, width=1000))
    port, metrics_port = free_port(), free_port()
    while metrics_port == port: metrics_port = free_port()
    (tmp/'prometheus.yml').write_text(json.dumps({
        'global': {'scrape_interval': '1s', 'scrape_timeout': '1s', 'evaluation_interval': '1s'},
        'rule_files': [str(tmp/'alerts.yml')],
        'alerting': {'alertmanagers': [{'static_configs': [{'targets': [f'127.0.0.1:{alertmanager.port}']}]}]},
        'scrape_configs': [{'job_name': 'trader', 'static_configs': [{'targets': [f'127.0.0.1:{metrics_port}']}]}]}, indent=1))
    prom = Server([exe, f'--config.file={tmp/"prometheus.yml"}', f'--storage.tsdb.path={tmp/"data"}', f'--web.listen-address=127.0.0.1:{port}',
                   f'--web.external-url=http://127.0.0.1:{port}'],     # the alerts' link back to the rule (generatorURL)
                  port, tmp/'prometheus.log')
    prom.metrics_port = metrics_port
    try:
        wait_for('prometheus to be ready', lambda: prom.get('/-/ready'), WAIT, prom)
        yield prom
    finally: stop(prom.proc)

def _env(home:Path) -> dict:
    return {**os.environ, 'TRADER_HOME': str(home), 'TRADER_DB_URL': '', 'TRADER_CONFIG': str(home/'trader.toml'),
            'TRADER_REPORTS': str(home/'reports'), 'NUMBA_CACHE_DIR': os.environ.get('NUMBA_CACHE_DIR', str(ROOT/'.cache'/'numba'))}

@pytest.fixture(scope='module')
def home(tmp_path_factory, alertmanager) -> Path:
    "The AAPL+MSFT sample and a champion that always buys both; the guardian and gate settings above; Alertmanager's address."
    from trader.core.config import load_settings
    from trader.core.data import load_sample
    from trader.core.quality import DataQualityGate
    from trader.core.registry import Registry
    from trader.core.store import Store
    from conftest import fixed_action_model
    h = tmp_path_factory.mktemp('alerts-home')
    (h/'trader.toml').write_text(TOML + f'alertmanager_url = "http://127.0.0.1:{alertmanager.port}"\n')
    s = load_settings(env=_env(h))
    with Store(settings=s) as st:
        st.ingest(DataQualityGate(s.quality).check(load_sample(['AAPL', 'MSFT']), source='sample'))
        Registry(st, s).set_champion(fixed_action_model(st, s, 8, note='alerts test: always buys both'), 'alerts test')
    return h

def halted(home:Path):
    "(run id, loop state) once the paper session has committed a halt, else None."
    c = sqlite3.connect(home/'trader.db', timeout=30)
    try: rows = c.execute('SELECT run_id, state FROM loop_state').fetchall()
    finally: c.close()
    return next(((rid, st) for rid, st in map(lambda r: (r[0], json.loads(r[1])), rows) if st.get('halted')), None)

def test_alerts_reach_the_webhook(home, prometheus, alertmanager, webhook, spawn):
    prom, am = prometheus, alertmanager
    wait_for('the scrape target to be discovered', lambda: prom.get('/api/v1/targets')['data']['activeTargets'], WAIT, prom)
    paper = spawn(TRADER, 'paper', '--broker', 'sim', '--model', 'champion', '--replay', REPLAY, '--speed', str(SPEED),
                  '--metrics-port', str(prom.metrics_port), env=_env(home), name='paper')
    servers = (prom, am)
    def halt():
        assert paper.poll() is None, f'the paper session ended ({paper.returncode}) before its guardian fired:\n{tail(paper.out)}'
        return halted(home)
    rid, st = wait_for("the guardian's halt to be committed", halt, HALT_WAIT, *servers)
    t_halt = time.monotonic()
    _test_eq((st['halt_kind'], st['halt_reason'].startswith("at the close: today's drawdown ") or st['halt_reason'].startswith('at the open: ')), ('guardian', True))

    # 1. the guardian: paged, within 60 s, with the session, the guardian's reason and the dashboard link
    def guardian():
        return [(rc, a) for rc, a in webhook.alerts('GuardianFired') if a['labels'].get('session') == rid]
    (receiver, a), *_ = wait_for('GuardianFired at the webhook', guardian, GUARDIAN_TO_WEBHOOK, *servers)
    took = time.monotonic() - t_halt
    _test_eq((receiver, a['labels']['severity'], a['labels']['reason'], a['annotations']['reason']), ('page', 'critical', st['halt_reason'], st['halt_reason']))
    _test_eq((a['labels']['dashboard'], a['annotations']['dashboard']), (DASHBOARD, DASHBOARD))
    assert a['annotations']['summary'] == f'Guardian fired on session {rid}: positions flattened, trading halted', a['annotations']
    assert st['halt_reason'] in a['annotations']['description'] and a['generatorURL'].startswith(f'http://127.0.0.1:{prom.port}/graph?'), a

    # 2. the daily gate RED, recorded by the gate's own code (what `trader gate` does, without rendering its report)
    from trader.core.config import load_settings
    from trader.core.store import Store
    from trader.ops.gate import run_gate
    s = load_settings(env=_env(home))
    with Store(settings=s) as store: g, _ = run_gate(store, rid, settings=s, output_dir=home/'reports'/'gates', render=False)
    _test_eq(g.status, 'RED')
    def gate_red():
        return [(rc, a) for rc, a in webhook.alerts('DailyGateRed') if a['labels'].get('session') == rid]
    (receiver, r), *_ = wait_for('DailyGateRed at the webhook', gate_red, DELIVERY, *servers)
    _test_eq((receiver, r['labels']['date'], r['labels']['reason'], r['annotations']['dashboard']), ('page', g.date, '; '.join(g.reasons), DASHBOARD))
    assert r['annotations']['summary'] == f'Daily gate RED on {g.date} for session {rid}', r['annotations']

    # 3. a heartbeat older than the (test's) bound: the replay leaves 2 s between bars
    def stale():
        return [(rc, a) for rc, a in webhook.alerts('HeartbeatStale') if a['labels'].get('session') == rid]
    (receiver, h), *_ = wait_for('HeartbeatStale at the webhook', stale, DELIVERY, *servers)
    _test_eq((receiver, h['annotations']['dashboard']), ('page', DASHBOARD))
    assert h['annotations']['reason'].startswith('no heartbeat for ') and h['annotations']['summary'].startswith(f'No trading-loop heartbeat from session {rid} for '), h

    # 4. the halt's consequence: every decision of the halted session is refused ('halted'), RiskLimitBreached fires in
    #    Prometheus, and Alertmanager holds it back (inhibited by GuardianFired of the same session)
    def inhibited():
        res = am.get('/api/v2/alerts', filter='alertname="RiskLimitBreached"', inhibited='true')
        return [x for x in res if x['labels'].get('session') == rid and x['status']['state'] == 'suppressed' and x['status']['inhibitedBy']]
    (x,) = wait_for('RiskLimitBreached to be inhibited in Alertmanager', inhibited, DELIVERY, *servers)
    _test_eq(x['labels']['rule'], 'halted')

    # 5. `trader alerts test`: the same path, to the same webhook, on the route of its severity
    r = subprocess.run([TRADER, 'alerts', 'test', '--severity', 'critical'], capture_output=True, text=True, env=_env(home), timeout=120)
    assert r.returncode == 0 and 'routed to page' in r.stdout, r.stdout + r.stderr
    session = re.search(r'session (test-\S+)\)', r.stdout).group(1)
    def test_alert():
        return [(rc, a) for rc, a in webhook.alerts('TraderTestAlert') if a['labels'].get('session') == session]
    (receiver, t), *_ = wait_for('the test notification at the webhook', test_alert, DELIVERY, *servers)
    _test_eq((receiver, t['labels']['severity'], t['annotations']['dashboard']), ('page', 'critical', DASHBOARD))

    # nothing of the halt's consequences went out, and the session is still the guardian's (halted, no resume)
    assert not [a for _, a in webhook.alerts('RiskLimitBreached') + webhook.alerts('DrawdownHigh') if a['labels'].get('session') == rid], webhook.posts
    assert paper.poll() is None, tail(paper.out)
    print(f'\nguardian fired in run {rid} ({st["halt_reason"]}); GuardianFired at the webhook {took:.1f}s after the halt was committed; '
          f'then DailyGateRed ({g.date}), HeartbeatStale and TraderTestAlert; RiskLimitBreached inhibited')
