"""A request error across gRPC: INVALID_ARGUMENT, with the offending field in the trailers.

Workers answer what a client got wrong with INVALID_ARGUMENT (a request that
can never fit their pool included), and the coordinator turns it back into an
`InvalidRequestError` naming the same `param`, which becomes a 400.
"""

from __future__ import annotations

import grpc

from disagg.errors import InvalidRequestError

PARAM_KEY = "disagg-param"


async def abort_invalid(context: grpc.aio.ServicerContext, error: InvalidRequestError) -> None:
    """End the RPC with INVALID_ARGUMENT; raises, like `context.abort`."""
    metadata = ((PARAM_KEY, error.param),) if error.param else ()
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error), trailing_metadata=metadata)


def invalid_request(error: grpc.aio.AioRpcError, default_param: str) -> InvalidRequestError:
    """The InvalidRequestError an INVALID_ARGUMENT answer stands for."""
    trailers = dict(error.trailing_metadata() or ())
    param = trailers.get(PARAM_KEY, default_param)
    return InvalidRequestError(error.details() or "invalid request", param)
