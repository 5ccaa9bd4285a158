"""Every recipe lists what its paper states that it does not reproduce, with the reason (issue 25, point 2).

A recipe's `paper:` comments say where a setting comes from. Each must be resolved (the figures and the
words it quotes agree with what the line and the recipe set) or covered by an entry of the recipe's
[[paper.not_reproduced]]; the seed texts' statements vltrain has no setting for (audio, a pre-trained
encoder, a stated peak memory...) must be listed too. `plan`, `submit --dry-run` (human and JSON) and
`recipes show` print the entries.

How a comment is checked (`unresolved`): its paper part is the text after "paper:" up to the first ";"
(what follows is the recipe's own reasoning). Known phrases (TERMS) are checked against the resolved config
(e.g. "bfloat16" needs precision bf16, "ZeRO-2" needs DeepSpeed stage 2, "pre-trained" is never true: vltrain
loads no weights); a phrase that does not hold must appear in a not_reproduced `what`. Every remaining number
must be the line's value (a list's element, a preset's figure or parameter count for `model`), the result of
an expression the comment writes out ("850e6 / 2048, rounded up"), a duration in its unit ("6 weeks" is
1008 h), or appear in a not_reproduced `what`. A comment with no phrase and no figure is unresolved.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from clusterctl.planning.recipes import PaperFacts, builtin_dir, paper_facts, parse_paper
from tests.conftest import REPO, one_line_error, run_cli
from vltrain.common.errors import UserError
from vltrain.config import TrainConfig, load_train_config, stage_loss
from vltrain.model_math import param_breakdown, param_count
from vltrain.presets import resolve_model

SEEDS = ["000", "001", "002", "003", "004"]
SEEDS_DIR = REPO.parent / "shared" / "seeds"


@dataclass(frozen=True)
class Comment:
    line: int
    key: str | None  # the key the line sets (None: a comment on its own)
    value: object
    paper: str  # the paper part: after "paper:", up to the first ";"


def paper_comments(path: Path) -> list[Comment]:
    """The `paper:` comments of a recipe, a key's continuation lines (indented comments) joined to it."""
    entries: list[list] = []  # [line, key, value, comment]
    last = 0  # the last line of a comment on its own lines
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        code, sep, text = _split_comment(raw)
        if code:
            key, _, _ = code.partition("=")
            header = code.startswith("[")  # a table header: its comment is on no key
            value = None if header else tomllib.loads(code)[key.strip()]
            entries.append([n, None if header else key.strip(), value, text])
        elif sep and entries and (raw.startswith(" ") or (entries[-1][1] is None and last == n - 1)):
            entries[-1][3] += " " + text
            last = n
        elif sep:
            entries.append([n, None, None, text])
            last = n
    return [
        Comment(n, key, value, text.split("paper:", 1)[1].split(";")[0].strip())
        for n, key, value, text in entries
        if "paper:" in text
    ]


def _split_comment(raw: str) -> tuple[str, bool, str]:
    """(code, has a comment, comment text) of a TOML line; a '#' inside a string is no comment."""
    in_str = False
    for i, ch in enumerate(raw):
        if ch == '"':
            in_str = not in_str
        elif ch == "#" and not in_str:
            return raw[:i].strip(), True, raw[i + 1 :].strip()
    return raw.strip(), False, ""


# ---------------------------------------------------------------- what the trainer can and cannot set


def _weights(cfg: TrainConfig, name: str) -> list[float]:
    """A loss weight in every stage (the run's [loss] when it has none)."""
    losses = [stage_loss(cfg.loss, s.loss, i) for i, s in enumerate(cfg.stages)] or [cfg.loss]
    return [getattr(loss, name) for loss in losses]


def _on(name: str) -> Callable[[TrainConfig, re.Match], bool]:
    return lambda cfg, m: max(_weights(cfg, name)) > 0


def _off(name: str) -> Callable[[TrainConfig, re.Match], bool]:
    return lambda cfg, m: max(_weights(cfg, name)) == 0


def _model(test: Callable[..., bool]) -> Callable[[TrainConfig, re.Match], bool]:
    return lambda cfg, m: test(resolve_model(cfg.model), m)


def _never(cfg: TrainConfig, m: re.Match) -> bool:
    return False


def _always(cfg: TrainConfig, m: re.Match) -> bool:
    return True


def _no_augmentation(c: TrainConfig, m: re.Match) -> bool:
    """'no augmentation': none; 'no other augmentation': no crop or flip (the comment's line sets the other)."""
    return not (c.data.random_crop or c.data.hflip or (c.data.randaugment and not m.group(1)))


NUMBER = r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e-?\d+)?"

# (phrase, when it holds). Checked in order, each match then blanked: the longer and negated forms come first.
# _never: vltrain has no setting for it, so a recipe whose paper states it lists it as not reproduced.
TERMS: list[tuple[str, Callable[[TrainConfig, re.Match], bool]]] = [
    (r"pre-trained", lambda c, m: bool(c.init_from.path)),  # [init_from] loads one (vltrain ships none)
    (r"fine-tuning", _never),  # a recipe is a pre-training run
    (r"instruction dataset", _never),  # the trainer reads one dataset of image-text pairs per run
    (r"audio|video|\d+ ?kHz", _never),  # image-text pairs only
    (r"PyTorch 2\.0", _never),  # vltrain needs PyTorch 2.3 or later (FSDP2)
    (r"peak memory|MWh|trillion tokens|validation loss|sweeps?", _never),  # results and claims, not settings
    (r"custom", _never),  # an unpublished framework, strategy or vocabulary
    (
        r"FSDP(?: \(Fully Sharded Data Parallel\))?|Fully Sharded Data Parallel",
        lambda c, m: c.parallel.strategy == "fsdp",
    ),
    (r"ZeRO-?(\d)", lambda c, m: c.parallel.strategy == "deepspeed" and c.zero_stage == int(m.group(1))),
    (r"data[- ]parallel(?:ism)?", lambda c, m: c.parallel.tp == 1 and c.parallel.pp == 1),
    (r"tensor parallel(?:ism)?", lambda c, m: c.parallel.tp > 1),
    (r"pipeline parallel(?:ism)?", lambda c, m: c.parallel.pp > 1),
    (r"bfloat16", lambda c, m: c.precision == "bf16"),
    (r"loss scaling", lambda c, m: c.precision == "fp16"),
    (r"gradient checkpointing|activation recomputation", lambda c, m: c.activation_checkpointing),
    (r"no (other )?augmentation", _no_augmentation),
    (r"RandAugment", lambda c, m: c.data.randaugment),
    (r"random cropping", lambda c, m: c.data.random_crop),
    (r"horizontal flipping", lambda c, m: c.data.hflip),
    (
        rf"({NUMBER})x\1 (?:pixels?|resolution)|({NUMBER}) px",
        _model(lambda mc, m: mc.image_size == int(m.group(1) or m.group(2))),
    ),
    (r"no masked image model\w*", _off("mim")),
    (r"masked image model\w*|masked-autoencoder|masked reconstruction of images", _on("mim")),
    (r"no masked language model\w*", _off("mlm")),
    (r"masked language model\w*|masked reconstruction of text", _on("mlm")),
    (r"masked reconstruction", lambda c, m: _on("mim")(c, m) or _on("mlm")(c, m)),
    (r"contrastive", _on("itc")),
    (r"no generative objective", _off("caption")),
    (r"generation|generative", _on("caption")),
    (r"curriculum", lambda c, m: len(c.stages) > 1),
    (r"instruction-tuning", lambda c, m: any("instruction" in s.name for s in c.stages)),
    (r"warm-?up", lambda c, m: c.optim.warmup_steps > 0 or c.optim.warmup_fraction > 0),
    (r"decay to zero", lambda c, m: c.optim.min_lr == 0),
    (r"cosine", _always),  # the trainer's schedule: warm-up, then cosine to min_lr
    (r"rotary", _model(lambda mc, m: mc.pos_embedding == "rope")),
    (r"RMSNorm", _model(lambda mc, m: mc.norm == "rmsnorm")),
    (r"cross-attention|cross-modal fusion", _model(lambda mc, m: mc.fusion_layers >= 1)),
    (r"decoder", _model(lambda mc, m: mc.decoder_layers >= 1)),
    (r"normaliz\w*", _always),  # ImageNet mean and std (vltrain.data.transforms.normalize)
]

SCALE = {"%": 0.01, "million": 1e6, "billion": 1e9, "B": 1e9, "trillion": 1e12}
HOURS = {"week": 168.0, "weeks": 168.0, "month": 730.5, "months": 730.5, "day": 24.0, "days": 24.0}
FIGURE = re.compile(rf"({NUMBER})(\s*(?:%|million|billion|trillion|weeks?|months?|days?)\b|B\b|%)?")
EXPRESSION = re.compile(rf"{NUMBER}(?:\s*[x×*/]\s*{NUMBER})+")


def figures(text: str) -> list[tuple[float, str]]:
    """(value, unit) of every number in `text`: "1.8 billion" -> 1.8e9, "5%" -> 0.05, "10,000" -> 10000."""
    out = []
    for m in FIGURE.finditer(text):
        unit = (m.group(2) or "").strip()
        out.append((float(m.group(1).rstrip(",").replace(",", "")) * SCALE.get(unit, 1.0), unit))
    return out


def _expressions(text: str) -> list[tuple[float, list[float]]]:
    """(result, operands) of every 'a x b / c' the comment writes out, evaluated left to right."""
    out = []
    for m in EXPRESSION.finditer(text):
        nums = [float(n.replace(",", "")) for n in re.findall(NUMBER, m.group(0))]
        ops = re.findall(r"[x×*/]", m.group(0))
        result = nums[0]
        for op, n in zip(ops, nums[1:], strict=True):
            result = result / n if op == "/" else result * n
        out.append((result, nums))
    return out


def _numbers_of(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers_of(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers_of(v)]
    return []


def _model_figures(cfg: TrainConfig) -> tuple[list[float], list[float]]:
    """(exact figures, parameter counts) of the recipe's model: its fields; the total and any sum of parts."""
    model = resolve_model(cfg.model)
    fields = [float(v) for v in vars(model).values() if isinstance(v, int | float) and not isinstance(v, bool)]
    parts = list(param_breakdown(model, mim=cfg.uses_mim()).values())
    sums = [float(sum(c)) for r in range(1, len(parts) + 1) for c in itertools.combinations(parts, r)]
    return fields, [float(param_count(model, mim=cfg.uses_mim())), *sums]


def _same(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def unresolved(c: Comment, cfg: TrainConfig, facts: PaperFacts) -> list[str]:
    """What a `paper:` comment states that neither the recipe sets nor its not_reproduced lists (pure)."""
    whats = " | ".join(what for what, _ in facts.not_reproduced)
    text, problems, resolved = c.paper, [], 0
    for pattern, holds in TERMS:
        for m in re.finditer(pattern, text, flags=re.IGNORECASE):
            if not holds(cfg, m) and not re.search(pattern, whats, flags=re.IGNORECASE):
                problems.append(f"{m.group(0)!r} does not hold and no not_reproduced entry names it")
            resolved += 1
        text = re.sub(pattern, " ", text, flags=re.IGNORECASE)  # its numbers are the phrase's
    exprs = _expressions(text)
    candidates = _numbers_of(c.value)
    exact, counts = _model_figures(cfg) if c.key == "model" else ([], [])
    operands = [n for result, ops in exprs for n in ops if any(_rounds_to(result, v) for v in candidates)]
    for value, unit in figures(text):
        ok = (
            any(_same(value, v) for v in candidates + exact + operands)
            or any(_same(value, v, 0.03) for v in counts)
            or (unit in HOURS and any(_rounds_to(value * HOURS[unit], v) for v in candidates))
            or any(_same(value, v) for v, _ in figures(whats))
        )
        if ok:
            resolved += 1
        else:
            problems.append(f"{value:g} is not what the line sets ({c.key} = {c.value!r}) and no entry names it")
    if not resolved and not problems:
        problems.append("states neither a figure nor a known phrase; resolve it or list it in not_reproduced")
    return problems


def _rounds_to(x: float, v: float) -> bool:
    return v in (math.floor(x), math.ceil(x), round(x)) or _same(x, v)


def recipe(seed: str) -> Path:
    return builtin_dir() / f"seed-{seed}.toml"


def check(path: Path, facts: PaperFacts | None = None) -> list[str]:
    cfg, facts = load_train_config(path), facts or paper_facts(path)
    return [f"{path.name}:{c.line}: {p}" for c in paper_comments(path) for p in unresolved(c, cfg, facts)]


# ---------------------------------------------------------------- the recipes' comments


@pytest.mark.parametrize("seed", SEEDS)
def test_every_paper_comment_is_resolved_or_listed(seed):
    path = recipe(seed)
    assert len(paper_comments(path)) >= 10  # the parser finds the comments (each recipe has 13 or more)
    assert check(path) == []


@pytest.mark.parametrize(
    ("seed", "phrase"),
    [
        ("000", "pre-trained image encoder"),
        ("001", "pre-trained image encoder"),
        ("001", "instruction dataset"),
        ("001", "PyTorch 2.0"),
        ("001", "gradient checkpointing during fine-tuning"),
    ],
)
def test_removing_an_entry_fails(seed, phrase):
    """The check is not vacuous: without the entry that covers a comment's claim, the recipe fails it."""
    facts = paper_facts(recipe(seed))
    kept = tuple(item for item in facts.not_reproduced if phrase not in item[0])
    assert len(kept) == len(facts.not_reproduced) - 1, "the phrase names exactly one entry"
    problems = check(recipe(seed), replace(facts, not_reproduced=kept))
    assert problems and all(seed in p for p in problems), problems


@pytest.mark.parametrize(
    ("line", "value", "comment"),
    [
        ("lr = 3e-4", 3e-4, '"The peak learning rate was set to 1e-4"'),
        ("global_batch = 1024", 1024, '"A global batch size of 2048"'),
        ("warmup_fraction = 0.5", 0.5, '"the first 5% of training steps"'),
        ('precision = "fp16"', "fp16", '"Mixed-precision training (bfloat16)"'),
        ("zero_stage = 3", 3, '"Data parallelism with ZeRO-2 optimization"'),
        ("mim = 1.0", 1.0, "no masked image modelling"),
        ("steps = 400000", 400000, '"850 million images" seen, at 2048 per step (850e6 / 2048, rounded up)'),
        (None, None, '"a peak memory of 78GB per GPU"'),
        (None, None, "the encoder is frozen"),
    ],
)
def test_a_comment_that_disagrees_with_its_line_fails(tmp_path, line, value, comment):
    """A paper figure written in a comment while the line sets another value (or none) is caught."""
    cfg = load_train_config(recipe("000"))
    key = line.split("=")[0].strip() if line else None
    problems = unresolved(Comment(1, key, value, comment), _with(cfg, key, value), paper_facts(recipe("000")))
    assert problems, comment


def _with(cfg: TrainConfig, key: str | None, value: object) -> TrainConfig:
    """The config with the one key a test line sets (precision, zero_stage, a loss weight...)."""
    if key in ("precision", "zero_stage", "global_batch", "steps"):
        return replace(cfg, **{key: value})
    if key == "mim":
        return replace(cfg, loss=replace(cfg.loss, mim=value))
    if key in ("lr", "warmup_fraction"):
        return replace(cfg, optim=replace(cfg.optim, warmup_steps=0, **{key: value}))
    return cfg


def test_the_parser_reads_keys_values_and_continuations(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(
        'model = "tiny"   # paper: "224 px"; choice: the size\n'
        "                 # paper: continued, not a new comment\n"
        "# paper: on its own,\n"
        "# still the same comment\n"
        "[optim]\n"
        'lr = 1e-4        # "#" in a string: paper: "peak 1e-4" (x # y)\n'
    )
    got = paper_comments(p)
    assert [(c.line, c.key, c.value) for c in got] == [(1, "model", "tiny"), (3, None, None), (6, "lr", 1e-4)]
    assert got[0].paper == '"224 px"' and got[1].paper == "on its own, still the same comment"


# ---------------------------------------------------------------- the seed texts


def _seed_text(seed: str) -> str:
    (path,) = SEEDS_DIR.glob(f"{seed}_*.txt")
    return path.read_text(encoding="utf-8", errors="replace")


# What vltrain has no setting for, as the seed texts say it: each occurrence needs a not_reproduced entry.
SEED_STATEMENTS = [
    r"pre-trained",
    r"fine-tuning",
    r"instruction dataset",
    r"audio",
    r"video",
    r"\d+ ?kHz",
    r"PyTorch 2\.0",
    r"peak memory",
    r"MWh",
    r"trillion tokens",
    r"validation loss",
    r"sweeps",
    r"custom",
    r"terabytes",
    r"offset",
    r"(?:million|billion) image-text pairs",
    r"downstream|zero-shot",
]


def seed_gaps(seed: str, facts: PaperFacts) -> list[str]:
    """What the seed text states that vltrain has no setting for and the recipe's [paper] does not list."""
    whats = " | ".join(what for what, _ in facts.not_reproduced)
    return [
        m.group(0)
        for pattern in SEED_STATEMENTS
        for m in re.finditer(pattern, _seed_text(seed), flags=re.IGNORECASE)
        if not re.search(pattern, whats, flags=re.IGNORECASE)
    ]


@pytest.mark.parametrize("seed", SEEDS)
def test_what_the_seed_text_states_without_a_setting_is_listed(seed):
    assert seed_gaps(seed, paper_facts(recipe(seed))) == []


@pytest.mark.parametrize(
    ("seed", "phrase", "gap"),
    [
        ("004", "audio", "audio"),
        ("004", "video", "video"),
        ("003", "peak memory", "peak memory"),
        ("003", "2.1 MWh", "MWh"),
        ("001", "PyTorch 2.0", "PyTorch 2.0"),
        ("000", "fine-tuning", "fine-tuning"),
    ],
)
def test_removing_an_entry_the_seed_text_needs_fails(seed, phrase, gap):
    facts = paper_facts(recipe(seed))
    kept = tuple(item for item in facts.not_reproduced if phrase not in item[0])
    assert len(kept) == len(facts.not_reproduced) - 1, "the phrase names exactly one entry"
    assert gap in seed_gaps(seed, replace(facts, not_reproduced=kept))


@pytest.mark.parametrize("seed", SEEDS)
def test_every_figure_of_the_seed_text_is_in_its_recipe(seed):
    """A number the paper states is set, explained (a `choice:` comment) or listed: the recipe names it."""
    text = re.sub(r"</?\w+>", "", re.sub(r"<year>.*?</year>", "", _seed_text(seed)))
    named = [v for v, _ in figures(recipe(seed).read_text(encoding="utf-8"))]
    missing = [v for v, _ in figures(text) if not any(_same(v, n) for n in named)]
    assert missing == [], f"seed {seed}'s figures {missing} appear nowhere in its recipe"


def _tag(text: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}>(.*?)</{tag}>", text)
    return m.group(1) if m else None


@pytest.mark.parametrize("seed", SEEDS)
def test_the_paper_table_holds_the_seed_texts_gpus_and_duration(seed):
    text, facts = _seed_text(seed), paper_facts(recipe(seed))
    assert facts.gpus == int(_tag(text, "gpu_count"))
    training = _tag(text, "training")
    if training is None:
        assert facts.duration_h is None
    else:
        n, unit = training.split()
        assert facts.duration_h == pytest.approx(float(n) * HOURS[unit], abs=1)
    m = re.search(r"([\d,]+) GPU-hours", text)
    assert facts.gpu_hours == (float(m.group(1).replace(",", "")) if m else None)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_twin_has_its_recipes_facts(seed):
    assert paper_facts(builtin_dir() / f"seed-{seed}-tiny.toml") == paper_facts(recipe(seed))


# ---------------------------------------------------------------- the [paper] table's input


def test_the_trainer_never_sees_the_paper_table(tmp_path):
    cfg = load_train_config(recipe("004"))
    assert "paper" not in cfg.to_dict()
    with pytest.raises(UserError, match=r"^--set.*paper"):
        load_train_config(recipe("004"), {"paper.gpus": 8})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"gpu": 8}, r"^r\.toml: paper\.gpu: unknown key; allowed: duration_h, gpus"),
        ({"gpus": 0}, r"^r\.toml: paper\.gpus: 0 is not valid; allowed: an integer from 1"),
        ({"duration_h": "6 weeks"}, r"^r\.toml: paper\.duration_h: '6 weeks' is not valid; allowed: a number"),
        ({"not_reproduced": [{"what": "x"}]}, r"^r\.toml: paper\.not_reproduced\[0\]: not a table of `what` and"),
        ({"not_reproduced": [{"what": "x", "why": "a\nb"}]}, r"^r\.toml: paper\.not_reproduced\[0\]\.why: not valid"),
        ({"not_reproduced": "x"}, r"^r\.toml: paper\.not_reproduced: not a list"),
        ("x", r"^r\.toml: paper: 'x' is not a table"),
    ],
)
def test_a_bad_paper_table_is_one_line(table, message):
    with pytest.raises(UserError, match=message) as e:
        parse_paper(table, "r.toml: paper")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- what the commands print


def _quiet(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """conftest's private CLI environment where no Slurm controller answers (the partition check is skipped)."""
    conf = tmp_path / "no-controller.conf"
    conf.write_text("ClusterName=none\n")
    return env | {"SLURM_CONF": str(conf)}


def _items(seed: str) -> list[dict[str, str]]:
    return [{"what": w, "why": y} for w, y in paper_facts(recipe(seed)).not_reproduced]


def test_recipes_show_lists_what_is_not_reproduced(env):
    r = run_cli("recipes", "show", "seed-004", env=env)
    assert r.returncode == 0, r.stderr
    flat = " ".join(r.stdout.split())
    assert "not reproduced" in flat
    for item in _items("004"):
        assert item["what"] in flat and item["why"] in flat
    d = json.loads(run_cli("recipes", "show", "seed-004", "--json", env=env).stdout)
    assert d["not_reproduced"] == _items("004")


@pytest.mark.parametrize(("profile", "seed"), [("a100x32", "000"), ("a100x128", "001"), ("a100x256", "004")])
def test_plan_and_dry_run_list_what_is_not_reproduced(env, tmp_path, profile, seed):
    env = _quiet(env, tmp_path)
    for args in (("plan", "--profile", profile), ("submit", "--profile", profile, "--dry-run")):
        human = run_cli(*args, env=env)
        assert human.returncode in (0, 2) and "Traceback" not in human.stderr, human.stderr  # 2: would refuse
        flat = " ".join(human.stdout.split())
        assert "not reproduced" in flat, human.stdout + human.stderr
        for item in _items(seed):  # one line each, what and why (folded at the terminal's width)
            assert f"- {item['what']}: {item['why']}" in flat, (args, item)
        d = json.loads(run_cli(*args, "--json", env=env).stdout)
        assert d["not_reproduced"] == _items(seed), args


def test_a_config_without_a_paper_table_prints_none(env, tmp_path):
    env = _quiet(env, tmp_path)
    d = json.loads(run_cli("plan", "--profile", "slurm-local", "--json", env=env).stdout)
    assert d["not_reproduced"] == []
    human = run_cli("submit", "--profile", "slurm-local", "--dry-run", env=env)
    assert "not reproduced" not in human.stdout


def test_recipes_list_ends_each_description_at_a_sentence(env):
    """The first whole sentence of a recipe's opening comment, though the comment wraps lines."""
    rows = json.loads(run_cli("recipes", "list", "--json", env=env).stdout)
    assert {r["name"] for r in rows} >= {f"seed-{s}" for s in SEEDS} | {f"seed-{s}-tiny" for s in SEEDS}
    for r in rows:
        assert re.search(r"[.!?]$", r["summary"]), r


def test_a_summary_spans_the_comment_lines_of_its_sentence(tmp_path):
    from clusterctl.planning.recipes import recipe_summary

    p = tmp_path / "r.toml"
    p.write_text("\n# A recipe whose first sentence wraps\n# onto a second line. Then more.\n# Unread.\nsteps = 1\n")
    assert recipe_summary(p) == "A recipe whose first sentence wraps onto a second line."
    p.write_text("# No full stop: the comment block whole\n# (configs/x.toml)\nsteps = 1\n# later.\n")
    assert recipe_summary(p) == "No full stop: the comment block whole (configs/x.toml)"


def test_a_bad_paper_table_stops_plan_in_one_line(env, tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text(f'base = "{recipe("000")}"\n[paper]\ngpus = 0\n')
    one_line_error(
        run_cli("plan", "--profile", "a100x32", "--config", str(bad), env=env), f"error: {bad}: paper.gpus: 0"
    )
