"""The one report renderer: a report is a title plus blocks (text, tables, plots), written as
report.json (every number), report.md and a self-contained report.html (plots inlined as base64).

    report = Report("Model diff: A → B")
    report.text("CLT `clt/` trained on A")
    report.table("Findings", ["claim", "measure", "result"], rows)
    report.image("Brightening", path_to_png)
    report.write(run_dir, result)   # → {"json": ..., "markdown": ..., "html": ...}
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from training.config import atomic_write_json, atomic_write_text


def html_page(title: str, body: list[str]) -> str:
    """A self-contained HTML page."""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}td{vertical-align:top}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )


def inline_image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


@dataclass
class Report:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def table(self, heading: str, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", heading, header, rows))

    def image(self, heading: str, path: Path) -> None:
        self.blocks.append(("image", heading, Path(path)))

    def markdown(self) -> str:
        md = [f"# {self.title}"]
        for block in self.blocks:
            if block[0] == "text":
                md += ["", block[1]]
            elif block[0] == "table":
                _, heading, header, rows = block
                md += ["", f"## {heading}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                md += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            else:
                _, heading, path = block
                md += ["", f"## {heading}", "", f"![{heading}]({path.name})"]
        return "\n".join(md) + "\n"

    def html(self, result: dict, max_json_chars: int = 300_000) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            if block[0] == "text":
                body.append(f"<p>{html.escape(block[1])}</p>")
            elif block[0] == "table":
                _, heading, header, rows = block
                body.append(
                    f"<h2>{html.escape(heading)}</h2><table border=1 cellpadding=4><tr>"
                    + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                    + "</tr>"
                )
                body += [
                    "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
                ]
                body.append("</table>")
            else:
                _, heading, path = block
                body += [f"<h2>{html.escape(heading)}</h2>", inline_image(path)]
        body.append(
            "<h2>All numbers</h2><details><summary>report.json</summary><pre>"
            + html.escape(json.dumps(result, indent=1, default=str)[:max_json_chars])
            + "</pre></details>"
        )
        return html_page(self.title, body)

    def write(self, run_dir: Path, result: dict) -> dict[str, Path]:
        run_dir = Path(run_dir)
        atomic_write_json(run_dir / "report.json", result)
        atomic_write_text(run_dir / "report.md", self.markdown())
        atomic_write_text(run_dir / "report.html", self.html(result))
        return {
            "json": run_dir / "report.json",
            "markdown": run_dir / "report.md",
            "html": run_dir / "report.html",
        }
