"""The efficiency sweep: forward and forward+backward time and peak memory of methods
over sequence lengths, next to ``torch.nn.functional.scaled_dot_product_attention``
measured in the same run.

Each (method, length, mode) case runs in its own worker process
(:mod:`attnzoo.bench.worker`). Time is the median of ``repeats`` runs after one
warm-up; peak memory is the growth of the resident set high-water mark during the
first (warm-up) call, above the inputs (``peak_mib``). That figure carries the
process's one-time set-up and the allocator's growth (~40 MiB at small N on CPU), so
with ``tensor_memory`` a second figure, ``peak_alloc_mib``, is the peak of live
tensors above the inputs during one more call, from the profiler's memory timeline
(about a second more per case: the profiler starts in each fresh worker); on CUDA
(``device="cuda"``) it is the allocator's peak, and the calls are synchronised. The
report uses ``peak_alloc_mib`` where it exists.

Trust: each case records the torch threads it actually ran with (read inside its worker),
the load around its timed repeats (:func:`attnzoo.bench.worker.load_between`: load
average, other processes' CPU, steal, own CPU time against wall time), and the spread
(max - min) / median of its repeats. A case whose spread exceeds ``noise_threshold`` is
timed again, up to ``noise_retries`` more times, the quietest attempt kept; a case still
above the threshold is flagged ``noisy``, and one whose threads found no free core
(contention above ``load_threshold``) ``loaded``. The report warns about both.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch

from .. import registry
from ..errors import AttentionInputError, InputTooLarge
from .worker import load_between, load_snapshot, peak_rss_mib, reset_peak_rss, rss_mib, run_isolated

#: How a case's timing is judged (the sweep's ``noise_threshold``, ``noise_retries`` and
#: ``load_threshold`` settings): spread (max - min) / median above ``threshold`` is noise
#: and is re-measured up to ``retries`` more times; contention above ``load_threshold``
#: (the fraction of the case's threads that found no free core) marks a loaded machine.
NOISE_DEFAULTS = {"threshold": 0.25, "retries": 2, "load_threshold": 0.25}

#: The baseline every method is compared with: torch's own SDPA, called directly.
BASELINE = "torch_sdpa"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def label(method: str, impl: str) -> str:
    """A series' name: the method, or ``method:impl`` for a named impl (``softmax:tiled``)."""
    return method if impl == "auto" else f"{method}:{impl}"


@dataclass(frozen=True)
class BenchCase:
    method: str  # a registered method, or BASELINE
    impl: str  # "auto", "reference" or a fast impl name
    seq_len: int
    mode: str  # "fwd" or "fwd+bwd"
    pattern: str = "causal_self"
    dtype: str = "float32"
    batch: int = 1
    heads: int = 8
    kv_heads: Optional[int] = None
    head_dim: int = 64
    repeats: int = 3
    options: tuple = ()  # method options as (name, value) pairs
    error: bool = False  # also measure the output's error against exact softmax (SDPA)
    device: str = "cpu"  # "cuda": timed with synchronisation, plus the allocator's peak
    tensor_memory: bool = False  # CPU: also the peak of live tensors, profiled (~1 s more per case)
    threads: Optional[int] = None  # torch threads set inside the case's process (None: torch's default)

    @property
    def label(self) -> str:
        return label(self.method, self.impl)

    def key(self) -> str:
        """Identifies the case in a results file (``--resume`` skips keys already there).
        ``threads`` enters the key only when set, so results from before it existed resume."""
        from .results import jsonable

        fields = asdict(self)
        if fields["threads"] is None:
            del fields["threads"]
        return "efficiency|" + json.dumps(jsonable(fields), sort_keys=True)


@dataclass
class BenchResult:
    case: BenchCase
    status: str  # ok, error, oom, timeout
    times_s: list = field(default_factory=list)
    peak_mib: Optional[float] = None
    impl_used: Optional[str] = None
    error: Optional[str] = None
    density: Optional[float] = None  # fraction of the visible keys used, when the method reports it
    max_error: Optional[float] = None  # max |out - softmax(q, k, v)|, with BenchCase.error
    peak_alloc_mib: Optional[float] = None  # the device allocator's peak above the inputs (CUDA)
    threads: Optional[int] = None  # torch.get_num_threads() inside the worker, while the case ran
    load: Optional[dict] = None  # the load around the kept attempt (worker.load_between)
    noisy: bool = False  # the spread stayed above the threshold after every retry
    loaded: bool = False  # the case's threads found no free core (contention above load_threshold)
    attempts: int = 1  # timed attempts (1 + re-measurements of a noisy case)
    spreads: list = field(default_factory=list)  # the spread of each attempt
    noise_threshold: Optional[float] = None
    memory_measure: Optional[str] = None  # what peak_alloc_mib is: "tensor" (profiler), "allocator" (CUDA)
    wall_s: Optional[float] = None  # the whole case, worker start to result (what it cost the sweep)

    @property
    def median_s(self) -> Optional[float]:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def spread(self) -> Optional[float]:
        """(max - min) / median of the timed repeats."""
        return spread(self.times_s)

    def record(self, run_id: Optional[str] = None) -> dict:
        """The JSON record of the case (see :mod:`attnzoo.bench.results`). ``threads`` is
        the count measured inside the worker (None when the case produced no measurement);
        ``threads_requested`` the one the sweep asked for."""
        from .results import jsonable

        out = {"kind": "efficiency", "key": self.case.key(), **asdict(self.case)}
        out.update(options=jsonable(dict(self.case.options)), label=self.case.label, status=self.status,
                   times_s=self.times_s, median_s=self.median_s, spread=self.spread, peak_mib=self.peak_mib,
                   impl_used=self.impl_used, error=self.error, density=self.density, max_error=self.max_error,
                   peak_alloc_mib=self.peak_alloc_mib, threads=self.threads, threads_requested=self.case.threads,
                   load=self.load, noisy=self.noisy, loaded=self.loaded, attempts=self.attempts,
                   spreads=self.spreads, noise_threshold=self.noise_threshold,
                   memory_measure=self.memory_measure, wall_s=self.wall_s, run_id=run_id)
        return out


def spread(times: list) -> Optional[float]:
    """(max - min) / median of ``times``; None when empty or the median is 0."""
    if not times:
        return None
    m = statistics.median(times)
    return (max(times) - min(times)) / m if m else None


def parse_methods(spec: str) -> list[tuple[str, str]]:
    """``"softmax:tiled,sigmoid"`` -> ``[("softmax", "tiled"), ("sigmoid", "auto")]`` (validated)."""
    pairs = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, impl = item.partition(":")
        impl = impl or "auto"
        if name != BASELINE:
            s = registry.get(name)  # raises with a suggestion if misspelled
            if impl != "auto" and impl not in s.impl_names:
                raise AttentionInputError(f"{name!r} has no impl {impl!r}; choose from {', '.join(s.impl_names)}")
        pairs.append((name, impl))
    if not pairs:
        raise AttentionInputError("--methods is empty")
    return pairs


def make_inputs(case: BenchCase, requires_grad: bool):
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(0)
    cross = case.pattern.endswith("cross")
    nq = case.seq_len
    nk = case.seq_len if not cross else max(1, case.seq_len // 2)
    hkv = case.kv_heads or case.heads
    q = torch.randn(case.batch, case.heads, nq, case.head_dim, generator=g).to(dtype)
    k = torch.randn(case.batch, hkv, nk, case.head_dim, generator=g).to(dtype)
    v = torch.randn(case.batch, hkv, nk, case.head_dim, generator=g).to(dtype)
    q, k, v = (t.to(case.device) for t in (q, k, v))
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def split_module_options(spec, options: dict) -> tuple[dict, dict]:
    """``(constructor options, call options)`` of a method with a module (see
    :meth:`attnzoo.registry.MethodSpec.split_module_options`)."""
    return spec.split_module_options(options)


def lower_right_causal(Nq: int, Nk: int, device=None) -> torch.Tensor:
    """The (Nq, Nk) causal mask aligned bottom-right (query i sees keys j <= i + Nk - Nq)."""
    return torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril(diagonal=Nk - Nq)


def tensor_peak_mib(fn, input_bytes: int) -> Optional[float]:
    """Peak MiB of live CPU tensors while ``fn()`` runs, above ``input_bytes`` (the inputs,
    which the timeline counts): what the attention's own tensors needed, free of the
    allocator and process noise that the resident set carries. Uses the profiler's
    memory timeline; None where it is unavailable."""
    import os
    import warnings

    from torch.profiler import ProfilerActivity, profile

    saved = os.dup(2)  # the profiler logs to stderr from C++: keep the sweep's terminal clean
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # export_memory_timeline's deprecation notice
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                             with_stack=True) as prof:
                    fn()
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    path = os.path.join(tmp, "timeline.json")
                    prof.export_memory_timeline(path, device="cpu")
                    with open(path) as f:
                        _, sizes = json.load(f)
        if not sizes:
            return None
        return max(0.0, (max(sum(s) for s in sizes) - input_bytes) / 2**20)
    except Exception:  # noqa: BLE001 - a torch without the memory timeline: the resident set still tells
        return None
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _runner(case: BenchCase):
    """The function timed: one forward (and backward) of the case's method."""
    causal, cross = case.pattern.startswith("causal"), case.pattern.endswith("cross")
    if case.method == BASELINE:
        import torch.nn.functional as F

        def call(q, k, v):
            Nq, Nk = q.shape[2], k.shape[2]
            if causal and Nq != Nk:
                mask = lower_right_causal(Nq, Nk, q.device)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])

        return call, "sdpa"
    from ..api import attention

    spec = registry.get(case.method)
    options = dict(case.options)
    module = None
    if spec.module is not None:
        built, options = split_module_options(spec, options)
        module = spec.module(heads=case.heads, kv_heads=case.kv_heads or case.heads, head_dim=case.head_dim,
                             **built).to(case.device)

    def call(q, k, v):
        if module is not None:
            return module(q, k, v, causal=causal, cross=cross, impl=case.impl, nan_policy="propagate", **options)
        return attention(q, k, v, method=case.method, causal=causal, cross=cross, impl=case.impl,
                         nan_policy="propagate", **options)

    if module is not None:
        return call, case.impl
    q, k, v = make_inputs(BenchCase(**{**asdict(case), "seq_len": 2}), False)
    info = spec.check(q, k, v, causal=causal, cross=cross, **options)
    return call, spec.select(case.impl, info).name


#: the clock the repeats are timed with (a test may replace it with a simulated one)
clock = time.perf_counter


def _timed(once, repeats: int, sync, threads: int) -> tuple:
    """``(times, load)``: ``repeats`` timed calls, and the load around them."""
    before = load_snapshot()
    times = []
    for _ in range(repeats):
        sync()
        t0 = clock()
        once()
        sync()
        times.append(clock() - t0)
    return times, load_between(before, load_snapshot(), threads)


def time_repeats(once, repeats: int, sync=lambda: None, noise: Optional[dict] = None) -> dict:
    """Time ``once`` ``repeats`` times; while the spread exceeds the threshold, time it
    again (``retries`` more attempts at most) and keep the quietest attempt. Returns
    ``times_s``, ``load``, ``noisy``, ``loaded``, ``attempts``, ``spreads``,
    ``noise_threshold`` and ``threads`` (this process's torch threads)."""
    policy = {**NOISE_DEFAULTS, **(noise or {})}
    threads = torch.get_num_threads()
    attempts = []
    for _ in range(1 + max(0, int(policy["retries"]))):
        times, load = _timed(once, repeats, sync, threads)
        attempts.append((times, load))
        if (spread(times) or 0.0) <= policy["threshold"]:
            break
    times, load = min(attempts, key=lambda a: spread(a[0]) or 0.0)
    contention = load.get("contention")
    return {"times_s": times, "load": load, "noisy": (spread(times) or 0.0) > policy["threshold"],
            "loaded": contention is not None and contention > policy["load_threshold"],
            "attempts": len(attempts), "spreads": [spread(t) for t, _ in attempts],
            "noise_threshold": policy["threshold"], "threads": threads}


def measure(case: BenchCase, noise: Optional[dict] = None) -> dict:
    """Run in the worker: peak memory of the first call, then the median of ``repeats``
    (re-timed while noisy, see :func:`time_repeats`); the torch threads it ran with."""
    torch.manual_seed(0)
    backward = case.mode == "fwd+bwd"
    call, used = _runner(case)
    q, k, v = make_inputs(case, backward)
    grad_out = None

    def once():
        nonlocal grad_out
        if backward:
            out = call(q, k, v)
            if grad_out is None:
                grad_out = torch.randn_like(out)
            out.backward(grad_out)
            for t in (q, k, v):
                t.grad = None
        else:
            with torch.no_grad():
                call(q, k, v)

    from .. import stats

    cuda = torch.device(case.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        alloc_base = torch.cuda.memory_allocated()
    reset_peak_rss()
    base = rss_mib()
    with stats.collect() as collected:
        once()
        sync()
    peak = max(0.0, peak_rss_mib() - base)
    if cuda:
        peak_alloc = (torch.cuda.max_memory_allocated() - alloc_base) / 2**20
    elif case.tensor_memory:  # the largest total of live tensors during one call (the profiler's timeline)
        peak_alloc = tensor_peak_mib(once, sum(t.nbytes for t in (q, k, v)))
    else:
        peak_alloc = None
    density = statistics.fmean(collected["density"]) if collected.get("density") else None
    max_error = None
    if case.error:
        import torch.nn.functional as F

        causal = case.pattern.startswith("causal")
        with torch.no_grad():
            out = call(q, k, v).float()
            Nq, Nk = q.shape[2], k.shape[2]
            mask = lower_right_causal(Nq, Nk, q.device) if causal else None
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                   enable_gqa=k.shape[1] != q.shape[1])
            max_error = float((out - exact).abs().max())
    timing = time_repeats(once, case.repeats, sync, noise)
    measure_name = "allocator" if cuda else ("tensor" if peak_alloc is not None else None)
    return {**timing, "peak_mib": peak, "impl_used": used, "density": density, "max_error": max_error,
            "peak_alloc_mib": peak_alloc, "memory_measure": measure_name}


def run_case(case: BenchCase, timeout: float = 600.0, isolate: bool = True, memory_limit_mib=None,
             noise: Optional[dict] = None) -> BenchResult:
    """Measure ``case`` in its own worker process (in this one without ``isolate``), with
    ``case.threads`` torch threads set there; ``noise``: :data:`NOISE_DEFAULTS` overrides."""
    t0 = time.perf_counter()
    if not isolate:
        from .worker import _out_of_memory

        before = torch.get_num_threads()
        try:
            if case.threads:
                torch.set_num_threads(case.threads)
            result = BenchResult(case, "ok", **measure(case, noise))
        except Exception as e:  # noqa: BLE001
            result = BenchResult(case, "oom" if _out_of_memory(e) else "error", error=f"{type(e).__name__}: {e}")
        finally:
            torch.set_num_threads(before)
    else:
        cuda = torch.device(case.device).type == "cuda"  # the CUDA runtime maps huge address ranges: no cap
        status, value = run_isolated(measure, (case, noise), timeout, None if cuda else memory_limit_mib,
                                     threads=case.threads)
        result = BenchResult(case, "ok", **value) if status == "ok" else BenchResult(case, status, error=str(value))
    if result.status == "error" and (result.error or "").startswith(f"{InputTooLarge.__name__}:"):
        # a size limit the method declares (a naive algorithm): not timed, not a failure
        result.status, result.error = "skipped", "not timed: " + result.error.split("\n")[0]
    result.wall_s = time.perf_counter() - t0
    return result


def build_cases(methods: list, lengths: Iterable[int], modes: Iterable[str], patterns: Iterable[str], dtype: str,
                options_for=lambda name: (), **common) -> list[BenchCase]:  # common: BenchCase fields
    """The baseline first at every length, then every method; skips patterns a method lacks.
    ``options_for(name)`` gives a method's options as (name, value) pairs."""
    cases = []
    pairs = [(BASELINE, "auto")] + [p for p in methods if p[0] != BASELINE]
    for pattern in patterns:
        for n in lengths:
            for mode in modes:
                for name, impl in pairs:
                    if name != BASELINE and pattern not in registry.get(name).patterns:
                        continue
                    opts = {} if name == BASELINE else registry.get(name).sized_options(int(n), module=True)
                    opts.update(dict(options_for(name)))
                    cases.append(BenchCase(name, impl, int(n), mode, pattern=pattern, dtype=dtype,
                                           options=tuple(opts.items()), **common))
    return cases


def ratios(results: list[BenchResult]) -> dict:
    """time(method) / time(SDPA) for the same length, mode, pattern and dtype."""
    base = {}
    for r in results:
        c = r.case
        if c.method == BASELINE and r.median_s:
            base[(c.seq_len, c.mode, c.pattern, c.dtype)] = r.median_s
    out = {}
    for r in results:
        c = r.case
        ref = base.get((c.seq_len, c.mode, c.pattern, c.dtype))
        out[id(r)] = (r.median_s / ref) if (ref and r.median_s) else None
    return out


def scaling_exponent(lengths: list, values: list) -> Optional[float]:
    """Least-squares slope of log(value) against log(N): ~1 linear, ~2 quadratic."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(lengths, values) if v and v > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def efficiency_length(lengths: list, method_values: list, baseline_values: list) -> Optional[float]:
    """CAB's efficiency length: the sequence length from which the method is cheaper
    (faster, or lighter when given memory) than exact attention.

    The ratio ``method / baseline`` is interpolated in log-log between measured lengths;
    the result is the last crossing below 1 after which it stays below 1. Returns the
    first length if the method is cheaper everywhere measured, None if it never ends up
    cheaper (or nothing usable was measured).
    """
    pts = sorted((n, m / b) for n, m, b in zip(lengths, method_values, baseline_values) if m and b and m > 0 and b > 0)
    if not pts or pts[-1][1] >= 1:
        return None
    i = len(pts) - 1
    while i > 0 and pts[i - 1][1] < 1:
        i -= 1
    if i == 0:
        return float(pts[0][0])
    (n0, r0), (n1, r1) = pts[i - 1], pts[i]
    x0, x1, y0, y1 = math.log(n0), math.log(n1), math.log(r0), math.log(r1)
    return float(math.exp(x0 + (0 - y0) * (x1 - x0) / (y1 - y0)))




# ------------------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class DecodeCase:
    """Per-token ``step`` time after a prefill of ``position`` tokens."""

    method: str
    position: int
    dtype: str = "float32"
    batch: int = 1
    heads: int = 8
    kv_heads: Optional[int] = None
    head_dim: int = 64
    steps: int = 32
    options: tuple = ()
    threads: Optional[int] = None  # torch threads set inside the case's process (None: torch's default)


def measure_decode(case: DecodeCase) -> dict:
    """Prefill ``position`` tokens in one chunked step, then time single-token steps; the
    torch threads it ran with and the load around the steps."""
    from .. import decoding

    torch.manual_seed(0)
    spec = registry.get(case.method)
    dtype = DTYPES[case.dtype]
    hkv = case.kv_heads or case.heads
    B, D = case.batch, case.head_dim
    options = dict(case.options)
    g = torch.Generator().manual_seed(0)
    total = case.position + case.steps + 1
    q = torch.randn(B, case.heads, total, D, generator=g).to(dtype)
    k = torch.randn(B, hkv, total, D, generator=g).to(dtype)
    v = torch.randn(B, hkv, total, D, generator=g).to(dtype)
    learned = spec.query == "learned"

    def queries(a, b):
        return q[:, :, :1] if learned else q[:, :, a:b]

    with torch.no_grad():
        state = decoding.init_state(case.method, B, hkv, D, D, dtype=dtype, max_len=total, **options)
        decoding.step(case.method, state, queries(0, case.position), k[:, :, : case.position],
                      v[:, :, : case.position], **options)
        reset_peak_rss()
        base = rss_mib()
        times = []
        before = load_snapshot()
        for t in range(case.position, case.position + case.steps + 1):
            t0 = time.perf_counter()
            decoding.step(case.method, state, queries(t, t + 1), k[:, :, t:t + 1], v[:, :, t:t + 1], **options)
            times.append(time.perf_counter() - t0)
        threads = torch.get_num_threads()
        load = load_between(before, load_snapshot(), threads)
    nbytes = state.nbytes() if hasattr(state, "nbytes") else None
    return {"times_s": times[1:], "peak_mib": max(0.0, peak_rss_mib() - base), "state_bytes": nbytes,
            "threads": threads, "load": load}


def run_decode(case: DecodeCase, timeout: float = 600.0, memory_limit_mib=None) -> dict:
    """``{"case", "status", ...}``: ``"ok"`` with ``median_s`` and the measurement, or the
    worker's ``"oom"`` / ``"timeout"`` / ``"error"`` with ``error`` (never a timing)."""
    status, value = run_isolated(measure_decode, (case,), timeout, memory_limit_mib, threads=case.threads)
    if status != "ok":
        return {"case": case, "status": status, "error": str(value), "median_s": None}
    return {"case": case, "status": "ok", "median_s": statistics.median(value["times_s"]), **value}


def decode_growth(first: Optional[dict], last: Optional[dict]) -> tuple:
    """``(ratio, status)`` of the step time at the last position over the first: the ratio
    when both ran, else None and the status of the end that did not (``"oom"``, ...) —
    never a ratio against an earlier position's value."""
    for end in (last, first):
        if end is None:
            return None, "missing"
        if end.get("status") != "ok" or not end.get("median_s"):
            return None, str(end.get("status") or "missing")
    return last["median_s"] / first["median_s"], "ok"
