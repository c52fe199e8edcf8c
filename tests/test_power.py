"`trader power` end to end at a tiny budget: the study's line in the issue's exact shape, the results file, the papermill report, and a null market not promoted."
import json, os, re, subprocess, sys
from pathlib import Path
from trader.research.power import LINE

def test_power_cli_tiny(tmp_path):
    env = {**os.environ, 'TRADER_HOME': str(tmp_path/'home'), 'TRADER_REPORTS': str(tmp_path/'reports'), 'TRADER_DB_URL': ''}
    r = subprocess.run([str(Path(sys.executable).parent/'trader'), 'power', '--nulls', '1', '--steps', '2048', '--seeds', '3', '--folds', '1', '--workers', '1'],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith('power: ')]
    assert len(lines) == 1 and LINE.match(lines[0]), r.stdout[-2000:]
    out = json.loads((tmp_path/'home'/'power'/'power.json').read_text())
    kinds = [m['market']['kind'] for m in out['markets']]
    assert kinds == ['strong', 'weak', 'null']
    null = out['markets'][2]
    assert null['promoted'] is False and null['oracle_net'] == 0.0            # nothing to find: the oracle never trades, and nothing is promoted
    assert all(m['configs'] == 3 and m['pbo'] is not None for m in out['markets'])   # three configurations of the search: PBO over configurations is defined
    reports = list((tmp_path/'reports'/'power').glob('*/report.html'))
    assert len(reports) == 1 and reports[0].stat().st_size > 1000
