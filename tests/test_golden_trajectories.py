"""Golden trajectories (torchtitan's habit: a seeded tiny run's loss curve pinned in the repository).

Each case is a real `vltrain train` run (one process, or torchrun with 2) of the tiny preset on the
trainer tests' synthetic shards. Its logged values (every loss term, LR and gradient norm of every step,
as float.hex), a digest of its final checkpoint's weights and its held-out evaluation were recorded on
main before the trainer was restructured (issue 22: engines behind one interface, one pipeline forward)
and are compared bit for bit: a refactor that moves code must not move a single bit of training.

A recording is one kind of machine's (CPU, OMP_NUM_THREADS=1, torch 2.13.0+cpu): another CPU's GEMM
kernels (torch's CPU capability, AVX2 against AVX-512) round some fp32 sums differently in the last bit,
and the first step's loss terms move by an ulp. So each kind of machine CI runs on keeps its own
recording (golden/trajectories.json: the machine of issues 22-29, its capability not recorded;
golden/trajectories-<capability>.json: one made with --write), and a run passes when it equals one of
them bit for bit, every step, the weights and the evaluation: a change that moves a bit of training
matches none of them. Re-record only for a deliberate change of the numbers, on each kind of machine
you can (delete the recordings you cannot, and say so), and say why in the commit:
    .venv/bin/python -m tests.test_golden_trajectories --write
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "trajectories.json"  # the first machine's; others: recordings()
KEYS = ("loss", "itc", "mlm", "caption", "mim", "lr", "grad_norm", "samples")
STEPS = 4

# name -> (ranks, config fields over tests.test_trainer_run.write_config's bf16, accumulation-2 defaults)
CASES: dict[str, tuple[int, dict]] = {
    "deepspeed-1rank-bf16": (1, {}),
    "deepspeed-1rank-fp32-mim": (1, {"precision": "fp32", "loss": {"mim": 0.5}}),
    "deepspeed-2rank-fp32": (2, {"precision": "fp32"}),
    "fsdp-2rank-dp2-fp32": (2, {"precision": "fp32", "parallel": {"strategy": "fsdp"}}),
    "fsdp-2rank-tp2-fp32": (2, {"precision": "fp32", "parallel": {"strategy": "fsdp", "tp": 2}}),
    "fsdp-2rank-pp2-fp32": (2, {"precision": "fp32", "global_batch": 8, "parallel": {"strategy": "fsdp", "pp": 2}}),
}


def weights_digest(state: dict) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _hex(v):
    return float(v).hex() if isinstance(v, float) else v


def record(run: Path) -> dict:
    """What a case pins: the logged values of each step (hex floats), the final weights' digest, eval.json's figures."""
    from tests.test_trainer_run import final_weights, jsonl

    steps = {str(m["step"]): {k: _hex(m[k]) for k in KEYS} for m in jsonl(run / "metrics.jsonl")}
    ev = json.loads((run / "eval.json").read_text())
    figures = {"i2t": ev["i2t"], "t2i": ev["t2i"], "cider": ev["cider"], "n": ev["n"]}
    return {"steps": steps, "weights": weights_digest(final_weights(run)), "eval": json.loads(json.dumps(figures))}


def capability() -> str:
    """This machine's kind for a recording: the CPU capability torch dispatches its kernels on."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def recordings() -> list[Path]:
    """Every machine's recording, this machine's own (trajectories-<capability>.json) first."""
    own = GOLDEN.with_name(f"trajectories-{capability()}.json")
    return sorted(GOLDEN.parent.glob("trajectories*.json"), key=lambda p: (p != own, p.name))


def run_case(name: str, data: Path, where: Path) -> dict:
    from tests.test_trainer_run import torchrun, vltrain, write_config

    ranks, fields = CASES[name]
    cfg = write_config(where / f"{name}.toml", data, **({"steps": STEPS, "checkpoint_every": STEPS} | fields))
    run = where / name
    args = ("train", "--config", str(cfg), "--run-dir", str(run))
    r = torchrun(ranks, *args) if ranks > 1 else vltrain(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return record(run)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from tests.conftest import trainer_shards

    return trainer_shards(tmp_path_factory.mktemp("golden-data"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_training_is_bit_identical_to_the_recorded_trajectory(name, data, tmp_path):
    recorded = {p.name: json.loads(p.read_text())["cases"][name] for p in recordings()}
    got = run_case(name, data, tmp_path)
    if any(got == want for want in recorded.values()):  # steps, weights and eval of one machine's recording
        return
    where, golden = next(iter(recorded.items()))  # this machine's own recording where it has one
    others = f"and every other recording ({', '.join(recorded)})"
    assert got["steps"] == golden["steps"], f"{name}: logged values differ from {where} {others}"
    assert got["weights"] == golden["weights"], f"{name}: final weights differ from {where} {others}"
    assert got["eval"] == golden["eval"], f"{name}: evaluation differs from {where} {others}"


def _write() -> None:
    import subprocess
    import tempfile

    from tests.conftest import trainer_shards

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        data = trainer_shards(d / "data")
        cases = {}
        for name in CASES:
            cases[name] = run_case(name, data, d)
            print(name, cases[name]["steps"][str(STEPS)]["loss"], flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = GOLDEN.with_name(f"trajectories-{capability()}.json")  # this kind of machine's own
    blob = {"recorded_at": commit, "cpu_capability": capability(), "cases": cases}
    out.write_text(json.dumps(blob, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_golden_trajectories --write")
    _write()
