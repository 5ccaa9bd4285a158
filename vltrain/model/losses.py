"""The three pre-training objectives: image-text contrastive, masked LM, captioning.

Cross-entropies run in float32 whatever the model's dtype (bf16 logits lose too much in log-softmax).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

if TYPE_CHECKING:
    from vltrain.config import LossConfig

_DP_GROUP: dist.ProcessGroup | None = None


def set_data_parallel_group(group: dist.ProcessGroup | None) -> None:
    """The ranks whose samples are ITC negatives of each other: the engine's data-parallel group.

    Tensor- and pipeline-parallel peers hold the same samples, so gathering over the world would count
    them twice. None (the default) = the whole world, as in plain data parallelism.
    """
    global _DP_GROUP
    _DP_GROUP = group


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [B, E] -> ([dp*B, E] from every data-parallel rank, offset of this rank's rows).

    The gather is differentiable (vltrain.collectives.all_gather_rows, functional collectives that work
    on the data-parallel subgroup), so every rank's encoders also learn from the negatives that the
    other ranks see (as in CLIP / OpenCLIP's gather_with_grad).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(_DP_GROUP) == 1:
        return x, 0
    from vltrain.collectives import all_gather_rows

    group = _DP_GROUP or dist.group.WORLD
    return all_gather_rows(x, group), dist.get_rank(group) * x.shape[0]


def itc_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021). image_emb, text_emb [B, E], L2-normalised."""
    all_img, offset = _gather(image_emb.float())
    all_txt, _ = _gather(text_emb.float())
    scale = logit_scale.float().clamp(max=4.6052).exp()  # temperature floor 0.01, as in CLIP
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset  # [B]
    logits_i2t = scale * image_emb.float() @ all_txt.t()  # [B, world*B]
    logits_t2i = scale * text_emb.float() @ all_img.t()  # [B, world*B]
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def mask_tokens(
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_prob: float,
    mask_id: int,
    vocab_size: int,
    special_ids: tuple[int, ...],
    draws: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019).

    Each real, non-special token is chosen with probability mask_prob; a chosen token becomes <mask>
    80% of the time, a random ordinary token 10%, itself 10%. The random numbers are `draws` (float
    [3, B, T] uniform: the loader's per-sample "mlm_draws", so a sample's mask follows the sample),
    else torch's global RNG on ids.device. Returns (masked ids [B, T], labels [B, T] with -100 where
    nothing is predicted).
    """
    candidates = attention_mask.clone()
    for s in special_ids:
        candidates &= ids != s
    low = max(special_ids) + 1  # random replacements skip the special ids (0..4 with our tokenizer)
    if draws is None:
        choice, roll = torch.rand(ids.shape, device=ids.device), torch.rand(ids.shape, device=ids.device)
        random_ids = torch.randint(low, vocab_size, ids.shape, device=ids.device)
    else:
        choice, roll = draws[0], draws[1]
        random_ids = low + (draws[2].double() * (vocab_size - low)).long().clamp(max=vocab_size - low - 1)
    chosen = candidates & (choice < mask_prob)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    masked = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    masked = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, masked)
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], labels [B, T] (-100 = ignore). Zero, not NaN, when nothing was masked."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


def caption_loss(logits: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, T, V] at position t predict ids[:, t+1] where it is real."""
    targets = ids[:, 1:].masked_fill(~attention_mask[:, 1:], -100)  # [B, T-1]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def weighted(lc: LossConfig, itc: torch.Tensor, mlm: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """The training loss of the three terms (MIM's is added by the model, where it runs): the model's
    forward and the pipeline's loss_fn both weigh with this, in this order."""
    return lc.itc * itc + lc.mlm * mlm + lc.caption * caption
