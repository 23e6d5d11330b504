"""The rules file: its keys, one frozen dataclass per rule, and the checks that need no model.

Every error is one `RulesError` that starts with `file:line:`. Checks that need the model (which
modules a rule places, row sizes against block formats) live in placement/plan.py.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from .formats import CACHE_DTYPES, FORMATS
from .inventory import Inventory
from .ops import OPS, device_problem, device_type, format_problem, weights_home
from .yaml_lines import LineDict, RulesError, load

TOP_KEYS = ("name", "description", "defaults", "rules")
DEFAULT_KEYS = ("device", "op", "quant", "dtype")
RULE_KEYS = ("match", "layers", "device", "op", "quant", "dtype", "prefill", "cache", "threads", "numa",
             "gpu_experts")
PREFILL_KEYS = ("device", "op", "min_tokens")
CACHE_KEYS = ("dtype", "page_size")
GPU_EXPERTS_KEYS = ("count", "device", "quant", "routing")
NUMA_POLICIES = ("interleave", "split", "replicate", "none")
AUTO = "auto"

_DEVICE = re.compile(r"cpu|cuda(?::(\d+))?")


@dataclass(frozen=True)
class Prefill:
    """Where and how a module runs for prompts of at least `min_tokens` new tokens."""
    device: str
    op: str
    min_tokens: int | None  # None: "auto", the orchestrator's threshold from measured bandwidths
    line: int


@dataclass(frozen=True)
class CacheOptions:
    dtype: str | None  # None: the attention weights' float dtype (bf16 when they are fp8)
    page_size: int | None  # None: one contiguous buffer per sequence
    line: int


@dataclass(frozen=True)
class GpuExperts:
    """Keep `count` experts of each matched layer on `device` (in torch); the rest stay in the CPU
    kernels. Which ones: the most used in the `routing` statistics file, else experts 0..count-1."""
    count: int
    device: str
    format: str
    line: int
    routing: str | None = None  # path of a routing statistics file (placement/routing.py)


@dataclass(frozen=True)
class Rule:
    index: int  # 1-based position in `rules`
    line: int
    match: str
    pattern: re.Pattern = field(compare=False, repr=False)
    layers: frozenset[int] | None
    layers_text: str | None
    device: str | None
    op: str | None
    format: str | None  # from `quant` or `dtype`
    prefill: Prefill | None
    cache: CacheOptions | None
    threads: int | None  # None: auto (the CPU's physical cores)
    numa: str | None
    gpu_experts: GpuExperts | None
    key_lines: tuple[tuple[str, int], ...] = field(compare=False, repr=False)

    def matches(self, name: str, layer: int | None) -> bool:
        if self.layers is not None and (layer is None or layer not in self.layers):
            return False
        return self.pattern.fullmatch(name) is not None

    def line_of(self, key: str) -> int:
        return dict(self.key_lines).get(key, self.line)

    @property
    def label(self) -> str:
        return f"rule {self.index} (line {self.line})"


@dataclass(frozen=True)
class Defaults:
    """What places a module that no rule matches, and fills fields a rule leaves out."""
    device: str = "cpu"
    op: str = "torch"
    format: str = AUTO  # the checkpoint's dtype
    line: int = 0


@dataclass(frozen=True)
class RuleSet:
    name: str
    description: str
    defaults: Defaults
    rules: tuple[Rule, ...]
    source: str


def load_rules(path: str | Path, inventory: Inventory) -> RuleSet:
    path = Path(path)
    if not path.is_file():
        raise RulesError(f"{path}: no such rules file")
    return parse_rules(path.read_text(), str(path), inventory)


def parse_rules(text: str, source: str, inventory: Inventory) -> RuleSet:
    return _Parser(source, inventory).ruleset(load(text, source))


def did_you_mean(word, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f" (expected one of: {', '.join(choices)})"


class _Parser:
    def __init__(self, source: str, inventory: Inventory):
        self.source, self.inventory = source, inventory

    def fail(self, line: int, message: str):
        raise RulesError(f"{self.source}:{line}: {message}")

    def mapping(self, value, line: int, what: str, keys: tuple[str, ...]) -> LineDict:
        if not isinstance(value, LineDict):
            self.fail(line, f"{what} must be a mapping of keys, found {_show(value)}")
        for key in value:
            if key not in keys:
                self.fail(value.line_of(key), f"unknown key '{key}' in {what}{did_you_mean(key, keys)}")
        return value

    def ruleset(self, doc) -> RuleSet:
        if doc is None:
            self.fail(1, "the file is empty; a rules file has 'name' and 'rules'")
        doc = self.mapping(doc, 1, "the rules file", TOP_KEYS)
        for key in ("name", "rules"):
            if key not in doc:
                self.fail(doc.line, f"missing required key '{key}'")
        name = self.text(doc, "name", "name")
        description = self.text(doc, "description", "description") if "description" in doc else ""
        defaults = self.defaults(doc["defaults"], doc.line_of("defaults")) if "defaults" in doc else Defaults()
        items = doc["rules"]
        if not isinstance(items, list):
            self.fail(doc.line_of("rules"), f"'rules' must be a list of rules, found {_show(items)}")
        rules = tuple(self.rule(i + 1, item, doc.line_of("rules"), defaults) for i, item in enumerate(items))
        return RuleSet(name, description, defaults, rules, self.source)

    def text(self, d: LineDict, key: str, what: str) -> str:
        value = d[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(d.line_of(key), f"'{what}' must be a non-empty string, found {_show(value)}")
        return value.strip()

    def defaults(self, value, line: int) -> Defaults:
        d = self.mapping(value, line, "'defaults'", DEFAULT_KEYS)
        device = self.device(d, "device") if "device" in d else "cpu"
        op = self.op(d, "op") if "op" in d else "torch"
        fmt = self.format(d, "'defaults'") or AUTO
        self.check_device_for_op(op, device, d.line_of("op" if "op" in d else "device"))
        self.check_format_for_op(op, device, fmt, d.line_of("quant" if "quant" in d else "dtype"))
        return Defaults(device, op, fmt, d.line)

    def rule(self, index: int, value, line: int, defaults: Defaults) -> Rule:
        what = f"rule {index}"
        d = self.mapping(value, line, what, RULE_KEYS)
        if "match" not in d and "layers" not in d:
            self.fail(d.line, f"{what} needs 'match' (a regex on module names) or 'layers' (e.g. 3-60)")
        match = self.text(d, "match", "match") if "match" in d else ".*"
        try:
            pattern = re.compile(match)
        except re.error as e:
            self.fail(d.line_of("match"), f"'match' of {what} is not a valid regex: {e} in '{match}'")
        layers, layers_text = self.layers(d) if "layers" in d else (None, None)
        device = self.device(d, "device") if "device" in d else None
        op = self.op(d, "op") if "op" in d else None
        fmt = self.format(d, what)
        # Resolve against the defaults to check what can be checked without a model.
        r_device, r_op, r_fmt = device or defaults.device, op or defaults.op, fmt or defaults.format
        op_line = d.line_of("op" if "op" in d else "device")
        self.check_device_for_op(r_op, r_device, op_line)
        self.check_format_for_op(r_op, r_device, r_fmt, d.line_of("quant" if "quant" in d else "dtype"))
        prefill = self.prefill(d, r_device, r_op, r_fmt) if "prefill" in d else None
        cache = self.cache(d) if "cache" in d else None
        threads = self.threads(d, r_op) if "threads" in d else None
        numa = self.numa(d, r_op) if "numa" in d else None
        gpu_experts = self.gpu_experts(d, r_device) if "gpu_experts" in d else None
        return Rule(index, d.line, match, pattern, layers, layers_text, device, op, fmt, prefill, cache, threads,
                    numa, gpu_experts, tuple(d.key_lines.items()))

    # -- single fields

    def device(self, d: LineDict, key: str) -> str:
        value = d[key]
        m = _DEVICE.fullmatch(value) if isinstance(value, str) else None
        if m is None:
            self.fail(d.line_of(key), f"'{key}' must be cpu, cuda or cuda:N, found {_show(value)}")
        device = "cuda:0" if value == "cuda" else value
        if not self.inventory.has(device):
            machine = "this machine" if self.inventory.detected else "the machine described by --vram"
            hint = "" if self.inventory.gpus else " (plan for a GPU you are not on with --vram GiB)"
            self.fail(d.line_of(key), f"device '{device}' is not present: {machine} has "
                                      f"{self.inventory.describe_gpus()}{hint}")
        return device

    def op(self, d: LineDict, key: str) -> str:
        value = d[key]
        if value not in OPS:
            self.fail(d.line_of(key), f"unknown op {_show(value)}{did_you_mean(value, OPS)}")
        return value

    def format(self, d: LineDict, what: str) -> str | None:
        if "quant" in d and "dtype" in d:
            self.fail(d.line_of("dtype"), f"{what} sets both 'quant' and 'dtype'; they name the same thing, keep one")
        key = "quant" if "quant" in d else "dtype" if "dtype" in d else None
        if key is None:
            return None
        value = d[key]
        if value != AUTO and value not in FORMATS:
            choices = list(FORMATS) + [AUTO]
            self.fail(d.line_of(key), f"unknown format {_show(value)} for '{key}'{did_you_mean(value, choices)}")
        return value

    def layers(self, d: LineDict) -> tuple[frozenset[int], str]:
        value, line = d["layers"], d.line_of("layers")
        parts = value if isinstance(value, list) else [value]
        layers: set[int] = set()
        for part in parts:
            for piece in str(part).split(",") if not isinstance(part, bool) else ["?"]:
                m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", piece)
                if m is None:
                    self.fail(line, f"'layers' must be layer numbers and ranges like 3-60 or 0-2,5, found {_show(value)}")
                lo, hi = int(m[1]), int(m[2] or m[1])
                if hi < lo:
                    self.fail(line, f"'layers' range {lo}-{hi} runs backwards; write {hi}-{lo}")
                layers.update(range(lo, hi + 1))
        if not layers:
            self.fail(line, "'layers' is empty; leave it out to match every layer")
        text = ",".join(str(p) for p in parts)
        return frozenset(layers), text

    def prefill(self, d: LineDict, device: str, op: str, fmt: str) -> Prefill:
        p = self.mapping(d["prefill"], d.line_of("prefill"), "'prefill'", PREFILL_KEYS)
        if "device" not in p and "op" not in p:
            self.fail(p.line, "'prefill' needs a 'device' or an 'op' to switch to for long prompts")
        p_device = self.device(p, "device") if "device" in p else device
        p_op = self.op(p, "op") if "op" in p else op
        self.check_device_for_op(p_op, p_device, p.line_of("op" if "op" in p else "device"))
        self.check_format_for_op(p_op, p_device, fmt, p.line_of("op" if "op" in p else "device"))
        home = weights_home(op, device)
        if weights_home(p_op, p_device) != home:
            if OPS[p_op].weights_on_host:
                self.fail(p.line, f"prefill op '{p_op}' streams weights from RAM, but this rule keeps them on {home}")
            self.fail(p.line, f"prefill on {p_device} with op '{p_op}' would need a second copy of the weights there; "
                              f"use op: stream, which streams them from RAM")
        min_tokens = p.get("min_tokens", AUTO)
        if min_tokens != AUTO and (isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1):
            self.fail(p.line_of("min_tokens"),
                      f"'min_tokens' must be a positive integer or auto, found {_show(min_tokens)}")
        return Prefill(p_device, p_op, None if min_tokens == AUTO else min_tokens, p.line)

    def cache(self, d: LineDict) -> CacheOptions:
        c = self.mapping(d["cache"], d.line_of("cache"), "'cache'", CACHE_KEYS)
        dtype = c.get("dtype")
        if dtype is not None and dtype not in CACHE_DTYPES:
            self.fail(c.line_of("dtype"), f"unknown cache dtype {_show(dtype)}{did_you_mean(dtype, CACHE_DTYPES)}")
        page = c.get("page_size")
        if page is not None and (isinstance(page, bool) or not isinstance(page, int) or page < 1):
            self.fail(c.line_of("page_size"),
                      f"'page_size' must be a positive integer (tokens per page), found {_show(page)}")
        return CacheOptions(dtype, page, c.line)

    def threads(self, d: LineDict, op: str) -> int | None:
        value = d["threads"]
        if value != AUTO and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            self.fail(d.line_of("threads"), f"'threads' must be a positive integer or auto, found {_show(value)}")
        self.needs_jit("threads", d, op)
        return None if value == AUTO else value

    def numa(self, d: LineDict, op: str) -> str:
        value = d["numa"]
        if value not in NUMA_POLICIES:
            self.fail(d.line_of("numa"), f"unknown numa policy {_show(value)}{did_you_mean(value, NUMA_POLICIES)}")
        self.needs_jit("numa", d, op)
        return value

    def needs_jit(self, key: str, d: LineDict, op: str) -> None:
        if op != "jit":
            self.fail(d.line_of(key), f"'{key}' sets up the CPU experts (op: jit), but this rule uses op '{op}'")

    def gpu_experts(self, d: LineDict, device: str) -> GpuExperts:
        value, line = d["gpu_experts"], d.line_of("gpu_experts")
        if device_type(device) != "cpu":
            self.fail(line, f"'gpu_experts' keeps some experts on a GPU while the rest run on the CPU, but this rule "
                            f"already places the experts on {device}")
        routing = None
        if isinstance(value, LineDict):
            g = self.mapping(value, line, "'gpu_experts'", GPU_EXPERTS_KEYS)
            if "count" not in g:
                self.fail(g.line, "'gpu_experts' needs 'count' (experts per layer to keep on the GPU)")
            count, count_line = g["count"], g.line_of("count")
            g_device = self.device(g, "device") if "device" in g else self.default_gpu(line)
            fmt = g.get("quant", "bf16")
            if fmt not in FORMATS:
                self.fail(g.line_of("quant"), f"unknown format {_show(fmt)}{did_you_mean(fmt, FORMATS)}")
            # device cpu: the same split with the torch part on the CPU (what CI tests the split with)
            self.check_format_for_op("torch", g_device, fmt, g.line_of("quant"))
            if "routing" in g:
                routing = self.routing_path(g, "routing")
        else:
            count, count_line, g_device, fmt = value, line, self.default_gpu(line), "bf16"
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            self.fail(count_line, f"'gpu_experts' must be a positive number of experts per layer, found {_show(count)}")
        return GpuExperts(count, g_device, fmt, line, routing)

    def routing_path(self, d: LineDict, key: str) -> str:
        """A statistics file; a relative path is relative to the rules file's folder. Read by the plan."""
        value = d[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(d.line_of(key), f"'{key}' must be the path of a routing statistics file "
                                      f"(`hmoe bench --collect-routing FILE`), found {_show(value)}")
        path = Path(value.strip()).expanduser()
        return str(path if path.is_absolute() else Path(self.source).parent / path)

    def default_gpu(self, line: int) -> str:
        if not self.inventory.gpus:
            self.fail(line, "'gpu_experts' needs a GPU, and the machine has no CUDA GPU "
                            "(plan for a GPU you are not on with --vram GiB)")
        return "cuda:0"

    # -- cross-field

    def check_device_for_op(self, op: str, device: str, line: int) -> None:
        problem = device_problem(op, device)
        if problem:
            self.fail(line, problem)

    def check_format_for_op(self, op: str, device: str, fmt: str, line: int) -> None:
        problem = None if fmt == AUTO else format_problem(op, device, fmt)  # auto: checked in the plan
        if problem:
            self.fail(line, problem)


def _show(value) -> str:
    return f"'{value}'" if isinstance(value, str) else repr(value) if not isinstance(value, dict) else "a mapping"
