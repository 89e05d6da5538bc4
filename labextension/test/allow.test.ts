import { describe, expect, it } from 'vitest';

import { blockedCount, canAllow, filterRows, isBlocked, statusText } from '../src/model';
import { IAuditRow } from '../src/types';

function row(over: Partial<IAuditRow> = {}): IAuditRow {
  return {
    id: 1, ts: 0, kind: 'http', decision: 'deny', method: 'GET', host: 'data.example.org', port: 443,
    path: '/x', url: 'https://data.example.org/x', status: 403, rule: 'default', reason: null, ...over
  };
}

describe('observe mode and "allow this host…"', () => {
  it('would-deny rows count and filter as blocked (observe mode)', () => {
    const rows = [row({ decision: 'would-deny' }), row({ decision: 'allow' }), row({ decision: 'deny' })];
    expect(isBlocked(rows[0])).toBe(true);
    expect(blockedCount(rows)).toBe(2);
    expect(filterRows(rows, { blockedOnly: true, host: '' }).map(r => r.decision)).toEqual(['would-deny', 'deny']);
  });

  it('offers "allow this host…" for refusals of requests only', () => {
    expect(canAllow(row())).toBe(true);
    expect(canAllow(row({ decision: 'would-deny' }))).toBe(true);
    expect(canAllow(row({ decision: 'allow' }))).toBe(false);
    expect(canAllow(row({ decision: 'error' }))).toBe(false);
    expect(canAllow(row({ kind: 'note' }))).toBe(false);
    expect(canAllow(row({ kind: 'policy', decision: 'change' }))).toBe(false);
    expect(canAllow(row({ host: null }))).toBe(false);
  });

  it('the status text says observe mode', () => {
    expect(statusText({ state: 'ready', accel: 'tcg' }, 2, true)).toBe(
      'Sandbox ready \u00b7 emulated \u00b7 observe mode \u00b7 2 blocked'
    );
    expect(statusText({ state: 'ready', accel: 'tcg' }, 0, false)).toBe('Sandbox ready \u00b7 emulated');
  });
});
