"""scripts/kernel_facts.py and kernel_report.py on kernels with known SASS (tests/fixtures/kernel_report_known.cu).

The compiled cases need nvcc and nvdisasm/cuobjdump (the CUDA install, or the copies in the triton
wheel of a CUDA build of torch) and skip without them; CI runs them in the CUDA environment of
.ci/run. The parsing and model helpers are tested everywhere.
"""
import math

import pytest
from conftest import REPO, load_repo_file

KNOWN = REPO / "tests" / "fixtures" / "kernel_report_known.cu"

kf = load_repo_file("scripts/kernel_facts.py", "kernel_facts")
kr = load_repo_file("scripts/kernel_report.py", "kernel_report")


def _have_tools():
    try:
        for tool in ("nvcc", "nvdisasm", "cuobjdump"):
            kf.find_tool(tool)
    except FileNotFoundError:
        return False
    return True


needs_tools = pytest.mark.skipif(not _have_tools(), reason="nvcc / nvdisasm / cuobjdump not found")


def _ins(op, args="", wrb=7, wait=0, off=0):
    return kf.Instr(off, "", op, args, (), 1, wrb, 7, wait)


# ---- parsing and model helpers (no CUDA tools) -----------------------------------------------------
def test_parse_ptxas():
    log = """ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPf
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem
"""
    got = kf.parse_ptxas(log)["_Z1kPf"]
    assert got == dict(stack=16, spill_stores=12, spill_loads=8, regs=40, smem=128, barriers=1)


def test_short_name():
    name, args = kf.short_name("dit::(anonymous namespace)::mln_forward_kernel<c10::BFloat16, float, c10::Half, 8, true>"
                               "(dit::(anonymous namespace)::FwdArgs<c10::BFloat16, float, c10::Half>)")
    assert (name, args) == ("mln_forward_kernel", ["bf16", "fp32", "fp16", "8", "true"])
    assert kf.short_name("copy_kernel(float4 const*, float4*, int)") == ("copy_kernel", [])


def test_access_bits():
    assert [kf.access_bits(op) for op in ("LDG.E.128.CONSTANT", "LDG.E.64", "LDG.E", "STG.E.U16", "LDG.E.S8")] == [
        128, 64, 32, 16, 8]


def test_occupancy_matches_the_occupancy_calculator():
    assert kr.occupancy(122, 128, 0).ctas == 4          # 25%: register-limited row kernel
    assert kr.occupancy(75, 256, 9344).ctas == 3
    assert kr.occupancy(27, 256, 0).ctas == 8           # thread-limited
    occ = kr.occupancy(32, 256, 100 * 1024)
    assert (occ.ctas, occ.limiter) == (2, "shared memory")


def test_trips_loads_issued_together_are_one_trip():
    body = [_ins("LDG.E.128", "R4, desc[UR4][R2.64]", wrb=2), _ins("LDG.E.128", "R8, desc[UR4][R6.64]", wrb=3),
            _ins("FADD", "R1, R4, R8", wait=0b1100)]
    st = kf.body_stats(body, lambda i: False)
    assert (st.dram_trips, st.l2_trips) == (1, 0)


def test_trips_dependent_loads_are_serial():
    body = [_ins("LDG.E", "R4, desc[UR4][R2.64]", wrb=2), _ins("IMAD.WIDE", "R6, R4, 0x4, R8", wait=0b100),
            _ins("LDG.E", "R5, desc[UR4][R6.64]", wrb=2), _ins("FADD", "R1, R5, R5", wait=0b100)]
    st = kf.body_stats(body, lambda i: i is body[2])
    assert [t.kind for t in st.trips] == ["dram", "l2"]


def test_declarations_lay_out_struct_parameters(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("""
template <typename T>
struct Args {
  const T* a;      // 0
  int n, m = 0;    // 8, 12
  double eps;      // 16
  T* b;            // 24
  bool flag;       // 32 -> struct size 40
};
template <typename T, typename I, int V>
__global__ void __launch_bounds__(256, 2) k(const T* __restrict__ x, I count, Args<T> args, float* out) {}
""")
    decls = kf.Declarations([src])
    names, err = decls.pointer_params("k", ["bf16", "i32", "8"], {})
    assert err == "" and names == {0x210: "x", 0x220: "a", 0x238: "b", 0x248: "out"}   # Args at +16
    # the compiled layout decides the offsets; a struct whose declared size disagrees is reported
    compiled = {0: (0, 8), 1: (8, 4), 2: (16, 40), 3: (56, 8)}
    assert decls.pointer_params("k", ["bf16", "i32", "8"], compiled) == (names, "")
    _, err = decls.pointer_params("k", ["bf16", "i32", "8"], {0: (0, 8), 1: (8, 4), 2: (16, 48), 3: (64, 8)})
    assert "40 B by the declarations, 48 B compiled" in err


def test_prediction_verdicts():
    assert kr.verdict((3100, 3300, 3500), 3000) == "yes"
    assert "optimistic" in kr.verdict((2800, 2950, 3100), 3000)
    assert "no" in kr.verdict((2000, 2300, 2600), 3000)
    assert kr.Params(cap_fraction=0.9).cap_gbps == pytest.approx(0.9 * kr.COPY_GBPS)
    assert max(kr.FIT_GRID["cap_fraction"]) < 1 and max(kr.FIT_GRID["l2_us"]) < kr.DRAM_LATENCY_RANGE_US[0]


def test_makespan_counts_waves():
    run = [(1, (1, 0, 0, 0))]            # one DRAM trip per CTA
    lm = kr.LaunchModel(kr.Launch("k", "f", 2 * 132 * 4 + 1, 128, 0), None, kr.Occupancy(4, 16, "registers"),
                        {}, {}, [[0, 2 * 132 * 4 + 1, tuple(run)]], [])
    p = kr.Params(dram_us=1.0)
    assert math.isclose(kr.makespan_us(lm, p), 3.0)   # 2 full waves + 1 CTA


# ---- compiled known kernels ------------------------------------------------------------------------
def _facts(tmp_path, *defines):
    out = tmp_path / ("known" + "".join(d.replace("-D", "_") for d in defines))
    out.mkdir()
    cubin, log = kf.compile_cubin(KNOWN, out, list(defines))
    return {f.name: f for f in kf.analyse_cubin(cubin, log, kf.Declarations([KNOWN]))}


@pytest.fixture
def known_params(monkeypatch):
    """Declare copy_kernel vectorised (128 bits); its parameter names come from its declaration."""
    monkeypatch.setitem(kf.VECTORISED, "copy_kernel", (lambda args: 128, set()))


@needs_tools
def test_clean_kernels_pass(tmp_path, known_params):
    facts = _facts(tmp_path)
    copy = facts["copy_kernel"]
    assert len(copy.loops) == 1
    acc = copy.loop_accesses()
    assert sorted((bits, tuple(names)) for _, bits, names, _ in acc) == [(128, ("in",)), (128, ("out",))]
    assert copy.params == {0x210: "in", 0x218: "out"} and copy.layout_error == ""
    assert facts["spill_kernel"].spills == 0
    fails, _ = kf.hard_failures(list(facts.values()), [])
    assert fails == []


@needs_tools
def test_detects_a_scalar_load_in_a_vectorised_loop(tmp_path, known_params):
    facts = _facts(tmp_path, "-DSCALAR_BUG")
    fails, _ = kf.hard_failures(list(facts.values()), [])
    assert len(fails) == 4 and all("copy_kernel" in f and "32-bit LDG" in f and " of in " in f for f in fails), fails


@needs_tools
def test_detects_a_spill(tmp_path, known_params):
    facts = _facts(tmp_path, "-DSPILL_BUG")
    assert facts["spill_kernel"].spills > 0 and facts["spill_kernel"].maxreg == 32
    fails, _ = kf.hard_failures(list(facts.values()), [])
    assert any("spill_kernel" in f and "spill stores" in f for f in fails), fails


@needs_tools
def test_serial_and_batched_trips(tmp_path):
    facts = _facts(tmp_path)

    def trips(k):
        return kf.body_stats(kf.region_instrs(k.instrs, k.reachable, [], []), lambda i: False).dram_trips

    assert trips(facts["chase_kernel"]) == 5     # kChase dependent loads
    assert trips(facts["batch_kernel"]) == 1     # kBatch loads issued together
