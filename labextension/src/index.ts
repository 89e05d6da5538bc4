/** @capsem/jupyterlab-capsem: see what the current notebook's capsem sandbox is doing.
 *
 * - status-bar item (state, accelerator, blocked count) for capsem kernels; click: the panel
 * - "Sandbox" side panel: VM facts, active policy, live network log with filters
 * - a notification per blocked request, naming host and rule
 */

import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, Notification } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';

import { CapsemApi } from './api';
import { notificationText } from './model';
import { PANEL_ID, SandboxPanel } from './panel';
import { SandboxModel } from './sandbox';
import { SandboxStatus } from './status';

const PLUGIN_ID = '@capsem/jupyterlab-capsem:plugin';
const OPEN_COMMAND = 'capsem:open-sandbox';

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Shows the state, egress policy and network log of capsem sandbox kernels.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null
  ) => {
    const model = new SandboxModel(new CapsemApi(app.serviceManager.serverSettings));
    const panel = new SandboxPanel(model);
    app.shell.add(panel, 'right', { rank: 900 });
    const open = () => app.shell.activateById(PANEL_ID);

    app.commands.addCommand(OPEN_COMMAND, { label: 'Show the Capsem Sandbox panel', execute: open });
    palette?.addItem({ command: OPEN_COMMAND, category: 'Capsem' });

    if (statusBar) {
      const status = new SandboxStatus(model, open);
      statusBar.registerStatusItem('@capsem/jupyterlab-capsem:status', {
        item: status,
        align: 'left',
        rank: 4,
        isActive: () => model.isCapsem,
        activeStateChanged: model.changed
      });
    }

    model.blocked.connect((_, row) => {
      Notification.warning(notificationText(row), {
        autoClose: 10000,
        actions: [{ label: 'Show sandbox', callback: open }]
      });
    });

    // follow the current notebook's kernel
    let current: NotebookPanel | null = null;
    const sync = () => void model.follow(current?.sessionContext.session?.kernel?.id ?? null);
    tracker.currentChanged.connect((_, notebook) => {
      if (current) {
        current.sessionContext.sessionChanged.disconnect(sync);
        current.sessionContext.kernelChanged.disconnect(sync);
      }
      current = notebook;
      if (current) {
        current.sessionContext.sessionChanged.connect(sync);
        current.sessionContext.kernelChanged.connect(sync);
      }
      sync();
    });
  }
};

export default plugin;
