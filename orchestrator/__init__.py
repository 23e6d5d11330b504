"""The hybrid orchestrator: CPU experts overlapped with the GPU, and when to stream experts instead.

| module | job |
| --- | --- |
| `hybrid.py` | `HybridExperts`: a GPU model's routed experts on cpu_experts, stream-ordered through host functions; `attach(model)` |
| `cuda_host.py` | `cudaLaunchHostFunc` through ctypes; stream memory operations (write/wait a mapped host word) and their probe |
| `doorbell.py` | the memops hand-over's CPU side (`HMOE_HANDOVER=memops`): mailbox and native dispatcher thread |
| `threshold.py` | the prefill token count above which streaming a layer's experts to the GPU beats the CPU (pure) |
| `measure.py` | PCIe pinned bandwidth and the CPU expert curve on this machine; `python -m orchestrator.measure` |
| `streamed.py` | streamed-expert prefill: `StreamedPrefill` (host layers page-locked in place, two device slots, copy stream), `StreamedExperts` (per call: streamed for T >= threshold on the GPU, else the CPU path), `attach` |
| `schedule.py` | the double-buffer schedule (which slot holds which layer; copy / prefetch / compute order), pure |
| `gpu_dequant.py` | cpu_experts' repacked expert layout -> bf16/fp32 weights with torch ops (GPU, or CPU in tests) |
| `stream_bench.py` | V3-shape prefill of N MoE layers: CPU experts vs streamed, PCIe busy fraction; `python -m orchestrator.stream_bench` |
| `layer_bench.py` | one MoE layer's decode step through HybridExperts (eager and CUDA graph) against its CPU experts alone |

Decisions and what is left: NOTES.md.
"""
