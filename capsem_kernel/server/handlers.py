"""REST and event-stream handlers under /capsem/. All need an authenticated Jupyter user (403
otherwise) authorized for resource "capsem".

    GET /capsem/kernels                      capsem kernels of this server and their state
    GET /capsem/kernels/<id>                 VM facts (facts.kernel_facts)
    GET /capsem/kernels/<id>/policy          the active egress policy, rendered (policy_view)
    PUT /capsem/kernels/<id>/policy          replace it: only with c.CapsemExtension.allow_policy_edits,
                                             and never its credentials (policy_edit.py); running kernels
                                             that use the file reload it (reload_kernels)
    GET /capsem/kernels/<id>/allow?row=ID    "allow this host…": the rule suggested for a refused row,
                                             the file it would go to, the command (policy_allow.py)
    POST /capsem/kernels/<id>/allow          {"row": ID, "base": HASH}: add it (allow_policy_edits only),
                                             then reload it into the running kernels that use the file
    GET /capsem/kernels/<id>/network         audit rows; ?blocked=1 &host=TEXT &after=ID &limit=N
                                             &barrier=1: first wait until every row caused so far
                                             is written ("barrier": true|false in the reply)
    GET /capsem/kernels/<id>/events          text/event-stream: `state` on change, `network` with new rows

Unknown kernel: 404. A kernel that is not a capsem kernel: 200 {"capsem": false, "message": ...}.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import tempfile
import time
from pathlib import Path

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.iostream import StreamClosedError

from capsem_vm.policy import PolicyError, parse_policy, resolve_policy_path, user_policy_path
from capsem_vm.policy.source import check_policy_location

from .. import loop_thread
from . import network, policy_allow
from .extension import SETTINGS_KEY, CapsemExtension
from .facts import NotCapsem, capsem_provisioner, is_capsem, kernel_facts
from .policy_edit import PolicyEditRefused, check_credentials_kept
from .policy_view import kernel_policy

AUTH_RESOURCE = "capsem"
KERNEL_ID = r"(?P<kernel_id>[\w-]+)"


class CapsemHandler(APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def ext(self) -> CapsemExtension:
        return self.settings[SETTINGS_KEY]

    def find_km(self, kernel_id: str):
        """The kernel's manager, or None once it is gone (never raises for unknown ids)."""
        if kernel_id not in self.kernel_manager:
            return None
        try:
            return self.kernel_manager.get_kernel(kernel_id)
        except (KeyError, web.HTTPError):
            return None

    def get_km(self, kernel_id: str):
        km = self.find_km(kernel_id)
        if km is None:
            raise web.HTTPError(404, f"no kernel {kernel_id} on this server")
        return km

    def capsem_or_explain(self, kernel_id: str):
        """(km, provisioner) of a capsem kernel, or None after answering that it is not one."""
        km = self.get_km(kernel_id)
        try:
            return km, capsem_provisioner(km)
        except NotCapsem:
            name = getattr(km, "kernel_name", "") or "?"
            self.finish(json.dumps({
                "kernel_id": kernel_id, "capsem": False, "kernel_name": name,
                "message": f"kernel {kernel_id} ({name}) is not a capsem kernel: it runs on this host, "
                           "not in a sandbox VM, so it has no VM facts, egress policy or network log.",
            }))
            return None

    def editable_capsem(self, kernel_id: str):
        """capsem_or_explain for a request that writes a policy file: 403 unless the admin allowed
        policy edits from the browser."""
        if not self.ext.allow_policy_edits:
            raise web.HTTPError(403, "policy edits from the browser are disabled on this server (the server "
                                     "admin can enable them with c.CapsemExtension.allow_policy_edits = True)")
        return self.capsem_or_explain(kernel_id)

    def guest_writable(self, prov) -> list[str]:
        if prov is None or prov.kernel_vm is None:
            return []
        return [str(s.host_path) for s in prov.kernel_vm.vm.config.shares if not s.readonly]

    def policy_file(self, prov) -> Path:
        """The file this kernel's policy comes from (the user's default one if none is set), after
        the location check: never a file the guest can write."""
        target = resolve_policy_path(prov.policy if prov else None) or user_policy_path()
        try:
            if target.exists():
                check_policy_location(target, self.guest_writable(prov))
        except PolicyError as exc:
            raise web.HTTPError(400, str(exc)) from None
        return target

    async def reload_kernels(self, target: Path, change: dict) -> dict:
        """Reload `target` into every running capsem kernel of this server whose egress loaded it
        (a policy-change audit row each): {kernel id: "reloaded" | why not}. Kernels without a
        running VM load it when they start."""
        out = {}
        for kid in list(self.kernel_manager.list_kernel_ids()):
            km = self.find_km(kid)
            try:
                prov = capsem_provisioner(km) if km is not None else None
            except NotCapsem:
                continue
            egress = getattr(getattr(getattr(prov, "kernel_vm", None), "vm", None), "egress", None)
            source = getattr(getattr(egress, "policy", None), "source", None)
            if egress is None or not source or Path(source).resolve() != target.resolve():
                continue
            try:
                await loop_thread.run(egress.reload_policy(change))
                out[kid] = "reloaded"
            except Exception as exc:  # noqa: BLE001 - reported to the admin, the kernel keeps its old policy
                self.log.error("capsem: reloading the policy of kernel %s failed: %s", kid, exc)
                out[kid] = f"not reloaded ({exc.__class__.__name__}: {exc}); restart the kernel"
        return out

    def policy_json(self, prov) -> dict:
        out = kernel_policy(prov, self.guest_writable(prov))
        out["edits_allowed"] = self.ext.allow_policy_edits
        return out


def capsem_kernel_request(method):
    """A request about one kernel, by an authenticated user authorized for "capsem":
    method(self, kernel_id, provisioner) runs for a capsem kernel; an unknown kernel gets 404, any
    other kernel the answer that it is not a capsem kernel (CapsemHandler.capsem_or_explain)."""
    @web.authenticated
    @authorized
    @functools.wraps(method)
    async def handle(self, kernel_id: str):
        found = self.capsem_or_explain(kernel_id)
        if found is not None:
            await method(self, kernel_id, found[1])
    return handle


class KernelsHandler(CapsemHandler):
    @web.authenticated
    @authorized
    async def get(self):
        out = []
        for kid in list(self.kernel_manager.list_kernel_ids()):
            km = self.find_km(kid)
            if km is not None and is_capsem(km):
                facts = kernel_facts(kid, km)
                out.append({"kernel_id": kid, "state": facts["state"], "accel": facts["accel"]})
        self.finish(json.dumps({"kernels": out}))


class KernelFactsHandler(CapsemHandler):
    @capsem_kernel_request
    async def get(self, kernel_id: str, prov):
        facts = kernel_facts(kernel_id, self.get_km(kernel_id))
        self.finish(json.dumps(facts))


class PolicyHandler(CapsemHandler):
    @capsem_kernel_request
    async def get(self, kernel_id: str, prov):
        out = self.policy_json(prov)
        out.update({"kernel_id": kernel_id, "capsem": True})
        self.finish(json.dumps(out))

    @web.authenticated
    @authorized
    async def put(self, kernel_id: str):
        """Replace the policy file this kernel's policy comes from. Takes effect for kernels (and
        restarts) started afterwards, and at once for running kernels whose VM loaded that file
        (reload_kernels). Refused unless the admin set allow_policy_edits."""
        found = self.editable_capsem(kernel_id)
        if found is None:
            return
        prov = found[1]
        body = self.get_json_body() or {}
        text = body.get("text")
        if not isinstance(text, str):
            raise web.HTTPError(400, 'expected a JSON body {"text": "<policy TOML>"}')
        target = self.policy_file(prov)
        try:
            parse_policy(text, str(target))
        except PolicyError as exc:
            raise web.HTTPError(400, str(exc)) from None
        try:
            check_credentials_kept(target, text)  # credentials are the host's, never the browser's
        except PolicyEditRefused as exc:
            raise web.HTTPError(403, str(exc)) from None
        _write_private(target, text)
        user = self.current_user.username
        self.log.warning("capsem: policy %s replaced from the browser by %s", target, user)
        reloaded = await self.reload_kernels(target, {
            "url": str(target), "reason": f"policy file replaced by Jupyter user {user!r} (PUT from the browser); "
                                          "policy reloaded"})
        out = self.policy_json(prov)
        out.update({"kernel_id": kernel_id, "capsem": True, "reloaded": reloaded,
                    "applies": "now, to the running kernels listed in `reloaded`, and to kernels started from now on"})
        self.finish(json.dumps(out))


class AllowHandler(CapsemHandler):
    """"Allow this host…" (policy_allow.py). GET: what would be added; POST: add it."""

    @capsem_kernel_request
    async def get(self, kernel_id: str, prov):
        row_id = _row_id(self.get_argument("row", ""))
        target, db = self.policy_file(prov), self.ext.audit_db_path(prov)
        offer = await self._run(lambda: policy_allow.make_offer(db, kernel_id, row_id, target))
        out = offer.as_json(kernel_id, db, _default_db())
        out.update({"kernel_id": kernel_id, "capsem": True, "edits_allowed": self.ext.allow_policy_edits})
        self.finish(json.dumps(out))

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str):
        found = self.editable_capsem(kernel_id)
        if found is None:
            return
        prov = found[1]
        body = self.get_json_body() or {}
        base = body.get("base")
        if not isinstance(base, str):
            raise web.HTTPError(400, 'expected a JSON body {"row": <audit row id>, "base": "<hash shown>"}')
        row_id = _row_id(body.get("row"))
        target, db = self.policy_file(prov), self.ext.audit_db_path(prov)
        offer = await self._run(lambda: policy_allow.apply_offer(db, kernel_id, row_id, target, base))
        user = self.current_user.username
        self.log.warning("capsem: rule(s) %s added to %s from the Sandbox panel by %s",
                         [r["name"] for r in offer.rules], target, user)
        change = policy_allow.change_fields(offer, user)
        reloaded = await self.reload_kernels(target, change)
        if reloaded.get(kernel_id) != "reloaded":  # not running, or the reload failed: still say who changed what
            why = reloaded.get(kernel_id, "no running VM")
            await self._run(lambda: _record(db, kernel_id, {**change, "reason": change["reason"].replace(
                "policy reloaded", f"applies when the kernel (re)starts ({why})")}))
        self.finish(json.dumps({
            "kernel_id": kernel_id, "capsem": True, "applied": True, "file": str(target),
            "rules": [policy_allow.summary(r) for r in offer.rules], "reloaded": reloaded,
            "applies": ("now: the running kernel's next request follows the new policy"
                        if reloaded.get(kernel_id) == "reloaded" else
                        "when the kernel (re)starts: it could not be reloaded while running"),
        }))

    async def _run(self, fn):
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        except policy_allow.AllowRefused as exc:
            self.set_status(exc.status)
            self.finish(json.dumps({"message": str(exc), "code": exc.code}))
            raise web.Finish() from None


def _row_id(value) -> int:
    try:
        row_id = int(value)
    except (TypeError, ValueError):
        raise web.HTTPError(400, "row must be an audit row id (an integer)") from None
    if not 0 < row_id < 1 << 62:
        raise web.HTTPError(400, "row must be an audit row id (an integer)")
    return row_id


def _default_db() -> Path:
    from capsem_vm.proxy.audit import default_db_path
    return default_db_path()


def _record(db: Path, kernel_id: str, fields: dict) -> None:
    """One policy-change row written by this process (the kernel has no running egress to write it)."""
    from capsem_vm.proxy.audit import AuditLog
    log = AuditLog(db)
    try:
        log.record(kernel_id, "policy", decision="change", code="policy-change", **fields)
    finally:
        log.close()


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".policy-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes", "on")


class NetworkHandler(CapsemHandler):
    @capsem_kernel_request
    async def get(self, kernel_id: str, prov):
        try:
            after = int(self.get_argument("after", "0"))
            limit = int(self.get_argument("limit", str(self.ext.max_rows)))
        except ValueError:
            raise web.HTTPError(400, "after and limit must be integers") from None
        db = self.ext.audit_db_path(prov)
        barrier = None
        if _flag(self.get_argument("barrier", "")):
            # every row caused before this request is written (docs/AUDIT.md): this server's
            # bridges and the proxy workers, on the loop that runs the VMs
            from capsem_vm.egress_runtime import process_runtime  # the provisioners' runtime
            barrier = await loop_thread.run(process_runtime().audit_barrier())
        result = await asyncio.get_running_loop().run_in_executor(
            None, lambda: network.query(db, kernel_id, after_id=after, blocked=_flag(self.get_argument("blocked", "")),
                                        host=self.get_argument("host", "")[:260], limit=min(limit, self.ext.max_rows)))
        result.update({"kernel_id": kernel_id, "capsem": True})
        if barrier is not None:
            result["barrier"] = barrier
        self.finish(json.dumps(result))


class EventsHandler(CapsemHandler):
    """Server-sent events. `state`: the facts, whenever state or accelerator change; `network`:
    {rows, total, blocked, last_id} with rows newer than ?after=ID (or Last-Event-ID); `gone` when
    the kernel is shut down (then the stream ends)."""

    closed = False

    def on_connection_close(self) -> None:
        self.closed = True

    async def send(self, event: str, data: dict, event_id: int | None = None) -> None:
        head = f"id: {event_id}\n" if event_id is not None else ""
        self.write(f"{head}event: {event}\ndata: {json.dumps(data)}\n\n")
        await self.flush()

    @capsem_kernel_request
    async def get(self, kernel_id: str, prov):
        try:
            after = int(self.request.headers.get("Last-Event-ID") or self.get_argument("after", "0"))
        except ValueError:
            raise web.HTTPError(400, "after must be an integer") from None
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        loop = asyncio.get_running_loop()
        last_seen, last_write = None, time.monotonic()
        try:
            self.write(": capsem events\n\n")
            await self.flush()
            while not self.closed:
                km = self.find_km(kernel_id)
                if km is None:
                    await self.send("gone", {"kernel_id": kernel_id, "state": "dead"})
                    break
                prov = capsem_provisioner(km)
                facts = kernel_facts(kernel_id, km)
                seen = (facts["state"], facts["accel"], facts["started_at"])
                if seen != last_seen:
                    last_seen = seen
                    await self.send("state", facts)
                    last_write = time.monotonic()
                db = self.ext.audit_db_path(prov)
                result = await loop.run_in_executor(
                    None, lambda: network.query(db, kernel_id, after_id=after, limit=self.ext.max_rows))
                if result["rows"]:
                    after = result["last_id"]
                    await self.send("network", result, event_id=after)
                    last_write = time.monotonic()
                elif time.monotonic() - last_write > self.ext.keepalive_interval:
                    self.write(": keep-alive\n\n")
                    await self.flush()
                    last_write = time.monotonic()
                await asyncio.sleep(self.ext.poll_interval)
        except StreamClosedError:
            return
        if not self.closed:
            self.finish()


def routes(base_url: str) -> list[tuple[str, type]]:
    def url(path: str) -> str:
        return url_path_join(base_url, "capsem", path)

    return [
        (url("kernels/?"), KernelsHandler),
        (url(f"kernels/{KERNEL_ID}/?"), KernelFactsHandler),
        (url(f"kernels/{KERNEL_ID}/policy/?"), PolicyHandler),
        (url(f"kernels/{KERNEL_ID}/allow/?"), AllowHandler),
        (url(f"kernels/{KERNEL_ID}/network/?"), NetworkHandler),
        (url(f"kernels/{KERNEL_ID}/events/?"), EventsHandler),
    ]
