"""Held-out evaluation: image-text retrieval Recall@1/5/10 both ways, CIDEr-D of greedy captions, and
zero-shot classification top-1/top-5 when the held-out shards have classes (vltrain.zero_shot).

CIDEr-D is hand-written (a transcription of coco-caption's `cider_scorer.py`, Vedantam et al. 2015,
including its quirks) because its maintained home, pycocoevalcap, is a 104 MB wheel (Java jars for
the PTB tokenizer, METEOR and SPICE) that needs pycocotools, for one 60-line pure-Python function.
Our captions are tokenised as coco-caption's PTB step does for plain English: lower-case, punctuation
dropped. The score is corpus-level (document frequencies from the evaluated references), x10 as
coco-caption reports it.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vltrain.rundir import RunDir

if TYPE_CHECKING:
    import torch

_PUNCT = re.compile(r"[^\w\s]")


def recall_at_k(sim, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """sim [N, N] (rows = queries, the true match of row i is column i) -> {"R@k": fraction}.

    The rank of the true match counts the candidates scored strictly higher, so ties do not help.
    """

    true = sim.diagonal().unsqueeze(1)  # [N, 1]
    rank = (sim > true).sum(dim=1)  # [N]
    return {f"R@{k}": float((rank < k).double().mean()) for k in ks}


def _ngrams(text: str, n: int) -> Counter:
    words = text.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_tokenize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def cider_d(
    candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D of each candidate against its references; returns (mean, per-candidate scores)."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError("cider_d: one list of references per candidate, at least one candidate")
    cands = [_ngrams(c, n) for c in candidates]
    refs = [[_ngrams(r, n) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for g in r})
    log_n = math.log(float(len(refs)))

    def vec(counts: Counter):
        v: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = tf * (log_n - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:  # coco-caption counts bigrams as the "length" (a known quirk we keep for comparability)
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for c, rs in zip(cands, refs):
        vc, nc, lc = vec(c)
        total = [0.0] * n
        for r in rs:
            vr, nr, lr = vec(r)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
                if nc[k] and nr[k]:
                    val /= nc[k] * nr[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(rs) * 10.0)
    return sum(scores) / len(scores), scores


def default_eval_shards(cfg) -> str:
    """data.eval_shards, else `<data.shards>/eval` when that directory holds shards (vltrain data synth)."""
    if cfg.data.eval_shards:
        return cfg.data.eval_shards
    d = Path(cfg.data.shards) / "eval"
    return str(d) if d.is_dir() and any(d.glob("*.tar")) else ""


@dataclass(frozen=True)
class EvalShare:
    """This rank's share of an evaluation: slice `rank` of `size` of the held-out pairs (its data-parallel
    rank; tensor-parallel peers take the same slice), the process group the results are combined over
    (None: the default group; none is used at size 1), and whether the model's forward is collective
    (FSDP-sharded parameters, tensor parallel): then every rank of the group makes the same calls, batch
    for batch and step for step, also a rank whose slice has ended (it repeats a pair and drops the result)."""

    rank: int = 0
    size: int = 1
    group: Any = None
    lockstep: bool = False


ONE_PROCESS = EvalShare()


@dataclass
class HeldOutPass:
    """This rank's pass over its slice of the held-out pairs: their embeddings, and the greedy captions
    of its share of the first pairs (`positions`: their indices in the rank's slice)."""

    image_emb: torch.Tensor  # [n, D] fp32, on the CPU
    text_emb: torch.Tensor  # [n, D] fp32, on the CPU
    captions: list[str]  # generated
    references: list[str]  # their true captions
    keys: list[str]  # their sample keys
    positions: list[int] = field(default_factory=list)
    pair_keys: list[str] = field(default_factory=list)  # the key of every row of image_emb / text_emb


def evaluate(
    model,
    cfg,
    tokenizer,
    shards: str,
    *,
    device=None,
    dtype=None,
    batch_size: int = 128,
    max_caption_samples: int = 1000,
    share: EvalShare = ONE_PROCESS,
    classes: str | Path | None = None,
) -> dict[str, Any]:
    """Recall@K (i2t, t2i) over all held-out pairs, CIDEr-D over the first `max_caption_samples`, and
    zero-shot top-1/top-5 over the pairs with a class when there are classes (`classes`: a classes.json,
    else vltrain.zero_shot.find_classes).

    Every rank of `share` calls it with its own model (the engine's, sharded or not) and evaluates its
    slice of the pairs; the scores, the same on every rank, combine all slices (embeddings gathered for
    retrieval, captions gathered for CIDEr's corpus statistics, counts all-reduced). Consumes no global
    RNG (the caller's training RNG stream stays exact).
    """
    import torch

    from vltrain.presets import resolve_model
    from vltrain.zero_shot import zero_shot_task

    mcfg = resolve_model(cfg.model)
    task = zero_shot_task(cfg, shards, classes)  # read first: a bad classes.json fails before the pass
    loader = _held_out_loader(
        cfg, tokenizer, shards, batch_size, image_size=mcfg.image_size, max_len=mcfg.max_text_len, share=share
    )
    device = device or torch.device("cpu")
    dtype = dtype or next(model.parameters()).dtype
    t0 = time.perf_counter()
    quota = len(range(share.rank, max_caption_samples, share.size))  # interleaved as the loader's slices
    out = held_out_pass(
        model,
        loader,
        tokenizer,
        device=device,
        dtype=dtype,
        max_caption_samples=quota,
        max_len=mcfg.max_text_len,
        share=share,
    )
    result = {**eval_scores(out, share, device), "shards": shards}
    if task is not None:
        result["zero_shot"] = zero_shot_eval(model, tokenizer, task, out, share, device, mcfg.max_text_len, batch_size)
    return result | {"eval_time_s": time.perf_counter() - t0}


def _held_out_loader(cfg, tokenizer, shards: str, batch_size: int, *, image_size: int, max_len: int, share: EvalShare):
    """This rank's slice of the held-out shards in order (rank r: pairs r, r + size, ...), without
    augmentation or worker processes."""
    from vltrain.data.loader import ShardLoader

    return ShardLoader(
        shards,
        rank=share.rank,
        world_size=share.size,
        batch_size=batch_size,
        seed=cfg.seed,
        image_size=image_size,
        tokenizer=tokenizer,
        max_len=max_len,
        train=False,
        data_cfg=cfg.data,
        workers=0,
    )


def _agree(share: EvalShare, device, flags: list[bool]) -> list[bool]:
    """Each flag true on any rank of the group (lockstep: so that all make the same calls)."""
    import torch

    t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=device)
    if share.size > 1:
        from vltrain.collectives import group_all_reduce

        t = group_all_reduce(t, share.group, device, op="max")
    return [bool(x) for x in t.tolist()]


def held_out_pass(
    model, loader, tokenizer, *, device, dtype, max_caption_samples: int, max_len: int, share: EvalShare = ONE_PROCESS
) -> HeldOutPass:
    """Embed every batch of `loader` and caption (greedily, KV-cached) its first `max_caption_samples`
    pairs, in eval mode without gradients; the model's training mode is restored afterwards. Under
    `share.lockstep` the ranks agree before each batch and each generated token."""
    import torch

    from vltrain.model.generate import all_done_here, greedy_captions, reshard_all

    was_training = model.training
    model.eval()
    out = HeldOutPass(torch.empty(0), torch.empty(0), [], [], [], [])
    img: list[torch.Tensor] = []
    txt: list[torch.Tensor] = []
    all_done = all_done_here
    if share.lockstep:
        all_done = lambda done: not _agree(share, device, [not bool(done.all())])[0]
    batches: Iterator[dict[str, Any]] = iter(loader)
    spare: dict[str, Any] = {}
    seen = 0
    with torch.no_grad():
        while True:
            got = next(batches, None)
            room = max_caption_samples - len(out.captions) if got is not None else 0
            more, caption = got is not None, room > 0
            if share.lockstep:
                more, caption = _agree(share, device, [more, caption])
            if not more:
                break
            batch = got if got is not None else spare  # this rank's slice has ended: repeat a pair, drop results
            spare = {k: v[:1] if v is not None else None for k, v in batch.items()}
            images = batch["images"].to(device=device, dtype=dtype)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            i, t = model.encode_image(images).float().cpu(), model.encode_text(ids, mask).float().cpu()
            caps = greedy_captions(model, images[: max(room, 1)], max_len - 1, all_done) if caption else None
            if got is None:
                continue
            img.append(i)
            txt.append(t)
            out.pair_keys += got["keys"]
            if caps is not None and room > 0:
                out.captions += [tokenizer.decode(row) for row in caps.cpu()]
                out.references += got["captions"][:room]
                out.keys += got["keys"][:room]
                out.positions += list(range(seen, seen + len(caps)))
            seen += len(got["keys"])
    reshard_all(model)
    model.train(was_training)
    out.image_emb, out.text_emb = torch.cat(img), torch.cat(txt)
    return out


def _gather_rows(t: torch.Tensor, share: EvalShare, device) -> tuple[torch.Tensor, int]:
    """Every rank's rows of `t` [n, D] in rank order, and where this rank's rows start."""
    import torch

    if share.size == 1:
        return t, 0
    from vltrain.collectives import group_gather_rows

    parts = group_gather_rows(t, share.group, device or t.device, share.size)
    return torch.cat(parts), sum(p.shape[0] for p in parts[: share.rank])


def recall_hits(queries: torch.Tensor, candidates: torch.Tensor, offset: int, ks: tuple[int, ...]) -> torch.Tensor:
    """Queries [n, D] (the true match of query i is candidate offset + i) against all candidates [N, D]:
    how many queries rank their true match within the top k, for each k; ties do not help."""
    import torch

    sim = queries @ candidates.t()  # [n, N]
    rows = torch.arange(queries.shape[0], device=sim.device)
    rank = (sim > sim[rows, offset + rows].unsqueeze(1)).sum(dim=1)
    return torch.stack([(rank < k).sum() for k in ks])


def _gathered_captions(out: HeldOutPass, share: EvalShare) -> list[tuple[str, str, str]]:
    """(key, reference, generated) of every rank's captioned pairs, in the held-out order (slices interleave)."""
    mine = [(p, share.rank, k, r, c) for p, k, r, c in zip(out.positions, out.keys, out.references, out.captions)]
    every = [mine]
    if share.size > 1:
        from vltrain.collectives import group_gather_objects

        every = group_gather_objects(mine, share.group, share.size)
    return [(k, r, c) for _, _, k, r, c in sorted(x for part in every for x in part)]


def eval_scores(out: HeldOutPass, share: EvalShare = ONE_PROCESS, device=None) -> dict[str, Any]:
    """Retrieval recall both ways over every rank's pairs (each rank ranks its own queries against all
    gathered embeddings; hits all-reduced), corpus CIDEr-D of every rank's captions, the first examples."""
    import torch

    ks = (1, 5, 10)
    img, txt = out.image_emb.to(device or "cpu"), out.text_emb.to(device or "cpu")
    all_img, offset = _gather_rows(img, share, device)
    all_txt, _ = _gather_rows(txt, share, device)
    hits = torch.cat([recall_hits(img, all_txt, offset, ks), recall_hits(txt, all_img, offset, ks)])
    if share.size > 1:
        from vltrain.collectives import group_all_reduce

        hits = group_all_reduce(hits, share.group, device or hits.device)
    n = all_img.shape[0]
    frac = [float(h) / n for h in hits.tolist()]
    captioned = _gathered_captions(out, share)
    cider, _ = cider_d([cider_tokenize(c) for _, _, c in captioned], [[cider_tokenize(r)] for _, r, _ in captioned])
    return {
        "n": n,
        "chance_r1": 1.0 / n,
        "i2t": {f"R@{k}": f for k, f in zip(ks, frac[: len(ks)])},
        "t2i": {f"R@{k}": f for k, f in zip(ks, frac[len(ks) :])},
        "cider": cider,
        "caption_samples": len(captioned),
        "examples": [{"key": k, "reference": r, "generated": c} for k, r, c in captioned[:5]],
    }


def zero_shot_eval(model, tokenizer, task, out: HeldOutPass, share: EvalShare, device, max_len: int, batch_size: int):
    """eval.json's "zero_shot": the class embeddings (every rank makes the same encode_text calls), this
    rank's labelled images against them, hits and counts summed over the ranks."""
    from vltrain import zero_shot as zs

    classes, labels = task
    prompts = zs.encode_prompts(
        model, tokenizer, classes.prompts(), device=device, max_len=max_len, batch_size=batch_size
    )
    class_emb = zs.class_embeddings(prompts, len(classes.classes))

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        if share.size == 1:
            return t
        from vltrain.collectives import group_all_reduce

        return group_all_reduce(t, share.group, device)

    return zs.zero_shot_scores(classes, class_emb, out.image_emb, out.pair_keys, labels, all_reduce)


def write_eval(run_dir: str | Path, result: dict[str, Any]) -> Path:
    """eval.json in the run directory (atomic), the latest evaluation of the run."""
    from vltrain.common.atomic import atomic_write

    path = RunDir(run_dir).eval
    atomic_write(path, json.dumps(result, indent=2) + "\n", mode=None)
    return path


def newest_sound_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose meta.json and module files verify (vltrain.checkpoint.verify_module:
    the files its engine says hold weights, e.g. DeepSpeed's module file, or every DCP file: DCP mixes model
    and optimizer shards);
    a damaged one is named on stderr and skipped, not moved: evaluation only reads the run directory
    (the next training attempt moves it aside)."""
    import sys

    from vltrain import checkpoint

    for _, path in reversed(checkpoint.complete_checkpoints(run_dir)):
        problem = checkpoint.verify_module(path)
        if problem is None:
            return path
        print(
            f"vltrain: warning: checkpoint {path.name} is damaged ({problem}); using the one before it", file=sys.stderr
        )
    return None


def evaluate_run(run_dir: str | Path, classes: str | Path | None = None) -> dict[str, Any]:
    """`vltrain eval --run-dir DIR [--classes FILE]`: the newest complete checkpoint on the held-out shards,
    on one process."""
    import torch

    from vltrain import checkpoint
    from vltrain.common.errors import UserError
    from vltrain.config import load_train_config
    from vltrain.engines.common import build_model
    from vltrain.tokenizer import Tokenizer

    run_dir = Path(run_dir)
    cfg = load_train_config(RunDir(run_dir).config)
    path = newest_sound_checkpoint(run_dir)
    if path is None:
        raise UserError(f"--run-dir: {run_dir} has no complete checkpoint; allowed: a run that saved one")
    shards = default_eval_shards(cfg)
    if not shards:
        raise UserError(
            f"data.eval_shards: not set and {cfg.data.shards}/eval holds no shards; allowed: held-out shards"
        )
    model = build_model(cfg)
    model.load_state_dict(checkpoint.module_state(path))
    tok_path = cfg.data.tokenizer or str(RunDir(run_dir).tokenizer)
    meta = checkpoint.read_meta(path)
    result = evaluate(
        model.float(),
        cfg,
        Tokenizer.load(tok_path),
        shards,
        device=torch.device("cpu"),
        dtype=torch.float32,
        classes=classes,
    )
    result |= {"step": meta["step"], "samples": meta["samples"], "checkpoint": path.name, "time": time.time()}
    write_eval(run_dir, result)
    return result


def eval_line(step: int, result: dict[str, Any]) -> str:
    """The line an evaluation prints."""
    from vltrain.zero_shot import zero_shot_line

    i2t, t2i = result["i2t"], result["t2i"]
    line = (
        f"eval step {step}: i2t R@1 {i2t['R@1']:.3f} R@5 {i2t['R@5']:.3f} "
        f"R@10 {i2t['R@10']:.3f} | t2i R@1 {t2i['R@1']:.3f} R@5 {t2i['R@5']:.3f} "
        f"R@10 {t2i['R@10']:.3f} | CIDEr-D {result['cider']:.3f} | "
        f"{result['n']} pairs (chance R@1 {result['chance_r1']:.4f})"
    )
    return line + (f" | {zero_shot_line(result['zero_shot'])}" if "zero_shot" in result else "")
