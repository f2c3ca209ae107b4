"""The Masked Recognition Model: Retina Patch -> token selection -> ViT with KP-RPE -> SAH.

State-dict names (``mask_token``, ``backbone.*``, ``patch_embed.*``, ``rpe_module.*``, ``head.*``) are the
official ``MaskedRecognitionModel``'s, so ``SapiensID.net`` loads released checkpoints strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from sapiensid.config import SapiensIDConfig
from sapiensid.keypoints import preprocess_keypoints, valid_mask
from sapiensid.kprpe import SapiensKPRPE, keypoint_pe
from sapiensid.masking import default_keep_count, face_first_offsets, select_tokens
from sapiensid.retina_patch import RetinaPatch, foreground_tokens, sincos_2d
from sapiensid.sah import SemanticAttentionHead
from sapiensid.vit import Block, drop_path_rates, expand_buckets, gather_contextual_bias, init_vit_weights

FACE_FIRST_MIN_KPS = 13  # face_first applies only to samples with this many valid kp19 points


class SapiensBackbone(nn.Module):
    """ViT blocks only (patches come from Retina Patch); frozen sin-cos PE with a zero CLS row."""

    def __init__(self, cfg: SapiensIDConfig) -> None:
        super().__init__()
        pe = torch.cat([torch.zeros(1, cfg.dim), sincos_2d(cfg.side, cfg.dim)], dim=0).unsqueeze(0)
        self.pos_embed = nn.Parameter(pe, requires_grad=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        rates = drop_path_rates(cfg.depth, cfg.drop_path_rate)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim)
        self.side = cfg.side
        self.blocks.apply(init_vit_weights)

    def square_pe(self) -> torch.Tensor:
        """(1, D, g, g) PE map (without the CLS row)."""
        d = self.pos_embed.shape[-1]
        return self.pos_embed[:, 1:].transpose(1, 2).reshape(1, d, self.side, self.side)


class MaskedRecognitionModel(nn.Module):
    def __init__(self, cfg: SapiensIDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.randn(1, cfg.dim) * 0.02)
        self.backbone = SapiensBackbone(cfg)
        self.patch_embed = RetinaPatch(cfg.patch_size, cfg.dim, cfg.level_emb)
        nn.init.trunc_normal_(self.patch_embed.patch_embed.weight, std=0.02)
        self.rpe_module = SapiensKPRPE(
            cfg.dim, cfg.depth, cfg.num_heads, cfg.num_keypoints, cfg.side, cfg.rpe_ratio,
            cfg.kprpe_kp_dim, cfg.kprpe_hidden,
        )
        self.head = SemanticAttentionHead(cfg.dim, cfg.num_keypoints, cfg.per_query, cfg.output_dim,
                                          cfg.n_datasets, cfg.sah_depth)
        self.n_keep: int | None = default_keep_count(cfg.n_candidates, cfg.mask_ratio)

    def forward(
        self,
        images: torch.Tensor,
        foreground_masks: torch.Tensor | None,
        ldmks: torch.Tensor,
        dataset_index: torch.Tensor | None = None,
        n_keep: int | None = None,
        return_aux: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        b = images.shape[0]
        if images.ndim != 4 or images.shape[1:] != (3, cfg.input_size, cfg.input_size):
            raise ValueError(f"expected images (B, 3, {cfg.input_size}, {cfg.input_size}), got {tuple(images.shape)}")
        if ldmks.shape != (b, 22, 2):
            raise ValueError(f"expected ldmks (B, 22, 2) with B={b}, got {tuple(ldmks.shape)}")
        dtype = self.mask_token.dtype
        images = images.to(dtype)

        kp19, face_box, torso_box = preprocess_keypoints(ldmks.to(images.device), self.training, cfg.kp_aug)
        kp19 = kp19.to(dtype)
        kp_ok = valid_mask(kp19)
        square_pe = self.backbone.square_pe()
        fg = foreground_tokens(foreground_masks, b, cfg.side, images.device)
        cand = self.patch_embed.candidates(images, fg, face_box, torso_box, square_pe)

        offsets = None
        if self.training and cfg.face_first_prob > 0:
            has_body = kp_ok.sum(dim=1) >= FACE_FIRST_MIN_KPS
            offsets = face_first_offsets(b, cfg.side * cfg.side, has_body, cfg.face_first_prob)
        keep = (n_keep if n_keep is not None else self.n_keep) if self.training else n_keep
        ids, kept_ok = select_tokens(cand["valid"], keep, self.training, offsets)
        n = ids.shape[1]

        patches = torch.gather(cand["patches"], 1, ids[..., None].expand(-1, -1, cand["patches"].shape[2]))
        pe = torch.gather(cand["pe"], 1, ids[..., None].expand(-1, -1, cand["pe"].shape[2]))
        x = self.patch_embed.embed(patches) + pe
        # kept invalid candidates (padding) become the mask token, without PE
        x = torch.where(kept_ok[..., None], x, self.mask_token.expand(b, n, -1))
        cls = (self.backbone.cls_token + self.backbone.pos_embed[:, :1]).expand(b, -1, -1)
        seq = torch.cat([cls, x, self.mask_token.expand(b, 1, -1)], dim=1)

        # the one appended mask token stands for every candidate that is not a kept valid token
        count = (cfg.n_candidates - kept_ok.sum(dim=1)).clamp(min=1).to(dtype)
        log_count = torch.zeros(b, n + 2, dtype=dtype, device=images.device)
        log_count[:, -1] = torch.log(count)
        true_col = torch.ones(b, 1, dtype=torch.bool, device=images.device)
        key_mask = torch.cat([true_col, kept_ok, true_col], dim=1) if cfg.mask_padding else None

        token_ok = torch.cat([~true_col, kept_ok, ~true_col], dim=1)
        zero_pe = torch.zeros(b, 1, pe.shape[2], dtype=dtype, device=images.device)
        kp_pe = keypoint_pe(square_pe, kp19)
        tables = self.rpe_module.tables(torch.cat([zero_pe, pe, zero_pe], dim=1), token_ok, kp_pe, kp_ok)
        buckets = self.rpe_module.buckets(ids)

        # unbind once: indexing tables[:, i] in the loop would make every layer's backward write a
        # zero-filled copy of all layers' tables
        per_layer = tables.unbind(1)
        index = expand_buckets(buckets, b, cfg.num_heads)
        for blk, table in zip(self.backbone.blocks, per_layer):
            seq = blk(seq, gather_contextual_bias(table, index), log_count, key_mask)
        seq = self.backbone.norm(seq)

        tokens = seq[:, 1:-1]
        head_mask = key_mask[:, 1:-1] if key_mask is not None else None
        out = self.head(tokens, pe, head_mask, kp_pe, kp_ok, dataset_index)
        if not return_aux:
            return out
        aux = {"ids_keep": ids, "kept_valid": kept_ok, "valid": cand["valid"], "rois": cand["rois"],
               "roi_ok": cand["roi_ok"], "kp19": kp19, "log_count": log_count}
        return out, aux

