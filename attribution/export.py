"""Exports of a pruned attribution graph.

- circuit-tracer graph JSON (`{slug}.json` + `graph-metadata.json` index), the files its frontend
  (`circuit_tracer.frontend.local_server`) serves; the schema is its pydantic `Model`.
- GraphML (networkx), for Gephi / Cytoscape / any graph library.
- A self-contained HTML page (inline SVG, no server, no scripts from the network): layers × positions,
  node area ∝ influence, edge colour = sign, hover any node or edge for its details.
- A static PNG (matplotlib) of the same layout.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import networkx as nx

from attribution.graph import AttributionGraph
from attribution.prune import PruneResult
from attribution.query import to_networkx
from training.config import atomic_write_json, atomic_write_text

KIND_COLOURS = {"token": "#6b7280", "feature": "#2563eb", "error": "#9ca3af", "target": "#16a34a"}
FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "token": "embedding",
    "target": "logit",
}


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _display(token: str) -> str:
    return _xml_safe(token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵"))


def circuit_tracer_json(
    graph: AttributionGraph,
    g: nx.DiGraph,
    slug: str,
    scan: str = "multilingual-clt",
    node_threshold: float = 0.8,
) -> dict:
    """The frontend's graph document for the pruned graph `g` (from `to_networkx`)."""
    nodes = []
    first_target = True
    for node, data in g.nodes(data=True):
        kind, layer, pos = data["kind"], data["layer"], data["position"]
        entry = {
            "node_id": data["ct_node_id"],
            "ctx_idx": pos,
            "feature_type": FEATURE_TYPES[kind],
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "clerp": "",
            "influence": data["cumulative_influence"],
            "activation": None,
        }
        if kind == "feature":
            entry.update(
                feature=_cantor(layer, data["feature"]),
                layer=str(layer),
                jsNodeId=f"{layer}_{data['feature']}-0",
                activation=data["activation"],
            )
        elif kind == "error":
            entry.update(feature=-1, layer=str(layer), jsNodeId=f"{layer}_{pos}-0")
        elif kind == "token":
            entry.update(feature=pos, layer="E", jsNodeId=f"E_{data['token_id']}-{pos}")
        else:
            vocab = int(data["ct_node_id"].split("_")[1])
            entry.update(
                feature=vocab,
                layer=str(graph.n_layers + 1),
                jsNodeId=f"L_{vocab}-{pos}",
                token_prob=data["weight"],
                is_target_logit=first_target,
                clerp=f'Output "{data["token"]}" (p={data["weight"]:.3f})',
                influence=None,
            )
            first_target = False
        nodes.append(entry)
    links = [
        {"source": g.nodes[u]["ct_node_id"], "target": g.nodes[v]["ct_node_id"], "weight": d["weight"]}
        for u, v, d in g.edges(data=True)
    ]
    metadata = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": [],
        "prompt_tokens": [_display(t) for t in graph.token_strings],
        "prompt": graph.metadata.get("prompt", "".join(graph.token_strings)),
        "node_threshold": node_threshold,
        "schema_version": 1,
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def write_circuit_tracer_json(
    graph: AttributionGraph, g: nx.DiGraph, out_dir: str | Path, slug: str, node_threshold: float = 0.8
) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = circuit_tracer_json(graph, g, slug, node_threshold=node_threshold)
    path = out_dir / f"{slug}.json"
    atomic_write_json(path, document)
    index_path = out_dir / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"graphs": []}
    index["graphs"] = [entry for entry in index["graphs"] if entry["slug"] != slug] + [document["metadata"]]
    atomic_write_json(index_path, index)
    return path


def _xml_safe(text: str) -> str:
    """XML 1.0 cannot hold most control characters (byte-level tokens can be anything): escape them."""
    return "".join(c if c in "\t\n\r" or ord(c) >= 0x20 else f"\\x{ord(c):02x}" for c in text)


def write_graphml(g: nx.DiGraph, path: str | Path) -> Path:
    path = Path(path)
    safe = nx.DiGraph(**{k: _xml_safe(v) if isinstance(v, str) else v for k, v in g.graph.items()})
    for node, data in g.nodes(data=True):
        safe.add_node(node, **{k: _xml_safe(v) if isinstance(v, str) else v for k, v in data.items()})
    safe.add_edges_from(g.edges(data=True))
    tmp = path.with_suffix(path.suffix + ".tmp")
    nx.write_graphml(safe, tmp)
    tmp.replace(path)
    return path


# --- layout shared by the HTML and PNG views ------------------------------------------------------


def _shown_positions(g: nx.DiGraph) -> list[int]:
    """Prompt positions worth a column: those holding a kept feature, error or target node, or a token
    with an edge. A long prompt's graph keeps nodes at a few positions; the others would only be blank."""
    return sorted(
        {
            data["position"]
            for node, data in g.nodes(data=True)
            if data["kind"] != "token" or g.degree(node) > 0
        }
    )


def _layout(g: nx.DiGraph) -> tuple[dict[str, tuple[float, float]], list[int]]:
    """(x, y) of every node at a shown position, and the shown positions (x = their column index).
    x: column (features of one site spread side by side), y: layer (tokens at the bottom = −1,
    targets at the top = n_layers)."""
    shown = _shown_positions(g)
    column = {pos: i for i, pos in enumerate(shown)}
    sites: dict[tuple[int, int], list[str]] = {}
    for node, data in sorted(
        g.nodes(data=True), key=lambda item: -item[1]["influence"] if item[1]["kind"] != "target" else 0
    ):
        if data["position"] in column:
            sites.setdefault((data["layer"], data["position"]), []).append(node)
    positions = {}
    for (layer, pos), members in sites.items():
        width = 0.8
        for i, node in enumerate(members):
            offset = 0.0 if len(members) == 1 else (i / (len(members) - 1) - 0.5) * width
            positions[node] = (column[pos] + offset, layer)
    return positions, shown


def _radius(data: dict, max_influence: float) -> float:
    if data["kind"] in ("token", "target"):
        return 6.0
    return 3.0 + 9.0 * math.sqrt(max(data["influence"], 0.0) / max_influence) if max_influence > 0 else 3.0


def _node_title(node: str, data: dict) -> str:
    lines = [
        f"{data['kind']} {node}",
        f"layer {data['layer']}, position {data['position']}, token {data['token']!r}",
    ]
    if data["kind"] == "feature":
        lines.append(f"feature {data['feature']}, activation {data['activation']:.4g}")
    if data["kind"] == "target":
        lines.append(f"weight (probability) {data['weight']:.4g}")
    lines.append(f"influence {data['influence']:.4g} (cumulative {data['cumulative_influence']:.3f})")
    if data.get("lang"):
        lines.append(f"prompt language {data['lang']}")
    return "\n".join(lines)


def html_view(graph: AttributionGraph, g: nx.DiGraph, title: str = "Attribution graph") -> str:
    layout, shown = _layout(g)
    n_layers = graph.n_layers
    col, row, margin = 90.0, 90.0, 70.0
    width, height = margin * 2 + col * len(shown), margin * 2 + row * (n_layers + 1)

    def xy(node: str) -> tuple[float, float]:
        x, layer = layout[node]
        return margin + col * (x + 0.5), height - margin - row * (layer + 1)

    max_influence = max(
        (d["influence"] for _, d in g.nodes(data=True) if d["kind"] in ("feature", "error")), default=0.0
    )
    max_weight = max((abs(d["weight"]) for _, _, d in g.edges(data=True)), default=1.0) or 1.0
    parts = []
    for layer in range(-1, n_layers + 1):
        y = height - margin - row * (layer + 1)
        label = "tokens" if layer == -1 else ("targets" if layer == n_layers else f"layer {layer}")
        parts.append(f'<text x="8" y="{y + 4:.1f}" class="axis">{label}</text>')
    for i, pos in enumerate(shown):
        parts.append(
            f'<text x="{margin + col * (i + 0.5):.1f}" y="{height - 20:.1f}" class="tok">'
            f"{html.escape(_display(graph.token_strings[pos]))}<title>position {pos}</title></text>"
        )
    for u, v, d in sorted(g.edges(data=True), key=lambda e: abs(e[2]["weight"])):
        (x1, y1), (x2, y2) = xy(u), xy(v)
        strength = abs(d["weight"]) / max_weight
        colour = "#2563eb" if d["weight"] > 0 else "#dc2626"
        parts.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}" '
            f'stroke-width="{0.5 + 3 * strength:.2f}" stroke-opacity="{0.15 + 0.6 * strength:.2f}">'
            f"<title>{html.escape(u)} → {html.escape(v)}: {d['weight']:.4g}</title></line>"
        )
    for node, data in g.nodes(data=True):
        if node not in layout:
            continue  # a token without edges at a position that keeps nothing
        x, y = xy(node)
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{_radius(data, max_influence):.1f}" '
            f'fill="{KIND_COLOURS[data["kind"]]}">'
            f"<title>{html.escape(_node_title(node, data))}</title></circle>"
        )
        if data["kind"] == "target":
            parts.append(
                f'<text x="{x:.1f}" y="{y - 10:.1f}" class="tok">'
                f"{html.escape(_display(data['token']))}</text>"
            )
    meta = graph.metadata
    summary = (
        f"{g.number_of_nodes()} nodes, {g.number_of_edges()} edges kept of {graph.n_features} active "
        f"features; {len(shown)} of {graph.n_pos} positions keep nodes (the others are not drawn); "
        f"replacement score {meta.get('scores', {}).get('replacement', float('nan')):.3f}, "
        f"completeness {meta.get('scores', {}).get('completeness', float('nan')):.3f}"
    )
    legend = " ".join(f'<span style="color:{c}">●</span> {k}' for k, c in KIND_COLOURS.items())
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
svg {{ border: 1px solid #e5e7eb; background: #fff; }}
.axis {{ font-size: 12px; fill: #374151; }}
.tok {{ font-size: 11px; text-anchor: middle; fill: #111827; }}
circle {{ stroke: #111827; stroke-width: 0.5; }}
circle:hover {{ stroke-width: 2.5; }}
line:hover {{ stroke-opacity: 1; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p>Prompt: <code>{html.escape(meta.get("prompt", ""))}</code> {html.escape(meta.get("lang") or "")}</p>
<p>{html.escape(summary)}. {legend} — edges: blue excitatory, red inhibitory. Hover for details.</p>
<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}">
{chr(10).join(parts)}
</svg></body></html>
"""


def write_html(
    graph: AttributionGraph, g: nx.DiGraph, path: str | Path, title: str = "Attribution graph"
) -> Path:
    atomic_write_text(path, html_view(graph, g, title))
    return Path(path)


def write_png(
    graph: AttributionGraph, g: nx.DiGraph, path: str | Path, title: str = "Attribution graph"
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout, shown = _layout(g)
    max_influence = max(
        (d["influence"] for _, d in g.nodes(data=True) if d["kind"] in ("feature", "error")), default=0.0
    )
    max_weight = max((abs(d["weight"]) for _, _, d in g.edges(data=True)), default=1.0) or 1.0
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(shown) + 2), 1.2 * (graph.n_layers + 2) + 1))
    for u, v, d in sorted(g.edges(data=True), key=lambda e: abs(e[2]["weight"])):
        strength = abs(d["weight"]) / max_weight
        ax.plot(
            [layout[u][0], layout[v][0]],
            [layout[u][1], layout[v][1]],
            color="#2563eb" if d["weight"] > 0 else "#dc2626",
            alpha=0.1 + 0.6 * strength,
            linewidth=0.3 + 2 * strength,
            zorder=1,
        )
    for node, data in g.nodes(data=True):
        if node not in layout:
            continue
        x, y = layout[node]
        ax.scatter(
            [x],
            [y],
            s=_radius(data, max_influence) ** 2 * 2,
            color=KIND_COLOURS[data["kind"]],
            edgecolors="black",
            linewidths=0.3,
            zorder=2,
        )
        if data["kind"] == "target":
            ax.annotate(
                _display(data["token"]),
                (x, y),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=7,
            )
    ax.set_xticks(
        range(len(shown)), [_display(graph.token_strings[p]) for p in shown], rotation=60, fontsize=7
    )
    ax.set_yticks(
        range(-1, graph.n_layers + 1), ["tokens"] + [f"L{l}" for l in range(graph.n_layers)] + ["targets"]
    )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)
    return path


def export_all(
    graph: AttributionGraph,
    out_dir: str | Path,
    slug: str,
    pruned: PruneResult,
    node_threshold: float = 0.8,
    save_adjacency: str = "pruned",
) -> dict[str, Path]:
    """Every export of one graph into `out_dir`: the saved graph itself (its adjacency as
    `save_adjacency`, see AttributionGraph.save) plus JSON, GraphML, HTML, PNG."""
    out_dir = Path(out_dir)
    g = to_networkx(graph, pruned)
    title = f"{slug}: {graph.metadata.get('prompt', '')[:80]}"
    return {
        "graph": graph.save(out_dir / "graph", pruned, save_adjacency),
        "circuit_tracer_json": write_circuit_tracer_json(
            graph, g, out_dir / "circuit_tracer", slug, node_threshold
        ),
        "graphml": write_graphml(g, out_dir / f"{slug}.graphml"),
        "html": write_html(graph, g, out_dir / f"{slug}.html", title),
        "png": write_png(graph, g, out_dir / f"{slug}.png", title),
    }
