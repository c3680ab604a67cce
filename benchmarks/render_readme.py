"""Insert the benchmark tables from benchmarks/results/*.json into README.md (between markers).

    python benchmarks/render_readme.py

Tables in the README are produced here from the result files, never typed by hand.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))


def step_tables() -> str:
    from step_speed import format_table

    parts = []
    for name in ("step_speed_cpu.json", "step_speed_gpu.json", "step_speed_gpu_simultaneous.json", "step_speed_gpu_bf16.json", "step_speed_gpu_n4.json"):
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


def train_table() -> str:
    path = RESULTS / "train_speed_gpu.json"
    if not path.exists():
        return "_no end-to-end training results yet_"
    names = {"baseline": "baseline (num_masks=0)", "adios": "ADIOS (exact)", "adios_s": "ADIOS-s", "simultaneous": "simultaneous"}
    rows = [
        f"| {r['label'] or '-'} | {r['augment_on']} | {names.get(r['variant'], r['variant'])} | {r['image_size']} | {r['num_masks']} "
        f"| {r['images_per_s']:,.0f} | {r['device']} |"
        for r in json.loads(path.read_text())
    ]
    header = "| version | augmentation | variant | px | N | training images/s | device |\n|---|---|---|---|---|---|---|\n"
    return header + "\n".join(rows)


def quality_table() -> str:
    path = RESULTS / "quality.md"
    return path.read_text().strip() if path.exists() else "_no quality benchmark results yet_"


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, render in (("step", step_tables), ("data", data_table), ("train", train_table), ("quality", quality_table)):
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        readme = pattern.sub(lambda m: m.group(1) + render() + "\n" + m.group(2), readme)
    (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
