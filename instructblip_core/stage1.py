"""BLIP-2 stage 1: train the Q-Former and its queries on a frozen image encoder's outputs.

Reference: BLIP-2 (Li et al. 2023), section 3.2 "Bootstrap vision-language representation
learning from a frozen image encoder", and BLIP (Li et al. 2022) for the ITM hard negatives and
the CapFilt filter. Three objectives share one Q-Former and differ only in the self-attention
mask (see masks.py):

  1. ITC, image-text contrastive: the Q query outputs and the text's [CLS] output are projected
     to `embed_dim` and L2-normalised; an image-text similarity is the MAX over the Q query
     similarities; in-batch negatives, gathered from every process; symmetric cross-entropy
     with a learnable temperature (init 0.07, kept in [0.001, 0.5]) and label smoothing 0.1
     (BLIP-2's choice, `label_smoothing=`).
  2. ITM, image-text matching: for each image one negative text and for each text one negative
     image, drawn from the softmax of the ITC similarities with the positives excluded (hard
     negatives); queries and text attend to each other (bidirectional mask); a linear head on
     the mean of the Q query outputs; 2-way cross-entropy over B positives and 2B negatives.
     Captions may bring their own negatives too (`negative_input_ids`: a text known not to
     match the image, such as its caption with one object's colour swapped): each adds an
     (image, negative text) row. ITC picks in-batch negatives by overall similarity; a given
     negative can differ from the truth in one binding only (which object has which colour),
     so that matching cannot succeed without checking it.
  3. ITG, image-grounded text generation: the text, with [DEC] replacing [CLS] as the BOS, is
     decoded under the multimodal causal mask; next-token loss on the text (label smoothing
     0.1, as BLIP-2), padding ignored.

Total loss = ITC + ITM + ITG. The module owns exactly what stage 1 trains: `query_tokens`,
`qformer` (with word/position embeddings and the text feed-forward), `vision_proj`,
`text_proj`, `itm_head`, `lm_head` and `temp`. The frozen image encoder stays outside (its
outputs `image_embeds` come in, so the trainer may cache them). `export_to(model)` moves the
trained Q-Former and queries into an InstructBLIP / BLIP-2 model for stage 2.

Text inputs are Q-Former BERT tokens starting with [CLS] and right-padded; tokenising happens
in the data layer, never here.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .activations import get_activation
from .config import QFormerConfig
from .losses import lm_loss
from .masks import bidirectional_mask, multimodal_causal_mask, unimodal_mask
from .model import IGNORE_INDEX, InstructBlipForConditionalGeneration
from .qformer import QFormerModel

EMBED_DIM = 256  # ITC projection width in BLIP-2
TEMP_INIT = 0.07
TEMP_MIN, TEMP_MAX = 0.001, 0.5
INIT_STD = 0.02  # BERT's initializer_range
LABEL_SMOOTHING = 0.1  # BLIP-2 smooths both the ITC and the ITG targets

# Q-Former tensors that only the text side uses; a BLIP-2 model (no instruction input) has no
# place for them, so exporting there leaves them behind.
_TEXT_ONLY_KEY = re.compile(r"^qformer\.(embeddings\.(word|position)_embeddings\.|encoder\.layer\.\d+\.(intermediate|output)\.)")


@dataclass
class Stage1Output:
    loss: torch.Tensor  # ITC + ITM + ITG
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_itg: torch.Tensor
    sim_i2t: torch.Tensor | None = None  # (B, B_all) ITC logits (similarity / temperature), detached
    negative_text_index: torch.Tensor | None = None  # (B,) ITM negative text of each image, index into B_all
    negative_image_index: torch.Tensor | None = None  # (B,) ITM negative image of each text, index into B_all


@dataclass
class ContrastiveResult:
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # (B, B_all) local images vs all texts, divided by the temperature
    sim_t2i: torch.Tensor  # (B, B_all) local texts vs all images, divided by the temperature
    positives: torch.Tensor  # (B, B_all) bool: pairs that count as matching
    offset: int  # index of this process' first pair in the gathered batch


# ----------------------------------------------------------------------------- processes


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _pad_to(x: torch.Tensor, shape: list[int], value) -> torch.Tensor:
    widths = []
    for d in reversed(range(x.dim())):  # F.pad lists the last dimension first
        widths += [0, shape[d] - x.shape[d]]
    return F.pad(x, widths, value=value) if any(widths) else x


def gather_keep_local_grad(x: torch.Tensor, pad_value=0) -> tuple[torch.Tensor, int]:
    """Concatenate `x` (B_r, ...) of every process along dim 0 -> ((sum_r B_r, ...), offset).

    `offset` is where this process' rows start. Only this process' own rows keep their autograd
    graph (the others arrive as plain values), which is what BLIP-2 does for the in-batch
    negatives: every process backpropagates through its own features. Processes may hold
    different batch sizes and, in the other dimensions, different lengths (text): those are
    padded with `pad_value` to the longest. Without torch.distributed initialised this is
    the identity with offset 0.
    """
    world, rank = _world()
    if world == 1:
        return x, 0
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes = [s.tolist() for s in shapes]
    max_shape = [max(s[d] for s in shapes) for d in range(x.dim())]
    padded = _pad_to(x, max_shape, pad_value)
    parts = [torch.empty(max_shape, dtype=x.dtype, device=x.device) for _ in range(world)]
    dist.all_gather(parts, padded.detach().contiguous())
    parts[rank] = padded  # the local rows, still on the graph
    rows = [s[0] for s in shapes]
    return torch.cat([p[:n] for p, n in zip(parts, rows)]), sum(rows[:rank])


# ----------------------------------------------------------------------------- pieces


def sample_hard_negatives(sim: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One negative per row, drawn with probability softmax(sim) over the non-positive columns.

    sim (B, B_all) similarity logits, positives (B, B_all) bool -> (B,) column indices. The
    positives are masked BEFORE the softmax: masking after it (BLIP-2's code) can leave a row
    with all-zero weights once the temperature is small, which multinomial rejects.
    """
    if sim.shape != positives.shape:
        raise ValueError(f"sim {tuple(sim.shape)} and positives {tuple(positives.shape)} must have the same shape")
    lonely = (~positives).sum(dim=1).eq(0).nonzero().flatten().tolist()
    if lonely:
        raise ValueError(
            f"rows {lonely} have no negative to sample: ITM needs at least two different pairs in the "
            f"(gathered) batch"
        )
    weights = sim.detach().float().masked_fill(positives, float("-inf")).softmax(dim=-1)  # (B, B_all)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


class QFormerLMHead(nn.Module):
    """ITG's language-model head: BERT's prediction head, dense -> act -> LayerNorm -> vocabulary.

    The vocabulary projection is tied to the Q-Former's word embeddings (as in BERT and BLIP-2).
    The tie is made by reading that weight in forward instead of holding a second Parameter on
    the same tensor: the state dict then has no shared tensors, which safetensors refuses to
    save. Only the output bias is this head's own.
    """

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = get_activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, C), word_embeddings (V, C) -> logits (B, T, V)."""
        return F.linear(self.LayerNorm(self.act(self.dense(hidden))), word_embeddings, self.bias)


@contextmanager
def _evaluating(module: nn.Module):
    """Eval mode (no dropout) for the duration, then whatever mode the module was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# ----------------------------------------------------------------------------- the model


def default_init_std(hidden_size: int) -> float:
    """BERT's 0.02 at BERT's width; 1/sqrt(width) for narrower Q-Formers.

    Measured on the small model (width 128, 8 queries, lr 1e-3): with 0.02, ITC stayed at
    chance (ln 32 = 3.47 for a batch of 32) and ITM at its no-skill value for 50+ steps.
    """
    return INIT_STD if hidden_size >= 768 else hidden_size**-0.5


class QFormerPretrainer(nn.Module):
    """BLIP-2 stage-1 Q-Former with its ITC / ITM / ITG heads.

    config: the Q-Former's config (its text side is always built: stage 1 reads text);
    encoder_hidden_size must equal the width of the image tokens. bos_token_id: the id of
    "[DEC]" in the Q-Former tokenizer (its `bos_token_id`), the BOS of ITG. init_std: std of the
    random weights; default `default_init_std(hidden_size)`.
    """

    def __init__(
        self,
        config: QFormerConfig,
        *,
        bos_token_id: int,
        num_query_tokens: int = 32,
        embed_dim: int = EMBED_DIM,
        label_smoothing: float = LABEL_SMOOTHING,
        init_std: float | None = None,
    ):
        super().__init__()
        if not 0 <= bos_token_id < config.vocab_size:
            raise ValueError(
                f"bos_token_id {bos_token_id} ([DEC]) is outside the Q-Former vocabulary of {config.vocab_size}; "
                f"add [DEC] to the tokenizer and set vocab_size to len(tokenizer)"
            )
        config = dataclasses.replace(config, use_text_input=True)
        self.config = config
        self.bos_token_id = bos_token_id
        self.label_smoothing = label_smoothing
        C = config.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, C))
        self.qformer = QFormerModel(config)
        self.vision_proj = nn.Linear(C, embed_dim)
        self.text_proj = nn.Linear(C, embed_dim)
        self.itm_head = nn.Linear(C, 2)
        self.lm_head = QFormerLMHead(config)
        self.temp = nn.Parameter(torch.tensor(TEMP_INIT))
        self.reset_parameters(default_init_std(C) if init_std is None else init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float = INIT_STD) -> None:
        """BERT initialisation (N(0, std) weights and queries, zero biases, unit LayerNorm)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        self.query_tokens.normal_(0.0, std)
        self.lm_head.bias.zero_()
        self.temp.fill_(TEMP_INIT)

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    def gradient_checkpointing_enable(self) -> None:
        self.qformer.encoder.gradient_checkpointing = True

    def _queries(self, batch_size: int) -> torch.Tensor:
        return self.query_tokens.expand(batch_size, -1, -1)  # (B, Q, C)

    def _check_inputs(self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        if image_embeds.dim() != 3 or image_embeds.shape[-1] != self.config.encoder_hidden_size:
            raise ValueError(
                f"image_embeds must be (B, N, {self.config.encoder_hidden_size}), got {tuple(image_embeds.shape)}"
            )
        if ids.dim() != 2 or ids.shape != mask.shape or ids.shape[0] != image_embeds.shape[0]:
            raise ValueError(
                f"text ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must both be (B, T) with the images' "
                f"B = {image_embeds.shape[0]}"
            )
        if not mask[:, 0].all():
            raise ValueError("every text must start with [CLS] at position 0 and be right-padded")

    # ---- features (also for retrieval) -------------------------------------------------------
    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, N, Cv) -> normalised query features (B, Q, D): the queries alone read the image."""
        hidden, _ = self.qformer(self._queries(image_embeds.shape[0]), image_embeds)  # (B, Q, C)
        return F.normalize(self.vision_proj(hidden), dim=-1)

    def text_features(self, text_input_ids: torch.Tensor, text_attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> normalised [CLS] feature (B, D) of the text alone."""
        hidden, _ = self.qformer(None, None, text_input_ids, text_attention_mask)  # (B, T, C)
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    @staticmethod
    def similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """(B_i, Q, D) x (B_t, D) -> (B_i, B_t): the best-matching query's cosine similarity."""
        return torch.einsum("iqd,td->itq", image_feats, text_feats).amax(dim=-1)

    # ---- 1. ITC ----------------------------------------------------------------------------
    def contrastive(
        self, image_feats: torch.Tensor, text_feat: torch.Tensor, pair_ids: torch.Tensor | None = None
    ) -> ContrastiveResult:
        """image_feats (B, Q, D), text_feat (B, D), pair_ids (B,) optional -> ITC loss and logits.

        Pairs with the same `pair_ids` (e.g. two captions of one image) all count as positives
        of each other; by default every pair is its own.
        """
        image_feats_all, offset = gather_keep_local_grad(image_feats)  # (B_all, Q, D)
        text_feat_all, _ = gather_keep_local_grad(text_feat)  # (B_all, D)
        B = image_feats.shape[0]
        if pair_ids is None:
            pair_ids = torch.arange(B, device=image_feats.device) + offset
        pair_ids_all, _ = gather_keep_local_grad(pair_ids)  # (B_all,)
        positives = pair_ids[:, None] == pair_ids_all[None, :]  # (B, B_all)
        temp = self.temp
        sim_i2t = self.similarity(image_feats, text_feat_all) / temp  # (B, B_all)
        sim_t2i = self.similarity(image_feats_all, text_feat).T / temp  # (B, B_all)
        targets = positives.float() / positives.sum(dim=1, keepdim=True)  # rows sum to 1
        loss = (
            F.cross_entropy(sim_i2t.float(), targets, label_smoothing=self.label_smoothing)
            + F.cross_entropy(sim_t2i.float(), targets, label_smoothing=self.label_smoothing)
        ) / 2
        return ContrastiveResult(loss, sim_i2t, sim_t2i, positives, offset)

    # ---- 2. ITM ----------------------------------------------------------------------------
    def itm_logits(self, image_embeds: torch.Tensor, text_input_ids: torch.Tensor, text_attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, N, Cv) + text (B, T) -> (B, 2) match logits (index 1 = "matches")."""
        Q = self.num_query_tokens
        mask = bidirectional_mask(Q, text_attention_mask)  # (B, Q+T, Q+T)
        hidden, _ = self.qformer(self._queries(image_embeds.shape[0]), image_embeds, text_input_ids, mask)
        return self.itm_head(hidden[:, :Q].mean(dim=1))  # (B, 2)

    def matching(
        self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, itc: ContrastiveResult,
        given_negatives: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITM loss over B positives + 2B hard negatives (+ the given negatives); also the sampled negatives' indices.

        given_negatives: (ids (B, T'), mask (B, T'), present (B,) bool), texts that do not match the local images.
        """
        B = ids.shape[0]
        images_all, _ = gather_keep_local_grad(image_embeds)  # (B_all, N, Cv)
        ids_all, _ = gather_keep_local_grad(ids, pad_value=self.config.pad_token_id)  # (B_all, T_max)
        mask_all, _ = gather_keep_local_grad(mask, pad_value=0)  # (B_all, T_max)
        negative_text = sample_hard_negatives(itc.sim_i2t, itc.positives)  # (B,) for each image
        negative_image = sample_hard_negatives(itc.sim_t2i, itc.positives)  # (B,) for each text
        own = torch.arange(B, device=ids.device) + itc.offset  # local pairs, padded like the rest
        # Rows: (image_i, text_i) match; (negative image of text_i, text_i); (image_i, negative text of image_i).
        images = [image_embeds, images_all[negative_image], image_embeds]  # 3 x (B, N, Cv)
        texts = [ids_all[own], ids_all[own], ids_all[negative_text]]  # 3 x (B, T_max)
        masks = [mask_all[own], mask_all[own], mask_all[negative_text]]
        labels = [torch.ones(B), torch.zeros(2 * B)]
        if given_negatives is not None:
            neg_ids, neg_mask, present = given_negatives
            keep = present.nonzero().flatten()  # (K,)
            width = max(ids_all.shape[1], neg_ids.shape[1])
            texts = [_pad_to(t, [t.shape[0], width], self.config.pad_token_id) for t in texts] + [
                _pad_to(neg_ids[keep], [len(keep), width], self.config.pad_token_id)]
            masks = [_pad_to(m, [m.shape[0], width], 0) for m in masks] + [_pad_to(neg_mask[keep], [len(keep), width], 0)]
            images.append(image_embeds[keep])
            labels.append(torch.zeros(len(keep)))
        logits = self.itm_logits(torch.cat(images), torch.cat(texts), torch.cat(masks))  # (3B [+ K], 2)
        loss = F.cross_entropy(logits.float(), torch.cat(labels).long().to(ids.device))
        return loss, negative_text, negative_image

    @torch.no_grad()
    def itm_score(self, image_embeds: torch.Tensor, text_input_ids: torch.Tensor, text_attention_mask: torch.Tensor) -> torch.Tensor:
        """Probability that image b and text b match, (B,): the CapFilt filter. Runs without dropout."""
        self._check_inputs(image_embeds, text_input_ids, text_attention_mask)
        with _evaluating(self):
            logits = self.itm_logits(image_embeds, text_input_ids, text_attention_mask.long())
        return logits.float().softmax(dim=-1)[:, 1]

    # ---- 3. ITG ----------------------------------------------------------------------------
    def caption_logits(self, image_embeds: torch.Tensor, text_input_ids: torch.Tensor, text_attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V) of the text, BOS ([DEC]) first, under the multimodal causal mask."""
        Q = self.num_query_tokens
        decoder_ids = text_input_ids.clone()
        decoder_ids[:, 0] = self.bos_token_id  # [CLS] -> [DEC]: the decoder's BOS
        mask = multimodal_causal_mask(Q, text_attention_mask)  # (B, Q+T, Q+T)
        hidden, _ = self.qformer(self._queries(image_embeds.shape[0]), image_embeds, decoder_ids, mask)
        return self.lm_head(hidden[:, Q:], self.qformer.embeddings.word_embeddings.weight)  # (B, T, V)

    def generation_loss(self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)  # (B, T); position 0 is never a target after the shift
        logits = self.caption_logits(image_embeds, ids, mask)
        return lm_loss(logits, labels, shift=True, label_smoothing=self.label_smoothing)

    # ---- all three -------------------------------------------------------------------------
    def forward(
        self,
        image_embeds: torch.Tensor,
        text_input_ids: torch.Tensor,
        text_attention_mask: torch.Tensor,
        pair_ids: torch.Tensor | None = None,
        negative_input_ids: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        has_negative: torch.Tensor | None = None,
    ) -> Stage1Output:
        """image_embeds (B, N, Cv) from the frozen image encoder; text (B, T) [CLS]-first, right-padded.

        negative_input_ids / negative_attention_mask (B, T'), has_negative (B,) bool: a text per
        image known not to match it (rows with has_negative False are ignored), for ITM.
        """
        self._check_inputs(image_embeds, text_input_ids, text_attention_mask)
        mask = text_attention_mask.long()
        with torch.no_grad():  # keep the stored temperature itself in range, as BLIP-2 does
            self.temp.clamp_(TEMP_MIN, TEMP_MAX)
        Q = self.num_query_tokens

        # 1. ITC: one pass over [queries ; text] whose unimodal mask keeps the two sides apart.
        hidden, _ = self.qformer(self._queries(mask.shape[0]), image_embeds, text_input_ids, unimodal_mask(Q, mask))
        image_feats = F.normalize(self.vision_proj(hidden[:, :Q]), dim=-1)  # (B, Q, D)
        text_feat = F.normalize(self.text_proj(hidden[:, Q]), dim=-1)  # (B, D) at [CLS]
        itc = self.contrastive(image_feats, text_feat, pair_ids)

        # 2. ITM with hard negatives drawn from the ITC similarities (and the given ones).
        given = None
        if negative_input_ids is not None:
            if negative_attention_mask is None:
                raise ValueError("negative_input_ids needs negative_attention_mask")
            self._check_inputs(image_embeds, negative_input_ids, negative_attention_mask)
            present = has_negative if has_negative is not None else torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
            given = (negative_input_ids, negative_attention_mask.long(), present.bool())
        loss_itm, negative_text, negative_image = self.matching(image_embeds, text_input_ids, mask, itc, given)

        # 3. ITG.
        loss_itg = self.generation_loss(image_embeds, text_input_ids, mask)

        return Stage1Output(
            loss=itc.loss + loss_itm + loss_itg,
            loss_itc=itc.loss,
            loss_itm=loss_itm,
            loss_itg=loss_itg,
            sim_i2t=itc.sim_i2t.detach(),
            negative_text_index=negative_text,
            negative_image_index=negative_image,
        )

    # ---- stage 2 ------------------------------------------------------------------------------
    def _export_tensors(self, instruction_aware: bool) -> dict[str, torch.Tensor]:
        """Our tensors under the names an InstructBLIP / BLIP-2 model gives them."""
        tensors = {"query_tokens": self.query_tokens.detach()}
        tensors.update({f"qformer.{k}": v for k, v in self.qformer.state_dict().items()})
        if not instruction_aware:
            # BLIP-2's Q-Former LayerNorms the queries with `qformer.layernorm`; ours does it
            # inside the embeddings (queries and text together), with the same weights.
            for part in ("weight", "bias"):
                tensors[f"qformer.layernorm.{part}"] = tensors.pop(f"qformer.embeddings.layernorm.{part}")
        return tensors

    @torch.no_grad()
    def export_to(self, model: InstructBlipForConditionalGeneration) -> None:
        """Copy the trained `query_tokens` and `qformer.*` weights into `model` (stage 2).

        Every Q-Former tensor of `model` must receive a tensor of exactly its shape. Ours may be
        left over only where `model` is a BLIP-2 model without a text side (word/position
        embeddings, text feed-forward); anything else left over or missing is an error.
        """
        target = {k: v for k, v in model.state_dict().items() if k == "query_tokens" or k.startswith("qformer.")}
        source = self._export_tensors(model.is_instruction_aware)
        missing = sorted(set(target) - set(source))
        leftover = sorted(k for k in set(source) - set(target) if model.is_instruction_aware or not _TEXT_ONLY_KEY.match(k))
        wrong = sorted(
            f"{k}: ours {tuple(source[k].shape)}, model {tuple(target[k].shape)}"
            for k in set(source) & set(target)
            if source[k].shape != target[k].shape
        )
        if missing or leftover or wrong:
            raise ValueError(
                "the stage-1 Q-Former does not fit this model: "
                f"missing {missing or 'none'}; not in the model {leftover or 'none'}; shape mismatches {wrong or 'none'}"
            )
        for name, tensor in target.items():
            tensor.copy_(source[name])  # state_dict tensors share storage with the model's


__all__ = [
    "ContrastiveResult",
    "QFormerLMHead",
    "QFormerPretrainer",
    "Stage1Output",
    "gather_keep_local_grad",
    "sample_hard_negatives",
]
