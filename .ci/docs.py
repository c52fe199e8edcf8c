"""Build the static docs site (`make docs`) with MkDocs, offline: Quarto cannot be installed here, so `_quarto.yml` stays
the one place for the site's structure and this script translates it.

`_quarto.yml` gives the title, description, the notebooks to render (`project.render` globs) and the output folder
(`project.output-dir`, `_docs`). Its `repo-url` is not used: Material would fetch the repository's stars from GitHub's
API on every page view. This script writes a scratch folder (`_docs_src/`, ignored by git) with
- `pages/`: every rendered notebook, prepared as nbdev prepares them for its own docs (cells marked `#| hide` dropped,
  `#| ...` directive lines removed, cells left empty dropped; outputs kept as committed, nothing is executed; an escaped
  `\\$` in prose kept a dollar for MathJax), index first;
- `pages/api/<module>.md`: one API page per module of trader.core/research/live/ops, a `::: trader.x.y` for
  mkdocstrings, which reads the docstrings with griffe statically (the build fails if it imported trader, torch or ray);
- `mkdocs.yml`: the navigation (home, the notebooks in nbs/ order titled by their first `# heading`, the API by layer),
  Material with Google fonts off, the built-in offline search, mkdocs-jupyter (no execution), mkdocstrings, and the
  hooks in .ci/docs_hooks.py (no CDN scripts, notebook links and backticked API names as links, shared notebook CSS);
then runs `mkdocs build --strict` into the output folder (or `--site-dir`) and puts the original notebooks beside their
pages as the downloads.

    python .ci/docs.py                              # build into _docs/ (what `make docs` runs)
    python .ci/docs.py --site-dir DIR --src DIR2    # build elsewhere (the tests)
    python .ci/docs.py --config-only                # write _docs_src/ without building
"""
from __future__ import annotations
import argparse, fcntl, glob, json, os, re, shutil, subprocess, sys, time
from pathlib import Path
import yaml
sys.path.insert(0, str(Path(__file__).parent))
from docs_hooks import ESCAPED_DOLLAR  # noqa: E402  (the hooks find what this marks)

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT/'_docs_src'           # generated: pages, mkdocs.yml, the conversion cache
CACHE = SRC/'cache'              # mkdocs-jupyter's converted pages, keyed by notebook content and options (shared by all builds)
LAYERS = [('core', 'Core'), ('research', 'Research'), ('live', 'Live'), ('ops', 'Operations')]
PIPE = '\\|'           # a literal | inside a markdown table cell
EXTRA_CSS = '''/* .ci/docs.py: notebooks want a wider page than prose; wide tables and long code lines scroll instead of being cut */
.md-grid { max-width: 1440px; }
.jupyter-wrapper .jp-OutputArea-output, .jupyter-wrapper .jp-InputArea-editor, .jupyter-wrapper .highlight-ipynb { overflow-x: auto; }
.jupyter-wrapper .jp-OutputArea-output img { max-width: 100%; height: auto; }
'''
# `mkdocs` run so that a build which imported the package (or torch, ray) fails: the API pages must be read statically
STATIC_BUILD = '''import runpy, sys
try: runpy.run_module('mkdocs', run_name='__main__', alter_sys=True); code = 0
except SystemExit as e: code = e.code
bad = sorted(m for m in ('trader', 'torch', 'ray') if m in sys.modules)
sys.exit(f"the docs build imported {', '.join(bad)}: the API reference must be read statically (griffe)" if bad else code)
'''
DIRECTIVE = re.compile(r'^\s*#\|\s*(.*)$')

def quarto(path:Path=ROOT/'_quarto.yml') -> dict:
    "The parsed `_quarto.yml`."
    return yaml.safe_load(path.read_text()) or {}

def notebooks(q:dict) -> list[Path]:
    "The notebooks `project.render` selects, index first, then in file-name order (the nbs/ numbering)."
    pats = q.get('project', {}).get('render') or ['nbs/*.ipynb']
    nbs = sorted({Path(p).resolve() for pat in pats for p in glob.glob(str(ROOT/pat)) if p.endswith('.ipynb')})
    if not nbs: raise SystemExit(f"_quarto.yml's project.render ({pats}) selects no notebook")
    return sorted(nbs, key=lambda p: (p.stem != 'index', p.name))

def title(nb:dict, fallback:str) -> str:
    "The text of a notebook's first `# heading` (markdown cells), else `fallback`."
    for c in nb['cells']:
        if c['cell_type'] == 'markdown':
            m = re.search(r'^#\s+(.+?)\s*#*\s*$', ''.join(c['source']), re.M)
            if m: return m[1].replace('`', '')
    return fallback

def directives(src:str) -> dict[str, str]:
    "The nbdev directives (`#| name value`) at the top of a code cell."
    out = {}
    for line in src.splitlines():
        m = DIRECTIVE.match(line)
        if not m:
            if line.strip(): break
            continue
        k, _, v = m[1].partition(' ')
        out[k.rstrip(':')] = v.strip()
    return out

def prepare(nb:dict) -> dict:
    "The notebook as the site shows it: `#| hide` cells and directive lines gone, empty cells without outputs dropped."
    cells = []
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'code':
            d = directives(src)
            if 'hide' in d or d.get('include') == 'false': continue
            src = '\n'.join(l for l in src.splitlines() if not DIRECTIVE.match(l)).strip('\n')
            if d.get('echo') == 'false': c = {**c, 'metadata': {**c.get('metadata', {}), 'tags': [*c.get('metadata', {}).get('tags', []), 'remove_input']}}
            if not src.strip() and not c.get('outputs'): continue
        elif not src.strip(): continue
        else: src = src.replace('\\$', ESCAPED_DOLLAR)
        cells.append({**c, 'source': src})
    return {**nb, 'cells': cells}

def module_notebooks(nbs:list[Path]) -> dict[str, Path]:
    "Module name (`trader.core.store`) -> the notebook that exports it (its `#| default_exp`)."
    out = {}
    for p in nbs:
        for c in json.loads(p.read_text())['cells']:
            if c['cell_type'] == 'code' and (m := directives(''.join(c['source'])).get('default_exp')):
                out[f"trader.{m}"] = p; break
    return out

def modules() -> list[str]:
    "Every module of the four layers (from the files, so nothing is imported), in name order; `_modidx` and private ones skipped."
    return [f"trader.{layer}.{p.stem}" for layer, _ in LAYERS for p in sorted((ROOT/'trader'/layer).glob('*.py'))
            if not p.stem.startswith('_')]

def summary(mod:str) -> str:
    "The first paragraph of a module's docstring, read statically."
    import ast
    doc = ast.get_docstring(ast.parse((ROOT/Path(*mod.split('.'))).with_suffix('.py').read_text())) or ''
    return doc.strip().split('\n\n')[0].replace('\n', ' ')

def write(src:Path=SRC, site_dir:Path|None=None) -> Path:
    "Write the pages and `mkdocs.yml` into `src` (replacing the pages); the path of `mkdocs.yml`."
    q = quarto()
    site = q.get('website', {})
    site_dir = Path(site_dir or ROOT/q.get('project', {}).get('output-dir', '_docs')).resolve()
    pages = src/'pages'
    shutil.rmtree(pages, ignore_errors=True); (pages/'api').mkdir(parents=True); (pages/'stylesheets').mkdir()
    (pages/'stylesheets'/'extra.css').write_text(EXTRA_CSS)
    if (ROOT/'nbs'/'images').is_dir(): shutil.copytree(ROOT/'nbs'/'images', pages/'images')   # pictures the notebooks' prose shows
    nbs = notebooks(q)
    nav_nbs = []
    for p in nbs:
        nb = json.loads(p.read_text())
        name = 'index.ipynb' if p.stem == 'index' else p.name
        (pages/name).write_text(json.dumps(prepare(nb), indent=1))
        if p.stem != 'index': nav_nbs.append({title(nb, p.stem): name})
    owners = module_notebooks(nbs)
    api = {label: [] for _, label in LAYERS}
    for mod in modules():
        layer = dict(LAYERS)[mod.split('.')[1]]
        nb = owners.get(mod)
        lines = [f"# {mod}", '']
        if nb is not None and nb.parent == ROOT/'nbs': lines += [f"Source notebook: [{title(json.loads(nb.read_text()), nb.stem)}](../{nb.name}).", '']
        lines += [f"::: {mod}", '']
        (pages/'api'/f"{mod}.md").write_text('\n'.join(lines))
        api[layer].append({mod: f"api/{mod}.md"})
    api_index = ['# API reference', '', 'Generated from the docstrings of the `trader` package, one page per module; '
                 'the layers import downwards only (operations > live > research > core).', '']
    for label, entries in api.items():
        api_index += [f"## {label}", '', '| module | what it does |', '|---|---|']
        api_index += [f"| [`{m}`]({m}.md) | {summary(m).replace('|', PIPE)} |" for e in entries for m in e]
        api_index.append('')
    (pages/'api'/'index.md').write_text('\n'.join(api_index))
    cfg = {
        'site_name': site.get('title', 'trader'),
        'site_description': site.get('description', ''),
        'docs_dir': str(pages), 'site_dir': str(site_dir),
        'use_directory_urls': True, 'strict': True,
        'theme': {'name': 'material', 'font': False, 'features': ['navigation.sections', 'navigation.top', 'search.highlight', 'content.code.copy'],
                  'palette': {'primary': 'indigo'}},
        'nav': [{'Home': 'index.ipynb'}, {'Notebooks': nav_nbs},
                {'API reference': [{'Overview': 'api/index.md'}, *[{label: e} for label, e in api.items() if e]]}],
        'extra': {'generator': False}, 'extra_css': ['stylesheets/extra.css'],
        'markdown_extensions': ['admonition', 'tables', 'toc', 'pymdownx.highlight', 'pymdownx.superfences'],
        'hooks': [str(Path(__file__).with_name('docs_hooks.py'))],
        'plugins': [
            {'search': {'lang': 'en'}},
            {'mkdocs-jupyter': {'execute': False, 'include_source': True, 'ignore_h1_titles': True, 'include_requirejs': False, 'no_prompt': True,
                                'remove_tag_config': {'remove_input_tags': ['remove_input']},
                                'cache_dir': str(CACHE), 'custom_mathjax_url': ''}},
            {'mkdocstrings': {'default_handler': 'python', 'handlers': {'python': {
                'paths': [str(ROOT)],
                'options': {'allow_inspection': False, 'show_root_heading': False, 'show_source': False, 'members_order': 'source',
                            'filters': ['!^_'], 'heading_level': 2, 'show_signature_annotations': True, 'separate_signature': True,
                            'docstring_style': None, 'show_symbol_type_heading': True, 'show_symbol_type_toc': True}}}}},
        ],
    }
    out = src/'mkdocs.yml'
    out.write_text('# Generated by .ci/docs.py from _quarto.yml and the notebooks: edit those, not this file.\n' + yaml.safe_dump(cfg, sort_keys=False))
    return out

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--site-dir', type=Path, help="build here instead of _quarto.yml's output-dir")
    ap.add_argument('--src', type=Path, default=SRC, help='where to write the pages and mkdocs.yml (default _docs_src/)')
    ap.add_argument('--config-only', action='store_true', help='write _docs_src/ without building')
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    cfg = write(a.src.resolve(), site_dir=a.site_dir)
    if a.config_only: print(cfg); return
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE/'.lock', 'w') as lock:     # one build at a time writes the shared cache (parallel test workers, make docs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = subprocess.run([sys.executable, '-c', STATIC_BUILD, 'build', '--strict', '--clean', '-q', '-f', str(cfg)], cwd=ROOT,
                           env={**os.environ, 'NO_MKDOCS_2_WARNING': '1'})
    if r.returncode: raise SystemExit(f"mkdocs build failed (exit {r.returncode}); the configuration is {cfg}")
    site = Path(yaml.safe_load(cfg.read_text())['site_dir'])
    for p in notebooks(quarto()):      # the download beside each page is the notebook itself, not the copy prepared for the page
        shutil.copyfile(p, site/(p.name if p.stem == 'index' else f'{p.stem}/{p.name}'))
    size = sum(f.stat().st_size for f in site.rglob('*') if f.is_file())
    print(f"docs: {site} built in {time.monotonic()-t0:.1f}s ({size/2**20:.1f} MiB); view it with `python -m http.server -b 127.0.0.1 -d {site}`")

if __name__ == '__main__': main()
