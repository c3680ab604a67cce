"""Insert the benchmark tables from benchmarks/results/*.json into README.md and
benchmarks/README.md, between ``<!-- name:start -->`` and ``<!-- name:end -->`` markers.

    python benchmarks/render_readme.py

Tables in the READMEs are produced here from the result files, never typed by hand.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

#: How the benchmarks' variants (train_speed.VARIANTS, without the ``_batched`` suffix) read in tables.
VARIANT_NAMES = {"baseline": "baseline (num_masks=0)", "adios": "ADIOS (exact)", "adios_s": "ADIOS-s", "simultaneous": "simultaneous"}


def step_tables() -> str:
    from step_speed import format_table

    parts = []
    for name in ("step_speed_cpu.json", "step_speed_gpu.json", "step_speed_gpu_simultaneous.json", "step_speed_gpu_bf16.json", "step_speed_gpu_n4.json", "step_speed_gpu_n4_batched.json"):
        path = RESULTS / name
        if path.exists():
            parts.append(format_table(json.loads(path.read_text())))
    return "\n\n".join(parts) if parts else "_no step benchmark results yet_"


def data_table() -> str:
    rows = []
    for path in sorted(RESULTS.glob("data_speed_*.json")):
        r = json.loads(path.read_text())
        rows.append(f"| `{r['command']}` | {r['images_per_s']:.0f} |")
    if not rows:
        return "_no data benchmark results yet_"
    return "| command | two-view images/s |\n|---|---|\n" + "\n".join(rows)


def _compiled(setting: bool | str | None) -> str:
    """The variant's suffix for a run with the encoder and mask generator compiled (``True`` or a
    torch.compile mode)."""
    if not setting:
        return ""
    return ", compiled" + ("" if setting is True else f" ({setting})")


def _compiled_augmentation(setting: bool | str | None) -> str:
    """The variant's suffix for a run with the device augmentation compiled (``--compile-augmentation``)."""
    return ", augmentation compiled" if setting else ""


def _compiled_objective(setting: bool | str | None) -> str:
    """The variant's suffix for a run with the objective compiled too (``--compile-objective``)."""
    return ", objective compiled" if setting else ""


def _compiled_optimizers(setting: bool | str | None) -> str:
    """The variant's suffix for a run with the optimisers' updates compiled too (``--compile-optimizers``)."""
    return ", optimisers compiled" if setting else ""


def _per_view_bn(setting: str | None) -> str:
    """The variant's suffix for a run with batch norm per view the older way (``--per-view-bn cat``)."""
    return ", batch norm per view joined by cat" if setting == "cat" else ""


def train_table() -> str:
    path = RESULTS / "train_speed_gpu.json"
    if not path.exists():
        return "_no end-to-end training results yet_"
    names = {**VARIANT_NAMES, **{f"{k}_batched": f"{v}, batched views" for k, v in VARIANT_NAMES.items()}}
    rows = [
        f"| {r['label'] or '-'} | {r['augment_on']} | {names.get(r['variant'], r['variant'])}{_compiled(r.get('compile'))}{_compiled_augmentation(r.get('compile_augmentation'))}{_compiled_objective(r.get('compile_objective'))}{_compiled_optimizers(r.get('compile_optimizers'))}{_per_view_bn(r.get('per_view_bn'))} | {r['image_size']} | {r['num_masks']} "
        f"| {r['images_per_s']:,.0f} | {format(r['peak_memory_mib'], ',') if r.get('peak_memory_mib') else '-'} | {r['device']} |"
        for r in json.loads(path.read_text())
    ]
    header = "| version | augmentation | variant | px | N | training images/s | peak MiB | device |\n|---|---|---|---|---|---|---|---|\n"
    return header + "\n".join(rows)


def break_even_table() -> str:
    from compile_break_even import format_table

    path = RESULTS / "train_speed_gpu.json"
    return format_table(json.loads(path.read_text())) if path.exists() else "_no end-to-end training results yet_"


def views_table() -> str:
    runs = {mv: RESULTS / f"step_speed_cpu_n4_{mv}.json" for mv in ("sequential", "batched")}
    if not all(path.exists() for path in runs.values()):
        return "_no batched-views step results yet_"
    rows = {mv: json.loads(path.read_text())["rows"] for mv, path in runs.items()}
    lines = ["| objective (N=4) | mode | sequential: img/s, activations MiB | batched: img/s, activations MiB |", "|---|---|---|---|"]
    for seq, bat in zip(rows["sequential"], rows["batched"]):
        mode = "ADIOS" if seq["mode"] == "all" else "ADIOS-s"
        lines.append(f"| {seq['objective']} | {mode} | {seq['fast_images_per_s']:.0f}, {seq['fast_saved_mib']:.0f} "
                     f"| {bat['fast_images_per_s']:.0f}, {bat['fast_saved_mib']:.0f} |")
    return "\n".join(lines)


def ops_table() -> str:
    path = RESULTS / "ops_per_step.json"
    if not path.exists():
        return "_no operation counts yet_"
    entries = json.loads(path.read_text())
    labels = list(dict.fromkeys(e["label"] for e in entries))
    count = {(e["label"], e["variant"]): e for e in entries}
    columns = [(label, suffix) for label in labels for suffix in ("", "_batched")
               if any((label, v + suffix) in count for v in VARIANT_NAMES)]
    head = "| variant | " + " | ".join(f"{label}: {'batched' if suffix else 'sequential'} views" for label, suffix in columns) + " |"
    lines = [head, "|---|" + "---|" * len(columns)]
    for variant, name in VARIANT_NAMES.items():
        cells = []
        for label, suffix in columns:
            e = count.get((label, variant + suffix))
            cells.append(f"{e['kernel_ops_per_step']:,} ({e['ops_per_step']:,})" if e else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quality_table() -> str:
    path = RESULTS / "quality.md"
    return path.read_text().strip() if path.exists() else "_no quality benchmark results yet_"


#: The files whose markers are filled in; a table goes wherever its markers are.
READMES = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")


def main() -> None:
    tables = {"step": step_tables, "data": data_table, "train": train_table, "ops": ops_table, "views": views_table, "quality": quality_table, "break_even": break_even_table}
    for path in READMES:
        readme = path.read_text()
        for name, render in tables.items():
            pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
            readme = pattern.sub(lambda m: m.group(1) + render() + "\n" + m.group(2), readme)
        path.write_text(readme)


if __name__ == "__main__":
    main()
