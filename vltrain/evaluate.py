"""Held-out evaluation: image-text retrieval Recall@1/5/10 both ways, and CIDEr-D of greedy captions.

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
from dataclasses import dataclass
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


@dataclass
class HeldOutPass:
    """One pass over the held-out shards: every pair's embeddings, and the first pairs' greedy captions."""

    image_emb: torch.Tensor  # [N, D] fp32, on the CPU
    text_emb: torch.Tensor  # [N, D] fp32, on the CPU
    captions: list[str]  # generated, for the first max_caption_samples pairs
    references: list[str]  # their true captions
    keys: list[str]  # their sample keys


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
) -> dict[str, Any]:
    """Recall@K (i2t, t2i) over all held-out pairs and CIDEr-D over the first `max_caption_samples`.

    Runs on one process; consumes no global RNG (the caller's training RNG stream stays exact).
    """
    import torch

    from vltrain.presets import resolve_model

    mcfg = resolve_model(cfg.model)
    loader = _held_out_loader(cfg, tokenizer, shards, batch_size, image_size=mcfg.image_size, max_len=mcfg.max_text_len)
    device = device or torch.device("cpu")
    dtype = dtype or next(model.parameters()).dtype
    t0 = time.perf_counter()
    out = held_out_pass(
        model,
        loader,
        tokenizer,
        device=device,
        dtype=dtype,
        max_caption_samples=max_caption_samples,
        max_len=mcfg.max_text_len,
    )
    return {
        **eval_scores(out),
        "shards": shards,
        "eval_time_s": time.perf_counter() - t0,
        "examples": eval_examples(out),
    }


def _held_out_loader(cfg, tokenizer, shards: str, batch_size: int, *, image_size: int, max_len: int):
    """The held-out shards in order, on one process, without augmentation or worker processes."""
    from vltrain.data.loader import ShardLoader

    return ShardLoader(
        shards,
        rank=0,
        world_size=1,
        batch_size=batch_size,
        seed=cfg.seed,
        image_size=image_size,
        tokenizer=tokenizer,
        max_len=max_len,
        train=False,
        data_cfg=cfg.data,
        workers=0,
    )


def held_out_pass(model, loader, tokenizer, *, device, dtype, max_caption_samples: int, max_len: int) -> HeldOutPass:
    """Embed every batch of `loader` and caption (greedily) the first `max_caption_samples` pairs, in eval
    mode without gradients; the model's training mode is restored afterwards."""
    import torch

    was_training = model.training
    model.eval()
    img: list[torch.Tensor] = []
    txt: list[torch.Tensor] = []
    cands: list[str] = []
    refs: list[str] = []
    keys: list[str] = []
    with torch.no_grad():
        for batch in loader:
            images = batch["images"].to(device=device, dtype=dtype)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            img.append(model.encode_image(images).float().cpu())
            txt.append(model.encode_text(ids, mask).float().cpu())
            room = max_caption_samples - len(cands)
            if room > 0:
                out = model.generate(images[:room], max_len=max_len - 1)
                cands += [tokenizer.decode(row) for row in out.cpu()]
                refs += batch["captions"][:room]
                keys += batch["keys"][:room]
    model.train(was_training)
    return HeldOutPass(torch.cat(img), torch.cat(txt), cands, refs, keys)


def eval_scores(out: HeldOutPass) -> dict[str, Any]:
    """Retrieval recall both ways over all pairs, and corpus CIDEr-D of the generated captions; pure."""
    sim = out.image_emb @ out.text_emb.t()  # [N images, N texts]
    cider, _ = cider_d([cider_tokenize(c) for c in out.captions], [[cider_tokenize(r)] for r in out.references])
    n = out.image_emb.shape[0]
    return {
        "n": n,
        "chance_r1": 1.0 / n,
        "i2t": recall_at_k(sim),
        "t2i": recall_at_k(sim.t()),
        "cider": cider,
        "caption_samples": len(out.captions),
    }


def eval_examples(out: HeldOutPass, count: int = 5) -> list[dict[str, str]]:
    """The first `count` captioned pairs: key, reference caption, generated caption."""
    return [
        {"key": k, "reference": r, "generated": c}
        for k, r, c in list(zip(out.keys, out.references, out.captions))[:count]
    ]


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


def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
    """`vltrain eval --run-dir DIR`: the newest complete checkpoint on the held-out shards, on one process."""
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
        model.float(), cfg, Tokenizer.load(tok_path), shards, device=torch.device("cpu"), dtype=torch.float32
    )
    result |= {"step": meta["step"], "samples": meta["samples"], "checkpoint": path.name, "time": time.time()}
    write_eval(run_dir, result)
    return result


def eval_line(step: int, result: dict[str, Any]) -> str:
    """The line an evaluation prints."""
    i2t, t2i = result["i2t"], result["t2i"]
    return (
        f"eval step {step}: i2t R@1 {i2t['R@1']:.3f} R@5 {i2t['R@5']:.3f} "
        f"R@10 {i2t['R@10']:.3f} | t2i R@1 {t2i['R@1']:.3f} R@5 {t2i['R@5']:.3f} "
        f"R@10 {t2i['R@10']:.3f} | CIDEr-D {result['cider']:.3f} | "
        f"{result['n']} pairs (chance R@1 {result['chance_r1']:.4f})"
    )
