"""`plan`'s block for a CPU profile: the step time and peak memory predicted from its [calibration]
(clusterctl.planning.cpu_predict), term by term, or the command that calibrates it."""

from __future__ import annotations

from clusterctl.render.fold import tell
from clusterctl.render.safe import printable
from clusterctl.render.text import say, table_text


def print_cpu_prediction(d: dict) -> None:
    """Nothing for a GPU profile (no "cpu_prediction" key); the calibrate command when it is None."""
    if "cpu_prediction" not in d:
        return
    c = d["cpu_prediction"]
    if c is None:
        tell(
            f"predicted on this CPU cluster: nothing yet; run clusterctl profiles calibrate {printable(d['profile'])} "
            "(measures its matmul, memory and gloo rates) to have plan predict the step time and memory"
        )
        return
    steps, mem = c["step_terms_s"], c["memory_terms_mib"]
    tell(
        f"predicted on this calibrated CPU cluster: {c['step_time_s']:.3f} s per optimizer step, "
        f"{c['peak_rss_gib']:.2f} GiB peak resident set per rank (at the {c.get('peak_phase', 'backward')})"
    )
    step_rows = [*steps, "total"], [f"{v:.3f}" for v in steps.values()] + [f"{c['step_time_s']:.3f}"]
    mem_rows = [*mem, "total"], [f"{v:.0f}" for v in mem.values()] + [f"{c['peak_rss_gib'] * 1024:.0f}"]
    say(table_text("step time per rank", [["term"], ["s"]], list(step_rows), [False, True]))
    say(table_text("peak resident set per rank", [["term"], ["MiB"]], list(mem_rows), [False, True]))
    for line in c["not_predicted"]:
        tell(f"not predicted on CPU: {printable(line)}")
