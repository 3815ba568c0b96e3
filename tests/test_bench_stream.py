"""tools/bench_stream.py at a tiny size on the CPU: our loop and transformers' on the same seconds, side by side."""
import json

import pytest

from tools.bench_stream import main, per_minute
from test_eval import lines, refused




def test_ours_and_transformers_side_by_side(tmp_path):
    pytest.importorskip("transformers")
    res = main(["--preset", "tiny", "--seconds", "4", "--warmup", "1", "--height", "56", "--width", "84",
                "--policies", "streaming", "full", "--max-new-tokens", "4", "--hf", "--out", str(tmp_path)])
    runs = res["runs"]
    assert runs["streaming"]["summary"]["ms_per_token"] > 0
    hf = runs["transformers"]
    assert len(hf["latency"]) == 4 and hf["summary"]["failed"] == "-" and hf["summary"]["ms_per_token"] > 0
    assert runs["full"]["summary"]["hf_ms_per_token_ratio"] > 0
    # the same loop: transformers' growing cache holds about what our never-evicting policy holds
    assert abs(hf["summary"]["cache"] - runs["full"]["summary"]["cache"]) <= 8
    # every second of every run is a JSON line; ours decode the same number of tokens a second as transformers
    logged = lines(tmp_path / "bench_stream.jsonl")
    assert [(x["policy"], x["t"]) for x in logged] == [(p, t) for p in ("transformers", "streaming", "full")
                                                       for t in range(4)]
    assert {x["forwards"] for x in logged if x["policy"] == "transformers"} == {4}
    assert {x["forwards"] for x in logged if x["policy"] != "transformers"} == {3}  # the 4th token is never fed
    assert json.load(open(tmp_path / "bench_stream.json"))["runs"]["full"]["summary"] == runs["full"]["summary"]
    pm = runs["streaming"]["per_minute"]
    assert [m["seconds"] for m in pm] == [4]
    assert pm[0]["mean_ms"] == round(1000 * sum(runs["streaming"]["latency"]) / 4, 1)


def test_per_minute_flatness_numbers():
    # 130 seconds: two whole minutes and 10 seconds of a third; a slow second 61 shows in minute 1's p99 only
    latency = [0.2] * 130
    latency[61] = 1.0
    memory = [1.0] * 60 + [1.5] * 70
    pm = per_minute(latency, memory)
    assert [(m["minute"], m["seconds"]) for m in pm] == [(0, 60), (1, 60), (2, 10)]
    assert [m["p99_ms"] for m in pm] == [200.0, 1000.0, 200.0]
    assert pm[1]["mean_ms"] == round(1000 * (59 * 0.2 + 1) / 60, 1)
    assert [m["memory_gib"] for m in pm] == [1.0, 1.5, 1.5]


def test_a_failure_in_the_first_second_is_reported(tmp_path):
    res = main(["--preset", "tiny", "--seconds", "3", "--height", "56", "--width", "84", "--policies", "streaming",
                "--max-new-tokens", "4", "--time-limit", "1e-9", "--out", str(tmp_path)])
    row = res["runs"]["streaming"]["summary"]
    assert row["failed"] == "TimeoutError at 0 s" and row["ms_per_token"] is None and row["p99_ms"] is None


@pytest.mark.parametrize("argv, says", [
    (["--decode", "eager"], "--decode: expected plain, graphs, compiled"),
    (["--seconds", "0"], "--seconds: must be >= 1"),
    (["--warmup", "-2"], "--warmup: must be >= 0"),
    (["--hf-seconds", "0"], "--hf-seconds: must be >= 1"),
    (["--time-limit", "-1"], "--time-limit: must be >= 0"),
])
def test_bad_flags_are_one_line_errors(capsys, argv, says):
    assert says in refused(main, argv, capsys)


def test_profile_groups_a_second_by_phase(tmp_path, capsys):
    # --profile: the kernels of one more second, and its time per phase (stream.PhaseTimer's ranges)
    main(["--preset", "tiny", "--seconds", "3", "--warmup", "1", "--height", "56", "--width", "84", "--policies",
          "streaming", "--max-new-tokens", "4", "--profile", "--out", str(tmp_path)])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("per phase (ms): "))
    assert [p.split(" host ")[0] for p in line[len("per phase (ms): "):].split(", ")] == [
        "preprocess", "vision", "evict", "prefill", "decode"]
