"""Smoke test of benchmarks/reward_accuracy.py on the tiny model: it runs end to end and its last line is
the one JSON object the lead's tooling reads."""

import importlib.util
import json
from pathlib import Path


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke(tiny_model_dir, capsys, tmp_path):
    bench = load_benchmark("reward_accuracy")
    rc = bench.main(["--model", str(tiny_model_dir), "--sizes", "8,4", "--valid", "4", "--k", "3",
                     "--normalize-samples", "16", "--batch-size", "4", "--epochs", "1", "--query-length", "16",
                     "--response-length", "6", "--quiet", "--out", str(tmp_path / "r.json")])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert list(summary) == ["comparisons", "accuracy", "labels_per_s", "train_examples_per_s", "bow_accuracy"]
    assert len(summary["bow_accuracy"]) == 2 and all(0 <= a <= 1 for a in summary["bow_accuracy"])
    assert summary["comparisons"] == [4, 8] and len(summary["accuracy"]) == 2
    assert all(0 <= a <= 1 for a in summary["accuracy"])
    assert summary["labels_per_s"] > 0 and summary["train_examples_per_s"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["per_size"][1]["steps"] == 2


def test_bag_of_words_reference_learns_a_planted_word():
    """The reference finds the one token that the labeler's choice always contains, and not from position or
    length: every sample has the same length and the chosen slot is random."""
    import random

    from megacoach.reward.data import Comparison

    bench = load_benchmark("reward_accuracy")
    rng = random.Random(0)

    def comparison():
        samples = [[rng.randrange(10, 60) for _ in range(6)] for _ in range(4)]
        chosen = rng.randrange(4)
        samples[chosen][rng.randrange(6)] = 5  # the "good" word
        return Comparison([1, 2, 3], samples, chosen)

    train, valid = [comparison() for _ in range(200)], [comparison() for _ in range(100)]
    assert bench.bag_of_words_reference(train, valid, 64) == 1.0
    shuffled = [Comparison(c.query_ids, c.sample_ids, rng.randrange(4)) for c in train]  # labels without signal
    assert bench.bag_of_words_reference(shuffled, valid, 64) < 0.5


def test_benchmark_bad_model(tmp_path, capsys):
    bench = load_benchmark("reward_accuracy")
    assert bench.main(["--model", str(tmp_path / "nope"), "--sizes", "4", "--valid", "4"]) == 2
    assert "error:" in capsys.readouterr().err


def test_sampling_benchmark_smoke(tiny_model_dir, capsys):
    """benchmarks/sampling.py runs on the tiny model, times both caches and both draws, and restores megacoach's own
    draw afterwards."""
    import megacoach.sampling as sampling

    own = sampling.sample_categorical
    bench = load_benchmark("sampling")
    assert bench.main(["--model", str(tiny_model_dir), "--queries", "2", "--k", "2", "--batch-sizes", "2,4",
                       "--caches", "static,growing", "--draws", "inverse_cdf,multinomial",
                       "--repeats", "1", "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["samples_per_s"]) == {"static/inverse_cdf", "static/multinomial", "growing/inverse_cdf",
                                             "growing/multinomial"}
    assert all(v > 0 for d in summary["samples_per_s"].values() for v in d.values())
    assert all(set(d) == {"2", "4"} for d in summary["samples_per_s"].values())
    assert summary["matmul_peak_gflop_per_s"] > 0
    assert sampling.sample_categorical is own
