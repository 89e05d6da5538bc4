import { describe, expect, it } from 'vitest';

import { SSEParser } from '../src/sse';

describe('SSEParser', () => {
  it('parses events split across chunks, skipping comments', () => {
    const p = new SSEParser();
    expect(p.feed(': capsem events\n\nid: 5\nevent: netw')).toEqual([]);
    const out = p.feed('ork\ndata: {"rows": []}\n\nevent: state\ndata: {"state":"ready"}\n\n: keep-alive\n\n');
    expect(out).toEqual([
      { event: 'network', data: '{"rows": []}', id: '5' },
      { event: 'state', data: '{"state":"ready"}', id: '5' }
    ]);
  });

  it('handles CRLF (also split between chunks) and multi-line data', () => {
    const p = new SSEParser();
    expect(p.feed('data: a\r')).toEqual([]);
    expect(p.feed('\ndata: b\r\n\r\n')).toEqual([{ event: 'message', data: 'a\nb', id: null }]);
  });
});
