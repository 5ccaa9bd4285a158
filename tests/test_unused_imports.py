"""The imports a trainer's start-up no longer pays for (vltrain.engines.unused_imports; issue 29 point 3).

DeepSpeed's ZeRO imports its Muon optimizer whatever the optimizer, and that module's torch.compile()
decorator imports torch._dynamo; torch's add_param_group imports it too. These tests fail when a torch or
DeepSpeed upgrade brings the imports back, or when deferring them changes what runs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, deadline
from vltrain.distenv import free_port

# One rank's engine as the trainer builds it (gloo, world 1), then one optimizer step.
BUILD_AND_STEP = """
import json, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, torch.distributed as dist
dist.init_process_group("gloo")
from vltrain.config import load_train_config
from vltrain.engines.deepspeed import build_engine
from vltrain.presets import resolve_model
cfg = load_train_config("configs/tiny.toml", {})
engine, _ = build_engine(cfg, 4, 1, 1)
built = {m: m in sys.modules for m in ("torch._dynamo", "torch._inductor")}
size = resolve_model(cfg.model).image_size
out = engine(torch.randn(4, 3, size, size), torch.randint(5, 100, (4, 12)), torch.ones(4, 12, dtype=torch.long))
engine.backward(out["loss"])
engine.step()
print(json.dumps({"built": built, "loss": out["loss"].item()}))
"""


@pytest.mark.slow
def test_the_deepspeed_engine_is_built_without_torch_compile_imports():
    """Built: neither torch._dynamo nor torch._inductor loaded (~1 s of a rank's start-up); the step
    that follows still runs (torch's optimizer step imports torch._dynamo itself, as any loop's does)."""
    r = subprocess.run(
        [sys.executable, "-c", BUILD_AND_STEP, str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=deadline(300),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["built"] == {"torch._dynamo": False, "torch._inductor": False}
    assert out["loss"] > 0


def test_a_deferred_compile_compiles_at_the_first_call_with_its_arguments():
    from vltrain.engines.unused_imports import _deferred_compile

    calls = []

    def real(fn, **kwargs):
        calls.append(kwargs)
        return lambda *a: ("compiled", fn(*a))

    @_deferred_compile(real)(mode="max-autotune")
    def double(x):
        return 2 * x

    assert calls == []  # decorating compiles nothing (and imports nothing)
    assert double(3) == ("compiled", 6)
    assert double(4) == ("compiled", 8)
    assert calls == [{"mode": "max-autotune"}]  # once, with the decorator's arguments
    assert double.__name__ == "double"
    assert _deferred_compile(real)(lambda x: x + 1)(1) == ("compiled", 2)  # the plain torch.compile(fn) form


def test_the_optimizer_method_is_torchs_own_again_after_building():
    """The shortcut holds only while the trainer builds its optimizer: afterwards add_param_group goes
    through torch._dynamo.disable as torch wrote it."""
    import torch

    from vltrain.engines.unused_imports import optimizer_without_dynamo

    fn = torch.optim.Optimizer.add_param_group.__wrapped__  # type: ignore[attr-defined]
    before = getattr(fn, "__dynamo_disable", None)
    with optimizer_without_dynamo():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.2})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    assert getattr(fn, "__dynamo_disable", None) is before
