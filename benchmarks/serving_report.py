"""The serving benchmark's summary (ratios against the same run's baselines, targets) and markdown tables."""

from __future__ import annotations

from typing import Any

from benchmarks.serving_load import Point, ratio


def _find(points: list[Point], system: str, model: str, concurrency: int) -> Point | None:
    for point in points:
        if (point.system, point.model, point.concurrency) == (system, model, concurrency):
            return point
    return None


def _rps(point: Point | None) -> float | None:
    return point.throughput if point is not None and point.requests else None


def _p50(point: Point | None) -> float | None:
    return point.percentile(50) if point is not None else None


def _p99(point: Point | None) -> float | None:
    return point.percentile(99) if point is not None else None


def _target(value: float | None, target: float, at_most: bool = False) -> dict[str, Any]:
    bound = "target_at_most" if at_most else "target"
    return {"ratio": _round(value), bound: target, "verdict": _verdict(value, target, at_most)}


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _verdict(value: float | None, target: float, at_most: bool = False) -> str:
    if value is None:
        return "not measured"
    return "met" if (value <= target if at_most else value >= target) else "missed"


def summarize(
    points: list[Point], raw: dict[str, Any], streaming: dict[str, Any] | None, targets: dict[str, float]
) -> dict[str, Any]:
    """The ratios the README reports, each with its target and verdict where it has one."""
    maas32, ray32 = _find(points, "maas", "mlp", 32), _find(points, "ray-serve", "mlp", 32)
    bare32, batched32 = _find(points, "bare", "mlp", 32), _find(points, "bare-batched", "mlp", 32)
    maas1, bare1 = _find(points, "maas", "mlp", 1), _find(points, "bare", "mlp", 1)
    maas8, bare8 = _find(points, "maas", "mlp", 8), _find(points, "bare", "mlp", 8)
    mlp_raw = raw.get("mlp", [])
    raw_best = max(mlp_raw, key=lambda r: r["samples_per_s"]) if mlp_raw else None
    transformer_raw = raw.get("transformer", [])
    transformer_best = max(transformer_raw, key=lambda r: r["samples_per_s"]) if transformer_raw else None
    transformer = _find(points, "maas", "transformer", 32)
    summary: dict[str, Any] = {
        "mlp": {
            "maas_vs_ray_serve_c32": _target(ratio(_rps(maas32), _rps(ray32)), targets["maas_vs_ray_c32"]),
            "maas_vs_bare_c32": _target(ratio(_rps(maas32), _rps(bare32)), targets["maas_vs_bare_c32"]),
            "maas_vs_bare_c8": _target(ratio(_rps(maas8), _rps(bare8)), targets["maas_vs_bare_c8"]),
            "maas_p50_vs_bare_p50_c1": _target(
                ratio(_p50(maas1), _p50(bare1)), targets["maas_p50_vs_bare_c1_max"], at_most=True
            ),
            "maas_p99_vs_bare_p99_c32": _target(
                ratio(_p99(maas32), _p99(bare32)), targets["maas_p99_vs_bare_c32_max"], at_most=True
            ),
            "maas_vs_bare_batched_c32": _round(ratio(_rps(maas32), _rps(batched32))),
            "maas_c32_vs_raw_best_batch": _round(ratio(_rps(maas32), raw_best["samples_per_s"] if raw_best else None)),
            "raw_best_batch": raw_best["batch"] if raw_best else None,
        },
        "transformer": {
            "maas_c32_requests_per_s": _round(_rps(transformer), 1),
            "raw_best_samples_per_s": transformer_best["samples_per_s"] if transformer_best else None,
            "raw_best_batch": transformer_best["batch"] if transformer_best else None,
            "maas_c32_vs_raw_best": _round(
                ratio(_rps(transformer), transformer_best["samples_per_s"] if transformer_best else None)
            ),
        },
    }
    if streaming is not None and "decoder" in raw:
        summary["streaming"] = {
            "maas_ttft_ms": streaming["ttft_ms_p50"],
            "raw_ttft_ms": raw["decoder"]["ttft_ms_p50"],
            "ttft_ratio": _round(ratio(streaming["ttft_ms_p50"], raw["decoder"]["ttft_ms_p50"])),
            "maas_tokens_per_s": streaming["tokens_per_s"],
            "raw_tokens_per_s": raw["decoder"]["tokens_per_s"],
            "tokens_per_s_ratio": _round(ratio(streaming["tokens_per_s"], raw["decoder"]["tokens_per_s"])),
            "tokens_match": streaming["tokens_match_greedy_generate"],
        }
    return summary


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    """The tables the benchmark prints and writes next to its JSON."""
    lines = [
        f"Serving benchmark, {result['timestamp']} ({'quick' if result['quick'] else 'full'} run, "
        f"{result['seconds']} s, load average {result['machine']['load_average_start']} at the start)",
        "",
        "MLP 784-512-512-10, one sample per request:",
        "",
        "| system | c | req/s | p50 ms | p99 ms | serving CPU ms/req | errors | max abs diff |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in result["points"]:
        if p["model"] != "mlp":
            continue
        lines.append(
            f"| {p['system']} | {p['concurrency']} | {_fmt(p['requests_per_s'])} | {_fmt(p['p50_ms'])} | "
            f"{_fmt(p['p99_ms'])} | {_fmt(p['serving_cpu_ms_per_request'])} | {p['errors']} | "
            f"{_fmt(p.get('max_abs_diff'))} |"
        )
    raw_rows = ", ".join(f"b={r['batch']} {r['samples_per_s']:,.0f}" for r in result["raw"].get("mlp", []))
    lines += ["", f"Raw in-process forward, samples/s (1 torch thread): {raw_rows}", ""]
    summary = result["summary"]
    lines += ["| figure | value | target | verdict |", "|---|--:|--:|---|"]
    mlp = summary["mlp"]
    for key, label, bound in (
        ("maas_vs_ray_serve_c32", "maas / Ray Serve, req/s at c=32", ">= "),
        ("maas_vs_bare_c32", "maas / bare one-hop, req/s at c=32", ">= "),
        ("maas_vs_bare_c8", "maas / bare one-hop, req/s at c=8", ">= "),
        ("maas_p50_vs_bare_p50_c1", "maas p50 / bare p50 at c=1", "<= "),
        ("maas_p99_vs_bare_p99_c32", "maas p99 / bare p99 at c=32", "<= "),
    ):
        entry = mlp[key]
        target = entry.get("target", entry.get("target_at_most"))
        lines.append(f"| {label} | {_fmt(entry['ratio'])} | {bound}{target} | {entry['verdict']} |")
    lines.append(f"| maas / bare with batcher, req/s at c=32 | {_fmt(mlp['maas_vs_bare_batched_c32'])} | | |")
    best = mlp["raw_best_batch"]
    lines.append(f"| maas c=32 req/s / raw samples/s at b={best} | {_fmt(mlp['maas_c32_vs_raw_best_batch'])} | | |")
    t = summary["transformer"]
    lines.append(
        f"| transformer: maas c=32 req/s ({_fmt(t['maas_c32_requests_per_s'])}) / raw samples/s at "
        f"b={t['raw_best_batch']} ({_fmt(t['raw_best_samples_per_s'])}) | {_fmt(t['maas_c32_vs_raw_best'])} | | |"
    )
    s = summary.get("streaming")
    if s:
        lines.append(
            f"| decoder: time to first token, gateway {s['maas_ttft_ms']} ms / in-process {s['raw_ttft_ms']} ms "
            f"| {_fmt(s['ttft_ratio'])} | | |"
        )
        lines.append(
            f"| decoder: tokens/s, gateway {s['maas_tokens_per_s']} / in-process {s['raw_tokens_per_s']} "
            f"| {_fmt(s['tokens_per_s_ratio'])} | | tokens match: {s['tokens_match']} |"
        )
    for key in ("ray_serve_skipped", "maas_skipped"):
        if key in result["notes"]:
            lines += ["", f"{key.replace('_', ' ')}: {result['notes'][key]}"]
    return "\n".join(lines) + "\n"
