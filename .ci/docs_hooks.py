"""MkDocs hooks for the docs site (.ci/docs.py names this file in the generated mkdocs.yml).

- Pages load nothing from the network: nbconvert's notebook template links MathJax and Mermaid from a CDN; those
  scripts are removed (a Mermaid block shows its source).
- TeX in notebook prose (`$x$`, `$$...$$`) is typeset by MathJax 2.7 served from the site itself (assets/mathjax/, copied
  from the `jupyter-server-mathjax` package, the build classic Jupyter served offline), with nbconvert's settings
  (`$`/`\\(` inline, escaped `\\$` literal) and the classic notebook's STIX web fonts. Outputs are not typeset: a
  table of amounts in dollars is not TeX. Only pages whose prose has math load it.
- A notebook's link to another notebook (`[Store](03_store.ipynb#the-schema)`, as it works in JupyterLab) points at that
  notebook's page.
- A notebook page's table of contents links to its headings: mkdocs-jupyter slugs the headings with Python-Markdown (code
  spans dropped: "The `VecEnv`" -> `the`, "`train`" -> `_1`) but nbconvert wrote other ids ("the-vecenv"); the contents'
  ids are taken from the headings, matched in order and level.
- A notebook page has a download button for its notebook (mkdocs-jupyter's include_source puts the file beside the page;
  .ci/docs.py then replaces it with the original from nbs/).
- In notebook prose, a name in backticks that the API reference documents (`Store`, `Store.frame`, `write_bars()`,
  `trader.core.store`) links to its entry there, as nbdev's docs do; names documented in two modules stay plain text.
- Every notebook page inlines the same ~0.6 MB of JupyterLab CSS and the same scripts; they are written once under
  assets/notebook/ (named by content hash) and linked, which keeps the site ~10x smaller and the pages cacheable.
"""
import hashlib, importlib.util, json, posixpath, re, shutil
from pathlib import Path
import material
from mkdocs.utils import get_relative_url

CDN_SCRIPT = re.compile(r'<script\b[^>]*\bsrc="(?:https?:)?//[^"]*"[^>]*>\s*</script>\s*', re.I)
MATHJAX_CONFIG = re.compile(r'<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->\s*', re.S)
MERMAID = re.compile(r'<script type="module">(?:(?!</script>).)*?import\("https?://(?:(?!</script>).)*</script>\s*', re.S)
INLINE = re.compile(r'<(style)(?: type="text/css")?>(.*?)</style>|<(script)>(.*?)</script>', re.S)
NB_LINK = re.compile(r'(<a\b[^>]*?\bhref=)"([^":#?]+\.ipynb)(#[^"]*)?"')
DOWNLOAD_ICON = (Path(material.__file__).parent/'templates'/'.icons'/'material'/'download.svg').read_text()
HEADING = re.compile(r'<h([1-6])\b[^>]*\bid="([^"]+)"[^>]*>(.*?)</h\1>', re.S)
TAG = re.compile(r'<[^>]+>')
SHARED_MIN = 2000      # inline blocks at least this long (characters) go to a shared file
MATHJAX = 'assets/mathjax'
# `\$100` in prose is a dollar, not TeX (JupyterLab's reading); nbconvert's markdown would make it a bare `$` that MathJax
# pairs with the next one, so .ci/docs.py writes it as a dollar MathJax is told to skip
ESCAPED_DOLLAR = '<span class="tex2jax_ignore">$</span>'
TEX = re.compile(r'(?<!\\)\$')   # an unescaped dollar in markdown: math (money is written `\$100`, as JupyterLab wants it)
# nbconvert's MathJax settings (its base/mathjax.html.j2), with the classic notebook's fonts (the package ships STIX-Web
# only), no messages, and output areas left alone
MATHJAX_SETTINGS = {
    'tex2jax': {'inlineMath': [['$', '$'], ['\\(', '\\)']], 'displayMath': [['$$', '$$'], ['\\[', '\\]']],
                'processEscapes': True, 'processEnvironments': True, 'ignoreClass': 'tex2jax_ignore|jp-OutputArea-output'},
    'TeX': {'equationNumbers': {'autoNumber': 'AMS', 'useLabelIds': True}},
    'HTML-CSS': {'availableFonts': [], 'imageFont': None, 'preferredFont': None, 'webFont': 'STIX-Web', 'linebreaks': {'automatic': True}},
    'displayAlign': 'center', 'messageStyle': 'none', 'showMathMenu': False,
}

def mathjax_static() -> Path:
    "MathJax 2.7 as the `jupyter-server-mathjax` package ships it (found without importing jupyter_server)."
    spec = importlib.util.find_spec('jupyter_server_mathjax')
    if spec is None: raise SystemExit("the docs need the jupyter-server-mathjax package (a dev requirement): run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))/'static'

def has_tex(page) -> bool:
    "Whether a notebook page's prose has TeX (an unescaped `$`, outside code spans)."
    nb = json.loads(Path(page.file.abs_src_path).read_text(encoding='utf-8'))
    prose = ' '.join(re.sub(r'`[^`]*`', '', ''.join(c['source'])) for c in nb['cells'] if c['cell_type'] == 'markdown')
    prose = prose.replace(ESCAPED_DOLLAR, '')                                   # money, as .ci/docs.py prepared it
    return bool(TEX.search(prose))

def mathjax_tags(page) -> str:
    "The scripts that typeset a page's TeX with the site's own MathJax."
    url = get_relative_url(f'{MATHJAX}/MathJax.js', page.url)
    return (f'<script type="text/x-mathjax-config">MathJax.Hub.Config({json.dumps(MATHJAX_SETTINGS)});</script>\n'
            f'<script src="{url}?config=TeX-AMS-MML_HTMLorMML-full,Safe"></script>\n')

def on_page_content(html:str, page, config, files) -> str:
    "The page's HTML without scripts from other hosts, its links to notebooks pointing at their pages."
    def page_link(m):
        f = files.get_file_from_path(posixpath.normpath(posixpath.join(posixpath.dirname(page.file.src_uri), m[2])))
        return m[0] if f is None else f'{m[1]}"{f.url_relative_to(page.file)}{m[3] or ""}"'
    if page.file.src_uri.endswith('.ipynb'):
        heading_ids(page.toc, [(int(l), i, words(t)) for l, i, t in HEADING.findall(html)])
        html = NB_LINK.sub(page_link, html)
        name = posixpath.basename(page.file.src_uri)
        html = (f'<a href="{name}" download class="md-content__button md-icon" title="Download {name}">{DOWNLOAD_ICON}</a>\n'
                + html)
    html = MATHJAX_CONFIG.sub('', html)
    html = MERMAID.sub('', html)
    html = CDN_SCRIPT.sub('', html)
    return html + mathjax_tags(page) if page.file.src_uri.endswith('.ipynb') and has_tex(page) else html

def words(html:str) -> str:
    "A heading's text for matching: tags, the pilcrow and punctuation dropped, lower case."
    return ' '.join(re.sub(r'[^\w\s]', ' ', TAG.sub('', html).replace('¶', '')).lower().split())

def heading_ids(toc, headings:list[tuple[int, str, str]]):
    """Give the entries of `toc` (in document order) the ids of `headings` [(level, id, words)]: the next heading of the
    same level and text, else of the same level (a heading in an output may sit between two in the prose)."""
    j = 0
    def walk(items):
        nonlocal j
        for item in items:
            rest = range(j, len(headings))
            k = next((k for k in rest if headings[k][0] == item.level and headings[k][2] == words(item.title)), None)
            if k is None: k = next((k for k in rest if headings[k][0] == item.level), None)
            if k is not None: item.id, j = headings[k][1], k + 1
            walk(item.children)
    walk(toc)

def on_post_page(output:str, page, config) -> str:
    "Large inline styles and scripts of notebook pages moved to shared files under assets/notebook/."
    if not page.file.src_uri.endswith('.ipynb'): return output
    def shared(m):
        kind, body = ('css', m[2]) if m[1] else ('js', m[4])
        if len(body) < SHARED_MIN: return m[0]
        name = f"assets/notebook/{hashlib.sha256(body.encode()).hexdigest()[:16]}.{kind}"
        path = Path(config['site_dir'])/name
        if not path.exists(): path.parent.mkdir(parents=True, exist_ok=True); path.write_text(body)
        url = get_relative_url(name, page.url)
        return f'<link rel="stylesheet" href="{url}">' if kind == 'css' else f'<script src="{url}"></script>'
    return INLINE.sub(shared, output)

API_ID = re.compile(r'\bid="(trader\.(?:core|research|live|ops)\.\w+)((?:\.\w+)*)"')
CODE = re.compile(r'<code>((?:trader\.)?[A-Za-z_][\w.]*)(\(\))?</code>')
ANCHOR = re.compile(r'(<a\b[^>]*>.*?</a>)', re.S)

def api_index(site:Path) -> dict[str, str]:
    "Name -> site path with anchor of every entry on the API pages: modules by their full name, members by the name after it."
    seen: dict[str, set[str]] = {}
    for page in sorted((site/'api').glob('trader.*/index.html')):
        url = page.parent.relative_to(site).as_posix() + '/'
        for mod, rest in API_ID.findall(page.read_text(encoding='utf-8')):
            if page.parent.name != mod: continue
            key, ref = (rest[1:], f'{url}#{mod}{rest}') if rest else (mod, url)
            seen.setdefault(key, set()).add(ref)
    return {k: v.pop() for k, v in seen.items() if len(v) == 1}

def copy_mathjax(site:Path):
    "MathJax into the site: the loader, its one configuration, extensions, TeX input, HTML-CSS output and STIX-Web fonts."
    src, dst = mathjax_static(), site/MATHJAX
    skip = shutil.ignore_patterns('localization', 'a11y', 'SVG')   # translations, accessibility explorer, SVG output: unused
    shutil.rmtree(dst, ignore_errors=True); dst.mkdir(parents=True)
    shutil.copy(src/'MathJax.js', dst); shutil.copy(src/'LICENSE', dst)
    for d in ('config', 'extensions', 'jax', 'fonts'): shutil.copytree(src/d, dst/d, ignore=skip)

def on_post_build(config):
    "MathJax copied in; backticked names in the notebook pages' prose linked to their API entries (the API pages exist only now)."
    site = Path(config['site_dir'])
    copy_mathjax(site)
    index = api_index(site)
    for page in site.glob('*/index.html'):
        if not (page.parent/f'{page.parent.name}.ipynb').exists(): continue      # notebook pages only
        link_names(page, index, site)
    if (site/'index.ipynb').exists(): link_names(site/'index.html', index, site)

def link_names(page:Path, index:dict, site:Path):
    html = page.read_text(encoding='utf-8')
    start, end = html.find('<div class="jupyter-wrapper">'), html.rfind('</article>')
    if start < 0 or end < start: return
    prefix = '../' * len(page.parent.relative_to(site).parts)
    def link(m):
        ref = index.get(m[1])
        return m[0] if ref is None else f'<a href="{prefix}{ref}">{m[0]}</a>'
    body = ''.join(part if part.startswith('<a') else CODE.sub(link, part) for part in ANCHOR.split(html[start:end]))
    page.write_text(html[:start] + body + html[end:], encoding='utf-8')
