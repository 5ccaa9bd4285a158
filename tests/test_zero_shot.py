"""Zero-shot classification in evaluation (vltrain.zero_shot, vltrain.evaluate): the prompt-ensemble math
on hand-made tensors where the right answer is known (and a wrong implementation, without normalisation
or with argmin, gives another), classes.json checked field by field, labels read from the held-out
shards' .cls members, the evaluate() path on a tiny model and tiny labelled shards (checked against an
independent computation), the same scores on 2 gloo ranks as on one, and `vltrain eval --classes`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import spawn_ranks
from vltrain.common.errors import UserError

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]
NAMES = ["red", "green", "blue", "yellow"]
TEMPLATES = ["a photo of a {} square.", "a {} block.", "something {}."]
HOLDOUT = 13  # 2 of them without a .cls: not counted
UNLABELLED = {3, 8}


# --- the math ------------------------------------------------------------------------------------------


def test_class_embeddings_normalise_each_prompt_average_then_normalise_again():
    """Class 0's prompts [10, 0] and [0, 1]: normalised first they weigh alike, [0.707, 0.707]; averaged
    raw, the long one would win ([0.995, 0.0995])."""
    from vltrain.zero_shot import class_embeddings

    prompts = torch.tensor([[10.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, 2.0]])  # class-major: 2 classes x 2
    got = class_embeddings(prompts, 2)
    r = 2**-0.5
    assert torch.allclose(got, torch.tensor([[r, r], [0.0, 1.0]]), atol=1e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(2))


def test_topk_hits_count_the_closest_class_not_the_farthest_and_ties_do_not_help():
    from vltrain.zero_shot import topk_hits

    classes = torch.eye(3)
    images = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.5, 0.5, 0.0], [0.0, 0.1, 5.0]])
    labels = torch.tensor([0, 2, 1, 1])  # right, right, tied with class 0, wrong (class 1 second)
    assert topk_hits(images, labels, classes, ks=(1, 2, 3)).tolist() == [2, 4, 4]
    # argmin (the scores negated) would call images 0 and 1 classes 2 and 0: none would hit
    assert topk_hits(-images, labels, classes, ks=(1,)).tolist() == [0]


def test_top5_counts_a_class_ranked_fifth_and_not_one_ranked_sixth():
    from vltrain.zero_shot import topk_hits

    classes = torch.eye(7)
    image = torch.tensor([[7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    got = [topk_hits(image, torch.tensor([c]), classes).tolist() for c in range(7)]
    assert got == [[1, 1], [0, 1], [0, 1], [0, 1], [0, 1], [0, 0], [0, 0]]


def test_scores_count_only_labelled_samples_and_sum_over_ranks():
    from vltrain.zero_shot import ClassPrompts, zero_shot_scores

    cp = ClassPrompts(["a", "b", "c", "d", "e", "f"], ["{}", "x {}"], "c.json")
    class_emb = torch.eye(6)
    images = torch.eye(6)[[0, 1, 2, 3]] + 0.01 * torch.arange(6.0, 0.0, -1.0)  # classes 0..5 next in order
    keys = ["k0", "k1", "k2", "k3"]
    labels = {"k0": 0, "k1": 2, "k3": 3}  # k2 has no class
    got = zero_shot_scores(cp, class_emb, images, keys, labels)
    assert got == {"top1": 2 / 3, "top5": 1.0, "classes": 6, "n": 3, "templates": 2, "chance_top1": 1 / 6}
    doubled = zero_shot_scores(cp, class_emb, images, keys, labels, all_reduce=lambda t: 2 * t)
    assert doubled["n"] == 6 and doubled["top1"] == 2 / 3


def test_a_class_index_beyond_the_names_is_a_one_line_error():
    from vltrain.zero_shot import ClassPrompts, zero_shot_scores

    cp = ClassPrompts(["a", "b"], ["{}"], "/d/classes.json")
    with pytest.raises(UserError, match=r"^k1\.cls: class 2 but /d/classes\.json names 2 classes; allowed: 0 to 1$"):
        zero_shot_scores(cp, torch.eye(2), torch.eye(2), ["k0", "k1"], {"k0": 0, "k1": 2})


def test_prompts_fill_every_template_with_every_class_class_major():
    from vltrain.zero_shot import ClassPrompts

    cp = ClassPrompts(["cat", "dog"], ["a {}.", "{} {{x}}"])
    assert cp.prompts() == ["a cat.", "cat {{x}}", "a dog.", "dog {{x}}"]


# --- classes.json --------------------------------------------------------------------------------------

BAD = [
    ("[1, 2]", "not a JSON object"),
    ("{", "not valid JSON (line 1"),
    ('{"templates": ["{}"]}', "classes: missing is not valid; allowed: a non-empty list of distinct strings"),
    ('{"classes": [], "templates": ["{}"]}', "classes: [] is not valid"),
    ('{"classes": ["a", 3], "templates": ["{}"]}', 'classes: ["a", 3] is not valid'),
    ('{"classes": ["a", "b", "a"], "templates": ["{}"]}', "classes: 'a' appears twice"),
    ('{"classes": ["a"]}', "templates: missing is not valid; allowed: a non-empty list of strings, each containing {}"),
    ('{"classes": ["a"], "templates": "{}"}', 'templates: "{}" is not valid'),
    ('{"classes": ["a"], "templates": ["a {}", "no slot"]}', "templates: 'no slot' has no {}"),
]


@pytest.mark.parametrize(
    ("text", "problem"), BAD, ids=[p.split(" is")[0].split(":")[0] + str(i) for i, (_, p) in enumerate(BAD)]
)
def test_a_bad_classes_json_is_a_one_line_error_naming_the_file_and_field(tmp_path, text, problem):
    from vltrain.zero_shot import load_classes

    path = tmp_path / "classes.json"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_classes(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and problem in msg and "allowed: " in msg and "\n" not in msg


def test_a_good_classes_json_loads():
    from vltrain.zero_shot import parse_classes

    cp = parse_classes({"classes": NAMES, "templates": TEMPLATES, "note": "extra keys are ignored"}, "x")
    assert (cp.classes, cp.templates, len(cp.prompts())) == (NAMES, TEMPLATES, 12)


def _cfg(shards: str, classes: str = ""):
    from vltrain.config import load_train_config

    return load_train_config(
        None, {"data.shards": shards, "data.classes": classes} if classes else {"data.shards": shards}
    )


def test_classes_are_found_from_the_config_then_beside_the_held_out_shards_then_beside_the_training_shards(tmp_path):
    from vltrain.zero_shot import find_classes

    train, held = tmp_path / "train", tmp_path / "train" / "eval"
    held.mkdir(parents=True)
    assert find_classes(_cfg(str(train)), str(held)) is None
    for where, names in ((train, ["t"]), (held, ["h"]), (tmp_path, ["c"])):
        (where / "classes.json").write_text(json.dumps({"classes": names, "templates": ["{}"]}))
    (tmp_path / "bare").mkdir()
    assert find_classes(_cfg(f"{train}/{{00000..00003}}.tar"), str(tmp_path / "bare")).classes == ["t"]
    assert find_classes(_cfg(str(train)), str(held)).classes == ["h"]
    assert find_classes(_cfg(str(train), str(tmp_path / "classes.json")), str(held)).classes == ["c"]
    assert find_classes(_cfg(str(train)), str(held), override=tmp_path / "classes.json").classes == ["c"]
    with pytest.raises(
        UserError, match=r"^data\.classes: .*/nope\.json does not exist; allowed: a classes\.json file$"
    ):
        find_classes(_cfg(str(train), str(tmp_path / "nope.json")), str(held))
    with pytest.raises(UserError, match=r"^--classes: .*/nope\.json does not exist"):
        find_classes(_cfg(str(train)), str(held), override=tmp_path / "nope.json")


# --- labelled shards -----------------------------------------------------------------------------------


def _jpg(colour, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.integers(-25, 25, (32, 32, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_labelled(out: Path, n: int, first: int, per_shard: int = 5, unlabelled=frozenset()) -> None:
    """n samples of noisy coloured squares in shards of `per_shard`; sample i has class i % 4 and a .cls
    unless i is in `unlabelled`."""
    from vltrain.data.shards import ShardWriter

    out.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, n, per_shard)):
        with ShardWriter(out / f"{s:05d}.tar") as w:
            for i in range(start, min(n, start + per_shard)):
                c = i % len(NAMES)
                sample = {
                    "__key__": f"{first + i:09d}",
                    "jpg": _jpg(COLOURS[c], first + i),
                    "txt": TEMPLATES[i % len(TEMPLATES)].replace("{}", NAMES[c]).encode(),
                    "json": json.dumps({"label": c, "class": NAMES[c]}).encode(),
                }
                if i not in unlabelled:
                    sample["cls"] = str(c).encode()
                w.write(sample)
    (out / "classes.json").write_text(json.dumps({"classes": NAMES, "templates": TEMPLATES}))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """d/shards (40 training pairs), d/shards/eval (13 held out, 2 without a class), both classes.json,
    and a small tokenizer d/tok.model trained on the captions."""
    from vltrain.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("zero-shot")
    write_labelled(d / "shards", 40, 0, per_shard=20)
    write_labelled(d / "shards" / "eval", HOLDOUT, 1000, unlabelled=UNLABELLED)
    texts = [t.replace("{}", n) for t in TEMPLATES for n in NAMES] * 4
    train_tokenizer(texts, VOCAB, d / "tok.model")
    return d


def test_labels_come_from_the_cls_members_and_samples_without_one_are_left_out(data):
    from vltrain.zero_shot import read_labels

    labels = read_labels(str(data / "shards" / "eval"))
    assert labels == {f"{1000 + i:09d}": i % 4 for i in range(HOLDOUT) if i not in UNLABELLED}


def test_a_cls_that_is_not_a_number_is_a_one_line_error_naming_the_shard_and_key(tmp_path):
    from vltrain.data.shards import ShardWriter
    from vltrain.zero_shot import read_labels

    with ShardWriter(tmp_path / "00000.tar") as w:
        w.write({"__key__": "a1", "jpg": _jpg(COLOURS[0], 0), "txt": b"x", "cls": b"dog"})
    with pytest.raises(UserError, match=r"00000\.tar: a1\.cls: 'dog' is not a class index; allowed: a decimal integer"):
        read_labels(str(tmp_path))


# --- evaluate() ----------------------------------------------------------------------------------------

BATCH = 5
VOCAB = 60  # the model's vocabulary is the small tokenizer's: captions decode


def _setup(data: Path, top: dict | None = None, **data_cfg):
    from vltrain.config import load_train_config
    from vltrain.tokenizer import Tokenizer

    overrides = {"model": "tiny", "model.vocab_size": VOCAB, "precision": "fp32", "data.shards": str(data / "shards")}
    overrides |= {f"data.{k}": v for k, v in data_cfg.items()} | (top or {})
    return load_train_config(None, overrides), Tokenizer.load(str(data / "tok.model")), str(data / "shards" / "eval")


def _evaluate(cfg, tok, shards, share=None, **kw):
    from vltrain.engines.common import build_model
    from vltrain.evaluate import ONE_PROCESS, evaluate

    return evaluate(
        build_model(cfg), cfg, tok, shards, batch_size=BATCH, max_caption_samples=3, share=share or ONE_PROCESS, **kw
    )


def reference_zero_shot(cfg, tok, shards) -> tuple[float, float]:
    """top-1 and top-5 written out the long way: each image against each class, by loops over templates."""
    from vltrain.data.loader import ShardLoader
    from vltrain.engines.common import build_model
    from vltrain.zero_shot import read_labels

    model = build_model(cfg).eval()
    labels = read_labels(shards)
    loader = ShardLoader(shards, rank=0, world_size=1, batch_size=64, seed=cfg.seed, image_size=32, tokenizer=tok,
                         max_len=48, train=False, data_cfg=cfg.data, workers=0)  # fmt: skip
    top1 = top5 = n = 0
    with torch.no_grad():
        centroids = []
        for name in NAMES:
            ids, mask = tok.encode_batch([t.replace("{}", name) for t in TEMPLATES], 48)
            e = model.encode_text(ids, mask)
            mean = (e / e.norm(dim=1, keepdim=True)).mean(dim=0)
            centroids.append(mean / mean.norm())
        for batch in loader:
            for img, key in zip(model.encode_image(batch["images"]), batch["keys"]):
                if key not in labels:
                    continue
                scores = [float(img @ c) for c in centroids]
                better = sum(s > scores[labels[key]] for s in scores)
                top1, top5, n = top1 + (better < 1), top5 + (better < 5), n + 1
    assert n == HOLDOUT - len(UNLABELLED)
    return top1 / n, top5 / n


@pytest.fixture(scope="module")
def one_process(data) -> dict:
    cfg, tok, shards = _setup(data)
    return _evaluate(cfg, tok, shards)


def test_evaluate_reports_zero_shot_as_an_independent_computation_gives_it(data, one_process):
    cfg, tok, shards = _setup(data)
    zs = one_process["zero_shot"]
    top1, top5 = reference_zero_shot(cfg, tok, shards)
    assert zs["top1"] == pytest.approx(top1) and zs["top5"] == pytest.approx(top5)
    assert {k: zs[k] for k in ("classes", "n", "templates", "chance_top1")} == {
        "classes": 4, "n": HOLDOUT - len(UNLABELLED), "templates": 3, "chance_top1": 0.25,
    }  # fmt: skip
    assert one_process["n"] == HOLDOUT  # retrieval still counts every pair


def test_the_eval_line_names_zero_shot_top1_top5_and_chance(one_process):
    from vltrain.evaluate import eval_line

    zs = one_process["zero_shot"]
    line = eval_line(7, one_process)
    assert line.startswith("eval step 7: i2t R@1 ")
    assert line.endswith(f" | zero-shot top-1 {zs['top1']:.3f} top-5 {zs['top5']:.3f} (4 classes, chance 0.250)")
    assert "zero-shot" not in eval_line(7, {k: v for k, v in one_process.items() if k != "zero_shot"})


def test_no_classes_json_means_no_zero_shot_and_classes_override_it(data, tmp_path):
    plain = tmp_path / "plain"
    write_labelled(plain, 6, 2000)
    (plain / "classes.json").unlink()
    cfg, tok, _ = _setup(data, shards=str(plain))  # nothing beside the training shards either
    assert "zero_shot" not in _evaluate(cfg, tok, str(plain))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"classes": NAMES, "templates": ["{}"]}))
    got = _evaluate(cfg, tok, str(plain), classes=other)["zero_shot"]
    assert (got["n"], got["templates"]) == (6, 1)
    cfg2, _, _ = _setup(data, shards=str(plain), classes=str(other))
    assert _evaluate(cfg2, tok, str(plain))["zero_shot"] == got


def test_shards_without_any_cls_give_no_zero_shot(data, tmp_path):
    cfg, tok, _ = _setup(data)
    bare = tmp_path / "bare"
    write_labelled(bare, 6, 3000, unlabelled=frozenset(range(6)))  # classes.json, but no sample has a class
    assert "zero_shot" not in _evaluate(cfg, tok, str(bare))


def test_a_bad_classes_json_fails_before_the_held_out_pass(data, tmp_path, monkeypatch):
    import vltrain.evaluate as ev

    cfg, tok, shards = _setup(data)
    bad = tmp_path / "bad.json"
    bad.write_text('{"classes": ["a"], "templates": ["no slot"]}')
    monkeypatch.setattr(ev, "held_out_pass", lambda *a, **k: pytest.fail("the pass ran"))
    with pytest.raises(UserError, match=r"bad\.json: templates: 'no slot' has no \{\}"):
        _evaluate(cfg, tok, shards, classes=bad)


# --- 2 ranks -------------------------------------------------------------------------------------------


def _rank(rank: int, world: int, data: Path, mode: str) -> dict:
    """One rank: a plain model over its slice ("plain", "lockstep"), or the FSDP engine's sharded model
    ("fsdp": every forward collective, so the ranks must make the same encode_text calls)."""
    import torch.distributed as dist

    from vltrain.evaluate import EvalShare

    dist.init_process_group("gloo", rank=rank, world_size=world)
    if mode != "fsdp":
        cfg, tok, shards = _setup(data)
        return _evaluate(cfg, tok, shards, EvalShare(rank, world, None, lockstep=mode == "lockstep"))["zero_shot"]
    from vltrain.engines.common import RankLayout
    from vltrain.engines.fsdp import FSDPEngine
    from vltrain.evaluate import evaluate

    cfg, tok, shards = _setup(data, {"parallel.strategy": "fsdp"})
    model, share = FSDPEngine(cfg, 1, 1, RankLayout.of(rank, world), torch.device("cpu")).eval_model(None)
    assert share.lockstep
    return evaluate(model, cfg, tok, shards, batch_size=BATCH, max_caption_samples=3, share=share)["zero_shot"]


def two_ranks(data: Path, mode: str) -> list[dict]:
    """_rank on 2 spawned processes (conftest.spawn_ranks)."""
    return spawn_ranks(_rank, 2, data, mode)


@pytest.mark.parametrize("mode", ["plain", pytest.param("lockstep", marks=pytest.mark.slow)])
def test_two_ranks_give_the_one_process_zero_shot(data, one_process, mode):
    """13 held-out pairs in batches of 5: 7 on rank 0 and 6 on rank 1 (uneven), the labelled ones split
    unevenly too; hits and counts summed over the ranks give the one process's scores on each."""
    first, second = two_ranks(data, mode)
    assert first == second == one_process["zero_shot"]


@pytest.mark.slow
def test_fsdp_ranks_make_the_same_prompt_calls_and_get_the_one_process_zero_shot(data, one_process):
    """The engine's FSDP model (fp32, build_model's seeded init), sharded over 2 ranks: every encode_text
    is collective, so a rank that made other calls would hang or fail; the scores are one process's."""
    first, second = two_ranks(data, "fsdp")
    assert first == second == one_process["zero_shot"]


# --- the trainer's evaluation and `vltrain eval --classes` ----------------------------------------------


@pytest.mark.slow
def test_training_writes_zero_shot_and_vltrain_eval_takes_another_classes_file(data, tmp_path):
    """2 steps on the labelled shards: the final evaluation prints the zero-shot line and writes it in
    eval.json; `vltrain eval --classes FILE` evaluates again with that file's templates."""
    import dataclasses

    import tomli_w

    from tests.conftest import run_cli
    from vltrain.presets import get_preset

    cfg = {
        "model": {**dataclasses.asdict(get_preset("tiny")), "vocab_size": VOCAB},
        "global_batch": 8,
        "steps": 2,
        "precision": "fp32",
        "log_every": 1,
        "checkpoint_every": 2,
        "data": {"shards": str(data / "shards"), "tokenizer": str(data / "tok.model"), "shuffle_buffer": 8},
    }
    (tmp_path / "train.toml").write_text(tomli_w.dumps(cfg))
    run = tmp_path / "run"
    env = {"OMP_NUM_THREADS": "1"}
    r = run_cli("train", "--config", str(tmp_path / "train.toml"), "--run-dir", str(run), prog="vltrain", env=env)
    assert r.returncode == 0, r.stderr
    zs = json.loads((run / "eval.json").read_text())["zero_shot"]
    assert (zs["classes"], zs["n"], zs["templates"]) == (4, HOLDOUT - len(UNLABELLED), 3)
    assert f"zero-shot top-1 {zs['top1']:.3f} top-5 1.000 (4 classes, chance 0.250)" in r.stdout + r.stderr
    one = tmp_path / "one-template.json"
    one.write_text(json.dumps({"classes": NAMES, "templates": ["a {} block."]}))
    r = run_cli("eval", "--run-dir", str(run), "--classes", str(one), prog="vltrain", env=env)
    assert r.returncode == 0, r.stderr
    again = json.loads((run / "eval.json").read_text())["zero_shot"]
    assert again["templates"] == 1 and again["n"] == zs["n"]
    assert (
        f"zero-shot top-1 {again['top1']:.3f} top-5 1.000 (4 classes, chance 0.250) on 11 labelled images" in r.stdout
    )
    r = run_cli("eval", "--run-dir", str(run), "--classes", str(tmp_path / "nope.json"), prog="vltrain", env=env)
    assert r.returncode == 2 and r.stderr.strip().endswith("does not exist; allowed: a classes.json file")
    assert len(r.stderr.strip().splitlines()) == 1
