"""End-to-end reliability: malformed S-CFG input through the API, garbled infotexts, concurrent clients.

Runs against SCFG_A1111_URL and/or SCFG_FORGE_URL (any of the Forge family), each skipped with the
reason when unset. Set SCFG_A1111_LOG / SCFG_FORGE_LOG to the WebUI's console log file to also check
that no request of the matrix left a traceback there.

- The malformed-input matrix: every parameter with wrong types, NaN, infinities, values out of range
  on each side, huge values, a bool where a number is meant, hostile ``levels`` strings, unknown
  named keys, too many positional args, through txt2img and img2img, in the positional and the
  named form. Each is answered before sampling with a 4xx whose message names the parameter (and its
  range), never a 500, and the next good request works.
- A PNG whose S-CFG keys are garbled: ``/sdapi/v1/png-info`` gives those keys their defaults and
  keeps the rest of the infotext.
- Two API clients at once (S-CFG and plain requests; the WebUI queues them): each image equals the
  same request run alone, no hook is left, and the status route names the last generation.
"""

import base64
import io
import json
import math
import os
import threading
import time

import pytest

from scfg_ext.params import FIELDS, infotext_key
from tests.e2e.client import api_call

HOSTS = {"a1111": os.environ.get("SCFG_A1111_URL", "").rstrip("/"),
         "forge": os.environ.get("SCFG_FORGE_URL", "").rstrip("/")}
LOGS = {"a1111": os.environ.get("SCFG_A1111_LOG", ""), "forge": os.environ.get("SCFG_FORGE_LOG", "")}
BASE = dict(prompt="a red apple on a wooden table, a cat", negative_prompt="blurry", seed=1234, steps=4,
            width=64, height=64, cfg_scale=7.0, sampler_name="Euler", batch_size=1, n_iter=1,
            save_images=False, send_images=True)
NAMES = [f.name for f in FIELDS]
DEFAULTS = [f.default for f in FIELDS]

pytestmark = pytest.mark.e2e


@pytest.fixture(params=list(HOSTS), scope="module")
def host(request):
    name, url = request.param, HOSTS[request.param]
    if not url:
        pytest.skip(f"SCFG_{name.upper()}_URL is not set")
    try:
        code, _body = api_call(url, "/scfg/v1/status", timeout=10)
    except OSError as error:
        pytest.skip(f"no WebUI at {url}: {error}")
    if code != 200:
        pytest.skip(f"{url} has no S-CFG status route ({code})")
    return name, url


def png_b64(seed=0, size=64, text: str | None = None) -> str:
    """A seeded textured image (a flat one makes the VAE encoder's group norms divide rounding
    noise by sqrt(eps): run to run, one pixel in thousands then differs by 1 on the same host)."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    info = None
    if text is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
    texture = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(texture).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(b64):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1]))).convert("RGB").tobytes()


def body_for(endpoint: str, **overrides) -> dict:
    body = {**BASE, **overrides}
    if endpoint == "img2img":
        body.update(init_images=[png_b64()], denoising_strength=0.6)
    return body


def positional(**values) -> list:
    args = [True, *DEFAULTS[1:]]
    for name, value in values.items():
        args[NAMES.index(name)] = value
    return args


# ----------------------------------------------------------------------------- the matrix

WRONG_TYPES = [("string", "lots"), ("list", [1]), ("dict", {"a": 1}), ("null", None)]
NUMBER_BAD = [("nan", math.nan), ("+inf", math.inf), ("-inf", -math.inf), ("huge", 1e308),
              ("bool", True), ("numeric string inf", "1e400")]
CHOICE_BAD = [("unknown choice", "nonsense"), ("number", 5), ("bool", True)]
SWITCH_BAD = [("nan", math.nan), ("number 2", 2), ("word", "maybe")]
HOSTILE_LEVELS = ["4,8; rm -rf /", "<script>alert(1)</script>", "__import__('os').system('id')",
                  "../../etc/passwd", "4,8\n' OR 1=1 --", "3", "0", "128", "4,,x", "${jndi:ldap://x}"]


def matrix():
    """(case id, the named values, the parameter the answer must name)."""
    cases = []
    for field in FIELDS:
        bad = list(WRONG_TYPES)
        if field.low is not None:
            span = field.high - field.low
            margin = max(span * 0.01, 0.001)
            bad += [*NUMBER_BAD, ("below", field.low - margin), ("above", field.high + margin)]
            if isinstance(field.default, int) and not isinstance(field.default, bool):
                bad.append(("fraction", field.low + 0.5))
        elif field.choices is not None:
            bad += CHOICE_BAD
        elif isinstance(field.default, bool):
            bad = [b for b in bad if b[0] != "string"] + SWITCH_BAD
        elif field.name == "levels":
            bad = [b for b in bad if b[0] != "string"] + [("bool", True)] \
                + [(f"hostile {i}", text) for i, text in enumerate(HOSTILE_LEVELS)]
        for kind, value in bad:
            values = {field.name: value}
            if field.name != "enabled":
                values["enabled"] = True
            cases.append((f"{field.name}-{kind}", values, field.name))
    return cases


CASES = matrix()


def refused(url, endpoint, args, must_name):
    code, answer = api_call(url, f"/sdapi/v1/{endpoint}",
                            body_for(endpoint, alwayson_scripts={"S-CFG": {"args": args}}), timeout=120)
    text = json.dumps(answer)
    assert 400 <= code < 500, (code, text[:300])
    assert must_name in text, (must_name, text[:300])
    return text


class LogWatch:
    """The new part of the WebUI's console log (when its path is given) holds no traceback."""

    def __init__(self, path):
        self.path = path
        self.start = os.path.getsize(path) if path and os.path.exists(path) else None

    def new_text(self) -> str:
        if self.start is None:
            return ""
        with open(self.path, errors="replace") as log:
            log.seek(self.start)
            return log.read()


def good_request_works(url):
    code, answer = api_call(url, "/sdapi/v1/txt2img",
                            body_for("txt2img", alwayson_scripts={"S-CFG": {"args": [True]}}))
    assert code == 200, answer
    code, status = api_call(url, "/scfg/v1/status")
    assert status["hooks_installed"] == [] and status["last_run"]["steps_applied"] > 0, status
    assert status["last_run"]["enabled"] is True, status


@pytest.mark.parametrize("endpoint", ["txt2img", "img2img"])
def test_malformed_args_are_refused_before_sampling(host, endpoint):
    """Every case of the matrix in both arg forms; then a good request still works."""
    name, url = host
    watch = LogWatch(LOGS[name])
    code, before = api_call(url, "/scfg/v1/status")
    failures = []
    for case, values, must_name in CASES:
        forms = [("named", [values]), ("positional", positional(**values))]
        if isinstance(values.get("enabled"), dict):
            forms = forms[:1]  # a dict first is the named form by definition
        for form, args in forms:
            try:
                text = refused(url, endpoint, args, f"'{must_name}'")
                if "range" not in text and "must be" not in text:
                    failures.append((case, form, "no allowed values in the message", text[:200]))
            except AssertionError as error:
                failures.append((case, form, str(error)[:300]))
    assert not failures, f"{len(failures)} of {2 * len(CASES)} cases: {failures[:10]}"
    # the ones that are no single parameter's fault
    refused(url, endpoint, [{"enabled": True, "strenght": 1.5}], "strenght")
    refused(url, endpoint, [{"enabled": True, "steps": 3, "refine_power": 3}], "refine_power")
    refused(url, endpoint, [True, *DEFAULTS[1:], 1, 2], f"at most {len(FIELDS)} positional args")
    refused(url, endpoint, positional(min_rate=2.0, max_rate=1.0), "'min_rate'")
    refused(url, endpoint, positional(start=0.8, end=0.2), "'start'")
    refused(url, endpoint, [{"enabled": True, "test_fault": "everything"}], "'test_fault'")
    for entry in ("not a list", None, {"strength": 2}):
        code, answer = api_call(url, f"/sdapi/v1/{endpoint}",
                                body_for(endpoint, alwayson_scripts={"S-CFG": entry}), timeout=120)
        assert 400 <= code < 500 and "S-CFG" in json.dumps(answer), (entry, code, answer)
    code, after = api_call(url, "/scfg/v1/status")
    assert after["last_run"] == before["last_run"], "a refused request reached the sampler"
    assert after["hooks_installed"] == []
    good_request_works(url)
    assert "Traceback" not in watch.new_text(), watch.new_text()[-3000:]


def test_short_args_take_the_defaults_for_the_rest(host):
    """A shorter positional list is how the WebUIs' own API fills script args: the missing ones are
    the defaults, not an error (clients that set only 'enabled' and 'strength' keep working)."""
    _, url = host
    code, answer = api_call(url, "/sdapi/v1/txt2img",
                            body_for("txt2img", alwayson_scripts={"S-CFG": {"args": [True, 1.5]}}))
    assert code == 200, answer
    infotext = json.loads(answer["info"])["infotexts"][0]
    assert "S-CFG strength: 1.5" in infotext and "S-CFG max rate: 3.0" in infotext, infotext


def test_a_garbled_infotext_restores_defaults_and_keeps_the_rest(host):
    name, url = host
    text = ("a red cube on a blue floor\nNegative prompt: blurry\nSteps: 5, Sampler: Euler, CFG scale: 6.5, "
            "Seed: 4321, Size: 64x48, S-CFG: True, S-CFG strength: banana, S-CFG min rate: 0.5, "
            "S-CFG max rate: nan, S-CFG levels: <script>alert(1)</script>, S-CFG preset: nope, "
            "S-CFG start: 0.9, S-CFG end: 0.1, S-CFG refine power: 2")
    code, answer = api_call(url, "/sdapi/v1/png-info", {"image": png_b64(text=text)})
    assert code == 200, answer
    params = answer.get("parameters")
    if params is None:
        pytest.skip(f"{name}'s png-info route returns no parsed parameters")
    assert params["Steps"] in ("5", 5) and params["Seed"] in ("4321", 4321), params
    assert params["Prompt"] == "a red cube on a blue floor" and params["Negative prompt"] == "blurry"
    expected = {"strength": "1.0", "min rate": "0.5", "max rate": "3.0", "levels": "auto",
                "preset": "official", "start": "0.0", "end": "1.0", "refine power": "2"}
    for label, value in expected.items():
        key = infotext_key(next(f for f in FIELDS if f.label == label))
        assert str(params[key]) == value, (key, params[key])


# ----------------------------------------------------------------------------- concurrency

REQUESTS = [  # (client, endpoint, seed, S-CFG args or None)
    ("a", "txt2img", 11, [True]),
    ("a", "img2img", 12, [{"enabled": True, "max_rate": 2.0, "preset": "paper"}]),
    ("a", "txt2img", 13, None),
    ("b", "txt2img", 21, None),
    ("b", "txt2img", 22, [{"enabled": True, "refine_power": 2}]),
    ("b", "img2img", 23, None),
]


def run_request(url, endpoint, seed, args):
    body = body_for(endpoint, seed=seed, steps=6)
    if args is not None:
        body["alwayson_scripts"] = {"S-CFG": {"args": args}}
    code, answer = api_call(url, f"/sdapi/v1/{endpoint}", body)
    assert code == 200, answer
    return [pixels(b) for b in answer["images"]]


def endpoint_of(seed):
    return next(endpoint for _, endpoint, s, _ in REQUESTS if s == seed)


def image_distance(a, b) -> tuple[int, float]:
    """(max, mean) absolute difference of two lists of RGB images' bytes (of 255)."""
    import numpy as np

    if a is None or len(a) != len(b):
        return (255, 255.0)
    x = np.frombuffer(b"".join(a), np.uint8).astype(int)
    y = np.frombuffer(b"".join(b), np.uint8).astype(int)
    return int(np.abs(x - y).max()), float(np.abs(x - y).mean())


def same_result(endpoint, a, b) -> bool:
    """txt2img: bit for bit. img2img: both WebUIs encode the init image by sampling the VAE posterior
    with the global torch RNG (left wherever the previous generation left it), so an img2img result
    depends slightly on what ran before it, concurrency or not: run strictly one after another in
    another order, plain img2img moved by at most 1 level (mean 0.0005) and S-CFG img2img by at most
    2 (mean 0.13, its token labels flip at near ties) on A1111 1.10.1. Another request's image would
    be tens of levels away."""
    if endpoint == "txt2img":
        return a == b
    worst, mean = image_distance(a, b)
    return worst <= 8 and mean <= 0.5


def test_two_api_clients_at_once_get_what_each_gets_alone(host):
    _, url = host
    alone = {seed: run_request(url, endpoint, seed, args) for _, endpoint, seed, args in REQUESTS}
    assert alone[11] != alone[13] and len({b"".join(v) for v in alone.values()}) == len(alone)
    together, finished, errors = {}, [], []
    lock = threading.Lock()

    def client(name):
        try:
            for who, endpoint, seed, args in REQUESTS:
                if who == name:
                    images = run_request(url, endpoint, seed, args)
                    with lock:
                        together[seed] = images
                        finished.append(seed)
        except Exception as error:  # reported below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=client, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=1800)
    assert not errors, errors
    mismatched = {seed: image_distance(together.get(seed), alone[seed]) for seed in alone
                  if not same_result(endpoint_of(seed), together.get(seed), alone[seed])}
    assert not mismatched, f"requests differ from the same request run alone: {mismatched}"
    _code, status = api_call(url, "/scfg/v1/status")
    assert status["hooks_installed"] == [], status
    last = finished[-1]
    wanted = next(args is not None for _, _, seed, args in REQUESTS if seed == last)
    assert status["last_run"]["seed"] == last and status["last_run"]["enabled"] is wanted, (finished, status)


def test_status_during_a_generation_is_answered(host):
    """The status route answers while a generation runs (it takes no queue lock)."""
    _, url = host
    result = {}

    def generate():
        result["images"] = run_request(url, "txt2img", 5, [{"enabled": True}])

    thread = threading.Thread(target=generate)
    thread.start()
    started = time.time()
    while thread.is_alive() and time.time() - started < 900:
        code, status = api_call(url, "/scfg/v1/status", timeout=30)
        assert code == 200, status
        time.sleep(0.05)
    thread.join()
    assert result.get("images"), "the generation failed"
    code, status = api_call(url, "/scfg/v1/status")
    assert status["hooks_installed"] == [] and status["last_run"]["seed"] == 5, status
