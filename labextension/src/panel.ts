/** The "Sandbox" side panel: VM facts, the active policy and the live network log of the current
 * notebook's capsem kernel. Plain DOM: a skeleton built once, sections re-rendered on change. */

import { Widget } from '@lumino/widgets';

import { AllowBox } from './allow';
import { el } from './dom';
import { capsemIcon } from './icon';
import {
  accelText,
  canAllow,
  filterRows,
  formatDuration,
  formatRow,
  formatTime,
  IFilter,
  shortDigest,
  uptimeSeconds
} from './model';
import { SandboxModel } from './sandbox';
import { IKernelFacts, IPolicy, IPolicyRule } from './types';

export const PANEL_ID = 'capsem-sandbox-panel';

function section(title: string): { root: HTMLElement; body: HTMLElement } {
  const root = el('section', 'jp-capsem-section');
  root.append(el('h3', 'jp-capsem-section-title', title));
  const body = el('div', 'jp-capsem-section-body');
  root.append(body);
  return { root, body };
}

export class SandboxPanel extends Widget {
  readonly filter: IFilter = { blockedOnly: false, host: '' };
  private readonly header = el('div', 'jp-capsem-header');
  private readonly facts = section('Virtual machine');
  private readonly policy = section('Egress policy');
  private readonly network = section('Network');
  private readonly summary = el('div', 'jp-capsem-net-summary');
  private readonly tbody = el('tbody');
  private readonly blockedBox = el('input');
  private readonly hostBox = el('input');
  private readonly allow: AllowBox;
  private timer: number | undefined;

  constructor(private readonly model: SandboxModel) {
    super();
    this.id = PANEL_ID;
    this.addClass('jp-capsem-panel');
    this.title.icon = capsemIcon;
    this.title.caption = 'Sandbox';
    this.title.label = '';

    const filters = el('div', 'jp-capsem-filters');
    const blockedLabel = el('label', 'jp-capsem-filter-blocked');
    this.blockedBox.type = 'checkbox';
    this.blockedBox.addEventListener('change', () => {
      this.filter.blockedOnly = this.blockedBox.checked;
      this.renderNetwork();
    });
    blockedLabel.append(this.blockedBox, document.createTextNode(' blocked only'));
    this.hostBox.type = 'search';
    this.hostBox.placeholder = 'filter by host';
    this.hostBox.className = 'jp-capsem-filter-host';
    this.hostBox.addEventListener('input', () => {
      this.filter.host = this.hostBox.value;
      this.renderNetwork();
    });
    filters.append(blockedLabel, this.hostBox);

    const table = el('table', 'jp-capsem-net-table');
    const head = el('tr');
    for (const name of ['time', 'decision', 'method', 'host', 'path', 'status', 'rule', '']) {
      head.append(el('th', '', name));
    }
    table.append(el('thead'), this.tbody);
    table.tHead!.append(head);
    const scroller = el('div', 'jp-capsem-net-scroll');
    scroller.append(table);
    this.allow = new AllowBox(model, () => void model.refreshPolicy().catch(() => undefined));
    this.network.body.append(filters, this.summary, this.allow.node, scroller);

    this.node.append(this.header, this.facts.root, this.network.root, this.policy.root);
    model.changed.connect(this.render, this);
    this.render();
  }

  protected onAfterAttach(): void {
    this.timer = window.setInterval(() => this.renderFacts(), 1000); // uptime ticks
  }

  protected onBeforeDetach(): void {
    window.clearInterval(this.timer);
  }

  render(): void {
    this.renderHeader();
    this.renderFacts();
    this.renderPolicy();
    this.renderNetwork();
  }

  private renderHeader(): void {
    const m = this.model;
    this.header.replaceChildren();
    const title = el('h2', 'jp-capsem-title', 'Sandbox');
    this.header.append(title);
    if (!m.kernelId) {
      this.header.append(el('p', 'jp-capsem-note', 'Open a notebook to see its kernel\u2019s sandbox.'));
    } else if (m.error) {
      this.header.append(el('p', 'jp-capsem-error', m.error));
    } else if (!m.facts) {
      this.header.append(el('p', 'jp-capsem-note', m.notCapsemMessage || 'Loading\u2026'));
    } else {
      const state = el('span', `jp-capsem-state jp-capsem-state-${m.facts.state}`, m.facts.state);
      const line = el('p', 'jp-capsem-kernel');
      line.append(state, document.createTextNode(` kernel ${m.kernelId.slice(0, 8)}`));
      this.header.append(line);
      if (m.policy?.observe) {
        this.header.append(
          el(
            'p',
            'jp-capsem-observe',
            'Observe mode: requests the policy refuses are let through and logged as would-deny. ' +
              'Built-in protections still apply. Use it on trusted code only.'
          )
        );
      }
    }
  }

  private renderFacts(): void {
    const f = this.model.facts;
    this.facts.root.hidden = !f;
    if (!f) {
      return;
    }
    const rows: [string, string][] = [
      ['State', f.state],
      ['Accelerator', accelText(f) === 'emulated' ? 'emulated (TCG, no KVM)' : accelText(f) || '\u2014'],
      ['Memory', f.memory_mb ? `${f.memory_mb} MB` : '\u2014'],
      ['CPUs', f.cpus ? String(f.cpus) : '\u2014'],
      ...shareRows(f),
      ['Image', shortDigest(f.image_digest)],
      ['Uptime', formatDuration(uptimeSeconds(f, Date.now()))],
      ['Booted in', f.boot_seconds ? `${f.boot_seconds.toFixed(1)} s` : '\u2014'],
      ['Started', f.started_at ? formatTime(f.started_at).slice(0, 8) : '\u2014']
    ];
    const why = f.death_reason || f.shutdown_reason;
    if (why) {
      rows.splice(1, 0, ['Ended', why]); // e.g. "virtiofsd for /nb exited (signal 9)"
    }
    const dl = el('dl', 'jp-capsem-facts');
    for (const [k, v] of rows) {
      const dt = el('dt', '', k);
      const dd = el('dd', '', v);
      if (k === 'Image' && f.image_digest) {
        dd.title = f.image_digest;
      }
      dl.append(dt, dd);
    }
    this.facts.body.replaceChildren(dl);
  }

  private renderPolicy(): void {
    const p: IPolicy | null = this.model.policy;
    this.policy.root.hidden = !this.model.facts;
    const body = this.policy.body;
    body.replaceChildren();
    if (!p) {
      return;
    }
    body.append(el('p', 'jp-capsem-policy-source', p.description ?? p.source ?? ''));
    if (p.error) {
      body.append(el('p', 'jp-capsem-error', p.error));
    }
    const list = el('ol', 'jp-capsem-rules');
    const builtin = p.rules.filter(r => r.builtin);
    for (const r of p.rules.filter(r => !r.builtin)) {
      list.append(ruleItem(r));
    }
    if (!p.rules.some(r => !r.builtin)) {
      list.append(el('li', 'jp-capsem-note', 'No rules of your own: everything is denied.'));
    }
    const last = el('li', 'jp-capsem-rule jp-capsem-rule-deny jp-capsem-rule-default');
    last.append(el('span', 'jp-capsem-badge jp-capsem-badge-deny', 'deny'), el('strong', '', ' default'));
    last.append(el('div', 'jp-capsem-rule-reason', 'anything no rule above allows'));
    list.append(last);
    body.append(list);
    if (builtin.length) {
      const more = el('details', 'jp-capsem-builtin-rules');
      more.append(el('summary', '', `${builtin.length} built-in deny rules (checked first)`));
      const inner = el('ol', 'jp-capsem-rules');
      for (const r of builtin) {
        inner.append(ruleItem(r));
      }
      more.append(inner);
      body.append(more);
    }
    body.append(
      el(
        'p',
        'jp-capsem-note',
        p.edits_allowed
          ? 'Policy edits from the browser are enabled on this server.'
          : 'Read-only: the server admin sets the policy (edits from the browser are disabled).'
      )
    );
  }

  renderNetwork(): void {
    const m = this.model;
    this.network.root.hidden = !m.facts;
    const rows = filterRows(m.log.rows, this.filter);
    const blocked = m.log.blockedTotal;
    this.summary.textContent =
      `${m.log.total} log entr${m.log.total === 1 ? 'y' : 'ies'}, ${blocked} blocked` +
      (rows.length !== m.log.rows.length ? ` (showing ${rows.length})` : '');
    const fragment = document.createDocumentFragment();
    for (const row of [...rows].reverse()) {
      const t = formatRow(row);
      const tr = el('tr', `jp-capsem-row jp-capsem-row-${t.decision || 'none'}`);
      tr.dataset.decision = t.decision;
      tr.dataset.kind = t.kind;
      tr.title = t.title;
      for (const [key, value] of Object.entries({
        time: t.time,
        decision: t.decision,
        method: t.method,
        host: t.host,
        path: t.path,
        status: t.status,
        rule: t.rule
      })) {
        const td = el('td', `jp-capsem-col-${key}`, value);
        tr.append(td);
      }
      const action = el('td', 'jp-capsem-col-action');
      if (canAllow(row)) {
        const button = el('button', 'jp-capsem-allow-button', 'allow this host\u2026');
        button.title = 'Show the rule that would allow this (computed by the server from this log entry)';
        button.addEventListener('click', () => void this.allow.open(row));
        action.append(button);
      }
      tr.append(action);
      fragment.append(tr);
    }
    this.tbody.replaceChildren(fragment);
    if (!rows.length) {
      const tr = el('tr', 'jp-capsem-empty');
      const td = el('td', '', m.log.rows.length ? 'No request matches the filters.' : 'No network activity yet.');
      td.colSpan = 8;
      tr.append(td);
      this.tbody.append(tr);
    }
  }

  dispose(): void {
    this.model.changed.disconnect(this.render, this);
    window.clearInterval(this.timer);
    super.dispose();
  }
}

function ruleItem(r: IPolicyRule): HTMLLIElement {
  const item = el('li', `jp-capsem-rule jp-capsem-rule-${r.action}`);
  item.dataset.rule = r.name;
  const head = el('div', 'jp-capsem-rule-head');
  head.append(el('span', `jp-capsem-badge jp-capsem-badge-${r.action}`, r.action), el('strong', '', ` ${r.name}`));
  item.append(head, el('code', 'jp-capsem-rule-summary', r.summary));
  if (r.reason) {
    item.append(el('div', 'jp-capsem-rule-reason', r.reason));
  }
  item.title = r.origin;
  return item;
}

function shareRows(f: IKernelFacts): [string, string][] {
  if (!f.shares.length) {
    return [['Shared folder', 'none']];
  }
  return f.shares.map(s => ['Shared folder', `${s.path} (${s.mode === 'ro' ? 'read-only' : 'read-write'})`]);
}
