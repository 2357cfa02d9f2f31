"""Per-step cost of S-CFG in a running WebUI, against plain CFG and a peer S-CFG, from one run.

    SCFG_BENCH_URL=http://127.0.0.1:7881 python -m bench.webui --configs sd15-512 sdxl-1024 \\
        --batches 1 4 --peer incantations --repeats 3 --sd15-model NAME --sdxl-model NAME

Drives the WebUI's HTTP API (A1111 v1.10 or Forge, started with --api): txt2img at a fixed seed,
Euler, CFG 7.5. The seconds of one sampling step are (t(steps=b) - t(steps=a)) / (b - a), so model
load, prompt encoding, VAE decode and HTTP overhead cancel. Both the wall time and the server's CPU
time (utime + stime of all its threads, /proc/PID/stat) are taken; on a shared machine the CPU time
is the steadier measure of the work added (other processes stretch wall time, not CPU time), so the
ratios use it when the PID is known. Plain CFG, our S-CFG and the peer run
ALTERNATING (the order rotates every repeat), so all see the same machine load; each figure is the
median over repeats. A thread samples the server's VmRSS (/proc/PID/status) during each kind of run
and keeps its peak; the server PID is --pid or the process listening on the URL's port (found from
/proc/net/tcp* and /proc/*/fd). Pure standard library.

Peer ``incantations`` is v0xie/sd-webui-incantations with only its S-CFG enabled: its one
always-on script "Incantations" takes the args of all its modules (SEG, S-CFG, PAG, T2I-Zero, ...);
the benchmark reads their defaults from /sdapi/v1/script-info and sets only S-CFG's "Active".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

PROMPT = "a red fox and a grey cat on a bench in a snowy park"
BASE = dict(prompt=PROMPT, negative_prompt="", seed=1234, sampler_name="Euler", scheduler="Automatic",
            cfg_scale=7.5, n_iter=1, save_images=False, send_images=False, do_not_save_samples=True,
            do_not_save_grid=True)
OURS_TITLE = "S-CFG"
# the peer's script title and the label of its S-CFG's first arg after "Active" (in /sdapi/v1/script-info)
PEERS = {"incantations": ("Incantations", "SCFG Scale")}
KINDS = ("plain", "ours", "peer")


# ----------------------------------------------------------------------------- pure helpers

@dataclass(frozen=True)
class Config:
    name: str
    family: str  # sd15 | sdxl
    width: int
    height: int


def parse_config(name: str) -> Config:
    """``sd15-512``, ``sdxl-1024``, ``sd15-512x768`` -> Config."""
    m = re.fullmatch(r"(sd15|sdxl)-(\d+)(?:x(\d+))?", name)
    if not m:
        raise ValueError(f"config {name!r}: expected sd15-SIZE or sdxl-SIZE (e.g. sd15-512, sdxl-1024x768)")
    width = int(m.group(2))
    height = int(m.group(3) or width)
    if width % 8 or height % 8 or not width or not height:
        raise ValueError(f"config {name!r}: sizes must be positive multiples of 8")
    return Config(name, m.group(1), width, height)


def step_seconds(t_a: float, t_b: float, a: int, b: int) -> float:
    """Seconds per sampling step from the wall times of two requests that differ only in steps."""
    if b <= a:
        raise ValueError(f"need b > a, got a={a}, b={b}")
    return (t_b - t_a) / (b - a)


def rotated(kinds, repeat: int) -> list:
    """The order of the kinds in a repeat: rotated by one each time, so none always runs first."""
    kinds = list(kinds)
    r = repeat % len(kinds) if kinds else 0
    return kinds[r:] + kinds[:r]


def summarize(samples: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of per-repeat step times."""
    return statistics.median(samples), min(samples), max(samples)


def added_ratio(plain: float, ours: float, peer: float) -> float | None:
    """How many times more time per step the peer adds than we do; None when ours adds nothing
    measurable (<= 0: below the noise)."""
    ours_added, peer_added = ours - plain, peer - plain
    if ours_added <= 0:
        return None
    return peer_added / ours_added


def vmrss_kib(status_text: str) -> int | None:
    """VmRSS in KiB from the text of /proc/PID/status."""
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", status_text, re.MULTILINE)
    return int(m.group(1)) if m else None


def cpu_seconds(stat_text: str, ticks_per_second: int = 100) -> float:
    """utime + stime (all threads) in seconds from the text of /proc/PID/stat."""
    fields = stat_text[stat_text.rindex(")") + 2:].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / ticks_per_second  # fields 14 and 15 of proc(5)


def listening_inodes(proc_net_tcp: str, port: int) -> set[int]:
    """Socket inodes LISTENing (state 0A) on ``port`` in the text of /proc/net/tcp or tcp6."""
    inodes = set()
    for line in proc_net_tcp.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10:
            continue
        local, state, inode = parts[1], parts[3], parts[9]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            inodes.add(int(inode))
    return inodes


def pid_for_port(port: int, proc: str = "/proc") -> int | None:
    """The PID of the process that holds the socket listening on ``port`` (Linux)."""
    inodes: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc, "net", name)) as fh:
                inodes |= listening_inodes(fh.read(), port)
        except OSError:
            pass
    targets = {f"socket:[{i}]" for i in inodes}
    if not targets:
        return None
    for pid in filter(str.isdigit, os.listdir(proc)):
        fd_dir = os.path.join(proc, pid, "fd")
        try:
            for fd in os.listdir(fd_dir):
                if os.readlink(os.path.join(fd_dir, fd)) in targets:
                    return int(pid)
        except OSError:
            continue
    return None


def peer_args(script_info: list, title: str, marker: str) -> list:
    """The default args of the peer's txt2img script with only its S-CFG's "Active" (the arg just
    before ``marker``) set to True."""
    for script in script_info:
        if script.get("name") == title.lower() and not script.get("is_img2img"):
            args = script["args"]
            labels = [a.get("label") for a in args]
            if marker not in labels or labels.index(marker) == 0:
                break
            values = [a.get("value") for a in args]
            values[labels.index(marker) - 1] = True
            return values
    raise ValueError(f"no txt2img script {title!r} with an arg {marker!r} in /sdapi/v1/script-info")


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def table(rows: list[dict], peer: str | None) -> str:
    """Markdown tables of the results (one dict per config and batch): seconds per step (median and
    range) by wall clock and server CPU, then ratios and added time (CPU time when measured)."""
    kinds = ["plain", "ours"] + (["peer"] if peer else [])
    names = {"plain": "plain", "ours": "S-CFG", "peer": peer}
    head = ["config", "batch", "steps a→b"]
    head += [f"{names[k]} {m} s/step" for k in kinds for m in ("wall", "CPU")]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], str(r["batch"]), f"{r['a']}→{r['b']}"]
        for k in kinds:
            for m in ("wall", "cpu"):
                v = r[k].get(m)
                cells.append("n/a" if v is None else f"{v[0]:.2f} ({v[1]:.2f}–{v[2]:.2f})")
        out.append("| " + " | ".join(cells) + " |")
    head = ["config", "batch", "basis", "S-CFG/plain"]
    if peer:
        head += [f"{peer}/plain", "added: ours", f"added: {peer}", f"{peer}/ours added"]
    head += ["peak RSS plain MiB", "+ours MiB"] + (["+peer MiB"] if peer else [])
    out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        basis = "cpu" if r["plain"].get("cpu") else "wall"
        p, o = r["plain"][basis], r["ours"][basis]
        cells = [r["config"], str(r["batch"]), basis.replace("cpu", "CPU"), f"{o[0] / p[0]:.3f}x"]
        if peer:
            q = r["peer"][basis]
            ratio = added_ratio(p[0], o[0], q[0])
            cells += [f"{q[0] / p[0]:.3f}x", f"{o[0] - p[0]:+.3f} s", f"{q[0] - p[0]:+.3f} s",
                      "ours ≤ 0 (in the noise)" if ratio is None else f"{ratio:.1f}x"]
        rss = r["rss"]
        cells += [fmt(rss.get("plain"), ".0f"), fmt(_delta(rss, "ours"), "+.0f")]
        if peer:
            cells.append(fmt(_delta(rss, "peer"), "+.0f"))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _delta(rss: dict, kind: str) -> float | None:
    if rss.get(kind) is None or rss.get("plain") is None:
        return None
    return rss[kind] - rss["plain"]


# ----------------------------------------------------------------------------- the WebUI

class Api:
    def __init__(self, url: str, timeout: float = 3600):
        self.url, self.timeout = url.rstrip("/"), timeout

    def call(self, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{path}: HTTP {e.code}: {e.read()[:500]!r}") from e


@dataclass
class RssSampler:
    """Peak VmRSS (MiB) of one process while ``kind`` is set, sampled every ``period`` s."""
    pid: int | None
    period: float = 0.02
    kind: str | None = None
    peaks: dict = field(default_factory=dict)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        if self.pid:
            self._thread.start()

    def _loop(self):
        path = f"/proc/{self.pid}/status"
        while not self._stop.wait(self.period):
            kind = self.kind
            if kind is None:
                continue
            try:
                with open(path) as fh:
                    kib = vmrss_kib(fh.read())
            except OSError:
                return
            if kib is not None:
                self.peaks[kind] = max(self.peaks.get(kind, 0.0), kib / 1024)

    def stop(self):
        self._stop.set()


def server_cpu(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return cpu_seconds(fh.read(), os.sysconf("SC_CLK_TCK"))
    except OSError:
        return None


def payload(config: Config, batch: int, steps: int, kind: str, peer: tuple | None) -> dict:
    """txt2img body; ``peer`` is (title, args)."""
    body = dict(BASE, width=config.width, height=config.height, batch_size=batch, steps=steps)
    if kind == "ours":
        body["alwayson_scripts"] = {OURS_TITLE: {"args": [True]}}
    elif kind == "peer":
        body["alwayson_scripts"] = {peer[0]: {"args": peer[1]}}
    return body


def check_applied(api: Api, kind: str, response: dict) -> str | None:
    """A problem with the run just made (S-CFG not applied), or None."""
    info = json.loads(response.get("info") or "{}")
    text = " ".join(info.get("infotexts") or [])
    if kind == "ours":
        status = api.call("/scfg/v1/status")
        last = status.get("last_run") or status.get("last") or {}
        applied = last.get("steps_applied", last.get("applied"))
        if "S-CFG" not in text or not applied:
            return f"our S-CFG was not applied (infotext: {'S-CFG' in text}, status: {last})"
        if "S-CFG warning" in text:
            return "our S-CFG fell back to plain CFG: " + text[text.index("S-CFG warning"):][:200]
    if kind == "peer" and "SCFG Active" not in text:
        return "the peer's S-CFG was not applied (no 'SCFG Active' in the infotext)"
    return None


def run(args) -> str:
    api = Api(args.url)
    peer = None if args.peer == "none" else args.peer
    peer_call = None
    if peer:
        title, marker = PEERS[peer]
        peer_call = (title, peer_args(api.call("/sdapi/v1/script-info"), title, marker))
    kinds = [k for k in KINDS if k != "peer" or peer]
    port = urllib.parse.urlparse(args.url).port or 80
    pid = args.pid or pid_for_port(port)
    sampler = RssSampler(pid)
    rows = []
    load0 = os.getloadavg()
    started = time.time()
    a, b = args.steps
    notes = []
    try:
        for name in args.configs:
            config = parse_config(name)
            model = args.sd15_model if config.family == "sd15" else args.sdxl_model
            if model:
                api.call("/sdapi/v1/options", {"sd_model_checkpoint": model})
                loaded = api.call("/sdapi/v1/options").get("sd_model_checkpoint", "")
                if not loaded.startswith(os.path.splitext(model)[0]):
                    raise SystemExit(f"{name}: asked for checkpoint {model!r}, the WebUI has {loaded!r}")
            for batch in args.batches:
                samples = {k: {"wall": [], "cpu": []} for k in kinds}
                sampler.peaks.clear()
                for kind in kinds[:args.warmup]:  # model load, first-call caches: not counted
                    api.call("/sdapi/v1/txt2img", payload(config, batch, 1, kind, peer_call))
                for rep in range(args.repeats):
                    for kind in rotated(kinds, rep):
                        times, cpu = {}, {}
                        for steps in (a, b):
                            body = payload(config, batch, steps, kind, peer_call)
                            sampler.kind = kind
                            c0 = server_cpu(pid)
                            t0 = time.perf_counter()
                            response = api.call("/sdapi/v1/txt2img", body)
                            times[steps] = time.perf_counter() - t0
                            c1 = server_cpu(pid)
                            cpu[steps] = None if c0 is None or c1 is None else c1 - c0
                            sampler.kind = None
                            problem = check_applied(api, kind, response)
                            if problem:
                                raise SystemExit(f"{name} batch {batch}: {problem}")
                        samples[kind]["wall"].append(step_seconds(times[a], times[b], a, b))
                        if cpu[a] is not None and cpu[b] is not None:
                            samples[kind]["cpu"].append(step_seconds(cpu[a], cpu[b], a, b))
                        wall = samples[kind]["wall"][-1]
                        print(f"  {name} b{batch} rep {rep} {kind}: wall {wall:.3f} s/step "
                              f"(t{a}={times[a]:.2f} s, t{b}={times[b]:.2f} s), CPU {cpu[a]} / {cpu[b]} s, "
                              f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
                rows.append(dict(config=name, batch=batch, a=a, b=b, rss=dict(sampler.peaks),
                                 **{k: {m: summarize(v) if v else None for m, v in d.items()}
                                    for k, d in samples.items()}))
    finally:
        sampler.stop()
    load1 = os.getloadavg()
    if pid is None:
        notes.append("server PID not found: no memory figures (pass --pid)")
    header = (f"WebUI {args.url} (pid {pid}), {time.strftime('%Y-%m-%d %H:%M')}, Euler, CFG 7.5, seed 1234, "
              f"median (min–max) of {args.repeats} alternating repeats, "
              f"{time.time() - started:.0f} s in all; "
              f"load average {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} at start, "
              f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} at end")
    return "\n".join([header, "", table(rows, peer), *notes])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("SCFG_BENCH_URL"),
                    help="WebUI base URL (default: $SCFG_BENCH_URL)")
    ap.add_argument("--pid", type=int, help="server PID for memory figures (default: found from the port)")
    ap.add_argument("--configs", nargs="+", default=["sd15-512"], help="sd15-SIZE / sdxl-SIZE[xH]")
    ap.add_argument("--batches", nargs="+", type=int, default=[1])
    ap.add_argument("--peer", choices=["none", *PEERS], default="none")
    ap.add_argument("--warmup", type=int, default=3,
                    help="warm-up runs (1 step, not timed) before each config and batch: 0-3 kinds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", nargs=2, type=int, default=[2, 4], metavar=("A", "B"),
                    help="the two step counts whose difference gives the per-step time")
    ap.add_argument("--sd15-model", help="checkpoint title for sd15 configs (else the loaded one)")
    ap.add_argument("--sdxl-model", help="checkpoint title for sdxl configs (else the loaded one)")
    args = ap.parse_args(argv)
    if not args.url:
        ap.error("--url or SCFG_BENCH_URL is required")
    if args.steps[1] <= args.steps[0]:
        ap.error("--steps A B needs B > A")
    print(run(args))


if __name__ == "__main__":
    main()
