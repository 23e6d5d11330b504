"""The hybrid orchestrator: CPU experts overlapped with the GPU, and when to stream experts instead.

| module | job |
| --- | --- |
| `hybrid.py` | `HybridExperts`: a GPU model's routed experts on cpu_experts, stream-ordered through host functions; `attach(model)` |
| `cuda_host.py` | `cudaLaunchHostFunc` through ctypes |
| `threshold.py` | the prefill token count above which streaming a layer's experts to the GPU beats the CPU (pure) |
| `measure.py` | PCIe pinned bandwidth and the CPU expert curve on this machine; `python -m orchestrator.measure` |
| `layer_bench.py` | one MoE layer's decode step through HybridExperts (eager and CUDA graph) against its CPU experts alone |

Decisions and what is left: NOTES.md.
"""
