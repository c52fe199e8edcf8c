"""One process per session or job: the lease in the store (trader.live.service.Lease), on SQLite and PostgreSQL.

The acceptance items: a second process for the same session exits with its own exit code and a message naming the holder;
a lease whose holder was SIGKILLed is taken over after its expiry (and at once on the same host when its process is gone);
`trader nightly` and `trader experiment run` are guarded the same way.
"""
import os, signal, socket, subprocess, sys, textwrap, time
from pathlib import Path
import pandas as pd
import pytest
from fastcore.test import test_eq as _test_eq, test_fail as _test_fail
from conftest import hang_guard
from trader.core.config import load_settings
from trader.core.store import Store
from trader.live.service import Lease, LeaseHeld, LeaseLost, lease_holder, leases

ROOT = Path(__file__).resolve().parents[1]

def _settings(url, **service):
    s = load_settings(env={**os.environ, 'TRADER_DB_URL': url})
    return s.model_copy(update={'service': s.service.model_copy(update=service)}) if service else s

def test_lease_exclusive_expiry_and_loss(store):
    "Both engines: a live holder refuses a second, an expired one is taken over, and the old holder then learns it lost the lease."
    s = _settings(store.url)
    t = {'now': pd.Timestamp('2026-03-02 15:00', tz='UTC')}
    now = lambda: t['now']
    a = Lease(store, 'paper:x', s, ttl=30, detail={'run_id': 'R1'}, now=now).acquire()
    b = Lease(store, 'paper:x', s, ttl=30, now=now)
    with pytest.raises(LeaseHeld) as e: b.acquire()
    _test_eq(e.value.exit_code, 6)
    msg = str(e.value)
    assert '\n' not in msg and f"host {socket.gethostname()} pid {os.getpid()} since 2026-03-02 15:00:00 UTC" in msg and 'paper:x is already running' in msg
    t['now'] += pd.Timedelta(seconds=20); a.renew()                    # renewed: good for 30 s from here
    t['now'] += pd.Timedelta(seconds=25); _test_fail(b.acquire, contains='already running')
    t['now'] += pd.Timedelta(seconds=6); b.acquire()                   # 31 s after the renewal: expired
    assert 'expired' in b.taken_over['why']
    _test_fail(a.renew, contains='lost the lease')
    assert not a.held
    a.release()                                                        # releasing a lost lease leaves the new holder alone
    _test_eq(lease_holder(store, 'paper:x').token, b.token)
    _test_eq([l.name for l in leases(store)], ['paper:x'])
    b.release()
    _test_eq(lease_holder(store, 'paper:x'), None)
    with Lease(store, 'paper:x', s, now=now) as c: assert c.held       # free again
    _test_eq(leases(store), [])

# A holder process and the test hand over by files in `sync`: the holder touches `ready.PID` once loaded and waits for `go`
# (so processes started together race at one instant however long each took to start), then waits for `release` (so the
# winner holds the lease until the others have been refused, however slow they are). Their waits guard against a hang only.
_HOLD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from trader.core.config import load_settings
    from trader.core.store import Store
    from trader.live.service import Lease, LeaseHeld
    s = load_settings()
    s = s.model_copy(update={'service': s.service.model_copy(update={'lease_ttl': float(sys.argv[2])})})
    store = Store(settings=s)
    sync, guard = Path(sys.argv[3]), float(sys.argv[5])
    def wait_for(name):
        end = time.monotonic() + guard
        while not (sync/name).exists():
            if time.monotonic() > end: sys.exit(f'no {name} from the test within {guard:g}s')
            time.sleep(0.001)
    (sync/f'ready.{os.getpid()}').touch()
    wait_for('go')
    try: l = Lease(store, sys.argv[1], s).acquire()
    except LeaseHeld as e: print('refused:', e, flush=True); sys.exit(e.exit_code)
    print('acquired', flush=True)
    if sys.argv[4] == 'die': os.kill(os.getpid(), signal.SIGKILL)
    wait_for('release'); l.release()
""")

def _holder(name, ttl, sync:Path, then:str):
    "A process taking lease `name` (ttl seconds) when `sync`/go exists; then it dies (`die`) or holds it until `sync`/release exists (`hold`)."
    return subprocess.Popen([sys.executable, '-c', _HOLD, name, str(ttl), str(sync), then, str(hang_guard(30))], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)

def _wait(what, cond, ps, timeout):
    "Poll `cond()` until true; fail naming `what` after `timeout` seconds (a hang guard)."
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            for p in ps: p.kill()
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}: {[p.communicate()[0] for p in ps]}")
        time.sleep(0.01)

def test_processes_started_together_one_wins(tmp_path):
    "Four processes race for one lease at the same instant: exactly one gets it, the others exit 6 naming it."
    Store().close()                       # the database exists before the race (each process would migrate it otherwise)
    sync = tmp_path/'sync'; sync.mkdir()
    ps = [_holder('paper:race', 3600, sync, 'hold') for _ in range(4)]
    _wait('the four processes to be ready', lambda: len(list(sync.glob('ready.*'))) + sum(p.poll() is not None for p in ps) >= 4, ps, hang_guard(10))
    (sync/'go').touch()
    _wait('three of them to be refused', lambda: sum(p.poll() is not None for p in ps) >= 3, ps, hang_guard(5))
    (sync/'release').touch()
    outs = [p.communicate(timeout=hang_guard(5))[0] for p in ps]
    codes = [p.returncode for p in ps]
    _test_eq(sorted(codes), [0, 6, 6, 6])
    winner = ps[codes.index(0)].pid
    for o, c in zip(outs, codes):
        if c == 6: assert f"paper:race is already running: held by host {socket.gethostname()} pid {winner} since" in o, o

def test_sigkilled_holder_taken_over_after_expiry(tmp_path):
    "A holder killed by SIGKILL never releases: its lease is refused until it expires, then taken over; on the same host a gone pid is taken at once."
    (tmp_path/'go').touch()
    p = _holder('nightly', 3600, tmp_path, 'die')
    out = p.communicate(timeout=hang_guard(10))[0]
    _test_eq(p.returncode, -signal.SIGKILL)
    assert 'acquired' in out
    store = Store()
    dead = lease_holder(store, 'nightly')
    _test_eq(dead.pid, p.pid)
    s_remote = _settings(store.url, lease_same_host_check=False)       # as if the holder were on another host: only the expiry counts
    with pytest.raises(LeaseHeld) as e: Lease(store, 'nightly', s_remote).acquire()      # before its expiry (an hour away)
    assert f"pid {p.pid}" in str(e.value) and 'expires in' in str(e.value)
    later = dead.expires + pd.Timedelta(seconds=1)                                    # and as seen a second after it
    l = Lease(store, 'nightly', s_remote, now=lambda: later).acquire()
    assert 'expired' in l.taken_over['why'] and l.taken_over['pid'] == p.pid
    l.release()
    # the same host, checked: the dead holder's lease is taken before its expiry
    p = _holder('nightly', 3600, tmp_path, 'die'); p.communicate(timeout=hang_guard(10))
    l = Lease(store, 'nightly', _settings(store.url)).acquire()
    assert 'no longer running' in l.taken_over['why'], l.taken_over
    l.release()

def test_keep_alive_renews_in_the_background():
    "A job's lease (nightly, experiment run) is renewed by a thread: it outlives its ttl while held, and is gone after release."
    store = Store()
    s = _settings(store.url)
    l = Lease(store, 'experiment:keep', s, ttl=0.9).acquire().keep_alive()
    first = lease_holder(store, 'experiment:keep').expires
    def outlived():      # past its first expiry, still ours and not expired: renewed (every 0.3 s) by the thread
        cur, now = lease_holder(store, 'experiment:keep'), pd.Timestamp.now(tz='UTC')
        return now > first and cur.token == l.token and cur.expires > now
    _wait('the lease to outlive its first expiry', outlived, [], hang_guard(2))
    l.release()
    _test_eq(lease_holder(store, 'experiment:keep'), None)

@pytest.mark.parametrize('argv,name', [(['nightly', '--dry-run'], 'nightly'),
                                       (['experiment', 'run', '--name', 'guarded', '--folds', '1', '--seeds', '1'], 'experiment:guarded')])
def test_jobs_guarded(argv, name, capsys):
    "`trader nightly` and `trader experiment run NAME` exit 6 while another live process holds their lease."
    from trader.ops.cli import main
    store = Store()
    other = Lease(store, name, _settings(store.url)).acquire()       # a live holder (this test process, another token)
    try:
        _test_eq(main(argv), 6)
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {name} is already running: held by host {socket.gethostname()} pid {os.getpid()} since"), err
        assert '\n' not in err
    finally: other.release()
