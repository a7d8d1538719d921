"""The short summary of a ``benchmarks/gpu_suite.sh`` output directory.

``python -m benchmarks.gpu_summary OUTDIR`` prints one table per part that ran;
``python -m benchmarks.gpu_summary --loop WORKDIR`` prints, as JSON, what a training run's
``metrics.jsonl`` says about throughput and convergence (the suite stores it as ``loop.json``).
Standard library only.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Any


def loop_report(workdir: str) -> dict[str, Any]:
    records = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    evals = [r for r in records if r.get("split") == "eval"]
    rates = [r["images_per_sec"] for r in train if isinstance(r.get("images_per_sec"), (int, float))]
    compile_s = [r["compile_time_s"] for r in records if "compile_time_s" in r]
    losses = [r["loss"] for r in train]
    finite = all(isinstance(v, (int, float)) for v in losses)
    return {
        "workdir": workdir,
        "images_per_s_median": statistics.median(rates) if rates else None,
        "images_per_s_windows": rates,
        "compile_time_s": compile_s[0] if compile_s else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "all_losses_finite": finite,
        "skipped_steps_total": max((r.get("skipped_steps_total", 0) for r in train), default=0),
        "final_eval": evals[-1] if evals else None,
        "steps": train[-1]["step"] if train else 0,
    }


def _load(out_dir: str, name: str) -> dict[str, Any] | None:
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _gb(b: Any) -> str:
    return f"{b / 2**30:.1f}" if isinstance(b, (int, float)) else "-"


def _f(v: Any, spec: str = ".3g") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _contenders(result: dict[str, Any]) -> list[str]:
    return [k for k, v in result.items() if isinstance(v, dict) and ("images_per_s" in v or "error" in v)]


def _step_table(title: str, result: dict[str, Any]) -> list[str]:
    lines = [
        f"## {title}",
        "| contender | img/s | step ms | MFU | peak GB | note |",
        "|---|---|---|---|---|---|",
    ]
    for name in _contenders(result):
        c = result[name]
        if "error" in c:
            lines.append(f"| {name} | - | - | - | - | {c['error'][:80]} |")
            continue
        peak = c.get("peak_memory_bytes") or c.get("process_peak_memory_bytes_so_far")
        note = c.get("mode", "")
        if c.get("pipelined_images_per_s"):
            note += f" pipelined {c['pipelined_images_per_s']:.0f} img/s"
        lines.append(
            f"| {name} | {c['images_per_s']:.0f} | {c['step_time_s'] * 1e3:.1f} | {_f(c.get('mfu'), '.1%')} "
            f"| {_gb(peak)} | {note.strip()} |"
        )
    prof = result.get("profile") or {}
    if prof.get("category_share"):
        lines.append(
            f"profile: {prof['device_time_ms_per_step']:.1f} ms device time/step, attributed "
            f"{_f(prof.get('attributed_to_hlo_share'), '.0%')}; "
            + ", ".join(f"{k} {v:.0%}" for k, v in prof["category_share"].items())
        )
        for row in prof.get("top_ops", [])[:15]:
            lines.append(
                f"  {row['time_ms_per_step']:6.2f} ms {row['category']:<22} {row['op'][:40]:<40} "
                f"{(row.get('op_name') or '')[-60:]}"
            )
    elif prof:
        lines.append(f"profile: {prof}")
    r = result.get("ratios", {})
    lines.append(
        "ratios: "
        + ", ".join(f"{k}={_f(v)}" for k, v in r.items() if isinstance(v, (int, float)))
        + (f" (best torch: {r.get('best_torch')})" if r.get("best_torch") else "")
    )
    return lines


def _steps(out_dir: str) -> list[dict[str, Any]]:
    """What ``gpu_suite.sh`` recorded of each step it ran (steps.jsonl): name, exit status, seconds."""
    path = os.path.join(out_dir, "steps.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _jax011_lines(out_dir: str) -> list[str]:
    """The ``jax011`` part: the tests' exit status (steps.jsonl) and the NNX parity verdicts."""
    lines = []
    steps = {s["step"]: s for s in _steps(out_dir)}
    if "jax011_tests" in steps:
        rc = steps["jax011_tests"]["exit"]
        lines.append(
            f"## jax011: tests/test_sharding.py tests/test_nnx.py: {'passed' if rc == 0 else f'exit {rc}'}"
        )
    for name in ("resnet18", "labml"):
        d = _load(out_dir, f"jax011_parity_{name}.json")
        if d is not None:
            lines.append(
                f"## jax011: parity --api nnx --dtype float64 {name}: {'PASS' if d.get('ok') else 'FAIL'}, "
                f"worst row {d.get('worst')}"
            )
    return lines


def summary(out_dir: str) -> str:
    lines: list[str] = []
    env = _load(out_dir, "env.json")
    if env:
        lines.append(
            f"# GPU suite: {env.get('nvidia_smi')} | jax {env.get('jax')} "
            f"torch {env.get('torch')} | {env.get('date')}"
        )
    lines += _jax011_lines(out_dir)
    head = _load(out_dir, "headline.json")
    if head:
        lines += _step_table("ResNet-50 bf16 batch 256 (one process, interleaved)", head)
    loop, bare = _load(out_dir, "loop.json"), _load(out_dir, "loop_bare.json")
    if loop:
        # The loop dispatches steps back to back: compare with the bare step timed the same way.
        b = bare.get("jax", {}) if bare else {}
        bare_rate = b.get("pipelined_images_per_s") or b.get("images_per_s")
        ratio = loop["images_per_s_median"] / bare_rate if bare_rate and loop["images_per_s_median"] else None
        lines.append(
            f"## loop: python -m train synthetic: {_f(loop['images_per_s_median'], '.0f')} img/s "
            "vs bare step "
            f"{_f(bare_rate, '.0f')} -> {_f(ratio)} (target >= 0.97); compile {_f(loop['compile_time_s'])} s"
        )
    num = _load(out_dir, "numerics.json")
    if num:
        lines.append("## bf16 numerics (rel. error vs PyTorch float64)")
        for mode in ("eval", "train"):
            m = num.get(mode, {})
            lines.append(
                f"  {mode}: jax bf16 {_f(m.get('jax_bf16_vs_torch_float64'))}, torch bf16 autocast "
                f"{_f(m.get('torch_bf16_autocast_vs_float64'))}, "
                f"jax f32 {_f(m.get('jax_float32_vs_torch_float64'))}, "
                f"torch f32 {_f(m.get('torch_float32_vs_float64'))}"
            )
    for dt in ("float16", "float32"):
        d = _load(out_dir, f"digits_{dt}.json")
        if d:
            ev = d.get("final_eval") or {}
            lines.append(
                f"## digits {dt} 100 steps: loss {_f(d['first_loss'])} -> {_f(d['last_loss'])}, finite "
                f"{d['all_losses_finite']}, skipped {d['skipped_steps_total']}, "
                f"eval acc {_f(ev.get('accuracy'))}"
            )
    cache = _load(out_dir, "cache.json")
    if cache and "cold" in cache:
        lines.append(
            f"## compile cache: cold {cache['cold']['compile_time_s']:.1f} s, "
            f"warm {cache['warm']['compile_time_s']:.1f} s "
            f"(process to first step: {cache['cold']['process_time_to_first_step_s']:.1f} -> "
            f"{cache['warm']['process_time_to_first_step_s']:.1f} s)"
        )
    for name in sorted(
        f for f in os.listdir(out_dir) if f.startswith(("sweep_", "tries_")) and f.endswith(".json")
    ):
        res = _load(out_dir, name)
        if res:
            cfg = res.get("config", {})
            lines += _step_table(
                f"{name[:-5]}: {cfg.get('arch')} batch {cfg.get('batch')} XLA_FLAGS="
                f"{res.get('environment', {}).get('xla_flags', '')!r}",
                res,
            )
    nnx = _load(out_dir, "nnx.json")
    if nnx:
        lines += _step_table("nnx: Linen (jax) vs NNX split + jax.jit (nnx) and nnx.jit (nnx_jit)", nnx)
        r = nnx.get("ratios", {})
        lines.append(
            f"NNX / Linen: split + jax.jit {_f(r.get('nnx_over_linen_images_per_s'))}, "
            f"nnx.jit {_f(r.get('nnx_jit_over_linen_images_per_s'))} (target >= 0.98)"
        )
    inp = _load(out_dir, "input.json")
    if inp:
        runs = ", ".join(f"{r['processes']} proc {r['images_per_s']:.0f} img/s" for r in inp["runs"])
        lines.append(
            f"## input (Pillow): {runs}; feeds {inp['accelerators_fed_at_model_rate']:.2f} GPUs at "
            f"{inp['config']['model_rate']:.0f} img/s; {inp['cores_per_accelerator']:.1f} cores per GPU"
        )
    grain = _load(out_dir, "grain.json")
    if grain:
        lines.append("## image folders through Grain (simplejpeg) vs the same work alone (work_only)")
        for cores, row in grain.get("scaling", {}).items():
            g, w = row.get("grain_images_per_s"), row.get("work_only_images_per_s")
            lines.append(
                f"{cores}: Grain {_f(g, '.0f')} img/s (x{_f(row.get('grain_scaling'))}), "
                f"work_only {_f(w, '.0f')} (x{_f(row.get('work_only_scaling'))}), "
                f"Grain / work_only {_f(row.get('grain_over_work_only'))}"
                + (
                    f"; no workers (read threads) x{_f(row['grain_in_process_over_grain'])} the default"
                    if "grain_in_process_over_grain" in row
                    else ""
                )
            )
    bad = [s for s in _steps(out_dir) if s["exit"] != 0]
    if bad:
        lines.append("FAILED steps: " + ", ".join(f"{s['step']} (exit {s['exit']})" for s in bad))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--loop"]:
        print(json.dumps(loop_report(argv[1]), indent=2))
    else:
        print(summary(argv[0]))


if __name__ == "__main__":
    main()
