"""CalendarFeedService: make, rotate and revoke calendar feed tokens. The
feeds themselves are served over HTTP (service/calendar_feed.py)."""

from __future__ import annotations

from booking.v1 import calendar_pb2 as pb
from booking.v1 import calendar_pb2_grpc
from service import auth, convert
from service.calendar_feed import feed_path
from service.errors import PermissionDenied
from service.grpc_types import Context
from service.validation import Validator
from storage import feeds as store
from storage.database import Database
from storage.models import Role


def _subject(
    request: pb.RotateCalendarFeedTokenRequest | pb.RevokeCalendarFeedTokenRequest,
) -> store.Subject:
    """The feed the request names, once the caller may touch it: a CLIENT
    only its own user feed (checked before anything is looked up)."""
    caller = auth.current().require_user()
    v = Validator()
    which = request.WhichOneof("subject")
    user_id = specialist_id = None
    if which == "specialist_id":
        specialist_id = v.uuid("specialist_id", request.specialist_id)
    elif which == "user_id":
        user_id = v.uuid("user_id", request.user_id)
    v.check()
    if specialist_id is None and user_id is None:
        user_id = caller.id
    if caller.role is Role.CLIENT:
        if specialist_id is not None:
            raise PermissionDenied(detail="only staff manage a specialist's calendar feed")
        if user_id != caller.id:
            raise PermissionDenied(detail="a CLIENT may only manage its own calendar feed")
    return store.Subject(user_id=user_id, specialist_id=specialist_id)


class CalendarFeedService(calendar_pb2_grpc.CalendarFeedServiceServicer):
    def __init__(self, db: Database) -> None:
        self.db = db

    async def RotateCalendarFeedToken(
        self, request: pb.RotateCalendarFeedTokenRequest, context: Context
    ) -> pb.RotateCalendarFeedTokenResponse:
        subject = _subject(request)
        token, rotated_at = await store.rotate(
            self.db, subject, actor_id=auth.current().require_user().id
        )
        return pb.RotateCalendarFeedTokenResponse(
            token=token, path=feed_path(token), rotate_time=convert.timestamp(rotated_at)
        )

    async def RevokeCalendarFeedToken(
        self, request: pb.RevokeCalendarFeedTokenRequest, context: Context
    ) -> pb.RevokeCalendarFeedTokenResponse:
        await store.revoke(self.db, _subject(request))
        return pb.RevokeCalendarFeedTokenResponse()
