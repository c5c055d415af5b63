"""The HTTP limit: an aiohttp app whose one handler reads the body and answers 200.

Same framework, same event loop (uvloop when installed) and same response shape
as the bridge, so the bridge cannot be faster than this on the same machine.
Run: python -m bench.minimal --port 9000
"""

from __future__ import annotations

import argparse

from aiohttp import web

OK = b'{"status":"accepted"}'


async def callback(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=OK, content_type="application/json")


def create_app() -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/luma/callback/{token}", callback)
    return app


def serve(app: web.Application, host: str, port: int) -> None:
    """Serve `app` as every aiohttp target of the benchmark is served: no access log, on
    uvloop when it is installed (the bridge's own choice)."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop() if uvloop else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve(create_app(), args.host, args.port)


if __name__ == "__main__":
    main()
