"""SpecialistService."""

from __future__ import annotations

from collections.abc import Iterable

from booking.v1 import specialist_pb2 as pb
from booking.v1 import specialist_pb2_grpc
from service import convert, pagination
from service.grpc_types import Context
from service.validation import Validator, field_mask_paths
from storage import specialists as store
from storage.database import Database
from storage.models import POLICY_FIELDS, BookingPolicy

# The largest value of each limit: a year of notice, ten years ahead, a year
# of cutoff.
POLICY_MAXIMUM = {
    "min_notice_minutes": 525_600,
    "max_advance_days": 3650,
    "cancellation_cutoff_hours": 8760,
}
POLICY_PATHS = {f"booking_policy.{name}": name for name in POLICY_FIELDS}
BUFFER_PATHS = ("buffer_before_minutes", "buffer_after_minutes")
UPDATE_PATHS = {
    "full_name",
    "service_type",
    "active",
    "time_zone",
    "booking_policy",
    *POLICY_PATHS,
    *BUFFER_PATHS,
}
MAX_BUFFER_MINUTES = 1440


def _buffer(v: Validator, field: str, value: int) -> int | None:
    if not 0 <= value <= MAX_BUFFER_MINUTES:
        v.fail(field, f"must be 0 to {MAX_BUFFER_MINUTES}")
        return None
    return value


def _policy(
    v: Validator, prefix: str, message: pb.BookingPolicy, names: Iterable[str]
) -> dict[str, int | None]:
    """The limits named, as set in `message` (None when unset: the default)."""
    out: dict[str, int | None] = {}
    for name in names:
        out[name] = (
            v.bounded(f"{prefix}.{name}", getattr(message, name), 0, POLICY_MAXIMUM[name])
            if message.HasField(name)  # type: ignore[arg-type]
            else None
        )
    return out


class SpecialistService(specialist_pb2_grpc.SpecialistServiceServicer):
    def __init__(self, db: Database) -> None:
        self.db = db

    async def CreateSpecialist(
        self, request: pb.CreateSpecialistRequest, context: Context
    ) -> pb.CreateSpecialistResponse:
        v = Validator()
        full_name = v.text("full_name", request.full_name)
        service_type = v.text("service_type", request.service_type, max_length=100)
        time_zone = v.time_zone("time_zone", request.time_zone)
        policy = _policy(v, "booking_policy", request.booking_policy, POLICY_FIELDS)
        before = _buffer(v, "buffer_before_minutes", request.buffer_before_minutes)
        after = _buffer(v, "buffer_after_minutes", request.buffer_after_minutes)
        v.check()
        created = await store.create(
            self.db,
            full_name=full_name.strip(),
            service_type=service_type.strip(),
            time_zone=time_zone,
            policy=BookingPolicy(**policy),
            buffer_before_minutes=before or 0,
            buffer_after_minutes=after or 0,
        )
        return pb.CreateSpecialistResponse(specialist=convert.specialist(created))

    async def GetSpecialist(
        self, request: pb.GetSpecialistRequest, context: Context
    ) -> pb.GetSpecialistResponse:
        v = Validator()
        specialist_id = v.uuid("id", request.id)
        v.check()
        found = await store.get(self.db, specialist_id)
        return pb.GetSpecialistResponse(specialist=convert.specialist(found))

    async def ListSpecialists(
        self, request: pb.ListSpecialistsRequest, context: Context
    ) -> pb.ListSpecialistsResponse:
        v = Validator()
        size = v.page_size(request.page_size)
        service_type = v.text("service_type", request.service_type, required=False, max_length=100)
        active = request.active if request.HasField("active") else None
        v.check()
        filters = ["specialists", service_type, active]
        page = await store.list_(
            self.db,
            service_type=service_type.strip() if service_type else None,
            active=active,
            after=pagination.time_and_id(request.page_token, filters),
            limit=size,
        )
        return pb.ListSpecialistsResponse(
            specialists=[convert.specialist(s) for s in page.items],
            next_page_token=pagination.next_token(
                page, lambda item: [item.created_at.isoformat(), item.id], filters
            ),
        )

    async def UpdateSpecialist(
        self, request: pb.UpdateSpecialistRequest, context: Context
    ) -> pb.UpdateSpecialistResponse:
        v = Validator()
        specialist_id = v.uuid("specialist.id", request.specialist.id)
        paths = field_mask_paths(list(request.update_mask.paths), UPDATE_PATHS, v)
        full_name = (
            v.text("specialist.full_name", request.specialist.full_name)
            if "full_name" in paths
            else None
        )
        service_type = (
            v.text("specialist.service_type", request.specialist.service_type, max_length=100)
            if "service_type" in paths
            else None
        )
        time_zone = (
            v.time_zone("specialist.time_zone", request.specialist.time_zone)
            if "time_zone" in paths
            else None
        )
        policy_names = [
            name
            for path, name in POLICY_PATHS.items()
            if path in paths or "booking_policy" in paths
        ]
        policy = _policy(
            v, "specialist.booking_policy", request.specialist.booking_policy, policy_names
        )
        buffers = {
            path: _buffer(v, f"specialist.{path}", getattr(request.specialist, path))
            for path in BUFFER_PATHS
            if path in paths
        }
        v.check()
        updated = await store.update(
            self.db,
            specialist_id,
            full_name=full_name.strip() if full_name else None,
            service_type=service_type.strip() if service_type else None,
            active=request.specialist.active if "active" in paths else None,
            time_zone=time_zone,
            policy=policy,
            buffer_before_minutes=buffers.get("buffer_before_minutes"),
            buffer_after_minutes=buffers.get("buffer_after_minutes"),
        )
        return pb.UpdateSpecialistResponse(specialist=convert.specialist(updated))
