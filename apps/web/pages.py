"""Serving the pages: ``install(app, page, api_key)`` adds ``/`` (the page), ``/static/*`` (its files) and
the ``WebSecurity`` middleware to a FastAPI app — the one hook ``create_app`` and the camera app call."""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).with_name("static")
PAGES = {"chat": "chat.html", "camera": "camera.html"}


def install(app, page: str | None, api_key: str | None = None) -> None:
    """Serve ``page`` ("chat" / "camera", or None for the security middleware only) at ``/``."""
    from starlette.responses import FileResponse
    from starlette.staticfiles import StaticFiles

    from .security import WebSecurity

    if page is not None:
        html = STATIC / PAGES[page]

        async def index():
            return FileResponse(html, media_type="text/html", headers={"Cache-Control": "no-cache"})

        app.add_api_route("/", index, methods=["GET", "HEAD"], include_in_schema=False)
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(WebSecurity, api_key=api_key)
