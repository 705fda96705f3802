"""The per-site bar chart of a collection (patients, studies, series, instances), as PNG
with matplotlib when it is installed, else as a markdown table. Suppressed figures are
drawn as empty bars labelled with their marker; stale sites are grey and marked."""

from __future__ import annotations

import base64
import io

from kaapana_assets.monitoring.figures import ALL
from kaapana_assets.monitoring.network import FRESH, Collection

CHART_METRICS = ("patients", "studies", "series", "instances")


def _figures(collection: Collection) -> dict[str, dict[str, str]]:
    """site -> metric -> reported value (dimension `all`)."""
    out: dict[str, dict[str, str]] = {o.site: {} for o in collection.outcomes if o.answer is not None}
    for row in collection.cell_rows:
        if row["dimension"] == ALL and row["metric"] in CHART_METRICS and row["site"] in out:
            out[row["site"]][row["metric"]] = row["reported"]
    return out


def bar_chart_png(collection: Collection) -> bytes | None:
    """None when matplotlib is not installed or no site has figures."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figures = _figures(collection)
    if not figures:
        return None
    status = {o.site: o.status for o in collection.outcomes}
    sites = sorted(figures)
    labels = [site if status[site] == FRESH else f"{site}\n({status[site]})" for site in sites]
    figure = Figure(figsize=(2.6 * len(CHART_METRICS), 2.8), dpi=90)
    FigureCanvasAgg(figure)
    for index, metric in enumerate(CHART_METRICS, start=1):
        axes = figure.add_subplot(1, len(CHART_METRICS), index)
        values = [figures[site].get(metric, "0") for site in sites]
        heights = [int(v) if v.isdigit() else 0 for v in values]
        colours = ["#4c78a8" if status[site] == FRESH else "#b0b0b0" for site in sites]
        bars = axes.bar(range(len(sites)), heights, color=colours)
        top = max(heights + [1])
        for bar, value in zip(bars, values, strict=True):
            axes.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + top * 0.02, value,
                      ha="center", va="bottom", fontsize=8)
        axes.set_title(metric, fontsize=10)
        axes.set_xticks(range(len(sites)), labels, fontsize=7)
        axes.set_ylim(0, top * 1.2)
        axes.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def bar_chart_markdown(collection: Collection) -> str:
    """The chart as a markdown image, or the same figures as a markdown table."""
    png = bar_chart_png(collection)
    if png is not None:
        return f"![patients, studies, series and instances per site](data:image/png;base64,{base64.b64encode(png).decode()})"
    figures = _figures(collection)
    status = {o.site: o.status for o in collection.outcomes}
    lines = ["| site | status | " + " | ".join(CHART_METRICS) + " |", "|---|---|" + "---:|" * len(CHART_METRICS)]
    for site in sorted(figures):
        lines.append(f"| {site} | {status[site]} | " + " | ".join(figures[site].get(m, "0") for m in CHART_METRICS)
                     + " |")
    return "\n".join(lines)
