"""Client streams that go quiet: a stream a client opened and stopped feeding holds the server's resources
(a temp file, a slot of its tenant's streams) until something ends it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import TypeVar

from shared.errors import DeadlineExceeded

T = TypeVar("T")


async def idle_timeout(messages: AsyncIterable[T], seconds: float, what: str) -> AsyncIterator[T]:
    """``messages`` as they come, ending the call with DEADLINE_EXCEEDED when none arrives for ``seconds``.

    ``what`` names the stream in the error ("the upload").
    """
    iterator = aiter(messages)
    while True:
        try:
            message = await asyncio.wait_for(anext(iterator), seconds)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise DeadlineExceeded(f"{what} sent nothing for {seconds:g} s and was ended") from None
        yield message
