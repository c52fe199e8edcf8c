"""Notebooks as documents: execute every notebook the way `nbdev_test` does, then write or check their outputs.

  python .ci/nbrun.py write [NB ...]   execute and store the outputs in the notebooks (`make nbs`)
  python .ci/nbrun.py check [NB ...]   execute and compare with the committed outputs (`make nbtest`, part of `make test`)

Execution is nbdev_test's: the same in-process IPython shell (execnb's CaptureShell), the same skip rules (`#| eval: false`,
settings.ini's `tst_flags`, `nbdev_export(` cells), the notebook's folder as working directory, the same TRADER_HOME and
TRADER_REPORTS for both commands (Makefile; each notebook in its own sub-folder of them), 2 notebooks at a time, each in a fresh process.

What is compared (`check`): every executed code cell's outputs, in order: stream text, errors, and each rich output's text
(`text/plain`, `text/html`, `text/markdown`) after normalisation (the repository's own path, temporary folders, object
addresses), with runs of white space as layout and floats compared with a relative tolerance of 1e-6 (`REL_TOL`: their
last digits differ between machines). A float is a number written with a decimal point or an exponent, standing alone
(`_FLOAT`): integers, ids, hashes, dates, versions and every other character compare exactly. Images are compared by presence
only (their bytes depend on the renderer). A plotly figure is stored as a PNG plus a text line holding the SHA-256 of the
figure's JSON with its floating-point values taken out, and sums of those values compared with the same tolerance (three
per float array: `chart_fingerprint`), so a chart whose data changed is stale even though its image is not compared.
Cells tagged `volatile` (timings, benchmark figures, wall-clock dates) must run but their outputs are not compared. A cell
whose committed outputs differ from a fresh run fails the check with a diff; the fix is `make nbs`.

Charts: in `write`, plotly figures are rendered to PNG with kaleido (headless Chromium, offline); in JupyterLab the same
figures stay interactive, because this renderer is installed only by this script."""
import base64, contextlib, difflib, logging, hashlib, json, math, multiprocessing as mp, os, re, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
VOLATILE = 'volatile'
TEXT_MIMES = ('text/plain', 'text/html', 'text/markdown', 'text/latex', 'application/json')

# ----------------------------------------------------------------------------------------------------- normalisation
_ADDR = re.compile(r' at 0x[0-9a-fA-F]+')
_TMP = re.compile(r'/tmp/(?:pytest-of-[^/\s]+/)?(?:tmp|pytest-)[A-Za-z0-9_]+')
_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')

def clean_text(s:str) -> str:
    "Text as stored: the repository's absolute path removed (outputs read the same on every clone), temp folders named alike."
    s = s.replace(str(ROOT) + '/', '').replace(str(ROOT), '.')
    return _TMP.sub('/tmp/…', s)

# What differs between two honest runs: the wall clock (the sample data ends in 2013, so a year from 2020 on is today's),
# ids built from it with a random suffix, durations, and the random ids of pandas Stylers and plotly divs.
_WALL = [(re.compile(r'\b20[2-9]\d{11}\b'), '<ts>'),
         (re.compile(r'(<ts>[A-Za-z0-9_.-]*?)-[0-9a-f]{6}\b'), r'\1-<hex>'),
         (re.compile(r'\b20[2-9]\d-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:[+-]\d\d:?\d\d|Z)?)?'), '<now>'),
         (re.compile(r'\b20[2-9]\d(?:0[1-9]|1[0-2])\d\d\b'), '<today>'),
         (re.compile(r'\b\d+(?:[.,]\d+)*\s?(?:ms|µs|us|s|secs?|seconds|min)\b'), '<duration>'),
         (re.compile(r'\bT_[0-9a-f]{5}(?![0-9a-f])'), 'T_<id>'),
         (re.compile(r'\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b'), '<uuid>')]

def norm_text(s:str) -> str:
    "Text as compared: stored form, without ANSI colours, object addresses, wall-clock times, durations, random ids, trailing blanks."
    s = _ADDR.sub('', _ANSI.sub('', clean_text(s)))                      # nbdev_clean drops the addresses it finds
    for rx, to in _WALL: s = rx.sub(to, s)
    return '\n'.join(l.rstrip() for l in s.splitlines()).strip('\n')

def _join(v) -> str: return ''.join(v) if isinstance(v, list) else str(v)

def norm_outputs(outputs:list) -> list[str]:
    "One comparable line-block per output."
    out = []
    for o in outputs:
        t = o.get('output_type')
        if t == 'stream': out.append(f"[{o.get('name')}]\n" + norm_text(_join(o.get('text', ''))))
        elif t == 'error': out.append(f"[error] {o.get('ename')}: {norm_text(str(o.get('evalue')))}")
        elif t in ('display_data', 'execute_result'):
            d = o.get('data', {})
            parts = [f"[{t}]"] + [f"{m}: <image>" for m in sorted(d) if m.startswith('image/')]
            parts += [f"{m}:\n{norm_text(_join(d[m]) if m != 'application/json' else json.dumps(d[m], sort_keys=True))}"
                      for m in TEXT_MIMES if m in d]
            parts += [f"{m}: <present>" for m in sorted(d) if m not in TEXT_MIMES and not m.startswith('image/')]
            out.append('\n'.join(parts))
    # stdout written in several pieces may be split into several stream outputs: merge neighbours of one stream
    merged = []
    for b in out:
        if merged and b.startswith('[std') and merged[-1].split('\n', 1)[0] == b.split('\n', 1)[0]:
            merged[-1] += '\n' + b.split('\n', 1)[1]
        else: merged.append(b)
    return merged

def clean_outputs(outputs:list) -> list:
    "Outputs as stored: notebook JSON, text cleaned (see `clean_text`), no execution counts."
    res = []
    for o in outputs:
        o = json.loads(json.dumps(o, default=str))
        if o.get('output_type') == 'stream': o['text'] = clean_text(_join(o['text'])).splitlines(True)
        if o.get('output_type') == 'error':
            o['evalue'] = clean_text(str(o['evalue'])); o['traceback'] = [clean_text(x) for x in o.get('traceback', [])]
        if 'data' in o:
            if not o['data']: continue                                  # a figure's _ipython_display_ leaves an empty result
            o['data'] = {m: (clean_text(_join(v)).splitlines(True) if m.startswith('text/') else v) for m, v in o['data'].items()}
            o.setdefault('metadata', {})
        if o.get('output_type') == 'execute_result': o['execution_count'] = None
        res.append(o)
    return res

# --------------------------------------------------------------------------------------------------------- charts
def chart_fingerprint(fig:dict) -> tuple[object, list[float]]:
    """A figure as (its shape, sums of its floats). The shape is the figure with every floating-point value replaced by a
    marker (a float array, plotly's base64 `bdata` included, by its length, shape and count of non-finite values). The sums,
    three per float array (the finite values) and three for all scalar floats together, are sum |x|, sum max(x, 0) and
    sum i*|x|/n (i the index): no term cancels another, so each is as exact as the values (see `REL_TOL`), and a value
    changed, moved or of flipped sign changes one of them. The shape is hashed exactly; the sums are compared with the
    tolerance. The limit: one value of an array of n changed by less than about n*REL_TOL of the array's mean size
    goes unseen (a chart is a picture; the figures a notebook states are in its text outputs)."""
    import numpy as np
    arrays, scalars = [], []
    def floats(a, shape):
        a = np.asarray(a, dtype=float).ravel()
        ok = np.isfinite(a); arrays.append(a[ok])
        return {'floats': int(a.size), 'non_finite': int((~ok).sum()), 'shape': shape}
    def walk(o):
        if isinstance(o, dict):
            if 'bdata' in o and 'dtype' in o:
                dt = np.dtype(o['dtype'])
                if dt.kind != 'f': return {k: o[k] for k in sorted(o)}
                return floats(np.frombuffer(base64.b64decode(o['bdata']), dtype=dt), o.get('shape'))
            return {k: walk(o[k]) for k in sorted(o)}
        if isinstance(o, (list, tuple)):
            if len(o) > 1 and all(isinstance(x, (float, np.floating)) for x in o): return floats(o, None)
            return [walk(x) for x in o]
        if isinstance(o, np.ndarray):
            return floats(o, list(o.shape)) if o.dtype.kind == 'f' else walk(o.tolist())
        if isinstance(o, (float, np.floating)):
            if not math.isfinite(o): return repr(float(o))
            scalars.append(float(o)); return '<float>'
        return o
    shape = walk(fig)
    def sums(x):
        ax = np.abs(x)
        return [ax.sum(), np.maximum(x, 0).sum(), (np.arange(1, len(x) + 1)*ax).sum()/max(len(x), 1)]
    return shape, [v for a in arrays + [np.array(scalars)] for v in sums(a)]

# --------------------------------------------------------------------------------------------------------- rendering
def install_chart_renderer(images:bool):
    "plotly figures display as a PNG (`images`; kaleido + headless Chromium) plus a text line naming the figure's data hash."
    import plotly.io as pio
    from plotly.io._base_renderers import MimetypeRenderer
    from plotly.utils import PlotlyJSONEncoder

    class Static(MimetypeRenderer):
        def to_mimebundle(self, fig_dict):
            shape, sums = chart_fingerprint(fig_dict)
            js = json.dumps(shape, cls=PlotlyJSONEncoder, sort_keys=True)
            for rx, to in _WALL: js = rx.sub(to, js)                     # a run id in a title is not the chart's data
            title = ((fig_dict.get('layout') or {}).get('title') or {})
            title = title.get('text', '') if isinstance(title, dict) else str(title)
            lay = fig_dict.get('layout') or {}
            w, h = lay.get('width') or 900, lay.get('height') or 450
            b = {'text/plain': f"plotly figure {title!r} ({w}x{h}, data sha256 {hashlib.sha256(js.encode()).hexdigest()[:16]}, "
                               f"values {' '.join(repr(float(x)) for x in sums)})"}
            if not images: b['image/png'] = ''                          # `check` compares images by presence: none drawn
            else:
                for attempt in range(3):                # kaleido's page can be called before its script loaded (a loaded machine)
                    try:
                        with open(os.devnull, 'w') as null, contextlib.redirect_stderr(null):   # Chromium's chatter is not output
                            b['image/png'] = base64.b64encode(pio.to_image(fig_dict, format='png', width=w, height=h)).decode()
                        break
                    except Exception:
                        if attempt == 2: raise
                        time.sleep(2)
            return b

    for name in ('choreographer', 'kaleido', 'logistro'): logging.getLogger(name).setLevel(logging.CRITICAL)
    pio.renderers['trader_static'] = Static()
    pio.renderers.default = 'trader_static'

# ------------------------------------------------------------------------------------------------------ execution
def execute(fn:str, images:bool) -> dict:
    "Run one notebook as nbdev_test does; {'ok', 'secs', 'outputs': {cell index: outputs}, 'skipped': [cell index], 'error'}."
    from execnb.shell import CaptureShell
    from fastcore.basics import str2bool
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.frontmatter import FrontmatterProc
    os.environ['IN_TEST'] = '1'
    install_chart_renderer(images)
    fn, cfg = Path(fn), get_config()
    for var in ('TRADER_HOME', 'TRADER_REPORTS'):         # a home per notebook: no output depends on which ran first
        if os.environ.get(var): os.environ[var] = str(Path(os.environ[var])/fn.stem)
    flags = set(cfg.tst_flags.split())
    nb = NBProcessor(fn, procs=FrontmatterProc, process=True).nb
    if str2bool(getattr(nb, 'frontmatter_', {}).get('skip_exec', False)): return dict(ok=True, secs=0, outputs={}, skipped=[], error='')
    skipped = []
    def _no_eval(cell):
        if cell.cell_type != 'code': return True
        direc = getattr(cell, 'directives_', {}) or {}
        skip = ('nbdev_export' + '(' in cell.source or direc.get('eval:', [''])[0].lower() == 'false' or bool(flags & direc.keys()))
        if skip: skipped.append(cell.idx_)
        return skip
    sys.path.insert(0, str(cfg.config_path))
    t0, k = time.time(), CaptureShell(fn)
    ok, err = True, ''
    try:
        with working_directory(fn.parent): k.run_all(nb, exc_stop=True, preproc=_no_eval)
    except BaseException:
        ok, err = False, k.prettytb(fname=fn)
    outs = {c.idx_: clean_outputs(c.get('outputs', []))
            for c in nb.cells if c.cell_type == 'code' and c.idx_ not in skipped}
    return dict(ok=ok, secs=time.time() - t0, outputs=outs, skipped=skipped, error=err)

def _worker(args):
    fn, images = args
    try: return fn, execute(fn, images)
    except BaseException as e: return fn, dict(ok=False, secs=0, outputs={}, skipped=[], error=f"{type(e).__name__}: {e}")

def notebooks(paths:list[str]) -> list[Path]:
    "The notebooks nbdev_test would run: nbs/**.ipynb except folders/files starting with _ or . and checkpoints."
    if paths: return [Path(p).resolve() for p in paths]
    return sorted(p.resolve() for p in NBS.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(NBS).parts))

def tagged(cell:dict, tag:str) -> bool: return tag in (cell.get('metadata', {}).get('tags') or [])

def _words(blocks:list[str]) -> list[str]:
    """Outputs without their layout: IPython wraps a repr at 79 columns before the checkout's path is removed, so where a line
    breaks depends on how long that path is. Runs of white space compare equal; every character else still counts."""
    return [re.sub(r'\s+', ' ', b) for b in blocks]

# Floating-point results that pass through BLAS, torch or threads can differ in their last digits between two machines, and
# on one machine under another load (09_train's mean confidence 0.11450457143380675 came back as 0.11450457146343132 on
# another host): a relative difference of 1e-6 is far below anything a notebook's prose or tests read from a figure
# (4-6 significant digits), and far above such noise (1e-10 and below). Values within 1e-12 of each other (a zero that
# comes out as 1e-17 or -2e-17) are equal too.
REL_TOL, ABS_TOL = 1e-6, 1e-12

# A float is a number written with a decimal point or an exponent (0.1145, -3.5e-72, 1e-05, 57.976, 2.): integers (counts,
# share quantities, ids' digits), dates (2013-03-01), versions (2.4.14) and hex digests have neither and compare exactly. It
# stands alone: not inside a word or an identifier (a hash's 3e5, v1.2) and not part of a dotted sequence.
_FLOAT = re.compile(r'(?<![\w.])-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+)(?!\w|\.\d)')

def same_text(a:str, b:str) -> bool:
    "Two outputs agree: equal once their floats are taken out, and each pair of floats within `REL_TOL` (or `ABS_TOL`)."
    if a == b: return True
    if _FLOAT.sub('<f>', a) != _FLOAT.sub('<f>', b): return False
    return all(math.isclose(float(x), float(y), rel_tol=REL_TOL, abs_tol=ABS_TOL) for x, y in zip(_FLOAT.findall(a), _FLOAT.findall(b)))

def same_outputs(old:list[str], new:list[str]) -> bool:
    "A cell's normalised outputs agree: as many blocks, each the same text up to layout and float noise."
    old, new = _words(old), _words(new)
    return len(old) == len(new) and all(same_text(a, b) for a, b in zip(old, new))

def compare(fn:Path, res:dict) -> list[str]:
    "Stale cells of `fn` against a fresh run `res`, as readable diffs."
    nb, probs = json.loads(fn.read_text()), []
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] != 'code' or tagged(c, VOLATILE): continue
        fresh = res['outputs'].get(i, []) if i not in res['skipped'] else []
        old, new = norm_outputs(c.get('outputs', [])), norm_outputs(fresh)
        if not same_outputs(old, new):
            diff = list(difflib.unified_diff('\n'.join(old).splitlines(), '\n'.join(new).splitlines(), 'committed', 'fresh', n=1, lineterm=''))
            src = _join(c['source']).strip().splitlines()
            probs.append(f"cell {i} ({src[0][:60] if src else ''!s}):\n    " + '\n    '.join(diff[:30]) + ('\n    …' if len(diff) > 30 else ''))
    return probs

def write(fn:Path, res:dict):
    "Store the fresh outputs in the notebook (other content untouched; skipped cells keep no output)."
    nb = json.loads(fn.read_text())
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] != 'code': continue
        c['outputs'] = [] if i in res['skipped'] else res['outputs'].get(i, [])
        c['execution_count'] = None
    fn.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')

def main(argv:list[str]) -> int:
    if not argv or argv[0] not in ('write', 'check'): print(__doc__); return 2
    mode, files = argv[0], notebooks(argv[1:])
    timing = ROOT/'.cache'/'nbrun-times.json'
    prev = json.loads(timing.read_text()) if timing.exists() else {}
    files.sort(key=lambda f: -prev.get(f.name, 1e9))                      # longest first: two workers finish together
    n = int(os.environ.get('NBRUN_WORKERS', '2'))
    t0, failed, stale, times = time.time(), [], [], {}
    with mp.get_context('fork').Pool(n, maxtasksperchild=1) as pool:       # a fresh process per notebook, as nbdev_test
        for fn, res in pool.imap_unordered(_worker, [(str(f), mode == 'write') for f in files]):
            fn = Path(fn); name = fn.relative_to(ROOT) if fn.is_relative_to(ROOT) else fn
            times[fn.name] = round(res['secs'], 1)
            if not res['ok']:
                failed.append(name); print(f"FAILED {name} ({res['secs']:.0f}s)\n{res['error']}", file=sys.stderr, flush=True); continue
            if mode == 'write': write(fn, res); print(f"wrote  {name} ({res['secs']:.0f}s)", flush=True); continue
            probs = compare(fn, res)
            if probs:
                stale.append((name, probs)); print(f"STALE  {name}: {len(probs)} cell(s) differ from a fresh run (shown at the end)", flush=True)
            else: print(f"ok     {name} ({res['secs']:.0f}s)", flush=True)
    timing.parent.mkdir(exist_ok=True); timing.write_text(json.dumps({**prev, **times}, indent=1, sort_keys=True))
    for name, probs in stale: print(f"STALE  {name}: {len(probs)} cell(s) differ from a fresh run\n  " + '\n  '.join(probs))
    print(f"{len(files)} notebooks in {time.time() - t0:.0f}s: {len(failed)} failed, {len(stale)} stale"
          + ''.join(f"\n  {w} {n}" for w, names in (('failed', failed), ('stale ', [n for n, _ in stale])) for n in names))
    if stale: print("committed outputs are stale: run `make nbs` and commit the notebooks (cells whose output is not "
                    "deterministic carry the `volatile` tag)", file=sys.stderr)
    return 1 if failed or stale else 0

if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
