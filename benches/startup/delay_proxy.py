#!/usr/bin/env python3
"""A TCP proxy that delays every byte by a fixed one-way delay in each direction, keeping
bandwidth and pipelining (data read at t is written at t + delay): network latency without
the kernel's netem qdisc, which this host lacks. Used by benches/startup/run.sh in the
registry's network namespace, in front of the registry.

Usage: delay_proxy.py LISTEN_HOST:PORT TARGET_HOST:PORT ONE_WAY_DELAY_MS
"""
import asyncio
import sys


async def pump(reader, writer, delay):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(1 << 18)
            if not data:
                break
            queue.put_nowait((loop.time() + delay, data))
    except (ConnectionError, OSError):
        pass
    queue.put_nowait((loop.time() + delay, None))
    try:
        await sender
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def handle(client_r, client_w, target, delay):
    host, port = target
    try:
        server_r, server_w = await asyncio.open_connection(host, port)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(
        pump(client_r, server_w, delay), pump(server_r, client_w, delay)
    )
    for w in (client_w, server_w):
        w.close()


async def main():
    lhost, lport = sys.argv[1].rsplit(":", 1)
    thost, tport = sys.argv[2].rsplit(":", 1)
    delay = float(sys.argv[3]) / 1000.0
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, (thost, int(tport)), delay), lhost, int(lport)
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
