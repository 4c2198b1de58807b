"""The `compare` job's report: its arms' results (child distill jobs, and their benchmarks) in one table.

The arms ran as ordinary distill jobs on the same data, steps and seed (service.core.lifecycle makes them when
the compare job is created; the compare job runs once they have all finished). This reads what they recorded
and writes `compare.json`, `compare.md` and `compare.png` (the held-out KL to each teacher, and the
perplexity, per arm) in the compare job's folder. With `domains` it also scores each arm's shipped student on
each domain's held-out text against every teacher run online (engine.held_out), with the teachers' own
perplexity there: the teacher that knows a domain better is the one a student should follow on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sqlalchemy import select

from distillery_contract.jobs import DISTILLED_LABEL
from service.core.db.models import Job, JobEvent
from service.core.db.session import session_scope


def arm_rows(compare_id: str) -> list[dict]:
    """One row per arm, in the spec's order: its job, status, scores before and after, weights, benchmark."""
    with session_scope() as session:
        made = session.scalars(
            select(JobEvent).where(JobEvent.job_id == compare_id, JobEvent.kind == "arms").order_by(JobEvent.id)
        ).first()
        arms = made.data["arms"] if made is not None else []
        compare = session.get(Job, compare_id)
        base_teachers = [t["model"] for t in compare.spec["base"]["teachers"]] if compare is not None else []
        rows = []
        for arm in arms:
            child = session.get(Job, arm["job_id"])
            if child is None:
                continue
            bench = session.scalars(select(Job).where(Job.parent_id == child.id, Job.kind == "benchmark")).first()
            rows.append(_row(arm["name"], child, bench, base_teachers))
    return rows


def _row(name: str, child: Job, bench: Job | None, base_teachers: list[str]) -> dict:
    s = child.summary or {}
    initial, final = s.get("initial") or {}, s.get("final") or {}
    row = {
        "arm": name,
        "job_id": child.id,
        "status": child.status,
        "teachers": [t["model"] for t in child.spec["teachers"]],
        "teacher_weighting": child.spec.get("teacher_weighting", "fixed"),
        "best_step": (s.get("best") or {}).get("step"),
        "val_kl": [initial.get("val_kl"), final.get("val_kl")],
        "val_ppl": [initial.get("val_ppl"), final.get("val_ppl")],
        "val_kl_teachers": final.get("val_kl_teachers"),
        "teacher_weights": final.get("teacher_weights"),
        "warnings": [w["code"] for w in s.get("warnings", [])],
    }
    # the KL to each of the base's teachers, in its order (a one-teacher arm: its val KL, in its teacher's place)
    kl_to: list[float | None] = [None] * len(base_teachers)
    if row["val_kl_teachers"]:
        kl_to = list(row["val_kl_teachers"])
    elif len(row["teachers"]) == 1 and row["teachers"][0] in base_teachers:
        kl_to[base_teachers.index(row["teachers"][0])] = final.get("val_kl")
    row["kl_to_teachers"] = kl_to
    if bench is not None:
        metrics = ((bench.summary or {}).get("metrics") or {}).get(DISTILLED_LABEL)
        row["benchmark"] = {"job_id": bench.id, "status": bench.status, "metrics": metrics}
    return row


def _num(value, fmt: str = ".4f") -> str:
    return "–" if value is None else f"{value:{fmt}}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Comparison",
        "",
        "| arm | teachers | weighting | val KL before → after | perplexity before → after | KL to each teacher "
        "| mean weights | shipped step | benchmark KL / ppl |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kl, ppl = r["val_kl"], r["val_ppl"]
        each = " / ".join(_num(x) for x in r["kl_to_teachers"]) or "–"
        weights = " / ".join(_num(x, ".3f") for x in r["teacher_weights"] or []) or "–"
        m = (r.get("benchmark") or {}).get("metrics") or {}
        bench = f"{_num(m.get('kl'))} / {_num(m.get('ppl'), '.2f')}" if m else "–"
        lines.append(
            f"| {r['arm']} | {len(r['teachers'])} | {r['teacher_weighting']} | {_num(kl[0])} → {_num(kl[1])} | "
            f"{_num(ppl[0], '.2f')} → {_num(ppl[1], '.2f')} | {each} | {weights} | {_num(r['best_step'], 'd')} "
            f"| {bench} |"
        )
    failed = [r["arm"] for r in rows if r["status"] != "succeeded"]
    if failed:
        lines += ["", f"Did not succeed: {', '.join(failed)} (see those jobs)."]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> bool:
    """Held-out KL to each teacher and perplexity per arm (bars); False when no arm has numbers."""
    shown = [r for r in rows if r["val_kl"][1] is not None]
    if not shown:
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    kl_ax, ppl_ax = fig.subplots(1, 2)
    names = [r["arm"] for r in shown]
    n_teachers = max(len(r["kl_to_teachers"]) for r in shown) or 1
    width = 0.8 / n_teachers
    for t in range(n_teachers):
        values = [(r["kl_to_teachers"][t] if t < len(r["kl_to_teachers"]) else None) or 0.0 for r in shown]
        kl_ax.bar([i + t * width for i in range(len(shown))], values, width, label=f"teacher {t}")
    kl_ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shown))], names, rotation=20)
    kl_ax.set_title("held-out KL to each teacher")
    kl_ax.legend()
    ppl_ax.bar(names, [r["val_ppl"][1] for r in shown], color="C2")
    ppl_ax.set_title("held-out perplexity")
    ppl_ax.tick_params(axis="x", rotation=20)
    fig.savefig(path, dpi=110)
    return True


def domain_scores(
    rows: list[dict],
    teachers: list[Path],
    domains: dict[str, Path],
    student_of,
    adapter_of,
    max_seq_len: int,
    on_unit=None,
) -> dict:
    """{"teachers": {domain: [each teacher's perplexity]}, "arms": {arm: {domain: scores, "overall": ...}}}:
    the teachers loaded once, each succeeded arm's student (with its adapter) in turn."""
    from worker.engine import held_out

    loaded = [held_out.load_for_eval(t) for t in teachers]
    models = [m for m, _ in loaded]
    out: dict = {"teachers": {}, "arms": {}}
    for name, path in domains.items():
        out["teachers"][name] = [held_out.scores(m, tok, [], path, max_seq_len)["ppl"] for m, tok in loaded]
    for row in rows:
        if row["status"] != "succeeded":
            continue
        model, tok = held_out.load_for_eval(student_of(row["job_id"]), adapter_of(row["job_id"]))
        per = {name: held_out.scores(model, tok, models, path, max_seq_len) for name, path in domains.items()}
        total = sum(p["tokens"] for p in per.values()) or 1
        better = {d: min(range(len(teachers)), key=lambda i: out["teachers"][d][i]) for d in domains}
        per["overall"] = {
            "kl": [sum(p["kl"][i] * p["tokens"] for p in per.values()) / total for i in range(len(teachers))],
            "kl_to_better": sum(per[d]["kl"][better[d]] * per[d]["tokens"] for d in domains) / total,
            "ppl": math.exp(sum(math.log(p["ppl"]) * p["tokens"] for p in per.values()) / total),
            "tokens": total,
        }
        out["arms"][row["arm"]] = per
        del model
        if on_unit:
            on_unit()
    return out


def domain_markdown(scored: dict) -> str:
    domains = list(scored["teachers"])
    lines = [
        "",
        "## Per domain",
        "",
        "Teachers' own perplexity: "
        + "; ".join(f"{d}: " + " / ".join(f"{p:.2f}" for p in ppl) for d, ppl in scored["teachers"].items()),
        "",
    ]
    head = " | ".join(f"{d}: KL to each teacher | {d}: ppl" for d in domains)
    lines += [
        f"| arm | {head} | KL to each domain's better teacher | ppl |",
        "|---|" + "---|---|" * len(domains) + "---|---|",
    ]
    for arm, per in scored["arms"].items():
        cells = " | ".join(" / ".join(f"{x:.4f}" for x in per[d]["kl"]) + f" | {per[d]['ppl']:.2f}" for d in domains)
        lines.append(f"| {arm} | {cells} | {per['overall']['kl_to_better']:.4f} | {per['overall']['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(compare_id: str, out_dir: Path, scored_domains=None) -> dict:
    rows = arm_rows(compare_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"arms": rows}
    text = markdown(rows)
    if scored_domains is not None:
        scored = scored_domains(rows)
        report["domains"] = scored
        text += domain_markdown(scored)
    (out_dir / "compare.json").write_text(json.dumps(report, indent=2))
    (out_dir / "compare.md").write_text(text)
    report["chart"] = "compare.png" if chart(rows, out_dir / "compare.png") else None
    return report
