"""The HTTP calls the end-to-end suites make to a running WebUI (stdlib only)."""

import json
import urllib.error
import urllib.request


def api_call(base: str, path: str, body=None, timeout: float = 900):
    """GET (no body) or POST JSON to ``base + path``: (status code, decoded JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def hires_modules(body: dict, host: str, modules=("Use same choices",)) -> dict:
    """``body`` with the hr_additional_modules field that Forge 2 (status host "forge") needs on a
    hires request (a 500 error without it); the A1111 and ldm_patched hosts know no such field."""
    body = {k: v for k, v in body.items() if k != "hr_additional_modules"}
    if body.get("enable_hr") and host == "forge":
        body["hr_additional_modules"] = list(modules)
    return body


def checkpoint_titles(models: list[dict], name: str) -> list[str]:
    """Titles of /sdapi/v1/sd-models entries whose file is ``name``.safetensors, in a subfolder or not
    (A1111 names one in a subfolder "folder_name", so model_name alone misses it)."""
    def stem(title: str) -> str:
        return title.split(" [")[0].replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]

    return [m["title"] for m in models if stem(m["title"]) == name]


def decode_png(b64: str):
    """An image of an API response (base64, with or without a data-URL prefix) as an RGB PIL image."""
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1]))).convert("RGB")
