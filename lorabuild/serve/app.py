"""The Starlette application behind ``lorabuild serve``: a JSON API, server-sent events, the
workspace's files (guarded) and the page (plain JS, shipped in the package)."""
from __future__ import annotations

import asyncio
import json
import mimetypes
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..workspace import Workspace
from . import views
from .builds import BuildQueue, QueueError
from .security import Guard, GuardMiddleware, Refused, safe_path

STATIC = Path(__file__).parent / "static"
SERVED = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".txt", ".json", ".csv", ".html", ".log"}
TICK = 1.0  # seconds between looks at the live files for the event stream


def create_app(root: Path, host: str = "127.0.0.1", run_queue: bool = True, token: str | None = None) -> Starlette:
    root = Path(root).resolve()
    guard = Guard(host, token)
    queue = BuildQueue(root, run=run_queue)

    def api(fn):
        """A JSON route whose work (file reads, doit's database) runs off the event loop."""
        async def endpoint(request: Request):
            body = await request.json() if request.method in ("POST", "PUT") else {}
            if not isinstance(body, dict):
                return JSONResponse({"error": "the request body must be a JSON object"}, status_code=400)
            try:
                return JSONResponse(await run_in_threadpool(fn, request.path_params, body))
            except views.ViewError as exc:
                return JSONResponse({"error": str(exc)}, status_code=exc.status)
            except QueueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        return endpoint

    async def index(request: Request):
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("{{CSRF}}", guard.csrf))

    def serve_file(path: Path):
        if path.suffix.lower() not in SERVED:
            raise Refused(403, f"{path.name}: the dashboard serves images, text and logs only")
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})

    async def files(request: Request):
        rel = request.path_params["path"]
        ws = Workspace(root)
        roots = [ws.output, ws.cache]
        for name in views.project_names(root):
            try:
                roots += views.dataset_roots(root, name)[1]
            except views.ViewError:
                pass
        try:
            return serve_file(safe_path(rel, roots, root))
        except Refused as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def dataset_file(request: Request):
        try:
            base, roots = views.dataset_roots(root, request.path_params["name"])
            return serve_file(safe_path(request.path_params["path"], roots, base))
        except Refused as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except views.ViewError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def events(request: Request):
        """Server-sent events: the queue, each project's live training (new loss rows only)
        and its samples' stamp, whenever one of them changed."""
        async def stream():
            sent_rows: dict[str, int] = {}
            last: dict[str, str] = {}
            while not await request.is_disconnected():
                for kind, name, data in await run_in_threadpool(_snapshot, root, queue, sent_rows):
                    text = json.dumps(data)
                    if last.get(f"{kind}:{name}") != text:
                        last[f"{kind}:{name}"] = text
                        yield f"event: {kind}\ndata: {text}\n\n"
                yield ": tick\n\n"  # keeps proxies from closing the stream and notices a gone client
                await asyncio.sleep(TICK)
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    p = "/api/projects/{name}"
    routes = [
        Route("/", index),
        Route("/api/projects", api(lambda a, b: {"projects": views.project_names(root)})),
        Route(p, api(lambda a, b: views.overview(root, a["name"]))),
        Route(p + "/samples", api(lambda a, b: views.samples(root, a["name"]))),
        Route(p + "/dataset", api(lambda a, b: views.dataset(root, a["name"]))),
        Route(p + "/caption", api(lambda a, b: views.write_caption(root, a["name"], b.get("id"), b.get("text"),
                                                                   b.get("expected"))), methods=["PUT"]),
        Route(p + "/yaml", api(lambda a, b: views.yaml_text(root, a["name"]))),
        Route(p + "/yaml", api(lambda a, b: views.save_yaml(root, a["name"], str(b.get("text", "")),
                                                            str(b.get("sha", "")))), methods=["PUT"]),
        Route(p + "/validate", api(lambda a, b: {"problems": views.validate_text(root, a["name"],
                                                                                 str(b.get("text", "")))}),
              methods=["POST"]),
        Route("/api/schema", api(lambda a, b: _schema())),
        Route("/api/queue", api(lambda a, b: {"entries": queue.entries()})),
        Route("/api/queue", api(lambda a, b: queue.add(str(b.get("target", "")))), methods=["POST"]),
        Route("/api/queue/{id}/stop", api(lambda a, b: {"result": queue.stop(a["id"])}), methods=["POST"]),
        Route("/api/queue/{id}/log", api(lambda a, b: {"log": queue.log(a["id"])})),
        Route("/api/events", events),
        Route("/files/{path:path}", files),
        Route("/dataset/{name}/{path:path}", dataset_file),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]

    @asynccontextmanager
    async def lifespan(app):
        queue.start()
        yield
        await run_in_threadpool(queue.shutdown)

    app = Starlette(routes=routes, middleware=[Middleware(GuardMiddleware, guard=guard)], lifespan=lifespan)
    app.state.guard, app.state.queue = guard, queue
    return app


def _schema() -> dict:
    from ..config import schema

    return schema()


def _snapshot(root: Path, queue: BuildQueue, sent_rows: dict[str, int]) -> list[tuple[str, str, dict]]:
    out = [("queue", "", {"entries": queue.entries()})]
    for name in views.project_names(root):
        lv = views.live(root, name)
        if lv is not None:
            rows = lv.pop("loss")
            start = sent_rows.get(name, 0)
            if start > len(rows):
                start = 0  # a new run: the page starts its chart again
            lv["rows_from"], lv["rows"] = start, rows[start:]
            sent_rows[name] = len(rows)
            out.append(("live", name, {"project": name, **lv}))
    # a sample folder's mtime moves when an image lands in it (each is renamed into place)
    stamps = {d.parent.name: d.stat().st_mtime for d in (Path(root) / "output").glob("*/samples") if d.is_dir()}
    out.append(("samples", "", stamps))
    return out
