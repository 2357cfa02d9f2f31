"""Pure helpers of the WebUI benchmark (bench/webui.py); no WebUI needed."""

import os

import pytest

from bench.webui import (
    Config,
    added_ratio,
    cpu_seconds,
    listening_inodes,
    parse_config,
    payload,
    peer_args,
    pid_for_port,
    rotated,
    step_seconds,
    summarize,
    table,
    vmrss_kib,
)

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1E61 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0
   1: 0100007F:1E61 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0
   2: 00000000:1EC9 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0
"""


def test_parse_config():
    assert parse_config("sd15-512") == Config("sd15-512", "sd15", 512, 512)
    assert parse_config("sdxl-1024x768") == Config("sdxl-1024x768", "sdxl", 1024, 768)
    for bad in ("sd21-512", "sd15", "sd15-500", "sdxl-0"):
        with pytest.raises(ValueError):
            parse_config(bad)


def test_step_seconds_is_the_difference_per_step():
    assert step_seconds(10.0, 16.0, 2, 4) == pytest.approx(3.0)
    assert step_seconds(5.0, 9.5, 1, 2) == pytest.approx(4.5)
    with pytest.raises(ValueError):
        step_seconds(1.0, 2.0, 4, 4)


def test_rotation_puts_every_kind_first_once():
    kinds = ("plain", "ours", "peer")
    orders = [rotated(kinds, r) for r in range(3)]
    assert [o[0] for o in orders] == ["plain", "ours", "peer"]
    assert all(sorted(o) == sorted(kinds) for o in orders)
    assert rotated(kinds, 3) == list(kinds)


def test_summaries_and_added_ratio():
    assert summarize([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert added_ratio(10.0, 10.1, 11.0) == pytest.approx(10.0)
    assert added_ratio(10.0, 9.9, 11.0) is None  # ours below the noise


def test_vmrss_parsing():
    text = "Name:\tpython\nVmPeak:\t 9999 kB\nVmRSS:\t  123456 kB\nVmHWM:\t 2 kB\n"
    assert vmrss_kib(text) == 123456
    assert vmrss_kib("Name:\tkthreadd\n") is None


def test_listening_inodes_by_port():
    assert listening_inodes(TCP, 0x1E61) == {4242}  # 7777: the LISTEN row, not the connection
    assert listening_inodes(TCP, 7881) == {777}
    assert listening_inodes(TCP, 1) == set()


def test_pid_for_port_in_a_fake_proc(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(TCP)
    fd = tmp_path / "321" / "fd"
    fd.mkdir(parents=True)
    os.symlink("socket:[777]", fd / "5")
    (tmp_path / "self").mkdir()
    assert pid_for_port(7881, proc=str(tmp_path)) == 321
    assert pid_for_port(7777, proc=str(tmp_path)) is None


def test_peer_args_sets_only_its_scfg_active():
    info = [
        {"name": "incantations", "is_img2img": True, "args": []},
        {"name": "incantations", "is_img2img": False, "args": [
            {"label": "Active", "value": False}, {"label": "SEG Blur Sigma", "value": 11.0},
            {"label": "Active", "value": False}, {"label": "SCFG Scale", "value": 1.0},
            {"label": "Active", "value": False}, {"label": "PAG Scale", "value": 0}]},
    ]
    assert peer_args(info, "Incantations", "SCFG Scale") == [False, 11.0, True, 1.0, False, 0]
    with pytest.raises(ValueError):
        peer_args(info[:1], "Incantations", "SCFG Scale")


def test_payloads_and_table():
    c = parse_config("sd15-512")
    plain = payload(c, 4, 2, "plain", None)
    assert (plain["width"], plain["batch_size"], plain["steps"], plain["cfg_scale"]) == (512, 4, 2, 7.5)
    assert "alwayson_scripts" not in plain
    assert payload(c, 1, 2, "ours", None)["alwayson_scripts"] == {"S-CFG": {"args": [True]}}
    assert payload(c, 1, 2, "peer", ("Incantations", [1]))["alwayson_scripts"] == {
        "Incantations": {"args": [1]}}
    row = dict(config="sd15-512", batch=1, a=1, b=2,
               plain={"wall": (10.0, 9.0, 11.0), "cpu": (20.0, 20.0, 20.0)},
               ours={"wall": (10.1, 10.0, 10.2), "cpu": (20.2, 20.2, 20.2)},
               peer={"wall": (12.0, 11.0, 13.0), "cpu": (30.0, 30.0, 30.0)},
               rss={"plain": 5000.0, "ours": 5010.0, "peer": 5100.0})
    text = table([row], "incantations")  # ratios on the CPU basis when it was measured
    assert "| CPU | 1.010x | 1.500x | +0.200 s | +10.000 s | 50.0x | 5000 | +10 | +100 |" in text
    assert "10.00 (9.00–11.00)" in text
    wall_only = dict(row, plain={"wall": (10.0, 9.0, 11.0), "cpu": None},
                     ours={"wall": (10.1, 10.0, 10.2), "cpu": None}, rss={"plain": 1.0})
    text = table([wall_only], None)
    assert "| wall | 1.010x |" in text and "peer" not in text


def test_cpu_seconds_from_proc_stat():
    stat = "42 (py thon) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 1 0"
    assert cpu_seconds(stat) == pytest.approx(4.0)  # (250 + 150) ticks at 100 Hz
