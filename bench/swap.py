"""Adapter switching, measured: lora-pytorch's exact rebuild vs PEFT, on one model in one run.

    .venv/bin/python bench/swap.py               # SmolLM2-135M, bfloat16, all-linear r=16 adapters, 2 threads
    .venv/bin/python bench/swap.py --threads 1   # when other jobs share the cores: ~1 min instead of ~7

Prints a markdown table (paste it into the README with the machine line under it):
  - switch latency here, two ways: between tasks whose merged weights are cached (the default
    merged_cache_bytes holds both: parameters are re-pointed, nothing is copied), and with
    merged_cache_bytes=0, where every switch rebuilds each touched weight as W0 + s*B@A; vs PEFT's
    unmerge + set_adapter + merge, PEFT's hotswap_adapter, and the floors: a plain copy of exactly the
    weights a switch touches, and one addmm per weight in a loop;
  - the same switches with 1,000 tasks registered, and a switch to a task that is not cached yet;
  - base-weight drift after 1,000 rebuilding switches in this dtype, here vs PEFT's merge/unmerge;
  - forward latency with a merged task vs the plain base model (and PEFT's unmerged adapter).
Everything that is compared is timed interleaved, iteration by iteration, and ratios are medians of the
per-iteration ratios: on a shared machine the load changes from second to second, and pairing cancels it.
The adapters are random (seeded) but shaped like trained ones. Only the drift depends on their values: it
grows with the size of the deltas relative to the weights, which is printed.
"""
import argparse
import atexit
import copy
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded: the model and adapters are local

import torch
from machine import cpu_model  # bench/machine.py: this script's folder is on sys.path

import lora
from lora.models import resolve_dtype

p = argparse.ArgumentParser(description="Adapter switch latency, drift and forward cost: lora-pytorch vs PEFT.")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
p.add_argument("--r", type=int, default=16)
p.add_argument("--iterations", type=int, default=10, help="timed rounds; each has 2 switches here and 1 PEFT cycle")
p.add_argument("--switches", type=int, default=1000, help="switches for the drift test")
p.add_argument("--tasks", type=int, default=1000, help="registry size for the scaling check")
p.add_argument("--drift-layers", type=int, default=1,
               help="decoder layers the drift test switches (0: all). Drift per element does not depend on how many, "
                    "and 1,000 PEFT merge/unmerge cycles of the whole model take minutes")
p.add_argument("--tokens", type=int, default=64, help="prompt length for the forward-latency test")
p.add_argument("--threads", type=int, default=2,
               help="torch threads. With more threads than idle cores, every parallel op waits for its slowest "
                    "thread: on a busy machine 1 thread is several times faster and much steadier")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

try:
    import peft
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer as PeftLoraLayer
    from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict, load_peft_weights
except ImportError:
    sys.exit("bench/swap.py compares against PEFT: pip install peft (make install installs it with the dev extras)")
import transformers

transformers.logging.set_verbosity_error()
torch.set_num_threads(args.threads)
dtype = resolve_dtype(args.dtype)
t_start, load_start = time.perf_counter(), os.getloadavg()[0]
if args.threads > 1 and load_start + args.threads > (os.cpu_count() or 1) + 0.5:
    print(f"bench/swap.py: load average {load_start:.1f} on {os.cpu_count()} cores: with {args.threads} threads every "
          "parallel op waits for its slowest thread, so timings will be slow and noisy; --threads 1 is steadier",
          file=sys.stderr)


def log(msg):
    print(f"[swap {time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)


def ms(fn):
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def med(xs):
    return statistics.median(xs)


def paired(num, den):
    """Median of per-iteration ratios: robust to load that changes between iterations."""
    return med([n / d for n, d in zip(num, den)])


def cell(xs):
    return f"{med(xs):.1f} ms (best {min(xs):.1f})"


# ---------------------------------------------------------------- model and random adapters
log(f"loading {args.model} in {args.dtype}, {args.threads} threads")
model, tokenizer = lora.load_model(args.model, dtype=dtype)
# PEFT and the rebuilding MultiTaskModel get their own copies of the same weights: no side sees another's writes.
peft_base, model0 = copy.deepcopy(model), copy.deepcopy(model)

names = lora.find_targets(model, "all-linear")
per_layer = len(names) // model.config.num_hidden_layers  # names are in model order: layer 0's come first
drift_names = names if args.drift_layers == 0 else names[:per_layer * args.drift_layers]
log(f"making random all-linear r={args.r} adapters a, b ({len(names)} modules) and the same on {len(drift_names)} "
    f"modules for the drift test")
workdir = tempfile.mkdtemp(prefix="lora-bench-swap-")
atexit.register(shutil.rmtree, workdir, True)
full, part = copy.deepcopy(model), copy.deepcopy(model)
lora.inject(full, names, r=args.r, alpha=2 * args.r)
lora.inject(part, drift_names, r=args.r, alpha=2 * args.r)
gen = torch.Generator().manual_seed(args.seed)
dirs = {}
with torch.no_grad():
    for task in ("a", "b"):
        for name, layer in lora.lora_layers(full).items():
            # A ~ U(-1, 1)/sqrt(in), about Kaiming's scale; B ~ N(0, 0.01), where a fresh adapter has B = 0.
            layer.lora_A.copy_(torch.rand(layer.lora_A.shape, generator=gen).mul_(2).sub_(1) / layer.lora_A.shape[1] ** 0.5)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.01)
            if name in drift_names:  # the drift adapters hold the same values on their modules
                part.get_submodule(name).lora_A.copy_(layer.lora_A)
                part.get_submodule(name).lora_B.copy_(layer.lora_B)
        dirs[task] = lora.save_adapter(full, os.path.join(workdir, task))
        dirs[task + "_part"] = lora.save_adapter(part, os.path.join(workdir, task + "_part"))
del full, part
drift_tasks = ("a", "b") if args.drift_layers == 0 else ("a_part", "b_part")

# ---------------------------------------------------------------- both sides set up
log("setting up lora-pytorch's MultiTaskModel (twice: merged weights cached, and always rebuilt) and a PeftModel")
mt = lora.MultiTaskModel(model, dirs, tokenizer=tokenizer)
mt0 = lora.MultiTaskModel(model0, dirs, tokenizer=tokenizer, merged_cache_bytes=0)
weights = [model.get_submodule(n).weight for n in names]  # a -> b touches every module a or b targets: all of them
originals = [w.detach().clone() for w in weights]  # the untouched weights: copy source and drift reference
dst = [torch.empty_like(w) for w in weights]
touched_mb = sum(w.nbytes for w in weights) / 1e6
b_modules = [mt.adapter("b").modules[n] for n in names]
delta_ratio = med([(m.scaling * m.B.float() @ m.A.float()).abs().mean().item() / w.float().abs().mean().item()
                   for m, w in zip(b_modules, originals)])

pm = PeftModel.from_pretrained(peft_base, dirs["a"], adapter_name="a")
pm.load_adapter(dirs["b"], adapter_name="b")
pm.eval()
peft_current = "a"


@torch.no_grad()
def plain_copy():
    for d, w0 in zip(dst, originals):
        d.copy_(w0)


@torch.no_grad()
def addmm_rebuild():  # the straightforward rebuild: one fused W0 + s*B@A per weight, in a loop
    for d, w0, m in zip(dst, originals, b_modules):
        if m.B.dtype != w0.dtype:  # float16 on CPU: MultiTaskModel rebuilds in float32 and rounds once
            d.copy_(torch.addmm(w0.float(), m.B, m.A, alpha=m.scaling))
        else:
            torch.addmm(w0, m.B, m.A, alpha=m.scaling, out=d)


@torch.no_grad()
def peft_cycle():
    global peft_current
    peft_current = "b" if peft_current == "a" else "a"
    pm.unmerge_adapter()
    pm.set_adapter(peft_current)
    pm.merge_adapter()


def timing_round(n, with_peft):
    """n interleaved rounds of: plain copy, addmm floor, a -> b -> a both ways here (and one PEFT cycle)."""
    t = {k: [] for k in ("copy", "addmm", "switch", "rebuild", "peft")}
    for _ in range(n):
        t["copy"].append(ms(plain_copy))
        t["addmm"].append(ms(addmm_rebuild))
        # One number per round, the mean of a -> b and b -> a, so it pairs with this round's copy.
        t["switch"].append((ms(lambda: mt.activate("a")) + ms(lambda: mt.activate("b"))) / 2)
        t["rebuild"].append((ms(lambda: mt0.activate("a")) + ms(lambda: mt0.activate("b"))) / 2)
        if with_peft:
            t["peft"].append(ms(peft_cycle))
    return t


log("warm-up")  # first switches allocate merged weights, page in weights, and load adapters into the caches
with torch.no_grad():
    pm.merge_adapter()
timing_round(1, True)
log(f"timing {args.iterations} rounds: plain copy, addmm floor, 2 switches here, 1 PEFT unmerge+set_adapter+merge")
small = timing_round(args.iterations, True)
t_to_base, t_from_base = [], []
for i in range(max(3, args.iterations // 2)):  # base -> the other task: a rebuild
    t_to_base.append(ms(lambda: mt0.activate(None)))
    t_from_base.append(ms(lambda: mt0.activate("ab"[i % 2])))

log("PEFT hotswap_adapter: unmerged adapter 'a', its weights replaced in place")
with torch.no_grad():
    pm.unmerge_adapter()
    pm.set_adapter("a")
states = {}
for task in ("a", "b"):  # the same, minus reading the file: the state dict is prepared once, as hotswap_adapter does
    states[task] = (_insert_adapter_name_into_state_dict(load_peft_weights(dirs[task], device="cpu"),
                                                         adapter_name="a", parameter_prefix="lora_"),
                    LoraConfig.from_pretrained(dirs[task]))
t_hot_disk, t_hot_mem = [], []
with torch.no_grad():
    for i in range(2 + 2 * max(2, args.iterations // 2)):  # b, a, b, a...: adapter "a" ends up holding a again
        task = "ba"[i % 2]
        t_hot_disk.append(ms(lambda: hotswap_adapter(pm, dirs[task], adapter_name="a", torch_device="cpu")))
        t_hot_mem.append(ms(lambda: hotswap_adapter_from_state_dict(pm, states[task][0], "a", states[task][1])))
t_hot_disk, t_hot_mem = t_hot_disk[2:], t_hot_mem[2:]

# ---------------------------------------------------------------- forward latency
text = "The quick brown fox jumps over the lazy dog while the engineer explains low-rank adapters. " * 20
ids = tokenizer(text, return_tensors="pt").input_ids[:, :args.tokens]
log(f"forward latency, batch 1 x {ids.shape[1]} tokens: base, merged task, PEFT unmerged")
t_fwd_base, t_fwd_merged, t_fwd_peft = [], [], []
with torch.no_grad():
    for i in range(1 + max(3, args.iterations // 2)):
        mt.activate(None)
        tb = ms(lambda: model(ids))
        mt.activate("a")
        tm = ms(lambda: model(ids))
        tp = ms(lambda: pm(input_ids=ids))
        if i >= 1:  # the first round warms up
            t_fwd_base.append(tb), t_fwd_merged.append(tm), t_fwd_peft.append(tp)
    # Sanity: the weights our task "a" runs with vs PEFT's merge arithmetic applied once to the original weights.
    peft_modules = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, PeftLoraLayer)}
    agree_max, agree_diff = 0.0, 0
    for n, w, w0 in zip(names, weights, originals):
        fresh = w0.clone()
        fresh += peft_modules[n].get_delta_weight("a")
        agree_max = max(agree_max, (w.float() - fresh.float()).abs().max().item())
        agree_diff += (w != fresh).sum().item()
    agree_frac = agree_diff / sum(w.numel() for w in weights)
    mt.activate(None)
# All the full-model switches so far, then back to base: every weight must be bitwise the original.
mt0.activate(None)
weights0 = [model0.get_submodule(n).weight for n in names]
full_exact = all(torch.equal(w, w0) for ws in (weights, weights0) for w, w0 in zip(ws, originals))

# ---------------------------------------------------------------- drift after many switches
torch.set_num_threads(1)  # nothing here is timed, and one thread is fastest when other jobs share the cores
log(f"lora-pytorch: drift after {args.switches} switches between {' and '.join(drift_tasks)} "
    f"({len(drift_names)} modules), every one rebuilding the weights (merged_cache_bytes=0)")
t0 = time.perf_counter()
for i in range(args.switches):
    mt0.activate(drift_tasks[i % 2])
    if (i + 1) % 250 == 0:
        log(f"  {i + 1} switches, {(time.perf_counter() - t0) / (i + 1) * 1e3:.1f} ms each")
last = drift_tasks[(args.switches - 1) % 2]
# What the task sees now vs a single switch to it from the base: bitwise the same, by construction.
ours_task_max = 0.0
for n, m in mt0.adapter(last).modules.items():
    w0 = originals[names.index(n)]
    fresh = torch.addmm(w0.float() if m.B.dtype != w0.dtype else w0, m.B, m.A, alpha=m.scaling).to(w0.dtype)
    ours_task_max = max(ours_task_max, (model0.get_submodule(n).weight.float() - fresh.float()).abs().max().item())
mt0.activate(None)
ours_max = max((w.float() - w0.float()).abs().max().item() for w, w0 in zip(weights0, originals))
ours_changed = sum((w != w0).sum().item() for w, w0 in zip(weights0, originals)) / sum(w.numel() for w in weights0)

peft_layers = [m for n, m in pm.named_modules() if isinstance(m, PeftLoraLayer)
               and n.removeprefix("base_model.model.") in drift_names]
log(f"PEFT: drift after {args.switches} merge/unmerge switches ({len(peft_layers)} modules)")
before = [m.get_base_layer().weight.detach().clone() for m in peft_layers]


def changed():
    return sum((m.get_base_layer().weight != w0).sum().item() for m, w0 in zip(peft_layers, before)) / \
        sum(w0.numel() for w0 in before)


with torch.no_grad():
    growth = {}  # switches so far -> fraction of base elements changed, read while unmerged between two switches
    t0 = time.perf_counter()
    for i in range(args.switches):  # per module, exactly what unmerge_adapter + set_adapter + merge_adapter do
        for m in peft_layers:
            if m.merged:
                m.unmerge()
        if i in (10, 100):
            growth[i] = changed()
        for m in peft_layers:
            m.merge(adapter_names=["ab"[i % 2]])
        if (i + 1) % 250 == 0:
            log(f"  {i + 1} switches, {(time.perf_counter() - t0) / (i + 1) * 1e3:.1f} ms each")
    peft_task_max = 0.0
    for m, w0 in zip(peft_layers, before):
        fresh = w0.clone()
        fresh += m.get_delta_weight("ab"[(args.switches - 1) % 2])  # PEFT's own merge arithmetic, once
        peft_task_max = max(peft_task_max, (m.get_base_layer().weight.float() - fresh.float()).abs().max().item())
    for m in peft_layers:
        m.unmerge()
    after = [m.get_base_layer().weight for m in peft_layers]
    peft_max = max((w.float() - w0.float()).abs().max().item() for w, w0 in zip(after, before))
    peft_changed = growth[args.switches] = changed()

torch.set_num_threads(args.threads)

# ---------------------------------------------------------------- registry size: 2 vs 1,000 tasks
extra = max(0, args.tasks - 2)
log(f"lora-pytorch: registering {extra} more tasks, timing switches again")
# Registration is lazy (a name and a path; nothing is read until first use), so extra names pointing at the
# checkpoints on disk make a registry as large as that many distinct ones would.
t_register = ms(lambda: [mt.add_downstream(f"task{i:04d}", dirs["ab"[i % 2]]) for i in range(extra)])
for i in range(extra):
    mt0.add_downstream(f"task{i:04d}", dirs["ab"[i % 2]])
big = timing_round(args.iterations, False)
# Not cached yet: read the checkpoint (from the page cache here), validate it, convert it, then rebuild.
t_cold = [ms(lambda: mt.activate(f"task{i:04d}")) for i in range(min(5, extra))]
mt.activate(None)

# ---------------------------------------------------------------- report
sw, rb, cp, cyc = small["switch"], small["rebuild"], small["copy"], small["peft"]
targets = {kind: (paired(xs, cp), paired(cyc, xs), min(xs) / min(cp), min(cyc) / min(xs))
           for kind, xs in (("cached", sw), ("rebuilding", rb))}
n_tasks = len(mt.downstreams) - 2  # a_part and b_part are not part of the scaling check
rows = [
    ("switch between two recently used tasks (merged weights cached: parameters re-pointed)", cell(sw),
     f"unmerge + set_adapter + merge: {cell(cyc)}", f"PEFT {targets['cached'][1]:.0f}x slower"),
    ("switch that rebuilds every touched weight (`merged_cache_bytes=0`)", cell(rb), "",
     f"PEFT {targets['rebuilding'][1]:.1f}x slower"),
    (f"the same two switches, {n_tasks:,} tasks registered", f"{med(big['switch']):.2f} / {med(big['rebuild']):.1f} ms",
     "", f"rebuild {paired(big['rebuild'], big['copy']):.2f}x copy (vs {targets['rebuilding'][0]:.2f}x with 2)"),
    ("switch to a task not cached yet (read, validate, rebuild)", cell(t_cold), "", ""),
    ("rebuilding: task -> base / base -> task", f"{med(t_to_base):.2f} / {med(t_from_base):.1f} ms", "", ""),
    ("hotswap_adapter from disk (adapter stays unmerged)", "", cell(t_hot_disk),
     f"{med(t_hot_disk) / med(rb):.2f}x our rebuild"),
    ("hotswap from a state dict in memory", "", cell(t_hot_mem), f"{med(t_hot_mem) / med(rb):.2f}x our rebuild"),
    (f"floor: plain copy of the {touched_mb:.0f} MB of weights a switch touches", cell(cp), "",
     f"rebuild = {targets['rebuilding'][0]:.2f}x copy"),
    ("floor: one addmm W0 + s*B@A per touched weight, in a loop", cell(small["addmm"]), "",
     f"rebuild = {paired(rb, small['addmm']):.2f}x addmm"),
    (f"after {args.switches:,} switches, back to base: max abs change of base weights", f"{ours_max:g}", f"{peft_max:g}", ""),
    (f"after {args.switches:,} switches, back to base: base weight elements changed",
     f"{100 * ours_changed:g}%", f"{100 * peft_changed:.2f}%", ""),
    (f"after {args.switches:,} switches, on a task: max abs diff from one fresh merge",
     f"{ours_task_max:g}", f"{peft_task_max:g}", ""),
    (f"forward, batch 1 x {ids.shape[1]} tokens, plain base model", cell(t_fwd_base), "", ""),
    (f"forward, batch 1 x {ids.shape[1]} tokens, with a task", f"merged: {cell(t_fwd_merged)}",
     f"unmerged: {cell(t_fwd_peft)}", f"{paired(t_fwd_merged, t_fwd_base):.2f}x base / "
     f"{paired(t_fwd_peft, t_fwd_base):.2f}x base"),
]
print(f"\n## Adapter switching: {args.model}, {args.dtype}, all-linear r={args.r} alpha={2 * args.r} "
      f"({len(names)} modules), same model, same run\n")
print(f"| metric | lora-pytorch | PEFT {peft.__version__} | ratio |")
print("|---|---|---|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")
for kind, (r_copy, r_peft, best_copy, best_peft) in targets.items():
    print(f"\nTargets, {kind} switch: within 3x of the plain copy of the weights it touches: {r_copy:.2f}x "
          f"({'met' if r_copy <= 3 else 'MISSED'}); at least 10x faster than PEFT's unmerge + set_adapter + merge: "
          f"{r_peft:.1f}x ({'met' if r_peft >= 10 else 'MISSED'}). Best-of-run: {best_copy:.2f}x copy, "
          f"PEFT {best_peft:.1f}x slower.")
print(f"Medians (best) of {args.iterations} interleaved rounds, ratios are medians of per-round ratios. Drift: "
      f"{args.switches:,} rebuilding switches on {len(drift_names)} modules ({'all' if args.drift_layers == 0 else args.drift_layers} "
      f"decoder layer(s)), both sides. All {len(names)} weights bitwise restored after the timed switches, both ways: "
      f"{'yes' if full_exact else 'NO'}. Registering {extra:,} tasks took {t_register:.0f} ms. Memory beyond the "
      f"model: {touched_mb:.0f} MB of merged weights per cached task (at least the active one's, as with "
      "merged_cache_bytes=0); the base weights themselves are never written and serve as the pristine copy.")
print("PEFT base weight elements changed after " + ", ".join(f"{n:,}" for n in growth) + " switches: "
      + ", ".join(f"{100 * f:.2f}%" for f in growth.values()) + ".")
print(f"Random adapters: mean |s*B@A| / mean |W| = {delta_ratio:.3f}. Task a's weights here vs PEFT's merge done once on "
      f"the original weights: {100 * agree_frac:.2f}% of elements differ (rounding), by at most {agree_max:g}.")
print(f"Machine: {platform.platform()}, {cpu_model()}, {os.cpu_count()} cores, {args.threads} torch threads, "
      f"load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end; Python {platform.python_version()}, "
      f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}.")
log(f"done in {time.perf_counter() - t_start:.0f} s")
