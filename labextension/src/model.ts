/** The Sandbox panel's data handling, free of JupyterLab so it can be unit tested: merging audit
 * rows, filters, counts and the text shown for rows, facts and notifications. */

import { IAuditRow, IKernelFacts, INetworkResult } from './types';

export const BLOCKED = 'deny';
/** Observe mode: the policy refused it, it went out anyway. Counted and filtered as blocked. */
export const WOULD_DENY = 'would-deny';
export const MAX_ROWS = 1000;

export interface IFilter {
  blockedOnly: boolean;
  host: string;
}

export function isBlocked(row: IAuditRow): boolean {
  return (row.decision === BLOCKED || row.decision === WOULD_DENY) && row.kind !== 'note';
}

/** A row "allow this host…" is offered for: a refusal of a request (the server decides whether a
 * rule can be suggested: built-in protections never get one). */
export function canAllow(row: IAuditRow): boolean {
  return isBlocked(row) && row.kind !== 'policy' && !!row.host;
}

export function blockedCount(rows: IAuditRow[]): number {
  return rows.filter(isBlocked).length;
}

export function filterRows(rows: IAuditRow[], filter: IFilter): IAuditRow[] {
  const needle = filter.host.trim().toLowerCase();
  return rows.filter(
    r =>
      (!filter.blockedOnly || isBlocked(r)) &&
      (!needle || (r.host ?? '').toLowerCase().includes(needle))
  );
}

/** Rows by id, oldest first, without duplicates, keeping the newest `max`. */
export function mergeRows(old: IAuditRow[], incoming: IAuditRow[], max = MAX_ROWS): IAuditRow[] {
  const byId = new Map<number, IAuditRow>();
  for (const r of old) {
    byId.set(r.id, r);
  }
  for (const r of incoming) {
    byId.set(r.id, r);
  }
  const merged = [...byId.values()].sort((a, b) => a.id - b.id);
  return merged.length > max ? merged.slice(merged.length - max) : merged;
}

/** Rows of `incoming` not already in `old` (what is new in a live update). */
export function newRows(old: IAuditRow[], incoming: IAuditRow[]): IAuditRow[] {
  const seen = new Set(old.map(r => r.id));
  return incoming.filter(r => !seen.has(r.id));
}

function pad(n: number, width = 2): string {
  return String(n).padStart(width, '0');
}

export function formatTime(ts: number): string {
  const d = new Date(ts * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

const DEFAULT_PORTS = new Set([80, 443]);

export function formatHost(row: IAuditRow): string {
  const host = row.host ?? '';
  if (!host) {
    return row.kind === 'dns' ? row.url ?? '' : '';
  }
  const shown = host.includes(':') && !host.startsWith('[') ? `[${host}]` : host;
  return row.port && !DEFAULT_PORTS.has(row.port) ? `${shown}:${row.port}` : shown;
}

export interface IRowText {
  time: string;
  decision: string;
  method: string;
  host: string;
  path: string;
  status: string;
  rule: string;
  kind: string;
  title: string;
}

/** The method column: the HTTP method; "DNS A" for lookups; the kind for connections, TCP, ... */
export function formatMethod(row: IAuditRow): string {
  if (row.kind === 'dns') {
    return row.method ? `DNS ${row.method}` : 'DNS';
  }
  return row.method ?? (row.kind === 'http' ? '' : row.kind.toUpperCase());
}

const DNS_RCODES: Record<number, string> = { 0: 'NOERROR', 2: 'SERVFAIL', 3: 'NXDOMAIN', 5: 'REFUSED' };

/** HTTP status, or the DNS answer's name (NXDOMAIN) for lookups. */
export function formatStatus(row: IAuditRow): string {
  if (row.status === null || row.status === undefined) {
    return '';
  }
  return row.kind === 'dns' ? DNS_RCODES[row.status] ?? `rcode ${row.status}` : String(row.status);
}

export function formatRow(row: IAuditRow): IRowText {
  return {
    time: formatTime(row.ts),
    decision: row.decision ?? '',
    method: formatMethod(row),
    host: formatHost(row),
    path: row.path ?? '',
    status: formatStatus(row),
    rule: row.rule ?? '',
    kind: row.kind,
    title: [row.url, row.reason].filter(Boolean).join(' \u2014 ')
  };
}

export function formatDuration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) {
    return '\u2014';
  }
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) {
    return `${s} s`;
  }
  const m = Math.floor(s / 60);
  if (m < 60) {
    return `${m} min ${pad(s % 60)} s`;
  }
  const h = Math.floor(m / 60);
  return `${h} h ${pad(m % 60)} min`;
}

export function shortDigest(digest: string | null | undefined, n = 12): string {
  if (!digest) {
    return '\u2014';
  }
  const hex = digest.includes(':') ? digest.slice(digest.indexOf(':') + 1) : digest;
  return hex.slice(0, n);
}

export function accelText(facts: Pick<IKernelFacts, 'accel'>): string {
  if (facts.accel === 'kvm') {
    return 'KVM';
  }
  if (facts.accel === 'tcg') {
    return 'emulated';
  }
  return facts.accel ?? '';
}

/** The status-bar text: "Sandbox ready · emulated", plus "· N blocked" only when N > 0, and
 * "· observe mode" when the policy only observes (what it refuses goes out anyway). */
export function statusText(facts: Pick<IKernelFacts, 'state' | 'accel'>, blocked: number, observe = false): string {
  const parts = [`Sandbox ${facts.state}`];
  const accel = accelText(facts);
  if (accel) {
    parts.push(accel);
  }
  if (observe) {
    parts.push('observe mode');
  }
  if (blocked > 0) {
    parts.push(`${blocked} blocked`);
  }
  return parts.join(' \u00b7 ');
}

export function uptimeSeconds(facts: Pick<IKernelFacts, 'state' | 'started_at'>, nowMs: number): number | null {
  if (!facts.started_at || facts.state === 'dead') {
    return null;
  }
  return Math.max(0, nowMs / 1000 - facts.started_at);
}

export function notificationText(row: IAuditRow): string {
  let what: string;
  if (row.kind === 'dns') {
    what = `DNS lookup of ${formatHost(row)}`;
  } else if (row.kind === 'http' || row.kind === 'websocket') {
    what = [row.method, formatHost(row) + (row.path ?? '')].filter(Boolean).join(' ');
  } else {
    what = `${row.kind === 'tcp' ? 'TCP' : 'connection'} to ${formatHost(row)}`;
  }
  const rule = row.rule ? `rule "${row.rule}"` : 'no rule';
  return `Sandbox blocked ${what} (${rule}${row.reason ? ': ' + row.reason : ''})`;
}

/** Everything the panel and status item show for one kernel; updated from REST and events. */
export class NetworkLog {
  rows: IAuditRow[] = [];
  lastId = 0;
  total = 0;
  blockedTotal = 0;

  constructor(readonly max = MAX_ROWS) {}

  /** Merge a /network answer or a `network` event; returns the rows that were new. */
  apply(result: INetworkResult): IAuditRow[] {
    const fresh = newRows(this.rows, result.rows);
    this.rows = mergeRows(this.rows, result.rows, this.max);
    this.lastId = Math.max(this.lastId, result.last_id);
    this.total = Math.max(result.total, this.rows.length);
    this.blockedTotal = Math.max(result.blocked, blockedCount(this.rows));
    return fresh;
  }

  clear(): void {
    this.rows = [];
    this.lastId = 0;
    this.total = 0;
    this.blockedTotal = 0;
  }
}
