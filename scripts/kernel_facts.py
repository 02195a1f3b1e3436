#!/usr/bin/env python3
"""Facts of the compiled CUDA kernels, and the CI gate on them: what the compiler made of csrc/cuda.

    python scripts/kernel_facts.py [--jobs 2]        # exits 1 on a hard fact (CI)

Run with a Python that has a CUDA build of torch (its headers) and nvcc (CUDA_HOME, or on PATH).
cuobjdump and nvdisasm come from the CUDA install, or else from the copies inside the triton wheel
that ships with torch. No GPU is needed. Nothing here is a model or an estimate: every value is read
from ptxas, the cubin's ELF attributes, the SASS, or the declarations in the sources.

1. Compiles every csrc/cuda/*.cu for sm_90 (the flags of setup.py, -lineinfo, -Xptxas -v) to a cubin
   (cached under build/kernel_report by source digest).
2. Reads, per kernel instantiation: registers, spills, stack, static shared memory (ptxas), the
   launch-bounds register ceiling and the parameter layout (ELF .nv.info: EIATTR_MAXREG_COUNT,
   EIATTR_KPARAM_INFO), and the SASS (nvdisasm with line info and the instruction control words:
   stall counts and the scoreboards each instruction sets and waits on).
3. Names each parameter from the kernel's declaration in the sources (Declarations): the
   parameters' offsets are the compiled ones; the fields of a struct parameter are laid out from
   the struct's declaration by the C rules, and the layout must add up to the struct's compiled
   size (a disagreement is a hard fact: the names would be wrong).
4. Analyses the SASS: loops (natural loops of the control-flow graph), the width of every global
   load/store in a loop, the kernel parameter each access's address comes from (a backward slice
   over dominating instructions to the constant bank), and the serial memory round trips of a
   straight-line region (a trip ends where an instruction waits on the scoreboard of an outstanding
   global load).
5. The hard facts (hard_failures; CI fails on them): a register spill or stack frame (any
   bf16/fp16/fp32 instantiation; fp64 ones, used by gradcheck only, are listed), a global access
   narrower than the kernel's vector width in a loop of an instantiation documented as vectorised
   (VECTORISED below, which names the pointers that are scalar by design: statistics, ids),
   registers above the launch-bounds budget, or a parameter layout the declarations do not explain.

scripts/kernel_report.py builds its performance model and benchmarks/STATIC.md on these facts.
"""
import argparse
import bisect
import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import io
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


TYPE_NAMES = {"c10::BFloat16": "bf16", "c10::Half": "fp16", "float": "fp32", "double": "fp64",
              "unsigned short": "u16", "unsigned int": "u32", "unsigned long": "u64", "int": "i32",
              "long": "i64", "bool": "bool"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "u16": 2, "u32": 4, "u64": 8}


# ==================================================================================================
# 1. Tools and compilation
# ==================================================================================================
def cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").exists():
        return Path(home)
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc).resolve().parent.parent
    return Path("/usr/local/cuda")


def find_tool(name):
    """nvcc / cuobjdump / nvdisasm: the CUDA install first, then PATH, then the triton wheel."""
    candidates = [cuda_home() / "bin" / name]
    which = shutil.which(name)
    if which:
        candidates.append(Path(which))
    for site in sys.path:
        candidates.append(Path(site) / "triton" / "backends" / "nvidia" / "bin" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise FileNotFoundError(f"{name} not found (CUDA_HOME/bin, PATH, triton wheel)")


def torch_compile_flags():
    """Include paths and defines of the extension build (setup.py / torch.utils.cpp_extension)."""
    from torch.utils import cpp_extension

    spec = importlib.util.spec_from_file_location("dit_kernels_build", REPO / "dit_kernels" / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    incs = list(cpp_extension.include_paths("cuda")) + build.wheel_cuda_include_dirs()
    import torch

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ([f"-I{p}" for p in incs] + list(cpp_extension.COMMON_NVCC_FLAGS) +
            ["-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DPy_LIMITED_API=0x03090000"])


# The nvcc flags of setup.py (-O3 --use_fast_math --expt-relaxed-constexpr -lineinfo), for sm_90 only.
NVCC_FLAGS = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo", "-std=c++20",
              "-arch=sm_90", "-cubin", "-Xptxas", "-v"]


def compile_cubin(src, out_dir, extra_flags=()):
    """nvcc -cubin; returns (cubin path, ptxas log)."""
    out = Path(out_dir) / (Path(src).stem + ".cubin")
    cmd = [find_tool("nvcc")] + NVCC_FLAGS + list(extra_flags) + ["-o", str(out), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src}:\n{res.stderr[-4000:]}")
    return out, res.stderr + res.stdout


# ==================================================================================================
# 2. Parsing: ptxas -v, ELF attributes, SASS with line info and control words
# ==================================================================================================
def parse_ptxas(log):
    """{mangled: {regs, spill_stores, spill_loads, stack, smem, barriers}} from -Xptxas -v."""
    res, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            cur = res.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
            b = re.search(r"used (\d+) barriers", line)
            cur["barriers"] = int(b.group(1)) if b else 0
    return res


def parse_elf_info(cubin):
    """{mangled: {maxreg, max_threads, params}} from the .nv.info sections: the launch bounds and the
    parameter layout, params = {ordinal: (offset from the first parameter, size)}."""
    out = subprocess.run([find_tool("cuobjdump"), "-elf", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    res, cur, attr = {}, None, None
    for line in out.splitlines():
        m = re.match(r"^\.nv\.info\.(\S+)", line)
        if m:
            cur = res.setdefault(m.group(1), {})
            continue
        m = re.search(r"Attribute:\s+(EIATTR_\w+)", line)
        if m:
            attr = m.group(1)
            continue
        m = re.search(r"Value:\s+(.*)", line)
        if m and cur is not None and attr:
            vals = m.group(1).split()
            if attr == "EIATTR_MAXREG_COUNT":
                cur["maxreg"] = int(vals[0], 16)
            elif attr == "EIATTR_MAX_THREADS":
                cur["max_threads"] = math.prod(int(v, 16) for v in vals[:3])
            elif attr == "EIATTR_KPARAM_INFO":
                k = re.search(r"Ordinal\s*:\s*(0x[0-9a-f]+)\s+Offset\s*:\s*(0x[0-9a-f]+)\s+Size\s*:\s*(0x[0-9a-f]+)",
                              m.group(1))
                if k:
                    cur.setdefault("params", {})[int(k.group(1), 16)] = (int(k.group(2), 16), int(k.group(3), 16))
            attr = None
    return res


@dataclasses.dataclass
class Instr:
    off: int
    pred: str          # "@P0", "@!P1" or ""
    op: str            # opcode with modifiers, e.g. LDG.E.128.CONSTANT
    args: str
    chain: tuple       # ((file, line), ...) innermost first (the inline chain of -lineinfo)
    stall: int
    wrb: int           # scoreboard set on completion of a variable-latency result (7 = none)
    rdb: int           # scoreboard released when the sources are read (7 = none)
    wait: int          # mask of scoreboards waited on before issue

    @property
    def base(self):
        return self.op.split(".")[0]


def parse_line_info(comment):
    """'//## File "a.cu", line 3 inlined at "b.cu", line 9' -> (("a.cu", 3), ("b.cu", 9))."""
    return tuple((f, int(n)) for f, n in re.findall(r'"([^"]+)", line (\d+)', comment))


def parse_sass(cubin):
    """{mangled: (instrs, labels)}: labels map '.L_x_N' to an offset."""
    text = subprocess.run([find_tool("nvdisasm"), "-hex", "-gi", "-c", str(cubin)], capture_output=True,
                          text=True, check=True).stdout
    funcs, cur, chain, pending, pend_labels, fresh_chain = {}, None, (), None, [], True
    for line in text.splitlines():
        m = re.match(r"^\.text\.(\S+):", line)
        if m:
            cur = funcs.setdefault(m.group(1), ([], {}))
            chain, pend_labels = (), []
            continue
        if cur is None:
            continue
        s = line.strip()
        if s.startswith("//## File"):
            c = parse_line_info(s)
            if fresh_chain or len(c) > len(chain):
                chain = c
            fresh_chain = False
            continue
        m = re.match(r"^(\.L_x_\d+):", s)
        if m:
            pend_labels.append(m.group(1))
            continue
        m = re.match(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* (0x[0-9a-f]+) \*/", s)
        if m:
            pending = (int(m.group(1), 16), m.group(2))
            continue
        m = re.match(r"/\* (0x[0-9a-f]+) \*/$", s)
        if m and pending:
            off, body = pending
            pending = None
            ctrl = (int(m.group(1), 16) >> 41) & 0x7FFFFF
            pred = ""
            pm = re.match(r"(@!?U?P\w+)\s+(.*)", body)
            if pm:
                pred, body = pm.group(1), pm.group(2)
            parts = body.split(None, 1)
            ins = Instr(off, pred, parts[0], parts[1] if len(parts) > 1 else "", chain, ctrl & 0xF,
                        (ctrl >> 5) & 7, (ctrl >> 8) & 7, (ctrl >> 11) & 0x3F)
            for lab in pend_labels:
                cur[1][lab] = off
            pend_labels = []
            fresh_chain = True
            cur[0].append(ins)
    return funcs


def demangle(names):
    names = list(names)
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
        if len(out) == len(names):
            return dict(zip(names, out))
    except (OSError, subprocess.CalledProcessError):
        pass
    return {n: n for n in names}


def split_top_level(s, opening, closing):
    """Split at the commas outside brackets: ('a, b<c, d>, e', '<(', '>)') -> ['a', 'b<c, d>', 'e']."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in opening:
            depth += 1
        elif ch in closing:
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def short_name(demangled):
    """'ns::(anonymous namespace)::k<c10::BFloat16, float, 8, true>(args)' -> ('k', ['bf16', 'fp32', '8', 'true'])."""
    d = demangled
    # drop the argument list: the last top-level '(...)'
    depth, cut = 0, len(d)
    for i in range(len(d) - 1, -1, -1):
        if d[i] == ")":
            depth += 1
        elif d[i] == "(":
            depth -= 1
            if depth == 0:
                cut = i
                break
    head = d[:cut]
    m = re.match(r"^(?:.*::)?(\w+)<(.*)>$", head) or re.match(r"^(?:.*::)?(\w+)$", head)
    if not m:
        return head, []
    name = m.group(1)
    args = split_top_level(m.group(2), "<(", ">)") if m.lastindex and m.lastindex >= 2 else []
    args = [TYPE_NAMES.get(a, re.sub(r"^\((\w+)\)", "", a)) for a in args]
    return name, args


# ==================================================================================================
# 3. SASS analysis: loops, accesses, serial trips
# ==================================================================================================
GLOBAL_LOADS = {"LDG", "LD"}           # LD: generic (treated as global)
GLOBAL_STORES = {"STG", "ST"}
GLOBAL_ATOMICS = {"ATOMG", "RED", "ATOM"}


def access_bits(op):
    """Width in bits of a global load/store opcode (LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32)."""
    mods = op.split(".")[1:]
    for m in mods:
        if m in ("128", "64"):
            return int(m)
        if m in ("U8", "S8"):
            return 8
        if m in ("U16", "S16"):
            return 16
    return 32


def is_global_access(ins):
    return ins.base in GLOBAL_LOADS | GLOBAL_STORES | GLOBAL_ATOMICS


def _regs(token, width=1):
    """Registers named in an operand: R20 -> {R20}; R20.64 -> {R20, R21} (RZ/URZ dropped)."""
    out = set()
    for kind, num, w64 in re.findall(r"\b(U?R)(\d+)(\.64)?\b", token):
        n = int(num)
        for k in range(2 if w64 else width):
            out.add(f"{kind}{n + k}")
    return out


def dests_srcs(ins):
    """(destination registers, source registers, constant-bank offsets) of an instruction."""
    ops = split_top_level(ins.args, "[", "]")  # SASS operands: [R2.64+0x10] stays whole
    consts = {int(c, 16) for c in re.findall(r"c\[0x0\]\[(0x[0-9a-f]+)\]", ins.args)}
    if not ops:
        return set(), set(), consts
    first = ops[0]
    dests = set()
    rest = ops
    if re.match(r"^U?R\d+$", first) and ins.base not in GLOBAL_STORES | {"STS", "STL", "RED", "BRA"}:
        width = 4 if ".128" in ins.op else 2 if (".64" in ins.op or ".WIDE" in ins.op) else 1
        dests = _regs(first, width)
        rest = ops[1:]
    srcs = set()
    for o in rest:
        o = re.sub(r"desc\[[^\]]*\]", "", o)
        srcs |= _regs(o)
    return dests, srcs, consts


def address_params(instrs, i, walk_back, limit=5000):
    """Constant-bank offsets (kernel parameters) the address of memory instruction i derives from:
    a backward slice over the instructions that dominate it (walk_back(i) yields their indices,
    nearest first). A register defined by a load is data (an index), not followed further."""
    ins = instrs[i]
    mem = re.findall(r"\[(U?R\d+(?:\.64)?)[^\]]*\]", re.sub(r"desc\[[^\]]*\]", "", ins.args))
    wanted = set()
    for m in mem:
        wanted |= _regs(m)
    consts = set()
    for n, j in enumerate(walk_back(i)):
        if not wanted or n > limit:
            break
        d, s, c = dests_srcs(instrs[j])
        if d & wanted:
            wanted -= d
            if instrs[j].base in ("LDG", "LD", "LDS", "LDL", "LDC") and not re.search(r"c\[0x0\]", instrs[j].args):
                continue
            wanted |= s
            consts |= c
    return {c for c in consts if c >= PARAM_BASE}


PARAM_BASE = 0x210   # first kernel parameter in constant bank 0 on sm_90


@dataclasses.dataclass
class Loop:
    """A natural loop of the control-flow graph: header block, member instruction offsets."""
    head: int                 # offset of the header's first instruction
    members: frozenset        # offsets of every instruction in the loop (nested loops included)
    chain: tuple              # line chain of a back-edge branch (identifies the loop in the source)
    children: list = dataclasses.field(default_factory=list)
    parent: "Loop" = None

    def contains(self, off):
        return off in self.members


def branch_target(ins, labels):
    m = re.search(r"`\((\.L_x_\d+)\)", ins.args)
    return labels.get(m.group(1)) if m else None


def basic_blocks(instrs, labels):
    """[(start index, end index exclusive)], successor lists (block indices)."""
    if not instrs:
        return [], []
    index = {ins.off: i for i, ins in enumerate(instrs)}
    leaders = {0}
    for i, ins in enumerate(instrs):
        if ins.base in ("BRA", "EXIT", "RET", "BRX", "JMP", "JMX", "CALL"):
            if i + 1 < len(instrs):
                leaders.add(i + 1)
            tgt = branch_target(ins, labels)
            if tgt is not None and tgt in index:
                leaders.add(index[tgt])
    starts = sorted(leaders)
    blocks = [(s, starts[k + 1] if k + 1 < len(starts) else len(instrs)) for k, s in enumerate(starts)]
    block_of = {s: k for k, (s, _) in enumerate(blocks)}
    succ = []
    for k, (s, e) in enumerate(blocks):
        last = instrs[e - 1]
        out = []
        falls = True
        if last.base in ("BRA", "JMP") and ".DIV" in last.op:
            pass  # the divergent-warp fallback of a warp-synchronous op: not taken by converged warps
        elif last.base in ("BRA", "JMP"):
            tgt = branch_target(last, labels)
            if tgt is not None and tgt in index:
                out.append(block_of[index[tgt]])
            falls = bool(last.pred)
        elif last.base in ("EXIT", "RET", "BRX", "JMX"):
            falls = bool(last.pred)
        if falls and k + 1 < len(blocks):
            out.append(k + 1)
        succ.append(out)
    return blocks, succ


def find_loops(instrs, labels):
    """Natural loops (back edges to a dominating header), nested by containment."""
    blocks, succ = basic_blocks(instrs, labels)
    nb = len(blocks)
    if nb == 0:
        return [], [], frozenset(), lambda i: iter(range(i - 1, -1, -1))
    pred = [[] for _ in range(nb)]
    for u, outs in enumerate(succ):
        for v in outs:
            pred[v].append(u)
    # reachable blocks and iterative dominators (bit sets as Python ints)
    reach, stack = {0}, [0]
    while stack:
        u = stack.pop()
        for v in succ[u]:
            if v not in reach:
                reach.add(v)
                stack.append(v)
    full = (1 << nb) - 1
    dom = [full] * nb
    dom[0] = 1
    changed = True
    order = sorted(reach)
    while changed:
        changed = False
        for v in order:
            if v == 0:
                continue
            ps = [dom[p] for p in pred[v] if p in reach]
            new = (functools_reduce_and(ps) if ps else 0) | (1 << v)
            if new != dom[v]:
                dom[v], changed = new, True
    loops_by_head = {}
    for u in order:
        for h in succ[u]:
            if dom[u] >> h & 1:      # back edge u -> h
                body, work = {h, u}, [u]
                while work:
                    x = work.pop()
                    if x == h:
                        continue
                    for p in pred[x]:
                        if p in reach and p not in body:
                            body.add(p)
                            work.append(p)
                prev = loops_by_head.get(h)
                branch = instrs[blocks[u][1] - 1]
                if prev:
                    prev[0].update(body)
                else:
                    loops_by_head[h] = (body, branch.chain)
    loops = []
    for h, (body, chain) in loops_by_head.items():
        offs = frozenset(instrs[i].off for b in body for i in range(*blocks[b]))
        loops.append(Loop(instrs[blocks[h][0]].off, offs, chain))
    loops.sort(key=lambda l: len(l.members))
    roots = []
    for i, lp in enumerate(loops):
        parent = next((o for o in loops[i + 1:] if lp.members < o.members), None)
        lp.parent = parent
        if parent:
            parent.children.append(lp)
        else:
            roots.append(lp)
    ordered = sorted(loops, key=lambda l: l.head)
    for lp in loops:
        lp.children.sort(key=lambda l: l.head)
    roots.sort(key=lambda l: l.head)
    reachable = frozenset(instrs[i].off for b in reach for i in range(*blocks[b]))
    # immediate dominators: the strict dominator with the most dominators itself
    idom = [None] * nb
    for v in order:
        strict = [d for d in range(nb) if d != v and dom[v] >> d & 1]
        if strict:
            idom[v] = max(strict, key=lambda d: bin(dom[d]).count("1"))
    block_of = [0] * len(instrs)
    for k, (s0, e0) in enumerate(blocks):
        for i in range(s0, e0):
            block_of[i] = k

    def walk_back(i):
        """Indices of the instructions that dominate instruction i, nearest first."""
        k = block_of[i]
        j = i - 1
        while True:
            while j >= blocks[k][0]:
                yield j
                j -= 1
            k = idom[k]
            if k is None:
                return
            j = blocks[k][1] - 1

    return roots, ordered, reachable, walk_back


def functools_reduce_and(values):
    r = values[0]
    for v in values[1:]:
        r &= v
    return r


class SourceCache:
    """Source lines by (file, line), for loop and guard identification. Paths under a `csrc/`
    directory are read from `root` (the tree that was compiled), wherever it was compiled from."""

    def __init__(self, root=None):
        self.root = Path(root) if root else None
        self.files = {}

    def line(self, path, n):
        if path not in self.files and self.root is not None and "/csrc/" in path:
            local = self.root / path.rsplit("/csrc/", 1)[1]
            if local.exists():
                self.files[path] = local.read_text().splitlines()
        if path not in self.files:
            try:
                self.files[path] = Path(path).read_text().splitlines()
            except OSError:
                self.files[path] = []
        lines = self.files[path]
        return lines[n - 1] if 0 < n <= len(lines) else ""

    def chain_text(self, chain):
        return " <- ".join(self.line(f, n).strip() for f, n in chain)



@dataclasses.dataclass
class Trip:
    loads: list          # Instr
    kind: str            # "dram" or "l2"

    def bytes_per_warp(self):
        return sum(access_bits(i.op) // 8 * 32 for i in self.loads)


@dataclasses.dataclass
class BodyStats:
    """Costs of one pass over a straight-line region (a loop body without its nested loops)."""
    instrs: int
    trips: list
    shfl: int
    bars: int
    stall_cycles: int
    loads: list
    stores: list

    @property
    def dram_trips(self):
        return sum(t.kind == "dram" for t in self.trips)

    @property
    def l2_trips(self):
        return sum(t.kind == "l2" for t in self.trips)


def region_instrs(instrs, members, exclude, skip):
    """Instructions in `members` (a set of offsets, None = all), outside the `exclude` loops and the
    `skip` ranges, in address order."""
    out = []
    for ins in instrs:
        if members is not None and ins.off not in members:
            continue
        if any(lp.contains(ins.off) for lp in exclude):
            continue
        if any(a <= ins.off < b for a, b in skip):
            continue
        out.append(ins)
    return out


def guarded_skips(instrs, labels, lo, hi, src, guard_rules):
    """Ranges [from, to) of forward-branch-guarded blocks the shape does not execute.

    guard_rules: list of (regex on the guard branch's source chain, keep) - of the blocks guarded by
    matching branches (in program order), the first `keep` run and the rest are skipped (keep=0:
    all skipped)."""
    if not guard_rules:
        return []
    found = {i: [] for i in range(len(guard_rules))}
    for ins in instrs:
        if ins.off < lo or ins.off > hi or ins.base != "BRA" or not ins.pred:
            continue
        tgt = branch_target(ins, labels)
        if tgt is None or tgt <= ins.off or tgt > hi + 16:
            continue
        text = src.chain_text(ins.chain)
        for i, (rx, _) in enumerate(guard_rules):
            if re.search(rx, text):
                found[i].append((ins.off + 16, tgt))
                break
    skips = []
    for i, (_, keep) in enumerate(guard_rules):
        skips += found[i][keep:]
    return skips


def body_stats(body, is_l2):
    """Serial round trips of a straight-line instruction sequence (program order, all paths).

    A global load sets a scoreboard; the first instruction that waits on the scoreboard of an
    outstanding global load ends a trip, which completes every global load issued before it (loads
    issued together return together). Loads still outstanding at the end form a final trip. A trip
    whose loads all read L2-resident data (is_l2) is an L2 trip, otherwise a DRAM trip."""
    trips, outstanding = [], []
    loads, stores, shfl, bars, stall = [], [], 0, 0, 0

    def close():
        nonlocal outstanding
        if outstanding:
            kind = "l2" if all(is_l2(i) for i in outstanding) else "dram"
            trips.append(Trip(outstanding, kind))
            outstanding = []

    for ins in body:
        waited = [b for b in range(6) if ins.wait >> b & 1]
        if ins.base == "DEPBAR":
            m = re.search(r"SB(\d)", ins.args)
            if m:
                waited.append(int(m.group(1)))
        if waited and any(l.wrb in waited for l in outstanding):
            close()
        stall += ins.stall
        if ins.base in GLOBAL_LOADS:
            loads.append(ins)
            if ins.wrb != 7:
                outstanding.append(ins)
        elif ins.base in GLOBAL_STORES or ins.base in GLOBAL_ATOMICS:
            stores.append(ins)
        elif ins.base == "SHFL":
            shfl += 1
        elif ins.base == "BAR" and ("SYNC" in ins.op or ins.op == "BAR"):
            bars += 1
    close()
    return BodyStats(len(body), trips, shfl, bars, stall, loads, stores)


@dataclasses.dataclass
class KernelFacts:
    file: str
    mangled: str
    name: str
    args: list
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem_static: int
    maxreg: int
    max_threads: int
    instrs: list
    labels: dict
    loops_root: list
    loops: list
    reachable: frozenset
    params: dict = dataclasses.field(default_factory=dict)      # constant-bank offset -> pointer name
    layout_error: str = ""                                      # the declarations vs the compiled layout
    _params: dict = dataclasses.field(default_factory=dict)

    @property
    def short(self):
        return f"{self.name}<{','.join(self.args)}>" if self.args else self.name

    @property
    def spills(self):
        return self.spill_stores + self.spill_loads

    def pointer_names(self, ins):
        """Names of the pointer parameters a global access's address derives from ({'?'} if none known)."""
        if ins.off not in self._params:
            idx = bisect.bisect_left(self._offs, ins.off)
            self._params[ins.off] = address_params(self.instrs, idx, self._walk_back)
        found = {self.params[c] for c in self._params[ins.off] if c in self.params}
        return found or {"?"}

    def loop_accesses(self):
        """Global accesses inside loops: [(instr, bits, pointer names, loop)]."""
        out = []
        for ins in self.instrs:
            if not is_global_access(ins):
                continue
            inner = None
            for l in self.loops:
                if l.contains(ins.off) and (inner is None or len(l.members) < len(inner.members)):
                    inner = l
            if inner is not None:
                out.append((ins, access_bits(ins.op), self.pointer_names(ins), inner))
        return out


def analyse_cubin(cubin, log, decls=None):
    """KernelFacts of every kernel in a cubin; `decls` (Declarations of the sources it was compiled
    from) names the pointer parameters."""
    ptx = parse_ptxas(log)
    elf = parse_elf_info(cubin)
    sass = parse_sass(cubin)
    dem = demangle(sass.keys())
    out = []
    for mangled, (instrs, labels) in sass.items():
        if mangled.startswith("$") or "__internal" in mangled:
            continue
        p = ptx.get(mangled, {})
        e = elf.get(mangled, {})
        name, args = short_name(dem[mangled])
        roots, ordered, reachable, walk_back = find_loops(instrs, labels)
        kf = KernelFacts(Path(cubin).stem, mangled, name, args, p.get("regs", 0), p.get("spill_stores", 0),
                         p.get("spill_loads", 0), p.get("stack", 0), p.get("smem", 0), e.get("maxreg", 255),
                         e.get("max_threads", 1024), instrs, labels, roots, ordered, reachable)
        if decls is not None:
            kf.params, kf.layout_error = decls.pointer_params(name, args, e.get("params", {}))
        kf._offs = [i.off for i in instrs]
        kf._walk_back = walk_back
        out.append(kf)
    return out



# ==================================================================================================
# 4. Parameter names from the declarations, and which instantiations are vectorised
# ==================================================================================================
PARAM_BASE_OFFSET = PARAM_BASE   # EIATTR_KPARAM_INFO offsets are relative to it
SCALAR_SIZES = {"int64_t": 8, "uint64_t": 8, "long": 8, "size_t": 8, "double": 8, "int": 4, "int32_t": 4,
                "uint32_t": 4, "unsigned": 4, "float": 4, "int16_t": 2, "uint16_t": 2, "short": 2, "bool": 1,
                "char": 1, "int8_t": 1, "uint8_t": 1}
ARG_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "u16": 2, "u32": 4, "u64": 8, "i32": 4, "i64": 8,
             "bool": 1}


def strip_comments(text):
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def _balanced(text, i, open_ch, close_ch):
    """Index just past the bracket that closes the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_ch:
            depth += 1
        elif text[j] == close_ch:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


def _template_params(head):
    """'template <typename T, int VEC>' -> ['T', 'VEC'] (the names, in order)."""
    m = re.search(r"template\s*<(.*)>\s*$", head, re.S)
    if not m:
        return []
    return [re.split(r"[\s=]+", p.strip().split("=")[0].strip())[-1] for p in split_top_level(m.group(1), "<(", ">)")]


def _declarators(stmt):
    """'const T* __restrict__ x' -> [(type, name)]; 'int64_t a, b = 0, c' -> three of the same type."""
    parts = split_top_level(stmt, "<([{", ">)]}")
    out = []
    first = re.sub(r"\s*=.*$", "", parts[0].strip(), flags=re.S)
    m = re.match(r"^(.*?)([A-Za-z_]\w*)\s*(\[[^\]]*\])?$", first, re.S)
    if not m:
        return out
    base = m.group(1).strip()
    out.append((base, m.group(2)))
    core = base.rstrip("*& ").replace("__restrict__", "").strip()
    for p in parts[1:]:
        p = re.sub(r"\s*=.*$", "", p.strip(), flags=re.S)
        stars = re.match(r"^([*&\s]*)(\w+)$", p)
        if stars:
            out.append(((core + " " + stars.group(1)).strip() if stars.group(1).strip() else base, stars.group(2)))
    return out


class Declarations:
    """The kernels and structs declared in a set of CUDA sources (comments stripped), enough to name
    each pointer parameter of a compiled kernel and to lay out a struct parameter by the C rules
    (natural alignment; a pointer is 8 bytes)."""

    def __init__(self, paths):
        self.kernels, self.structs = {}, {}
        for path in paths:
            text = strip_comments(Path(path).read_text())
            for m in re.finditer(r"\bstruct\s+(\w+)\s*\{", text):
                end = _balanced(text, m.end() - 1, "{", "}")
                head = text[max(0, m.start() - 300):m.start()]
                tparams = _template_params(head) if re.search(r"template\s*<[^;{}]*>\s*$", head, re.S) else []
                fields = []
                for stmt in text[m.end():end - 1].split(";"):
                    stmt = stmt.strip()
                    if not stmt or "(" in stmt or re.match(r"(static|constexpr|using|template|public|private)\b", stmt):
                        continue
                    fields += _declarators(stmt)
                self.structs.setdefault(m.group(1), (tparams, fields))
            for m in re.finditer(r"__global__\s+(?:void\s+)?(?:__launch_bounds__\s*)?", text):
                j = m.end()
                if text.startswith("(", j):              # __launch_bounds__(...)
                    j = _balanced(text, j, "(", ")")
                n = re.match(r"\s*(?:void\s+)?(?:[A-Z_][A-Z0-9_]*\s+)*(\w+)\s*\(", text[j:])   # macros: bounds
                if not n:
                    continue
                start = j + n.end() - 1
                plist = text[start + 1:_balanced(text, start, "(", ")") - 1]
                head = text[max(0, m.start() - 400):m.start()]
                tparams = _template_params(head) if re.search(r"template\s*<[^;{}]*>\s*$", head, re.S) else []
                params = [d for p in split_top_level(plist, "<([", ">)]") if p.strip()
                          for d in _declarators(p.strip())[:1]]
                self.kernels.setdefault(n.group(1), (tparams, params))

    @classmethod
    def of_tree(cls, csrc):
        return cls(sorted(Path(csrc, "cuda").glob("*.cu*")) + sorted(Path(csrc).glob("*.h")))

    def layout(self, typ, env):
        """(size, alignment, [(offset, pointer field name)]) of a parameter or field type; None if
        the type is unknown. env: template parameter -> instantiation argument (short name)."""
        t = typ.replace("__restrict__", "").replace("const", "").replace("volatile", "").strip()
        if "*" in t:
            return 8, 8, None            # a pointer: the caller names it
        base = re.sub(r"<.*>", "", t).strip().split("::")[-1]
        targs = re.search(r"<(.*)>", t)
        if base in env:
            size = ARG_SIZES.get(env[base])
            return (size, size, []) if size else None
        if base in SCALAR_SIZES:
            return SCALAR_SIZES[base], SCALAR_SIZES[base], []
        if base not in self.structs:
            return None
        tparams, fields = self.structs[base]
        inner = dict(zip(tparams, [env.get(a, a) for a in split_top_level(targs.group(1), "<(", ">)")] if targs else []))
        off, align, ptrs = 0, 1, []
        for ftype, fname in fields:
            lay = self.layout(ftype, inner)
            if lay is None:
                return None
            size, al, sub = lay
            off = (off + al - 1) // al * al
            ptrs += [(off, fname)] if sub is None else [(off + o, n) for o, n in sub]
            off += size
            align = max(align, al)
        return (off + align - 1) // align * align, align, ptrs

    def pointer_params(self, kernel, args, compiled):
        """({constant-bank offset: pointer name}, error) of an instantiation of `kernel` with template
        arguments `args` (short names). Offsets are the compiled ones (compiled = {ordinal: (offset,
        size)}, EIATTR_KPARAM_INFO); the declaration gives the names, and lays out struct fields.
        error: why the declaration does not explain the compiled layout ('' when it does)."""
        if kernel not in self.kernels:
            return {}, f"no declaration of {kernel} in the sources"
        tparams, params = self.kernels[kernel]
        env = dict(zip(tparams, args))
        if compiled and len(compiled) != len(params):
            return {}, f"{kernel}: {len(params)} parameters declared, {len(compiled)} compiled"
        names, off = {}, 0
        for k, (ptype, pname) in enumerate(params):
            lay = self.layout(ptype, env)
            if compiled:
                off, c_size = compiled[k]
                if lay is not None and lay[0] != c_size:
                    return names, (f"{kernel}: parameter {pname} ({ptype}) is {lay[0]} B by the declarations, "
                                   f"{c_size} B compiled")
            elif lay is None:
                break                    # no compiled layout to go on: the rest stays unnamed
            else:
                off = (off + lay[1] - 1) // lay[1] * lay[1]
            if lay is None:
                continue                 # a type declared elsewhere (torch): its fields stay unnamed
            size, _, sub = lay
            for o, n in ([(0, pname)] if sub is None else sub):
                names[PARAM_BASE + off + o] = n
            off += size
        return names, ""


def _row_pack_bits(args, vec_index, dtype_indices):
    """Narrowest pack (bits) of a row kernel instantiation: VEC elements of each tensor dtype, capped
    at 16 bytes; None for the scalar (VEC = 1) fallback."""
    vec = int(args[vec_index])
    if vec <= 1:
        return None
    return 8 * min(min(16, vec * DTYPE_BYTES[args[i]]) for i in dtype_indices)


# Kernels documented as vectorised: name -> (narrowest access in bits of a vector instantiation,
# None for its scalar fallback; pointer names whose accesses are scalar by design).
VECTORISED = {
    "mln_forward_kernel": (lambda a: _row_pack_bits(a, 3, (0, 1, 2)), {"mean", "rstd"}),
    "mln_backward_kernel": (lambda a: _row_pack_bits(a, 3, (0, 1, 2)), {"mean", "rstd"}),
    "mln_backward_tier_kernel": (lambda a: _row_pack_bits(a, 3, (0, 1, 2)), {"mean", "rstd"}),
    "gated_residual_kernel": (lambda a: _row_pack_bits(a, 3, (0, 1, 2)), set()),
    "mln_forward_tier_kernel": (lambda a: _row_pack_bits(a, 3, (0, 1, 2)), {"mean", "rstd"}),
    "gated_residual_tier_kernel": (lambda a: _row_pack_bits(a, 3, (0, 1, 2)), set()),
    "mln_column_finalize_kernel": (lambda a: _row_pack_bits(a, 2, (0, 1)), set()),
    "patch_rows_kernel": (lambda a: 128, set()),
    "gather_rows_kernel": (lambda a: _row_pack_bits(a, 1, (0,)), {"ids"}),
    "merge_rows_kernel": (lambda a: _row_pack_bits(a, 2, (0, 1)), {"inv"}),
    "scatter_bwd_token_kernel": (lambda a: _row_pack_bits(a, 2, (0, 1)), {"inv"}),
    "scatter_bwd_fill_partial_kernel": (lambda a: _row_pack_bits(a, 1, (0,)), {"ids", "partial"}),
}



# ==================================================================================================
# 9. Hard facts (CI)
# ==================================================================================================
def is_fp64(kf):
    return "fp64" in kf.args


def hard_failures(facts, launch_models=()):
    """(fails, notes): the hard facts of the compiled kernels, and those reported only (fp64).
    launch_models (kernel_report's) add: a launch with more threads than the kernel's launch bounds."""
    fails, notes = [], []
    for kf in facts:
        if kf.layout_error:
            fails.append(f"{kf.file}: {kf.short}: parameter names unknown: {kf.layout_error}")
        if kf.spills or kf.stack:
            msg = f"{kf.file}: {kf.short}: {kf.spill_stores} B spill stores, {kf.spill_loads} B spill loads, {kf.stack} B stack"
            (notes if is_fp64(kf) else fails).append(msg)
        if kf.regs > kf.maxreg:
            fails.append(f"{kf.file}: {kf.short}: {kf.regs} registers > launch-bounds budget {kf.maxreg}")
        rule = VECTORISED.get(kf.name)
        if rule is None:
            continue
        bits = rule[0](kf.args)
        if bits is None:
            continue
        for ins, width, names, lp in kf.loop_accesses():
            if width < bits and not (names <= rule[1]):
                fails.append(f"{kf.file}: {kf.short}: {width}-bit {ins.op} of {'/'.join(sorted(names))} at "
                             f"0x{ins.off:04x} in a loop (vector width {bits} bits)")
    for lm in launch_models:
        declared = lm.facts.max_threads
        if lm.launch.threads > declared:
            fails.append(f"{lm.launch.kernel}: launched with {lm.launch.threads} threads > __launch_bounds__ {declared}")
    return fails, notes



CACHE = REPO / "build" / "kernel_report"


def code_text(path):
    """A source's text with its comments blanked and its line breaks kept: what decides the cubin
    (its line info counts lines; comment wording does not change it)."""
    text = Path(path).read_text()
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def local_includes(src, seen=None):
    """The files of the tree a source includes with #include "...", transitively."""
    seen = set() if seen is None else seen
    for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', Path(src).read_text(), flags=re.M):
        p = (Path(src).parent / name).resolve()
        if p.is_file() and p not in seen:
            seen.add(p)
            local_includes(p, seen)
    return seen


def source_digest(src):
    """Digest of one .cu as compiled: the flags, its code and the code of the headers it includes."""
    h = hashlib.sha256(" ".join(NVCC_FLAGS).encode())
    for p in [Path(src)] + sorted(local_includes(src)):
        h.update(p.name.encode())
        h.update(code_text(p).encode())
    return h.hexdigest()[:16]


def facts_for(csrc, jobs, label):
    """Compile each csrc/cuda/*.cu of a tree (cubins cached per source under build/kernel_report, by
    the digest of the code that decides them) and analyse them."""
    csrc = Path(csrc)
    sources = sorted((csrc / "cuda").glob("*.cu"))
    cubins = {s: CACHE / label / source_digest(s) / (s.stem + ".cubin") for s in sources}
    todo = [s for s in sources if not Path(str(cubins[s]) + ".log").exists()]
    if todo:
        flags = torch_compile_flags()

        def build(s):
            cubins[s].parent.mkdir(parents=True, exist_ok=True)
            cubin, log = compile_cubin(s, cubins[s].parent, flags)
            Path(str(cubin) + ".log").write_text(log)   # written last: marks the cubin complete

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(build, todo))
    decls = Declarations.of_tree(csrc)
    facts = []
    for s in sources:
        facts += analyse_cubin(cubins[s], Path(str(cubins[s]) + ".log").read_text(), decls)
    return facts


def extract_tree(rev):
    """csrc/ of git revision `rev`, extracted once under build/kernel_report (its SASS line info
    points there); None when git or the revision is unavailable."""
    dest = CACHE / f"src-{rev}"
    if (dest / "csrc").is_dir():
        return dest / "csrc"
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "csrc"], capture_output=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest)
    return dest / "csrc"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    args = ap.parse_args(argv)
    facts = facts_for(REPO / "csrc", args.jobs, "current")
    fails, notes = hard_failures(facts)
    for n in notes:
        print(f"kernel_facts: note {n}")
    for f in fails:
        print(f"kernel_facts: FAIL {f}", file=sys.stderr)
    print(f"kernel_facts: {len(facts)} instantiations, {len(fails)} hard facts")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
