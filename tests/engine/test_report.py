"""Benchmark report rendering from a report dict alone: the Markdown table and the PNG charts."""

from __future__ import annotations

import json

from worker.engine import report

PNG = b"\x89PNG\r\n\x1a\n"


def sample(with_subjects: bool = False, with_preference: bool = False) -> dict:
    ref = {
        "ppl": 12.5,
        "kl": 0.0,
        "top1_agreement": 1.0,
        "top5_agreement": 1.0,
        "parameters": 360_000_000,
        "adapter_parameters": 0,
        "size_bytes": 3 << 30,
        "compression_ratio_params": 1.0,
        "compression_ratio_size": 1.0,
    }
    small = {
        "ppl": 20.25,
        "kl": 0.4321,
        "top1_agreement": 0.6,
        "top5_agreement": 0.9,
        "parameters": 180_000_000,
        "adapter_parameters": 1_500_000,
        "size_bytes": 1 << 30,
        "compression_ratio_params": 1.99,
        "compression_ratio_size": 3.0,
    }
    if with_subjects:
        ref["mcq_accuracy"], small["mcq_accuracy"] = 0.75, 0.5
        ref["mcq_by_subject"] = {"math": {"accuracy": 1.0, "n": 2}, "art": {"accuracy": 0.5, "n": 2}}
        small["mcq_by_subject"] = {"math": {"accuracy": 0.5, "n": 2}, "art": {"accuracy": 0.5, "n": 2}}
    if with_preference:
        ref.update(
            pref_accuracy=0.3,
            pref_accuracy_norm=0.8,
            pref_agreement=1.0,
            pref_agreement_norm=1.0,
            pref_ties=0,
            pref_ties_norm=0,
            pref_n=10,
            pref_by_subject={"helpful": {"accuracy": 0.25, "accuracy_norm": 0.75, "n": 4}},
        )
        small.update(
            pref_accuracy=0.45,
            pref_accuracy_norm=0.55,
            pref_agreement=0.65,
            pref_agreement_norm=0.7,
            pref_ties=1,
            pref_ties_norm=0,
            pref_n=10,
            pref_by_subject={"helpful": {"accuracy": 0.5, "accuracy_norm": 0.625, "n": 4}},
        )
    return {
        "reference": "teacher",
        "created_at": "2025-01-01T00:00:00+00:00",
        "kl_method": "full",
        "data": {"text": {"file": "valid.jsonl", "format": "text", "records": 3}},
        "candidates": [
            {"label": "teacher", "model": "m-teacher", "adapter": None, "is_reference": True, "metrics": ref},
            {"label": "small", "model": "m-small", "adapter": "job-1", "is_reference": False, "metrics": small},
        ],
    }


def test_markdown_table_keeps_only_columns_with_data():
    md = report.write_markdown(sample())
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert header == "| model | ppl | KL | top-1 | top-5 | params | size | compression (params / size) |"
    assert "| **teacher** | 12.5 | 0.0000 | 100.0% | 100.0% | 360M | 3 GiB | 1.00× / 1.00× |" in md
    assert "| small | 20.2 | 0.4321 | 60.0% | 90.0% | 180M + 1.5M adapter | 1 GiB | 1.99× / 3.00× |" in md
    assert "adapter `job-1`" in md and "by subject" not in md


def test_markdown_subject_table():
    md = report.write_markdown(sample(with_subjects=True))
    assert "MCQ acc" in md and "## Multiple choice by subject" in md
    assert "| subject | teacher | small |" in md
    assert "| art | 50.0% (n=2) | 50.0% (n=2) |" in md and "| math | 100.0% (n=2) | 50.0% (n=2) |" in md


def test_markdown_preference_says_which_score_is_which():
    md = report.write_markdown(sample(with_preference=True))
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert "| pref acc (summed) | pref acc (per token) |" in header
    assert "| **teacher** | 12.5 | 0.0000 | 100.0% | 100.0% | 30.0% | 80.0% |" in md
    assert "## Preference\n" in md and "*summed*: over the response's tokens" in md and "*per token*" in md
    assert "A tie (exactly equal scores) counts as half a pair." in md
    assert (
        "| model | accuracy (summed) | accuracy (per token) | agreement (summed) | agreement (per token) "
        "| ties (summed / per token) |"
    ) in md
    assert "| small | 45.0% | 55.0% | 65.0% | 70.0% | 1 / 0 of 10 |" in md
    assert "## Preference by subject" in md and "| helpful | 25.0% / 75.0% (n=4) | 50.0% / 62.5% (n=4) |" in md
    assert "Multiple choice by subject" not in md


def test_charts_only_for_families_with_data(tmp_path):
    curve = tmp_path / "metrics.jsonl"
    curve.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"step": 0, "kind": "eval", "val_kl": 1.0},
                {"step": 1, "kind": "train", "loss": 3.0},
                {"step": 2, "kind": "train", "loss": 2.0},
                {"step": 2, "kind": "eval", "val_kl": 0.5},
            ]
        )
        + "\n"
    )
    assert report.read_curves(curve) == {"loss": ([1, 2], [3.0, 2.0]), "val_kl": ([0, 2], [1.0, 0.5])}

    names = report.write_charts(sample(), tmp_path, {"small": curve})
    assert names == ["quality.png", "size.png", "training.png"]  # no task or speed numbers: no such charts
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert not (tmp_path / "speed.png").exists()
    assert report.write_charts(sample(), tmp_path / ".", None) == ["quality.png", "size.png"]
    assert report.write_charts(sample(with_preference=True), tmp_path, None) == ["quality.png", "tasks.png", "size.png"]


def test_charts_leave_pyplot_and_the_backend_alone(tmp_path):
    import sys

    import matplotlib

    # (matplotlib.get_backend() itself imports pyplot, so the setting is read raw)
    had_pyplot, backend = "matplotlib.pyplot" in sys.modules, matplotlib.rcParams._get_backend_or_none()
    report.write_charts(sample(), tmp_path)
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
    assert matplotlib.rcParams._get_backend_or_none() == backend
