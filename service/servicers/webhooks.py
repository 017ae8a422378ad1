"""WebhookService: operators register the endpoints the dispatcher
(service/webhooks.py) delivers events to."""

from __future__ import annotations

import base64
import binascii
import secrets
from urllib.parse import urlsplit
from uuid import UUID

from booking.v1 import appointment_pb2 as apb
from booking.v1 import webhook_pb2 as pb
from booking.v1 import webhook_pb2_grpc
from service import auth, convert, pagination
from service.grpc_types import Context
from service.validation import Validator
from storage import webhooks as store
from storage.database import Database
from storage.models import EventType

MAX_URL = 2000
SECRET_PREFIX = "whsec_"
SECRET_BYTES = (24, 64)


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _secret(v: Validator, field: str, value: str) -> str:
    if not value:
        return new_secret()
    raw = value.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not value.startswith(SECRET_PREFIX) or not SECRET_BYTES[0] <= len(key) <= SECRET_BYTES[1]:
        v.fail(field, "whsec_ followed by the base64 of 24 to 64 random bytes")
    return value


def _url(v: Validator, value: str) -> str | None:
    url = v.text("url", value, max_length=MAX_URL)
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        ok = False
    if not ok or any(c.isspace() for c in url):
        v.fail("url", "an absolute http:// or https:// URL")
        return None
    return url


def endpoint(e: store.Endpoint) -> pb.WebhookEndpoint:
    wire = {t: apb.AppointmentEventType.ValueType(w) for w, t in convert.EVENT_TYPES.items()}
    return pb.WebhookEndpoint(
        id=str(e.id),
        url=e.url,
        event_types=sorted(wire[t] for t in e.event_types),
        enabled=e.enabled,
        disabled_reason=e.disabled_reason or "",
        failures=e.failures,
        last_error=e.last_error or "",
        delivered=e.delivered,
        secret_count=len(e.secrets),
        create_time=convert.timestamp(e.created_at),
        update_time=convert.timestamp(e.updated_at),
    )


class WebhookService(webhook_pb2_grpc.WebhookServiceServicer):
    def __init__(self, db: Database) -> None:
        self.db = db

    async def CreateWebhookEndpoint(
        self, request: pb.CreateWebhookEndpointRequest, context: Context
    ) -> pb.CreateWebhookEndpointResponse:
        caller = auth.current().require_user()
        v = Validator()
        url = _url(v, request.url)
        types: set[EventType] = set()
        for i, value in enumerate(request.event_types):
            t = v.enum(f"event_types[{i}]", value, convert.EVENT_TYPES, required=True)
            if t is not None:
                types.add(t)
        secret = _secret(v, "secret", request.secret)
        v.check()
        assert url is not None
        created = await store.create(
            self.db, url=url, event_types=frozenset(types), secret=secret, actor_id=caller.id
        )
        return pb.CreateWebhookEndpointResponse(webhook_endpoint=endpoint(created), secret=secret)

    async def GetWebhookEndpoint(
        self, request: pb.GetWebhookEndpointRequest, context: Context
    ) -> pb.GetWebhookEndpointResponse:
        endpoint_id = _id(request.id)
        return pb.GetWebhookEndpointResponse(
            webhook_endpoint=endpoint(await store.get(self.db, endpoint_id))
        )

    async def ListWebhookEndpoints(
        self, request: pb.ListWebhookEndpointsRequest, context: Context
    ) -> pb.ListWebhookEndpointsResponse:
        v = Validator()
        size = v.page_size(request.page_size)
        enabled = request.enabled if request.HasField("enabled") else None
        v.check()
        filters = ["webhook_endpoints", enabled]
        page = await store.list_(
            self.db,
            enabled=enabled,
            after=pagination.time_and_id(request.page_token, filters),
            limit=size,
        )
        return pb.ListWebhookEndpointsResponse(
            webhook_endpoints=[endpoint(e) for e in page.items],
            next_page_token=pagination.next_token(
                page, lambda item: [item.created_at.isoformat(), item.id], filters
            ),
        )

    async def RotateWebhookSecret(
        self, request: pb.RotateWebhookSecretRequest, context: Context
    ) -> pb.RotateWebhookSecretResponse:
        v = Validator()
        endpoint_id = v.uuid("id", request.id)
        secret = _secret(v, "secret", request.secret)
        v.check()
        assert endpoint_id is not None
        updated = await store.add_secret(
            self.db, endpoint_id, secret, retire_previous=request.retire_previous
        )
        return pb.RotateWebhookSecretResponse(webhook_endpoint=endpoint(updated), secret=secret)

    async def EnableWebhookEndpoint(
        self, request: pb.EnableWebhookEndpointRequest, context: Context
    ) -> pb.EnableWebhookEndpointResponse:
        updated = await store.enable(self.db, _id(request.id))
        return pb.EnableWebhookEndpointResponse(webhook_endpoint=endpoint(updated))

    async def DeleteWebhookEndpoint(
        self, request: pb.DeleteWebhookEndpointRequest, context: Context
    ) -> pb.DeleteWebhookEndpointResponse:
        await store.delete(self.db, _id(request.id))
        return pb.DeleteWebhookEndpointResponse()


def _id(value: str) -> UUID:
    v = Validator()
    endpoint_id = v.uuid("id", value)
    v.check()
    assert endpoint_id is not None
    return endpoint_id
