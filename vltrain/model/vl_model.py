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

One forward for the model and for each of its pipeline stages (torchtitan's way): a stage is a deep
copy of the model with what other stages run deleted (block containers are keyed by block index, so
parameter names do not change) or set to None (vltrain.parallel.pipeline.split_stages), and `_run`
runs whatever the copy holds: the stem and token embeddings where they are, its blocks of each tower,
a tower's norm where the tower ends, the heads where they are. The model is the one-stage case.
Between stages flows the carry (feats [B, 1+N, Dv] image stream, clean [B, T, Dt] text for ITC,
masked [B, T, Dt] masked text for MLM, dec [B, T, Dt] decoder stream).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from vltrain.common.errors import UserError
from vltrain.config import LossConfig
from vltrain.model import losses
from vltrain.model.decoder import TextDecoder
from vltrain.model.layers import Block
from vltrain.model.mim import MIMDecoder, mim_forward
from vltrain.model.text import TextEmbedding, TextEncoder, text_rope
from vltrain.model.vision import VisionEncoder
from vltrain.model_config import ModelConfig

Carry = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # feats, clean, masked, dec
OBJECTIVES = ("itc", "mlm", "caption", "mim")
# Which objectives each module serves (a parameter name's longest matching prefix): the forward paths of
# `_run_model` and mim_forward. tests/test_idle_heads.py checks it against autograd.
OBJECTIVE_MODULES: dict[str, tuple[str, ...]] = {
    "vision.": OBJECTIVES,
    "embed.": ("itc", "mlm", "caption"),
    "text.blocks.": ("itc", "mlm"),
    "text.unimodal_norm.": ("itc",),
    "image_proj.": ("itc",),
    "text_proj.": ("itc",),
    "logit_scale": ("itc",),
    "text.fusion.": ("mlm",),
    "text.norm.": ("mlm",),
    "decoder.": ("caption",),
    "mim_decoder.": ("mim",),
}
_M = TypeVar("_M")


class LossTerms(NamedTuple):
    """The three losses of the heads (float32 scalars, with grad)."""

    itc: torch.Tensor
    mlm: torch.Tensor
    caption: torch.Tensor


def _present(module: _M | None, name: str) -> _M:
    if module is None:
        raise ValueError(f"VLModel.{name}: not in this pipeline stage's copy of the model")
    return module


class VLModel(nn.Module):
    # None in the pipeline stages that do not run them (vltrain.parallel.pipeline): the token embedding
    # (first and last stage: the tied head), the heads (last stage)
    embed: TextEmbedding | None
    image_proj: nn.Linear | None
    text_proj: nn.Linear | None
    logit_scale: nn.Parameter | None
    # True on a pipeline stage's copy: torch's pipeline runtime calls it in the stage's form (`forward`)
    pipeline_stage = False

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
        self.embed = embed = TextEmbedding(cfg)
        self.text = TextEncoder(cfg)
        self.decoder = TextDecoder(cfg)
        self.image_proj = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        # Shape [1], not a 0-dim scalar: DeepSpeed 0.19's _broadcast_model views every parameter as
        # uint8, which a 0-dim tensor cannot do ("self.dim() cannot be 0 to view Float as Byte").
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / self.loss_cfg.init_temperature)]))
        self.apply(self._init)
        for p in (self.vision.cls, self.vision.pos, embed.pos):
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
            bias = getattr(m, "bias", None)
            if bias is not None:
                nn.init.zeros_(bias)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every transformer block in backward (trades ~1/3 more compute for memory)."""
        for m in self.modules():
            if isinstance(m, Block):
                m.checkpointing = enabled

    @property
    def embeds(self) -> bool:
        """Whether this copy embeds the inputs: the model, a pipeline's first stage."""
        return self.vision.patch_embed is not None

    @property
    def holds_heads(self) -> bool:
        """Whether this copy computes the losses: the model, a pipeline's last stage."""
        return self.logit_scale is not None

    # ------------------------------------------------------------------ encoders
    def _tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return _present(self.embed, "embed")(ids)  # [B, T, Dt]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return _present(self.embed, "embed").logits(h)  # [B, T, V], the tied matrix

    def _text_embedding(self, h, attention_mask):
        h = _present(self.text.unimodal_norm, "text.unimodal_norm")(h)  # [B, T, Dt]
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # [B, T, 1]
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)  # [B, Dt]
        return F.normalize(_present(self.text_proj, "text_proj")(pooled), dim=-1)  # [B, E]

    def _image_embedding(self, feats):
        return F.normalize(_present(self.image_proj, "image_proj")(feats[:, 0]), dim=-1)  # [B, E] from the cls token

    def _itc(self, feats: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        image, text = self._image_embedding(feats), self._text_embedding(clean, mask)
        return losses.itc_loss(image, text, _present(self.logit_scale, "logit_scale"))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> [B, E], L2-normalised."""
        return self._image_embedding(self.vision(images))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] -> [B, E], L2-normalised."""
        x = self._tokens(input_ids)
        h = self.text.unimodal(x, attention_mask, text_rope(self.cfg, input_ids.shape[1], input_ids.device))
        return self._text_embedding(h, attention_mask)

    # ------------------------------------------------------------------ training
    def mlm_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, draws: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MLM's masked ids and labels [B, T] (draws [3, B, T]: the loader's per-sample random numbers;
        None: torch's RNG), with the mask rate the loss config has now."""
        return losses.mask_tokens(
            input_ids,
            attention_mask,
            mask_prob=self.loss_cfg.mask_prob,
            mask_id=self.mask_id,
            vocab_size=self.cfg.vocab_size,
            special_ids=(self.pad_id, self.bos_id, self.eos_id, self.mask_id),
            draws=draws,
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """One forward (`_run`), in two call forms:

        - the model: model(images [B, 3, S, S], input_ids [B, T], attention_mask [B, T], mlm_draws=None)
          -> {"loss": weighted sum (with grad), "itc", "mlm", "caption", "mim": detached scalars}
          (`training_losses`);
        - a pipeline stage (a pruned copy, `pipeline_stage`), as torch's pipeline runtime calls it:
          stage(*x, input_ids=, attention_mask=, masked=, labels=) (`stage_forward`).
        """
        if self.pipeline_stage:
            return self.stage_forward(*args, **kwargs)
        return self.training_losses(*args, **kwargs)

    def training_losses(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mlm_draws: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The model's training forward (see `forward`). mlm_draws [3, B, T]: MLM's random numbers (the
        loader's, per sample); None: torch's RNG.

        "mim" is always there (0 when its weight is 0: nothing of it is computed then), so that the
        loop's per-step sums keep one shape across stages."""
        lc = self.loss_cfg
        attention_mask = attention_mask.bool()
        masked, labels = self.mlm_inputs(input_ids, attention_mask, mlm_draws)  # no other random numbers before
        terms = self._run((images,), input_ids, attention_mask, masked, labels)
        if not isinstance(terms, LossTerms):
            raise ValueError("VLModel.training_losses: this copy has no heads (a pipeline stage: stage_forward)")
        itc, mlm, cap = terms
        loss = losses.weighted(lc, itc, mlm, cap)
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

    def stage_forward(
        self,
        *x: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        masked: torch.Tensor,
        labels: torch.Tensor,
    ) -> Carry | torch.Tensor:
        """A pipeline stage (see `forward`): x = (images,) on the first stage, else the previous stage's
        carry; masked, labels: MLM's inputs [B, T], drawn before the pipeline (pipeline_step).
        -> the carry, or on the last stage the losses [1, 3] = (itc, mlm, caption) for the schedule's loss_fn."""
        out = self._run(x, input_ids, attention_mask, masked, labels)
        if isinstance(out, LossTerms):
            return torch.stack([out.itc[None], out.mlm[None], out.caption[None]], dim=1)  # not a view (FSDP warns)
        return out

    def _run(
        self,
        x: tuple[torch.Tensor, ...],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        masked: torch.Tensor,
        labels: torch.Tensor,
    ) -> Carry | LossTerms:
        """The forward of whatever this copy holds (the module doc). x: (images,) where the stem is, else
        the previous stage's carry; ids, mask, masked ids, MLM labels [B, T]. -> the carry, or the
        LossTerms where the heads are.

        Each stream goes through its blocks in turn (image, clean text, masked text and fusion, decoder)
        and, where the heads are, its loss follows it; but a last stage (heads without the embeddings)
        computes ITC after the other two. That order is the order in which autograd sums the gradient of
        the image features (its ITC, fusion and decoder uses), as the model and the pipeline stages did
        when the trajectories of tests/test_golden_trajectories.py were recorded: changing it changes
        the last bits of training.
        """
        mask = attention_mask.bool()
        rope = text_rope(self.cfg, input_ids.shape[1], input_ids.device)
        first, heads = self.embeds, self.holds_heads
        if first and heads:
            return self._run_model(x[0], input_ids, mask, masked, labels, rope)
        feats = self.vision(x[0])  # [B, 1+N, Dv]
        clean = self.text.unimodal(self._tokens(input_ids) if first else x[1], mask, rope)  # [B, T, Dt]
        hm = self.text.unimodal(self._tokens(masked) if first else x[2], mask, rope)
        hm = self.text.fuse(hm, feats, mask, rope)  # [B, T, Dt]
        out: dict[str, torch.Tensor] = {}
        if heads:
            out["mlm"] = losses.mlm_loss(self._logits(hm), labels)
        dec = self.decoder(self._tokens(input_ids) if first else x[3], feats, rope)  # [B, T, Dt]
        if not heads:
            return feats, clean, hm, dec
        out["caption"] = losses.caption_loss(self._logits(dec), input_ids, mask)
        out["itc"] = self._itc(feats, clean, mask)
        return LossTerms(out["itc"], out["mlm"], out["caption"])

    def _run_model(self, images, input_ids, mask, masked, labels, rope) -> LossTerms:
        """The whole model's forward (`_run` where one copy holds stem and heads): only the objectives
        weighted > 0 run (`running`); a skipped one is a zero term, and its own modules see no forward
        and get no gradient (`idle_parameters`). The clean (ITC) and masked (MLM) text go through the
        text blocks as one batch: each block runs once per forward, so FSDP gathers and reduce-scatters
        it once (run twice, FSDP2 reduces a block twice in a step's last micro step, and under
        zero_stage 3 gathers and reduces it twice in every micro step), and its GEMMs are twice as tall."""
        runs = self.running(self.loss_cfg)
        zero = torch.zeros((), dtype=torch.float32, device=images.device)
        itc = mlm = cap = zero
        if not runs & {"itc", "mlm", "caption"}:
            return LossTerms(itc, mlm, cap)  # MIM alone (training_losses)
        feats = self.vision(images)  # [B, 1+N, Dv]
        text_runs = [o for o in ("itc", "mlm") if o in runs]
        parts: dict[str, torch.Tensor] = {}
        if text_runs:  # clean and masked text through the text blocks in one call: one forward per block
            ids = torch.cat([input_ids if o == "itc" else masked for o in text_runs])
            text = self.text.unimodal(self._tokens(ids), mask.repeat(len(text_runs), 1), rope)
            parts = dict(zip(text_runs, text.split(input_ids.shape[0]), strict=True))
        if "itc" in parts:
            itc = self._itc(feats, parts["itc"], mask)  # [B, T, Dt] clean text
        if "mlm" in parts:
            hm = self.text.fuse(parts["mlm"], feats, mask, rope)  # [B, T, Dt]
            mlm = losses.mlm_loss(self._logits(hm), labels)
        if "caption" in runs:
            dec = self.decoder(self._tokens(input_ids), feats, rope)  # [B, T, Dt]
            cap = losses.caption_loss(self._logits(dec), input_ids, mask)
        return LossTerms(itc, mlm, cap)

    @staticmethod
    def running(loss: LossConfig) -> set[str]:
        """The objectives that `loss` weights above 0: the ones the forward runs."""
        return {o for o in OBJECTIVES if getattr(loss, o) > 0}

    def parameter_objectives(self) -> dict[str, tuple[str, ...]]:
        """Each parameter's name -> the objectives whose loss its gradient comes from (`OBJECTIVE_MODULES`)."""
        out = {}
        for name, _ in self.named_parameters():
            prefix = max((p for p in OBJECTIVE_MODULES if name.startswith(p)), key=len, default=None)
            if prefix is None:
                raise ValueError(f"VLModel.parameter_objectives: {name} is in no entry of OBJECTIVE_MODULES")
            out[name] = OBJECTIVE_MODULES[prefix]
        return out

    def idle_parameters(self, loss: LossConfig) -> set[str]:
        """Names of the parameters that get no gradient under the weights of `loss` (every objective they
        serve weighted 0): the forward does not run them, and AdamW must not decay them
        (vltrain.engines.common.param_groups)."""
        runs = self.running(loss)
        return {name for name, objs in self.parameter_objectives().items() if not runs.intersection(objs)}

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
            h = self.decoder(self._tokens(seq), feats, text_rope(self.cfg, seq.shape[1], dev))
            logits = self._logits(h[:, -1]).float()  # [B, V]
            logits[:, banned] = float("-inf")
            nxt = logits.argmax(-1)
            out[:, t] = torch.where(done, self.pad_id, nxt)
            done |= nxt == self.eos_id
            if done.all():
                break
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        return out
