"""The demo's report: report.md with base-vs-adapter scores, sizes and switch times, plus loss.png and metrics.png.

Everything comes in as one plain `summary` dict (also written as summary.json, so numbers can be
reused without parsing markdown):

    {"model": str, "base_parameters": int, "base_bytes": int, "wall_seconds": float, "threads": int,
     "tasks": [{"task", "metric", "base_score", "adapter_score", "n", "adapter_parameters", "adapter_bytes",
                "train_seconds" (None when reused), "metrics_path", "data_format" (optional),
                "structured" (optional: {"unconstrained_score", "parse", "unconstrained_parse"} for a task
                with a response_schema),
                "example": {"instruction", "input", "output", "base", "adapter"}}],
     "switches": [{"task", "switch_ms", "answer_seconds", "instruction", "input", "answer"}],
     "phases": {name: seconds}, "cpu_seconds": float, "load_average": float (all three optional)}
"""
import json
import os
import statistics

from lora.metrics import read_metrics, train_rows, validation_rows
from lora.plots import plot_losses, plot_metrics

METRIC_NAMES = {"exact_match": "exact match", "rouge_l": "ROUGE-L F1"}


def megabytes(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def minutes(seconds):
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def one_line(text, limit=160):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def cell(text, limit=100):
    return one_line(text, limit).replace("|", "\\|")  # a bare | would end the table cell


def score_table(tasks):
    lines = ["| task | metric | base model | LoRA adapter | test examples |", "|---|---|---:|---:|---:|"]
    for t in tasks:
        lines.append(f"| {t['task']} | {METRIC_NAMES.get(t['metric'], t['metric'])} | {t['base_score']:.2f} | "
                     f"**{t['adapter_score']:.2f}** | {t['n']} |")
    return lines


def size_table(summary):
    base_bytes = summary["base_bytes"]
    lines = ["| | parameters | file size | vs base model |", "|---|---:|---:|---:|",
             f"| base model ({summary['model']}) | {summary['base_parameters'] / 1e6:.1f} M | "
             f"{megabytes(base_bytes)} | 100% |"]
    for t in summary["tasks"]:
        lines.append(f"| {t['task']} adapter | {t['adapter_parameters'] / 1e6:.2f} M | "
                     f"{megabytes(t['adapter_bytes'])} | {100 * t['adapter_bytes'] / base_bytes:.2f}% |")
    return lines


def training_table(tasks):
    lines = ["| task | training data | optimizer steps | training time | train loss, first -> last "
             "| validation loss, first -> last |", "|---|---|---:|---:|---:|---:|"]
    for t in tasks:
        rows = read_metrics(t["metrics_path"])
        train, val = train_rows(rows), validation_rows(rows)
        took = minutes(t["train_seconds"]) if t.get("train_seconds") is not None else "reused"
        lines.append(f"| {t['task']} | {t.get('data_format', '-')} | {train[-1]['step'] if train else '-'} | {took} | "
                     f"{first_last(train, 'loss')} | {first_last(val, 'val_loss')} |")
    return lines


def first_last(rows, key):
    return f"{rows[0][key]:.3f} -> {rows[-1][key]:.3f}" if rows else "-"


def switch_table(switches):
    lines = ["| # | task | switch | generation | instruction | answer |", "|---:|---|---:|---:|---|---|"]
    for i, s in enumerate(switches, 1):
        lines.append(f"| {i} | {s['task']} | {s['switch_ms']:.1f} ms | {s['answer_seconds']:.2f} s | "
                     f"{cell(s['instruction'], 70)} | {cell(s['answer'], 140)} |")
    return lines


def example_section(t):
    ex = t["example"]
    lines = [f"### {t['task']}", ""]
    if ex.get("input"):
        lines.append(f"- **input:** {one_line(ex['input'], 400)}")
    lines += [f"- **instruction:** {one_line(ex['instruction'], 400)}",
              f"- **expected:** `{one_line(ex['output'])}`",
              f"- **base model:** `{one_line(ex['base'])}`",
              f"- **LoRA adapter:** `{one_line(ex['adapter'])}`", ""]
    return lines


def structured_section(tasks):
    """The adapters with a response_schema, scored with it (as served: constrained decoding) and without."""
    rows = [t for t in tasks if t.get("structured")]
    if not rows:
        return []
    lines = ["## Structured outputs", "",
             "A task trained with `--response_schema` answers within its JSON schema when served (constrained "
             "decoding); here the same adapter with and without it.", "",
             "| task | metric | with its schema | without | answers that parse: with | without |",
             "|---|---|---|---|---|---|"]
    for t in rows:
        s = t["structured"]
        lines.append(f"| {t['task']} | {METRIC_NAMES.get(t['metric'], t['metric'])} | **{t['adapter_score']:.2f}** | "
                     f"{s['unconstrained_score']:.2f} | {100 * s['parse']:.0f}% | {100 * s['unconstrained_parse']:.0f}% |")
    return [*lines, ""]


def write_report(out_dir, summary):
    """Write report.md, summary.json, loss.png and metrics.png into out_dir; returns report.md's path."""
    os.makedirs(out_dir, exist_ok=True)
    tasks, switches = summary["tasks"], summary["switches"]
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    loss_png = plot_losses({t["task"]: t["metrics_path"] for t in tasks}, os.path.join(out_dir, "loss.png"),
                           title=f"LoRA finetuning of {summary['model']}")
    metrics_png = plot_metrics([(t["task"], METRIC_NAMES.get(t["metric"], t["metric"]), t["base_score"],
                                 t["adapter_score"]) for t in tasks], os.path.join(out_dir, "metrics.png"),
                               title=f"{summary['model']}: base model vs LoRA adapter on each test set")
    switch_ms = [s["switch_ms"] for s in switches]
    lines = [f"# LoRA demo: {len(tasks)} task adapters on {summary['model']}", "",
             f"One base model ({summary['base_parameters'] / 1e6:.0f} M parameters), one small LoRA adapter per task, "
             f"all served from one `MultiTaskModel`. The whole run took {minutes(summary['wall_seconds'])} "
             f"on {summary['threads']} CPU thread(s).", "",
             "## Base model vs adapter", "",
             "Each model answers every test example greedily. An adapter is prompted as it was trained (its prompt "
             "format, or the chat template for chat data); the base model gets the task's prompt format, with the "
             "task's instructions written out.", "", *score_table(tasks), ""]
    if metrics_png:
        lines += ["![base model vs adapter](metrics.png)", ""]
    lines += structured_section(tasks)
    lines += ["## Training", "", *training_table(tasks), ""]
    if loss_png:
        lines += ["![training and validation loss](loss.png)", ""]
    all_adapters = sum(t["adapter_bytes"] for t in tasks)
    lines += ["## Adapter sizes", "", f"All {len(tasks)} adapters together take {megabytes(all_adapters)}, "
              f"{100 * all_adapters / summary['base_bytes']:.1f}% of the one base model they share.", "",
              *size_table(summary), ""]
    if switches:
        lines += ["## Switching tasks", "",
                  f"One `MultiTaskModel` answers the tasks in interleaved order. The base weights are never "
                  f"written: each task's merged weights (W = W0 + s·B·A) are built on first use and kept while they "
                  f"fit in `merged_cache_bytes`, and a switch points the targeted parameters at them; median switch "
                  f"time **{statistics.median(switch_ms):.1f} ms** (max {max(switch_ms):.1f} ms).", "",
                  *switch_table(switches), ""]
    if summary.get("exports"):
        lines += ["## Running the tasks in Ollama or llama.cpp", "",
                  "`make demo` exported each adapter as a llama.cpp LoRA adapter GGUF with an Ollama `Modelfile` "
                  "that asks the task as it was trained (`lora export --format ollama`):", "",
                  "| task | adapter.gguf | command |", "|---|---:|---|",
                  *[f"| {e['task']} | {megabytes(e['adapter_gguf_bytes'])} | `{e['command']}` |"
                    for e in summary["exports"]], ""]
    lines += ["## Example answers", "", "The first test example of each task.", ""]
    for t in tasks:
        lines += example_section(t)
    if summary.get("phases"):
        lines += ["## Time", "", "| step | wall time |", "|---|---:|",
                  *[f"| {name} | {minutes(seconds)} |" for name, seconds in summary["phases"].items()],
                  f"| **all of it** | **{minutes(summary['wall_seconds'])}** |", ""]
    if summary.get("cpu_seconds") is not None:
        # Wall time depends on what else runs on the machine; CPU time and load say how busy it was.
        lines += [f"The run used {minutes(summary['cpu_seconds'])} of CPU time on {summary['threads']} thread(s)"
                  + (f"; the machine's load average over the last 15 minutes was {summary['load_average']:.1f} "
                     f"(on {os.cpu_count()} cores)" if summary.get("load_average") is not None else "") + ".", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
