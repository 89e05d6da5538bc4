/** Shapes of the /capsem/ REST answers (capsem_kernel/server/handlers.py). */

export type SandboxState = 'booting' | 'ready' | 'dead';

export interface IShare {
  path: string;
  mode: 'rw' | 'ro';
}

export interface IKernelFacts {
  kernel_id: string;
  capsem: boolean;
  message?: string;
  kernel_name?: string | null;
  state: SandboxState;
  accel: string | null;
  accel_label: string | null;
  memory_mb: number | null;
  cpus: number | null;
  shares: IShare[];
  share_mode?: string;
  image_digest: string | null;
  started_at: number | null;
  ready_at: number | null;
  boot_seconds: number | null;
  uptime_seconds: number | null;
  kernel_pid: number | null;
  policy_path: string | null;
  death_reason?: string | null;
  shutdown_reason?: string | null;
  runtime_dir?: string | null; // the VM's own dir (logs, sockets)
  pooled?: boolean | null;
}

export interface IPolicyRule {
  index: number;
  name: string;
  action: 'allow' | 'deny';
  host: string;
  schemes: string[] | null;
  ports: number[] | null;
  methods: string[] | null;
  paths: string[] | null;
  addresses: string[];
  reason: string;
  origin: string;
  builtin?: boolean;
  summary: string;
}

export interface IPolicy {
  source: string | null;
  description?: string;
  error?: string;
  rules: IPolicyRule[];
  credentials: { name: string; hosts: string[]; header: string | null; query: string | null; guest_env: string | null }[];
  edits_allowed?: boolean;
  /** Observe mode: what the rules refuse goes out anyway and is logged as would-deny. */
  observe?: boolean;
}

export interface IAuditRow {
  id: number;
  ts: number;
  kind: string;
  decision: string | null;
  method: string | null;
  host: string | null;
  port: number | null;
  path: string;
  url: string | null;
  status: number | null;
  rule: string | null;
  reason: string | null;
  code?: string | null;
  bytes_out?: number | null;
  bytes_in?: number | null;
  duration_ms?: number | null;
}

export interface INetworkResult {
  rows: IAuditRow[];
  last_id: number;
  total: number;
  blocked: number;
}

/** A rule suggested for one refused row (GET /capsem/kernels/<id>/allow?row=ID). */
export interface IAllowOffer {
  row_id: number;
  file: string;
  base: string;
  toml: string;
  addition: string;
  rules: { name: string; host: string; summary: string }[];
  refused: { what: string; code: string; why: string; count: number }[];
  already_allowed: boolean;
  command: string;
  edits_allowed: boolean;
}

/** The answer to adding it (POST /capsem/kernels/<id>/allow). */
export interface IAllowResult {
  applied: boolean;
  file: string;
  rules: { name: string; summary: string }[];
  reloaded: Record<string, string>;
  applies: string;
}
