"""`trader.core.audit`: the hash chain on both engines, tamper detection (the five attacks: modified, deleted and
inserted rows, a truncated tail and a chain rewritten by the published rule, each named with its seq), signed
checkpoints (periodic after commit, never for a rolled-back bar), concurrent appends from two processes, entries that
commit and roll back with the caller's transaction, the signed compliance pack and `verify_pack` with the public key
only, refusal of credentials, the signing key never leaking, and the exit codes of `cmd_audit_verify`.

Tests taking `store` or `db_url` run once on SQLite and once on PostgreSQL (see conftest.py).
"""
import hashlib, json, shutil, subprocess, sys, threading, time
from argparse import Namespace
from unittest import mock
from pathlib import Path
import numpy as np, pandas as pd
import pytest
from fastcore.test import test_eq as _test_eq, test_fail as _test_fail
from trader.core.audit import (EXIT_CHAIN_BROKEN, GENESIS, Attack, Audit, AuditError, Checkpoint, SigningKey, VerifyKey, canonical_json,
                               checkpoint_file, cmd_audit_export, cmd_audit_verify, entry_hash, key_file, keys_dir, load_signing_key,
                               public_keys, read_checkpoints, verify_pack)
from trader.core.config import load_settings
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from trader.core.store import Store

COLS = 'seq, ts, kind, payload, prev_hash, hash'

def bar(i:int) -> list[tuple[str, dict]]:
    "A bar's worth of entries: a decision, an order and its fill."
    coid = f'pa-test-{i:06d}'
    return [('decision', {'run_id': 'pa-test', 'bar': i, 'action': 5, 'label': 'AAPL HOLD, MSFT BUY', 'confidence': 0.6}),
            ('order', {'client_order_id': coid, 'symbol': 'MSFT', 'side': 'buy', 'qty': 10, 'reference_price': 400.0 + i}),
            ('fill', {'client_order_id': coid, 'symbol': 'MSFT', 'qty': 10, 'price': 400.5 + i, 'fees': 0.0})]

def filled(store, bars:int=4) -> Audit:
    "An audit log with a session start and `bars` bars of three entries (1 + 3*bars entries)."
    a = Audit(store)
    a.append('session', {'run_id': 'pa-test', 'state': 'start'})
    for i in range(bars):
        with store.transaction(): a.append_many(bar(i))
    return a

def rows(store) -> list[tuple]:
    return store.query(f'SELECT {COLS} FROM audit_log ORDER BY seq')

# -- the chain ---------------------------------------------------------------------------------------------------

def test_entries_chain_and_verify(store):
    a = filled(store)
    rs = rows(store)
    _test_eq([int(r[0]) for r in rs], list(range(1, 14)))
    _test_eq(rs[0][4], GENESIS)
    for prev, r in zip(rs, rs[1:]): _test_eq(r[4], prev[5])
    for r in rs: _test_eq(entry_hash(int(r[0]), *r[1:5]), r[5])
    # the definition, recomputed independently of entry_hash
    r = rs[5]
    _test_eq(hashlib.sha256('\n'.join([str(r[0]), r[1], r[2], r[3], r[4]]).encode('utf-8')).hexdigest(), r[5])
    res = a.verify()
    _test_eq((res.ok, res.n_checked, res.first_bad_seq, res.last_seq, res.last_hash), (True, 13, None, 13, rs[-1][5]))
    assert bool(res) and res.render().startswith(f'audit chain verified: 13 entries, last hash {rs[-1][5]} (seq 13)')
    _test_eq((a.verify(from_seq=5).ok, a.verify(from_seq=5).n_checked), (True, 9))
    _test_eq(a.verify(from_seq=99).n_checked, 0)
    _test_eq(a.last().seq, 13); _test_eq(a.last().hash, rs[-1][5])

def test_append_returns_what_was_stored(store):
    a = Audit(store)
    e = a.append('risk_event', {'rule': 'max_drawdown', 'value': np.float64(0.12), 'limit': 0.1, 'detail': float('nan'),
                                'symbols': np.array(['AAPL', 'MSFT']), 'bar_ts': pd.Timestamp('2026-03-05 15:31', tz='UTC')})
    _test_eq(e.seq, 1); _test_eq(e.prev_hash, GENESIS)
    _test_eq(e.payload, '{"bar_ts":"2026-03-05T15:31:00+00:00","detail":null,"limit":0.1,"rule":"max_drawdown","symbols":["AAPL","MSFT"],"value":0.12}')
    _test_eq(e.data['detail'], None)
    _test_eq(tuple(rows(store)[0]), (e.seq, e.ts, e.kind, e.payload, e.prev_hash, e.hash))
    assert e.ts.endswith('+00:00') and len(e.ts) == len('2026-03-05T15:31:02.123456+00:00')
    _test_eq(a.append('gate', {'status': 'GREEN'}, ts='2026-03-05 10:31:02-05:00').ts, '2026-03-05T15:31:02.000000+00:00')
    _test_eq(a.append_many([]), [])

def test_canonical_json():
    _test_eq(canonical_json({'b': [1, 2.5, None, True], 'a': {'y': 'ü', 'x': float('inf')}}), '{"a":{"x":null,"y":"ü"},"b":[1,2.5,null,true]}')
    _test_eq(canonical_json({1: 'a'}), '{"1":"a"}')
    _test_fail(lambda: canonical_json({'x': {1, 2}}), contains='payload.x')
    _test_fail(lambda: canonical_json('{}'), contains='is a dict')

def test_bad_kinds_are_refused(sqlite_store):
    a = Audit(sqlite_store)
    for k in ('', 'Order', 'order fill', 'order\nx', 3):
        _test_fail(lambda: a.append(k, {}), contains='lower-case name')
    _test_eq(a.last(), None)

def test_tail_and_entries(store):
    a = Audit(store)
    a.append('session', {'state': 'start'}, ts='2026-03-04 21:00')
    a.append_many(bar(0), ts='2026-03-05 15:31')
    a.append_many(bar(1), ts='2026-03-06 15:31')
    _test_eq(a.tail(2).seq.tolist(), [6, 7])
    _test_eq(list(a.tail(2).columns), COLS.split(', '))
    _test_eq(a.entries(from_ts='2026-03-05').seq.tolist(), [2, 3, 4, 5, 6, 7])
    _test_eq(a.entries(to_ts='2026-03-05').seq.tolist(), [1, 2, 3, 4])                 # a date alone: the whole day
    _test_eq(a.entries(to_ts='2026-03-05 15:31').seq.tolist(), [1, 2, 3, 4])
    _test_eq(a.entries(to_ts='2026-03-05 15:30').seq.tolist(), [1])
    _test_eq(a.entries(kinds='fill').seq.tolist(), [4, 7])
    _test_eq(a.entries('2026-03-06', kinds=['order', 'fill']).seq.tolist(), [6, 7])
    _test_eq(len(a.entries(kinds=[])), 0)

# -- transactions and concurrency --------------------------------------------------------------------------------

def test_entries_commit_and_roll_back_with_the_callers_transaction(store):
    a = filled(store, 1)
    with pytest.raises(RuntimeError):
        with store.transaction():
            a.append_many(bar(1))
            store.execute("INSERT INTO controls (key, value, updated, reason) VALUES ('halt', '1', 'now', 'test')")
            raise RuntimeError('the bar failed')
    _test_eq(a.last().seq, 4)
    _test_eq(store.query('SELECT COUNT(*) FROM controls')[0][0], 0)
    with store.transaction():
        a.append_many(bar(1))
        store.execute("INSERT INTO controls (key, value, updated, reason) VALUES ('halt', '1', 'now', 'test')")
    _test_eq(a.last().seq, 7)
    assert a.verify().ok

def test_an_open_bar_makes_other_appenders_wait(db_url):
    "An append inside a caller's transaction holds the audit lock until that transaction ends."
    s1, s2 = Store(db_url), Store(db_url)
    try:
        a1, a2, got, errors = Audit(s1), Audit(s2), [], []
        def other():
            try: got.append(a2.append('feed_state', {'state': 'connected'}).seq)
            except Exception as e: errors.append(e)
        with s1.transaction():
            a1.append('session', {'state': 'start'})
            t = threading.Thread(target=other); t.start()
            time.sleep(1.0)
            assert t.is_alive()                  # waiting for s1's transaction
            a1.append('decision', {'action': 0})
        t.join(60)
        _test_eq((errors, got), ([], [3]))
        r = a1.verify(); _test_eq((r.ok, r.n_checked), (True, 3))
    finally: s1.close(); s2.close()

WORKER = r"""
import sys, time
from pathlib import Path
from trader.core.store import Store
from trader.core.audit import Audit
url, who, sync = sys.argv[1], sys.argv[2], Path(sys.argv[3])
with Store(url) as s:
    a = Audit(s)
    (sync/f'{who}.ready').touch()
    deadline = time.time() + 60
    while len(list(sync.glob('*.ready'))) < 2 and time.time() < deadline: time.sleep(0.01)
    for i in range(50):
        if i % 10 == 9: a.append_many([('order', {'worker': who, 'i': i}), ('fill', {'worker': who, 'i': i})])
        else: a.append('decision', {'worker': who, 'i': i})
        time.sleep(0.002)
"""

def test_two_processes_appending_keep_one_chain(db_url, tmp_path):
    with Store(db_url) as s: filled(s, 1)
    procs = [subprocess.Popen([sys.executable, '-c', WORKER, db_url, w, str(tmp_path)], stderr=subprocess.PIPE, text=True) for w in 'AB']
    for p in procs:
        rc = p.wait(180)
        assert rc == 0, p.stderr.read()
    with Store(db_url) as s:
        a = Audit(s)
        r = a.verify()
        _test_eq((r.ok, r.n_checked, r.first_bad_seq), (True, 4 + 2*55, None))
        df = a.entries(from_ts=None)
        _test_eq(df.seq.tolist(), list(range(1, 4 + 2*55 + 1)))
        new = df.iloc[4:]
        who = [json.loads(p)['worker'] for p in new.payload]
        for w in 'AB':
            mine = [json.loads(p)['i'] for p, x in zip(new.payload, who) if x == w]
            _test_eq(mine, sorted(mine)); _test_eq(sorted(set(mine)), list(range(50)))
        for i in range(len(new) - 1):                           # an append_many pair is never split by the other writer
            if new.kind.iloc[i] == 'order': _test_eq((new.kind.iloc[i+1], who[i+1]), ('fill', who[i]))
        assert sum(x != y for x, y in zip(who, who[1:])) > 1    # the writers really did interleave

# -- tampering ---------------------------------------------------------------------------------------------------

def _forged(store, at:int) -> tuple:
    "A row for seq `at` that links to seq at-1 and carries a correct hash of its own."
    ts, ph = store.query('SELECT ts, hash FROM audit_log WHERE seq = ?', (at - 1,))[0]
    p = canonical_json({'client_order_id': 'forged', 'symbol': 'MSFT', 'side': 'sell', 'qty': 10})
    return (at, ts, 'order', p, ph, entry_hash(at, ts, 'order', p, ph))

def tamper(store, how:str):
    "Change the audit log behind the library's back; returns the (first_bad_seq, words in the reason) to expect."
    x = store.execute
    if how == 'modify':
        x("""UPDATE audit_log SET payload = replace(payload, '"qty":10,', '"qty":100,') WHERE seq = 6""")
        return 6, 'modified'
    if how == 'modify_and_rehash':
        ts, kind, p, ph = store.query('SELECT ts, kind, payload, prev_hash FROM audit_log WHERE seq = 6')[0]
        p = p.replace('"qty":10,', '"qty":100,')
        x('UPDATE audit_log SET payload = ?, hash = ? WHERE seq = 6', (p, entry_hash(6, ts, kind, p, ph)))
        return 6, 'seq 6 was modified and its hash recomputed'
    if how == 'delete':
        x('DELETE FROM audit_log WHERE seq = 6'); return 6, 'missing'
    if how == 'delete_two':
        x('DELETE FROM audit_log WHERE seq IN (6, 7)'); return 6, 'seqs 6..7 are missing'
    if how == 'delete_first':
        x('DELETE FROM audit_log WHERE seq = 1'); return 1, 'missing'
    if how == 'delete_and_renumber':
        x('DELETE FROM audit_log WHERE seq = 6'); x('UPDATE audit_log SET seq = -seq WHERE seq > 6'); x('UPDATE audit_log SET seq = -seq - 1 WHERE seq < 0')
        return 6, 'seq 6 was deleted and the later rows renumbered'
    if how == 'insert':
        forged = _forged(store, 6)
        x('UPDATE audit_log SET seq = -seq WHERE seq >= 6'); x('UPDATE audit_log SET seq = 1 - seq WHERE seq < 0')
        x(f'INSERT INTO audit_log ({COLS}) VALUES (?,?,?,?,?,?)', forged)
        return 6, 'row 6 was inserted'
    if how == 'insert_before_first':
        x(f'INSERT INTO audit_log ({COLS}) VALUES (?,?,?,?,?,?)', (0, '2026-01-01T00:00:00.000000+00:00', 'session', '{}', GENESIS,
                                                                  entry_hash(0, '2026-01-01T00:00:00.000000+00:00', 'session', '{}', GENESIS)))
        return 0, 'should start at seq 1'
    raise ValueError(how)

TAMPERS = ['modify', 'modify_and_rehash', 'delete', 'delete_two', 'delete_first', 'delete_and_renumber', 'insert', 'insert_before_first']

@pytest.mark.parametrize('how', TAMPERS)
def test_tampering_is_found(store, how):
    a = filled(store)
    assert a.verify().ok
    at, words = tamper(store, how)
    r = a.verify()
    assert not r.ok and r.first_bad_seq == at and words in r.reason, (how, r)
    assert f'BROKEN at seq {at}' in r.render()
    if at >= 1: _test_eq(r.n_checked, at - 1)

@pytest.mark.parametrize('how', ['modify', 'delete', 'insert'])
def test_a_broken_chain_is_not_exported(store, tmp_path, how):
    a = filled(store)
    tamper(store, how)
    _test_fail(lambda: a.export(tmp_path/'pack'), contains='not exporting a broken chain')
    assert not (tmp_path/'pack'/'audit.jsonl').exists()

def test_verify_from_a_seq_checks_the_link_before_it(store):
    a = filled(store)
    store.execute('DELETE FROM audit_log WHERE seq = 5')
    r = a.verify(from_seq=6)
    _test_eq((r.ok, r.first_bad_seq), (False, 5))
    r = a.verify(from_seq=8)
    _test_eq((r.ok, r.n_checked), (True, 6))

# -- the compliance pack -----------------------------------------------------------------------------------------

def test_pack_round_trip(store, tmp_path):
    a = filled(store)
    d = a.export(tmp_path/'pack')
    _test_eq(d, tmp_path/'pack')
    m = json.loads((d/'manifest.json').read_text())
    last = a.last()
    _test_eq((m['first_seq'], m['last_seq'], m['count'], m['first_prev_hash'], m['last_hash']), (1, 13, 13, GENESIS, last.hash))
    _test_eq(m['audit_jsonl_sha256'], hashlib.sha256((d/'audit.jsonl').read_bytes()).hexdigest())
    assert 'verify_pack' in m['how_to_verify'] and '{prev_hash}' in m['hash_definition']
    lines = [json.loads(l) for l in (d/'audit.jsonl').read_text(encoding='utf-8').splitlines()]
    _test_eq([tuple(l[k] for k in COLS.split(', ')) for l in lines], [(int(r[0]), *r[1:]) for r in rows(store)])
    r = verify_pack(d)
    _test_eq((r.ok, r.n_checked, r.last_seq, r.last_hash), (True, 13, 13, last.hash))
    # the pack stands alone: the store can go
    store.execute('DELETE FROM audit_log')
    assert verify_pack(d).ok
    _test_fail(lambda: a.export(d), contains='already holds an audit pack')

def test_pack_of_a_window(store, tmp_path):
    a = Audit(store)
    for day in range(1, 6): a.append_many(bar(day), ts=f'2026-03-0{day} 15:31')
    d = a.export(tmp_path/'w', from_ts='2026-03-02', to_ts='2026-03-03')
    m = json.loads((d/'manifest.json').read_text())
    _test_eq((m['first_seq'], m['last_seq'], m['count']), (4, 9, 6))
    _test_eq(m['first_prev_hash'], store.query('SELECT hash FROM audit_log WHERE seq = 3')[0][0])
    _test_eq((m['first_ts'][:10], m['last_ts'][:10]), ('2026-03-02', '2026-03-03'))
    assert verify_pack(d).ok
    _test_fail(lambda: a.export(tmp_path/'none', from_ts='2027-01-01'), contains='no audit entries')

def _edit_pack(src:Path, dst:Path, edit) -> Path:
    shutil.copytree(src, dst)
    lines = (dst/'audit.jsonl').read_text(encoding='utf-8').splitlines(keepends=True)
    (dst/'audit.jsonl').write_text(''.join(edit(lines)), encoding='utf-8')
    return dst

def _rehashed(lines:list[str], i:int, change) -> list[str]:
    "Change line i's payload and re-chain every line from there on (a forger who recomputes hashes)."
    es = [json.loads(l) for l in lines]
    es[i]['payload'] = change(es[i]['payload'])
    for j in range(i, len(es)):
        if j > i: es[j]['prev_hash'] = es[j-1]['hash']
        e = es[j]; e['hash'] = entry_hash(e['seq'], e['ts'], e['kind'], e['payload'], e['prev_hash'])
    return [json.dumps(e, ensure_ascii=False, separators=(',', ':')) + '\n' for e in es]

def _next_line(line:str) -> str:
    "A correctly chained entry after `line` (a forger extending the pack)."
    e = json.loads(line)
    seq, ts, p, ph = e['seq'] + 1, e['ts'], '{"state":"stop"}', e['hash']
    return json.dumps({'seq': seq, 'ts': ts, 'kind': 'session', 'payload': p, 'prev_hash': ph, 'hash': entry_hash(seq, ts, 'session', p, ph)},
                      separators=(',', ':')) + '\n'

PACK_TAMPERS = {
    'modify':   (lambda ls: [l.replace('\\"qty\\":10,', '\\"qty\\":100,', 1) if i == 5 else l for i, l in enumerate(ls)], 6, 'hash mismatch'),
    'delete':   (lambda ls: ls[:5] + ls[6:], 6, 'seq 6 is missing'),
    'duplicate':(lambda ls: ls[:5] + [ls[4]] + ls[5:], 5, 'a duplicate'),
    'swap':     (lambda ls: ls[:5] + [ls[6], ls[5]] + ls[7:], 6, 'missing'),
    'cut_end':  (lambda ls: ls[:-2], 12, 'seqs 12..13 were cut from the end'),
    'extend':   (lambda ls: ls + [_next_line(ls[-1])], 14, 'added at the end'),
    'rechain':  (lambda ls: _rehashed(ls, 5, lambda p: p.replace('"qty":10,', '"qty":100,')), 2, 'somewhere in seq 2..13'),
    'garbage':  (lambda ls: ls[:3] + ['not json\n'] + ls[3:], 4, 'line 4 of audit.jsonl'),
    'spaces':   (lambda ls: [json.dumps(json.loads(l)) + '\n' for l in ls], None, 'the file was changed'),
}

@pytest.mark.parametrize('how', list(PACK_TAMPERS))
def test_tampered_pack_fails(sqlite_store, tmp_path, how):
    a = filled(sqlite_store)
    d = a.export(tmp_path/'pack')
    edit, at, words = PACK_TAMPERS[how]
    r = verify_pack(_edit_pack(d, tmp_path/how, edit))
    assert not r.ok and r.first_bad_seq == at and (words is None or words in r.reason), (how, r)

def test_verify_pack_without_files(tmp_path):
    r = verify_pack(tmp_path)
    assert not r.ok and 'manifest.json' in r.reason
    (tmp_path/'manifest.json').write_text('{"first_seq": 1}')
    r = verify_pack(tmp_path)
    assert not r.ok and 'lacks' in r.reason

# -- secrets -----------------------------------------------------------------------------------------------------

KEY_ID, SECRET = 'PKTEST4Q7Z2EXAMPLE01', 'test/Secret+Key0123456789abcdefEXAMPLE'

@pytest.fixture
def keyed(monkeypatch, db_url):
    "A store whose settings hold (stand-in) Alpaca credentials from the environment."
    monkeypatch.setenv('APCA_API_KEY_ID', KEY_ID); monkeypatch.setenv('APCA_API_SECRET_KEY', SECRET)
    s = Store(db_url)
    assert s.settings.alpaca_key_id.get_secret_value() == KEY_ID
    yield s
    s.close()

@pytest.mark.parametrize('payload', [
    {'api_key': 'x'}, {'APIKEY': 'x'}, {'Api-Key': 'x'}, {'alpaca_key_id': 'x'}, {'client_secret': 'x'}, {'Password': 'x'},
    {'access_token': 'x'}, {'headers': {'Authorization': 'Bearer x'}}, {'calls': [{'ok': 1}, {'request': {'TOKEN': 'x'}}]},
])
def test_credential_keys_are_refused(keyed, payload):
    a = Audit(keyed)
    _test_fail(lambda: a.append('order', payload), contains='looks like a credential')
    _test_eq(a.last(), None)

@pytest.mark.parametrize('payload', [
    {'note': KEY_ID}, {'note': SECRET}, {'url': f'https://paper-api.alpaca.markets/v2?k={KEY_ID}'},
    {'deep': [{'x': ['ok', SECRET]}]}, {KEY_ID: 1}, {'t': (1, SECRET)},
])
def test_configured_credentials_are_refused_and_never_echoed(keyed, payload):
    a = Audit(keyed)
    with pytest.raises(AuditError) as e: a.append('session', payload)
    assert 'Alpaca credentials' in str(e.value) and KEY_ID not in str(e.value) and SECRET not in str(e.value)
    with pytest.raises(AuditError): a.append_many([('session', {'ok': 1}), ('session', payload)])   # all or nothing
    _test_eq(a.last(), None)
    a.append('session', {'note': 'no credentials here', 'key': 'AAPL'})
    _test_eq(a.last().seq, 1)

# -- the commands ------------------------------------------------------------------------------------------------

def test_cmd_audit_verify_exit_codes(store, monkeypatch, capsys):
    monkeypatch.setenv('TRADER_DB_URL', store.url)
    _test_eq(cmd_audit_verify(Namespace()), 0)
    assert 'audit chain verified: 0 entries' in capsys.readouterr().out
    a = filled(store)
    _test_eq(cmd_audit_verify(Namespace(from_seq=None)), 0)
    assert capsys.readouterr().out.strip().startswith(f'audit chain verified: 13 entries, last hash {a.last().hash} (seq 13); ')
    tamper(store, 'modify')
    _test_eq(cmd_audit_verify(Namespace()), EXIT_CHAIN_BROKEN)
    _test_eq(EXIT_CHAIN_BROKEN, 4)
    out = capsys.readouterr().out
    assert 'BROKEN at seq 6' in out and 'modified' in out, out
    _test_eq(cmd_audit_verify(Namespace(from_seq=7)), 0)

def test_cmd_audit_export(store, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv('TRADER_DB_URL', store.url)
    a = filled(store)
    _test_eq(cmd_audit_export(Namespace(from_ts=None, to_ts=None, dir=str(tmp_path/'pack'))), 0)
    out = capsys.readouterr().out
    assert f"wrote {tmp_path/'pack'/'audit.jsonl'}" in out and f"wrote {tmp_path/'pack'/'manifest.json'}" in out and a.last().hash in out
    assert verify_pack(tmp_path/'pack').ok
    _test_eq(cmd_audit_export(Namespace(from_ts='2000-01-01', to_ts=None, dir=None)), 0)    # default directory under TRADER_HOME
    line = next(l for l in capsys.readouterr().out.splitlines() if l.endswith('manifest.json'))
    assert verify_pack(Path(line.removeprefix('wrote ')).parent).ok

# -- the audit trail builds on the store, never the other way round ------------------------------------------

def test_the_store_does_not_import_the_audit_trail_and_audit_declares_its_own_table(tmp_path):
    "No store -> audit import (the old cycle); a store opened before trader.core.audit was imported still gets `audit_log` from `Audit`."
    code = f"""
import sys
from trader.core.store import Store
assert 'trader.core.audit' not in sys.modules, 'the store imported the audit trail'
s = Store('sqlite:///{tmp_path}/a.db')
assert 'audit_log' not in s.tables()
from trader.core.audit import Audit
a = Audit(s)
assert 'audit_log' in s.tables()
a.append('session', {{'x': 1}})
assert a.verify().ok and s.query("SELECT owner, version FROM schema_migrations WHERE owner = 'core.audit'") == [('core.audit', 1)]
print('ok')
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr

def test_audit_payload_stays_the_stored_text(store):
    "`payload` is not a JSON column: it comes back as the exact canonical text the hash covers, on both engines."
    e = Audit(store).append('decision', {'b': 1.5, 'a': [1, None]})
    got = store.query('SELECT payload FROM audit_log WHERE seq = ?', (e.seq,))[0][0]
    _test_eq(got, '{"a":[1,null],"b":1.5}'); _test_eq(got, e.payload)
    _test_eq(Audit(store).verify().ok, True)

# -- signed checkpoints: the five attacks ------------------------------------------------------------------------

def signed(store) -> Audit:
    "filled(store, 4) with signed checkpoints at seq 1 (the session start, signed as it commits), 4 (after the first bar) and 13 (the head)."
    a = Audit(store)
    a.append('session', {'run_id': 'pa-test', 'state': 'start'})
    for i in range(4):
        with store.transaction(): a.append_many(bar(i))
        if i == 0: a.checkpoint()
    a.checkpoint()
    _test_eq(sorted(cp.seq for cp in a.checkpoints()), [1, 4, 13])
    return a

def rechain_from(store, at:int, change=lambda p: p.replace('"qty":10,', '"qty":100,')):
    "A forger with database access: change the payload at seq `at` and recompute every later hash by the published rule."
    rs = rows(store)
    prev = rs[at - 2][5] if at > 1 else GENESIS
    for s, ts, kind, p, _, _ in rs[at - 1:]:
        s = int(s); p = change(p) if s == at else p
        h = entry_hash(s, ts, kind, p, prev)
        store.execute('UPDATE audit_log SET payload = ?, prev_hash = ?, hash = ? WHERE seq = ?', (p, prev, h, s))
        prev = h

def verify_cli(store, monkeypatch, capsys) -> tuple[int, str]:
    "`trader audit verify` on this store: (exit code, its one line)."
    monkeypatch.setenv('TRADER_DB_URL', store.url)
    from trader.ops.cli import main
    code = main(['audit', 'verify'])
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1, out
    return code, out

def check_attack(store, monkeypatch, capsys, attack:Attack, at:int, words:str):
    r = Audit(store).verify()
    assert not r.ok and (r.attack, r.first_bad_seq) == (attack, at) and words in r.reason, r
    code, out = verify_cli(store, monkeypatch, capsys)
    _test_eq(code, EXIT_CHAIN_BROKEN)
    assert out.startswith(f'audit chain BROKEN at seq {at} [{attack.value}]: ') and words in out, out

def test_attack_modification(store, monkeypatch, capsys):
    signed(store)
    store.execute("""UPDATE audit_log SET payload = replace(payload, '"qty":10,', '"qty":100,') WHERE seq = 9""")
    check_attack(store, monkeypatch, capsys, Attack.MODIFIED, 9, 'the row was modified')

def test_attack_modification_with_the_rows_own_hash_recomputed(store, monkeypatch, capsys):
    signed(store)
    tamper(store, 'modify_and_rehash')
    check_attack(store, monkeypatch, capsys, Attack.MODIFIED, 6, 'its hash recomputed')

def test_attack_deletion(store, monkeypatch, capsys):
    signed(store)
    store.execute('DELETE FROM audit_log WHERE seq IN (7, 8)')
    check_attack(store, monkeypatch, capsys, Attack.DELETED, 7, 'seqs 7..8 are missing')

def test_attack_insertion(store, monkeypatch, capsys):
    signed(store)
    tamper(store, 'insert')
    check_attack(store, monkeypatch, capsys, Attack.INSERTED, 6, 'row 6 was inserted')

def test_attack_truncation_of_the_newest_entries(store, monkeypatch, capsys):
    a = signed(store)
    store.execute('DELETE FROM audit_log WHERE seq >= 11')
    assert Audit(store).verify(public_key=VerifyKey(Ed25519PrivateKey.generate().public_key())).attack == Attack.SIGNATURE
    r_chain_only = Audit(store)._rows()                         # the chain alone is consistent: only the checkpoint at 13 catches it
    from trader.core.audit import _check_chain
    assert _check_chain(r_chain_only, 1, GENESIS).ok
    check_attack(store, monkeypatch, capsys, Attack.TRUNCATED, 11, 'seqs 11..13 were cut from the end')
    store.execute('DELETE FROM audit_log')                       # everything gone
    check_attack(store, monkeypatch, capsys, Attack.TRUNCATED, 1, 'the log ends at seq 0 (empty)')

def test_the_unsigned_tail_is_the_window_a_truncation_can_hide_in(store):
    "The documented limit: entries after the newest checkpoint can be cut without a trace; the head then is the signed one again."
    a = signed(store)
    a.append_many(bar(9))                      # seq 14..16, not signed (fewer than checkpoint_every, not a signed-at-once kind)
    r = a.verify()
    _test_eq((r.ok, r.signed_head, r.checkpoint_seq, r.last_seq), (True, False, 13, 16))
    assert '3 newer entries not signed yet' in r.render()
    store.execute('DELETE FROM audit_log WHERE seq > 13')
    r = a.verify()
    _test_eq((r.ok, r.signed_head), (True, True))

def test_attack_full_rewrite_by_the_published_rule(store, monkeypatch, capsys):
    from trader.core.audit import _check_chain
    signed(store)
    rechain_from(store, 6)
    assert _check_chain(Audit(store)._rows(), 1, GENESIS).ok      # consistent by the published rule
    check_attack(store, monkeypatch, capsys, Attack.REWRITTEN, 5, 'somewhere in seq 5..13 (the checkpoint at seq 4 still matches)')

def test_attack_rewrite_then_extend(store, monkeypatch, capsys):
    "Cut the tail, then write a different tail with correct hashes past the signed seq: the hash at the signed seq differs."
    a = signed(store)
    store.execute('DELETE FROM audit_log WHERE seq >= 11')
    a.append_many([('order', {'client_order_id': 'forged', 'qty': 1})]*5)
    check_attack(store, monkeypatch, capsys, Attack.REWRITTEN, 5, 'somewhere in seq 5..13')

def test_attack_rewrite_from_the_first_entry(store, monkeypatch, capsys):
    signed(store)
    rechain_from(store, 1, lambda p: p.replace('start', 'stop'))
    check_attack(store, monkeypatch, capsys, Attack.REWRITTEN, 1, 'somewhere in seq 1..1')

def test_forged_or_edited_checkpoints_are_refused(store, monkeypatch, capsys):
    a = signed(store)
    path = a.checkpoint_path
    good = path.read_text()
    rechain_from(store, 6)
    # the forger signs the rewritten head with a key of their own
    mine = SigningKey(Ed25519PrivateKey.generate(), 'forger')
    with open(path, 'a') as f: f.write(Checkpoint.sign(mine, a.store_id, 13, a.last().hash).line())
    check_attack_sig = Audit(store).verify()
    assert (check_attack_sig.ok, check_attack_sig.attack) == (False, Attack.SIGNATURE) and mine.id in check_attack_sig.reason
    # ... or edits the signed hash in place
    lines = good.splitlines(keepends=True)
    e = json.loads(lines[-1]); e['hash'] = a.last().hash
    path.write_text(''.join(lines[:-1]) + json.dumps(e) + '\n')
    r = Audit(store).verify()
    assert (r.ok, r.attack) == (False, Attack.SIGNATURE) and 'invalid signature' in r.reason, r
    path.write_text(good + 'not a checkpoint\n')
    r = Audit(store).verify()
    assert (r.ok, r.attack) == (False, Attack.SIGNATURE) and 'is not a checkpoint' in r.reason, r
    code, out = verify_cli(store, monkeypatch, capsys)
    _test_eq(code, EXIT_CHAIN_BROKEN); assert '[signature]' in out

def test_verify_with_a_pinned_public_key(store):
    a = signed(store)
    sk = load_signing_key(store.settings, create=False)
    r = a.verify(public_key=sk.public)
    _test_eq((r.ok, r.signed_head, r.n_checkpoints, r.key_id), (True, True, 3, sk.id))
    other = VerifyKey(Ed25519PrivateKey.generate().public_key())
    r = a.verify(public_key=other)
    assert (r.ok, r.attack) == (False, Attack.SIGNATURE) and other.id in r.reason

# -- when checkpoints are written ----------------------------------------------------------------------------------

def test_checkpoints_follow_commits_only(store):
    s = load_settings(audit={'checkpoint_every': 5, 'checkpoint_seconds': 0, 'checkpoint_kinds': []})
    a = Audit(store, s)
    with store.transaction():
        a.append_many(bar(0) + bar(1))                      # 6 entries: due, but not signed before the commit
        _test_eq(a.checkpoints(), [])
        _test_fail(lambda: a.checkpoint(), contains='inside an open transaction')
    _test_eq([(c.seq, c.hash) for c in a.checkpoints()], [(6, a.last().hash)])
    with pytest.raises(RuntimeError):
        with store.transaction():
            a.append_many(bar(2) + bar(3))                  # due again, then rolled back: nothing may vouch for these
            raise RuntimeError('the bar failed')
    _test_eq(len(a.checkpoints()), 1)
    a.append_many(bar(4) + bar(5))                          # the same seqs again, different content: no false alarm
    _test_eq([c.seq for c in a.checkpoints()], [6, 12])
    r = a.verify(); _test_eq((r.ok, r.signed_head, r.n_checkpoints), (True, True, 2))
    a.append('decision', {'x': 1}); _test_eq(len(a.checkpoints()), 2)   # 1 < 5: not due
    # kinds signed at once, whatever the count
    b = Audit(store, load_settings(audit={'checkpoint_every': 0, 'checkpoint_seconds': 0, 'checkpoint_kinds': ['session']}))
    b.append('session', {'event': 'finished'})
    _test_eq(b.checkpoints()[-1].seq, 14)
    # and by time: not before `checkpoint_seconds` since the last one (an hour: however slow the machine), due after it (the
    # clock moved on by an hour rather than waited for)
    c = Audit(store, load_settings(audit={'checkpoint_every': 0, 'checkpoint_seconds': 3600, 'checkpoint_kinds': []}))
    c.append('decision', {'x': 2}); _test_eq(c.checkpoints()[-1].seq, 14)
    real = time.monotonic
    with mock.patch('time.monotonic', lambda: real() + 3600): c.append('decision', {'x': 3})
    _test_eq(c.checkpoints()[-1].seq, 16)

def test_a_failing_checkpoint_never_fails_the_bar(sqlite_store, tmp_path, caplog):
    s = load_settings(audit={'checkpoint_file': str(tmp_path), 'checkpoint_kinds': ['session']})   # a folder: the write fails
    a = Audit(sqlite_store, s)
    with caplog.at_level('WARNING', logger='trader'):
        e = a.append('session', {'state': 'start'})
    _test_eq((e.seq, a.last().seq), (1, 1))
    assert 'audit checkpoint not written' in caplog.text, caplog.text

def test_checkpoints_of_other_stores_are_ignored(tmp_path):
    s1, s2 = Store(f'sqlite:///{tmp_path}/one.db'), Store(f'sqlite:///{tmp_path}/two.db')
    try:
        a1, a2 = filled(s1, 1), filled(s2, 2)
        a1.checkpoint(); a2.checkpoint()
        _test_eq(checkpoint_file(s1.settings), checkpoint_file(s2.settings))       # one file, two chains
        _test_eq(len(read_checkpoints(checkpoint_file(s1.settings))[0]), 4)
        for a, n in ((a1, 4), (a2, 7)):
            r = a.verify(); _test_eq((r.ok, r.last_seq, r.checkpoint_seq, r.n_checkpoints), (True, n, n, 2))
    finally: s1.close(); s2.close()

def test_head(store):
    a = filled(store, 1)                                   # the session start is signed (seq 1), the bar is not
    h = a.head()
    _test_eq((h.seq, h.signed, h.checkpoint_seq), (4, False, 1)); assert 'NOT signed' in h.render()
    cp = a.checkpoint()
    h = a.head()
    _test_eq((h.seq, h.hash, h.signed, h.checkpoint_seq, h.key_id), (4, a.last().hash, True, 4, cp.key_id))
    _test_eq(a.checkpoint(), cp)                           # an unchanged head is not signed twice

# -- keys ----------------------------------------------------------------------------------------------------------

def test_the_key_file_is_made_0600_and_refused_when_others_can_read_it(tmp_path):
    s = load_settings({'TRADER_HOME': str(tmp_path)})
    _test_eq(load_signing_key(s, create=False), None)
    k = load_signing_key(s)
    p = key_file(s)
    _test_eq((p, oct(p.stat().st_mode & 0o777)), (tmp_path/'secrets'/'audit_ed25519.pem', '0o600'))
    _test_eq((keys_dir(s)/f'{k.id}.pem').read_text(), k.public.pem())
    _test_eq(public_keys(s), {k.id: k.public})
    p.chmod(0o640)
    _test_fail(lambda: load_signing_key(s), contains='must be 0600')

def test_the_key_from_the_environment(tmp_path):
    seed = bytes(range(32))
    k = load_signing_key(load_settings({'TRADER_HOME': str(tmp_path), 'TRADER_AUDIT_KEY': seed.hex()}))
    _test_eq((k.id, k.source), (VerifyKey(Ed25519PrivateKey.from_private_bytes(seed).public_key()).id, 'TRADER_AUDIT_KEY'))
    assert not key_file(load_settings({'TRADER_HOME': str(tmp_path)})).exists()        # no key file when the environment has the key
    with pytest.raises(AuditError) as e: load_signing_key(load_settings({'TRADER_HOME': str(tmp_path), 'TRADER_AUDIT_KEY': 'zz' + seed.hex()[2:]}))
    assert seed.hex()[2:] not in str(e.value) and 'not shown' in str(e.value)

# -- the pack with the public part only ----------------------------------------------------------------------------

def test_pack_verifies_with_the_public_key_only_in_a_fresh_home(store, tmp_path, monkeypatch, capsys):
    import trader.core.audit as A
    from trader.ops.cli import main
    a = signed(store)
    d = a.export(tmp_path/'pack')
    kid = load_signing_key(store.settings, create=False).id
    pub = tmp_path/'published.pem'; pub.write_text((keys_dir(store.settings)/f'{kid}.pem').read_text())
    m = json.loads((d/'manifest.json').read_text())
    _test_eq((m['format'], m['signing_key_id'], m['head']['seq'], m['head']['signed'], m['checkpoints']), ('trader-audit-pack/2', kid, 13, True, 3))
    # elsewhere: a fresh TRADER_HOME, no TRADER_AUDIT_KEY, no store, and loading a private key would be an error
    fresh = tmp_path/'auditor'; fresh.mkdir()
    monkeypatch.setenv('TRADER_HOME', str(fresh)); monkeypatch.delenv('TRADER_AUDIT_KEY', raising=False)
    monkeypatch.setenv('TRADER_DB_URL', 'postgresql://nobody@127.0.0.1:1/none')
    monkeypatch.setattr(A, 'load_signing_key', lambda *a, **k: (_ for _ in ()).throw(AssertionError('the private key was asked for')))
    r = verify_pack(d, public_key=pub)
    _test_eq((r.ok, r.n_checked, r.signed_head, r.n_checkpoints, r.key_id), (True, 13, True, 3, kid))
    _test_eq(main(['audit', 'verify', '--pack', str(d), '--public-key', str(pub)]), 0)
    assert f'audit pack {d} verified: 13 entries' in capsys.readouterr().out
    _test_eq(list(fresh.iterdir()), [])                                      # nothing written, no key made
    # tampered: a payload, the checkpoints, the manifest
    t1 = _edit_pack(d, tmp_path/'t1', lambda ls: [l.replace('\\"qty\\":10,', '\\"qty\\":100,', 1) if i == 5 else l for i, l in enumerate(ls)])
    _test_eq(main(['audit', 'verify', '--pack', str(t1), '--public-key', str(pub)]), EXIT_CHAIN_BROKEN)
    assert 'BROKEN at seq 6 [modified]' in capsys.readouterr().out
    t2 = tmp_path/'t2'; shutil.copytree(d, t2)
    (t2/'checkpoints.jsonl').write_text(''.join((t2/'checkpoints.jsonl').read_text().splitlines(keepends=True)[:-1]))
    r = verify_pack(t2, public_key=pub); assert (r.ok, r.attack) == (False, Attack.SIGNATURE) and 'checkpoints.jsonl' in r.reason
    t3 = tmp_path/'t3'; shutil.copytree(d, t3)
    (t3/'manifest.json').write_text((t3/'manifest.json').read_text().replace('"count": 13', '"count": 12'))
    r = verify_pack(t3, public_key=pub); assert (r.ok, r.attack) == (False, Attack.SIGNATURE) and 'manifest was edited' in r.reason
    # a forger rewrites the pack, its checkpoints and its manifest, and signs it all with a key of their own
    t4 = _edit_pack(d, tmp_path/'t4', lambda ls: _rehashed(ls, 5, lambda p: p.replace('"qty":10,', '"qty":100,')))
    mine = SigningKey(Ed25519PrivateKey.generate(), 'forger')
    es = [json.loads(l) for l in (t4/'audit.jsonl').read_text().splitlines()]
    cps = [Checkpoint.sign(mine, m['store_id'], es[-1]['seq'], es[-1]['hash'])]
    (t4/'checkpoints.jsonl').write_text(''.join(c.line() for c in cps))
    shutil.rmtree(t4/'keys'); (t4/'keys').mkdir(); (t4/'keys'/f'{mine.id}.pem').write_text(mine.public.pem())
    m4 = {**m, 'last_hash': es[-1]['hash'], 'audit_jsonl_sha256': hashlib.sha256((t4/'audit.jsonl').read_bytes()).hexdigest(),
          'checkpoints': 1, 'checkpoints_jsonl_sha256': hashlib.sha256((t4/'checkpoints.jsonl').read_bytes()).hexdigest(),
          'signing_key_id': mine.id, 'keys': {mine.id: hashlib.sha256((t4/'keys'/f'{mine.id}.pem').read_bytes()).hexdigest()}}
    body = (json.dumps(m4, indent=1) + '\n').encode(); (t4/'manifest.json').write_bytes(body)
    (t4/'manifest.sig').write_text(json.dumps({'alg': 'ed25519', 'key_id': mine.id, 'signature': mine.sign(body)}))
    r = verify_pack(t4, public_key=pub)                                      # pinned to the published key: refused
    assert (r.ok, r.attack) == (False, Attack.SIGNATURE) and f'signed by key {mine.id}, not by the given public key {kid}' in r.reason
    r = verify_pack(t4)                                                      # unpinned, it is consistent, but says whose key signed it
    _test_eq((r.ok, r.key_id), (True, mine.id))

# -- the signing key never leaks -----------------------------------------------------------------------------------

def _forms(seed:bytes) -> list[str]:
    "Every spelling of a private key worth looking for."
    import base64
    pem = Ed25519PrivateKey.from_private_bytes(seed).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                                   serialization.NoEncryption()).decode()
    return [seed.hex(), seed.hex().upper(), base64.b64encode(seed).decode().rstrip('='), base64.urlsafe_b64encode(seed).decode().rstrip('='),
            pem.splitlines()[1], repr(seed)[2:-1]]

def _scan(text:str, forms:list[str], where:str):
    for f in forms: assert f not in text, f"the signing key appears in {where}"

@pytest.mark.parametrize('source', ['env', 'file'])
def test_the_signing_key_never_leaks(sqlite_store, tmp_path, monkeypatch, caplog, capsys, source):
    from trader.ops.cli import main
    from trader.ops.gate import run_gate
    from trader.core.runs import Runs
    home = Path(sqlite_store.settings.home)
    if source == 'env':
        seed = bytes(range(100, 132)); monkeypatch.setenv('TRADER_AUDIT_KEY', seed.hex())
    else:
        load_signing_key(sqlite_store.settings)
        k = serialization.load_pem_private_key(key_file(sqlite_store.settings).read_bytes(), None)
        seed = k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    forms = _forms(seed)
    monkeypatch.setenv('TRADER_DB_URL', sqlite_store.url)
    with caplog.at_level('DEBUG'):
        store = Store(sqlite_store.url)
        a = filled(store, 2)
        a.checkpoint()
        for argv in (['audit', 'checkpoint'], ['audit', 'verify', '-v'], ['audit', 'key'], ['audit', 'export', '--dir', str(tmp_path/'pack')],
                     ['audit', 'verify', '--pack', str(tmp_path/'pack')]):
            _test_eq(main(argv), 0)
        # a gate run: its audit entry, its checkpoint, its JSON and its rendered report
        runs = Runs(store)
        idx = pd.bdate_range('2024-01-01', periods=30, tz='UTC')
        rid = runs.create('backtest', ['AAPL'], 'm-x', idx[0], idx[-1])
        runs.save_series(rid, pd.DataFrame({'equity': 100_000*np.cumprod(np.full(30, 1.001))}, index=idx)); runs.finish(rid, {})
        store.ingest(__import__('trader.core.quality', fromlist=['x']).DataQualityGate(store.settings.quality).check(
            __import__('trader.core.data', fromlist=['x']).load_sample(['AAPL'], start='2012-01-01'), source='sample'))
        g, paths = run_gate(store, rid, output_dir=tmp_path/'gates', render=True)
        # the failing-checkpoint warning path too
        Audit(store, load_settings(audit={'checkpoint_file': str(tmp_path), 'checkpoint_kinds': ['session']})).append('session', {'x': 1})
    out, err = capsys.readouterr()
    _test_eq((g.audit_head['seq'], g.audit_head['signed']), (Audit(store).last().seq - 1, True))
    html = paths['html'].read_text()
    assert 'audit head: seq' in html and g.audit_head['hash'] in html and 'matches the signed checkpoint' in html
    _scan(out + err, forms, 'the command output'); _scan(caplog.text, forms, 'the logs')
    assert 'audit checkpoint not written' in caplog.text
    for p in [*home.rglob('*'), *(tmp_path/'pack').rglob('*'), *(tmp_path/'gates').rglob('*')]:
        if p.is_file() and p != key_file(store.settings):
            _scan(p.read_bytes().decode('latin-1'), forms, str(p)); assert seed not in p.read_bytes(), p
    _scan('\n'.join(str(r) for r in rows(store)), forms, 'the audit trail')
    k = load_signing_key(store.settings)
    for o in (a, k, k.public, store.settings, store.settings.safe_dict(), a.verify(), a.head(), a.checkpoints()[0], store):
        _scan(repr(o) + str(o), forms, f'the repr of a {type(o).__name__}')
    _test_fail(lambda: __import__('pickle').dumps(k), contains='cannot be pickled')
    store.close()
