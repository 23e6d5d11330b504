"""Small IR-building helpers: types, constants, loops, vector shuffles, intrinsics, atomics."""
from contextlib import contextmanager

from llvmlite import ir

I1, I8, I16, I32, I64 = (ir.IntType(n) for n in (1, 8, 16, 32, 64))
F16, F32 = ir.HalfType(), ir.FloatType()
PTR = ir.PointerType()
VOID = ir.VoidType()


def vec(t, n):
    return ir.VectorType(t, n)


def c(t, v):
    return ir.Constant(t, v)


def splat(t, n, v):
    return ir.Constant(vec(t, n), [v] * n)


def i64(v):
    return ir.Constant(I64, v)


def intrinsic(module, name, ret, args):
    """Declare (once) an external or intrinsic function."""
    if name in module.globals:
        return module.globals[name]
    return ir.Function(module, ir.FunctionType(ret, args), name=name)


def define(module, name, ret, args, internal=False):
    # a module with two weight formats (gate/up vs down) emits each microkernel twice: name.1, ...
    fn = ir.Function(module, ir.FunctionType(ret, args), name=module.get_unique_name(name))
    if internal:
        fn.linkage = "internal"
    return fn, ir.IRBuilder(fn.append_basic_block("entry"))


def local(b, typ, init=None, name=""):
    """A stack slot in the entry block (mem2reg turns it into a register)."""
    entry = b.function.entry_basic_block
    with b.goto_block(entry):
        b.position_at_start(entry)
        slot = b.alloca(typ, name=name)
    slot.type = PTR  # opaque, like every other pointer here (loads and stores name their type)
    slot.allocated_type = typ
    if init is not None:
        b.store(init, slot)
    return slot


@contextmanager
def for_range(b, start, stop, step=1, name="i"):
    """for (i = start; i < stop; i += step) — yields i (i64)."""
    start = i64(start) if isinstance(start, int) else start
    stop = i64(stop) if isinstance(stop, int) else stop
    pre = b.block
    head = b.append_basic_block(f"{name}.head")
    body = b.append_basic_block(f"{name}.body")
    end = b.append_basic_block(f"{name}.end")
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(I64, name=name)
    i.add_incoming(start, pre)
    b.cbranch(b.icmp_signed("<", i, stop), body, end)
    b.position_at_end(body)
    yield i
    nxt = b.add(i, i64(step) if isinstance(step, int) else step)
    i.add_incoming(nxt, b.block)
    b.branch(head)
    b.position_at_end(end)


def specialize(b, flags, emit, known=()):
    """One copy of emit(*bools) per combination of the run-time i1 `flags` (True branch first), so
    the code inside sees each flag as a Python constant."""
    if not flags:
        emit(*known)
        return
    with b.if_else(flags[0]) as (on, off):
        with on:
            specialize(b, flags[1:], emit, known + (True,))
        with off:
            specialize(b, flags[1:], emit, known + (False,))


def gep(b, ptr, index, etype=I8):
    index = i64(index) if isinstance(index, int) else index
    return b.gep(ptr, [index], source_etype=etype)


def _scalar(t):
    return t.element if isinstance(t, ir.VectorType) else t


def load(b, ptr, typ, index=0, align=1):
    """Load typ at ptr + index elements (elements of typ's scalar type)."""
    p = ptr if isinstance(index, int) and index == 0 else gep(b, ptr, index, _scalar(typ))
    return b.load(p, typ=typ, align=align)


def store(b, val, ptr, index=0, align=1):
    p = ptr if isinstance(index, int) and index == 0 else gep(b, ptr, index, _scalar(val.type))
    b.store(val, p, align=align)


def field(b, base, idx, as_ptr=False):
    """base: ptr to i64 slots; slot idx as i64 (or ptr)."""
    v = b.load(gep(b, base, idx, I64), typ=I64, align=8)
    return b.inttoptr(v, PTR) if as_ptr else v


def shuffle(b, v, mask):
    return b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(vec(I32, len(mask)), mask))


def hsum(b, v):
    """Horizontal float sum by halving (deterministic order)."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = shuffle(b, v, list(range(n)))
        hi = shuffle(b, v, list(range(n, 2 * n)))
        v = b.fadd(lo, hi)
    return b.extract_element(v, c(I32, 0))


def pause(b):
    b.call(intrinsic(b.module, "llvm.x86.sse2.pause", VOID, []), [])


def prefetch(b, ptr, locality=3):
    """Read prefetch of ptr's line; locality 3 = prefetcht0 (L1), 2 = t1 (L2), 1 = t2, 0 = nta."""
    fn = intrinsic(b.module, "llvm.prefetch.p0", VOID, [PTR, I32, I32, I32])
    b.call(fn, [ptr, c(I32, 0), c(I32, locality), c(I32, 1)])


def syscall(b, args):
    """libc syscall(2) (resolved from the process at load time)."""
    fn = b.module.globals.get("syscall")
    if fn is None:
        fn = ir.Function(b.module, ir.FunctionType(I64, [I64], var_arg=True), name="syscall")
    return b.call(fn, [i64(a) if isinstance(a, int) else a for a in args])


SYS_FUTEX, FUTEX_WAIT_PRIVATE, FUTEX_WAKE_PRIVATE = 202, 128, 129
SYS_SCHED_YIELD = 24


def futex_wait(b, addr, expected_i32):
    syscall(b, [SYS_FUTEX, b.ptrtoint(addr, I64), FUTEX_WAIT_PRIVATE, b.sext(expected_i32, I64), 0])


def futex_wake_all(b, addr):
    syscall(b, [SYS_FUTEX, b.ptrtoint(addr, I64), FUTEX_WAKE_PRIVATE, 0x7FFFFFFF])


def fma(b, x, y, z):
    """x*y + z for scalars or vectors (llvm.fma)."""
    t = x.type
    suffix = f"v{t.count}f32" if isinstance(t, ir.VectorType) else "f32"
    return b.call(intrinsic(b.module, f"llvm.fma.{suffix}", t, [t, t, t]), [x, y, z])
