"""HTTP glue shared by both hosts: the status payload and the API argument check.

The WebUIs catch and log every exception a script raises, so a bad value in ``alwayson_scripts``
would otherwise only switch S-CFG off silently. ``ApiArgsCheck`` answers such a request with a
422 naming the parameter and its range before any sampling starts.
"""

from __future__ import annotations

import json

from . import __version__
from .params import ScfgParamError, from_script_args

GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
SCRIPT_TITLE = "s-cfg"


def api_args_error(payload: dict) -> str | None:
    """The error message for the S-CFG args of a txt2img/img2img request body, or None."""
    scripts = payload.get("alwayson_scripts") if isinstance(payload, dict) else None
    if not isinstance(scripts, dict):
        return None
    for title, entry in scripts.items():
        if str(title).lower() != SCRIPT_TITLE:
            continue
        if isinstance(entry, dict) and set(entry) - {"args"}:
            return (f"S-CFG's alwayson_scripts entry takes only 'args' (a list), got keys "
                    f"{sorted(map(str, entry))[:5]}")
        args = entry.get("args", []) if isinstance(entry, dict) else entry
        if not isinstance(args, (list, tuple)):
            return "S-CFG 'args' must be a list (positional, in UI order) or [ {named args} ]"
        try:
            from_script_args(list(args))
        except ScfgParamError as error:
            return str(error)
    return None


def status_payload(host: str, installed: list[str], last: dict, host_name: str = "") -> dict:
    """The body of GET /scfg/v1/status: host is the adapter family, host_name the WebUI."""
    return {
        "version": __version__,
        "host": host,
        "host_name": host_name or host,
        "hooks_installed": list(installed),
        "last_run": last["report"].as_dict(),
        "last_error": last.get("error"),
    }


class ApiArgsCheck:
    """Pure ASGI wrapper: 422 for bad S-CFG args on the generation endpoints, else pass through."""

    def __init__(self, app):
        self.app = app

    @classmethod
    def install(cls, app) -> list[str]:
        """Wrap the txt2img/img2img routes of a FastAPI app (the API is created before the WebUIs'
        app_started callbacks), so that no other request passes through S-CFG's code and S-CFG
        never appears in the traceback of an unrelated API error. Returns the paths wrapped."""
        wrapped = []
        for route in getattr(getattr(app, "router", None), "routes", []):
            if getattr(route, "path", None) in GENERATION_PATHS and "POST" in getattr(route, "methods", ()):
                if not isinstance(route.app, cls):
                    route.app = cls(route.app)
                wrapped.append(route.path)
        return wrapped

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" \
                or not scope.get("path", "").endswith(GENERATION_PATHS):
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            error = api_args_error(json.loads(body or b"{}"))
        except ValueError:
            error = None  # not JSON: the WebUI's own validation answers
        if error:
            content = json.dumps({"detail": error, "error": "ScfgParamError"}).encode()
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(content)).encode())]})
            await send({"type": "http.response.body", "body": content})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
