"""Client helpers for booking-service.

The generated API lives in ``booking.v1`` (``appointment_pb2``,
``appointment_pb2_grpc``, ...); this package adds a channel with the
recommended service config, error-detail decoding and a resumable event
consumer, and a Session that carries read-your-writes tokens.
"""

from booking_client.channel import (
    DefaultTimeouts,
    bearer,
    channel_options,
    insecure_channel,
    new_request_id,
    secure_channel,
    service_config,
)
from booking_client.consistency import Session
from booking_client.errors import ErrorDetails, FieldViolation, error_details
from booking_client.events import (
    Backoff,
    Checkpoint,
    CursorExpired,
    EventConsumer,
    FileCheckpoint,
    MemoryCheckpoint,
)

__all__ = [
    "Backoff",
    "Checkpoint",
    "CursorExpired",
    "DefaultTimeouts",
    "ErrorDetails",
    "EventConsumer",
    "FieldViolation",
    "FileCheckpoint",
    "MemoryCheckpoint",
    "Session",
    "bearer",
    "channel_options",
    "error_details",
    "insecure_channel",
    "new_request_id",
    "secure_channel",
    "service_config",
]
