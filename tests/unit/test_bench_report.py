"""`make bench` pairs runs by round: each ratio compares runs seconds apart, never the
first proxy's block with the second's minutes later."""

from loadtests.bench import Run, round_ratios, scenario_rows, target_verdicts


def run(target: str, rps: float, p99: float = 1.0, cpu: float = 1e-5, error: str | None = None):
    return Run(
        target=target, url="", rps=rps, p50_ms=p99 / 2, p99_ms=p99, cpu_s_per_req=cpu, error=error
    )


def test_each_round_is_its_own_ratio_and_the_report_takes_their_median():
    # The machine slows down twice during the run, between the proxies' turns of round 2
    # and before round 3: the ratio of the two medians (16,000 / 60,000) would be 0.27.
    runs = {
        "small": {
            "sluicegate": [
                run("sluicegate", 30_000),
                run("sluicegate", 16_000),
                run("sluicegate", 15_000),
            ],
            "nginx": [run("nginx", 60_000), run("nginx", 64_000), run("nginx", 30_000)],
        }
    }
    [row] = [row for row in scenario_rows(runs) if row["reference"] == "nginx"]
    assert row["ratio_per_round"]["rps"] == [0.5, 0.25, 0.5]
    assert row["ratio"]["rps"] == 0.5
    assert row["sluicegate"]["rps"] == 16_000  # each figure's own median, for the table
    assert row["nginx"]["rps"] == 60_000
    assert row["sluicegate"]["rounds"] == 3
    assert len(row["runs"]["nginx"]) == 3


def test_a_failed_run_drops_its_round_only():
    subjects = [run("sluicegate", 30_000), run("sluicegate", 0, error="no requests completed")]
    references = [run("nginx", 60_000), run("nginx", 70_000)]
    assert round_ratios(subjects, references, "rps") == [0.5]
    assert round_ratios(subjects, references, "p99_ms") == [1.0]


def test_the_redis_limit_is_compared_with_the_unlimited_run_of_the_same_round():
    runs = {
        "small": {
            "sluicegate": [
                run("sluicegate", 30_000, cpu=30e-6),
                run("sluicegate", 20_000, cpu=30e-6),
            ],
            "nginx": [run("nginx", 60_000), run("nginx", 40_000)],
        },
        "ratelimit": {
            "sluicegate+redis": [
                run("sluicegate+redis", 24_000, cpu=36e-6),
                run("sluicegate+redis", 15_000, cpu=36e-6),
            ]
        },
    }
    rows = {row["scenario"]: row for row in scenario_rows(runs) if row["reference"] != "forwarder"}
    limited = rows["ratelimit"]
    assert limited["reference"] == "sluicegate (no limit)"
    assert limited["ratio_per_round"]["rps"] == [0.8, 0.75]
    assert limited["ratio"]["rps"] == 0.775
    assert limited["ratio"]["cpu_per_req"] == 1.2
    assert rows["small"]["ratio"]["rps"] == 0.5


def test_a_proxy_that_never_ran_leaves_no_ratio():
    runs = {"64k": {"sluicegate": [run("sluicegate", 20_000)]}}
    rows = scenario_rows(runs)
    assert [row["reference"] for row in rows] == ["forwarder", "nginx"]
    for row in rows:
        assert row["ratio"]["rps"] is None
        assert row[row["reference"]] is None


def test_targets_are_judged_on_the_median_ratios_to_the_forwarder():
    runs = {
        "small": {
            "sluicegate": [run("sluicegate", 40_000, p99=3.0, cpu=20e-6)],
            "forwarder": [run("forwarder", 50_000, p99=2.0, cpu=16e-6)],
            "nginx": [run("nginx", 100_000, p99=1.0, cpu=8e-6)],
        },
        "64k": {
            "sluicegate": [run("sluicegate", 20_000, p99=4.2)],
            "forwarder": [run("forwarder", 25_000, p99=2.0)],
        },
    }
    verdicts = {(v["scenario"], v["ratio"]): v for v in target_verdicts(scenario_rows(runs))}
    assert verdicts[("small", "rps")]["met"] is True  # 0.8 >= 0.8, whatever nginx's 0.4
    assert verdicts[("small", "rps")]["reference"] == "forwarder"
    assert verdicts[("small", "p99")]["met"] is True  # exactly 1.5 is within "<= 1.5x"
    assert verdicts[("64k", "rps")]["met"] is False  # 0.8 < 0.9
    assert verdicts[("64k", "p99")]["met"] is False  # 2.1 > 1.5
    assert verdicts[("ratelimit", "rps")]["met"] is None  # not measured
    assert verdicts[("ratelimit", "rps")]["value"] is None


def test_a_cache_hit_is_compared_with_the_proxied_get_of_its_round_and_with_nginx():
    runs = {
        "small": {
            "sluicegate": [run("sluicegate", 20_000, cpu=40e-6), run("sluicegate", 10_000)],
            "forwarder": [run("forwarder", 30_000), run("forwarder", 15_000)],
        },
        "cache-hit": {
            "sluicegate": [run("sluicegate", 40_000, cpu=20e-6), run("sluicegate", 30_000)],
            "nginx": [run("nginx", 80_000), run("nginx", 60_000)],
        },
        "gzip-64k": {
            "sluicegate": [run("sluicegate", 400, cpu=700e-6)],
            "nginx": [run("nginx", 500, cpu=500e-6)],
        },
    }
    rows = {(row["scenario"], row["reference"]): row for row in scenario_rows(runs)}
    hit = rows[("cache-hit", "sluicegate (proxied)")]
    assert hit["ratio_per_round"]["rps"] == [2.0, 3.0]
    assert hit["ratio_per_round"]["cpu_per_req"][0] == 0.5
    assert rows[("cache-hit", "nginx")]["ratio_per_round"]["rps"] == [0.5, 0.5]
    assert rows[("gzip-64k", "nginx")]["ratio"]["cpu_per_req"] == 1.4
    # The forwarder neither caches nor compresses: no row pairs it with these.
    assert ("cache-hit", "forwarder") not in rows and ("gzip-64k", "forwarder") not in rows
