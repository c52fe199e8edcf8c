"""`trader.core.audit`: the hash chain on both engines, tamper detection (modified, deleted, inserted rows), concurrent
appends from two processes, entries that commit and roll back with the caller's transaction, the compliance pack
and `verify_pack`, refusal of credentials, and the exit codes of `cmd_audit_verify`.

Tests taking `store` or `db_url` run once on SQLite and once on PostgreSQL (see conftest.py).
"""
import hashlib, json, shutil, subprocess, sys, threading, time
from argparse import Namespace
from pathlib import Path
import numpy as np, pandas as pd
import pytest
from fastcore.test import test_eq as _test_eq, test_fail as _test_fail
from trader.core.audit import (EXIT_CHAIN_BROKEN, GENESIS, Audit, AuditError, canonical_json, cmd_audit_export, cmd_audit_verify,
                          entry_hash, verify_pack)
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
    assert bool(res) and res.render().startswith('audit chain verified: 13 entries, last hash ' + rs[-1][5])
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
        return 7, 'does not match the hash of seq 6'
    if how == 'delete':
        x('DELETE FROM audit_log WHERE seq = 6'); return 6, 'missing'
    if how == 'delete_two':
        x('DELETE FROM audit_log WHERE seq IN (6, 7)'); return 6, 'seqs 6..7 are missing'
    if how == 'delete_first':
        x('DELETE FROM audit_log WHERE seq = 1'); return 1, 'missing'
    if how == 'delete_and_renumber':
        x('DELETE FROM audit_log WHERE seq = 6'); x('UPDATE audit_log SET seq = -seq WHERE seq > 6'); x('UPDATE audit_log SET seq = -seq - 1 WHERE seq < 0')
        return 6, 'does not match the hash of seq 5'
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
    'cut_end':  (lambda ls: ls[:-2], 12, 'removed from the end'),
    'extend':   (lambda ls: ls + [_next_line(ls[-1])], 14, 'added at the end'),
    'rechain':  (lambda ls: _rehashed(ls, 5, lambda p: p.replace('"qty":10,', '"qty":100,')), 13, 'chain was rebuilt'),
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
    _test_eq(capsys.readouterr().out.strip(), f'audit chain verified: 13 entries, last hash {a.last().hash} (seq 13)')
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
