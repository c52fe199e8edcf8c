"""MkDocs hooks for the docs site (.ci/docs.py names this file in the generated mkdocs.yml).

- Pages load nothing from the network: nbconvert's notebook template links MathJax and Mermaid from a CDN; those
  scripts are removed (TeX stays as written, `$x$`; a Mermaid block shows its source).
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
import hashlib, posixpath, re
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
    return CDN_SCRIPT.sub('', html)

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

def on_post_build(config):
    "Backticked names in the notebook pages' prose linked to their API entries (the API pages exist only now)."
    site = Path(config['site_dir'])
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
