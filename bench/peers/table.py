"""The peers' figures: medians of the rounds, ratios to nsqjobs, ``peers.json``, ``peers.md``
and the chart ``peers.png``."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nsqjobs_tasks import impl

from bench import report
from bench.peers.base import Peer
from bench.peers.jobs import PRIMES_STOP

RATES = ("enqueue_single", "enqueue_bulk", "drain_results", "drain_no_results")
CPU = ("cpu_python", "cpu_cython")
COUNTED = ("drain_results", "drain_no_results", "latency", "cpu_python", "cpu_cython")
Rounds = list[dict[str, dict[str, Any]]]


def brief(figures: dict[str, Any]) -> str:
    """One progress line's worth of a measurement."""
    if "p50_ms" in figures:
        return "p50 {p50_ms:.2f} ms, p90 {p90_ms:.2f}, p99 {p99_ms:.2f}".format(**figures)
    extra = ""
    if "lost" in figures:
        extra = f", {figures['lost']} lost, {figures['duplicated']} duplicated"
        if figures.get("results_stored") is not None:
            extra += f", {figures['results_stored']} results"
    return f"{figures['rate']:,.0f} jobs/s{extra}"


def describe(peers: Sequence[Peer]) -> dict[str, dict[str, Any]]:
    """Version, broker, producer and settings of each peer."""
    return {
        p.key: {
            "label": p.label,
            "version": p.version(),
            "broker": p.broker,
            "producer": p.producer or "its own client library, in this process",
            "settings": p.settings,
        }
        for p in peers
    }


def primes_reference() -> dict[str, float]:
    """Seconds one primes job takes in this process, per kernel (median of 3): a cpu drain at
    full efficiency does 2 / that many jobs per second."""
    out = {}
    for kernel in ("python", "cython"):
        fn = impl.function("primes", "count_primes", kernel)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn(0, PRIMES_STOP)
            times.append(time.perf_counter() - t)
        out[kernel] = statistics.median(times)
    return out


def summarise(rounds: Rounds, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per peer and measurement: the median over rounds, the failures, the lost/duplicated
    totals."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        peer: dict[str, Any] = {}
        names = {name for rnd in rounds for name in rnd.get(key, {})}
        for name in sorted(names):
            got = [rnd[key][name] for rnd in rounds if name in rnd.get(key, {})]
            ok = [g for g in got if "error" not in g]
            entry: dict[str, Any] = {"rounds": len(ok)}
            errors = [g["error"] for g in got if "error" in g]
            if errors:
                entry["errors"] = errors
            for field in ("rate", "p50_ms", "p90_ms", "p99_ms", "seconds"):
                values = [g[field] for g in ok if field in g]
                if values:
                    entry[field] = statistics.median(values)
                    entry[f"{field}_all"] = values
            for field in ("lost", "duplicated", "late_sends"):
                if any(field in g for g in ok):
                    entry[field] = sum(int(g.get(field, 0)) for g in ok)
            stored = [g["results_stored"] for g in ok if g.get("results_stored") is not None]
            if stored:
                entry["results_stored_min"] = min(stored)
                entry["jobs"] = ok[0]["jobs"]
            peer[name] = entry
        out[key] = peer
    # The ratio to nsqjobs: the median of the per-round ratios, over the rounds in which both
    # succeeded (rounds interleave the peers, so each round's pair ran under the same load).
    for key, peer in out.items():
        for name, entry in peer.items():
            field = "p50_ms" if name == "latency" else "rate"
            ratios = []
            for rnd in rounds:
                mine = rnd.get(key, {}).get(name)
                base = rnd.get("nsqjobs", {})
                ours = base.get(name)
                if name == "drain_no_results" and ours is None:  # nsqjobs always stores results
                    ours = base.get("drain_results")
                if not mine or not ours or "error" in mine or "error" in ours:
                    continue
                if mine.get(field) is not None and ours.get(field):
                    ratios.append(mine[field] / ours[field])
            if ratios:
                entry["ratio_to_nsqjobs"] = statistics.median(ratios)
                entry["ratios_to_nsqjobs"] = ratios
    return out


def _fmt_rate(entry: dict[str, Any] | None, key: str) -> str:
    if not entry:
        return "n/a"
    if "rate" not in entry:
        return "failed"
    rate = entry["rate"]
    text = f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}"
    if key != "nsqjobs" and "ratio_to_nsqjobs" in entry:
        text += f" ({_ratio(entry['ratio_to_nsqjobs'])})"
    return text + _short(entry)


def _ratio(r: float) -> str:
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


def _short(entry: dict[str, Any]) -> str:
    """A mark on a median of fewer rounds than the run had (some failed)."""
    return " †" if entry.get("errors") else ""


def markdown(header: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    """``peers.md``: the table, the ratios, the settings, what was lost or run twice."""
    peers = header["peers"]
    sizes = header["sizes"]
    ref = header["primes_in_process_s"]
    lines = [
        "# nsqjobs and its peers",
        "",
        f"`{header['command']}`: {header['date']}, {header['cpu_model']}, {header['cores']} "
        f"cores, Python {header['python']}; {sizes['rounds']} round(s), medians, peers "
        f"interleaved; {header['duration_s']} s. Load average per round (1, 5, 15 min): "
        + "; ".join("/".join(f"{x:g}" for x in la) for la in header["load_average"])
        + ".",
        "",
        "Rates in jobs/s (higher is better), latency in ms (lower is better), medians over "
        "the rounds; in brackets the ratio to nsqjobs' figure, the median of the per-round "
        "ratios over the rounds both completed (the drain without results is compared with "
        "nsqjobs' drain, which always stores results; latency compares the p50). nsqjobs' "
        "enqueue, single is Client.sender().submit(): one call per job, sent in batches by "
        "the client (its blocking submit(), one request a job, is given below the table).",
        "",
        "| peer | enqueue, single | enqueue, bulk | drain, results | drain, no results "
        "| latency p50 / p90 / p99 ms | cpu, Python | cpu, Cython |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for key, figures in summary.items():
        lat = figures.get("latency", {})
        if "p50_ms" in lat:
            latency = f"{lat['p50_ms']:.2f} / {lat['p90_ms']:.2f} / {lat['p99_ms']:.2f}"
            if key != "nsqjobs" and "ratio_to_nsqjobs" in lat:
                latency += f" ({_ratio(lat['ratio_to_nsqjobs'])})"
            latency += _short(lat)
        else:
            latency = "failed" if lat else "n/a"
        cells = [_fmt_rate(figures.get(name), key) for name in RATES]
        cells += [_fmt_rate(figures.get(name), key) for name in CPU]
        row = [peers[key]["label"], *cells[:4], latency, *cells[4:]]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"- enqueue: {sizes['enqueue_jobs']:,} no-op jobs from one producer in the bench "
        "process, no worker running; bulk is the peer's bulk call (see settings).",
        f"- drain: {sizes['drain_jobs']:,} no-op jobs enqueued first, then one worker started; "
        "the clock runs from the first job done to the last (worker start-up excluded). "
        "Every job appends its number to a file, so each peer is timed and counted alike.",
        f"- latency: {sizes['latency_rate']:g} jobs/s for {sizes['latency_seconds']:g} s, one "
        "producer, each job's result awaited (submit to result seen by the producer).",
        f"- cpu: {sizes['cpu_jobs_python']} (Python) / {sizes['cpu_jobs_compiled']} (Cython) "
        "jobs counting the primes below 10^7 with the kernels of `primes.count`, 2 slots, "
        "enqueued once the workers are ready; the clock runs from the enqueue to the last job "
        f"done. One job in the bench process took {ref.get('python', 0) * 1000:.0f} ms "
        f"(Python) and {ref.get('cython', 0) * 1000:.1f} ms (Cython) at the start of the run.",
        *_blocking_note(summary, peers),
        "- † a median of fewer rounds than the run had: see Failures.",
        "",
        "## Lost and duplicated jobs, results stored",
        "",
        "| peer | measurement | lost | run twice | results stored (min over rounds) |",
        "|---|---|--:|--:|--:|",
    ]
    for key, figures in summary.items():
        for name in COUNTED:
            entry = figures.get(name)
            if not entry or "lost" not in entry:
                continue
            stored = entry.get("results_stored_min")
            stored_text = "-" if stored is None else f"{stored:,} of {entry.get('jobs', 0):,}"
            lines.append(
                f"| {peers[key]['label']} | {name} | {entry['lost']} | {entry['duplicated']} "
                f"| {stored_text} |"
            )
    failures = [
        f"- {peers[key]['label']} {name}: failed in {len(entry['errors'])} of "
        f"{sizes['rounds']} rounds; first: {entry['errors'][0][:160]}"
        for key, figures in summary.items()
        for name, entry in figures.items()
        if entry.get("errors")
    ]
    if failures:
        lines += ["", "## Failures", "", *failures]
    lines += ["", "## Versions and settings", ""]
    for info in peers.values():
        lines.append(
            f"**{info['label']}** {info['version']}, broker {info['broker']}; "
            f"producer: {info['producer']}."
        )
        lines += [f"- {k}: {v}" for k, v in info["settings"].items()]
        lines.append("")
    return "\n".join(lines)


def _blocking_note(summary: dict[str, dict[str, Any]], peers: dict[str, Any]) -> list[str]:
    """A line per peer whose single enqueue also has a blocking form, with its rate."""
    lines = []
    for key, figures in summary.items():
        entry = figures.get("enqueue_single_blocking")
        if entry:
            lines.append(
                f"- {peers[key]['label']}, enqueue single: the figure is the call that returns "
                "at once, every job's acceptance awaited before the clock stops; its blocking "
                "form (one round trip per job, accepted when it returns): "
                f"{_fmt_rate(entry, 'nsqjobs')} jobs/s."
            )
    return lines


def chart(summary: dict[str, dict[str, Any]], peers: dict[str, Any], path: Path) -> None:
    """``peers.png``: drain, enqueue and CPU rates and latency, log scales, one bar per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    keys = list(summary)
    labels = [peers[k]["label"] for k in keys]
    panels: tuple[tuple[str, tuple[tuple[str, str, str], ...]], ...] = (
        (
            "drain 20,000 no-op jobs, jobs/s",
            (("drain_results", "rate", "results stored"), ("drain_no_results", "rate", "none")),
        ),
        (
            "enqueue, jobs/s",
            (("enqueue_single", "rate", "one call each"), ("enqueue_bulk", "rate", "bulk")),
        ),
        ("latency at 50 jobs/s, ms", (("latency", "p50_ms", "p50"), ("latency", "p99_ms", "p99"))),
        (
            "primes below 10^7, 2 slots, jobs/s",
            (("cpu_python", "rate", "pure Python"), ("cpu_cython", "rate", "Cython")),
        ),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(17, 0.45 * len(keys) + 1.6))
    plain = FuncFormatter(lambda x, _: f"{x:,.0f}" if x >= 1 else f"{x:g}")
    for ax, (title, series) in zip(axes, panels, strict=True):
        height = 0.8 / len(series)
        for i, (name, field, legend) in enumerate(series):
            values = [summary[k].get(name, {}).get(field, 0.0) for k in keys]
            ax.barh([y + i * height for y in range(len(keys))], values, height, label=legend)
        ax.set_yticks([y + 0.4 - height / 2 for y in range(len(keys))])
        ax.set_yticklabels(labels if ax is axes[0] else [""] * len(keys))
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="best")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def rewrite(out: Path, *, chart_too: bool = True) -> None:
    """``peers.md`` (and the chart) again from ``peers.json``: the figures stay those measured."""
    doc = json.loads((out / "peers.json").read_text())
    header = {k: v for k, v in doc.items() if k not in ("summary", "rounds")}
    summary = summarise(doc["rounds"], list(doc["summary"]))
    write(out, header, doc["rounds"], summary, chart_too=chart_too)


def write(
    out: Path,
    header: dict[str, Any],
    rounds: Rounds,
    summary: dict[str, dict[str, Any]],
    *,
    chart_too: bool = True,
) -> None:
    """``peers.json`` and ``peers.md`` (and ``peers.png``) under ``out``."""
    doc = {**header, "summary": summary, "rounds": rounds}
    report.write_text(out / "peers.json", json.dumps(doc, indent=2) + "\n")
    report.write_text(out / "peers.md", markdown(header, summary) + "\n")
    if chart_too:
        chart(summary, header["peers"], out / "peers.png")
