"""Compile every kernel and autotune config for a GPU architecture, offline, and report what each one costs.

    python -m kernels.resources [--arch 90] [--dtype bf16 ...] [--kernel NAME ...] [--max-configs N] [--out F]

No GPU is needed: Triton compiles to PTX and its bundled ptxas assembles the cubin for the named architecture
(default sm_90, the H100/H200). For each kernel at the paper's shapes, each dtype and each autotune config it
would try there (after the kernel's own config pruning) it reports the registers per thread, the bytes spilled
to local memory per thread (stores + loads, from ``ptxas -v``), the shared memory per program, an estimate of
how many programs fit one SM at once (registers, warps, shared memory), which MMA instructions the PTX uses, and
the SASS instruction counts of the kernel and of its longest loop body (``nvdisasm``).
The arguments are specialised as Triton specialises them at run time for contiguous tensors: unit strides
become constants and pointers and multiples of 16 carry the divisibility hint.

Uses: a config that spills, or fits one program per SM, will not win the autotuning and only costs compile time;
a kernel that does not compile for the GPU at all (an error the interpreter cannot show) fails here, on any
machine. Must run without ``TRITON_INTERPRET`` (Triton fixes compiled or interpreted mode at import).
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
KERNELS = ("agent_fwd", "agent_bwd", "masked_bits", "masked_fwd", "masked_combine", "masked_bwd", "sum_partials",
           "msda_fwd", "msda_bwd", "labels", "depthwise")
# Per-SM limits of sm_90 (H100/H200): registers, resident warps, shared memory, resident programs.
SM_REGISTERS, SM_WARPS, SM_SHARED, SM_PROGRAMS = 65536, 64, 228 * 1024, 32
SMS = 132  # H100 SXM multiprocessors, for the split counts the wrappers would choose


@dataclass(frozen=True)
class Ptr:
    """A tensor argument: its element type in Triton's spelling (bf16, fp32, i64, i32, i8)."""

    dtype: str


@dataclass(frozen=True)
class Variant:
    """One kernel at one shape: the JIT function, its argument values (constexprs included) and its configs."""

    kernel: str
    case: str
    fn: Any
    args: dict[str, Any]
    configs: list[Any]


@dataclass(frozen=True)
class Result:
    kernel: str
    case: str
    dtype: str
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    programs_per_sm: int
    mma: str
    instructions: int
    loop_instructions: int
    seconds: float


@dataclass(frozen=True)
class _FixedConfig:
    """A launch without autotuning: num_warps only, no meta-parameters."""

    num_warps: int
    num_stages: int = 3
    kwargs: dict | None = None


def _contiguous(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split(extent: int, quantum: int, other_axis: int) -> tuple[int, int]:
    """kernels._triton_utils.split_extent on an SMS-multiprocessor GPU (two waves)."""
    quanta = _cdiv(extent, quantum)
    splits = min(quanta, max(1, _cdiv(2 * SMS, other_axis)))
    length = _cdiv(quanta, splits) * quantum
    return _cdiv(extent, length), length


def variants(dtype: str) -> list[Variant]:
    """Every kernel at the paper's shapes (bench/test_kernels.py's batch-8 cases) for inputs of ``dtype``."""
    import torch

    from kernels import _triton_utils as u
    from kernels import agent_triton as at
    from kernels import masked_triton as mt

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    x = Ptr(dtype)
    f32, i32, i8 = Ptr("fp32"), Ptr("i32"), Ptr("i8")
    prec = dict(PRECISION=u.dot_precision(torch_dtype), UPCAST=False)
    out: list[Variant] = []

    for case, (b, h, n, m, d, shared) in {"refine-b8": (8, 8, 21760, 100, 32, False),
                                          "rein-b8": (8, 1, 1024, 100, 1024, True)}.items():
        qs, ks = _contiguous((b, h, n, d)), _contiguous((1 if shared else b, h, m, d))
        kb = 0 if shared else ks[0]
        fwd_d, bwd_d = (at.block_d(d, m, torch_dtype.itemsize, direction) for direction in ("fwd", "bwd"))
        common = dict(HEAD_DIM=d, BLOCK_M=u.tile(m), **prec)
        strides = dict(zip(("sqb", "sqh", "sqn", "sqd"), qs)) | dict(skb=kb, skh=ks[1], skm=ks[2], skd=ks[3],
                                                                      svb=kb, svh=ks[1], svm=ks[2], svd=ks[3])
        fwd = dict(Q=x, K=x, V=x, O=x, LSE=f32, **strides, **dict(zip(("sob", "soh", "son", "sod"), qs)),
                   H=h, N=n, M=m, scale_log2e=1.0, STORE_LSE=True, BLOCK_D=fwd_d, **common)
        example = {"Q": torch.empty(0, dtype=torch_dtype)}  # what the configs' pruning functions look at
        out.append(Variant("agent_fwd", case, at._agent_fwd_kernel.fn, fwd, at._agent_fwd_kernel.configs))
        row_splits, rows = _split(n, at._ROW_QUANTUM, b * h)
        bwd = dict(Q=x, K=x, V=x, DO=x, LSE=f32, DQ=x, PART=f32, **strides,
                   **dict(zip(("sdob", "sdoh", "sdon", "sdod"), qs)), **dict(zip(("sdqb", "sdqh", "sdqn", "sdqd"), qs)),
                   H=h, N=n, M=m, rows_per_split=rows, scale=1.0, scale_log2e=1.0, BLOCK_D=bwd_d, **common)
        configs = at._prune_bwd_configs(at._agent_bwd_kernel.configs, example, HEAD_DIM=d, BLOCK_D=bwd_d)
        out.append(Variant("agent_bwd", case, at._agent_bwd_kernel.fn, bwd, configs))
        if not shared:  # the refinement's dK/dV: (2, splits, B·H·M·d) fp32 partials summed into k's dtype
            part = dict(PART=f32, OUT=x, ROWS=row_splits, COLS=b * h * m * d, BLOCK=1024)
            out.append(Variant("sum_partials", case + " dk/dv", u._sum_partials_kernel, part, [_FixedConfig(4)]))

    b, h, nq, seq, d, c = 8, 8, 100, 4096, 32, 256
    qs, ks = _contiguous((b, h, nq, d)), _contiguous((b, h, seq, d))
    mes, mfs = _contiguous((b, nq, c)), _contiguous((b, c, seq))
    splits, keys = _split(seq, mt._KEY_QUANTUM, b * h)
    q_strides = dict(zip(("sqb", "sqh", "sqq", "sqd"), qs))
    kv_strides = dict(zip(("skb", "skh", "skl", "skd"), ks)) | dict(zip(("svb", "svh", "svl", "svd"), ks))
    mask_strides = dict(zip(("smeb", "smeq", "smec"), mes)) | dict(zip(("smfb", "smfc", "smfl"), mfs))
    mask = dict(MASK_DIM=c, BLOCK_C=u.tile(c, mt._MAX_BLOCK_C), MASK_PRECISION=prec["PRECISION"], MASK_UPCAST=False)
    common = dict(HEAD_DIM=d, BLOCK_Q=u.tile(nq), BLOCK_D=u.tile(d), **prec)
    case = f"decoder-b{b}-L{seq}"
    # L = 4096 reads the per-image bit mask (L ≥ BITS_MIN_KEYS); the decoder's L = 256 level computes the mask
    # per key tile from its factors, as listed for the same shapes under "(mask from factors)".
    bits_strides = dict(sbb=nq * _cdiv(seq, 32), sbq=_cdiv(seq, 32))
    bits = dict(ME=x, MF=x, BITS=i32, **mask_strides, **bits_strides, NQ=nq, L=seq, MASK_DIM=c,
                BLOCK_Q=u.tile(nq), BLOCK_C=mask["BLOCK_C"], WORDS=mt._BITS_WORDS,
                MASK_PRECISION=prec["PRECISION"], MASK_UPCAST=False)
    out.append(Variant("masked_bits", case, mt._mask_bits_kernel, bits, [_FixedConfig(4)]))
    for from_bits, label in ((True, case), (False, case + " (mask from factors)")):
        fwd = dict(Q=x, K=x, V=x, ME=x, MF=x, BITS=i32 if from_bits else x, O_PART=f32, LSE_PART=f32,
                   **q_strides, **kv_strides, **mask_strides, **bits_strides, H=h, NQ=nq, L=seq,
                   keys_per_split=keys, scale_log2e=1.0, MASK_TILE=u.tile(c), FROM_BITS=from_bits, **common, **mask)
        configs = mt._prune_fwd_configs(mt._masked_fwd_kernel.configs, {"Q": torch.empty(0, dtype=torch_dtype)},
                                        BLOCK_C=mask["BLOCK_C"], MASK_DIM=c, FROM_BITS=from_bits)
        out.append(Variant("masked_fwd", label, mt._masked_fwd_kernel.fn, fwd, configs))
        if from_bits:
            combine = dict(O_PART=f32, LSE_PART=f32, Q=x, K=x, V=x, O=x, LSE=f32, ROW_OPEN=i8,
                           **q_strides, **kv_strides, **dict(zip(("sob", "soh", "soq", "sod"), qs)), H=h, NQ=nq,
                           L=seq, N_SPLITS=splits, scale_log2e=1.0, BLOCK_L=mt._FALLBACK_BLOCK_L, **common)
            out.append(Variant("masked_combine", case, mt._masked_combine_kernel, combine, [_FixedConfig(4)]))
        bwd = dict(Q=x, K=x, V=x, ME=x, MF=x, BITS=i32 if from_bits else x, O=x, DO=x, LSE=f32, ROW_OPEN=i8,
                   DQ=f32, DK=x, DV=x, **q_strides, **kv_strides, **mask_strides, **bits_strides,
                   **dict(zip(("sob", "soh", "soq", "sod"), qs)), **dict(zip(("sdob", "sdoh", "sdoq", "sdod"), qs)),
                   **dict(zip(("sdkb", "sdkh", "sdkl", "sdkd"), ks)), **dict(zip(("sdvb", "sdvh", "sdvl", "sdvd"), ks)),
                   H=h, NQ=nq, L=seq, keys_per_split=keys, scale=1.0, scale_log2e=1.0, FROM_BITS=from_bits,
                   **common, **mask)
        out.append(Variant("masked_bwd", label, mt._masked_bwd_kernel.fn, bwd, mt._masked_bwd_kernel.configs))

    # The pixel decoder's deformable attention at 512² (levels of stride 8, 16, 32), batch 8.
    from kernels import msda_triton as dt

    b, h, d, levels, points = 8, 8, 32, 3, 4
    seq = 64 * 64 + 32 * 32 + 16 * 16
    i64 = Ptr("i64")
    common = dict(V=x, SHAPES=i64, STARTS=i64, LOC=f32, W=f32, S=seq, NQ=seq, H=h, NUM_LEVELS=levels,
                  NUM_POINTS=points, HEAD_DIM=d, BLOCK_Q=dt._BLOCK_Q, BLOCK_D=d)
    case = f"pixel-decoder-b{b}"
    out.append(Variant("msda_fwd", case, dt._msda_fwd_kernel, dict(common, OUT=f32), [_FixedConfig(4)]))
    out.append(Variant("msda_bwd", case, dt._msda_bwd_kernel, dict(common, DOUT=f32, DV=f32, DLOC=f32, DW=f32),
                       [_FixedConfig(4)]))

    # The full-size labels of a 512² batch of 8: 100 queries, 19 classes, stride-4 mask logits.
    from kernels import labels_triton as lt

    b, nq, k, h, w, size = 8, 100, 19, 128, 128, 512
    labels = dict(P=x, M=x, OUT=i32, NQ=nq, K=k, h=h, w=w, H=size, W=size, scale_h=h / size, scale_w=w / size,
                  spb=nq * k, spq=k, spk=1, smb=nq * h * w, smq=h * w, smh=w, smw=1, BLOCK_P=lt._BLOCK_P,
                  BLOCK_Q=lt._BLOCK_Q, BLOCK_K=32, **prec)
    out.append(Variant("labels", f"labels-b{b}-{size}", lt._labels_kernel, labels, [_FixedConfig(4, num_stages=1)]))

    # The refinement's four depthwise convolutions (dilations 1-4) of its stride-4 maps at 512², batch 8.
    from kernels import depthwise_triton as dw

    b, c, h, w = 8, 1024, 128, 128
    depthwise = dict(X=x, W0=x, W1=x, W2=x, W3=x, Y=x, NPIX=b * h * w, H=h, W=w, C=c, D0=1, D1=2, D2=3, D3=4,
                     NUM_OUT=4)
    out.append(Variant("depthwise", f"refine-b{b}", dw._depthwise_kernel.fn, depthwise, dw._depthwise_kernel.configs))
    return out


def _specialise(fn: Any, values: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compile`` as the JIT would build them for these values."""
    params = {p.name: p for p in fn.params}
    missing = [name for name in fn.arg_names if name not in values]
    if missing:
        raise ValueError(f"{fn.__name__}: no example value for {', '.join(missing)}")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = values[name]
        if params[name].is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, Ptr):
            signature[name] = "*" + value.dtype
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # the JIT turns integer arguments equal to 1 into constants
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _nvidia_tool(name: str) -> Path:
    """A CUDA tool (ptxas, cuobjdump) from the bin/ folder Triton's NVIDIA backend ships in its wheel."""
    import triton.backends.nvidia as nvidia

    return Path(nvidia.__file__).parent / "bin" / name


def _ptxas(arch: int) -> Path:
    """The ptxas Triton assembles ``arch`` with: its wheel bundles a newer one for sm_100 and up, whose PTX the
    other cannot read."""
    from triton.backends.nvidia.compiler import get_ptxas

    return Path(get_ptxas(arch).path)


@functools.cache
def _listed_values(tool: Path) -> frozenset[str]:
    """The quoted option values ``tool --help`` lists, its architectures among them ('sm_90a' for ptxas, 'SM90'
    for nvdisasm); empty when the tool cannot be run."""
    try:
        done = subprocess.run([str(tool), "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(re.findall(r"'(\w+)'", done.stdout))


def arch_supported(arch: int) -> bool:
    """Whether ``arch`` (compute capability × 10) can be compiled and read here: Triton's ptxas for it knows its GPU
    name and the bundled nvdisasm reads its cubins. Checked before compiling because for a GPU name its LLVM does
    not know, Triton aborts the whole process (``LLVM ERROR: Cannot select``), with no exception to catch."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    return (sm_arch_from_capability(arch) in _listed_values(_ptxas(arch))
            and f"SM{arch}" in _listed_values(_nvidia_tool("nvdisasm")))


def supported_archs() -> list[int]:
    """Every compute capability × 10 that ``arch_supported`` accepts (for the error message)."""
    listed = _listed_values(_nvidia_tool("nvdisasm"))
    return sorted(a for a in {int(v[2:]) for v in listed if re.fullmatch(r"SM\d+", v)} if arch_supported(a))


def _resource_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill store + load bytes per thread) from ``ptxas -v`` on the kernel's PTX, with the
    ptxas Triton itself uses for ``arch`` (cuobjdump's resource summary leaves spills out)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    ptxas = _ptxas(arch)
    gpu = sm_arch_from_capability(arch)  # as Triton assembles: sm_90a for wgmma
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(ptxas), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "kernel.o")],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{done.stderr}")
    registers = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    if not registers or not spills:
        raise RuntimeError(f"ptxas -v printed no register or spill figures:\n{done.stderr}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*)$")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def sass_counts(listing: str) -> tuple[int, int]:
    """(instructions in the kernel, instructions in its longest loop body) from an ``nvdisasm -c`` listing: static
    counts, every path once. The loop body runs from a label to the last branch back to it; its length is the issue
    cost of one trip, per warp, which is what compares variants of a kernel whose time is in its loop."""
    labels: dict[str, int] = {}
    instructions = 0
    longest = 0
    for line in listing.splitlines():
        label = _SASS_LABEL.match(line)
        if label:
            labels[label.group(1)] = instructions
            continue
        if not _SASS_LINE.match(line):
            continue
        instructions += 1
        branch = _SASS_BRANCH.search(line)
        if branch and branch.group(1) in labels:  # a backward branch closes a loop
            longest = max(longest, instructions - labels[branch.group(1)])
    return instructions, longest


def _sass_listing(cubin: bytes) -> str:
    """The kernel's SASS with its branch labels, from the ``nvdisasm`` Triton's wheel bundles."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(_nvidia_tool("nvdisasm")), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout


def programs_per_sm(registers: int, warps: int, shared: int) -> int:
    """Programs resident on one sm_90 SM at once, from registers (allocated per warp in 256s), warps and shared
    memory (1 KiB reserved per program). An estimate: it leaves out the register file's bank constraints."""
    per_warp = _cdiv(max(registers, 1) * 32, 256) * 256
    by_regs = SM_REGISTERS // (per_warp * warps)
    by_shared = SM_SHARED // (shared + 1024) if shared else SM_PROGRAMS
    return min(by_regs, SM_WARPS // warps, by_shared, SM_PROGRAMS)


def compile_variant(variant: Variant, config: Any, dtype: str, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    values = dict(variant.args)
    values.update(config.kwargs or {})
    signature, constexprs, attrs = _specialise(variant.fn, values)
    target = GPUTarget("cuda", arch, 32)
    requested = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if getattr(config, "maxnreg", None):
        requested["maxnreg"] = config.maxnreg
    options = make_backend(target).parse_options(requested)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(variant.fn, signature, constexprs=constexprs, attrs=attrs), target=target,
                              options=options.__dict__)
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    registers, spilled = _resource_usage(ptx, arch)
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    instructions, loop = sass_counts(_sass_listing(compiled.asm["cubin"]))
    shared = int(compiled.metadata.shared)
    meta = ", ".join(f"{k}={v}" for k, v in (config.kwargs or {}).items())
    label = (meta + ", " if meta else "") + f"warps={config.num_warps}, stages={config.num_stages}"
    if getattr(config, "maxnreg", None):
        label += f", maxnreg={config.maxnreg}"
    return Result(variant.kernel, variant.case, dtype, label, registers, spilled, shared,
                  programs_per_sm(registers, config.num_warps, shared), mma, instructions, loop, seconds)


def render(results: Sequence[Result], arch: int) -> str:
    lines = [f"# Kernel resources on sm_{arch} (compiled offline)", "",
             "Registers per thread, register spill traffic per thread (ptxas: spill store + load bytes), shared "
             "memory per program, programs resident per SM (estimate), MMA instructions in the PTX, SASS "
             "instructions (static count: the kernel, and the body of its longest loop, one trip per warp).", "",
             "| kernel | case | dtype | config | registers | spill B | shared KiB | programs/SM | mma | SASS | "
             "SASS loop | compile s (≈0: cached) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.kernel} | {r.case} | {r.dtype} | {r.config} | {r.registers} | {r.spill_bytes} | "
                     f"{r.shared_bytes / 1024:.1f} | {r.programs_per_sm} | {r.mma} | {r.instructions} | "
                     f"{r.loop_instructions} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, in one line naming the flag, or None. Checked before the first compile:
    a bad --arch would abort the process there, a bad --out fail only after every kernel has compiled."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on"):
        return "TRITON_INTERPRET is set: the kernels would be built for the interpreter; unset it"
    if args.max_configs is not None and args.max_configs < 1:
        return f"--max-configs {args.max_configs}: expected a positive integer"
    unknown = sorted(set(args.kernel or ()) - set(KERNELS))
    if unknown:
        return f"--kernel {', '.join(unknown)}: no such kernel; expected one of {', '.join(KERNELS)}"
    if args.out is not None and args.out.is_dir():
        return f"--out '{args.out}': is a directory; expected the path of the Markdown file to write"
    if args.out is not None and not args.out.parent.is_dir():
        return f"--out '{args.out}': folder '{args.out.parent}' not found"
    if not arch_supported(args.arch):
        return (f"--arch {args.arch}: not a compute capability × 10 that Triton's bundled ptxas and nvdisasm "
                f"support; expected one of {', '.join(map(str, supported_archs()))}")
    return None


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temp file and a rename, the temp file removed if either step fails."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.resources", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability ×10 (default 90: H100/H200)")
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES), default=None,
                    help="input dtype (repeatable; default bf16, fp16 and fp32)")
    ap.add_argument("--kernel", action="append", default=None,
                    help=f"one of {', '.join(KERNELS)} (repeatable; default all)")
    ap.add_argument("--max-configs", type=int, default=None, help="only the first N autotune configs of each")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    results: list[Result] = []
    for dtype in args.dtype or ["bf16", "fp16", "fp32"]:
        for variant in variants(dtype):
            if args.kernel is not None and variant.kernel not in args.kernel:
                continue
            for config in variant.configs[:args.max_configs]:
                result = compile_variant(variant, config, dtype, args.arch)
                print(f"{result.kernel} {result.case} {dtype} [{result.config}]: {result.registers} registers, "
                      f"{result.spill_bytes} B spilled, {result.shared_bytes} B shared ({result.seconds:.1f} s)",
                      file=sys.stderr, flush=True)
                results.append(result)
    text = render(results, args.arch)
    sys.stdout.write(text)
    if args.out is not None:
        try:
            write_text(args.out, text)
        except OSError as e:  # checked up front, but the folder may change during the compiles
            print(f"error: --out '{args.out}': cannot write: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
