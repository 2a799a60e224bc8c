"""The pages a person uses in a browser, served by the app itself (plain HTML + JS, no build step):

    GET /                  static/chat.html        a conversation with an instruction-tuned model
    GET /playground        static/playground.html  a prompt and its completion (any model)
    GET /static/client.js  static/client.js        what both share: settings, the API key,
                                                   streaming through fetch, errors in words
    GET /static/style.css  static/style.css        and their look

They call the same /v1/* endpoints as any client, with the API key typed into the page.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

STATIC = files("llm.serving") / "static"
PAGES = {"/": ("chat.html", "text/html"), "/playground": ("playground.html", "text/html"),
         "/static/client.js": ("client.js", "text/javascript"),
         "/static/style.css": ("style.css", "text/css")}


def add_pages(app: FastAPI) -> None:
    for path, (name, media_type) in PAGES.items():
        app.add_api_route(path, _page((STATIC / name).read_bytes(), media_type), methods=["GET"],
                          include_in_schema=False)


def _page(content: bytes, media_type: str):
    """An endpoint answering with `content` (read once: the files ship with the package)."""

    async def page() -> Response:
        return Response(content, media_type=f"{media_type}; charset=utf-8")

    return page
