"""MORPHEUS in plain PyTorch, module for module as the authors' code (reference §2, §5).

`MorpheusProto` (pretraining: encoder + one decoder per omics modality) and
`MorpheusProtoEncoder` (fine-tuning: encoder + ``final_layer``) have exactly the authors'
state-dict keys, so an export of `morpheus export` (or a state dict the authors' code
saved) loads with ``load_state_dict(strict=True)``. Written plainly, one MLP per group as
the authors do: no group batching, no fused kernels. No MONAI: the transformer blocks are
re-written here with MONAI's parameter names (``attn.qkv``, ``attn.out_proj``,
``mlp.linear1/2``, ``cross_attn.to_q/to_k/to_v/out_proj``).

Conventions shared with `morpheus_jax.load` (the JAX handle):

- ``wsi``: ``[B, N, wsi_dim]`` patch features; ``wsi_mask``: ``[B, N]`` bool, True = a real
  patch (padded bags), None = every patch is real. (The authors' ``WSITokenizer`` takes
  ``key_padding_mask`` with the opposite sense.)
- ``omics``: ``{modality: [B, F]}`` canonical feature vectors when the module knows the
  features (``groups`` given as ``{group: [feature names]}``), else ``[B, Σ group sizes]``
  (group inputs concatenated in mapping order); ``{group: [B, size]}`` works too.
- masks: ``{modality: [B, G]}`` int, 1 = masked (hidden from the encoder, its query is the
  mask token), as in training.
- Decoder outputs: ``[B, Σ group sizes]``, groups concatenated in mapping order.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

Tensor = torch.Tensor


def _snn_block(d_in: int, d_out: int) -> nn.Sequential:
    """``Linear → ELU → AlphaDropout(p=0)``, the authors' ``SNN_Block``."""
    return nn.Sequential(nn.Linear(d_in, d_out), nn.ELU(), nn.AlphaDropout(p=0.0))


def _check_group_names(modality: str, names) -> None:
    for g in names:
        if not isinstance(g, str) or not g or "." in g:
            raise ValueError(f"{modality}: group name {g!r} cannot be a PyTorch module key "
                             "(must be a non-empty string without '.')")


def _canonical(groups: Mapping[str, Sequence[str]]) -> list[str]:
    """Groups in order, features in group order, first appearance kept (reference §1)."""
    seen: dict[str, None] = {}
    for members in groups.values():
        for f in members:
            seen.setdefault(f, None)
    return list(seen)


class GroupSpec:
    """One modality's groups: names, sizes and (when feature names are known) the canonical
    feature index of every group entry."""

    def __init__(self, modality: str, groups: Mapping[str, int | Sequence[str]], features: Sequence[str] | None = None):
        if not groups:
            raise ValueError(f"{modality}: no groups")
        _check_group_names(modality, groups)
        self.modality = modality
        self.names = list(groups)
        values = list(groups.values())
        if all(isinstance(v, int) for v in values):
            if features is not None:
                raise ValueError(f"{modality}: feature names given but groups hold only sizes")
            self.sizes = [int(v) for v in values]
            self.features = None
            self.entry_index = None
        elif all(not isinstance(v, (int, str)) for v in values):
            self.features = list(features) if features is not None else _canonical(groups)
            where = {f: i for i, f in enumerate(self.features)}
            missing = [f for v in values for f in v if f not in where]
            if missing:
                raise ValueError(f"{modality}: mapping features missing from the feature list: {missing[:5]}")
            self.sizes = [len(v) for v in values]
            self.entry_index = [where[f] for v in values for f in v]
        else:
            raise ValueError(f"{modality}: groups must map names to sizes or to lists of feature names")
        if any(s < 1 for s in self.sizes):
            raise ValueError(f"{modality}: groups with no features")

    @property
    def num_inputs(self) -> int:
        return len(self.features) if self.features is not None else sum(self.sizes)


# -- blocks ------------------------------------------------------------------------------------

class WSITokenizer(nn.Module):
    """Single-head attention pooling of a patch bag onto P learned prototypes (literal form)."""

    def __init__(self, hidden_size: int, num_prototypes: int, wsi_dim: int):
        super().__init__()
        self.scale = hidden_size ** -0.5
        self.prototypes = nn.Parameter(torch.zeros(num_prototypes, hidden_size))   # the authors' zeros
        self.kv_norm = nn.LayerNorm(wsi_dim)
        self.k_proj = nn.Linear(wsi_dim, hidden_size)
        self.v_proj = nn.Linear(wsi_dim, hidden_size)
        self.q_norm = nn.LayerNorm(hidden_size)
        self.output_proj = nn.Linear(hidden_size, hidden_size)
        self.out_norm = nn.LayerNorm(hidden_size)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x ``[B, N, D]``, mask ``[B, N]`` (True = real patch) → ``[B, P, H]``."""
        kv = self.kv_norm(x)
        k, v = self.k_proj(kv), self.v_proj(kv)
        q = self.q_norm(self.prototypes)
        scores = torch.einsum("ph,bnh->bpn", q, k) * self.scale
        if mask is not None:
            # Finite floor, as the JAX model: a bag of padding only stays finite.
            scores = scores.masked_fill(~mask[:, None, :], torch.finfo(scores.dtype).min)
        return self.out_norm(self.output_proj(torch.softmax(scores, dim=-1) @ v))


def _attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, drop: nn.Dropout) -> Tensor:
    """q ``[B, h, Lq, d]``, k/v ``[B, h, Lk, d]``, key_mask ``[B, Lk]`` (True = attend)."""
    att = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if key_mask is not None:
        att = att.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return drop(att.softmax(dim=-1)) @ v


class SelfAttention(nn.Module):
    """Fused qkv (output ordered q|k|v, head, head_dim), MONAI ``SABlock`` names."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.drop_weights = nn.Dropout(dropout)
        self.drop_output = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = _attention(q, k, v, key_mask, self.drop_weights).transpose(1, 2).reshape(b, n, d)
        return self.drop_output(self.out_proj(out))


class CrossAttention(nn.Module):
    """Separate q/k/v projections; the context is not normalised (MONAI ``CrossAttentionBlock``)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.to_q = nn.Linear(hidden_size, hidden_size)
        self.to_k = nn.Linear(hidden_size, hidden_size)
        self.to_v = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.drop_weights = nn.Dropout(dropout)
        self.drop_output = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        h, hd = self.num_heads, d // self.num_heads
        q = self.to_q(x).view(b, n, h, hd).transpose(1, 2)
        k = self.to_k(context).view(b, -1, h, hd).transpose(1, 2)
        v = self.to_v(context).view(b, -1, h, hd).transpose(1, 2)
        out = _attention(q, k, v, context_mask, self.drop_weights).transpose(1, 2).reshape(b, n, d)
        return self.drop_output(self.out_proj(out))


class MLP(nn.Module):
    """``Linear → GELU (exact) → Dropout → Linear → Dropout`` (MONAI ``MLPBlock``)."""

    def __init__(self, hidden_size: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)
        self.fn = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.linear2(self.drop1(self.fn(self.linear1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x += SA(LN(x)); [x += CA(LN(x), context);] x += MLP(LN(x))``."""

    def __init__(self, hidden_size: int, mlp_dim: int, num_heads: int, dropout: float, cross: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = SelfAttention(hidden_size, num_heads, dropout)
        if cross:
            self.norm_cross_attn = nn.LayerNorm(hidden_size)
            self.cross_attn = CrossAttention(hidden_size, num_heads, dropout)
        self.cross = cross
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = MLP(hidden_size, mlp_dim, dropout)

    def forward(self, x: Tensor, key_mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        if self.cross:
            x = x + self.cross_attn(self.norm_cross_attn(x), context, context_mask)
        return x + self.mlp(self.norm2(x))


# -- omics tokenizers and decoders ----------------------------------------------------------------

class OmicsTokenizer(nn.Module):
    """One ``SNN(size → group_hidden) → SNN(group_hidden → H)`` per group, one token per group."""

    def __init__(self, spec: GroupSpec, hidden_size: int, group_hidden: int):
        super().__init__()
        self.spec = spec
        self.token_mlp_dict = nn.ModuleDict({
            g: nn.Sequential(_snn_block(size, group_hidden), _snn_block(group_hidden, hidden_size))
            for g, size in zip(spec.names, spec.sizes)})
        index = None if spec.entry_index is None else torch.tensor(spec.entry_index, dtype=torch.long)
        self.register_buffer("entry_index", index, persistent=False)

    def group_inputs(self, x) -> list[Tensor]:
        """Canonical ``[B, F]`` (or ``[B, S]``, or ``{group: [B, size]}``) → per-group inputs."""
        if isinstance(x, Mapping):
            missing = [g for g in self.spec.names if g not in x]
            if missing:
                raise ValueError(f"{self.spec.modality}: inputs for groups {missing[:5]} missing")
            return [x[g] for g in self.spec.names]
        if x.ndim != 2 or x.shape[1] != self.spec.num_inputs:
            raise ValueError(f"{self.spec.modality}: expected [B, {self.spec.num_inputs}] inputs, got {list(x.shape)}")
        if self.entry_index is not None:
            x = x.index_select(1, self.entry_index)
        return list(torch.split(x, self.spec.sizes, dim=1))

    def forward(self, x) -> Tensor:
        parts = self.group_inputs(x)
        return torch.stack([mlp(p) for mlp, p in zip(self.token_mlp_dict.values(), parts)], dim=1)


class OmicsReverseTokenizer(nn.Module):
    """One ``SNN(H → group_hidden) → Linear(group_hidden → size)`` per group."""

    def __init__(self, spec: GroupSpec, hidden_size: int, group_hidden: int):
        super().__init__()
        self.token_reverse = nn.ModuleDict({
            g: nn.Sequential(_snn_block(hidden_size, group_hidden), nn.Linear(group_hidden, size))
            for g, size in zip(spec.names, spec.sizes)})

    def forward(self, x: Tensor) -> Tensor:
        """``[B, G, H]`` → ``[B, Σ sizes]``, groups in mapping order."""
        return torch.cat([mlp(x[:, i]) for i, mlp in enumerate(self.token_reverse.values())], dim=1)


class MorpheusDecoder(nn.Module):
    """One modality's decoder: queries (own token or mask token) + id embeddings, self- and
    cross-attention blocks over the encoded sequence, per-group reverse MLPs."""

    def __init__(self, spec: GroupSpec, hidden_size: int, group_hidden: int, num_layers: int, num_heads: int,
                 mlp_dim: int, dropout: float):
        super().__init__()
        self.mask_tokens = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.id_embeddings = nn.Parameter(torch.zeros(1, len(spec.names), hidden_size))
        nn.init.trunc_normal_(self.mask_tokens, std=0.02)
        nn.init.trunc_normal_(self.id_embeddings, std=0.02)
        self.decoder_embed = nn.Linear(hidden_size, hidden_size)
        self.decoder_blocks = nn.ModuleList([
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout, cross=True) for _ in range(num_layers)])
        self.decoder_norm = nn.LayerNorm(hidden_size)
        self.reverse_tokenizer = OmicsReverseTokenizer(spec, hidden_size, group_hidden)

    def forward(self, encoded: Tensor, context_mask: Tensor | None, token_pos: Tensor | None = None) -> Tensor:
        """encoded ``[B, L, H]``; token_pos ``[B, G]``: row of each group's kept token in
        ``encoded`` (-1 = mask token); None = every query is the mask token (generation)."""
        e = self.decoder_embed(encoded)
        b, g, h = e.shape[0], self.id_embeddings.shape[1], e.shape[2]
        q = self.mask_tokens.expand(b, g, h)
        if token_pos is not None:
            own = e.gather(1, token_pos.clamp(min=0)[..., None].expand(b, g, h))
            q = torch.where((token_pos >= 0)[..., None], own, q)
        q = q + self.id_embeddings
        for blk in self.decoder_blocks:
            q = blk(q, context=e, context_mask=context_mask)
        return self.reverse_tokenizer(self.decoder_norm(q))


# -- the models -----------------------------------------------------------------------------------

class _MorpheusEncoderBase(nn.Module):
    """Global token + WSI tokenizer + omics tokenizers → transformer encoder → LayerNorm."""

    def _build_encoder(self, groups, features, hidden_size, num_prototypes, wsi_dim, group_hidden,
                       encoder_layers, encoder_heads, encoder_mlp_dim, encoder_dropout):
        features = features or {}
        unknown = set(features) - set(groups)
        if unknown:
            raise ValueError(f"feature names for modalities without groups: {sorted(unknown)}")
        self.specs = {m: GroupSpec(m, g, features.get(m)) for m, g in groups.items()}
        self.modalities = tuple(self.specs)
        self.hidden_size = hidden_size
        self.global_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        nn.init.trunc_normal_(self.global_token, std=0.02)
        self.wsi_tokenizer = WSITokenizer(hidden_size, num_prototypes, wsi_dim)
        self.omics_tokenizers = nn.ModuleDict({
            m: OmicsTokenizer(s, hidden_size, group_hidden) for m, s in self.specs.items()})
        self.encoder_blocks = nn.ModuleList([
            TransformerBlock(hidden_size, encoder_mlp_dim, encoder_heads, encoder_dropout)
            for _ in range(encoder_layers)])
        self.norm = nn.LayerNorm(hidden_size)

    @property
    def group_names(self) -> dict[str, list[str]]:
        return {m: list(s.names) for m, s in self.specs.items()}

    @property
    def feature_names(self) -> dict[str, list[str] | None]:
        return {m: s.features for m, s in self.specs.items()}

    def _device(self) -> torch.device:
        return self.global_token.device

    def _tensor(self, x, dtype=None) -> Tensor:
        return torch.as_tensor(x, dtype=dtype or self.global_token.dtype, device=self._device())

    def _present(self, omics) -> list[str]:
        omics = omics or {}
        unknown = sorted(set(omics) - set(self.modalities))
        if unknown:
            raise ValueError(f"unknown omics modalities {unknown}; this model has {list(self.modalities)}")
        return [m for m in self.modalities if m in omics]

    def _omics_input(self, x):
        if isinstance(x, Mapping):
            return {g: self._tensor(v) for g, v in x.items()}
        return self._tensor(x)

    def _token_mask(self, masks, present: list[str], batch: int) -> Tensor | None:
        """``{m: [B, G_m]}`` (or ``[B, T]``) → ``[B, T]`` int over the present modalities."""
        if masks is None:
            return None
        t = sum(len(self.specs[m].names) for m in present)
        if isinstance(masks, Mapping):
            stray = sorted(set(masks) - set(present))
            if stray:
                raise ValueError(f"masks for modalities not in omics: {stray} (omics has {present})")
            parts = []
            for m in present:
                g = len(self.specs[m].names)
                mk = masks.get(m)
                mk = torch.zeros(batch, g, dtype=torch.long, device=self._device()) if mk is None \
                    else torch.as_tensor(mk, device=self._device()).long()
                if tuple(mk.shape) != (batch, g):
                    raise ValueError(f"mask of {m} has shape {list(mk.shape)}, expected [{batch}, {g}]")
                parts.append(mk)
            return torch.cat(parts, dim=1) if parts else torch.zeros(batch, 0, dtype=torch.long, device=self._device())
        masks = torch.as_tensor(masks, device=self._device()).long()
        if tuple(masks.shape) != (batch, t):
            raise ValueError(f"token mask has shape {list(masks.shape)}, expected [{batch}, {t}]")
        return masks

    def _encode(self, wsi, omics, wsi_mask, masks):
        """→ (encoded ``[B, L, H]``, valid ``[B, L]``, present modalities, token rows ``[B, T]``
        (-1 = masked) or None, number of leading global + WSI rows)."""
        present = self._present(omics)
        if wsi is None and not present:
            raise ValueError("nothing to encode: give wsi and/or omics")
        parts = []
        if wsi is not None:
            wsi = self._tensor(wsi)
            if wsi.ndim != 3:
                raise ValueError(f"wsi must be [B, N, D], got {list(wsi.shape)}")
            if wsi_mask is not None:
                wsi_mask = torch.as_tensor(wsi_mask, device=self._device()).bool()
            parts.append(self.wsi_tokenizer(wsi, wsi_mask))
        omics = {m: self._omics_input(omics[m]) for m in present}
        tokens = [self.omics_tokenizers[m](omics[m]) for m in present]
        b = parts[0].shape[0] if parts else tokens[0].shape[0]
        start = 1 + (parts[0].shape[1] if parts else 0)
        valid = [torch.ones(b, start, dtype=torch.bool, device=self._device())]
        rows = None
        if tokens:
            tokens = torch.cat(tokens, dim=1)
            t = tokens.shape[1]
            token_mask = self._token_mask(masks, present, b)
            if token_mask is None:
                rows = torch.arange(t, device=self._device()).expand(b, t)
                valid.append(torch.ones(b, t, dtype=torch.bool, device=self._device()))
            else:
                # Kept tokens first (index order); K = the most any sample keeps, the rest padding.
                keep = token_mask == 0
                order = torch.argsort(token_mask, dim=1, stable=True)
                k = int(keep.sum(dim=1).max()) if t else 0
                idx = order[:, :k]
                kept = keep.gather(1, idx)
                tokens = tokens.gather(1, idx[..., None].expand(b, k, tokens.shape[2]))
                slot = torch.arange(k, device=self._device()).expand(b, k)
                rows = torch.full((b, t), -1, dtype=torch.long, device=self._device())
                rows.scatter_(1, idx, torch.where(kept, slot, -1))
                valid.append(kept)
            parts.append(tokens)
        x = torch.cat([self.global_token.expand(b, -1, -1)] + parts, dim=1)
        valid = torch.cat(valid, dim=1)
        key_mask = None if bool(valid.all()) else valid
        for blk in self.encoder_blocks:
            x = blk(x, key_mask)
        return self.norm(x), valid, present, rows, start

    def encode(self, wsi, omics=None, wsi_mask=None, token_mask=None) -> Tensor:
        """→ ``[B, 1 + P + T, H]``: the global token, the P WSI tokens, then the omics tokens
        of the modalities given, in model order and mapping group order. With ``token_mask``
        (``{m: [B, G]}`` or ``[B, T]``, 1 = masked) masked tokens are hidden from the encoder
        and their rows are zero."""
        x, _, _, rows, start = self._encode(wsi, omics, wsi_mask, token_mask)
        if token_mask is None or rows is None:
            return x
        b, t = rows.shape
        out = x.new_zeros(b, start + t, x.shape[2])
        out[:, :start] = x[:, :start]
        src = x.gather(1, (rows.clamp(min=0) + start)[..., None].expand(b, t, x.shape[2]))
        out[:, start:] = torch.where((rows >= 0)[..., None], src, torch.zeros((), dtype=x.dtype, device=x.device))
        return out


class MorpheusProto(_MorpheusEncoderBase):
    """The pretraining model: encoder + one masked decoder per omics modality.

    groups: ``{modality: {group name: size}}`` (omics given as ``[B, Σ sizes]``) or
    ``{modality: {group name: [feature names]}}`` (omics given as canonical ``[B, F]``;
    ``features`` can fix the canonical order, default: first appearance in the mapping).
    Modality order = the order of ``groups``.
    """

    def __init__(self, groups: Mapping[str, Mapping[str, int | Sequence[str]]], hidden_size: int = 256,
                 num_prototypes: int = 16, wsi_dim: int = 1536, group_hidden: int = 256, encoder_layers: int = 1,
                 encoder_heads: int = 8, encoder_mlp_dim: int = 256, encoder_dropout: float = 0.15,
                 decoder_layers: int = 1, decoder_heads: int = 8, decoder_mlp_dim: int = 256,
                 decoder_dropout: float = 0.0, features: Mapping[str, Sequence[str]] | None = None):
        super().__init__()
        if not groups:
            raise ValueError("MorpheusProto needs at least one omics modality")
        self._build_encoder(groups, features, hidden_size, num_prototypes, wsi_dim, group_hidden,
                            encoder_layers, encoder_heads, encoder_mlp_dim, encoder_dropout)
        self.omics_decoders = nn.ModuleDict({
            m: MorpheusDecoder(s, hidden_size, group_hidden, decoder_layers, decoder_heads, decoder_mlp_dim,
                               decoder_dropout) for m, s in self.specs.items()})

    def _check_target(self, target: str) -> None:
        if target not in self.omics_decoders:
            raise ValueError(f"unknown target modality {target!r}; this model decodes {list(self.modalities)}")

    def forward(self, wsi, omics, masks=None, wsi_mask=None, targets: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Training / reconstruction: predictions ``{m: [B, Σ sizes]}`` of every decoder (or
        ``targets``). A group masked in ``masks`` is hidden from the encoder and decoded
        from the mask token; a modality absent from ``omics`` is decoded from mask tokens."""
        x, valid, present, rows, start = self._encode(wsi, omics, wsi_mask, masks)
        context_mask = None if bool(valid.all()) else valid
        targets = list(self.modalities) if targets is None else list(targets)
        offsets, off = {}, 0
        for m in present:
            offsets[m] = off
            off += len(self.specs[m].names)
        out = {}
        for m in targets:
            self._check_target(m)
            pos = None
            if m in offsets:
                pos = rows[:, offsets[m]: offsets[m] + len(self.specs[m].names)]
                pos = torch.where(pos >= 0, pos + start, -1)
            out[m] = self.omics_decoders[m](x, context_mask, pos)
        return out

    def reconstruct(self, wsi, omics, masks, wsi_mask=None) -> dict[str, Tensor]:
        """Explicit-mask reconstruction (as in training): ``{m: [B, Σ sizes]}``."""
        return self(wsi, omics, masks, wsi_mask)

    def generate(self, target: str, wsi, omics=None, wsi_mask=None) -> Tensor:
        """Decode mode (every query is the mask token) from WSI and the omics given: ``[B, Σ sizes]``."""
        self._check_target(target)
        x, valid, _, _, _ = self._encode(wsi, omics, wsi_mask, None)
        return self.omics_decoders[target](x, None if bool(valid.all()) else valid, None)

    def to_features(self, modality: str, grouped: Tensor) -> Tensor:
        """``[B, Σ sizes]`` → canonical ``[B, F]``; a feature in several groups gets the mean."""
        spec = self.specs[modality]
        if spec.entry_index is None:
            raise ValueError(f"{modality}: the model was built without feature names")
        grouped = self._tensor(grouped)
        index = self.omics_tokenizers[modality].entry_index
        out = grouped.new_zeros(grouped.shape[0], len(spec.features)).index_add_(1, index, grouped)
        counts = torch.bincount(index, minlength=len(spec.features)).clamp(min=1).to(grouped.dtype)
        return out / counts


class MorpheusProtoEncoder(_MorpheusEncoderBase):
    """The fine-tuning model: the encoder (tokenizers of the modalities it uses only) and
    ``final_layer = Sequential(Dropout, Linear(H, n_outputs))`` on the global token.

    ``n_outputs=None`` builds it without a head (``forward`` returns the global token's
    embedding); `add_head` adds a fresh one, e.g. after loading pretrained encoder weights.
    """

    def __init__(self, groups: Mapping[str, Mapping[str, int | Sequence[str]]] | None = None,
                 hidden_size: int = 256, num_prototypes: int = 16, wsi_dim: int = 1536, group_hidden: int = 256,
                 encoder_layers: int = 1, encoder_heads: int = 8, encoder_mlp_dim: int = 256,
                 encoder_dropout: float = 0.35, n_outputs: int | None = None, head_dropout: float | None = None,
                 features: Mapping[str, Sequence[str]] | None = None):
        super().__init__()
        self._build_encoder(dict(groups or {}), features, hidden_size, num_prototypes, wsi_dim, group_hidden,
                            encoder_layers, encoder_heads, encoder_mlp_dim, encoder_dropout)
        self._head_dropout = encoder_dropout if head_dropout is None else head_dropout
        self.final_layer = None
        if n_outputs:
            self.add_head(n_outputs)

    def add_head(self, n_outputs: int, dropout: float | None = None) -> nn.Sequential:
        """Replace the head by a freshly initialised ``Sequential(Dropout, Linear(H, n_outputs))``."""
        p = self._head_dropout if dropout is None else dropout
        self.final_layer = nn.Sequential(nn.Dropout(p), nn.Linear(self.hidden_size, n_outputs)).to(
            device=self._device(), dtype=self.global_token.dtype)
        return self.final_layer

    def forward(self, wsi, omics=None, wsi_mask=None, return_embedding: bool = False) -> Tensor:
        """The head's outputs ``[B, n_outputs]`` from the global token (its embedding
        ``[B, H]`` when ``return_embedding`` or when there is no head)."""
        emb = self._encode(wsi, omics, wsi_mask, None)[0][:, 0]
        if return_embedding or self.final_layer is None:
            return emb
        return self.final_layer(emb)
