"""bench/quality/evaluate.py's comparison at matched effective guidance (pure functions)."""

from bench.quality import evaluate


def rows():
    cfg = [{"method": "cfg", "cfg": g, "effective_cfg": g, "object_acc": acc, "exact": acc / 2, "bg": 1.0,
            "fd": fd} for g, acc, fd in ((1.0, 0.2, 30.0), (3.0, 0.4, 20.0), (5.0, 0.6, 24.0))]
    scfg = [{"method": "scfg", "cfg": 3.0, "effective_cfg": 4.0, "object_acc": 0.55, "exact": 0.3, "bg": 1.0,
             "fd": 21.0},
            {"method": "scfg", "cfg": 5.0, "effective_cfg": 6.5, "object_acc": 0.7, "exact": 0.4, "bg": 1.0,
             "fd": 25.0}]
    return cfg + scfg


def test_cfg_is_interpolated_at_the_effective_scale_of_scfg():
    r = rows()
    assert evaluate.interpolate_cfg(r, "object_acc", 4.0) == 0.5  # halfway between CFG 3 and CFG 5
    assert evaluate.interpolate_cfg(r, "fd", 4.0) == 22.0
    assert evaluate.interpolate_cfg(r, "object_acc", 3.0) == 0.4  # a measured scale: its own value
    assert evaluate.interpolate_cfg(r, "object_acc", 6.5) is None  # beyond the largest CFG measured


def test_table_has_a_row_per_config_and_the_matched_cfg_for_scfg_rows():
    lines = evaluate.table(rows()).strip().split("\n")
    assert len(lines) == 2 + 5
    assert lines[-2].startswith("| S-CFG | 3 | 4 | 0.550 |") and lines[-2].endswith("| 0.5 / 0.25 / 22 |")
    assert "out of range" in lines[-1]


def test_configs_pair_every_scale_and_skip_scfg_at_one():
    assert evaluate.configs([1.0, 3.0]) == [("cfg", 1.0), ("cfg", 3.0), ("scfg", 3.0)]


def test_the_background_is_read_back_from_every_caption():
    from bench.quality import data

    for i in range(40):
        sample = data.sample(0, i, "any")
        assert data.background_of(sample.caption) == sample.background
