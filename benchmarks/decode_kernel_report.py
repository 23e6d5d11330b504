"""Compile the MLA decode kernels for sm_90a without a GPU and report what ptxas and Triton made of
them: registers, spills, shared memory, wgmma / mma.sync / TMA instruction counts and the MMA layouts
(warpsPerCTA [8, 1] on a 64-row product means both warpgroups compute the same rows). Needs a
Triton with its bundled ptxas (pip install triton==3.6.0, the GPU machine's version).

    python3 benchmarks/decode_kernel_report.py tma 64 8 64 2      # kernel block_h num_warps block_n stages
    python3 benchmarks/decode_kernel_report.py tma_keys 32 4 64 2
    python3 benchmarks/decode_kernel_report.py generic 64 8 64 2
"""

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpu_attention import triton_decode, triton_decode_tma

RANK, ROPE, PAGE = 512, 64, 64


def compile_kernel(kernel: str, block_h: int, num_warps: int, block_n: int, num_stages: int, direct: bool = False):
    sig = {"QL": "*bf16", "QP": "*bf16"}
    if kernel == "generic":
        fn = triton_decode._absorbed_split_kernel
        sig |= {"CACHE": "*bf16", "SCALES": "*bf16"}
        ints = ("stride_qlb stride_qlt stride_qlh stride_qpb stride_qpt stride_qph stride_cp stride_cn stride_sp "
                "stride_sn stride_ptb").split()
        const = dict(RANK=RANK, ROPE=ROPE, BLOCK_C=RANK, BLOCK_R=ROPE, PAGE=PAGE, BLOCK_H=block_h, BLOCK_N=block_n,
                     FP8=False, GROUP=128, DIRECT=direct, PAGE_TILES=PAGE % block_n == 0, V_SPLIT=1, PRECISION="tf32")
    else:
        tma = triton_decode_tma
        fn = tma._absorbed_tma_keys_kernel if kernel == "tma_keys" else tma._absorbed_tma_kernel
        sig |= {"C_DESC": f"tensordesc<bf16[{block_n}, {RANK // 2}]>", "R_DESC": f"tensordesc<bf16[{block_n}, {ROPE}]>"}
        ints = "stride_qlb stride_qlt stride_qlh stride_qpb stride_qpt stride_qph stride_ptb".split()
        const = dict(HALF=RANK // 2, ROPE=ROPE, PAGE=PAGE, BLOCK_H=block_h, BLOCK_N=block_n, NUM_STAGES=num_stages,
                     DIRECT=direct)
    sig |= {"PAGE_TABLE": "*i32", "SEQ_LENS": "*i32", "OUT": "*bf16", "O_PART": "*fp32", "LSE_PART": "*fp32"}
    ints += "stride_ob stride_or stride_pb stride_pr stride_ps stride_lb stride_lr num_heads num_new split_len".split()
    sig |= {n: "i32" for n in ints} | {"qk_scale": "fp32"} | {k: "constexpr" for k in const}
    # what Triton's launcher would specialise at run time: 16-byte aligned pointers, strides that are multiples of 16
    aligned = [n for n, t in sig.items() if t.startswith("*") or (n.startswith("stride") and n not in ("stride_lr",))]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned + ["num_heads", "split_len"]}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=num_warps,
                                                                              num_stages=num_stages))


def report(compiled) -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/k.ptx", "w") as f:
            f.write(compiled.asm["ptx"])
        err = subprocess.run([ptxas, "-arch=sm_90a", "-v", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"],
                             capture_output=True, text=True).stderr
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    return dict(registers=int(re.search(r"Used (\d+) registers", err).group(1)),
                spill_stores=int(re.search(r"(\d+) bytes spill stores", err).group(1)),
                shared_bytes=compiled.metadata.shared,
                wgmma=len(re.findall(r"wgmma.mma_async", ptx)), mma_sync=len(re.findall(r"mma.sync", ptx)),
                tma_loads=len(re.findall(r"cp.async.bulk.tensor", ptx)),
                mma_layouts=sorted(set(re.findall(r"warpsPerCTA = \[\d+, \d+\], instrShape = \[[\d, ]+\]", ttgir))))


if __name__ == "__main__":
    name, *nums = sys.argv[1:]
    for k, v in report(compile_kernel(name, *map(int, nums))).items():
        print(f"{k}: {v}")
