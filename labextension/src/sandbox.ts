/** Follows one kernel (the current notebook's): its facts, policy and network log, kept live over
 * the server's event stream. The status item and the panel render from it. */

import { ISignal, Signal } from '@lumino/signaling';

import { CapsemApi, CapsemApiError } from './api';
import { NetworkLog } from './model';
import { IAuditRow, IKernelFacts, IPolicy } from './types';

const RETRY_MS = 2000;

export class SandboxModel {
  kernelId: string | null = null;
  /** null: not a capsem kernel (or no kernel); the status item hides. */
  facts: IKernelFacts | null = null;
  policy: IPolicy | null = null;
  notCapsemMessage = '';
  error = '';
  readonly log = new NetworkLog();

  private abort: AbortController | null = null;
  private generation = 0;
  private _changed = new Signal<this, void>(this);
  private _blocked = new Signal<this, IAuditRow>(this);

  constructor(readonly api: CapsemApi) {}

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Emitted for each blocked request that arrives live (not for the backlog). */
  get blocked(): ISignal<this, IAuditRow> {
    return this._blocked;
  }

  get isCapsem(): boolean {
    return this.facts !== null;
  }

  /** Follow `kernelId` (null: nothing). Cancels the previous stream. */
  async follow(kernelId: string | null): Promise<void> {
    if (kernelId === this.kernelId) {
      return;
    }
    this.stop();
    const gen = ++this.generation;
    this.kernelId = kernelId;
    this.facts = null;
    this.policy = null;
    this.notCapsemMessage = '';
    this.error = '';
    this.log.clear();
    this._changed.emit();
    if (!kernelId) {
      return;
    }
    try {
      const facts = await this.factsWhenKnown(gen, kernelId);
      if (gen !== this.generation || !facts) {
        return;
      }
      if (!facts.capsem) {
        this.notCapsemMessage = facts.message ?? 'not a capsem kernel';
        this._changed.emit();
        return;
      }
      this.facts = facts;
      const [policy, network] = await Promise.all([this.api.policy(kernelId), this.api.network(kernelId)]);
      if (gen !== this.generation) {
        return;
      }
      this.policy = policy;
      this.log.apply(network);
      this._changed.emit();
      void this.stream(gen, kernelId);
    } catch (err) {
      if (gen === this.generation) {
        this.error = err instanceof Error ? err.message : String(err);
        this._changed.emit();
      }
    }
  }

  /** The kernel's facts; retries a while on 404 (a kernel the server has not registered yet). */
  private async factsWhenKnown(gen: number, kernelId: string): Promise<IKernelFacts | null> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.api.facts(kernelId);
      } catch (err) {
        if (!(err instanceof CapsemApiError && err.status === 404) || attempt >= 30) {
          throw err;
        }
      }
      await new Promise(resolve => setTimeout(resolve, RETRY_MS));
      if (gen !== this.generation) {
        return null;
      }
    }
  }

  async refreshPolicy(): Promise<void> {
    if (this.kernelId && this.facts) {
      this.policy = await this.api.policy(this.kernelId);
      this._changed.emit();
    }
  }

  private async stream(gen: number, kernelId: string): Promise<void> {
    while (gen === this.generation) {
      const abort = new AbortController();
      this.abort = abort;
      try {
        await this.api.events(kernelId, this.log.lastId, abort.signal, e => this.onEvent(gen, e.event, e.data));
      } catch (err) {
        if (abort.signal.aborted || gen !== this.generation) {
          return;
        }
        if (err instanceof CapsemApiError && err.status === 404) {
          this.markDead();
          return;
        }
      }
      if (gen !== this.generation || this.facts?.state === 'dead') {
        return;
      }
      await new Promise(resolve => setTimeout(resolve, RETRY_MS));
    }
  }

  private onEvent(gen: number, event: string, data: string): void {
    if (gen !== this.generation) {
      return;
    }
    const payload = JSON.parse(data);
    if (event === 'state') {
      const policyChanged = this.facts?.started_at !== payload.started_at;
      this.facts = payload as IKernelFacts;
      if (policyChanged) {
        void this.refreshPolicy().catch(() => undefined);
      }
    } else if (event === 'network') {
      for (const row of this.log.apply(payload)) {
        if (row.decision === 'deny' && row.kind !== 'note') {
          this._blocked.emit(row);
        }
      }
    } else if (event === 'gone') {
      this.markDead();
    }
    this._changed.emit();
  }

  private markDead(): void {
    if (this.facts) {
      this.facts = { ...this.facts, state: 'dead', uptime_seconds: null };
      this._changed.emit();
    }
  }

  stop(): void {
    this.generation++;
    this.abort?.abort();
    this.abort = null;
  }

  dispose(): void {
    this.stop();
    Signal.clearData(this);
  }
}
