"""What the benchmark commands share: the host they ran on, and their JSON output.

Standard library only, so the input benchmark's TensorFlow workers import no JAX through it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def pin_to_cores(count: int) -> None:
    """Confine this process, and the processes and threads it starts from now on, to the first
    ``count`` of its CPUs: call it before any library sizes its thread pools from them."""
    if count and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(available_cpus()[:count]))


def host_environment() -> dict[str, Any]:
    """Date, Python, CPU, usable cores and load average: the host part of every report."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_cores": len(available_cpus()),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def emit_json(result: dict[str, Any], output: str | None) -> None:
    """Print ``result`` as indented JSON on stdout, and also write it to ``output`` if given."""
    text = json.dumps(result, indent=2)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)
