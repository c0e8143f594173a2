"""``lorabuild serve``: a local web dashboard over the build (Starlette + uvicorn).

A view over the build, not a second build system: status, plan, validation, captions and
the live training file all come from the code the CLI runs; builds are ``doit`` targets.
"""
from __future__ import annotations

import sys
from pathlib import Path


def cmd_serve(root: Path, host: str, port: int, open_browser: bool) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        print(f"lorabuild serve: {exc.name} is not installed: pip install 'starlette>=1.10,<2' 'uvicorn>=0.54'",
              file=sys.stderr)
        return 1
    if not (root / "projects").is_dir():
        print(f"lorabuild serve: {root} is not a workspace (no projects/ folder): run it where dodo.py is",
              file=sys.stderr)
        return 1
    app = create_app(root, host)
    guard = app.state.guard
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={guard.token}" if guard.token else "")
    if guard.token:
        print(f"lorabuild serve: {host} is reachable from the network; every request needs this token:\n"
              f"  {guard.token}\nopen {url}", flush=True)
    else:
        print(f"lorabuild serve: the dashboard of {root} is at {url} (Ctrl-C stops it)", flush=True)
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(1.0, webbrowser.open, [url]).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
