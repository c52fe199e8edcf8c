"""The notebook freshness check (.ci/nbrun.py, `make nbtest`/`make nbs`): it fails on stale outputs, errors and changed
chart data, passes on a fresh notebook, and ignores only what is tagged `volatile`."""
import json, os, subprocess, sys
from pathlib import Path
import nbformat
from fastcore.test import test_eq as _test_eq_
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

# ---------------------------------------------------------------------------------------------------------------------
# Floats compared with a relative tolerance (REL_TOL in .ci/nbrun.py): a result that went through BLAS, torch or threads may
# change in its last digits on another machine; a changed figure, id, hash or word is still stale.
OUT = "{'model': 'm-aapl-msft-2122ff', 'steps': 2048, 'sha256': '3e5a1b9c0d', 'mean_confidence': 0.11450457143380675}"

def _check_with_committed(tmp_path, committed:str):
    "Write a notebook whose cell prints OUT, replace its committed output by `committed`, and run the check."
    nb = _nb(tmp_path/'floats.ipynb', [('code', f'print({OUT!r})', [])])
    r = _run('write', nb, tmp_path); assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(nb.read_text())
    _test_eq_(''.join(d['cells'][0]['outputs'][0]['text']), OUT + '\n')
    d['cells'][0]['outputs'][0]['text'] = [committed + '\n']; nb.write_text(json.dumps(d))
    return _run('check', nb, tmp_path)

@pytest.mark.parametrize('committed,stale', [
    (OUT.replace('0.11450457143380675', '0.11450457146343132'), False),   # the tenth significant digit: noise
    (OUT.replace('0.11450457143380675', '0.11451457143380675'), True),    # the fifth: a different result
    (OUT.replace('3e5a1b9c0d', '3e5a1b9c0e'), True),                      # a hash
    (OUT.replace('2122ff', '2122fe'), True),                              # an id
    (OUT.replace('2048', '2049'), True),                                  # an integer
    (OUT.replace('mean_confidence', 'mean_certainty'), True)])            # a word
def test_floats_compare_with_a_tolerance_and_nothing_else_does(tmp_path, committed, stale):
    r = _check_with_committed(tmp_path, committed)
    assert r.returncode == (1 if stale else 0) and ('STALE' in r.stdout) == stale, r.stdout + r.stderr

def _nbrun():
    import importlib.util
    spec = importlib.util.spec_from_file_location('nbrun', ROOT/'.ci'/'nbrun.py')
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    return m

def test_what_counts_as_a_float():
    "A decimal point or an exponent, standing alone: integers, dates, versions, ids and hashes are not floats."
    nbrun = _nbrun()
    _test_eq_(nbrun._FLOAT.findall('2013-03-01 12:30:45.5 v1.2 2.4.14 ab3e5 3e5 -0.5 x-1.5 (0.3, 0.0) 1e-05% end 3.14. 127.0.0.1 42'),
              ['45.5', '3e5', '-0.5', '1.5', '0.3', '0.0', '1e-05', '3.14'])
    same = nbrun.same_text
    assert same('psi 1.050 ks (0.4169999999999999, 3.5632046179391834e-72)', 'psi 1.050 ks (0.417, 3.5632046179391834e-72)')
    assert same('drawdown -1e-17', 'drawdown 2e-17')                           # a zero's rounding noise
    assert not same('drawdown -0.5', 'drawdown 0.5') and not same('0.1 0.2', '0.1 0.2 0.3') and not same('2013-03-01', '2013-03-02')
    assert not same('version 2.4.14', 'version 2.4.15') and not same('sha 3e5a1b', 'sha 3e5a1c')

def test_a_chart_tolerates_float_noise_but_not_a_changed_value(tmp_path):
    "An equity chart (500 values near $100,000): its values off in their tenth digit pass; one value moved 1%, the order, a sign, a NaN, another array fail."
    nbrun, np = _nbrun(), pytest.importorskip('numpy')
    import plotly.graph_objects as go
    y = 100_000*np.exp(np.random.default_rng(0).normal(0, 0.01, 500).cumsum())
    def line(v, other=(1.0, 2.0)):
        shape, sums = nbrun.chart_fingerprint(go.Figure([go.Scatter(x=np.arange(len(v)), y=v), go.Bar(y=list(other))], layout=dict(title='t')).to_dict())
        return f"shape {json.dumps(shape, sort_keys=True)} values {' '.join(repr(float(x)) for x in sums)}"
    assert nbrun.same_text(line(y), line(y*(1 + 1e-10)))
    assert nbrun.same_text(line(y), line(y, (1.0 + 1e-12, 2.0)))
    for changed in (np.r_[y[:10], y[10]*1.01, y[11:]], y[::-1], np.r_[-y[:1], y[1:]], np.r_[y[:-1], np.nan], y[:-1]):
        assert not nbrun.same_text(line(y), line(changed))
    assert not nbrun.same_text(line(y), line(y, (1.0, 2.001)))
