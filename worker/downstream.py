"""The Forward stream from a stage to another worker: the next stage, or stage 0 for the
token ring."""

from __future__ import annotations

from collections.abc import Callable

from orchcore.chunks import Chunk
from orchcore.errors import OrchError
from orchcore.wire.channel import ForwardStream, Link, StreamClosedError


class DownstreamLink:
    """The Forward stream from this stage to the next one, open for the pipeline's life.

    It connects at the first message, as a plain channel would: a next stage that is not
    there yet, or no longer, is this stage's fault at its first send, not a failed load."""

    def __init__(self, address: str, token: str | None, connect: Callable[[str], Link]
                 ) -> None:
        self.address = address
        self._token = token
        self._connect = connect
        self._link: Link | None = None
        self._stream: ForwardStream | None = None

    def send(self, chunk: Chunk) -> None:
        try:
            if self._stream is None:
                self._link = self._connect(self.address)
                self._stream = ForwardStream(self._link.channel, self._token)
            self._stream.send(chunk)
        except OrchError as exc:
            raise StreamClosedError(f"next stage: {exc}") from None
        except StreamClosedError as exc:
            raise StreamClosedError(f"next stage {self.address} closed the stream: {exc}"
                                    ) from None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._link is not None:
            self._link.close()
