"""Where a profiled step's device time goes: the top ops and the share of each kind of work.

``summarize(trace_dir, hlo_text)`` reads the Perfetto trace that
``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes, sums device time per XLA
instruction (``hlo_op`` in each event's arguments; kernel names where there is none), and sorts
each instruction into a category using the compiled module's HLO text
(``compiled.as_text()``):

* ``convolution``: cuDNN convolution calls and fusions that contain a convolution;
* ``matmul``: cuBLAS/cuBLASLt/Triton GEMMs and dots (the classifier);
* ``batchnorm_elementwise``: the other fusions of the forward and backward passes (BatchNorm
  statistics and normalisation, ReLU, residual adds, pooling, the loss);
* ``optimizer``: instructions outside the differentiated function (``jvp``/``transpose`` in
  their ``op_name``): the SGD update, weight decay, metrics;
* ``copy_other``: copies, transposes, memsets and anything not attributed.

Standard library only, so it runs where the trace was written or anywhere else.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Any

CATEGORIES = ("convolution", "matmul", "batchnorm_elementwise", "optimizer", "copy_other")
PHASES = ("forward", "backward", "optimizer", "other")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"^(?:\([^=]*?\)|[\w\[\]{},:\s]*?)\s*([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\([^)]*\)\s*->.*)?\{\s*$")


def parse_hlo(hlo_text: str) -> dict[str, dict[str, Any]]:
    """Instruction name -> {opcode, target, op_name, has_conv, has_dot} of an HLO module's text."""
    computations: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    current = None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("{")[0]:
            current = head.group(1)
            continue
        m = _INSTR.match(line)
        if not m or current is None:
            continue
        name, rest = m.groups()
        op = _OPCODE.match(rest)
        calls = _CALLS.search(rest)
        target = _TARGET.search(rest)
        op_name = _OP_NAME.search(rest)
        computations[current].append(
            {
                "name": name,
                "opcode": op.group(1) if op else "",
                "calls": calls.group(1) if calls else None,
                "target": target.group(1) if target else "",
                "op_name": op_name.group(1) if op_name else "",
            }
        )

    def contains(comp: str, opcodes: set[str], seen: set[str]) -> bool:
        if comp in seen:
            return False
        seen.add(comp)
        for ins in computations.get(comp, ()):
            if ins["opcode"] in opcodes or (
                ins["target"] and _is_conv_target(ins["target"]) and "convolution" in opcodes
            ):
                return True
            if ins["calls"] and contains(ins["calls"], opcodes, seen):
                return True
        return False

    table: dict[str, dict[str, Any]] = {}
    for comp, instrs in computations.items():
        for ins in instrs:
            entry = dict(ins)
            entry["computation"] = comp
            sub = ins["calls"]
            entry["has_conv"] = (
                ins["opcode"] == "convolution"
                or _is_conv_target(ins["target"])
                or bool(sub and contains(sub, {"convolution"}, set()))
            )
            entry["has_dot"] = (
                ins["opcode"] == "dot"
                or _is_gemm_target(ins["target"])
                or bool(sub and contains(sub, {"dot"}, set()))
            )
            if not entry["op_name"] and sub:
                # A fusion's metadata can be empty; its root instruction's is not.
                for inner in computations.get(sub, ()):
                    if inner["op_name"]:
                        entry["op_name"] = inner["op_name"]
            table.setdefault(ins["name"], entry)
    return table


def _is_conv_target(target: str) -> bool:
    return "conv" in target.lower() and "cudnn" in target.lower()


def _is_gemm_target(target: str) -> bool:
    t = target.lower()
    return "gemm" in t or "cublas" in t or "matmul" in t


_CONV_KERNEL = re.compile(r"xmma|implicit_gemm|conv|cudnn|wgrad|dgrad|fprop|scudnn", re.I)
_GEMM_KERNEL = re.compile(r"gemm|cutlass|cublas|nvjet|matmul|triton_gemm", re.I)
_COPY_KERNEL = re.compile(r"memcpy|memset|copy|transpose", re.I)


def categorize(
    op: str, info: dict[str, Any] | None, kernel_names: set[str], forward_only: bool = False
) -> str:
    """The category of one instruction (``info`` from :func:`parse_hlo`, None if unknown).

    In a training step an op outside autodiff's ``jvp``/``transpose`` is the optimizer's;
    ``forward_only`` (an inference program, which has neither) turns that rule off."""
    if info is not None:
        if info["has_conv"]:
            return "convolution"
        if info["has_dot"]:
            return "matmul"
        if info["opcode"] in ("copy", "transpose", "copy-start", "copy-done", "bitcast"):
            return "copy_other"
        name = info["op_name"]
        if name and not forward_only and "jvp(" not in name and "transpose(" not in name:
            return "optimizer"
        if info["opcode"] in ("fusion", "reduce", "add", "multiply", "maximum", "select", "reduce-window"):
            return "batchnorm_elementwise"
        if name:
            return "batchnorm_elementwise"
        return "copy_other"
    joined = " ".join(kernel_names)
    if _CONV_KERNEL.search(joined):
        return "convolution"
    if _GEMM_KERNEL.search(joined):
        return "matmul"
    if _COPY_KERNEL.search(op) or _COPY_KERNEL.search(joined):
        return "copy_other"
    return "copy_other"


def phase(category: str, info: dict[str, Any] | None, forward_only: bool = False) -> str:
    """The part of the step an instruction belongs to: the forward pass (``jvp``), the backward
    (``transpose``, the gradient), the optimizer, or ``other`` (no metadata). In an inference
    program (``forward_only``) every op is the forward pass."""
    if forward_only:
        return "forward"
    if category == "optimizer":
        return "optimizer"
    name = info["op_name"] if info else ""
    if "transpose(" in name:
        return "backward"
    if "jvp(" in name:
        return "forward"
    return "other"


def _load_trace(trace_dir: str) -> list[dict[str, Any]]:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_events(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Complete events that ran on a device, without double counting derived lines.

    GPU traces have a process per device holding one line per CUDA stream (the kernels) and
    derived lines (``XLA Ops``, ``XLA Modules``, ...) that repeat the same time. Kernel lines are
    used where present. On the CPU the XLA thunks carry ``hlo_op`` on the host's threads.
    """
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e.get("args", {}).get("name", "")
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    gpu_pids = {pid for pid, name in processes.items() if "/device:GPU" in name or "/device:TPU" in name}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if gpu_pids:
        lines = {threads.get((e["pid"], e.get("tid")), "") for e in complete if e["pid"] in gpu_pids}
        stream_lines = {t for t in lines if t.lower().startswith("stream")}
        chosen = stream_lines or ({"XLA Ops"} & lines) or lines
        picked = [
            e
            for e in complete
            if e["pid"] in gpu_pids and threads.get((e["pid"], e.get("tid")), "") in chosen
        ]
        return picked, sorted(chosen)
    picked = [e for e in complete if "hlo_op" in e.get("args", {})]
    return picked, ["host threads with hlo_op"]


def summarize(
    trace_dir: str, hlo_text: str, steps: int, top: int = 15, forward_only: bool = False
) -> dict[str, Any]:
    """Top ``top`` instructions by device time, and the time share of each category.
    ``forward_only``: the program is inference, not a training step (see :func:`categorize`)."""
    table = parse_hlo(hlo_text)
    events, lines = device_events(_load_trace(trace_dir))
    per_op: dict[str, float] = collections.defaultdict(float)
    kernels: dict[str, set[str]] = collections.defaultdict(set)
    for e in events:
        args = e.get("args", {})
        op = args.get("hlo_op") or args.get("long_name", "").split(" ")[0] or e["name"]
        op = op.lstrip("%")
        per_op[op] += float(e["dur"])  # microseconds
        kernels[op].add(e["name"])
    total = sum(per_op.values())
    shares: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    phases: dict[str, dict[str, float]] = {p: dict.fromkeys(CATEGORIES, 0.0) for p in PHASES}
    rows = []
    attributed = 0.0
    for op, us in sorted(per_op.items(), key=lambda kv: -kv[1]):
        info = table.get(op)
        if info is not None:
            attributed += us
        cat = categorize(op, info, kernels[op], forward_only)
        shares[cat] += us
        phases[phase(cat, info, forward_only)][cat] += us
        rows.append(
            {
                "op": op,
                "category": cat,
                "time_ms_per_step": us / 1e3 / steps,
                "share": us / total if total else None,
                "opcode": info["opcode"] if info else None,
                "op_name": (info["op_name"] if info else "")[:160],
                "kernels": sorted(kernels[op])[:3],
            }
        )
    return {
        "steps": steps,
        "trace_lines": lines,
        "device_time_ms_per_step": total / 1e3 / steps,
        "attributed_to_hlo_share": attributed / total if total else None,
        "category_share": {k: (v / total if total else None) for k, v in shares.items()},
        "category_ms_per_step": {k: v / 1e3 / steps for k, v in shares.items()},
        "phase_category_ms_per_step": {
            p: {k: v / 1e3 / steps for k, v in cats.items()} for p, cats in phases.items()
        },
        "top_ops": rows[:top],
        "distinct_ops": len(rows),
    }
