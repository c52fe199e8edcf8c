"""The lock file (requirements.lock) against settings.ini: `make lock` and `make lock-check` call this.

  python .ci/lock.py in                 settings.ini's requirements + dev_requirements, one a line (uv pip compile's input)
  python .ci/lock.py check [--installed]
      every requirement in settings.ini is pinned in the lock and the pin satisfies it; the lock has no stale top-level
      entry (one the compiler added for the input that settings.ini no longer asks for, or one nothing needs); torch is
      the CPU build and no nvidia-* package is locked; with --installed, this Python's packages are exactly the pins.
Exit 1 with one line per problem."""
import configparser, re, shlex, sys
from pathlib import Path
try: from packaging.requirements import Requirement; from packaging.utils import canonicalize_name; from packaging.version import Version
except ImportError:   # a fresh venv before its first install has only pip, which carries its own copy
    from pip._vendor.packaging.requirements import Requirement; from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

def requirements(settings:Path=ROOT/'settings.ini') -> list[str]:
    "settings.ini's `requirements` then `dev_requirements`, duplicates dropped, in order."
    c = configparser.ConfigParser(delimiters=['=']); c.read(settings, encoding='utf-8')
    d, out = c['DEFAULT'], []
    for r in shlex.split(d.get('requirements', '')) + shlex.split(d.get('dev_requirements', '')):
        if r not in out: out.append(r)
    return out

PIN = re.compile(r'^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)')

def parse_lock(text:str) -> dict[str, tuple[str, set[str]]]:
    "{canonical name: (version, {what needs it})} from a `uv pip compile`/pip-compile output with annotations."
    out, cur, in_via = {}, None, False
    for line in text.splitlines():
        m = PIN.match(line)
        if m:
            cur = canonicalize_name(m[1]); out[cur] = (m[3], set()); in_via = False; continue
        s = line.strip()
        if cur is None or not s.startswith('#'): cur = None if not s.startswith('#') else cur; continue
        body = s.lstrip('#').strip()
        if body.startswith('via'):
            in_via = True; body = body[3:].strip()
        if in_via and body:
            out[cur][1].add(body.split(' (')[0])
    return out

def check(reqs:list[str], lock_text:str, installed:dict[str, str]|None=None) -> list[str]:
    "Problems (one line each) between the requirements, the lock and optionally the installed {name: version}."
    lock, problems, wanted = parse_lock(lock_text), [], set()
    for r in map(Requirement, reqs):
        n = canonicalize_name(r.name); wanted.add(n)
        if n not in lock: problems.append(f"{r} (settings.ini) is not pinned in requirements.lock: run `make lock`"); continue
        if not r.specifier.contains(Version(lock[n][0]), prereleases=True):
            problems.append(f"{r} (settings.ini) is not satisfied by the lock's {n}=={lock[n][0]}: run `make lock`")
    needs: dict[str, set[str]] = {}                 # package -> what it needs, from the lock's `# via` annotations
    for n, (_, via) in lock.items():
        for parent in via:
            if not parent.startswith('-'): needs.setdefault(canonicalize_name(parent), set()).add(n)
    reached, todo = set(), [n for n in wanted if n in lock]
    while todo:
        n = todo.pop()
        if n not in reached: reached.add(n); todo += needs.get(n, ())
    for n, (v, via) in lock.items():
        if n not in reached:
            problems.append(f"{n}=={v} is in requirements.lock but neither settings.ini nor a locked package needs it (stale): run `make lock`")
        if n.startswith('nvidia-'): problems.append(f"{n}=={v} is locked: the lock must hold the CPU build of torch (no CUDA packages)")
    if 'torch' in lock and Version(lock['torch'][0]).local != 'cpu':
        problems.append(f"torch=={lock['torch'][0]} is locked: the lock must hold the CPU build (torch==X+cpu)")
    if installed is not None:
        for n, (v, _) in lock.items():
            have = installed.get(n)
            if have is None: problems.append(f"{n}=={v} is locked but not installed: run `make install`")
            elif Version(have) != Version(v): problems.append(f"{n} {have} is installed but the lock pins {v}: run `make install`")
    return problems

def installed_versions() -> dict[str, str]:
    from importlib.metadata import distributions
    return {canonicalize_name(d.metadata['Name']): d.version for d in distributions()}

def main(argv:list[str]) -> int:
    if argv[:1] == ['in']: print('\n'.join(requirements())); return 0
    if argv[:1] == ['check']:
        problems = check(requirements(), (ROOT/'requirements.lock').read_text(), installed_versions() if '--installed' in argv else None)
        for p in problems: print(p, file=sys.stderr)
        if not problems: print(f"lock check: requirements.lock pins every requirement in settings.ini"
                               + (" and matches the installed packages" if '--installed' in argv else ""))
        return 1 if problems else 0
    print(__doc__, file=sys.stderr); return 2

if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
