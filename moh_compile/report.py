"""Reports: what was found, what was done, what it costs. Markdown for people, JSON for tools."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from moh_compile.flops import block_attention_flops, ffn_flops


def block_rows(matches) -> list[dict]:
    """One row per matched block: the description plus parameter and FLOP counts."""
    rows = []
    for m in matches.attention:
        b = m.block
        seq = _block_seq(m)
        fl = block_attention_flops(b, seq)
        row = b.to_dict()
        row.update(seq_for_flops=seq, flops=fl["total"])
        rows.append(row)
    for m in matches.ffn:
        b = m.block
        seq = rows[0]["seq_for_flops"] if rows else 1
        fl = ffn_flops(seq, b.d_model, b.d_hidden, b.d_out, b.gated)
        row = b.to_dict()
        row.update(seq_for_flops=seq, flops=fl["total"])
        rows.append(row)
    return rows


def _block_seq(m) -> int:
    from moh_compile.match.graph import static_int, val

    v = val(m.x)
    s = v.shape[1] if m.block.layout == "batch_first" else v.shape[0]
    return static_int(s) or int(getattr(s.node, "hint", 0) or 16)


@dataclass
class Report:
    model_name: str
    blocks: list[dict]
    skipped: list[dict] = field(default_factory=list)
    actions: list[dict] = field(default_factory=list)
    sections: dict = field(default_factory=dict)

    def skip(self, name: str, kind: str, reason: str) -> None:
        self.skipped.append({"name": name, "kind": kind, "reason": reason})

    def applied(self, name: str, kind: str, transform: str, max_diff: float) -> None:
        self.actions.append({"name": name, "kind": kind, "transform": transform,
                             "identity_max_abs_diff": max_diff})

    def to_dict(self) -> dict:
        sections = {k: {kk: (sorted(vv) if kk == "files" else vv) for kk, vv in v.items()}  # file names, not bytes
                    if isinstance(v, dict) else v for k, v in self.sections.items()}
        return {"model": self.model_name, "blocks": self.blocks, "skipped": self.skipped,
                "actions": self.actions, "sections": sections}

    def attention_table(self) -> list[list[str]]:
        head = ["block", "layer", "core", "type", "heads", "kv", "head dim", "d_model", "causal", "mask", "rope",
                "qkv", "params", "MFLOPs"]
        rows = [head]
        for b in self.blocks:
            if b["kind"] != "attention":
                continue
            qkv = ("fused, Q rows dropped" if b["q"].get("narrowed") else "fused") if b["q"]["fused"] else "separate"
            extras = [label for key, label in (("cross", "cross"), ("qk_norm", "QK-norm"), ("softcap", "soft-capped"),
                                               ("sinks", "sinks"), ("query_from_graph", "query from graph"),
                                               ("output_gate", "output-gated"))
                      if b.get(key)]
            kind = b["attention_type"] + (f" ({', '.join(extras)})" if extras else "")
            head_dim = str(b["head_dim"]) + (f" (v {b['v_head_dim']})" if b.get("v_head_dim") else "")
            rows.append([b["name"], str(b["layer"]), b["core"], kind, str(b["num_heads"]),
                         str(b["num_kv_heads"]), head_dim, str(b["d_model"]), str(b["causal"]),
                         str(b["has_mask"]), str(b["rope"]), qkv, f"{b['params']:,}", f"{b['flops'] / 1e6:.1f}"])
        return rows

    def ffn_table(self) -> list[list[str]]:
        head = ["block", "layer", "activation", "gated", "d_model", "hidden", "params", "MFLOPs"]
        rows = [head]
        for b in self.blocks:
            if b["kind"] != "ffn":
                continue
            gated = ("fused gate_up" if b["fused_gate_up"] else "yes") if b["gated"] else "no"
            rows.append([b["name"], str(b["layer"]), b["activation"], gated, str(b["d_model"]), str(b["d_hidden"]),
                         f"{b['params']:,}", f"{b['flops'] / 1e6:.1f}"])
        return rows

    def markdown(self) -> str:
        seq = self.blocks[0]["seq_for_flops"] if self.blocks else 0
        out = [f"# moh-compile report: {self.model_name}", "",
               f"FLOPs are per sequence of {seq} tokens (batch 1).", "", "## Attention blocks", ""]
        out += _md_table(self.attention_table())
        from_graph = [(b["name"], b["query_from_graph"]) for b in self.blocks if b.get("query_from_graph")]
        if from_graph:
            out += ["", "Queries left to the model's graph (\"query from graph\": the op takes them as computed, so "
                    "MoH skips these blocks' attention and output-projection work but not their Q projection):", ""]
            out += [f"- {name}: {why}" for name, why in from_graph]
        out += ["", "## FFN blocks", ""]
        out += _md_table(self.ffn_table())
        if self.actions:
            out += ["", "## Rewrites", ""]
            out += _md_table([["block", "kind", "transform", "identity check: max abs diff"]] + [
                [a["name"], a["kind"], a["transform"], f"{a['identity_max_abs_diff']:.2e}"] for a in self.actions])
        out += ["", "## Skipped", ""]
        if self.skipped:
            out += _md_table([["place", "kind", "reason"]] + [[s["name"], s["kind"], s["reason"]] for s in self.skipped])
        else:
            out.append("Nothing was skipped.")
        for title, section in self.sections.items():
            out += ["", f"## {title}", ""]
            out.append(section.get("markdown", "```\n" + json.dumps(section, indent=2, default=str) + "\n```"))
        return "\n".join(out) + "\n"

    def write(self, directory: Path) -> None:
        (directory / "report.md").write_text(self.markdown())
        (directory / "report.json").write_text(json.dumps(self.to_dict(), indent=2, default=str))
        for section in self.sections.values():
            for name, data in section.get("files", {}).items():
                (directory / name).write_bytes(data)


def _md_table(rows: list[list[str]]) -> list[str]:
    if len(rows) <= 1:
        return ["(none)"]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return lines


def print_tables(report: Report, console=None) -> None:
    """Rich tables on the terminal (the same data as the markdown)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if Console().is_terminal else 180)
    for title, rows in (("Attention blocks", report.attention_table()), ("FFN blocks", report.ffn_table())):
        table = Table(title=title, title_justify="left")
        for h in rows[0]:
            table.add_column(h, overflow="fold")
        for r in rows[1:]:
            table.add_row(*r)
        console.print(table)
    if report.skipped:
        table = Table(title="Skipped", title_justify="left")
        for h in ("place", "kind", "reason"):
            table.add_column(h, overflow="fold")
        for s in report.skipped:
            table.add_row(s["name"], s["kind"], s["reason"])
        console.print(table)
    else:
        console.print("Nothing was skipped.")
