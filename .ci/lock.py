"""The lock file (requirements.lock) against settings.ini: `make lock` and `make lock-check` call this.

  python .ci/lock.py in                 settings.ini's requirements + dev_requirements, one a line (uv pip compile's input)
  python .ci/lock.py check [--installed]
      every requirement in settings.ini is pinned in the lock and the pin satisfies it; the lock has no stale top-level
      entry (one the compiler added for the input that settings.ini no longer asks for, or one nothing needs); torch is
      the CPU build and no nvidia-* package is locked; with --installed, this Python's packages are exactly the pins.
  python .ci/lock.py pipcheck
      `pip check`, accepting only the conflicts .ci/overrides.txt causes (a dependency's declared bound that an
      override overrules, each with its reason in that file).
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

def overrides(path:Path=ROOT/'.ci'/'overrides.txt') -> dict[str, Requirement]:
    "{canonical name: requirement} of the overrides file (comments and blank lines skipped)."
    reqs = [Requirement(l.split('#')[0].strip()) for l in path.read_text().splitlines() if l.split('#')[0].strip()] if path.is_file() else []
    return {canonicalize_name(r.name): r for r in reqs}

def pip_check_problems(output:str, over:dict[str, Requirement]) -> list[str]:
    "The lines of `pip check`'s output that no override explains."
    out = []
    for line in output.splitlines():
        m = re.match(r'^\S+ \S+ has requirement ([A-Za-z0-9._-]+)\S*, but you have \1 (\S+?)\.?$', line.strip())
        if m and canonicalize_name(m.group(1)) in over and over[canonicalize_name(m.group(1))].specifier.contains(m.group(2), prereleases=True): continue
        if line.strip() and line.strip() != 'No broken requirements found.': out.append(line.strip())
    return out

def main(argv:list[str]) -> int:
    if argv[:1] == ['in']: print('\n'.join(requirements())); return 0
    if argv[:1] == ['check']:
        problems = check(requirements(), (ROOT/'requirements.lock').read_text(), installed_versions() if '--installed' in argv else None)
        for p in problems: print(p, file=sys.stderr)
        if not problems: print(f"lock check: requirements.lock pins every requirement in settings.ini"
                               + (" and matches the installed packages" if '--installed' in argv else ""))
        return 1 if problems else 0
    if argv[:1] == ['pipcheck']:
        import subprocess
        r = subprocess.run([sys.executable, '-m', 'pip', 'check'], capture_output=True, text=True)
        problems = pip_check_problems(r.stdout + r.stderr, overrides())
        for p in problems: print(p, file=sys.stderr)
        if not problems: print(f"pip check: no broken requirements" + (" beyond .ci/overrides.txt's" if r.returncode else ""))
        return 1 if problems else 0
    print(__doc__, file=sys.stderr); return 2

if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
