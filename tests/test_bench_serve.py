"""tools/bench_serve.py at a tiny size on the CPU: the single-stream path and batches of 1 and 2 streams side by side,
a JSON line per batch second, the summary whole."""
import json

from tools.bench_serve import main


def test_batches_beside_the_single_stream_path(tmp_path):
    rows = main(["--preset", "tiny", "--height", "56", "--width", "84", "--streams", "1", "2", "--seconds", "4",
                 "--warmup", "1", "--speak-every", "2", "--out", str(tmp_path), "--device", "cpu"])
    assert [(r["run"], r["streams"]) for r in rows] == [("single (plain)", 1), ("batch", 1), ("batch", 2)]
    assert all(r["mean_ms"] > 0 and "x_single" in r for r in rows[1:])
    assert abs(rows[2]["per_stream_ms"] - rows[2]["mean_ms"] / 2) <= 0.1
    logged = [json.loads(x) for x in open(tmp_path / "bench_serve.jsonl")]
    assert [(x["streams"], x["t"]) for x in logged] == [(n, t) for n in (1, 2) for t in range(4)]
    assert json.load(open(tmp_path / "bench_serve.json"))["rows"] == json.loads(json.dumps(rows))
