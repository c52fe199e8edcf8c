"""The PDF printed next to every HTML report (headless Chromium's print-to-PDF, offline), and what happens without a Chromium.

`check_pdf` is shared with the report tests (`test_reports_gate_promote.py`, `test_experiments.py`): a PDF, at least one
page, and its text (read back with `trader.ops.reports.pdf_text`) opens with the report's generated paragraph. Under
`CI=true` a missing Chromium fails these tests; elsewhere they are skipped with the reason.
"""
import os
from pathlib import Path
import pandas as pd
import pytest
from trader.core.config import load_settings
from trader.ops import reports as R

CI = os.environ.get('CI', '').lower() == 'true'

def require_chromium() -> Path:
    "The Chromium that prints the PDFs; missing: a failure under CI=true, else a skip."
    exe = R.chromium_path(load_settings())
    if exe is None:
        if CI: pytest.fail("CI=true: no Chromium to print the reports' PDFs (Debian's chromium at /usr/bin/chromium; .ci/run installs it)", pytrace=False)
        pytest.skip("no Chromium found: the reports' PDFs are skipped (install Debian's chromium)")
    return exe

def check_pdf(pdf:Path, paragraph:str):
    "The PDF next to a report: %PDF-, at least a page, and its text opens with the report's paragraph (its first eight words)."
    require_chromium()
    assert pdf.is_file(), f"no PDF at {pdf}"
    assert pdf.read_bytes()[:5] == b'%PDF-', pdf
    pages = R.pdf_text(pdf)
    assert len(pages) >= 1
    words = ' '.join(' '.join(pages).split())
    assert ' '.join(paragraph.split()[:8]) in words, (paragraph[:120], words[:400])

def page(tmp_path, settings, summary='Over 2012-01-03..2013-03-01 the model returned +8.6% with a Sharpe of 2.34 (a test page).'):
    import plotly.graph_objects as go
    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[100_000, 101_000, 99_500], name='equity line'))
    return R.write_html(tmp_path/'report.html', 'A report', [fig, R.metrics_table({'model': {'total_return': 0.086, 'sharpe': 2.34}}, ['total_return', 'sharpe'])],
                        summary=summary, settings=settings)

def test_pdf_printed_next_to_the_html(tmp_path):
    require_chromium()
    s = load_settings()
    html = page(tmp_path, s)
    check_pdf(html.with_suffix('.pdf'), 'Over 2012-01-03..2013-03-01 the model returned +8.6% with a Sharpe of 2.34')
    words = ' '.join(' '.join(R.pdf_text(html.with_suffix('.pdf'))).split())
    assert 'total return' in words and '+8.6%' in words and '100.5k' in words       # the table and the chart's axis were printed
    assert not list(tmp_path.glob('*.part'))
    assert R.pdf_skipped(html, s) is None

def test_no_chromium_outside_ci_warns_and_keeps_the_html(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(R, 'chromium_path', lambda settings=None: None)
    monkeypatch.delenv('CI', raising=False)
    s = load_settings()
    html = page(tmp_path, s)
    assert html.is_file() and not html.with_suffix('.pdf').exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('warning: no PDF of report.html: no Chromium found'), err
    assert R.pdf_skipped(html, s).startswith('warning: no PDF of ')

def test_no_chromium_under_ci_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(R, 'chromium_path', lambda settings=None: None)
    monkeypatch.setenv('CI', 'true')
    with pytest.raises(R.ReportError, match='under CI=true a missing Chromium is an error'): page(tmp_path, load_settings())

def test_a_configured_chromium_that_is_missing_is_named(tmp_path):
    s = load_settings(report={'chromium': str(tmp_path/'no-chromium')})
    with pytest.raises(R.ReportError, match='report.chromium is .*no-chromium, which is not an executable file'): R.chromium_path(s)

def test_a_failing_chromium_is_one_line(tmp_path):
    bad = tmp_path/'chromium'; bad.write_text('#!/bin/sh\necho "cannot open display" >&2\nexit 3\n'); bad.chmod(0o755)
    (tmp_path/'x.html').write_text('<p>x</p>')
    with pytest.raises(R.ReportError, match=r'could not print x.html to PDF \(exit code 3\): cannot open display'): R.html_to_pdf(tmp_path/'x.html', chromium=bad)
    assert not (tmp_path/'x.pdf').exists() and not (tmp_path/'x.pdf.part').exists()
