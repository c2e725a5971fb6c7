"""One self-contained HTML page: summary first, then a section per characteristic.

Figures are embedded as base64 PNGs, so the file can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:.1em} .sub{color:#666;margin-top:0}
.summary{background:#f3f7fb;border-left:4px solid #1f77b4;padding:.8em 1.2em;margin:1.2em 0}
section{margin:2.2em 0;border-top:1px solid #ddd;padding-top:.6em}
figure{margin:.8em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#444;font-size:.92em;margin-top:.3em}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0} th,td{padding:.25em .7em;border-bottom:1px solid #e5e5e5;
text-align:left} th{background:#fafafa} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{font-weight:600;background:#eef8ee}
footer{color:#777;font-size:.85em;margin-top:3em}
"""


def _img(path: str | os.PathLike) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _table(table: dict) -> str:
    cols = table["columns"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for row in table["rows"]:
        cls = ' class="best"' if row.get("_best") else ""
        cells = []
        for c in cols:
            v = row.get(c, "")
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            text = f"{v:.4f}" if isinstance(v, float) else str(v)
            cells.append(f'<td class="num">{text}</td>' if num else f"<td>{html.escape(text)}</td>")
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_report(title: str, summary: list[str], sections: list[dict], footer: str, out: str | os.PathLike,
                  figure_root: str | os.PathLike,
                  subtitle: str = "mergescope study: why (and which) merging works for these models") -> Path:
    """Write the report. Each section: id, title, intro, figures [{file, caption}], tables [...]."""
    root = Path(figure_root)
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             f'<p class="sub">{html.escape(subtitle)}</p>',
             '<div class="summary" id="summary"><h2>Summary: which merge should I use?</h2><ul>',
             *[f"<li>{html.escape(line)}</li>" for line in summary], "</ul></div>"]
    for s in sections:
        parts.append(f'<section id="{html.escape(s["id"])}"><h2>{html.escape(s["title"])}</h2>')
        if s.get("intro"):
            parts.append(f"<p>{html.escape(s['intro'])}</p>")
        for fig in s.get("figures", []):
            parts.append(f"<figure>{_img(root / fig['file'])}<figcaption>{html.escape(fig['caption'])}</figcaption></figure>")
        for table in s.get("tables", []):
            parts.append(_table(table))
        parts.append("</section>")
    parts.append(f"<footer>{html.escape(footer)}</footer></body></html>")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, out)
    return out
