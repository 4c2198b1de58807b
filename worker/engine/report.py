"""A benchmark's report rendered for people: a Markdown comparison table and PNG charts.

Works from `report.json`'s dict alone (benchmark_results.py builds it), so a report can be re-rendered later.
Charts use matplotlib's object API (`matplotlib.figure.Figure`, saved through the Agg canvas): no pyplot, no
backend switch, nothing global changed for other importers of matplotlib.
"""

from __future__ import annotations

import json
from pathlib import Path


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _count(v: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return _num(v / div) + unit
    return f"{v:.0f}"


def _bytes(v: float) -> str:
    for div, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(v) >= div:
            return f"{_num(v / div)} {unit}"
    return f"{v:.0f} B"


def _params(m: dict) -> str | None:
    if m.get("parameters") is None:
        return None
    extra = m.get("adapter_parameters") or 0
    return _count(m["parameters"]) + (f" + {_count(extra)} adapter" if extra else "")


def _compression(m: dict) -> str | None:
    p, s = m.get("compression_ratio_params"), m.get("compression_ratio_size")
    if p is None and s is None:
        return None
    return " / ".join("–" if v is None else f"{v:.2f}×" for v in (p, s))


# (header, how a row's metrics become the cell; None = no data)
COLUMNS = [
    ("ppl", lambda m: _num(m["ppl"]) if "ppl" in m else None),
    ("KL", lambda m: f"{m['kl']:.4f}" if "kl" in m else None),
    ("top-1", lambda m: _pct(m["top1_agreement"]) if "top1_agreement" in m else None),
    ("top-5", lambda m: _pct(m["top5_agreement"]) if "top5_agreement" in m else None),
    ("MCQ acc", lambda m: _pct(m["mcq_accuracy"]) if "mcq_accuracy" in m else None),
    ("pref acc (summed)", lambda m: _pct(m["pref_accuracy"]) if "pref_accuracy" in m else None),
    ("pref acc (per token)", lambda m: _pct(m["pref_accuracy_norm"]) if "pref_accuracy_norm" in m else None),
    ("harmless acc", lambda m: _pct(m["pref_harmless_accuracy"]) if "pref_harmless_accuracy" in m else None),
    ("reverse KL on samples", lambda m: f"{m['sample_reverse_kl']:.4f}" if "sample_reverse_kl" in m else None),
    ("prefill tok/s", lambda m: _num(m["prefill_tokens_per_second"]) if "prefill_tokens_per_second" in m else None),
    ("decode tok/s", lambda m: _num(m["decode_tokens_per_second"]) if "decode_tokens_per_second" in m else None),
    ("peak memory", lambda m: _bytes(m["peak_memory_bytes"]) if "peak_memory_bytes" in m else None),
    ("params", _params),
    ("size", lambda m: _bytes(m["size_bytes"]) if "size_bytes" in m else None),
    ("compression (params / size)", _compression),
]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


PREF_NOTE = (
    "Each response is scored by log p(response | prompt). *summed*: over the response's tokens, so a "
    "longer response scores lower and a model that favours short answers can fall below chance; "
    "*per token*: that sum divided by the response's token count (length-normalised). Accuracy: chosen "
    "scores higher than rejected; agreement: the model orders the pair as the reference does. "
    "A tie (exactly equal scores) counts as half a pair."
)


def _pref_table(rows: list[dict]) -> list[str]:
    """Preference accuracy and agreement, both scorings, and the ties behind them."""
    shown = [r for r in rows if "pref_accuracy" in r["metrics"]]
    if not shown:
        return []
    header = [
        "model",
        "accuracy (summed)",
        "accuracy (per token)",
        "agreement (summed)",
        "agreement (per token)",
        "ties (summed / per token)",
    ]

    def line(r):
        m = r["metrics"]
        values = [m.get(k) for k in ("pref_accuracy", "pref_accuracy_norm", "pref_agreement", "pref_agreement_norm")]
        ties = f"{m.get('pref_ties', '–')} / {m.get('pref_ties_norm', '–')} of {m.get('pref_n', '–')}"
        return [r["label"]] + [_pct(v) if v is not None else "–" for v in values] + [ties]

    return ["", "## Preference", "", PREF_NOTE, "", _table(header, [line(r) for r in shown])]


def _subject_table(rows: list[dict], key: str, title: str) -> list[str]:
    """Accuracy per subject, one column per model; `summed / per token` when both scorings are there."""
    subjects = sorted({s for r in rows for s in r["metrics"].get(key, {})})
    if not subjects:
        return []
    both = any("accuracy_norm" in v for r in rows for v in r["metrics"].get(key, {}).values())

    def cell(r, s):
        v = r["metrics"].get(key, {}).get(s)
        if not v:
            return "–"
        norm = f" / {_pct(v['accuracy_norm'])}" if "accuracy_norm" in v else ""
        return f"{_pct(v['accuracy'])}{norm} (n={v['n']})"

    note = ["Each cell: accuracy summed / per token (length-normalised), and the subject's count.", ""] if both else []
    return [
        "",
        f"## {title}",
        "",
        *note,
        _table(["subject"] + [r["label"] for r in rows], [[s] + [cell(r, s) for r in rows] for s in subjects]),
    ]


def write_markdown(report: dict) -> str:
    """The comparison table (one row per label; columns without any data left out), preference details, the
    per-subject accuracy when the data has subjects, the charts, and what each number means."""
    rows = report["candidates"]
    cells = [[fn(r["metrics"]) for _, fn in COLUMNS] for r in rows]
    keep = [j for j in range(len(COLUMNS)) if any(c[j] is not None for c in cells)]
    ref = next(r for r in rows if r["label"] == report["reference"])
    name = lambda r: f"**{r['label']}**" if r is ref else r["label"]  # noqa: E731
    out = [
        "# Benchmark",
        "",
        f"Reference: **{ref['label']}** (`{ref['model']}`), the bold row. Created {report.get('created_at', '')}; "
        f"KL over the {report.get('kl_method', 'full')} vocabulary at T = 1.",
        "",
    ]
    for slot, d in report.get("data", {}).items():
        out.append(f"- `{slot}`: {d['file']} ({d['format']}, {d['records']} records)")
    out += [
        "",
        _table(
            ["model"] + [COLUMNS[j][0] for j in keep],
            [[name(r)] + [c[j] or "–" for j in keep] for r, c in zip(rows, cells)],
        ),
        "",
    ]
    for r in rows:
        extra = [f"model `{r['model']}`"] + ([f"adapter `{r['adapter']}`"] if r.get("adapter") else [])
        out.append(f"- {r['label']}: " + ", ".join(extra))
    out += _subject_table(rows, "mcq_by_subject", "Multiple choice by subject")
    out += _pref_table(rows)
    out += _subject_table(rows, "pref_by_subject", "Preference by subject")
    if report.get("charts"):
        out += ["", "## Charts", ""] + [f"![{Path(c).stem}]({c})" for c in report["charts"]]
    if report.get("definitions"):
        out += ["", "## Definitions", ""] + [f"- `{k}`: {v}" for k, v in report["definitions"].items()]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ charts

# file → (title, [(panel title, metric key, log scale, value format)])
BAR_CHARTS = {
    "quality.png": (
        "Quality vs the reference",
        [
            ("perplexity (log)", "ppl", True, _num),
            ("KL(reference ‖ model)", "kl", False, lambda v: f"{v:.3f}"),
            ("top-1 agreement", "top1_agreement", False, _pct),
            ("top-5 agreement", "top5_agreement", False, _pct),
            ("KL(model ‖ reference) on its samples", "sample_reverse_kl", False, lambda v: f"{v:.3f}"),
        ],
    ),
    "tasks.png": (
        "Tasks",
        [
            ("MCQ accuracy (summed)", "mcq_accuracy", False, _pct),
            ("MCQ accuracy (per token)", "mcq_accuracy_norm", False, _pct),
            ("preference accuracy (summed)", "pref_accuracy", False, _pct),
            ("preference accuracy (per token)", "pref_accuracy_norm", False, _pct),
        ],
    ),
    "speed.png": (
        "Speed and memory",
        [
            ("prefill tokens/s", "prefill_tokens_per_second", False, _num),
            ("decode tokens/s", "decode_tokens_per_second", False, _num),
            ("peak memory", "peak_memory_bytes", False, _bytes),
        ],
    ),
    "size.png": (
        "Size",
        [
            ("parameters", "parameters", False, _count),
            ("size on disk", "size_bytes", False, _bytes),
            ("compression (params)", "compression_ratio_params", False, lambda v: f"{v:.2f}×"),
        ],
    ),
}


def write_charts(report: dict, out_dir: Path, curves: dict[str, Path] | None = None) -> list[str]:
    """Bar charts per metric family with data, and training curves of the candidates that have a
    metrics.jsonl. Returns the names of the PNG files written into `out_dir`."""
    out_dir = Path(out_dir)
    written = []
    for name, (title, panels) in BAR_CHARTS.items():
        if _bar_chart(report["candidates"], panels, title, out_dir / name):
            written.append(name)
    if curves and _training_chart(curves, out_dir / "training.png"):
        written.append("training.png")
    return written


def _figure(n_panels: int, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0 * n_panels, 5.0), height), layout="constrained")
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def _bar_chart(rows: list[dict], panels: list, title: str, path: Path) -> bool:
    panels = [p for p in panels if any(r["metrics"].get(p[1]) is not None for r in rows)]
    if not panels:
        return False
    fig, axes = _figure(len(panels))
    for ax, (panel_title, key, log, fmt) in zip(axes, panels):
        shown = [r for r in rows if r["metrics"].get(key) is not None]
        values = [float(r["metrics"][key]) for r in shown]
        colors = ["0.6" if r.get("is_reference") else "C0" for r in shown]
        bars = ax.bar(range(len(shown)), values, color=colors)
        ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=8)
        ax.set_xticks(
            range(len(shown)),
            [r["label"] for r in shown],
            rotation=30 if len(shown) > 3 else 0,
            ha="right" if len(shown) > 3 else "center",
            fontsize=8,
        )
        if log and all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.margins(y=0.15)
        ax.set_title(panel_title, fontsize=10)
    fig.suptitle(title + " (grey: the reference)")
    fig.savefig(path, dpi=100)
    return True


def read_curves(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """From a distill run's metrics.jsonl: {"loss": (steps, train losses), "val_kl": (steps, values)}."""
    curves: dict[str, tuple[list[int], list[float]]] = {"loss": ([], []), "val_kl": ([], [])}
    for line in Path(path).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        key = {"train": "loss", "eval": "val_kl"}.get(r.get("kind"))
        if key and r.get(key) is not None and r.get("step") is not None:
            curves[key][0].append(int(r["step"]))
            curves[key][1].append(float(r[key]))
    return curves


def _training_chart(paths: dict[str, Path], path: Path) -> bool:
    from matplotlib.ticker import MaxNLocator

    curves = {label: read_curves(p) for label, p in paths.items()}
    if not any(c[k][0] for c in curves.values() for k in c):
        return False
    fig, axes = _figure(2)
    for ax, key, title in zip(axes, ("loss", "val_kl"), ("training loss", "validation KL")):
        for label, c in curves.items():
            steps, values = c[key]
            if steps:
                ax.plot(steps, values, marker="o" if key == "val_kl" else None, markersize=3, label=label)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle("Training curves")
    fig.savefig(path, dpi=100)
    return True
