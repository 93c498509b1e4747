"""The one authentication and authorization interceptor every maas server installs (unless ``--insecure``).

A caller is identified, in this order, by:
- the internal token (``authorization: Bearer <internal token>``): one of the mesh's own services, where a
  deployment gives them a shared token instead of certificates;
- an API key (``authorization: Bearer maas_<id>_<secret>``): a tenant's key with its role;
- with no ``authorization`` header, a client certificate the server verified against the mesh's CA (mutual
  TLS: the workers' and shards' servers, and the internal listeners of the registry and the scheduler): the
  service named by the certificate.
Then the service's authorization table decides: an RPC without a rule is refused. Every call that may change
state (a developer's or admin's RPC not marked free of side effects in its proto) is written to the audit
log, ``maas.audit``: who, which tenant, which RPC, on what, and how it ended.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any

import grpc
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool

from shared import errors
from shared.grpc.interceptors import Behavior, wrap_handler
from shared.names import check_name
from shared.security.access import (
    PUBLIC_SERVICES,
    TENANT_METADATA,
    Access,
    AuthorizationTable,
    Principal,
    current_authorization,
    current_principal,
)
from shared.security.keys import KeyStore
from shared.security.ratelimit import TenantLimits, TenantStreams

log = structlog.get_logger("maas.auth")
audit_log = structlog.get_logger("maas.audit")
# Request fields that name what a call acts on, in the order the audit log looks for them.
_TARGET_FIELDS = ("name", "model", "model_name", "job_id", "ref", "spec", "metadata")


def _audited(table: AuthorizationTable) -> frozenset[str]:
    """The RPCs of ``table`` the audit log records: a developer's or admin's, unless its proto says it has
    no side effects (reads, watches)."""
    pool = descriptor_pool.Default()
    audited = set()
    for path, access in table.items():
        if access not in (Access.DEVELOPER, Access.ADMIN):
            continue
        try:
            method = pool.FindMethodByName(path.lstrip("/").replace("/", "."))
        except KeyError:
            audited.add(path)
            continue
        if method.GetOptions().idempotency_level != descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS:
            audited.add(path)
    return frozenset(audited)


def _target(request: Any) -> str:
    for field in _TARGET_FIELDS:
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            return value
        for inner in ("name", "model", "version"):
            found = getattr(value, inner, None) if value is not None and not isinstance(value, str) else None
            if isinstance(found, str) and found:
                return found
    return ""


@dataclasses.dataclass(frozen=True)
class _Call:
    """The rule of one method; the caller is read from each call's metadata inside the call (so that the
    wrapped handler is made once per method, not per call, on every service's hot path)."""

    method: str
    access: Access | None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call and checks the service's authorization table.

    Args:
        table: ``/pkg.Service/Method`` -> the access it requires.
        keys: The tenants' API keys (None: no key is accepted).
        internal_token: The mesh's internal token (None: not accepted).
        trust_client_certs: The server verifies client certificates against the mesh's CA, so a verified
            certificate names a mesh service.
        limits: Per-tenant rate limits (None: none).
        max_streams_per_tenant: Streams one tenant may hold open at once on this server (None: no cap).
    """

    def __init__(
        self,
        table: AuthorizationTable,
        *,
        keys: KeyStore | None,
        internal_token: str | None,
        trust_client_certs: bool,
        limits: TenantLimits | None = None,
        max_streams_per_tenant: int | None = None,
        public: Iterable[str] = PUBLIC_SERVICES,
    ) -> None:
        self._table = dict(table)
        self._audited = _audited(self._table)
        self._keys = keys
        self._internal = internal_token.encode() if internal_token else None
        self._certs = trust_client_certs
        self._limits = limits
        self._streams = TenantStreams(max_streams_per_tenant)
        self._public = tuple(public)
        self._wrapped: dict[str, tuple[Any, Any]] = {}
        self._principals: dict[str, Principal] = {}

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.lstrip("/").startswith(self._public):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        call = _Call(method, self._table.get(method))
        wrapped = wrap_handler(handler, method, lambda b, rq, rs, _m: self._guard(b, rq, rs, call))
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _from_header(self, header: object) -> Principal | None:
        if not isinstance(header, str) or not header.startswith("Bearer "):
            return None
        presented = header.removeprefix("Bearer ").strip()
        # Constant-time: the time taken must not tell how much of the token matched.
        if self._internal is not None and hmac.compare_digest(self._internal, presented.encode()):
            return Principal.mesh_service("mesh")
        if self._keys is not None:
            key = self._keys.verify(presented)
            if key is not None:
                principal = self._principals.get(key.key_id)
                # Rebuilt whenever the key file says something else of the key (an edited role or grants).
                if (
                    principal is None
                    or principal.role is not key.role
                    or principal.tenant != key.tenant
                    or principal.grants != frozenset(key.grants)
                ):
                    principal = Principal(
                        name=f"key:{key.key_id}", tenant=key.tenant, role=key.role, grants=frozenset(key.grants)
                    )
                    self._principals[key.key_id] = principal
                return principal
        return None

    def _from_certificate(self, context: grpc.aio.ServicerContext) -> Principal | None:
        if not self._certs:
            return None
        auth = context.auth_context()
        names: list[bytes] = list(auth.get("x509_common_name") or [])
        # The server verified the certificate against the mesh's CA, which issues service certificates only.
        if auth.get("transport_security_type") != [b"ssl"] or len(names) != 1:
            return None
        return Principal.mesh_service(names[0].decode(errors="replace"))

    def _check(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        method, access = call.method, call.access
        header = acting_for = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value
            elif key == TENANT_METADATA:
                acting_for = value
        # A credential that was sent decides alone: a bad key on a call that also carries a mesh certificate
        # (the gateway forwarding a user's key) must not fall back to the certificate's identity.
        principal = self._from_header(header) if header is not None else self._from_certificate(context)
        if principal is None:
            raise errors.Unauthenticated(
                "missing, invalid or revoked credentials: send 'authorization: Bearer <API key>'"
            )
        if isinstance(acting_for, str) and acting_for and principal.is_admin:
            # The mesh's services and admin keys may act within one tenant; other keys are their tenant.
            principal = dataclasses.replace(principal, acting_for=check_name(acting_for, TENANT_METADATA))
        current_principal.set(principal)
        if access is None:
            log.warning("rpc_without_authorization_rule", rpc_method=method)
            raise errors.PermissionDenied(f"{method} is not open to any caller")
        if not principal.may(access):
            role = principal.role.value if principal.role is not None else "none"
            raise errors.PermissionDenied(f"{method} needs the {access.value} role; this key has {role}")
        if self._limits is not None:
            self._limits.check(principal, access)
        current_authorization.set(header if isinstance(header, str) else None)

    def _open_stream(self) -> str | None:
        principal = current_principal.get()
        return None if principal is None else self._streams.open(principal)

    def _counted(self, behavior: Behavior) -> Behavior:
        """A client-streaming call (an upload) held open counts against its tenant's streams."""

        async def counted(request: Any, context: Any) -> Any:
            held = self._open_stream()
            try:
                return await behavior(request, context)
            finally:
                self._streams.close(held)

        return counted

    def _audit(self, method: str, request: Any, outcome: str) -> None:
        principal = current_principal.get()
        audit_log.info(
            "audit",
            principal=principal.name if principal else "",
            tenant=principal.tenant if principal else "",
            rpc=method,
            target=_target(request),
            outcome=outcome,
        )

    def _guard(self, behavior: Behavior, req_stream: bool, resp_stream: bool, call: _Call) -> Behavior:
        method = call.method
        if resp_stream:

            async def stream_behavior(request: Any, context: Any) -> AsyncIterator[Any]:
                self._check(call, context)
                held = self._open_stream()
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    self._streams.close(held)

            return stream_behavior
        if req_stream:
            behavior = self._counted(behavior)

        audited = method in self._audited

        async def unary_behavior(request: Any, context: Any) -> Awaitable[Any]:
            if not audited:
                self._check(call, context)
                return await behavior(request, context)
            outcome = "OK"
            try:
                # Refusals are recorded too: who tried to change what.
                self._check(call, context)
                return await behavior(request, context)
            except BaseException as exc:
                outcome = getattr(exc, "reason", None) or type(exc).__name__
                raise
            finally:
                self._audit(method, request, outcome)

        return unary_behavior
