"""ChatSpotModel: vision encoder -> projector -> LLaMA LLM, with optional region embeddings.

Sequence layout (one sample): the prompt's `<image>` is expanded to N consecutive `<image>` ids whose
embeddings are replaced by the N projected image embeddings; each `<region>` id (after a `</box>`) is
replaced by that region's embedding. Everything else is ordinary token embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from chatspot_edge.model.config import ChatSpotConfig
from chatspot_edge.model.position import GridPosition
from chatspot_edge.model.region import RegionEncoder, reference_index
from chatspot_edge.model.vision import VisionEncoder

IGNORE_INDEX = -100
# region-text alignment losses (`ChatSpotModel.region_alignment_loss`): "absolute" (each region's answer tokens
# under the head's softmax over the vocabulary), "contrastive" (the softmax over the batch's regions, per answer
# token) or "both" (their sum)
REGION_ALIGN_KINDS = ("absolute", "contrastive", "both")


class Projector(nn.Module):
    """LLaVA-1.5's projector (`linear_1`, GELU, `linear_2`), or a single linear layer."""

    def __init__(self, c_in: int, d: int, kind: str = "mlp2x_gelu", bias: bool = True):
        super().__init__()
        self.kind = kind
        self.linear_1 = nn.Linear(c_in, d, bias=bias)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(d, d, bias=bias)
        elif kind != "linear":
            raise ValueError(f"unknown projector {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        return self.linear_2(self.act(x)) if self.kind == "mlp2x_gelu" else x


@dataclass
class ChatSpotOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # [B, T, V] (full forward) or [M, V] (answer positions only)
    n_targets: int = 0


class ChatSpotModel(nn.Module):
    def __init__(self, config: ChatSpotConfig, llm: LlamaForCausalLM | None = None, pretrained_vision: bool = False):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config.vision, pretrained=pretrained_vision)
        self.projector = Projector(config.vision.channels, config.hidden_size, config.projector, config.projector_bias)
        self.position = GridPosition(config.hidden_size, config.vision.grid) if config.position_2d else None
        self.region = (
            RegionEncoder(config.hidden_size, config.vision.grid, config.region_min_size, crop=config.region_crop,
                          crop_size=config.region_crop_size, geometry=config.region_geometry,
                          relative=config.region_relative, relation_words=len(config.region_relation_words),
                          relation_groups=config.region_relation_groups, relation_gain=config.region_relation_gain)
            if config.region_token else None
        )
        self.llm = llm if llm is not None else LlamaForCausalLM(LlamaConfig(**config.text))

    # -- pieces the exporter traces -------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, H, W, 3]` -> image embeddings `[B, N, d]` (vision + projector + 2D position)."""
        return self.project(self.vision(pixels))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features `[B, N, C]` -> image embeddings `[B, N, d]`: the projector, plus each token's cell
        position when `config.position_2d`."""
        x = self.projector(features)
        return x + self.position().to(x.dtype) if self.position is not None else x

    def encode_regions(self, image_embeds: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor,
                       pixels: torch.Tensor | None = None, crops: torch.Tensor | None = None,
                       box_segment: torch.Tensor | None = None) -> torch.Tensor:
        """Region embeddings `[R, d]` for normalized boxes `[R, 4]` of images `batch_index` `[R]`
        (image_embeds `[B, N, d]`). The appearance view reads `crops` uint8 `[R, h, w, 4]`
        (`model.preprocess.region_crops` of the original images; crop "original") or `pixels` uint8
        `[B, H, W, 3]` (the resized images; crop "resized"). A question is the regions of one image
        (and one turn, `box_segment` `[R]`, for samples of several questions); each region is placed relative
        to its question's first region (`model.region.reference_index`)."""
        assert self.region is not None
        ref = reference_index(batch_index, box_segment) if self.region.relative is not None else None
        if self.region.crop == "original":
            if crops is None:
                raise ValueError("this model reads region crops of the original image: pass crops "
                                 "(model.preprocess.region_crops)")
            return self.region(image_embeds[batch_index], boxes, crops, ref)
        return self.region(image_embeds[batch_index], boxes, pixels[batch_index], ref)

    # -- sequence assembly ----------------------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        box_batch: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        crops: torch.Tensor | None = None,
        return_regions: bool = False,
        box_segment: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings `[B, T, d]` with image and region embeddings scattered into their placeholders
        (and, with `return_regions`, the region embeddings `[R, d]` or None).

        image_embeds: `[B', N, d]` for the B' samples that hold `<image>` ids (in batch order);
        boxes / box_batch: `[R, 4]` / `[R]` for the `<region>` ids, in (batch, position) order;
        pixels: the uint8 images `[B', H, W, 3]`; crops: `[R, h, w, 4]` region crops (see `encode_regions`);
        box_segment: `[R]` each region's turn, for samples of several questions."""
        cfg = self.config
        emb = self.llm.get_input_embeddings()(input_ids)
        if image_embeds is not None:
            mask = (input_ids == cfg.image_token_id).unsqueeze(-1)
            if int(mask.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
                raise ValueError(
                    f"{int(mask.sum())} <image> positions for {image_embeds.shape[0]}x{image_embeds.shape[1]} embeddings"
                )
            emb = emb.masked_scatter(mask, image_embeds.to(emb.dtype))
        region = None
        if self.region is not None and boxes is not None and boxes.shape[0] > 0:
            rmask = (input_ids == cfg.region_token_id).unsqueeze(-1)
            if int(rmask.sum()) != boxes.shape[0]:
                raise ValueError(f"{int(rmask.sum())} <region> positions for {boxes.shape[0]} regions")
            region = self.encode_regions(image_embeds, boxes, box_batch, pixels, crops, box_segment)
            emb = emb.masked_scatter(rmask, region.to(emb.dtype))
        return (emb, region) if return_regions else emb

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        box_batch: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        per_sample: bool = False,
        region_align: float = 0.0,
        crops: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        box_segment: torch.Tensor | None = None,
        region_align_kind: str = "absolute",
    ) -> ChatSpotOutput:
        """With `labels`: the loss over answer tokens only, logits computed at those positions alone (the
        49k-way softmax over prompt positions is most of the cost otherwise), averaged over tokens or, with
        `per_sample`, first within each sample (within each turn when `segments` `[B, T]` numbers the
        independent turns of a sample, see `Processor.encode_turns`; then `attention_mask` is the 4D
        `[B, 1, T, T]` boolean mask that keeps turns apart and `position_ids` `[B, T]` restart every turn).
        `region_align` > 0 adds the region-text alignment loss of `region_align_kind` (see
        `region_alignment_loss`) with that weight; `box_segment` `[R]` is each region's turn. Without labels: full
        logits."""
        if image_embeds is None and pixels is not None:
            image_embeds = self.encode_image(pixels)
        emb, region = self.embed(input_ids, image_embeds, boxes, box_batch, pixels, crops, return_regions=True,
                                 box_segment=box_segment)
        # get_decoder(): the LlamaModel, also through a peft (LoRA) wrapper, where `.model` is the LlamaForCausalLM
        hidden = self.llm.get_decoder()(inputs_embeds=emb, attention_mask=attention_mask,
                                        position_ids=position_ids).last_hidden_state
        if labels is None:
            return ChatSpotOutput(loss=None, logits=self.llm.lm_head(hidden))
        logits, targets, select = self.answer_logits(hidden, labels)
        token_loss = F.cross_entropy(logits.float(), targets[select], reduction="none")
        if per_sample:  # every sample (turn) weighs the same, however long its answer (a box is ~25 tokens)
            B = targets.shape[0]
            unit = torch.arange(B, device=targets.device)[:, None].expand_as(targets)
            n_units = B
            if segments is not None:
                n_seg = int(segments.max()) + 1
                unit = unit * n_seg + segments[:, 1:]
                n_units = B * n_seg
            unit = unit[select]
            counts = torch.bincount(unit, minlength=n_units)
            per = torch.zeros(n_units, device=targets.device).index_add_(0, unit, token_loss) / counts.clamp(min=1)
            loss = per[counts > 0].mean()
        else:
            loss = token_loss.mean()
        if region_align > 0 and region is not None:
            seg = None if segments is None else segments[:, 1:]
            if region_align_kind not in REGION_ALIGN_KINDS:
                raise ValueError(f"unknown region alignment {region_align_kind!r} (one of {REGION_ALIGN_KINDS})")
            for kind in ("absolute", "contrastive"):
                if region_align_kind in (kind, "both"):
                    loss = loss + region_align * self.region_alignment_loss(
                        region, box_batch, targets, seg, box_segment, contrastive=kind == "contrastive")
        return ChatSpotOutput(loss=loss, logits=logits, n_targets=int(select.sum()))

    def answer_logits(self, hidden: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits `[N, V]` at the N positions that predict an answer token, next-token targets `[B, T-1]`,
        their mask `[B, T-1]`) from the LLM's last hidden states `[B, T, d]` of a teacher-forced pass: the head
        runs at those positions only."""
        targets = labels[:, 1:]
        select = targets != IGNORE_INDEX
        return self.llm.lm_head(hidden[:, :-1][select]), targets, select

    def region_alignment_loss(self, region: torch.Tensor, box_batch: torch.Tensor, targets: torch.Tensor,
                              target_segments: torch.Tensor | None = None,
                              box_segment: torch.Tensor | None = None, contrastive: bool = False) -> torch.Tensor:
        """Region-text alignment (ChatSpot's stage-1 alignment, for regions): each region embedding `[R, d]`,
        read out through the LLM's final norm and (tied) output head, should predict the tokens of its
        sample's answer (of its own turn, given `target_segments` `[B, T-1]` and `box_segment` `[R]`) as a
        bag of words. It trains the region encoder directly and puts its output where the LLM reads words,
        which breaks the start-up plateau where the LLM ignores a still-random region embedding.

        `contrastive`: instead of the softmax over the vocabulary, each answer token of region r is scored by the
        softmax over the batch's regions of their logits for that token (InfoNCE, several positives where regions
        share the token): no region can win a token every answer has ("a", "It", "is"; at best all tie, log R),
        so the loss trains what tells this region from the others, not the common answer words the absolute
        loss rewards. With one region in the batch it is 0. The contrast set is the regions of this forward pass:
        a micro-batch's under `--grad-accum`, a rank's under DDP (so those are not exactly one large batch).
        targets: `[B, T-1]` next-token labels (IGNORE_INDEX outside answers)."""
        logits = self.llm.lm_head(self.llm.get_decoder().norm(region)).float()  # [R, V]
        answer = targets[box_batch]  # [R, T-1]
        keep = (answer != IGNORE_INDEX) & (answer != self.config.eos_token_id)
        if target_segments is not None and box_segment is not None:
            keep &= target_segments[box_batch] == box_segment[:, None]
        if contrastive:
            owner, pos = keep.nonzero(as_tuple=True)  # [M]: region and position of each kept answer token
            logq = torch.log_softmax(logits[:, answer[owner, pos]], dim=0)  # [R, M]: which region says the token
            picked = torch.zeros_like(keep, dtype=logq.dtype)
            picked[owner, pos] = logq[owner, torch.arange(owner.numel(), device=logq.device)]
        else:
            picked = torch.gather(torch.log_softmax(logits, dim=-1), 1, answer.clamp(min=0)) * keep
        return -(picked.sum(1) / keep.sum(1).clamp(min=1)).mean()

    # -- greedy generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: list[list[int]],
        pixels: torch.Tensor,
        boxes: list[list[tuple[float, float, float, float]]],
        max_new_tokens: int = 32,
        stop_ids: tuple[int, ...] = (),
        crops: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Batched greedy decoding. input_ids: B prompts (with N `<image>` ids each, `<region>` per box);
        pixels: uint8 `[B, H, W, 3]`; boxes: per prompt, normalized boxes in `<region>` order; crops: the
        regions' crops `[R, h, w, 4]` in the same order (models with crop "original").
        Prompts are left-padded; returns the new token ids of each, without the stop id."""
        device = pixels.device
        B = len(input_ids)
        T = max(len(x) for x in input_ids)
        pad = self.config.pad_token_id
        ids = torch.full((B, T), pad, dtype=torch.long, device=device)
        mask = torch.zeros((B, T), dtype=torch.long, device=device)
        for i, x in enumerate(input_ids):
            ids[i, T - len(x):] = torch.tensor(x, device=device)
            mask[i, T - len(x):] = 1
        flat = [b for bs in boxes for b in bs]
        box_t = torch.tensor(flat, dtype=torch.float32, device=device).reshape(-1, 4)
        box_b = torch.tensor([i for i, bs in enumerate(boxes) for _ in bs], dtype=torch.long, device=device)
        image_embeds = self.encode_image(pixels)
        emb = self.embed(ids, image_embeds, box_t, box_b, pixels, crops)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=True)
        past = out.past_key_values
        next_id = out.logits[:, -1].argmax(-1)
        results: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stops = torch.tensor(list(stop_ids) or [-1], device=device)
        for step in range(max_new_tokens):
            is_stop = torch.isin(next_id, stops)
            for i in range(B):
                if not done[i] and not is_stop[i]:
                    results[i].append(int(next_id[i]))
            done |= is_stop
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.llm(input_ids=next_id[:, None], attention_mask=mask, position_ids=pos,
                           past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_id = out.logits[:, -1].argmax(-1)
        return results

    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        emb = self.llm.get_input_embeddings().weight.numel()
        return {
            "vision": count(self.vision),
            "projector": count(self.projector) + count(self.position),
            "region": count(self.region),
            "llm": count(self.llm),
            "llm_embeddings": emb,
            "total": count(self),
        }
