"""What a run's samples come to (used by run.py): medians, min–max, ratios of medians, the
targets' pass/fail, the console table, and BENCHMARKS.md (rewritten while keeping the
*Findings* section and the sections other scripts write)."""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from workloads import Cell, Target

CONTENDERS = ("native", "pyllama", "lcp")
LABELS = {"native": "native llama.cpp", "pyllama": "pyllama", "lcp": "llama-cpp-python"}
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct Q4_1", "gemma3": "Gemma 3 270M Q4_K_M"}
# Contenders and their variants, in the order of the columns and of the "contenders" line.
ORDER = {"native": 0, "native:rpc": 1, "pyllama": 2, "pyllama:stream": 3, "pyllama:sequential": 4,
         "pyllama:rpc": 5, "lcp": 6, "lcp:stream": 7}


def contenders_of(cells: list[Cell]) -> list[str]:
    out: list[str] = []
    for c in cells:
        for k in c.runners:
            if k not in out:
                out.append(k)
    return sorted(out, key=lambda c: ORDER.get(c, 9))


# --------------------------------------------------------------------------- summaries


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def check_target(t: Target, med: dict[str, float]) -> tuple[bool | None, str]:
    """(passed, the measured value as shown); None when a contender it needs has no value."""
    va = med.get(t.a)
    vb = med.get(t.b) if t.b else None
    if va is None or (t.b and vb is None):
        return None, "n/a"
    if t.kind == "ratio_min":
        r = va / vb
        return r >= t.value, f"{r:.3f}x"
    if t.kind == "ratio_max":
        r = va / vb
        return r <= t.value, f"{r:.3f}x"
    if t.kind == "abs_max":
        return va <= t.value, f"{va:.3g}"
    if t.kind == "plus_max":
        d = va - vb
        return d <= t.value, f"{d:+.1f}"
    raise ValueError(t.kind)


def summarize(cell: Cell) -> list[dict]:
    """One row per metric of the cell (the rows of results/*.json)."""
    rows = []
    for key, label, unit, better in cell.metrics:
        stats = {}
        for c, samples in cell.samples.items():
            vals = [s[key] for s in samples if s.get(key) is not None]
            if vals:
                stats[c] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                            "n": len(vals), "samples": vals}
        if not stats:
            continue
        med = {c: s["median"] for c, s in stats.items()}
        ratios = {}
        for a, b in cell.ratio_pairs:
            if a in med and b in med and med[b]:
                ratios[f"{a}/{b}"] = med[a] / med[b]
        targets = []
        for t in cell.targets:
            if t.metric != key:
                continue
            ok, shown = check_target(t, med)
            targets.append({"text": t.text, "pass": ok, "measured": shown})
        rows.append({"model": cell.model, "workload": cell.name, "metric": key, "label": label,
                     "unit": unit, "better": better, "stats": stats, "ratios": ratios,
                     "targets": targets, "description": cell.description})
    return rows


def errors_of(cells: list[Cell]) -> list[tuple[str, str, str, str]]:
    """(model, workload, contender, message) of every runner that failed."""
    return [(c.model, c.name, k, e) for c in cells for k, e in c.errors.items()]


# --------------------------------------------------------------------------- table lines


def cell_of(stats: dict, c: str) -> str:
    s = stats.get(c)
    if not s:
        return "-"
    if s["n"] == 1:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"


def _ratio_text(ratios: dict) -> str:
    return ", ".join(f"{k.replace('pyllama', 'py').replace('native', 'nat').replace(':sequential', ':seq')} "
                     f"{v:.3f}x" for k, v in ratios.items())


def _target_text(row: dict) -> str:
    out = []
    for t in row["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        out.append(f"{mark} {t['measured']} ({t['text']})")
    return "; ".join(out)


def main_columns(contenders: list[str]) -> list[str]:
    """The table columns: native, pyllama, lcp (variants such as "pyllama:stream" get rows)."""
    return [c for c in CONTENDERS if any(k.split(":")[0] == c for k in contenders)]


def display_rows(rows: list[dict], columns: list[str]) -> list[dict]:
    """One line per row and variant: "pyllama:stream" goes into the pyllama column of a
    "<workload> (stream)" line; ratios and targets stay on the first line of the row."""
    out = []
    for r in rows:
        arrow = "↑" if r["better"] == "higher" else "↓"
        variants = [""]
        for c in r["stats"]:
            v = c.split(":", 1)[1] if ":" in c else ""
            if v not in variants:
                variants.append(v)
        first_variant = "complete" if any(v == "stream" for v in variants) else (
            "batched" if "sequential" in variants else ("local" if "rpc" in variants else ""))
        for i, v in enumerate(variants):
            label = v if v else first_variant
            vals = [cell_of(r["stats"], f"{c}:{v}" if v else c) for c in columns]
            if v and all(x == "-" for x in vals):
                continue
            out.append({
                "model": r["model"],
                "workload": r["workload"] + (f" ({label})" if label and len(variants) > 1 else ""),
                "metric": f"{r['label']} [{r['unit']}] {arrow}",
                "values": vals,
                "ratios": _ratio_text(r["ratios"]) if i == 0 else "",
                "target": _target_text(r) if i == 0 else "",
            })
    return out


# --------------------------------------------------------------------------- console


def print_table(rows: list[dict], contenders: list[str]) -> None:
    columns = main_columns(contenders)
    hdr = ["model", "workload", "metric", *columns, "ratios (medians)", "target"]
    table = [hdr]
    for d in display_rows(rows, columns):
        table.append([d["model"], d["workload"], d["metric"], *d["values"], d["ratios"], d["target"]])
    widths = [min(max(len(str(row[i])) for row in table), 72) for i in range(len(hdr))]
    for i, row in enumerate(table):
        print("  ".join(str(v)[:72].ljust(widths[j]) for j, v in enumerate(row)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_errors(cells: list[Cell]) -> None:
    errs = errors_of(cells)
    if errs:
        print("\nErrors:")
        for model, name, k, e in errs:
            print(f"  {model}/{name} {k}:\n    " + e.replace("\n", "\n    "))


# --------------------------------------------------------------------------- BENCHMARKS.md


def render_markdown(meta: dict, rows: list[dict], contenders: list[str], cells: list[Cell]) -> str:
    m = meta["machine"]
    v = meta["versions"]
    lines = [
        "# Benchmarks",
        "",
        "pyllama side by side with llama.cpp's own tools (*native*) and llama-cpp-python 0.3.36, "
        "measured in one run on one machine by `benchmarks/run.py` (see benchmarks/README.md). "
        "This file is rewritten by each full run; the *Findings* section and the *Server* and *logprobs overhead* "
        "sections (written from benchmarks/server_bench.py and benchmarks/logprobs_bench.py) are kept.",
        "",
        f"- **Date**: {meta['date']}",
        f"- **Machine**: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['mem_gib']} GiB RAM, {m['os']}, Python {m['python']}; load average at start "
        f"{' '.join(m['loadavg_at_start'] or [])}",
        f"- **Command**: `{meta['command']}`",
        f"- **Threads**: {meta['config']['threads']} everywhere; reps per measurement: {meta['config']['reps']} "
        "(interleaved native / pyllama / llama-cpp-python, each in a fresh process)",
        f"- **llama.cpp**: {v.get('llama_cpp_commit', '?')} (vendored); native tools built with "
        "`GGML_NATIVE=ON`, Release, static, PIC, `GGML_RPC=ON` (benchmarks/setup_native.sh)",
        f"- **pyllama**: {v.get('pyllama_version', '?')} at {v.get('pyllama_commit', '?')}"
        f"{' (working tree modified)' if v.get('pyllama_dirty') else ''}",
        f"- **llama-cpp-python**: {v.get('llama_cpp_python_version', 'not measured')} built from source "
        "with `CMAKE_ARGS=-DGGML_NATIVE=ON`",
        "- **Models**: " + ", ".join(f"{k} = {MODEL_NAMES.get(k, k)}" for k in meta["models"]),
        "",
        "Values are medians with min–max over the reps; ratios are of medians "
        "(for ↑ metrics > 1 means faster, for ↓ metrics < 1 means smaller/faster).",
        "",
    ]
    if meta.get("quick"):
        lines[2:2] = ["> **Quick smoke run** (tiny sizes, 1 rep): not a measurement.", ""]
    # Targets first.
    lines += ["## Targets (issues 5, 6 and 10)", "",
              "| model | workload | target | measured | result |", "|---|---|---|---|---|"]
    for r in rows:
        for t in r["targets"]:
            mark = {True: "✅ pass", False: "❌ fail", None: "n/a"}[t["pass"]]
            lines.append(f"| {r['model']} | {r['workload']} | {t['text']} | {t['measured']} | {mark} |")
    lines.append("")
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    columns = main_columns(contenders)
    for model, mrows in by_model.items():
        title = "Import time" if model == "-" else f"{MODEL_NAMES.get(model, model)} ({model})"
        lines += [f"## {title}", "",
                  "| workload | metric | " + " | ".join(LABELS.get(c, c) for c in columns)
                  + " | ratios | target |",
                  "|---|---|" + "---|" * len(columns) + "---|---|"]
        for d in display_rows(mrows, columns):
            lines.append(f"| {d['workload']} | {d['metric']} | " + " | ".join(d["values"])
                         + f" | {d['ratios']} | {d['target']} |")
        lines.append("")
    lines += ["## What each workload measures", ""]
    seen = set()
    for c in cells:
        key = re.sub(r"\d+$", "N", c.name)
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"- **{c.name}**: {c.description}")
    lines.append("")
    warns = [(c.model, c.name, w) for c in cells for w in dict.fromkeys(c.warnings)]
    if warns:
        lines += ["## Warnings in this run", ""]
        for model, name, w in warns:
            lines.append(f"- {model}/{name} {w}")
        lines.append("")
    errs = errors_of(cells)
    if errs:
        lines += ["## Errors in this run", ""]
        for model, name, k, e in errs:
            lines.append(f"- {model}/{name} {k}: `{e.splitlines()[0][:200]}`")
        lines.append("")
    return "\n".join(lines)


FINDINGS_RE = re.compile(r"^## Findings\b.*?(?=^## (?!Findings)|\Z)", re.S | re.M)
SECTION_RE = re.compile(r"^## (.*?)\n.*?(?=^## |\Z)", re.S | re.M)
# Sections render_markdown writes; every other "## " section of the old file was written by hand
# or by benchmarks/server_bench.py / benchmarks/logprobs_bench.py, and is kept.
GENERATED = re.compile(r"Targets \(|Import time$|What each workload measures$|Warnings in this run$|"
                       r"Errors in this run$|" + "|".join(re.escape(n) for n in MODEL_NAMES.values()) + r" \(")


def write_markdown(text: str, path: Path) -> None:
    """Write the rendered tables to `path`, then every section of the file already there that
    run.py does not generate (Server, logprobs overhead, hand-written notes), in their order,
    then its Findings (or a stub when there is none)."""
    findings = "## Findings\n\n_Profiling notes: where pyllama falls short, what was found and fixed._\n"
    kept: list[str] = []
    if path.exists():
        old = path.read_text()
        m = FINDINGS_RE.search(old)
        if m:
            findings = m.group(0).rstrip() + "\n"
        kept = [s.group(0).rstrip() + "\n" for s in SECTION_RE.finditer(old)
                if not GENERATED.match(s.group(1)) and not s.group(1).startswith("Findings")]
    path.write_text(text.rstrip() + "\n\n" + "".join(k + "\n" for k in kept) + findings)
