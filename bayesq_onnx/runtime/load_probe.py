"""Load one ONNX model as people do and report what it cost: run as a script in a fresh process
(``python load_probe.py MODEL FEED.npz SETTINGS_JSON``), so that it imports nothing but numpy and
onnxruntime and no other model's memory mixes in. Prints one JSON line.

``ort.InferenceSession(MODEL)`` with the given session config entries and providers (none: a plain
session), then one run on the arrays of ``FEED.npz``. Memory is the process's own account in
``/proc/self/status``: ``VmHWM`` (peak resident set) and ``VmRSS`` (resident set now), in MB, after the
imports (``baseline``), after the session start and after the run; where there is no ``/proc``, the peak
comes from ``getrusage`` and the resident figures are ``null``.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _memory() -> dict:
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {"peak_mb": int(fields["VmHWM"].split()[0]) / 1024, "resident_mb": int(fields["VmRSS"].split()[0]) / 1024}
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        return {"peak_mb": peak / (1024 * 1024 if sys.platform == "darwin" else 1024), "resident_mb": None}


def main(model: str, feed_path: str, settings: str) -> dict:
    import numpy as np
    import onnxruntime as ort

    settings = json.loads(settings)
    baseline = _memory()
    options = ort.SessionOptions()
    for key, value in settings.get("config", {}).items():
        options.add_session_config_entry(key, value)
    start = time.perf_counter()
    session = ort.InferenceSession(model, options, providers=settings.get("providers") or None)
    start_s = time.perf_counter() - start
    after_start = _memory()
    with np.load(feed_path) as data:
        feed = {i.name: data[i.name] for i in session.get_inputs()}
    start = time.perf_counter()
    session.run(None, feed)
    first_run_s = time.perf_counter() - start
    return {"baseline": baseline, "after_start": after_start, "after_run": _memory(), "session_start_s": start_s,
            "first_run_s": first_run_s}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
