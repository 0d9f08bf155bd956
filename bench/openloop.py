"""Open-loop load at a fixed rate, for latency at a given throughput (wrk2 is not in Debian).

Requests are scheduled at fixed instants whatever the server does, and each latency is counted
from its scheduled instant, so a stalled server shows in the tail instead of slowing the
generator down (no coordinated omission). At most `connections` requests are in flight;
connections are kept alive when the server allows it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from bench.results import LoadResult, percentile


@dataclass(frozen=True)
class Request:
    host: str
    port: int
    path: str
    body: bytes
    api_key: str

    def raw(self) -> bytes:
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {self.api_key}\r\n"
            f"Content-Length: {len(self.body)}\r\n\r\n"
        )
        return head.encode() + self.body


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def exchange(self, raw: bytes) -> tuple[int, bool]:
        """Sends one request; returns the status and whether the connection stays open."""
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])
        }
        if "content-length" in headers:
            await self.reader.readexactly(int(headers["content-length"]))
            return status, headers.get("connection", "").lower() != "close"
        await self.reader.read()
        return status, False

    def close(self) -> None:
        self.writer.close()


@dataclass
class _Generator:
    request: Request
    connections: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    idle: list[_Connection] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.connections)
        self.raw = self.request.raw()

    async def one(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        async with self.slots:
            outcome = await self._exchange()
            if outcome is None:
                self.errors += 1
                return
            self.latencies.append(loop.time() - due)
            self.errors += outcome >= 400

    async def _exchange(self) -> int | None:
        """The response status, or None when the request failed. A kept-alive connection that
        the server has meanwhile closed is replaced once, as any HTTP client would."""
        if self.idle:
            status = await self._try(self.idle.pop())
            if status is not None:
                return status
        try:
            conn = await self._open()
        except OSError:
            return None
        return await self._try(conn)

    async def _try(self, conn: _Connection) -> int | None:
        try:
            status, keep = await conn.exchange(self.raw)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            conn.close()
            return None
        self._put_back(conn, keep)
        return status

    def _put_back(self, conn: _Connection, keep: bool) -> None:
        if keep:
            self.idle.append(conn)
        else:
            conn.close()

    async def _open(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.request.host, self.request.port)
        return _Connection(reader, writer)


async def _drive(gen: _Generator, rate: float, seconds: float) -> LoadResult:
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    tasks: set[asyncio.Task[None]] = set()
    for i in range(int(rate * seconds)):
        due = start + i / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        task = asyncio.create_task(gen.one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    for conn in gen.idle:
        conn.close()
    ordered = sorted(gen.latencies)
    return LoadResult(
        requests=len(ordered),
        seconds=elapsed,
        p50_ms=percentile(ordered, 0.50) * 1000,
        p99_ms=percentile(ordered, 0.99) * 1000,
        errors=gen.errors,
    )


def fixed_rate_run(
    *, request: Request, rate: float, seconds: float, connections: int
) -> LoadResult:
    async def main() -> LoadResult:
        return await _drive(_Generator(request, connections), rate, seconds)

    return asyncio.run(main())
