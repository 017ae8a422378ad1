"""CalendarFeedService: make, rotate and revoke calendar feed tokens. The
feeds themselves are served over HTTP (service/calendar_feed.py)."""

from __future__ import annotations

from uuid import UUID

from booking.v1 import calendar_pb2 as pb
from booking.v1 import calendar_pb2_grpc
from service import auth, convert
from service.calendar_feed import feed_path
from service.errors import PermissionDenied
from service.grpc_types import Context
from service.policy import act_for
from service.validation import Validator
from storage import feeds as store
from storage.database import Database
from storage.models import Role

OWN_FEED = "manage its own calendar feed"


def _subject(
    request: pb.RotateCalendarFeedTokenRequest | pb.RevokeCalendarFeedTokenRequest,
) -> tuple[UUID | None, UUID | None]:
    """The (user, specialist) feed the request names, validated; a CLIENT
    may not name a specialist's feed (checked before anything is looked up).
    Neither named: the caller's own user feed."""
    caller = auth.current().require_user()
    v = Validator()
    which = request.WhichOneof("subject")
    user_id = specialist_id = None
    if which == "specialist_id":
        specialist_id = v.uuid("specialist_id", request.specialist_id)
    elif which == "user_id":
        user_id = v.uuid("user_id", request.user_id)
    v.check()
    if specialist_id is not None and caller.role is Role.CLIENT:
        raise PermissionDenied(detail="only staff manage a specialist's calendar feed")
    return user_id, specialist_id


class CalendarFeedService(calendar_pb2_grpc.CalendarFeedServiceServicer):
    def __init__(self, db: Database) -> None:
        self.db = db

    async def RotateCalendarFeedToken(
        self, request: pb.RotateCalendarFeedTokenRequest, context: Context
    ) -> pb.RotateCalendarFeedTokenResponse:
        user_id, specialist_id = _subject(request)
        caller = auth.current().require_user()
        # The ownership rule (service/policy.py): a CLIENT's own feed only.
        subject = store.Subject(
            user_id=None if specialist_id else act_for(caller, user_id, what=OWN_FEED),
            specialist_id=specialist_id,
        )
        token, rotated_at = await store.rotate(self.db, subject, actor_id=caller.id)
        return pb.RotateCalendarFeedTokenResponse(
            token=token, path=feed_path(token), rotate_time=convert.timestamp(rotated_at)
        )

    async def RevokeCalendarFeedToken(
        self, request: pb.RevokeCalendarFeedTokenRequest, context: Context
    ) -> pb.RevokeCalendarFeedTokenResponse:
        user_id, specialist_id = _subject(request)
        caller = auth.current().require_user()
        subject = store.Subject(
            user_id=None if specialist_id else act_for(caller, user_id, what=OWN_FEED),
            specialist_id=specialist_id,
        )
        await store.revoke(self.db, subject)
        return pb.RevokeCalendarFeedTokenResponse()
