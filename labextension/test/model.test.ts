import { describe, expect, it } from 'vitest';

import {
  blockedCount,
  filterRows,
  formatDuration,
  formatHost,
  formatRow,
  mergeRows,
  NetworkLog,
  newRows,
  notificationText,
  shortDigest,
  statusText,
  uptimeSeconds
} from '../src/model';
import { IAuditRow } from '../src/types';

let nextId = 1;
function row(over: Partial<IAuditRow> = {}): IAuditRow {
  return {
    id: nextId++,
    ts: 1700000000.25,
    kind: 'http',
    decision: 'allow',
    method: 'GET',
    host: 'pypi.org',
    port: 443,
    path: '/simple/numpy/',
    url: 'https://pypi.org/simple/numpy/',
    status: 200,
    rule: 'pypi-index',
    reason: 'pip reads the PyPI index',
    ...over
  };
}

describe('filters', () => {
  const rows = [
    row(),
    row({ decision: 'deny', host: 'evil.example', status: 403, rule: 'default' }),
    row({ kind: 'dns', decision: 'deny', host: 'Tracker.Example.com', method: 'A', path: '', status: 3 }),
    row({ kind: 'note', decision: 'deny', host: null })
  ];

  it('keeps everything without filters', () => {
    expect(filterRows(rows, { blockedOnly: false, host: '' })).toHaveLength(4);
  });

  it('blocked only keeps deny rows, never notes', () => {
    const out = filterRows(rows, { blockedOnly: true, host: '' });
    expect(out.map(r => r.host)).toEqual(['evil.example', 'Tracker.Example.com']);
  });

  it('host search is a case-insensitive substring match, trimmed', () => {
    expect(filterRows(rows, { blockedOnly: false, host: '  example ' })).toHaveLength(2);
    expect(filterRows(rows, { blockedOnly: false, host: 'TRACKER' })).toHaveLength(1);
    expect(filterRows(rows, { blockedOnly: true, host: 'pypi' })).toHaveLength(0);
  });

  it('counts blocked requests', () => {
    expect(blockedCount(rows)).toBe(2);
    expect(blockedCount([])).toBe(0);
  });
});

describe('merging live updates', () => {
  it('dedupes by id, sorts, and caps at max keeping the newest', () => {
    const a = row({ id: 10 });
    const b = row({ id: 11 });
    const c = row({ id: 12 });
    expect(mergeRows([a, b], [b, c]).map(r => r.id)).toEqual([10, 11, 12]);
    expect(mergeRows([c], [a, b], 2).map(r => r.id)).toEqual([11, 12]);
    expect(newRows([a, b], [b, c])).toEqual([c]);
  });

  it('NetworkLog applies results and reports only new rows', () => {
    const log = new NetworkLog(3);
    const first = [row({ id: 1 }), row({ id: 2, decision: 'deny' })];
    expect(log.apply({ rows: first, last_id: 2, total: 2, blocked: 1 })).toHaveLength(2);
    expect(log.blockedTotal).toBe(1);
    const fresh = log.apply({ rows: [row({ id: 2, decision: 'deny' }), row({ id: 3 }), row({ id: 4 })], last_id: 4, total: 4, blocked: 1 });
    expect(fresh.map(r => r.id)).toEqual([3, 4]);
    expect(log.rows.map(r => r.id)).toEqual([2, 3, 4]);
    expect(log.lastId).toBe(4);
    expect(log.total).toBe(4);
    // the server's total wins over what is kept in memory
    log.apply({ rows: [], last_id: 4, total: 4, blocked: 7 });
    expect(log.blockedTotal).toBe(7);
    log.clear();
    expect(log.rows).toEqual([]);
    expect(log.lastId).toBe(0);
  });
});

describe('formatting', () => {
  it('formats a row for the table', () => {
    const t = formatRow(row({ ts: new Date(2024, 0, 2, 3, 4, 5, 67).getTime() / 1000 }));
    expect(t).toMatchObject({
      time: '03:04:05.067',
      decision: 'allow',
      method: 'GET',
      host: 'pypi.org',
      path: '/simple/numpy/',
      status: '200',
      rule: 'pypi-index'
    });
    expect(t.title).toContain('https://pypi.org/simple/numpy/');
  });

  it('shows non-default ports, IPv6 brackets, DNS names and missing fields', () => {
    expect(formatHost(row({ host: '127.0.0.1', port: 8123 }))).toBe('127.0.0.1:8123');
    expect(formatHost(row({ host: '::1', port: 80 }))).toBe('[::1]');
    expect(formatHost(row({ kind: 'dns', host: null, port: null, url: 'example.com' }))).toBe('example.com');
    const t = formatRow(row({ kind: 'connect', method: null, status: null, rule: null, decision: null }));
    expect(t).toMatchObject({ method: 'CONNECT', status: '', rule: '', decision: '' });
  });

  it('status text shows the blocked count only when non-zero', () => {
    expect(statusText({ state: 'ready', accel: 'tcg' }, 0)).toBe('Sandbox ready \u00b7 emulated');
    expect(statusText({ state: 'ready', accel: 'kvm' }, 1)).toBe('Sandbox ready \u00b7 KVM \u00b7 1 blocked');
    expect(statusText({ state: 'booting', accel: null }, 0)).toBe('Sandbox booting');
  });

  it('durations, digests and uptime', () => {
    expect(formatDuration(5.9)).toBe('5 s');
    expect(formatDuration(65)).toBe('1 min 05 s');
    expect(formatDuration(3 * 3600 + 7 * 60)).toBe('3 h 07 min');
    expect(formatDuration(null)).toBe('\u2014');
    expect(shortDigest('sha256:0123456789abcdef0123')).toBe('0123456789ab');
    expect(shortDigest(null)).toBe('\u2014');
    expect(uptimeSeconds({ state: 'ready', started_at: 100 }, 160_000)).toBe(60);
    expect(uptimeSeconds({ state: 'dead', started_at: 100 }, 160_000)).toBeNull();
  });

  it('notification names the host and the rule', () => {
    const text = notificationText(
      row({ decision: 'deny', host: 'evil.example', path: '/x', rule: 'default', reason: 'no rule allows this' })
    );
    expect(text).toBe('Sandbox blocked GET evil.example/x (rule "default": no rule allows this)');
    const dns = row({ kind: 'dns', method: 'A', decision: 'deny', host: 'pypi.org', port: null, rule: 'default', reason: '' });
    expect(notificationText(dns)).toBe('Sandbox blocked DNS lookup of pypi.org (rule "default")');
    expect(formatRow(dns).method).toBe('DNS A');
    expect(formatRow({ ...dns, status: 3 }).status).toBe('NXDOMAIN');
    expect(formatRow({ ...dns, status: 9 }).status).toBe('rcode 9');
    const tcp = row({ kind: 'tcp', method: null, decision: 'deny', host: '10.0.0.1', port: 22, rule: null, reason: null });
    expect(notificationText(tcp)).toBe('Sandbox blocked TCP to 10.0.0.1:22 (no rule)');
  });
});
