import asyncio
import json

import pytest

from scfg_ext.report import RunReport
from scfg_ext.webapi import ApiArgsCheck, status_payload


def call(middleware, path, body, method="POST"):
    sent, chunks = [], [body[:5], body[5:]]

    async def receive():
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware({"type": "http", "method": method, "path": path}, receive, send))
    return sent


class EchoApp:
    async def __call__(self, scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def test_bad_args_get_422_before_the_webui_sees_them():
    bad = json.dumps({"alwayson_scripts": {"S-CFG": {"args": [{"enabled": True, "max_rate": 99}]}}}).encode()
    sent = call(ApiArgsCheck(EchoApp()), "/sdapi/v1/txt2img", bad)
    assert sent[0]["status"] == 422
    assert "'max_rate' must be in [0.0, 10.0]" in json.loads(sent[1]["body"])["detail"]


def test_good_args_and_other_routes_pass_through_with_the_body_intact():
    good = json.dumps({"prompt": "a cat", "alwayson_scripts": {"S-CFG": {"args": [True]}}}).encode()
    for path in ("/sdapi/v1/img2img", "/sdapi/v1/options"):
        sent = call(ApiArgsCheck(EchoApp()), path, good)
        assert sent[0]["status"] == 200 and sent[1]["body"] == good
    sent = call(ApiArgsCheck(EchoApp()), "/sdapi/v1/txt2img", b"not json")
    assert sent[1]["body"] == b"not json"


def test_only_the_generation_routes_are_wrapped_once():
    from types import SimpleNamespace

    def route(path, methods=("POST",)):
        return SimpleNamespace(path=path, methods=set(methods), app=EchoApp())

    routes = [route("/sdapi/v1/txt2img"), route("/sdapi/v1/img2img"), route("/sdapi/v1/options"),
              route("/sdapi/v1/txt2img", ("GET",))]
    app = SimpleNamespace(router=SimpleNamespace(routes=routes))
    assert ApiArgsCheck.install(app) == ["/sdapi/v1/txt2img", "/sdapi/v1/img2img"]
    assert ApiArgsCheck.install(app) == ["/sdapi/v1/txt2img", "/sdapi/v1/img2img"]
    assert [type(r.app).__name__ for r in routes] == ["ApiArgsCheck", "ApiArgsCheck", "EchoApp", "EchoApp"]
    assert isinstance(routes[0].app.app, EchoApp)  # not wrapped twice


def test_status_payload_and_report():
    report = RunReport(host="a1111")
    import torch
    report.step_applied(torch.tensor([0.8, 1.2]))
    report.step_applied(torch.tensor([1.0, 3.0]))
    report.fallback("no uncond pass")
    report.fallback("capture failed: boom", warn=True)
    report.fallback("capture failed: boom", warn=True)
    body = status_payload("a1111", ["attn2 input_blocks.7"], {"report": report, "error": None})
    assert body["hooks_installed"] == ["attn2 input_blocks.7"]
    assert body["last_run"]["steps_applied"] == 2
    assert body["last_run"]["steps_fallback"] == {"no uncond pass": 1, "capture failed: boom": 2}
    assert body["last_run"]["rate"] == pytest.approx({"min": 0.8, "mean": 1.5, "max": 3.0})
    assert report.warning_text() == "capture failed: boom (2 steps)"


def test_a_warning_is_logged_once_per_reason(caplog):
    report = RunReport()
    for _ in range(3):
        report.fallback("shape mismatch", warn=True)
    assert sum("shape mismatch" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("entry, named", [({"strength": 2}, "strength"), ({"args": [True], "x": 1}, "x"),
                                          ("on", "list"), (None, "list")])
def test_a_malformed_script_entry_is_refused_not_run_with_defaults(entry, named):
    from scfg_ext.webapi import api_args_error

    error = api_args_error({"alwayson_scripts": {"s-cfg": entry}})
    assert error and named in error
    assert api_args_error({"alwayson_scripts": {"S-CFG": {"args": [True]}}}) is None
    assert api_args_error({"alwayson_scripts": {"S-CFG": {}}}) is None  # the WebUI's own defaults
