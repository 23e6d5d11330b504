"""`hmoe doctor`: what this machine offers the CPU experts (ISA, cores, NUMA, read bandwidth)."""
import json


def register(subparsers):
    p = subparsers.add_parser("doctor", help="print ISA, cores, NUMA nodes and measured read bandwidth",
                              description="Reports the CPU and vector ISA the kernels will use, physical cores, "
                                          "NUMA nodes and libnuma, and measures DRAM read bandwidth.")
    p.add_argument("--threads", type=int, default=None, help="threads for the bandwidth test (default: physical cores)")
    p.add_argument("--gib", type=float, default=2.0, help="buffer size of the bandwidth test in GiB (default 2)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def facts(threads=None, gib=2.0) -> dict:
    import psutil
    from cpu_experts import numa
    from cpu_experts.bandwidth import measure_read_bandwidth
    from cpu_experts.bench import cpu_model
    from cpu_experts.isa import enabled_features, host_cpu, host_isa, supported
    cpu, features = host_cpu()
    have = enabled_features(features)
    cpus = numa.worker_cpus(None)
    threads = threads or len(cpus)
    return {
        "cpu": cpu_model(), "llvm_cpu": cpu, "isa": host_isa().name, "isas_available": supported(features),
        "amx": sorted(f for f in have if f.startswith("amx")),
        "avx512": sorted(f for f in have if f.startswith("avx512")),
        "cores_physical": psutil.cpu_count(logical=False), "cpus_logical": psutil.cpu_count(logical=True),
        "worker_cpus": cpus, "numa_nodes": {str(k): v for k, v in numa.node_cpus().items()},
        "libnuma": numa.effective_policy("interleave") == "interleave",
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "read_bandwidth_gbs": round(measure_read_bandwidth(threads, int(gib * 2**30), cpus=cpus), 1),
        "bandwidth_threads": threads,
    }


def run(args) -> int:
    f = facts(args.threads, args.gib)
    if args.json:
        print(json.dumps(f, indent=1))
    else:
        for k, v in f.items():
            print(f"{k:20s} {v}")
    return 0
