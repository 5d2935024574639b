"""Server-sent events of one command's output: the event format, flow control, the pump.

`serve_stream` writes ``output`` events (each id is the next byte offset, so a client
resumes with Last-Event-ID) until the command is final and every stored byte was
sent, then one ``final`` event. It waits on an `OutputWatch` between reads and
pauses while the client's socket is backed up (`FlowControl`), so one slow reader
never makes the daemon buffer a whole log.

It never reads a request body, never blocks the reactor, and always unsubscribes
its watch and unregisters its producer when the client goes away.
"""

# test-case-name: tests.daemon.test_api

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from myxd.api.gate import request_id
from myxd.api.inputs import json_bytes
from myxd.api.serialize import FINAL_STATUSES, chunk_json
from myxd.api.watch import OutputWatch, Subscribable

if TYPE_CHECKING:
    from myxd.store.protocols import AdminStore as Store

__all__ = ["FlowControl", "serve_stream", "sse_event"]

READ_BYTES = 256 * 1024
log = Logger()


def sse_event(event: str, data: Any, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: ".encode() + json_bytes(data) + b"\n\n"


@implementer(IPushProducer)
class FlowControl:
    """Lets the SSE writer wait while the client's socket is backed up."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self._waiter: Deferred[None] | None = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._release()

    def stopProducing(self) -> None:
        self.stopped = True
        self._release()

    def _release(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    def ready(self) -> Deferred[None]:
        if not self.paused or self.stopped:
            return succeed(None)
        self._waiter = Deferred()
        return self._waiter


class _Stream:
    def __init__(
        self, request: IRequest, store: Store, watch: OutputWatch, keepalive: float
    ) -> None:
        self.request = request
        self.store = store
        self.watch = watch
        self.keepalive = keepalive
        self.flow = FlowControl()
        self.closed = False

    def gone(self, _: object) -> None:
        self.closed = True
        self.watch.close()
        self.flow.stopProducing()

    async def pump(self, command_id: int, offset: int) -> None:
        request, store = self.request, self.store
        while not self.closed:
            chunks = await store.read_output(command_id, offset, READ_BYTES)
            for chunk in chunks:
                if self.closed:
                    return
                end = chunk.offset + len(chunk.data)
                request.write(sse_event("output", chunk_json(chunk), end))
                offset = end
            if chunks:
                await self.flow.ready()
                continue
            rec = await store.get_command(command_id)
            if self.closed:
                return
            if rec is None:
                request.write(sse_event("error", {"error": "command deleted"}))
                return
            if rec.status in FINAL_STATUSES and offset >= rec.output_offset:
                final = {
                    "id": rec.id,
                    "status": rec.status,
                    "exit_code": rec.exit_code,
                    "reason": rec.reason,
                    "output_offset": rec.output_offset,
                    "finished_at": rec.finished_at,
                }
                request.write(sse_event("final", final, offset))
                return
            woke = await self.watch.wait(self.keepalive)
            if not woke and not self.closed:
                request.write(b": keepalive\n\n")


async def serve_stream(
    request: IRequest,
    store: Store,
    queue: Subscribable,
    reactor: IReactorTime,
    command_id: int,
    offset: int,
    keepalive: float,
) -> bytes:
    """Stream `command_id`'s output from `offset` as SSE; returns when done or gone."""
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
    request.setHeader(b"x-accel-buffering", b"no")
    if request.method == b"HEAD":
        return b""
    stream = _Stream(request, store, OutputWatch(queue, command_id, reactor), keepalive)
    request.notifyFinish().addBoth(stream.gone)  # type: ignore[attr-defined]
    request.registerProducer(stream.flow, True)  # type: ignore[attr-defined]
    try:
        request.write(b"retry: 1000\n\n")
        await stream.pump(command_id, offset)
    except CancelledError:
        raise
    except Exception:
        log.failure(
            "event stream {request_id} for command {command_id} failed",
            request_id=request_id(request),
            command_id=command_id,
        )
        if not stream.closed:
            error = {"error": "internal error", "request_id": request_id(request)}
            request.write(sse_event("error", error))
    finally:
        stream.watch.close()
        # After a disconnect the channel is gone (and the producer with it).
        if getattr(request, "channel", None) is not None:
            request.unregisterProducer()  # type: ignore[attr-defined]
    return b""
