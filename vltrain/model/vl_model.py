"""VLModel: ViT + text encoder with cross-attention fusion + causal decoder, three losses in one forward.

Per training sample (ALBEF / BLIP-style):
  image --ViT--> features [1+N, Dv] --cls--> image_proj --> image embedding   \
  text  --text blocks--> unimodal [T, Dt] --mean over real tokens--> text_proj  > ITC
  masked text --text blocks--> fusion blocks (x-attn image) --> tied head --> MLM
  text  --causal decoder (x-attn image)--> tied head --> captioning
  visible patches --ViT--> MIM decoder --> pixels of the hidden patches --> MIM (vltrain/model/mim.py)
The text embedding for ITC is the mean of the unimodal output over real tokens rather than the bos
position: it is defined for any text_layers (with 0 it is a bag of embeddings), and with 1-2 blocks
it carries more of the caption than one position does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vltrain.common.errors import UserError
from vltrain.config import LossConfig
from vltrain.model import losses
from vltrain.model.decoder import TextDecoder
from vltrain.model.layers import Block
from vltrain.model.mim import MIMDecoder, mim_forward
from vltrain.model.text import TextEmbedding, TextEncoder
from vltrain.model.vision import VisionEncoder
from vltrain.model_config import ModelConfig


class VLModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        loss_cfg: LossConfig | None = None,
        pad_id: int = 0,
        bos_id: int = 2,
        eos_id: int = 3,
        mask_id: int = 4,
        mim: bool | None = None,
    ):
        """mim: build the MIM decoder (default: when loss_cfg.mim > 0). A staged run passes
        TrainConfig.uses_mim(), so that the decoder exists in every stage and checkpoints resume across
        a boundary that turns MIM on or off. `loss_cfg` may be replaced between steps (the loop sets
        the stage's weights); the forward reads it at each call."""
        super().__init__()
        self.cfg, self.loss_cfg = cfg, loss_cfg or LossConfig()
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = pad_id, bos_id, eos_id, mask_id
        self.vision = VisionEncoder(cfg)
        self.embed = TextEmbedding(cfg)
        self.text = TextEncoder(cfg)
        self.decoder = TextDecoder(cfg)
        self.image_proj = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        # Shape [1], not a 0-dim scalar: DeepSpeed 0.19's _broadcast_model views every parameter as
        # uint8, which a 0-dim tensor cannot do ("self.dim() cannot be 0 to view Float as Byte").
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / self.loss_cfg.init_temperature)]))
        self.apply(self._init)
        for p in (self.vision.cls, self.vision.pos, self.embed.pos):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        # After the rest is initialised: the towers' weights do not depend on whether MIM is on
        self.mim_decoder = MIMDecoder(cfg) if (self.loss_cfg.mim > 0 if mim is None else mim) else None
        if self.mim_decoder is not None:
            self.mim_decoder.apply(self._init)
            for p in (self.mim_decoder.pos, self.mim_decoder.mask_token):
                nn.init.trunc_normal_(p, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # GPT-2 / ViT init: N(0, 0.02) weights, zero biases; norms keep their (1, 0) defaults.
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every transformer block in backward (trades ~1/3 more compute for memory)."""
        for m in self.modules():
            if isinstance(m, Block):
                m.checkpointing = enabled

    # ------------------------------------------------------------------ encoders
    def _text_unimodal(self, ids, attention_mask):
        x = self.embed(ids)  # [B, T, Dt]
        rope = self.embed.rope(ids.shape[1], ids.device)
        return self.text.unimodal(x, attention_mask, rope), rope

    def _text_embedding(self, h, attention_mask):
        h = self.text.unimodal_norm(h)  # [B, T, Dt]
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # [B, T, 1]
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)  # [B, Dt]
        return F.normalize(self.text_proj(pooled), dim=-1)  # [B, E]

    def _image_embedding(self, feats):
        return F.normalize(self.image_proj(feats[:, 0]), dim=-1)  # [B, E] from the cls token

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> [B, E], L2-normalised."""
        return self._image_embedding(self.vision(images))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] -> [B, E], L2-normalised."""
        h, _ = self._text_unimodal(input_ids, attention_mask)
        return self._text_embedding(h, attention_mask)

    # ------------------------------------------------------------------ training
    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mlm_draws: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """-> {"loss": weighted sum (with grad), "itc", "mlm", "caption", "mim": detached scalars}.

        mlm_draws [3, B, T]: MLM's random numbers (the loader's, per sample); None: torch's RNG.

        "mim" is always there (0 when its weight is 0: nothing of it is computed then), so that the
        loop's per-step sums keep one shape across stages."""
        lc = self.loss_cfg
        attention_mask = attention_mask.bool()
        feats = self.vision(images)  # [B, 1+N, Dv]

        h, rope = self._text_unimodal(input_ids, attention_mask)  # clean text, [B, T, Dt]
        itc = losses.itc_loss(self._image_embedding(feats), self._text_embedding(h, attention_mask), self.logit_scale)

        masked, labels = losses.mask_tokens(
            input_ids,
            attention_mask,
            mask_prob=lc.mask_prob,
            mask_id=self.mask_id,
            vocab_size=self.cfg.vocab_size,
            special_ids=(self.pad_id, self.bos_id, self.eos_id, self.mask_id),
            draws=mlm_draws,
        )
        hm, _ = self._text_unimodal(masked, attention_mask)
        fused = self.text.fuse(hm, feats, attention_mask, rope)  # [B, T, Dt]
        mlm = losses.mlm_loss(self.embed.logits(fused), labels)

        dec = self.decoder(self.embed(input_ids), feats, rope)  # [B, T, Dt]
        cap = losses.caption_loss(self.embed.logits(dec), input_ids, attention_mask)

        loss = lc.itc * itc + lc.mlm * mlm + lc.caption * cap
        mim = torch.zeros((), dtype=loss.dtype, device=loss.device)
        if lc.mim > 0:  # last: the other losses draw the same random numbers with MIM on or off
            if self.mim_decoder is None:
                raise UserError(
                    "loss.mim: > 0 but the model was built without its MIM decoder; allowed: build it with "
                    "VLModel(..., mim=True) (the trainer does when any stage uses MIM)"
                )
            mim = mim_forward(self.vision, self.mim_decoder, images, lc.mim_mask_ratio)
            loss = loss + lc.mim * mim
        return {"loss": loss, "itc": itc.detach(), "mlm": mlm.detach(), "caption": cap.detach(), "mim": mim.detach()}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_len: int) -> torch.Tensor:
        """Greedy captions: [B, max_len] int64, the tokens after bos up to and including eos, then pad.

        Recomputes the decoder over the whole prefix at each step instead of keeping a KV cache:
        captions are short and this runs only in evaluation.
        """
        if not 1 <= max_len < self.cfg.max_text_len:
            raise UserError(
                f"generate: max_len {max_len}; allowed: 1 to {self.cfg.max_text_len - 1} (max_text_len - 1)"
            )
        feats = self.vision(images)
        b, dev = images.shape[0], images.device
        seq = torch.full((b, 1), self.bos_id, dtype=torch.long, device=dev)
        out = torch.full((b, max_len), self.pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        banned = torch.tensor([self.pad_id, self.bos_id, self.mask_id], device=dev)
        for t in range(max_len):
            h = self.decoder(self.embed(seq), feats, self.embed.rope(seq.shape[1], dev))
            logits = self.embed.logits(h[:, -1]).float()  # [B, V]
            logits[:, banned] = float("-inf")
            nxt = logits.argmax(-1)
            out[:, t] = torch.where(done, self.pad_id, nxt)
            done |= nxt == self.eos_id
            if done.all():
                break
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        return out
