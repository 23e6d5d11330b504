"""LLVM IR generation for the MoE kernels: pure functions from (format, ISA, tiles) to IR text."""
