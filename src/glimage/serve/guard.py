"""The HTTP app's outer guard (pure ASGI middleware): what every request goes through, whatever its route.

- The body: refused over `max_body` (413, announced or not) and when it does not arrive within `body_timeout`
  seconds of the headers (408): a slow client cannot hold a worker.
- Errors: every answer that is not a 2xx is OpenAI's JSON error body. An exception no handler took (a bug)
  becomes a JSON 500 logged once; a client that went away mid-body is counted (499) and not logged; a request
  the server stops waiting for (uvicorn's --drain-timeout ran out) gets a 503.
- Memory: after a request that ran, freed heap pages go back to the system (memory.trim).
- Metrics: every answer counted by route template (never the raw path: a scanner cannot grow the label set)
  and status.
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.requests import ClientDisconnect

from . import memory
from .api import ApiError

log = logging.getLogger("glimage.serve")


def error_response(e: ApiError) -> tuple[dict, bytes]:
    """An ASGI response start and body for `e`; ASCII JSON, so that no text it quotes (a lone surrogate) can fail
    to encode."""
    body = json.dumps(e.body(), ensure_ascii=True).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in e.headers.items()]
    return {"type": "http.response.start", "status": e.status, "headers": headers}, body


class Guard:
    def __init__(self, app, max_body: int, body_timeout: float, metrics):
        self.app, self.max_body, self.body_timeout, self.metrics = app, max_body, body_timeout, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"status": 0, "started": False, "sse": False}
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            self.metrics.reject("too_large")
            return await self._answer(scope, send, state, self._too_large())
        seen, done = 0, False
        deadline = asyncio.get_running_loop().time() + self.body_timeout

        async def limited():
            nonlocal seen, done
            if done:  # the body is in: what follows is waiting for a disconnect, as long as it takes
                return await receive()
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s", None,
                               "request_timeout") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if seen > self.max_body:  # a body longer than announced, or chunked: answered by the ApiError handler
                    raise self._too_large()
            return message

        async def counted(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                state["sse"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                   for k, v in message.get("headers", []))
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]
            await send(message)

        try:
            await self.app(scope, limited, counted)
        except ClientDisconnect:  # ordinary client behaviour: counted, never a traceback
            state["status"] = 499
            self.metrics.reject("disconnected")
        except asyncio.CancelledError:  # the drain timeout ran out: uvicorn cancels what still runs
            self.metrics.reject("shutdown")
            e = ApiError(503, "the server is shutting down; retry on another instance", None, "shutdown",
                         "server_error", {"Retry-After": "5", "Connection": "close"})
            if not state["started"]:
                await self._answer(scope, send, state, e)
            else:  # a stream: end it with OpenAI's error event instead of a cut connection
                event = b"" if not state["sse"] else \
                    f"event: error\ndata: {json.dumps({'type': 'error', **e.body()})}\n\n".encode()
                await send({"type": "http.response.body", "body": event, "more_body": False})
        except Exception:  # noqa: BLE001 - a bug: logged once with its traceback, answered in OpenAI's shape
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if state["started"]:
                raise
            await self._answer(scope, send, state, ApiError(
                500, "internal error; see the server's log", None, "internal_error", "server_error"))
        if scope.get("glimage.trim"):  # a request that ran: its buffers are freed now; return their pages
            asyncio.get_running_loop().run_in_executor(None, memory.trim)
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"  # the template (/v1/images/files/{name})
        self.metrics.requests.labels(endpoint, str(state["status"])).inc()

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than {self.max_body / 2**20:.0f} MiB", None,
                        "request_too_large")

    async def _answer(self, scope, send, state, e: ApiError) -> None:
        start, body = error_response(e)
        state["status"], state["started"] = e.status, True
        start["headers"].append((b"x-content-type-options", b"nosniff"))
        await send(start)
        await send({"type": "http.response.body", "body": body})
