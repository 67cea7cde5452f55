"""What a compression run shows: PNG plots of its report and the summary table printed at its end.

The plots read only the report that :func:`modegpt_jax.pipeline.compress` returns (``report.json``):
- ``allocation.png``: per-layer block influence and the sparsity allocated from it;
- ``errors.png``: per-layer relative reconstruction error of the MLP, value-output and key-query modules;
- ``params.png``: per-layer attention and MLP parameters before and after;
- ``perplexity.png``: perplexity before and after, when the run measured it;
- ``heal.png`` (:func:`heal_plot`): loss and validation perplexity of a recovery run (``modegpt heal``).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

ERROR_LABELS = {"mlp": "MLP (Nystrom)", "vo": "value-output (SVD)", "qk_score_dropped": "key-query score dropped (CR)"}


def _figure(width: float = 8.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _title(report: dict[str, Any], what: str) -> str:
    return f"{report.get('model', 'model')} at ratio {report['target_ratio']}: {what}"


def allocation_plot(report: dict[str, Any]) -> bytes:
    layers = [x["layer"] for x in report["layers"]]
    sparsity = [x["sparsity"] for x in report["layers"]]
    fig, ax = _figure()
    bi = [x.get("block_influence") for x in report["layers"]]
    if all(b is not None for b in bi):
        ax.bar(layers, bi, color="#9ecae1", label="block influence (1 - cos)")
        ax.set_ylabel("block influence")
        ax2 = ax.twinx()
    else:
        ax.set_yticks([])
        ax2 = ax
    ax2.plot(layers, sparsity, "o-", color="#d62728", label="allocated sparsity")
    ax2.axhline(report["target_ratio"], color="#d62728", linestyle=":", linewidth=1, label="target ratio")
    ax2.set_ylabel("sparsity")
    ax2.set_ylim(0, max(1.0, max(sparsity) * 1.05))
    handles = ax.get_legend_handles_labels()[0] + (ax2.get_legend_handles_labels()[0] if ax2 is not ax else [])
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(_title(report, "allocation"), fontsize=10)
    return _png(fig)


def errors_plot(report: dict[str, Any]) -> bytes:
    layers = [x["layer"] for x in report["layers"]]
    fig, ax = _figure()
    for key, label in ERROR_LABELS.items():
        values = [x["errors"].get(key) for x in report["layers"]]
        if any(v is not None for v in values):
            ax.plot(layers, [np.nan if v is None else v for v in values], "o-", markersize=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title(_title(report, "reconstruction error per module"), fontsize=10)
    return _png(fig)


def params_plot(report: dict[str, Any]) -> bytes:
    rows = [x for x in report["layers"] if "params_before" in x]
    layers = np.asarray([x["layer"] for x in rows])
    fig, ax = _figure()
    w = 0.4
    for offset, key, alpha, tag in ((-w / 2, "params_before", 0.45, "before"), (w / 2, "params_after", 1.0, "after")):
        attn = np.asarray([x[key]["attention"] for x in rows]) / 1e6
        mlp = np.asarray([x[key]["mlp"] for x in rows]) / 1e6
        ax.bar(layers + offset, attn, w, color="#1f77b4", alpha=alpha, label=f"attention, {tag}")
        ax.bar(layers + offset, mlp, w, bottom=attn, color="#ff7f0e", alpha=alpha, label=f"MLP, {tag}")
    ax.set_xlabel("layer")
    ax.set_ylabel("parameters (millions)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(_title(report, f"parameters {report['params_before'] / 1e6:.1f}M -> "
                                f"{report['params_after'] / 1e6:.1f}M"), fontsize=10)
    return _png(fig)


def perplexity_plot(report: dict[str, Any]) -> bytes:
    ppl = report["perplexity"]
    fig, ax = _figure(5.0, 3.6)
    names, values = ["dense", "compressed"], [ppl["dense"], ppl["compressed"]]
    bars = ax.bar(names, values, color=["#7f7f7f", "#2ca02c"])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("perplexity")
    ax.set_title(_title(report, f"perplexity on {ppl['text']}"), fontsize=9)
    return _png(fig)


def plots(report: dict[str, Any]) -> dict[str, bytes]:
    """PNG images of a report, by file name."""
    out = {"allocation.png": allocation_plot(report), "errors.png": errors_plot(report)}
    if any("params_before" in x for x in report["layers"]):
        out["params.png"] = params_plot(report)
    if "perplexity" in report:
        out["perplexity.png"] = perplexity_plot(report)
    return out


def summary_table(report: dict[str, Any]) -> str:
    """The per-layer table and totals printed at the end of a compression run."""
    head = (f"{'layer':>5} {'BI':>7} {'sparsity':>8} {'mlp':>6} {'qk':>4} {'vo':>4} "
            f"{'err mlp':>8} {'err vo':>8} {'qk drop':>8} {'seconds':>8}")
    lines = [head, "-" * len(head)]
    for x in report["layers"]:
        bi = "-" if x.get("block_influence") is None else f"{x['block_influence']:.4f}"
        e = x["errors"]
        lines.append(f"{x['layer']:>5} {bi:>7} {x['sparsity']:>8.3f} {x['mlp_width']:>6} {x['qk_dim']:>4} "
                     f"{x['vo_dim']:>4} {e['mlp']:>8.4f} {e['vo']:>8.4f} {e['qk_score_dropped']:>8.4f} "
                     f"{x['seconds']:>8.2f}")
    lines += [
        "-" * len(head),
        f"decoder blocks: -{report['achieved_block_ratio']:.1%} (target {report['target_ratio']:.0%}); "
        f"whole model: -{report['achieved_total_ratio']:.1%}; "
        f"parameters {report['params_before']:,} -> {report['params_after']:,}",
    ]
    if "perplexity" in report:
        p = report["perplexity"]
        lines.append(f"perplexity on {p['text']}: {p['dense']:.4f} -> {p['compressed']:.4f} "
                     f"({p['compressed'] / p['dense']:.2f}x)")
    times = report.get("timings_seconds", {})
    if times:
        lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return "\n".join(lines)


def heal_plot(report: dict[str, Any]) -> bytes:
    """Training loss per step and validation perplexity of a ``modegpt heal`` run (``heal_report.json``)."""
    losses = [x for x in report["history"] if "loss" in x]
    vals = [x for x in report["history"] if "validation_perplexity" in x]
    fig, ax = _figure()
    ax.plot([x["step"] for x in losses], [x["loss"] for x in losses], color="#1f77b4", linewidth=1,
            label=f"training loss ({report['settings']['loss']})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles = ax.get_legend_handles_labels()[0]
    if vals:
        ax2 = ax.twinx()
        ax2.plot([x["step"] for x in vals], [x["validation_perplexity"] for x in vals], "o-", color="#d62728",
                 label="validation perplexity")
        ax2.set_ylabel("validation perplexity")
        handles += ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_title(f"{report.get('model', 'model')}: recovery training ({report['settings']['method']})", fontsize=10)
    return _png(fig)
