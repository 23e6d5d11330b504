"""A GGUF model's tensors under hmoe's names: the loader's weight source, as `Checkpoint` is for
safetensors (`name in weights`, `weights.read(name, shape, dtype)`, `weights.fingerprint(names)`).

Tensors are dequantized with `gguf.quants` in row chunks straight into the destination dtype,
so no full fp32 copy of a large tensor exists. Routed experts also come out as GGUF blocks
(`expert_blocks`): a projection already in the format asked for is handed over as the file's
own bytes (a memory-mapped view), byte-identical; any other type is dequantized and quantized
to that format, with one warning line per model saying what was requantized. down_proj may keep
its own kernel format (Q4_K_M: Q4_K gate/up, Q6_K down in some layers): `stored_formats`.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderTensor, quants

from .config import ModelConfig
from .gguf_config import config_from_gguf
from .gguf_file import GGUFError, open_gguf, shape_of
from .gguf_names import PROJECTIONS, experts_name, join_kv_b, k_b_name, to_gguf, v_b_name

Q = GGMLQuantizationType
# cpu_experts' formats and the ggml types with the same blocks
GGML_TYPE = {"bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K, "q6_k": Q.Q6_K}
FORMAT_OF = {t: f for f, t in GGML_TYPE.items()}
# requantization targets from the fewest bits per weight up; q4_k before q4_0 (same size, better fit)
TARGETS = ("q4_k", "q4_0", "q6_k", "q8_0", "bf16")
CHUNK_BYTES = 4 << 20  # fp32 bytes per dequantized chunk: small chunks stay in cache (faster than 64 MB here)
THREADS = min(8, os.cpu_count() or 1)  # numpy and torch release the GIL on the chunks


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    block, size = GGML_QUANT_SIZES[qtype]
    return 8 * size / block


def natural_format(types: tuple[GGMLQuantizationType, ...], hidden: int, inter: int) -> str:
    """The CPU format for one layer's experts (gate, up, down types): their own when all three share
    one the kernels run and the shapes allow; else the smallest with at least as many bits per
    weight as the most precise of them (no precision lost; the kernels take one format per layer)."""
    def fits(fmt):
        block = GGML_QUANT_SIZES[GGML_TYPE[fmt]][0]
        return hidden % block == 0 and inter % block == 0

    own = {FORMAT_OF.get(t) for t in types}
    if len(own) == 1 and None not in own and fits(next(iter(own))):
        return next(iter(own))
    bits = max(bits_per_weight(t) for t in types)
    for fmt in TARGETS:
        if bits_per_weight(GGML_TYPE[fmt]) >= bits and fits(fmt):
            return fmt
    return "bf16"


def natural_formats(types: tuple[GGMLQuantizationType, ...], hidden: int, inter: int) -> tuple[str, str]:
    """(gate/up, down) CPU formats for one layer's experts: the stored ones when gate and up share a
    type and both types are kernel formats the shapes allow (the kernels take a down format of its
    own); else natural_format for all three."""
    gate, up, down = (FORMAT_OF.get(t) for t in types)
    block = {f: GGML_QUANT_SIZES[GGML_TYPE[f]][0] for f in GGML_TYPE}
    if gate == up and gate and down and hidden % block[gate] == 0 and inter % block[down] == 0:
        return gate, down
    fmt = natural_format(types, hidden, inter)
    return fmt, fmt


def dequantize_rows(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """GGUF data (uint8 blocks or F32/F16 values) -> float32 with the logical shape."""
    if qtype == Q.F32:
        return np.array(data, dtype=np.float32)  # a copy: the memory map is read-only
    return quants.dequantize(data, qtype)


class GGUFWeights:
    def __init__(self, path: str | Path, cfg: ModelConfig | None = None):
        self.file = open_gguf(path)
        self.path = self.file.path
        self.cfg = cfg or config_from_gguf(self.file)
        self._warned = False

    # ------------------------------------------------------------ the Checkpoint interface
    def __contains__(self, name: str) -> bool:
        ref = to_gguf(name)
        if ref is None:
            return False
        if ref.is_kv_b and ref.gguf not in self.file.tensors:
            return k_b_name(ref.layer) in self.file.tensors and v_b_name(ref.layer) in self.file.tensors
        return ref.gguf in self.file.tensors

    def fingerprint(self, names) -> str:
        """Identifies these tensors' bytes without reading them: the shards' size and mtime."""
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.file.paths]
        return json.dumps([stats, sorted(names)])

    def read(self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor `name` (hmoe's name) dequantized to `dtype`, checked against `shape`."""
        ref = to_gguf(name)
        if ref is None:
            raise GGUFError(f"{self.path}: deepseek2 GGUF files have no tensor for hmoe's '{name}'")
        if ref.is_kv_b and ref.gguf not in self.file.tensors and k_b_name(ref.layer) in self.file.tensors:
            c = self.cfg
            parts = []
            for gguf_name, expected in ((k_b_name(ref.layer), (c.num_attention_heads, c.kv_lora_rank, c.qk_nope_head_dim)),
                                        (v_b_name(ref.layer), (c.num_attention_heads, c.v_head_dim, c.kv_lora_rank))):
                t = self._tensor(gguf_name, name)
                self._check_shape(gguf_name, shape_of(t), expected)
                parts.append(dequantize_rows(t.data, t.tensor_type))
            kv_b = join_kv_b(*parts)
            self._check_shape(ref.gguf, kv_b.shape, shape)
            return torch.from_numpy(kv_b).to(dtype)
        t = self._tensor(ref.gguf, name, alternative=" (or attn_k_b and attn_v_b)" if ref.is_kv_b else "")
        found = shape_of(t)
        data = t.data
        if ref.expert is not None:
            if ref.expert >= found[0]:
                raise GGUFError(f"{self.file.describe(ref.gguf)} holds {found[0]} experts, hmoe asks for expert "
                                f"{ref.expert}")
            found, data = found[1:], data[ref.expert]
        self._check_shape(ref.gguf, found, shape)
        return _to_torch(data, t.tensor_type, found, dtype)

    def _tensor(self, gguf_name: str, wanted_for: str, alternative: str = "") -> ReaderTensor:
        if gguf_name not in self.file.tensors:
            raise GGUFError(f"{self.path}: missing tensor '{gguf_name}'{alternative} (hmoe's '{wanted_for}')")
        return self.file.tensors[gguf_name]

    def _check_shape(self, gguf_name: str, found: tuple[int, ...], shape: tuple[int, ...] | None) -> None:
        if shape is not None and tuple(found) != tuple(shape):
            raise GGUFError(f"{self.file.describe(gguf_name)} has shape {list(found)[::-1]} (GGUF order), "
                            f"the metadata implies {list(shape)[::-1]}")

    # ------------------------------------------------------------ routed experts as blocks
    def expert_types(self, layer: int) -> tuple[GGMLQuantizationType, ...]:
        """ggml types of the layer's gate, up and down experts."""
        return tuple(self._tensor(experts_name(layer, p), f"model.layers.{layer}.mlp.experts").tensor_type
                     for p in PROJECTIONS)

    def natural_formats(self, layer: int) -> tuple[str, str]:
        return natural_formats(self.expert_types(layer), self.cfg.hidden_size, self.cfg.moe_intermediate_size)

    def stored_formats(self) -> dict[int, tuple[str, str]]:
        """MoE layer -> (gate/up, down) formats, for the layers whose down_proj keeps a format of its
        own (what placement's build_plan takes as stored_experts)."""
        pairs = {i: self.natural_formats(i) for i in self._moe_layers()}
        return {i: p for i, p in pairs.items() if p[0] != p[1]}

    def expert_format(self) -> str | None:
        """The gate/up format most MoE layers' experts are stored in (or nearest to): the default for this file."""
        layers = self._moe_layers()
        if not layers:
            return None
        return Counter(self.natural_formats(i)[0] for i in layers).most_common(1)[0][0]

    def expert_blocks(self, layer: int, fmt: str, down_fmt: str | None = None) -> tuple[np.ndarray, ...]:
        """gate, up uint8 [E, I, row_bytes(H)] in `fmt`'s GGUF blocks and down [E, H, row_bytes(I)] in
        down_fmt's (default fmt)."""
        cfg = self.cfg
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        out = []
        for proj, rows, cols in (("gate_proj", I, H), ("up_proj", I, H), ("down_proj", H, I)):
            name = experts_name(layer, proj)
            t = self._tensor(name, f"model.layers.{layer}.mlp.experts.*.{proj}.weight")
            self._check_shape(name, shape_of(t), (E, rows, cols))
            want = (down_fmt or fmt) if proj == "down_proj" else fmt
            if t.tensor_type == GGML_TYPE[want]:
                out.append(t.data)  # the file's own bytes
            else:
                self._warn_requantized(want)
                out.append(_requantize(t, want))
        return tuple(out)

    def _moe_layers(self) -> list[int]:
        return [i for i in range(self.cfg.num_hidden_layers) if self.cfg.is_moe_layer(i)]

    def _warn_requantized(self, fmt: str) -> None:
        """One line for the whole model: the stored types that are not a layer's natural formats."""
        if self._warned:
            return
        self._warned = True
        counts = Counter()
        for i in self._moe_layers():   # a layer loaded as its stored gate/up format keeps its down format
            gate_up, down = self.natural_formats(i)
            for t, want in zip(self.expert_types(i), (fmt, fmt, down if gate_up == fmt else fmt)):
                if t != GGML_TYPE[want]:
                    counts[t.name] += 1
        stored = ", ".join(f"{name} ({n} tensor{'s' * (n > 1)})" for name, n in counts.most_common())
        print(f"hmoe: warning: {self.path.name}: routed experts stored as {stored} are requantized to {fmt} at load "
              f"(the CPU kernels run {', '.join(GGML_TYPE)}, one format for gate and up)", file=sys.stderr)


REQUANT_WEIGHTS = 64 << 20  # weights dequantized per group of experts (256 MB of fp32)


def _requantize(t: ReaderTensor, fmt: str) -> np.ndarray:
    """[E, rows, cols] of another type -> `fmt` blocks, a group of experts at a time, quantized where
    formats_torch.quant_device says (CUDA when present); the bytes of formats.quantize wherever."""
    from cpu_experts.formats_torch import quant_device, quantize

    where = quant_device(fmt)
    E, rows, cols = shape_of(t)
    per = max(1, REQUANT_WEIGHTS // (rows * cols))
    return np.concatenate([quantize(dequantize_rows(t.data[e:e + per], t.tensor_type), fmt, where)
                           for e in range(0, E, per)])


def _to_torch(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Dequantize in row chunks, on a few threads, straight into a tensor of `dtype`."""
    out = torch.empty(shape, dtype=dtype)
    if not out.numel():
        return out
    rows = data.reshape(-1, data.shape[-1])
    flat = out.view(-1, shape[-1])
    step = max(1, CHUNK_BYTES // (4 * shape[-1]))

    def work(start: int) -> None:
        flat[start:start + step] = torch.from_numpy(dequantize_rows(rows[start:start + step], qtype))

    starts = range(0, rows.shape[0], step)
    if len(starts) == 1:
        work(0)
    else:
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(work, starts))
    return out
