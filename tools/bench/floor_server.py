"""The booking server as the bench runs it: the production server (same
configuration, pool, interceptor, authentication and per-RPC log line)
plus one bench-only RPC, the database floor.

    python -m bench.floor_server serve --host 127.0.0.1 --port 0

`/booking.bench.v1.BenchFloor/RoundTrip` makes exactly one asyncpg round
trip of a trivial statement through the server's own `Database` and
answers a health-check message. It goes the way HoldSlot's one statement
goes (storage/requests.py call): a single-statement write, stamped with
the write's time bound as its one-time filter, its own implicit
transaction. (Sent as `db.fetchval(..., intent=Intent.WRITE)` it would be
a stamped BEGIN, the statement and a COMMIT: three round trips, the floor
the 2026-12-07 run measured.) Its server CPU per call is what any RPC
that reads or writes the database costs at least, so HoldSlot and
ListSlots are compared with it (docs/performance.md, "floor"). The RPC and
its access policy exist only in this process: `service.cli serve` never
registers them.
"""

from __future__ import annotations

import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from service import cli
from service.auth import Authenticator
from service.event_hub import EventHub
from service.policy import POLICIES, STAFF, Policy
from service.server import BookingServer
from storage.database import Connection, Database, Intent, stamped

SERVICE = "booking.bench.v1.BenchFloor"
METHOD = f"/{SERVICE}/RoundTrip"
# The statement of the round trip: parsed, planned and answered, nothing read.
STATEMENT = "SELECT 1"


def handler(db: Database) -> grpc.GenericRpcHandler[Any, Any]:
    async def work(conn: Connection) -> Any:
        statement, values = stamped(STATEMENT, ())
        return await conn.fetchval(statement, *values)

    async def round_trip(request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        await db.run(work, intent=Intent.WRITE, single_statement=True)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "RoundTrip": grpc.unary_unary_rpc_method_handler(
                round_trip,
                request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
            )
        },
    )


class FloorServer(BookingServer):
    """The booking server with the floor RPC added to its gRPC server."""

    def _build(self, db: Database, hub: EventHub, authenticator: Authenticator) -> grpc.aio.Server:
        server = super()._build(db, hub, authenticator)
        server.add_generic_rpc_handlers((handler(db),))
        return server


def main(argv: list[str] | None = None) -> int:
    # Staff may call it, as they may HoldSlot: the same token lookup runs.
    POLICIES[METHOD] = Policy(STAFF, note="bench only: one database round trip")
    setattr(cli, "BookingServer", FloorServer)  # noqa: B010 - replaces the class _serve builds
    return cli.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
