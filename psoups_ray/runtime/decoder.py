"""The decode forward of Llama-family causal LMs in few calls: the sampler's fast path.

At decode shapes (a few dozen rows, one new token each) a CPU spends most of a
transformers forward pass in Python: module calls, keyword plumbing, mask building, cache
objects, and PEFT's per-adapter branches. :class:`FastDecoder` computes the same function
from the same tensors with a fraction of the calls:

- the q/k/v projections and the gate/up projections as one matmul each: their weights are
  packed once into one tensor per layer and the model's own parameters become views of it
  (vLLM's QKV packing), so nothing is stored twice and an in-place change of a weight (a
  merge) is seen by both;
- every LoRA term a projection carries, the mixer's per-row soup
  (:mod:`psoups_ray.runtime.mixing`) and PEFT's active adapters alike, as two small matmuls
  per group of projections that share an input: ``(x A^T * c) B^T`` with A stacked over the
  group's projections and adapters, B block-diagonal over the projections, and c each
  row's coefficient of each rank (its soup weight times the adapter's scale), computed once
  per batch instead of per layer and step;
- keys and values in one preallocated buffer (layers, rows, kv heads, capacity, head dim)
  that finished rows leave;
- attention through ``scaled_dot_product_attention``; while decoding, each key-value
  head's query heads are folded into the query length, so keys are never repeated.

Weights and activations are in the model's dtype, or bfloat16 where asked
(:func:`resolve_dtype`): then bfloat16 copies of the weights are taken on first use.
Logits are float32 either way. Only what it reproduces exactly is taken (Llama, Mistral
without a sliding window, Qwen2; SiLU MLPs; plain ``nn.Linear`` weights that do not train);
:func:`fast_path_problem` says why a model keeps the generic path.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from psoups_ray.errors import PsoupsError
from psoups_ray.runtime.mixing import LoraMixingLinear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = ("auto", "float32", "bfloat16")
ATTENTION = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")
PACKED = (*ATTENTION, *MLP_IN)
PROJECTIONS = (*ATTENTION, "o_proj", *MLP_IN, "down_proj")
GROUPS = (("qkv", ATTENTION), ("o", ("o_proj",)), ("gate_up", MLP_IN), ("down", ("down_proj",)))


# --- which models, which dtype ----------------------------------------------------------------


@functools.cache
def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX-512 BF16); emulated
    bfloat16 on others is slower than float32."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(requested: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a sampler decodes in: ``float32`` / ``bfloat16`` as asked; ``auto`` picks
    bfloat16 for a float32 model on a CUDA device with bfloat16 or a CPU with AMX /
    AVX-512 BF16, and the model's own dtype otherwise."""
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    if requested == "float32":
        return torch.float32
    if requested == "bfloat16":
        return torch.bfloat16
    if model_dtype != torch.float32:
        return model_dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bfloat16() else torch.float32


@dataclass
class _Projection:
    """One projection of a layer, unwrapped: its base linear layer, the soup mixing inside
    it and the PEFT LoRA layer around it (either may be absent)."""

    linear: nn.Linear
    mixing: LoraMixingLinear | None
    peft: nn.Module | None


def _unwrap(module: nn.Module, name: str) -> _Projection | str:
    peft = None
    if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), nn.Module):
        peft, module = module, module.base_layer
    mixing = None
    if isinstance(module, LoraMixingLinear):
        mixing, module = module, module.base
    if type(module) is not nn.Linear:
        return f"{name} is a {type(module).__name__}, not a plain nn.Linear"
    if module.weight.requires_grad:
        return f"{name}'s weight trains"
    if peft is not None:
        variants = getattr(peft, "lora_variant", {})
        for adapter in peft.lora_A:
            if adapter in variants or peft.lora_B[adapter].bias is not None:
                return f"{name}'s adapter {adapter!r} is not plain LoRA (DoRA, a LoRA bias)"
    return _Projection(module, mixing, peft)


def fast_path_problem(model: nn.Module) -> str | None:
    """Why :class:`FastDecoder` cannot decode ``model`` exactly (None: it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {config.hidden_act!r} (silu only)"
    if getattr(config, "mlp_bias", False):
        return "the MLP has biases"
    if model_type == "llama" and getattr(config, "attention_bias", False):
        return "the attention has biases"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if getattr(config, "sliding_window", None) is not None and (
        model_type != "qwen2" or getattr(config, "use_sliding_window", False)
    ):
        return "sliding-window attention"
    backbone = getattr(model, "model", None)
    layers = getattr(backbone, "layers", None)
    if layers is None or not isinstance(getattr(backbone, "embed_tokens", None), nn.Embedding):
        return "not a decoder of the Llama layout (model.layers, model.embed_tokens)"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None:
        return "the output head is not a plain nn.Linear"
    for index, layer in enumerate(layers):
        modules = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
        for name in PROJECTIONS:
            if name not in modules:
                return f"layer {index} has no {name}"
            unwrapped = _unwrap(modules[name], f"layer {index} {name}")
            if isinstance(unwrapped, str):
                return unwrapped
    return None


# --- the decoder ----------------------------------------------------------------------------


@dataclass
class _Lora:
    """The LoRA terms of one group of projections for one batch: ``x A^T``, scaled per row
    and rank, then each projection's ranks times its B, added to its slice of the group's
    packed output."""

    a: torch.Tensor  # (R, in): every term of every projection, in projection order
    coefficients: torch.Tensor  # (rows or 1, R)
    parts: list[tuple[slice, slice, torch.Tensor]]  # (ranks, output slice, B^T (r, width))


@dataclass
class _Layer:
    qkv: torch.Tensor  # (q + 2 kv, hidden), packed
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # (hidden, q)
    gate_up: torch.Tensor  # (2 intermediate, hidden), packed
    down: torch.Tensor  # (hidden, intermediate)
    norm_in: torch.Tensor  # (hidden,)
    norm_post: torch.Tensor
    projections: dict[str, _Projection]
    lora: dict[str, _Lora]  # by group name, for the current batch (groups with terms only)


class FastDecoder:
    """The decode forward of ``model`` (a causal LM :func:`fast_path_problem` accepts).

    :meth:`prefill` runs a batch's left-padded prompts and sets up the KV cache, the rows'
    LoRA coefficients and padding; :meth:`step` runs one new token per row; both return the
    last position's logits, float32 (rows, vocab). :meth:`select_rows` keeps some rows.
    One batch at a time.
    """

    def __init__(self, model: nn.Module):
        problem = fast_path_problem(model)
        if problem is not None:
            raise ValueError(f"the fast decoder cannot run this model: {problem}")
        self.model = model
        config = model.config
        self.backbone = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self._bound: list[nn.Parameter] = []  # the views the model's projections hold
        self._copies: dict[torch.dtype, tuple[list[_Layer], torch.Tensor, torch.Tensor]] = {}
        self._layers: list[_Layer] = []
        self._pack(self._projections())

    # -- weights ------------------------------------------------------------------------------
    def _projections(self) -> list[dict[str, _Projection]]:
        """Each layer's projections as the model holds them now (mixing may have been
        attached, PEFT adapters added, since the last batch)."""
        found = []
        for index, layer in enumerate(self.backbone.layers):
            modules = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
            projections = {}
            for name in PROJECTIONS:
                unwrapped = _unwrap(modules[name], f"layer {index} {name}")
                if isinstance(unwrapped, str):
                    raise ValueError(f"the fast decoder cannot run this model: {unwrapped}")
                projections[name] = unwrapped
            found.append(projections)
        return found

    def _refresh(self) -> None:
        """Bring the layers up to date with the model: its projections' wrappers, and the
        packed weights again where the model's parameters are no longer the views (moved
        to another device, replaced)."""
        projections = self._projections()
        current = [
            tensor
            for layer in projections
            for name in PACKED
            for tensor in (layer[name].linear.weight, layer[name].linear.bias)
            if tensor is not None
        ]
        if {id(tensor) for tensor in current} != {id(view) for view in self._bound}:
            self._pack(projections)
        for layer, found in zip(self._layers, projections, strict=True):
            layer.projections = found

    def _pack(self, projections: list[dict[str, _Projection]]) -> None:
        """Pack each layer's q/k/v and gate/up weights (and q/k/v biases) into one tensor
        and rebind the model's parameters as views of it."""
        self._layers = []
        self._bound = []
        self._copies = {}
        for layer, found in zip(self.backbone.layers, projections, strict=True):
            attention = [found[name].linear for name in ATTENTION]
            bias = None
            if attention[0].bias is not None:
                bias = self._packed(attention, "bias")
            qkv = self._packed(attention, "weight")
            gate_up = self._packed([found[name].linear for name in MLP_IN], "weight")
            self._layers.append(
                _Layer(
                    qkv=qkv,
                    qkv_bias=bias,
                    o=found["o_proj"].linear.weight,
                    gate_up=gate_up,
                    down=found["down_proj"].linear.weight,
                    norm_in=layer.input_layernorm.weight,
                    norm_post=layer.post_attention_layernorm.weight,
                    projections=found,
                    lora={},
                )
            )

    def _packed(self, linears: Sequence[nn.Linear], attribute: str) -> torch.Tensor:
        parts = [getattr(linear, attribute) for linear in linears]
        if _adjacent(parts):
            packed = _base_view(parts)  # packed already (by an earlier decoder)
        else:
            packed = torch.cat([part.detach() for part in parts])
        start = 0
        for linear, part in zip(linears, parts, strict=True):
            view = nn.Parameter(packed[start : start + part.shape[0]], requires_grad=False)
            setattr(linear, attribute, view)
            self._bound.append(view)
            start += part.shape[0]
        return packed

    def _weights(self, dtype: torch.dtype) -> tuple[list[_Layer], torch.Tensor, torch.Tensor]:
        """(layers, embedding, output head) in ``dtype``: the model's own tensors in its
        dtype, bfloat16 copies (taken once) otherwise."""
        embedding = self.backbone.embed_tokens.weight
        head = self.model.get_output_embeddings().weight
        if dtype == embedding.dtype:
            return self._layers, embedding, head
        if dtype not in self._copies:
            layers = [
                _Layer(
                    qkv=layer.qkv.to(dtype),
                    qkv_bias=None if layer.qkv_bias is None else layer.qkv_bias.to(dtype),
                    o=layer.o.to(dtype),
                    gate_up=layer.gate_up.to(dtype),
                    down=layer.down.to(dtype),
                    norm_in=layer.norm_in.to(dtype),
                    norm_post=layer.norm_post.to(dtype),
                    projections=layer.projections,
                    lora={},
                )  # fmt: skip
                for layer in self._layers
            ]
            tied = head.data_ptr() == embedding.data_ptr()
            copy = embedding.to(dtype)
            self._copies[dtype] = (layers, copy, copy if tied else head.to(dtype))
        layers, embedding, head = self._copies[dtype]
        for copied, layer in zip(layers, self._layers, strict=True):
            copied.projections = layer.projections
        return layers, embedding, head

    # -- a batch --------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        capacity: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Run the prompts (B, L), left-padded, and keep room for ``capacity`` positions in
        all: returns (B, vocab) float32 logits of each row's last position."""
        self._refresh()
        self.dtype = dtype
        self._active, self._embedding, self._head = self._weights(dtype)
        self._norm = self.backbone.norm.weight.to(dtype)
        self._set_lora(input_ids.shape[0])
        rows, length = input_ids.shape
        device = input_ids.device
        self.keys = torch.empty(
            (len(self._active), rows, self.kv_heads, max(capacity, length), self.head_dim),
            dtype=dtype,
            device=device,
        )
        self.values = torch.empty_like(self.keys)
        # What each row attends to, added to the attention scores: 0, or -inf for padding
        # and positions not decoded yet. (A float mask: SDPA on CPU is faster with it.)
        self.bias = torch.full((rows, self.keys.shape[3]), -torch.inf, dtype=dtype, device=device)
        self.bias[:, :length].masked_fill_(attention_mask.bool(), 0.0)
        self.length = length
        causal = torch.ones((length, length), dtype=torch.bool, device=device).tril()
        # A padding position attends to itself: no row of the mask is empty (NaN-free).
        allowed = (causal & attention_mask.bool()[:, None, :]) | torch.eye(
            length, dtype=torch.bool, device=device
        )  # (B, L, L)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
            ~allowed, -torch.inf
        )
        return self._forward(input_ids, position_ids, mask[:, None], prefill=True)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One new token per row: (B,) tokens, (B, 1) positions -> (B, vocab) logits."""
        if self.length >= self.keys.shape[3]:
            self._grow()
        self.bias[:, self.length] = 0.0
        self.length += 1
        mask = self.bias[:, None, None, : self.length]  # (B, 1, 1, T)
        return self._forward(tokens.unsqueeze(1), position_ids, mask, prefill=False)

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep the rows ``keep`` (1-D indices), in that order: their filled positions are
        copied into buffers of the same capacity."""
        for name in ("keys", "values"):
            old = getattr(self, name)
            kept = old.new_empty((old.shape[0], len(keep), *old.shape[2:]))
            kept[:, :, :, : self.length] = old[:, keep, :, : self.length]
            setattr(self, name, kept)
        self.bias = self.bias[keep]
        for layer in self._active:
            for lora in layer.lora.values():
                if lora.coefficients.shape[0] > 1:
                    lora.coefficients = lora.coefficients[keep]

    def _grow(self) -> None:
        size = 2 * self.keys.shape[3]
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = old.new_empty((*old.shape[:3], size, old.shape[4]))
            grown[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, grown)
        bias = self.bias.new_full((self.bias.shape[0], size), -torch.inf)
        bias[:, : self.length] = self.bias[:, : self.length]
        self.bias = bias

    # -- LoRA terms ---------------------------------------------------------------------------
    def _set_lora(self, rows: int) -> None:
        """Each layer's LoRA terms for this batch: the soup mixing's per-row weights (as the
        mixer's state holds them) and PEFT's active, unmerged adapters."""
        for layer in self._active:
            layer.lora = {}
            for group, names in GROUPS:
                terms = [
                    (slot, term)
                    for slot, name in enumerate(names)
                    for term in _terms(layer.projections[name], rows)
                ]
                if terms:
                    layer.lora[group] = self._group(layer, names, terms)

    def _group(self, layer: _Layer, names, terms) -> _Lora:
        """One group's terms (``(slot, (A, B, coefficients))`` in projection order)."""
        widths = [layer.projections[name].linear.out_features for name in names]
        offsets = [sum(widths[:slot]) for slot in range(len(widths))]
        parts, start = [], 0
        for slot in sorted({slot for slot, _ in terms}):
            factors = [b for used, (_, b, _) in terms if used == slot]  # (width, r) each
            rank = sum(b.shape[1] for b in factors)
            b_t = torch.cat(factors, dim=1).T.to(self.dtype).contiguous()  # (r, width)
            output = slice(offsets[slot], offsets[slot] + widths[slot])
            parts.append((slice(start, start + rank), output, b_t))
            start += rank
        a = torch.cat([a for _, (a, _, _) in terms]).to(self.dtype)
        rows = max(c.shape[0] for _, (_, _, c) in terms)
        coefficients = torch.cat([c.expand(rows, -1) for _, (_, _, c) in terms], dim=1)
        return _Lora(a, coefficients.to(self.dtype), parts)

    # -- the forward --------------------------------------------------------------------------
    def _forward(self, ids, position_ids, mask, prefill: bool) -> torch.Tensor:
        rows, length = ids.shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        q_width, kv_width = heads * head_dim, kv_heads * head_dim
        hidden = F.embedding(ids, self._embedding)  # (B, T, H)
        width = (hidden.shape[-1],)
        cos, sin = self.backbone.rotary_emb(hidden, position_ids)  # (B, T, D) each
        half = head_dim // 2  # rotate_half's sign folded into the sine table once:
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # x*cos + flip(x)*sin
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, D)
        start = self.length - length
        for index, layer in enumerate(self._active):
            x = F.rms_norm(hidden, width, layer.norm_in, self.eps)
            qkv = _lora(F.linear(x, layer.qkv, layer.qkv_bias), x, layer.lora.get("qkv"))
            # q and k are adjacent in the packed output: one rotary pass for both heads.
            qk = _rotary(
                qkv[..., : q_width + kv_width].unflatten(-1, (heads + kv_heads, head_dim)), cos, sin
            )  # fmt: skip  (B, T, heads + kv heads, D)
            q, k = qk[:, :, :heads], qk[:, :, heads:]
            v = qkv[..., q_width + kv_width :].unflatten(-1, (kv_heads, head_dim))
            self.keys[index, :, :, start : self.length] = k.transpose(1, 2)
            self.values[index, :, :, start : self.length] = v.transpose(1, 2)
            keys = self.keys[index, :, :, : self.length]  # (B, kv heads, T, D)
            values = self.values[index, :, :, : self.length]
            if prefill:
                attended = F.scaled_dot_product_attention(
                    q.transpose(1, 2),
                    keys,
                    values,
                    attn_mask=mask,
                    enable_gqa=heads != kv_heads,
                ).transpose(1, 2)  # fmt: skip  (B, T, heads, D)
            else:  # a head group's queries as one query sequence: (B, kv heads, group, D)
                grouped = q.reshape(rows, kv_heads, heads // kv_heads, head_dim)
                attended = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
            attended = attended.reshape(rows, length, q_width)
            hidden.add_(_lora(F.linear(attended, layer.o), attended, layer.lora.get("o")))
            x = F.rms_norm(hidden, width, layer.norm_post, self.eps)
            gate, up = _lora(F.linear(x, layer.gate_up), x, layer.lora.get("gate_up")).chunk(2, -1)
            x = F.silu(gate).mul_(up)
            hidden.add_(_lora(F.linear(x, layer.down), x, layer.lora.get("down")))
        last = F.rms_norm(hidden[:, -1], width, self._norm, self.eps)
        return F.linear(last, self._head).float()  # (B, V)


def _terms(projection: _Projection, rows: int) -> list[tuple[torch.Tensor, ...]]:
    """A projection's LoRA terms for a batch of ``rows``: (A (r, in), B (out, r),
    coefficients (rows or 1, r)) each."""
    terms = []
    mixing = projection.mixing
    if mixing is not None and mixing.state.weights is not None:
        active = mixing._active_factors()  # the ranks of adapters some row weighs
        if active is not None:
            a, b, owner, scale = active
            weights = mixing.state.weights.to(scale.device)  # (rows or 1, N)
            if weights.shape[0] not in (1, rows):
                raise PsoupsError(
                    f"mixing weights are for {weights.shape[0]} rows but the batch has {rows}"
                )
            terms.append((a, b, weights[:, owner] * scale))
    peft = projection.peft
    if peft is not None and not peft.disable_adapters and not peft.merged:
        for name in peft.active_adapters:
            if name in peft.lora_A:
                a, b = peft.lora_A[name].weight, peft.lora_B[name].weight
                scale = torch.full((1, a.shape[0]), float(peft.scaling[name]), device=a.device)
                terms.append((a.detach(), b.detach(), scale))
    return terms


def _lora(out: torch.Tensor, x: torch.Tensor, lora: _Lora | None) -> torch.Tensor:
    """``out`` (B, T, O) plus the group's LoRA terms of its input ``x`` (B, T, I)."""
    if lora is None:
        return out
    hidden = (x @ lora.a.T).mul_(lora.coefficients.unsqueeze(1))  # (B, T, R)
    if len(lora.parts) == 1 and lora.parts[0][2].shape[1] == out.shape[-1]:
        return out.add_(hidden @ lora.parts[0][2])
    for ranks, output, b_t in lora.parts:
        out[..., output].add_(hidden[..., ranks] @ b_t)
    return out


def _rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, T, heads, D) with (B, T, 1, D) tables, transformers'
    ``x * cos + rotate_half(x) * sin`` as ``x * cos + flip(x) * signed_sin``: rotate_half
    swaps the halves and negates the first, whose sign the table carries."""
    flipped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, flipped, signed_sin)


def _adjacent(parts: Sequence[torch.Tensor]) -> bool:
    """Whether ``parts`` are consecutive row blocks of one contiguous tensor."""
    if not all(part.is_contiguous() for part in parts):
        return False
    base = parts[0].untyped_storage().data_ptr()
    if any(part.untyped_storage().data_ptr() != base for part in parts):
        return False
    offset = parts[0].storage_offset()
    for part in parts:
        if part.storage_offset() != offset:
            return False
        offset += part.numel()
    return True


def _base_view(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    rows = sum(part.shape[0] for part in parts)
    first = parts[0].detach()
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


# --- one decoder per model ---------------------------------------------------------------------

_decoders: weakref.WeakKeyDictionary[nn.Module, FastDecoder | str] = weakref.WeakKeyDictionary()


def weights_changed(model: nn.Module) -> None:
    """Tell ``model``'s decoder its weights were changed in place (a merge, a restore):
    copies it took in another dtype are taken again. (Its own-dtype weights are the model's
    parameters' storage and need no telling.)"""
    known = _decoders.get(model)
    if isinstance(known, FastDecoder):
        known._copies.clear()


def decoder_for(model: nn.Module) -> FastDecoder | str:
    """``model``'s fast decoder (made on first use), or why it has none."""
    known = _decoders.get(model)
    if known is None:
        problem = fast_path_problem(model)
        known = problem if problem is not None else FastDecoder(model)
        _decoders[model] = known
    return known
