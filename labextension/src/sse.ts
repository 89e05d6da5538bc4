/** A small incremental parser for text/event-stream (the subset the capsem server sends:
 * `event:`, `data:`, `id:` fields and `:` comments; events end at a blank line). */

export interface IServerEvent {
  event: string;
  data: string;
  id: string | null;
}

export class SSEParser {
  private buffer = '';
  private event = '';
  private data: string[] = [];
  private id: string | null = null;

  /** Feed a chunk of text; returns the events it completed. */
  feed(chunk: string): IServerEvent[] {
    this.buffer += chunk;
    const out: IServerEvent[] = [];
    let nl: number;
    while ((nl = this.buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = this.buffer.slice(0, nl);
      const sepLen = this.buffer.startsWith('\r\n', nl) ? 2 : 1;
      if (this.buffer[nl] === '\r' && nl + 1 === this.buffer.length) {
        break; // a lone \r at the end may be the first half of \r\n: wait for more
      }
      this.buffer = this.buffer.slice(nl + sepLen);
      this.line(line, out);
    }
    return out;
  }

  private line(line: string, out: IServerEvent[]): void {
    if (line === '') {
      if (this.data.length) {
        out.push({ event: this.event || 'message', data: this.data.join('\n'), id: this.id });
      }
      this.event = '';
      this.data = [];
      return;
    }
    if (line.startsWith(':')) {
      return; // comment / keep-alive
    }
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) {
      value = value.slice(1);
    }
    if (field === 'event') {
      this.event = value;
    } else if (field === 'data') {
      this.data.push(value);
    } else if (field === 'id') {
      this.id = value;
    }
  }
}
