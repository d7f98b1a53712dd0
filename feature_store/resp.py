"""Bulk SETs written as raw RESP on one connection, with the next chunk in flight.

redis-py's pipeline costs ~10 us of Python per command (command objects, packing, one
parser call per reply); a bulk load of a million users would spend most of its time
there. Here a chunk's commands are formatted into one buffer (one bytes format per key)
and sent; the replies are parsed by hiredis in C, and only after the *next* chunk has
been sent. The socket writes run in a sender thread: a 1 MB chunk does not fit the
socket buffers, so `sendall` blocks until Redis has read most of it, and on the
caller's thread that wait would stop Python from building the next chunk (measured:
Redis then idles while Python formats, and the two costs add up instead of
overlapping). A cluster client is not handled here (loader.set_values uses redis-py's
cluster pipeline instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import hiredis
import redis


def format_sets(keys: Sequence[str], data: bytes, offsets: Sequence[int], ex: int = 0) -> bytes:
    """RESP for `SET keys[i] data[offsets[i]:offsets[i+1]] [EX ex]`, all in one buffer."""
    view = memoryview(data)
    argc = b"*5\r\n" if ex > 0 else b"*3\r\n"
    tail = b"\r\n$2\r\nEX\r\n$%d\r\n%d\r\n" % (len(str(ex)), ex) if ex > 0 else b"\r\n"
    parts: list = []
    for i, key in enumerate(keys):
        k = key.encode()
        a, b = offsets[i], offsets[i + 1]
        parts.append(b"%s$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (argc, len(k), k, b - a))
        parts.append(view[a:b])
        parts.append(tail)
    return b"".join(parts)


def format_command(*args: str | bytes | int) -> bytes:
    """One command as RESP (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class SetWriter:
    """Send chunks of SETs; `send` returns once the chunk before it is written and the one
    before that is confirmed, so at most two chunks are unconfirmed at any time.

    Use as a context manager: leaving it reads the last replies; the connection is
    closed afterwards (never handed back to the pool half-read). The first error reply
    (or a lost connection) raises `redis.ResponseError` (`ConnectionError`) from the next
    `send` or from `flush`, after all replies of its chunk were read.
    """

    def __init__(self, client: redis.Redis):
        self._pool = client.connection_pool
        self._conn = self._pool.get_connection()
        self._conn.connect()
        self._reader = hiredis.Reader()
        self._in_flight = 0  # replies owed for the last chunk handed to the sender
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="bulk-set-sender")
        self._writing: Future | None = None  # the sender's current job

    def send(self, keys: Sequence[str], data: bytes, offsets: Sequence[int], ex: int = 0, then: bytes = b"") -> None:
        """Send the SETs, then `then` (one command from `format_command`, e.g. a progress record).

        Redis runs one connection's commands in order, so `then` runs after every SET of
        the chunk: a progress record written this way never claims an unwritten chunk.
        """
        buffer = format_sets(keys, data, offsets, ex)  # while the sender writes the previous chunk
        self._wait()
        previous, self._in_flight = self._in_flight, len(keys) + (1 if then else 0)
        self._writing = self._sender.submit(self._write, buffer, then, previous)

    def _write(self, buffer: bytes, then: bytes, confirm: int) -> None:
        """(sender thread) Write a chunk, then read the replies of the chunk before it."""
        sock = self._conn._sock  # redis-py's socket, with its timeouts
        sock.sendall(buffer)
        if then:
            sock.sendall(then)
        self._collect(confirm)

    def _wait(self) -> None:
        job, self._writing = self._writing, None
        if job is not None:
            job.result()  # re-raises the sender's error here

    def flush(self) -> None:
        self._wait()
        n, self._in_flight = self._in_flight, 0
        self._collect(n)

    def _collect(self, n: int) -> None:
        sock = self._conn._sock
        error = None
        got = 0
        while got < n:
            reply = self._reader.gets()
            if reply is False:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise redis.ConnectionError("Redis closed the connection during a bulk write")
                self._reader.feed(chunk)
                continue
            got += 1
            if isinstance(reply, hiredis.ReplyError) and error is None:
                error = reply
        if error is not None:
            raise redis.ResponseError(str(error))

    def close(self) -> None:
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - closing after a failure: the connection is dropped anyway
            pass
        self._sender.shutdown(wait=True)
        self._conn.disconnect()
        self._pool.release(self._conn)

    def __enter__(self) -> "SetWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()
