"""The notebook freshness check (.ci/nbrun.py, `make nbtest`/`make nbs`): it fails on stale outputs, errors and changed
chart data, passes on a fresh notebook, and ignores only what is tagged `volatile`."""
import json, os, subprocess, sys
from pathlib import Path
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]

def _nb(path:Path, cells:list[tuple[str, str, list]]):
    nb = nbformat.v4.new_notebook()
    for kind, src, tags in cells:
        c = nbformat.v4.new_code_cell(src) if kind == 'code' else nbformat.v4.new_markdown_cell(src)
        if tags: c.metadata['tags'] = tags
        nb.cells.append(c)
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    path.write_text(nbformat.writes(nb))
    return path

def _run(mode:str, nb:Path, tmp_path:Path):
    env = {**os.environ, 'TRADER_HOME': str(tmp_path/'home'), 'TRADER_REPORTS': str(tmp_path/'reports'), 'NBRUN_WORKERS': '1'}
    return subprocess.run([sys.executable, str(ROOT/'.ci'/'nbrun.py'), mode, str(nb)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)

def _outputs(nb:Path) -> list: return [c.get('outputs', []) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']

def test_write_then_check_passes_and_a_changed_output_is_stale(tmp_path):
    nb = _nb(tmp_path/'doc.ipynb', [('markdown', '# A document', []),
                                    ('code', 'import pandas as pd\npd.DataFrame({"x": [1, 2]})', []),
                                    ('code', 'print(sum(range(10)))', []),
                                    ('code', '#| eval: false\nprint("never run")', []),
                                    ('code', 'import time; print(time.time())', ['volatile'])])
    r = _run('write', nb, tmp_path); assert r.returncode == 0, r.stdout + r.stderr
    outs = _outputs(nb)
    assert 'text/html' in outs[0][0]['data'] and outs[1][0]['text'] == ['45\n'] and outs[2] == [] and outs[3]
    r = _run('check', nb, tmp_path); assert r.returncode == 0, r.stdout + r.stderr   # the volatile clock differs: ignored
    d = json.loads(nb.read_text()); d['cells'][2]['outputs'][0]['text'] = ['44\n']; nb.write_text(json.dumps(d))
    r = _run('check', nb, tmp_path)
    assert r.returncode == 1 and 'STALE' in r.stdout and '-44' in r.stdout and '+45' in r.stdout, r.stdout + r.stderr

def test_a_cell_that_raises_fails_the_check(tmp_path):
    nb = _nb(tmp_path/'bad.ipynb', [('code', 'assert 1 == 2, "the inline test failed"', [])])
    r = _run('check', nb, tmp_path)
    assert r.returncode == 1 and 'FAILED' in r.stderr and 'the inline test failed' in r.stderr

def test_a_chart_is_checked_by_its_data_hash(tmp_path):
    src = 'import plotly.graph_objects as go\ngo.Figure(go.Scatter(y=[1, 2, {}]), layout=dict(title="t", height=300))'
    nb = _nb(tmp_path/'chart.ipynb', [('code', src.format(3), [])])
    r = _run('write', nb, tmp_path); assert r.returncode == 0, r.stdout + r.stderr
    (out,) = _outputs(nb)[0]
    assert out['data']['image/png'] and 'data sha256' in ''.join(out['data']['text/plain'])   # a PNG drawn offline
    assert _run('check', nb, tmp_path).returncode == 0
    d = json.loads(nb.read_text()); d['cells'][0]['source'] = src.format(4); nb.write_text(json.dumps(d))
    r = _run('check', nb, tmp_path)                                                       # same chart, other data
    assert r.returncode == 1 and 'data sha256' in r.stdout

def test_line_breaks_are_layout_not_results(tmp_path):
    "IPython wraps a repr at 79 columns, before the checkout's path is removed: a longer path breaks the line elsewhere."
    nb = _nb(tmp_path/'wrap.ipynb', [('code', '("a" * 40, "b" * 40)', [])])
    r = _run('write', nb, tmp_path); assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(nb.read_text()); out = d['cells'][0]['outputs'][0]['data']
    assert len(out['text/plain']) == 2                                                   # wrapped in two lines
    out['text/plain'] = [''.join(out['text/plain']).replace('\n', '')]; nb.write_text(json.dumps(d))
    r = _run('check', nb, tmp_path); assert r.returncode == 0, r.stdout + r.stderr       # one line: same result
    out['text/plain'] = [out['text/plain'][0].replace('b', 'c', 1)]; nb.write_text(json.dumps(d))
    r = _run('check', nb, tmp_path)                                                      # one character else: stale
    assert r.returncode == 1 and 'STALE' in r.stdout, r.stdout + r.stderr
