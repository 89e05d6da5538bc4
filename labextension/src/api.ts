/** REST and event-stream calls to the capsem server extension, through JupyterLab's
 * ServerConnection (so the Jupyter token / cookies and XSRF header go along). */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { IServerEvent, SSEParser } from './sse';
import { IAllowOffer, IAllowResult, IKernelFacts, INetworkResult, IPolicy } from './types';

export class CapsemApiError extends Error {
  constructor(
    readonly status: number,
    message: string
  ) {
    super(message);
  }
}

export class CapsemApi {
  constructor(readonly settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {}

  url(...parts: string[]): string {
    return URLExt.join(this.settings.baseUrl, 'capsem', ...parts.map(encodeURIComponent));
  }

  private async json<T>(url: string, init: RequestInit = {}): Promise<T> {
    const response = await ServerConnection.makeRequest(url, init, this.settings);
    const text = await response.text();
    let body: any = {};
    try {
      body = text ? JSON.parse(text) : {};
    } catch {
      body = { message: text };
    }
    if (!response.ok) {
      throw new CapsemApiError(response.status, body.message || response.statusText);
    }
    return body as T;
  }

  facts(kernelId: string): Promise<IKernelFacts> {
    return this.json(this.url('kernels', kernelId));
  }

  policy(kernelId: string): Promise<IPolicy & { capsem: boolean }> {
    return this.json(this.url('kernels', kernelId, 'policy'));
  }

  /** The rule the server suggests for refused audit row `rowId` (never computed here). */
  allowOffer(kernelId: string, rowId: number): Promise<IAllowOffer> {
    return this.json(this.url('kernels', kernelId, 'allow') + `?row=${rowId}`);
  }

  /** Add that rule to the kernel's policy file (the server checks everything again; admins only).
   * `base`: the hash of the file text the offer was computed from. */
  allowApply(kernelId: string, rowId: number, base: string): Promise<IAllowResult> {
    return this.json(this.url('kernels', kernelId, 'allow'), {
      method: 'POST',
      body: JSON.stringify({ row: rowId, base })
    });
  }

  network(kernelId: string, query: { after?: number; blocked?: boolean; host?: string } = {}): Promise<INetworkResult> {
    const params = new URLSearchParams();
    if (query.after) {
      params.set('after', String(query.after));
    }
    if (query.blocked) {
      params.set('blocked', '1');
    }
    if (query.host) {
      params.set('host', query.host);
    }
    const qs = params.toString();
    return this.json(this.url('kernels', kernelId, 'network') + (qs ? `?${qs}` : ''));
  }

  /** Read the kernel's event stream until it ends or `signal` aborts; calls `onEvent` per event. */
  async events(kernelId: string, after: number, signal: AbortSignal, onEvent: (e: IServerEvent) => void): Promise<void> {
    const url = this.url('kernels', kernelId, 'events') + `?after=${after}`;
    const response = await ServerConnection.makeRequest(
      url,
      { signal, headers: { Accept: 'text/event-stream' }, cache: 'no-store' },
      this.settings
    );
    if (!response.ok || !response.body) {
      throw new CapsemApiError(response.status, `event stream: ${response.status} ${response.statusText}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SSEParser();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) {
          return;
        }
        for (const event of parser.feed(decoder.decode(value, { stream: true }))) {
          onEvent(event);
        }
      }
    } finally {
      reader.releaseLock();
    }
  }
}
