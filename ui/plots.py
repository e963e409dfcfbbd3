"""Plot makers: a core result (``KReport``) in, a plotly Figure out. They reshape numbers; they compute none.

Figures are written as plain plotly dicts and wrapped without plotly's validation: validating costs about
50 ms a figure, more than everything else a k change does. The dicts below are fixed, and the tests load
their JSON; the browser test sees them drawn.
"""

from __future__ import annotations

import re

import plotly.graph_objects as go

from vlora_core.config import CompressConfig

from .workbench import KReport

A_COLOUR, B_COLOUR, ERROR_COLOUR, NOW_COLOUR, GREY = "#4C78A8", "#F58518", "#54A24B", "#E45756", "#888888"
HEIGHT = 330
_AXIS = dict(gridcolor="#EBF0F8", linecolor="#EBF0F8", zerolinecolor="#EBF0F8", ticks="", automargin=True)
# plotly_white's look in a few keys: the full template would be a 7 kB copy in every figure sent
STYLE = dict(
    layout=dict(
        paper_bgcolor="white",
        plot_bgcolor="white",
        font=dict(color="#2a3f5f"),
        hoverlabel=dict(align="left"),
        xaxis=_AXIS,
        yaxis=_AXIS,
    )
)


def variance_figure(report: KReport) -> go.Figure:
    """Share of each layer side's variance the kept directions explain, across layers (name and k in the hover)."""
    order = sorted(range(len(report.layers)), key=lambda i: _natural(report.layers[i]))  # blocks 0, 1, 2, ..., 10
    hover = "%{customdata[0]}<br>variance explained %{y:.1%}<br>k = %{customdata[1]}<extra>%{fullData.name}</extra>"
    traces = [
        dict(
            type="scatter",
            x=list(range(len(order))),
            y=[values[i] for i in order],
            name=side,
            mode="lines+markers",
            line=dict(color=colour),
            hovertemplate=hover,
            customdata=[[report.layers[i], ks[i]] for i in order],
        )
        for side, values, ks, colour in (
            ("A (input side)", report.variance_a, report.k_a, A_COLOUR),
            ("B (output side)", report.variance_b, report.k_b, B_COLOUR),
        )
    ]
    return _figure(
        traces,
        f"Variance explained per layer ({setting_label(report.config)})",
        xaxis=dict(
            title=dict(text="targeted layer, in model order (hover for its name)"), tickformat="d", rangemode="tozero"
        ),
        yaxis=dict(tickformat=".2~%", range=[0, 1.03]),
    )


def task_error_figure(report: KReport) -> go.Figure:
    """Each task's relative ΔW error over all layers at the current setting."""
    bars = dict(
        type="bar",
        x=report.task_ids,
        y=report.task_errors,
        marker=dict(color=ERROR_COLOUR),
        text=[f"{e:.1%}" for e in report.task_errors],
        textposition="outside",
        hovertemplate="%{x}<br>ΔW error %{y:.2%}<extra></extra>",
    )
    top = max(report.task_errors, default=0.0)
    return _figure(
        [bars],
        f"ΔW error per task (mean {report.mean_error:.1%})",
        yaxis=dict(tickformat=".2~%", range=[0, max(top * 1.2, 0.01)]),
    )


def storage_figure(report: KReport) -> go.Figure:
    """The k sweep as storage versus error, the current setting marked, the original size as a line."""
    hover = "k = %{customdata}<br>%{x:,} bytes<br>%{y:.2%}<extra>%{fullData.name}</extra>"
    traces = [
        dict(
            type="scatter",
            x=report.curve_bytes,
            y=report.curve_mean_errors,
            customdata=report.curve_ks,
            mode="lines+markers",
            name="mean task error",
            line=dict(color=A_COLOUR),
            hovertemplate=hover,
        ),
        dict(
            type="scatter",
            x=report.curve_bytes,
            y=report.curve_max_errors,
            customdata=report.curve_ks,
            mode="lines",
            name="worst task error",
            line=dict(color=B_COLOUR, dash="dash"),
            hovertemplate=hover,
        ),
        dict(
            type="scatter",
            x=[report.stored_bytes],
            y=[report.mean_error],
            mode="markers",
            name=setting_label(report.config),
            marker=dict(color=NOW_COLOUR, size=14, symbol="star"),
            hovertemplate="%{x:,} bytes<br>mean error %{y:.2%}<extra>now</extra>",
        ),
    ]
    original = dict(
        type="line",
        xref="x",
        yref="paper",
        x0=report.original_bytes,
        x1=report.original_bytes,
        y0=0,
        y1=1,
        line=dict(color=GREY, dash="dot"),
    )
    label = dict(
        xref="x",
        yref="paper",
        x=report.original_bytes,
        y=1,
        text="original adapters",
        showarrow=False,
        xanchor="right",
        yanchor="top",
    )
    return _figure(
        traces,
        "Storage versus error over k",
        shapes=[original],
        annotations=[label],
        xaxis=dict(title=dict(text="stored bytes (basis + all loadings)")),
        yaxis=dict(title=dict(text="relative ΔW error"), tickformat=".2~%", rangemode="tozero"),
    )


def bytes_figure(report: KReport) -> go.Figure:
    """Original adapter bytes beside the store's: the shared basis plus every task's loadings."""
    loadings = report.stored_bytes - report.basis_bytes
    traces = [
        dict(
            type="bar",
            orientation="h",
            y=["original adapters"],
            x=[report.original_bytes],
            name="original adapters",
            marker=dict(color=GREY),
            text=[human_bytes(report.original_bytes)],
        ),
        dict(
            type="bar",
            orientation="h",
            y=["vlora store"],
            x=[report.basis_bytes],
            name="shared basis",
            marker=dict(color=A_COLOUR),
            text=[human_bytes(report.basis_bytes)],
        ),
        dict(
            type="bar",
            orientation="h",
            y=["vlora store"],
            x=[loadings],
            name="task loadings",
            marker=dict(color=B_COLOUR),
            text=[human_bytes(loadings)],
        ),
    ]
    return _figure(
        traces, f"Compression ×{report.ratio:.1f}", height=240, barmode="stack", xaxis=dict(title=dict(text="bytes"))
    )


def setting_label(config: CompressConfig) -> str:
    if config.adaptive_k:
        return f"{config.method} basis, adaptive k, {config.variance_threshold:.0%} variance"
    return f"{config.method} basis, k = {config.num_components}"


def human_bytes(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def _figure(traces: list[dict], title: str, height: int = HEIGHT, **layout) -> go.Figure:
    layout = dict(
        template=STYLE,
        height=height,
        title=dict(text=title),
        margin=dict(l=55, r=20, t=50, b=45),
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
        **layout,
    )
    return go.Figure(dict(data=traces, layout=layout), _validate=False)


def _natural(name: str) -> list:
    """Sort key that puts 'layers.2' before 'layers.10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
