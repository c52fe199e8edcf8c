"""The docs site (`make docs`, .ci/docs.py): built once per module into a temporary folder, then
- over the files: every notebook of _quarto.yml's render list is a page with its title and its committed outputs (PNG
  images, HTML tables) and a download of the notebook itself, backticked names in the prose link to their API entries,
  every module of the four layers has an API page, every internal href/src of every page resolves to a file of the site
  (and every #anchor to an element of the page it names), and no page or stylesheet loads anything from another host
  (the site is read offline);
- in Chromium (Playwright, Debian's /usr/bin/chromium), served on 127.0.0.1 with every request elsewhere aborted and
  recorded: the home page shows index.ipynb's heading, an API page shows a function with its docstring, a notebook's TeX
  is typeset by the site's own MathJax (its dollars of money and its output tables left alone), the search box finds a
  page, no request left the machine and none asked for a missing file. Without Chromium the browser test is skipped locally and fails in CI.
"""
import ast, functools, json, re, shlex, subprocess, sys, time
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urljoin, urlsplit
import pytest, yaml
from conftest import loopback_server
from test_dashboard_browser import CHROMIUM_ARGS, chromium
from test_lab_browser import first_heading

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT/'.ci'))
import docs, docs_hooks  # noqa: E402  (.ci/docs.py: the site's structure; .ci/docs_hooks.py: its MkDocs hooks)

API_MODULE = 'trader.core.store'
SEARCH = 'drift'
TEX_PAGE, TEX_MIN = '10_metrics', 20     # a page whose prose defines the metrics in TeX (and writes money as \$)
RESOURCE_ATTRS = {'script': 'src', 'img': 'src', 'iframe': 'src', 'source': 'src', 'video': 'src', 'audio': 'src',
                  'embed': 'src', 'object': 'data', 'link': 'href'}    # what a browser loads by itself (an <a> it does not)

def docs_command() -> str:
    "The shell command of `make docs` (install taken as done: `-o install`), for this Python's venv."
    r = subprocess.run(['make', '--no-print-directory', '-n', '-o', 'install', 'docs', f'BIN={BIN}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.strip()
    assert cmd == f'{BIN}/python .ci/docs.py', cmd
    return cmd

@pytest.fixture(scope='module')
def site(tmp_path_factory) -> Path:
    "The site as `make docs` builds it, into a temporary folder (its pages and mkdocs.yml there too)."
    tmp = tmp_path_factory.mktemp('docs')
    t0 = time.monotonic()
    r = subprocess.run(['bash', '-c', f"{docs_command()} --site-dir {shlex.quote(str(tmp/'site'))} --src {shlex.quote(str(tmp/'src'))}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    print(f"docs built in {time.monotonic()-t0:.1f}s: {r.stdout.strip()}")
    return tmp/'site'

class Refs(HTMLParser):
    "Every (tag, attribute, value) of a page's href/src/data attributes, its element ids, and its inline scripts."
    def __init__(self):
        super().__init__(); self.refs, self.ids, self.scripts, self._in_script = [], set(), [], False
    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ('href', 'src', 'data') and v is not None: self.refs.append((tag, k, v))
            if k == 'id' and v: self.ids.add(v)
        self._in_script = tag == 'script'
    def handle_endtag(self, tag): self._in_script = False
    def handle_data(self, data):
        if self._in_script: self.scripts.append(data)

def parse(path:Path) -> Refs:
    p = Refs(); p.feed(path.read_text(encoding='utf-8')); return p

def page_url(site:Path, html:Path) -> str:
    "The URL path (from the site root) a page is served at."
    rel = html.relative_to(site).as_posix()
    return '/' + (rel[:-len('index.html')] if rel.endswith('index.html') else rel)

def target(site:Path, base:str, ref:str) -> Path|None:
    "The file a local reference resolves to (None for other hosts, data:, mailto: and same-page anchors)."
    u = urlsplit(ref)
    if u.scheme or u.netloc or not u.path: return None
    path = unquote(urlsplit(urljoin(base, ref)).path)
    f = site/path.lstrip('/')
    return f/'index.html' if path.endswith('/') or f.is_dir() else f

def test_structure_comes_from_quarto(tmp_path):
    q = docs.quarto()
    cfg = yaml.safe_load(docs.write(tmp_path).read_text())
    assert cfg['site_name'] == q['website']['title'] and cfg['site_description'] == q['website']['description']
    assert Path(cfg['site_dir']) == ROOT/q['project']['output-dir'] == ROOT/'_docs'
    assert cfg['theme']['font'] is False, 'Google fonts would be loaded from the network'
    home, notebooks, api = cfg['nav']
    assert home == {'Home': 'index.ipynb'}
    names = [next(iter(e.values())) for e in notebooks['Notebooks']]
    assert names == sorted(p.name for p in (ROOT/'nbs').glob('*.ipynb') if p.stem != 'index')
    assert {'Store': '03_store.ipynb'} in notebooks['Notebooks']     # titled by the first heading
    assert (tmp_path/'pages'/'api'/f'{API_MODULE}.md').read_text().count(f'::: {API_MODULE}') == 1

def test_notebook_pages_have_their_outputs(site):
    nbs = docs.notebooks(docs.quarto())
    assert {p.name for p in nbs} == {p.name for p in (ROOT/'nbs').glob('*.ipynb')}, 'the render list is every notebook in nbs/'
    for nb in nbs:
        page = site/('index.html' if nb.stem == 'index' else f'{nb.stem}/index.html')
        assert page.exists(), f'{nb.name} has no page ({page})'
        html = page.read_text(encoding='utf-8')
        head = first_heading(nb)
        assert re.search(r'<h1[^>]*>\s*' + re.escape(head.replace('`', '')), re.sub(r'</?code>', '', html)), f'{page}: no <h1> {head!r}'
        cells = [c for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']
        hidden = lambda c: 'hide' in docs.directives(''.join(c['source']))
        outs = [o for c in cells if not hidden(c) for o in c.get('outputs', [])]
        pngs = sum('image/png' in o.get('data', {}) for o in outs)
        assert html.count('src="data:image/png;base64,') >= pngs, f'{nb.name}: {pngs} PNG outputs, fewer <img> on {page}'
        tables = sum('<table' in ''.join(o.get('data', {}).get('text/html', '')) for o in outs)
        assert html.count('<table') >= tables, f'{nb.name}: {tables} HTML table outputs, fewer <table> on {page}'
        assert f'<a href="{nb.name}" download' in html, f'{page}: no download button for {nb.name}'
        assert (page.parent/nb.name).read_bytes() == nb.read_bytes(), f'the download beside {page} is not {nb.name} itself'

def test_notebook_prose_links_to_the_api(site):
    "Every backticked name in a notebook's prose that the API documents (once) links to its entry there."
    index, linked = docs_hooks.api_index(site), 0
    assert 'Store' in index and 'trader.core.store' in index, sorted(index)[:20]
    for nb in docs.notebooks(docs.quarto()):
        page = site/('index.html' if nb.stem == 'index' else f'{nb.stem}/index.html')
        html, prefix = page.read_text(encoding='utf-8'), '' if nb.stem == 'index' else '../'
        prose = ' '.join(''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'markdown')
        in_links = set(re.findall(r'\[[^\]]*?`([\w.]+)(?:\(\))?`[^\]]*\]\(', prose))      # already a link: left alone
        for name in set(re.findall(r'`((?:trader\.)?[A-Za-z_][\w.]*)(?:\(\))?`', prose)) & set(index) - in_links:
            assert f'<a href="{prefix}{index[name]}"><code>{name}' in html, f'{page}: `{name}` not linked to {index[name]}'
            linked += 1
    assert linked > 50, linked

def test_every_module_has_an_api_page(site):
    mods = docs.modules()
    assert API_MODULE in mods and not any(m.endswith('_modidx') for m in mods)
    assert {m.split('.')[1] for m in mods} == {'core', 'research', 'live', 'ops'}
    for m in mods:
        html = (site/'api'/m/'index.html').read_text(encoding='utf-8')
        assert f'<h1' in html and m in html and 'class="doc doc-' in html, f'{m}: the API page has no rendered docstrings'

def test_internal_links_resolve_and_nothing_loads_from_another_host(site):
    pages = sorted(site.rglob('*.html'))
    assert len(pages) > len(docs.modules()) + 40, len(pages)
    parsed = {p: parse(p) for p in pages}
    broken, external, checked, anchors = [], [], 0, 0
    for page in pages:
        refs, base = parsed[page], page_url(site, page)
        for tag, attr, ref in refs.refs:
            if tag in RESOURCE_ATTRS and attr == RESOURCE_ATTRS[tag] and re.match(r'(https?:)?//', ref): external.append((page, tag, ref))
            if ref.startswith('#') and len(ref) > 1:      # an anchor on the same page (headings, the table of contents)
                anchors += 1
                if unquote(ref[1:]) not in refs.ids: broken.append((page.relative_to(site).as_posix(), ref))
                continue
            f = target(site, base, ref)
            if f is None: continue
            checked += 1
            if not f.is_file(): broken.append((page.relative_to(site).as_posix(), ref)); continue
            frag = unquote(urlsplit(ref).fragment)
            if frag and f in parsed:       # an anchor on another page (the API entries notebook prose links to)
                anchors += 1
                if frag not in parsed[f].ids: broken.append((page.relative_to(site).as_posix(), ref))
        for s in refs.scripts:
            if re.search(r'''import\s*\(\s*["'](https?:)?//|\bsrc\s*=\s*["'](https?:)?//''', s): external.append((page, 'inline script', s[:80]))
    for css in site.rglob('*.css'):
        for m in re.finditer(r'''(?:@import\s+|url\(\s*)["']?((?:https?:)?//[^"')\s]+)''', css.read_text(encoding='utf-8')):
            external.append((css, '@import/url()', m[1]))
    assert checked > 1000 and anchors > 100, (checked, anchors)
    assert not broken, f'{len(broken)} broken internal links, e.g. {broken[:10]}'
    assert not external, f'resources from other hosts: {external[:10]}'

def docstring_example(mod:str) -> tuple[str, str]:
    "A public top-level function of `mod` and the first line of its docstring (from the source, as griffe reads it)."
    tree = ast.parse((ROOT/Path(*mod.split('.'))).with_suffix('.py').read_text())
    for n in tree.body:
        if isinstance(n, ast.FunctionDef) and not n.name.startswith('_') and ast.get_docstring(n):
            return n.name, ast.get_docstring(n).split('\n')[0]
    raise AssertionError(f'{mod} has no documented public function')

class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a): pass

def test_site_in_chromium(site, tmp_path):
    exe = chromium()
    from playwright.sync_api import sync_playwright
    handler = functools.partial(Quiet, directory=str(site))
    with loopback_server(ThreadingHTTPServer, handler, SimpleNamespace()) as srv, sync_playwright() as pw:
        base, blocked, errors, missing = srv.url, [], [], []
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            ctx = b.new_context(viewport={'width': 1400, 'height': 1000})
            ctx.route(lambda url: not url.startswith(base), lambda route: (blocked.append(route.request.url), route.abort()))
            page = ctx.new_page()
            page.on('pageerror', lambda e: errors.append(str(e)))
            page.goto(f'{base}/', wait_until='networkidle')
            h1 = page.locator('article h1').first
            assert h1.inner_text().replace('¶', '').strip() == first_heading(ROOT/'nbs'/'index.ipynb')
            assert page.title() == docs.quarto()['website']['title']
            assert page.locator('nav.md-nav a[href$="api/"]').count() > 0, 'no API reference in the navigation'
            page.screenshot(path=str(tmp_path/'docs-home.png'))

            fn, doc = docstring_example(API_MODULE)
            page.goto(f'{base}/api/{API_MODULE}/', wait_until='networkidle')
            assert page.locator('article h1').first.inner_text().replace('¶', '').strip() == API_MODULE
            heading = page.locator(f'article [id="{API_MODULE}.{fn}"]').first
            heading.wait_for(timeout=10_000)
            assert fn in heading.inner_text()
            body = page.locator('article').inner_text()
            words = re.sub(r'`', '', doc).split()[:6]
            assert ' '.join(words) in ' '.join(body.split()), f'{fn}: docstring {doc!r} not shown'
            page.screenshot(path=str(tmp_path/'docs-api.png'))

            page.on('response', lambda r: r.status >= 400 and missing.append(r.url))
            page.goto(f'{base}/{TEX_PAGE}/', wait_until='networkidle')
            page.wait_for_function('window.MathJax && MathJax.Hub && MathJax.Hub.queue.pending === 0 && '
                                   'document.querySelectorAll("span.MathJax").length > 0', timeout=60_000)
            prose = page.locator('article .jp-MarkdownCell')
            typeset, raw_tex = page.locator('article .jp-MarkdownCell span.MathJax').count(), prose.all_inner_texts()
            assert typeset >= TEX_MIN, f'{TEX_PAGE}: {typeset} formulas typeset'
            assert page.locator('.MathJax_Error, .mjx-merror').count() == 0, 'MathJax could not typeset a formula'
            assert not [t for t in raw_tex if re.search(r'\\(frac|sqrt|operatorname)\b', t)], 'TeX left as source in the prose'
            text = ' '.join(page.locator('article').inner_text().split())
            assert 'half of $100,000 in each' in text, 'an escaped dollar in the prose is not a dollar'
            outputs = ' '.join(' '.join(page.locator('article .jp-OutputArea-output').all_inner_texts()).split())
            assert len(re.findall(r'\$\d{1,3},\d{3}', outputs)) >= 10, 'amounts in the output tables were typeset as TeX'
            page.screenshot(path=str(tmp_path/'docs-tex.png'), full_page=False)

            page.goto(f'{base}/', wait_until='networkidle')
            box = page.locator('input.md-search__input')
            box.click(); box.press_sequentially(SEARCH, delay=30)
            hit = page.locator('.md-search-result__item a').first
            hit.wait_for(timeout=30_000)
            assert SEARCH in page.locator('.md-search-result').inner_text().lower()
            href = hit.get_attribute('href')
            hit.click(); page.wait_for_load_state('networkidle')
            assert page.url.split('#')[0] == urljoin(base + '/', href).split('#')[0]
            page.screenshot(path=str(tmp_path/'docs-search.png'))
        finally: b.close()
    assert not blocked, f'the site asked for other hosts: {blocked[:10]}'
    assert not errors, f'JavaScript errors: {errors[:5]}'
    assert not missing, f'files the pages asked for and the site lacks: {missing[:10]}'
