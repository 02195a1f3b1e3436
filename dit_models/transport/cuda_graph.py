"""CUDA graphs for sampling: the one helper module (every sampler that captures a graph uses these pieces).

Three capture schemes, all built on LoopGraph's primitives (_warmup, _new_graph, _record, so a CPU fake of those
three covers every scheme in tests/test_samplers.py):

* per step (capture_replay): SiT's Euler-Maruyama SDE captures one step (network forward with CFG +
  dit_kernels.sde_euler_maruyama_step_table, whose per-step scalars come from a device table indexed by a device
  step counter) and replays it num_steps - 2 times; nothing is cached and the first call is already fast. This
  is the scheme benchmarks/RESULTS.md measures: SiT-XL/2 SDE at batch 1, 3.14 s/image fused eager -> 0.82 with
  the graph (launch-bound), unchanged at batch 64 (GEMM-bound).
* whole loop (LoopGraph, GRAPH_CACHE): SiT's other fixed-step samplers capture the loop once, with every
  per-step scalar a host constant baked into the graph, so a replay runs exactly the kernels of the eager loop;
  with the same generator state the result equals eager sampling. The cache is module-wide and holds ONE graph
  (a script that builds a new sample function per batch still replays), keyed by graph_key(): the sampler's
  configuration, each coefficient named explicitly, plus the input signature, model and generator.
  reset_cuda_graphs() frees its memory pool.
* per network call (GraphedCall): the DDPM and EDM samplers replay one graph of the network call per input
  shape (static input buffers).

Random numbers: the generator (or the default CUDA generator) is saved before the warm-up step and
restored after capture, so the replay draws the same Philox stream an eager call would. A custom
torch.Generator is registered with the graph (CUDAGraph.register_generator_state).

Only the per-step scheme has a measured benefit so far; the other two are kept for the --cuda-graph flag of
every sampler and await a GPU measurement (benchmarks/bench_model.py).
"""
import torch

__all__ = ["LoopGraph", "GRAPH_CACHE", "GraphedCall", "reset_cuda_graphs", "warmup", "capture_replay"]


def _signature(config, x, model, kwargs, generator):
    owner = getattr(model, "__self__", model)
    func = getattr(model, "__func__", None)
    kw = []
    for k in sorted(kwargs):
        v = kwargs[k]
        kw.append((k, ("T", tuple(v.shape), v.dtype, v.device)) if isinstance(v, torch.Tensor) else (k, repr(v)))
    return (config, tuple(x.shape), x.dtype, x.device, id(owner), func, tuple(kw), id(generator))


class LoopGraph:
    """Cache of one captured loop: run(loop, x, model, kwargs, generator) -> list of tensors.

    loop(x, kwargs, max_steps=None) must be a pure function of its tensor inputs (no host reads
    of device values, no in-place writes to x) that returns a list of tensors.
    """

    def __init__(self):
        self.key = None
        self.keep_alive = None  # objects whose id() is in the key: they must not be recycled
        self.graph = None
        self.static_x = None
        self.static_kwargs = None
        self.static_out = None

    def reset(self):
        """Drop the captured graph and its memory pool."""
        self.__init__()

    def run(self, loop, x, model, kwargs, generator=None, config=None, owner=None):
        """Replay (capturing first if the signature changed); config: the sampler's graph_key(), a hashable
        tuple naming everything the loop bakes in."""
        key = _signature(config, x, model, kwargs, generator)
        if key != self.key:
            self._capture(loop, x, kwargs, generator)
            self.key = key
            self.keep_alive = (model, generator, owner)
        else:
            self.static_x.copy_(x)
            for k, v in kwargs.items():
                if isinstance(v, torch.Tensor):
                    self.static_kwargs[k].copy_(v)
        self.graph.replay()
        return [o.clone() for o in self.static_out]

    def _capture(self, loop, x, kwargs, generator):
        self.reset()
        device = x.device
        static_x = x.clone()
        static_kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        state = self._get_state(generator, device)
        # Warm-up (lazy cuBLAS/cuDNN init, allocator growth) consumes random numbers: restore after it.
        self._warmup(lambda: loop(static_x, static_kwargs, max_steps=1), device)
        graph = self._new_graph(generator)
        self._restore(generator, state, device)
        static_out = self._record(graph, lambda: loop(static_x, static_kwargs))
        # Capture does not consume random numbers, but restore anyway so replay 1 == eager call 1.
        self._restore(generator, state, device)
        self.graph, self.static_x, self.static_kwargs, self.static_out = graph, static_x, static_kwargs, static_out

    # The CUDA-specific pieces (overridden by a CPU fake in tests/test_samplers.py).

    @staticmethod
    def _get_state(generator, device):
        return generator.get_state() if generator is not None else torch.cuda.get_rng_state(device)

    @staticmethod
    def _warmup(fn, device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)

    @staticmethod
    def _new_graph(generator):
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            if not hasattr(graph, "register_generator_state"):
                raise RuntimeError("cuda_graph=True with a custom generator needs CUDAGraph.register_generator_state "
                                   "(torch >= 2.5); pass generator=None to use the default CUDA generator")
            graph.register_generator_state(generator)
        return graph

    @staticmethod
    def _record(graph, fn):
        with torch.cuda.graph(graph):
            return fn()

    @staticmethod
    def _restore(generator, state, device):
        if generator is not None:
            generator.set_state(state)
        else:
            torch.cuda.set_rng_state(state, device)


GRAPH_CACHE = LoopGraph()


def reset_cuda_graphs():
    """Free the cached sampling graph and its memory pool."""
    GRAPH_CACHE.reset()


def warmup(fn, device):
    """Run fn once on a side stream (before capturing it), as CUDA-graph capture requires."""
    LoopGraph._warmup(fn, device)


def capture_replay(fn, generator, device):
    """Capture fn() (which must only update static buffers) in a CUDA graph; return graph.replay.

    The graph holds references to fn's buffers; drop the returned callable to free it.
    """
    graph = LoopGraph._new_graph(generator)
    LoopGraph._record(graph, fn)
    return graph.replay


class GraphedCall:
    """fn(*args) replayed from one CUDA graph per input signature (tensor shapes and dtypes, other arguments by
    value); the tensor inputs are copied into static buffers first. Inference only; returns a copy of the output."""

    def __init__(self, fn):
        self.fn, self.graphs = fn, {}

    def __call__(self, *args):
        key = tuple((a.shape, a.dtype) if torch.is_tensor(a) else a for a in args)
        if key not in self.graphs:
            static_in = [a.clone() if torch.is_tensor(a) else a for a in args]
            device = next(a.device for a in args if torch.is_tensor(a))
            # Two warm-up calls outside the graph (cuBLAS workspaces, autotuning).
            LoopGraph._warmup(lambda: [self.fn(*static_in) for _ in range(2)], device)
            graph = LoopGraph._new_graph(None)
            static_out = LoopGraph._record(graph, lambda: self.fn(*static_in))
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        for dst, src in zip(static_in, args):
            if torch.is_tensor(src):
                dst.copy_(src)
        graph.replay()
        return static_out.clone()
