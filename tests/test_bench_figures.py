"""The throughput harness's arithmetic: medians over rounds, the machine's CPU split, idle parts.

The smoke run (test_bench_smoke) shows these on a real run; here, on figures whose answer is
known, that they compute what the table says they do.
"""

from __future__ import annotations

import pytest

from bench.machine import cpu_description, describe
from bench.throughput.measuring import idle_by_part, machine_cpu_split
from bench.throughput.report import median_run, ratios


def test_median_run_keeps_the_middle_round_whole_and_lists_every_round() -> None:
    runs = [
        {"images_per_s": 400.0, "cpu_ms_per_image": 4.1, "seconds": 5.0, "note": "first"},
        {"images_per_s": 480.0, "cpu_ms_per_image": 3.9, "seconds": 4.2, "note": "second"},
        {"images_per_s": 450.0, "cpu_ms_per_image": 4.0, "seconds": 4.4, "note": "third"},
    ]
    chosen = median_run(runs)
    assert (chosen["images_per_s"], chosen["note"], chosen["round"]) == (450.0, "third", 3)
    assert [repeat["images_per_s"] for repeat in chosen["repeats"]] == [400.0, 480.0, 450.0]
    assert [repeat["round"] for repeat in chosen["repeats"]] == [1, 2, 3]
    # An even count takes the lower middle: the table never shows the better of two.
    assert median_run(runs[:2])["images_per_s"] == 400.0
    assert median_run(runs[:1])["round"] == 1


def test_ratios_of_the_median_rounds() -> None:
    phases = {
        "notebook": {"images_per_s": 15.0},
        "decode": {"images_per_s": 2000.0},
        "model": {"images_per_s": 500.0},
        "model_layout": {"images_per_s": 600.0},
        "emolabel": {"images_per_s": 450.0},
    }
    got = ratios(phases)
    assert got["d_over_c"] == 0.9 and got["d_over_c_layout"] == 0.75 and got["d_over_a"] == 30.0
    # 1 / (1/2000 + 1/600): the faster model figure sets the bound.
    assert got["shared_core_bound_images_per_s"] == pytest.approx(461.54, abs=0.01)


def test_machine_cpu_split_accounts_for_every_second() -> None:
    before = {"user": 100.0, "nice": 0.0, "system": 20.0, "idle": 500.0, "iowait": 1.0,
              "irq": 0.0, "softirq": 1.0, "steal": 0.0}  # fmt: skip
    after = {"user": 106.0, "nice": 0.0, "system": 21.5, "idle": 500.4, "iowait": 1.1,
             "irq": 0.0, "softirq": 1.2, "steal": 0.3}  # fmt: skip
    split = machine_cpu_split(
        before, after, worker=6.9, bench=0.4, services={"redis-server": 0.1, "postgres": 0.0}
    )
    assert split["cpu_seconds_available"] == 8.5  # 6 + 1.5 + 0.5 + 0.2 + 0.3
    assert split["busy"] == 7.7 and split["idle"] == 0.5 and split["steal"] == 0.3
    assert split["other"] == pytest.approx(0.3)  # 7.7 - 6.9 - 0.4 - 0.1
    assert split["busy"] + split["idle"] + split["steal"] == pytest.approx(8.5)


def test_idle_by_part_separates_start_middle_and_end() -> None:
    # Two cores over 4 s: the first 0.5 s half idle, the middle never, the last 0.5 s all idle.
    samples = [(0.0, 10.0), (0.5, 10.5), (3.5, 10.5), (4.0, 11.5)]
    assert idle_by_part(samples, 4.0, cores=2) == {"start": 0.5, "middle": 0.0, "end": 1.0}
    assert idle_by_part([], 4.0, cores=2) == {"start": None, "middle": None, "end": None}


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16 sha_ni
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2
"""


def test_cpu_description_names_the_first_cpu_and_its_model_kernels_features() -> None:
    assert cpu_description(CPUINFO) == {
        "cpu_model": "AMD EPYC 9R14",
        "cpu_features": ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"],
    }
    intel = "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t: avx2 amx_bf16 amx_tile\n"
    assert cpu_description(intel)["cpu_features"] == ["avx2", "amx_bf16", "amx_tile"]
    # No /proc/cpuinfo (another OS, a sandbox): the report says it does not know.
    assert cpu_description("") == {"cpu_model": None, "cpu_features": []}
    report = {"cpus_usable": 2, **cpu_description(CPUINFO)}
    features = "avx2, fma, avx512f, avx512_vnni, avx512_bf16"
    assert describe(report) == f"2 cores of AMD EPYC 9R14 ({features})"
    unknown = {"cpus_usable": 1, **cpu_description("")}
    assert describe(unknown) == "1 core of an unnamed CPU (no AVX2, AVX-512 or AMX)"
