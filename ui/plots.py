"""Plot makers: a core result (``KReport``) in, a plotly Figure out. They reshape numbers; they compute none.

Figures are written as plain plotly dicts and wrapped without plotly's validation: validating costs about
50 ms a figure, more than everything else a k change does. The dicts below are fixed, and the tests load
their JSON; the browser test sees them drawn.

A k change in the page does not redraw whole figures: ``k_moves`` picks from the same dicts only what a k
moves (``K_MOVES``: the variance and error values, the star, the byte bars, the titles), and the page applies
it to the figures in place with ``Plotly.update`` (``ui/layout.py``). Every title names the setting it shows.
"""

from __future__ import annotations

import re

import plotly.graph_objects as go
from plotly.io.json import to_json_plotly

from vlora_core.config import CompressConfig
from vlora_core.precision import get_precision

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


# What a k change moves in each figure: (figure, trace indices, trace keys, layout paths). The rest stays as drawn.
K_MOVES = {
    "variance": ([0, 1], ("y", "customdata"), ("title.text",)),
    "errors": ([0], ("y", "text"), ("title.text",)),
    "storage": ([2], ("x", "y", "name"), ()),
    "bytes": ([0, 1, 2], ("x", "text"), ("title.text",)),
}


def figures(report: KReport) -> dict[str, go.Figure]:
    """The four figures of the k tab, by the names ``K_MOVES`` uses."""
    return {name: _as_figure(draw(report)) for name, draw in _DRAWN.items()}


def k_moves(report: KReport) -> dict[str, dict]:
    """For each figure, what ``report``'s k changes: {name: {"traces", "data": {key: [value per trace]},
    "layout": {path: value}}}, the arguments of ``Plotly.update``; a few kB instead of four figures."""
    out = {}
    for name, (traces, keys, paths) in K_MOVES.items():
        drawn = _DRAWN[name](report)
        data = {key: [drawn["data"][i][key] for i in traces] for key in keys}
        out[name] = dict(traces=traces, data=data, layout={path: _at(drawn["layout"], path) for path in paths})
    return out


def as_json(value) -> str:
    """JSON text as plotly writes figures (NaN as null, numpy numbers as numbers)."""
    return to_json_plotly(value)


def variance_figure(report: KReport) -> go.Figure:
    return _as_figure(_variance(report))


def task_error_figure(report: KReport) -> go.Figure:
    return _as_figure(_task_errors(report))


def storage_figure(report: KReport) -> go.Figure:
    return _as_figure(_storage(report))


def bytes_figure(report: KReport) -> go.Figure:
    return _as_figure(_bytes(report))


def _variance(report: KReport) -> dict:
    """Share of each layer side's variance the kept directions explain, across layers (name and k in the hover)."""
    order = sorted(range(len(report.layers)), key=lambda i: _natural(report.layers[i]))  # blocks 0, 1, 2, ..., 10
    hover = "%{text}<br>variance explained %{y:.1%}<br>k = %{customdata}<extra>%{fullData.name}</extra>"
    traces = [
        dict(
            type="scatter",
            x=list(range(len(order))),
            y=[values[i] for i in order],
            name=side,
            mode="lines+markers",
            line=dict(color=colour),
            hovertemplate=hover,
            text=[report.layers[i] for i in order],  # the layer names stay; only the k moves
            customdata=[ks[i] for i in order],
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


def _task_errors(report: KReport) -> dict:
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
    top = max([*report.task_errors, *report.curve_max_errors], default=0.0)  # one scale for every k of the basis
    return _figure(
        [bars],
        f"ΔW error per task ({setting_label(report.config)}; mean {report.mean_error:.1%})",
        yaxis=dict(tickformat=".2~%", range=[0, max(top * 1.2, 0.01)]),
    )


def _storage(report: KReport) -> dict:
    """The k sweep as storage versus error, the current setting marked, the original size as a line; each other
    basis already decomposed as a grey curve of its mean task error (after the star: the moving traces stay 0-2)."""
    hover = "k = %{customdata}<br>%{x:,} bytes<br>%{y:.2%}<extra>%{fullData.name}</extra>"
    basis = f", {report.config.method} basis" if report.other_curves else ""
    traces = [
        dict(
            type="scatter",
            x=report.curve_bytes,
            y=report.curve_mean_errors,
            customdata=report.curve_ks,
            mode="lines+markers",
            name=f"mean task error{basis}",
            line=dict(color=A_COLOUR),
            hovertemplate=hover,
        ),
        dict(
            type="scatter",
            x=report.curve_bytes,
            y=report.curve_max_errors,
            customdata=report.curve_ks,
            mode="lines",
            name=f"worst task error{basis}",
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
    for method, (ks, sizes, errors) in report.other_curves.items():
        traces.append(
            dict(
                type="scatter",
                x=sizes,
                y=errors,
                customdata=ks,
                mode="lines+markers",
                name=f"mean task error, {method} basis",
                line=dict(color=GREY, dash="dot"),
                marker=dict(size=4),
                hovertemplate=hover,
            )
        )
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
        xaxis=dict(title=dict(text=f"stored bytes in {get_precision(report.dtype).flag} (basis + all loadings)")),
        yaxis=dict(title=dict(text="relative ΔW error"), tickformat=".2~%", rangemode="tozero"),
    )


def _bytes(report: KReport) -> dict:
    """Original adapter bytes beside the store's: the shared basis plus every task's loadings."""
    loadings = report.stored_bytes - report.basis_bytes
    store = f"vlora store ({get_precision(report.dtype).flag})"
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
            y=[store],
            x=[report.basis_bytes],
            name="shared basis",
            marker=dict(color=A_COLOUR),
            text=[human_bytes(report.basis_bytes)],
        ),
        dict(
            type="bar",
            orientation="h",
            y=[store],
            x=[loadings],
            name="task loadings",
            marker=dict(color=B_COLOUR),
            text=[human_bytes(loadings)],
        ),
    ]
    return _figure(
        traces,
        f"Store {size_words(report.stored_bytes, report.original_bytes)} ({setting_label(report.config)})",
        height=240,
        barmode="stack",
        xaxis=dict(title=dict(text="bytes")),
    )


def setting_label(config: CompressConfig, dtype: str | None = None) -> str:
    """'rank basis, k = 16', 'flat basis, adaptive k, 90% variance'; with the storage precision when given."""
    stored = "" if dtype is None else f", stored in {get_precision(dtype).flag}"
    if config.adaptive_k:
        return f"{config.method} basis, adaptive k, {config.variance_threshold:.0%} variance{stored}"
    return f"{config.method} basis, k = {config.num_components}{stored}"


def size_words(stored: int, original: int) -> str:
    """The store against its inputs in honest words: '×3.1 smaller than the adapters', 'about the same size as
    the adapters (0.1% larger)', '×1.6 larger than the adapters' — never 'smaller' for a store at least as big."""
    if stored >= original:
        over = stored / max(original, 1)
        if over < 1.05:
            return f"about the same size as the adapters ({over - 1:.1%} larger)"
        return f"×{over:.1f} larger than the adapters"
    ratio = original / max(stored, 1)
    if ratio < 1.05:
        return f"about the same size as the adapters ({1 - 1 / ratio:.1%} smaller)"
    return f"×{ratio:.1f} smaller than the adapters"


def human_bytes(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def _figure(traces: list[dict], title: str, height: int = HEIGHT, **layout) -> dict:
    layout = dict(
        template=STYLE,
        height=height,
        title=dict(text=title),
        margin=dict(l=55, r=20, t=50, b=45),
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
        **layout,
    )
    return dict(data=traces, layout=layout)


def _as_figure(figure: dict) -> go.Figure:
    return go.Figure(figure, _validate=False)


def _at(tree: dict, path: str):
    """``tree["title"]["text"]`` for the path "title.text"."""
    for key in path.split("."):
        tree = tree[key]
    return tree


_DRAWN = {"variance": _variance, "errors": _task_errors, "storage": _storage, "bytes": _bytes}


def _natural(name: str) -> list:
    """Sort key that puts 'layers.2' before 'layers.10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---- behaviour over k (the k tab's "Check behaviour") --------------------------------------------------------
TASK_COLOURS = ["#4C78A8", "#F58518", "#54A24B", "#B279A2", "#72B7B2", "#EECA3B", "#FF9DA6", "#9D755D", "#BAB0AC"]


def behaviour_figure(view) -> go.Figure:
    """Effect retained (left) and top-1 agreement (right) per task over k (a ``ui.checks.BehaviourView``): the
    thresholds dotted, the current k (red) and the recommended k (green) as vertical lines."""
    traces = []
    for i, task in enumerate(view.task_ids):
        colour = TASK_COLOURS[i % len(TASK_COLOURS)]
        for axis, values, what in (("", view.effect[task], "effect retained"), ("2", view.agreement[task], "top-1")):
            traces.append(
                dict(
                    type="scatter",
                    x=view.ks,
                    y=[None if v != v else v for v in values],  # nan (no effect to keep): a gap, not a point
                    xaxis=f"x{axis}",
                    yaxis=f"y{axis}",
                    mode="lines+markers",
                    name=task,
                    legendgroup=task,
                    showlegend=not axis,
                    line=dict(color=colour),
                    hovertemplate=f"{task}<br>k = %{{x}}<br>{what} %{{y:.3f}}<extra></extra>",
                )
            )
    rec = view.recommendation
    shapes = [_hline(rec.min_effect, ""), _hline(rec.min_agreement, "2")]
    marks = [(view.current_k, NOW_COLOUR, f"k = {view.current_k} (now)"), (view.recommended_k, ERROR_COLOUR, "")]
    annotations = []
    for k, colour, text in marks:
        for axis in ("", "2"):
            if k is not None:
                shapes.append(_vline(k, axis, colour))
        if k is not None:
            label = text or f"k = {k} recommended"
            annotations.append(dict(xref="x", yref="paper", x=k, y=1.0, text=label, showarrow=False, yanchor="bottom"))
    found = "no k measured keeps every task" if view.recommended_k is None else f"recommended k = {view.recommended_k}"
    axis = dict(**_AXIS, title=dict(text="k (directions per layer side)"), type="log", dtick=0.30103)
    layout = dict(
        template=STYLE,
        height=HEIGHT + 40,
        title=dict(text=f"Behaviour over k, {view.method} basis, {view.prompts} prompts: {found}"),
        margin=dict(l=55, r=20, t=80, b=45),
        legend=dict(orientation="h", y=-0.25, yanchor="top", x=0, xanchor="left"),
        xaxis=dict(axis, domain=[0, 0.46]),
        xaxis2=dict(axis, domain=[0.54, 1]),
        yaxis=dict(**_AXIS, title=dict(text="effect retained"), range=[-0.05, 1.05]),
        yaxis2=dict(**_AXIS, title=dict(text="top-1 agreement"), range=[-0.05, 1.05], anchor="x2"),
        shapes=shapes,
        annotations=annotations,
    )
    return go.Figure(dict(data=traces, layout=layout), _validate=False)


def _hline(y: float, axis: str) -> dict:
    return dict(
        type="line", xref=f"x{axis} domain", yref=f"y{axis}", x0=0, x1=1, y0=y, y1=y, line=dict(color=GREY, dash="dot")
    )


def _vline(x: int, axis: str, colour: str) -> dict:
    return dict(
        type="line",
        xref=f"x{axis}",
        yref=f"y{axis} domain",
        x0=x,
        x1=x,
        y0=0,
        y1=1,
        line=dict(color=colour, dash="dash"),
    )
