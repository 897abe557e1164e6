"""The server's thread pools, each bounded and used for one kind of work.

    db     key-store calls (SQLite), so a locked database never blocks the event loop
    cpu    JSON parsing, base64 and image decoding of request bodies
    fetch  image URL fetches (each bounded by its own deadline)

The event loop never waits on a pool it does not need: the heartbeat has its own thread
(lease.py) and shutdown steps run in threads of their own (``in_thread``). ``run`` stops waiting
when the request is cancelled and drops the work if it has not started.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class Pools:
    def __init__(self, fetch_workers: int, cpu_workers: int = 2, db_workers: int = 2):
        self.db = ThreadPoolExecutor(db_workers, "sd3trt-db")
        self.cpu = ThreadPoolExecutor(cpu_workers, "sd3trt-cpu")
        self.fetch = ThreadPoolExecutor(fetch_workers, "sd3trt-fetch")

    def close(self) -> None:
        for pool in (self.fetch, self.cpu, self.db):
            pool.shutdown(wait=False, cancel_futures=True)


async def run(pool: ThreadPoolExecutor, fn: Callable, *args: Any) -> Any:
    fut = pool.submit(fn, *args)
    try:
        return await asyncio.wrap_future(fut)
    except asyncio.CancelledError:
        fut.cancel()  # not started: never runs
        raise


async def in_thread(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` in a new thread: for lifecycle steps that must not queue behind request work."""
    loop = asyncio.get_running_loop()
    fut: Future = Future()

    def target():
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            fut.set_exception(e)

    threading.Thread(target=target, name="sd3trt-lifecycle", daemon=True).start()
    return await asyncio.wrap_future(fut, loop=loop)
