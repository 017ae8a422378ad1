"""Type aliases for grpc.aio objects that grpc-stubs declares generic."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

# The call context every servicer method and the interceptor receive. Request
# and response types vary per method, so they are left open.
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

if TYPE_CHECKING:
    ServerInterceptor: TypeAlias = grpc.aio.ServerInterceptor[Any, Any]
else:
    # Not subscriptable at runtime (unlike ServicerContext).
    ServerInterceptor = grpc.aio.ServerInterceptor
