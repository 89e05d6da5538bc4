/** The status-bar item: "Sandbox ready · emulated · 1 blocked" for the current notebook's capsem
 * kernel. Clicking it opens the Sandbox panel. */

import { Widget } from '@lumino/widgets';

import { capsemIcon } from './icon';
import { statusText } from './model';
import { SandboxModel } from './sandbox';

export class SandboxStatus extends Widget {
  private readonly label: HTMLSpanElement;
  private readonly badge: HTMLSpanElement;

  constructor(
    private readonly model: SandboxModel,
    private readonly onOpen: () => void
  ) {
    super();
    this.addClass('jp-capsem-status');
    this.node.title = 'Capsem sandbox: click to open the Sandbox panel';
    this.node.setAttribute('role', 'button');
    const icon = document.createElement('span');
    icon.className = 'jp-capsem-status-icon';
    capsemIcon.element({ container: icon, height: '14px', width: '14px' });
    this.label = document.createElement('span');
    this.label.className = 'jp-capsem-status-label';
    this.badge = document.createElement('span');
    this.badge.className = 'jp-capsem-status-blocked';
    this.node.append(icon, this.label, this.badge);
    this.node.addEventListener('click', () => this.onOpen());
    model.changed.connect(this.render, this);
    this.render();
  }

  render(): void {
    const facts = this.model.facts;
    if (!facts) {
      this.label.textContent = '';
      this.badge.textContent = '';
      return;
    }
    const blocked = this.model.log.blockedTotal;
    const observe = !!this.model.policy?.observe;
    const text = statusText(facts, 0, observe);
    this.label.textContent = text;
    this.node.dataset.state = facts.state;
    this.node.dataset.observe = String(observe);
    this.node.title = observe
      ? 'Capsem sandbox in OBSERVE MODE: requests the policy refuses are let through and logged as ' +
        'would-deny. Click to open the Sandbox panel'
      : 'Capsem sandbox: click to open the Sandbox panel';
    this.badge.textContent = blocked > 0 ? `${blocked} blocked` : '';
    this.badge.hidden = blocked === 0;
    this.node.setAttribute('aria-label', statusText(facts, blocked, observe));
  }

  dispose(): void {
    this.model.changed.disconnect(this.render, this);
    super.dispose();
  }
}
