"""Rules files: every user error is one line that names the file and line; messages are pinned."""

import textwrap

import pytest

from placement.inventory import hypothetical
from placement.schema import parse_rules
from placement.yaml_lines import RulesError

ONE_GPU = hypothetical([24], 64)
NO_GPU = hypothetical([], 64)


def parse(text, inventory=ONE_GPU):
    return parse_rules(textwrap.dedent(text).lstrip("\n"), "r.yaml", inventory)


def error(text, inventory=ONE_GPU) -> str:
    with pytest.raises(RulesError) as e:
        parse(text, inventory)
    return str(e.value)


def test_a_full_rule_parses_with_its_lines():
    rules = parse(r"""
        name: test
        description: all fields
        defaults: {device: cpu, op: torch, dtype: auto}
        rules:
          - match: 'model\.layers\.\d+\.mlp\.experts'
            layers: 3-5, 9
            device: cpu
            op: jit
            quant: q4_k
            prefill: {device: cuda, op: stream, min_tokens: 512}
            threads: 8
            numa: split
            gpu_experts: {count: 4, quant: fp8}
          - match: 'model\.layers\.\d+\.self_attn'
            device: cuda
            op: mla
            cache: {dtype: fp8, page_size: 64}
    """)
    experts, attn = rules.rules
    assert experts.line == 5 and experts.line_of("quant") == 9 and experts.layers == {3, 4, 5, 9}
    assert experts.format == "q4_k" and experts.threads == 8 and experts.numa == "split"
    assert experts.prefill.device == "cuda:0" and experts.prefill.min_tokens == 512
    assert (experts.gpu_experts.count, experts.gpu_experts.device, experts.gpu_experts.format) == (4, "cuda:0", "fp8")
    assert attn.device == "cuda:0" and attn.cache.dtype == "fp8" and attn.cache.page_size == 64
    assert experts.gpu_experts.line == 13


@pytest.mark.parametrize("text, message", [
    ("name: x\nrules:\n  - match: 'a'\n    device: [cpu\n",
     "r.yaml:5: YAML syntax error: expected ',' or ']', but got '<stream end>'"),
    ("name: x\nrules:\n  - match: \"model\\.layers\"\n",
     "r.yaml:3: YAML syntax error: found unknown escape character '.'"),
    ("", "r.yaml:1: the file is empty; a rules file has 'name' and 'rules'"),
    ("rules: []\n", "r.yaml:1: missing required key 'name'"),
    ("name: x\nrules: {}\n", "r.yaml:2: 'rules' must be a list of rules, found a mapping"),
    ("name: x\nrules:\n  - match: a\n    devcie: cpu\n",
     "r.yaml:4: unknown key 'devcie' in rule 1; did you mean 'device'?"),
    ("name: x\nrulez: []\n", "r.yaml:2: unknown key 'rulez' in the rules file; did you mean 'rules'?"),
    ("name: x\nrules:\n  - match: a\n    colour: red\n",
     "r.yaml:4: unknown key 'colour' in rule 1 (expected one of: match, layers, device, op, quant, dtype, prefill, "
     "cache, threads, numa, gpu_experts)"),
    ("name: x\nrules:\n  - match: a\n    cache: {dtyp: bf16}\n",
     "r.yaml:4: unknown key 'dtyp' in 'cache'; did you mean 'dtype'?"),
    ("name: x\nrules:\n  - match: 'model.(layers'\n",
     "r.yaml:3: 'match' of rule 1 is not a valid regex: missing ), unterminated subpattern at position 6 in "
     "'model.(layers'"),
    ("name: x\nrules:\n  - match: a\n    op: jti\n", "r.yaml:4: unknown op 'jti'; did you mean 'jit'?"),
    ("name: x\nrules:\n  - match: a\n    device: gpu\n", "r.yaml:4: 'device' must be cpu, cuda or cuda:N, found 'gpu'"),
    ("name: x\nrules:\n  - match: a\n    device: cuda:1\n",
     "r.yaml:4: device 'cuda:1' is not present: the machine described by --vram has 1 GPU (cuda:0)"),
    ("name: x\nrules:\n  - match: a\n    quant: q4k\n", "r.yaml:4: unknown format 'q4k' for 'quant'; did you mean 'q4_k'?"),
    ("name: x\nrules:\n  - match: a\n    quant: q4_k\n", "r.yaml:4: op 'torch' on cpu runs fp32, bf16, fp16, fp8, not q4_k"),
    ("name: x\nrules:\n  - match: a\n    device: cuda\n    op: jit\n", "r.yaml:5: op 'jit' runs on cpu, not on cuda:0"),
    ("name: x\nrules:\n  - match: a\n    device: cuda:0\n    op: mla\n    quant: q8_0\n",
     "r.yaml:6: op 'mla' on cuda runs bf16, fp8, not q8_0"),
    ("name: x\nrules:\n  - match: a\n    quant: bf16\n    dtype: bf16\n",
     "r.yaml:5: rule 1 sets both 'quant' and 'dtype'; they name the same thing, keep one"),
    ("name: x\nrules:\n  - match: a\n    device: cpu\n    device: cuda\n",
     "r.yaml:5: key 'device' appears twice in one mapping (first on line 4)"),
    ("name: x\nrules:\n  - device: cpu\n", "r.yaml:3: rule 1 needs 'match' (a regex on module names) or 'layers' (e.g. 3-60)"),
    ("name: x\nrules:\n  - match: a\n    layers: 3..60\n",
     "r.yaml:4: 'layers' must be layer numbers and ranges like 3-60 or 0-2,5, found '3..60'"),
    ("name: x\nrules:\n  - match: a\n    layers: []\n", "r.yaml:4: 'layers' is empty; leave it out to match every layer"),
    ("name: x\nrules:\n  - match: a\n    layers: 60-3\n", "r.yaml:4: 'layers' range 60-3 runs backwards; write 3-60"),
    ("name: x\nrules:\n  - match: a\n    threads: 8\n",
     "r.yaml:4: 'threads' sets up the CPU experts (op: jit), but this rule uses op 'torch'"),
    ("name: x\nrules:\n  - match: a\n    op: jit\n    numa: interleaved\n",
     "r.yaml:5: unknown numa policy 'interleaved'; did you mean 'interleave'?"),
    ("name: x\nrules:\n  - match: a\n    op: jit\n    quant: q8_0\n    prefill: {device: cuda:0, op: torch}\n",
     "r.yaml:6: op 'torch' on cuda runs fp32, bf16, fp16, fp8, not q8_0"),
    ("name: x\nrules:\n  - match: a\n    prefill: {device: cuda:0}\n",
     "r.yaml:4: prefill on cuda:0 with op 'torch' would need a second copy of the weights there; use op: stream, "
     "which streams them from RAM"),
    ("name: x\nrules:\n  - match: a\n    op: jit\n    prefill: {op: stream, min_tokens: 0}\n",
     "r.yaml:5: op 'stream' runs on cuda, not on cpu"),
    ("name: x\nrules:\n  - match: a\n    op: jit\n    prefill: {device: cuda, op: stream, min_tokens: 0}\n",
     "r.yaml:5: 'min_tokens' must be a positive integer or auto, found 0"),
    ("name: x\nrules:\n  - match: a\n    device: cuda\n    gpu_experts: 8\n",
     "r.yaml:5: 'gpu_experts' keeps some experts on a GPU while the rest run on the CPU, but this rule already "
     "places the experts on cuda:0"),
    ("name: x\nrules:\n  - match: a\n    op: jit\n    gpu_experts: 0\n",
     "r.yaml:5: 'gpu_experts' must be a positive number of experts per layer, found 0"),
    ("name: x\nrules:\n  - match: a\n    cache: {dtype: int4}\n",
     "r.yaml:4: unknown cache dtype 'int4' (expected one of: fp32, bf16, fp16, fp8)"),
    ("name: x\ndefaults: {op: mla}\nrules: []\n", "r.yaml:2: op 'mla' runs on cuda, not on cpu"),
])
def test_errors_name_the_line(text, message):
    assert error(text) == message


def test_a_missing_gpu_is_named_without_any_gpu():
    assert error("name: x\nrules:\n  - match: a\n    device: cuda:0\n", NO_GPU) == (
        "r.yaml:4: device 'cuda:0' is not present: the machine described by --vram has no CUDA GPU "
        "(plan for a GPU you are not on with --vram GiB)")
    assert error("name: x\nrules:\n  - match: a\n    op: jit\n    gpu_experts: 2\n", NO_GPU).startswith(
        "r.yaml:5: 'gpu_experts' needs a GPU, and the machine has no CUDA GPU")


def test_layers_forms():
    rules = parse("""
        name: x
        rules:
          - {layers: 7}
          - {layers: [0-2, 5]}
          - {layers: '10-12,20'}
    """)
    assert [r.layers for r in rules.rules] == [{7}, {0, 1, 2, 5}, {10, 11, 12, 20}]
    assert all(r.match == ".*" for r in rules.rules)


def test_load_rules_names_a_missing_file(tmp_path):
    from placement.defaults import resolve

    with pytest.raises(RulesError, match=r"nope.yaml: no such rules file, and no shipped rules of that name "
                                         r"\(shipped: all-gpu, cpu-only"):
        resolve(tmp_path / "nope.yaml")
