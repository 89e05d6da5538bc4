/** "Allow this host…" for a refused row of the Sandbox panel's network log. The rule is computed by
 * the server from the audit row (capsem_kernel/server/policy_allow.py: the `capsem policy suggest`
 * logic), never here: the browser sends only the row id and the hash of the file text it showed.
 * With c.CapsemExtension.allow_policy_edits an admin can add it to the kernel's policy file (the
 * server checks it all again and reloads the running kernel); without, the box shows the TOML to
 * copy and the command to run on the host. */

import { CapsemApiError } from './api';
import { el } from './dom';
import { SandboxModel } from './sandbox';
import { IAllowOffer, IAuditRow } from './types';

function errorText(err: unknown): string {
  return err instanceof CapsemApiError ? err.message : String(err);
}

export class AllowBox {
  readonly node = el('div', 'jp-capsem-allow');
  private row: IAuditRow | null = null;

  constructor(
    private readonly model: SandboxModel,
    private readonly onApplied: () => void
  ) {
    this.node.hidden = true;
  }

  close(): void {
    this.row = null;
    this.node.hidden = true;
    this.node.replaceChildren();
  }

  /** Show what the server suggests for `row`. */
  async open(row: IAuditRow): Promise<void> {
    const kernelId = this.model.kernelId;
    if (!kernelId) {
      return;
    }
    this.row = row;
    this.node.hidden = false;
    this.node.dataset.row = String(row.id);
    this.node.replaceChildren(this.head(`Allow ${row.host ?? ''}?`), el('p', 'jp-capsem-note', 'Asking the server\u2026'));
    let offer: IAllowOffer;
    try {
      offer = await this.model.api.allowOffer(kernelId, row.id);
    } catch (err) {
      if (this.row === row) {
        this.node.replaceChildren(this.head(`Allow ${row.host ?? ''}?`), el('p', 'jp-capsem-error', errorText(err)));
      }
      return;
    }
    if (this.row === row) {
      this.render(kernelId, row, offer);
    }
  }

  private head(title: string): HTMLElement {
    const head = el('div', 'jp-capsem-allow-head');
    const close = el('button', 'jp-capsem-allow-close', '\u00d7');
    close.title = 'Close';
    close.addEventListener('click', () => this.close());
    head.append(el('strong', '', title), close);
    return head;
  }

  private render(kernelId: string, row: IAuditRow, offer: IAllowOffer): void {
    const parts: HTMLElement[] = [this.head(`Allow ${row.host ?? ''}?`)];
    if (!offer.rules.length) {
      const why = offer.already_allowed
        ? 'The current policy file allows this request already.'
        : 'No rule is suggested for this request:';
      parts.push(el('p', 'jp-capsem-note jp-capsem-allow-none', why));
      const list = el('ul', 'jp-capsem-allow-refused');
      for (const r of offer.refused) {
        list.append(el('li', '', `${r.what} [${r.code}]: ${r.why}`));
      }
      parts.push(list);
      this.node.replaceChildren(...parts);
      return;
    }
    const rules = el('ul', 'jp-capsem-allow-rules');
    for (const r of offer.rules) {
      rules.append(el('li', '', r.summary));
    }
    parts.push(el('p', 'jp-capsem-note', `Suggested for the policy file ${offer.file}:`), rules);
    parts.push(el('pre', 'jp-capsem-allow-toml', offer.addition || offer.toml));
    const result = el('p', 'jp-capsem-allow-result');
    if (offer.edits_allowed) {
      const add = el('button', 'jp-capsem-allow-apply jp-mod-styled jp-mod-accept', 'Add to the policy');
      add.addEventListener('click', async () => {
        add.disabled = true;
        result.className = 'jp-capsem-allow-result';
        result.textContent = 'Adding\u2026';
        try {
          const done = await this.model.api.allowApply(kernelId, row.id, offer.base);
          result.classList.add('jp-capsem-allow-done');
          result.textContent = `Added ${done.rules.map(r => r.name).join(', ')} to ${done.file}: applies ${done.applies}.`;
          this.onApplied();
        } catch (err) {
          add.disabled = false;
          result.classList.add('jp-capsem-error');
          result.textContent = errorText(err);
        }
      });
      parts.push(add, result);
    } else {
      parts.push(
        el(
          'p',
          'jp-capsem-note',
          'Policy edits from the browser are disabled on this server. Add the TOML above to the file on the ' +
            'host, or run there (it suggests from every refused request of this kernel and shows the diff first):'
        ),
        el('pre', 'jp-capsem-allow-command', offer.command)
      );
    }
    this.node.replaceChildren(...parts);
  }
}
