"""Latency, accuracy and size of the int8 MHA against torch and Flax, on the CPU.

For each (E, H, L, N) self-attention shape (S = L, seq-first ``(L, N, E)`` inputs,
``need_weights=False``), one process times, on the same input and the same weights:

* torch float ``nn.MultiheadAttention`` (eval, ``inference_mode``);
* torch's quantized MHA from torch's own eager flow (x86 engine, default x86 qconfig),
  called as torch users run it: float inputs through the QuantStubs, so the timed
  call includes quantizing the inputs and dequantizing the output;
* Flax's ``nn.MultiHeadDotProductAttention`` (``to_flax_attention``), jitted, on the
  batch-first ``(N, L, E)`` copy of the input (its native layout);
* our float ``MultiheadAttention``, jitted;
* our int8 ``QuantizedMultiheadAttention`` (``convert``), jitted: numerics
  "accurate" with and without ``int8_attention``, numerics "torch", and
  ``dynamic_activations`` with and without ``int8_attention``. Every int8 module
  takes float inputs and returns float outputs, so input quantization is included.

Both torch's and our static-activation modules are calibrated once on the very
input that is timed (as torch's own MHA quantization test does), so SQNRs measure
the quantization error, not a calibration mismatch. SQNRs are against our float
output (torch's modules against torch's float output on the same weights).

Threads: ``torch.set_num_threads(--threads)``; XLA's CPU client keeps its default
(an intra-op pool with one thread per core, ``--xla_cpu_multi_thread_eigen`` left
at its default: other settings measured no faster); ``XLA_FLAGS`` is recorded in
the JSON. Each implementation is timed in ``--rounds`` blocks of consecutive calls
after warm-up calls, the blocks interleaved across implementations; the latency is
the median of all ``--repeats`` calls. The machine may be shared: a fraction of a
core taken by another process stalls torch's OpenMP barriers several-fold, so each
block waits for the other processes to be idle (``--idle-window``), is redone when
they were not (``--max-foreign-load``), and the load they added is reported.

    python scripts/bench.py [--repeats 30] [--shapes 512,8,128,8 ...] [--quick]
                            [--json bench_results/bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch

import flax_qmha as fq
from flax_qmha._export import to_flax_attention
from flax_qmha._torch_layout import params_from_state_dict

# torch 2.13 deprecates its quantized tensors; the warnings say nothing about timing.
warnings.filterwarnings("ignore", module=r"torch\.")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from torch_quant_flow import observe_and_convert  # noqa: E402  (torch's own flow)

SHAPES = ((256, 4, 64, 16), (512, 8, 128, 8), (1024, 16, 256, 2))
QUICK_SHAPES = ((32, 4, 8, 2), (64, 4, 16, 2))
GOAL_SHAPE = (512, 8, 128, 8)
# key -> convert() options.
INT8_CONFIGS = {
    "int8_accurate": dict(numerics="accurate"),
    "int8_accurate_int8attn": dict(numerics="accurate", int8_attention=True),
    "int8_torch": dict(numerics="torch"),
    "int8_dynamic": dict(dynamic_activations=True),
    "int8_dynamic_int8attn": dict(dynamic_activations=True, int8_attention=True),
}
LABELS = {
    "torch_float": "torch nn.MultiheadAttention",
    "torch_quantized": "torch quantized MHA (+in q)",
    "flax_mhdpa": "flax MultiHeadDotProductAttn",
    "ours_float": "ours float",
    "int8_accurate": "ours int8 accurate",
    "int8_accurate_int8attn": "ours int8 accurate+int8attn",
    "int8_torch": "ours int8 torch numerics",
    "int8_dynamic": "ours int8 dynamic",
    "int8_dynamic_int8attn": "ours int8 dynamic+int8attn",
}
# Goals at GOAL_SHAPE.
MAX_INT8_OVER_TORCH_QUANTIZED = 0.8
MAX_INT8_OVER_OUR_FLOAT = 0.5
MAX_OUR_FLOAT_OVER_FLAX = 1.0
MIN_SQNR_MARGIN_DB = 3.0
MAX_BYTES_RATIO = 0.27


def sqnr_db(reference, x) -> float:
  reference, x = np.asarray(reference, np.float64), np.asarray(x, np.float64)
  noise = np.sum((reference - x) ** 2)
  return float("inf") if noise == 0 else float(10 * np.log10(np.sum(reference**2) / noise))


def nbytes(tree) -> int:
  return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree)))


def torch_weights(e: int, h: int, seed: int) -> torch.nn.MultiheadAttention:
  """torch's initialisation plus small random biases (as a trained model has;
  torch initialises them to zero)."""
  torch.manual_seed(seed)
  tm = torch.nn.MultiheadAttention(e, h).eval()
  with torch.no_grad():
    tm.in_proj_bias.copy_(0.02 * torch.randn_like(tm.in_proj_bias))
    tm.out_proj.bias.copy_(0.02 * torch.randn_like(tm.out_proj.bias))
  return tm


def build(shape, seed: int = 0):
  """``{key: (call, args, output_to_seq_first)}``, references and sizes for one shape."""
  e, h, l, n = shape
  x = np.random.default_rng(seed).normal(size=(l, n, e)).astype(np.float32)  # [L, N, E]
  xt = torch.from_numpy(x.copy())
  tm = torch_weights(e, h, seed)
  params = params_from_state_dict(
      {k: v.detach().numpy().astype(np.float32) for k, v in tm.state_dict().items()})

  torch.backends.quantized.engine = "x86"
  _, tq = observe_and_convert(tm, torch.ao.quantization.get_default_qconfig("x86"),
                              [(xt, xt, xt)])
  tq.eval()

  calibrated = fq.MultiheadAttention(e, h, qconfig=fq.get_default_qconfig("x86"))
  stats = calibrated.init(jax.random.key(seed), x, x, x)["quant_stats"]
  _, updates = calibrated.apply({"params": params, "quant_stats": stats}, x, x, x,
                                mutable=["quant_stats"])
  variables = {"params": params, **updates}
  reference = np.asarray(calibrated.apply(variables, x, x, x, need_weights=False)[0])

  float_module = fq.MultiheadAttention(e, h)
  float_variables = {"params": jax.tree.map(jnp.asarray, params)}
  flax_module, flax_variables = to_flax_attention(float_module, float_variables)

  def jitted(module):
    return jax.jit(lambda v, q: module.apply(v, q, q, q, need_weights=False)[0])

  def torch_call(module):
    def call(q):
      with torch.inference_mode():
        return module(q, q, q, need_weights=False)[0]
    return call

  runs = {
      "torch_float": (torch_call(tm), (xt,), lambda y: y.numpy()),
      "torch_quantized": (torch_call(tq), (xt,), lambda y: y.numpy()),
      "flax_mhdpa": (jax.jit(lambda v, q: flax_module.apply(v, q, q, q)),
                     (flax_variables, jnp.asarray(np.swapaxes(x, 0, 1))),
                     lambda y: np.swapaxes(np.asarray(y), 0, 1)),
      "ours_float": (jitted(float_module), (float_variables, jnp.asarray(x)), np.asarray),
  }
  sizes = {"ours_float": nbytes(float_variables)}
  for key, options in INT8_CONFIGS.items():
    qmodule, qvariables = fq.convert(calibrated, variables, **options)
    runs[key] = (jitted(qmodule), (qvariables, jnp.asarray(x)), np.asarray)
    sizes[key] = nbytes(qvariables)
  t_reference = tm(xt, xt, xt, need_weights=False)[0].detach().numpy()
  return runs, reference, t_reference, sizes


class ForeignLoad:
  """CPU time used by *other* processes while timing, in cores (Linux only, else None).

  The machine is shared; a few tenths of a core taken by another process stall
  torch's OpenMP barriers and XLA's thread pool, so every timing records it.
  """

  def __enter__(self):
    self.start = self._snapshot()
    return self

  def __exit__(self, *exc):
    end = self._snapshot()
    self.cores = self.seconds = None
    if self.start and end:
      (busy0, own0, t0), (busy1, own1, t1) = self.start, end
      self.wall = t1 - t0
      self.seconds = max(0.0, (busy1 - busy0) / os.sysconf("SC_CLK_TCK") - (own1 - own0))
      self.cores = self.seconds / self.wall

  def below(self, max_cores: float) -> bool:
    """Whether others used under ``max_cores``, give or take the counters' resolution
    (clock ticks, 10 ms: a short block cannot be judged more finely)."""
    return self.seconds is None or self.seconds <= max_cores * self.wall + 3 / os.sysconf(
        "SC_CLK_TCK")

  @staticmethod
  def _snapshot():
    try:
      with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
      return None
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    times = os.times()
    return busy, times.user + times.system, time.perf_counter()


def block(y):
  return jax.block_until_ready(y) if not isinstance(y, torch.Tensor) else y


class IdleGate:
  """Waits, before each timing block, until other processes were idle for ``window``
  seconds (we sleep meanwhile, so all busy time is theirs); gives up waiting once
  ``budget`` seconds were spent waiting in total, so a busy machine still finishes."""

  def __init__(self, window: float, max_cores: float, budget: float):
    self.window, self.max_cores, self.budget = window, max_cores, budget
    self.waited = 0.0

  def wait(self) -> None:
    while self.waited < self.budget:
      with ForeignLoad() as load:
        time.sleep(self.window)
      self.waited += load.wall or self.window
      if load.below(self.max_cores):
        return


def time_all(runs, repeats: int, rounds: int, warmup: int, idle: IdleGate | None = None):
  """Per key, ``repeats`` call times in seconds, taken in ``rounds`` interleaved blocks.

  With an ``idle`` gate, each block starts once the machine is idle and is redone
  (up to 3 times) when other processes took more than ``idle.max_cores`` meanwhile.
  Returns ``(samples, info)``, ``info[key]`` giving the CPU seconds other processes
  used during the kept blocks, their wall time, and how many blocks were redone.
  """
  samples = {key: [] for key in runs}
  info = {key: {"foreign_cpu_s": 0.0, "timed_wall_s": 0.0, "blocks_redone": 0}
          for key in runs}
  per_round = [repeats // rounds + (i < repeats % rounds) for i in range(rounds)]
  for count in per_round:
    for key, (call, args, _) in runs.items():
      for attempt in range(4):
        if idle:
          idle.wait()
        times = []
        with ForeignLoad() as load:
          for _ in range(warmup):
            block(call(*args))
          for _ in range(count):
            start = time.perf_counter()
            block(call(*args))
            times.append(time.perf_counter() - start)
        if not idle or load.below(idle.max_cores) or attempt == 3:
          break
        info[key]["blocks_redone"] += 1
      samples[key] += times
      if load.seconds is not None:
        info[key]["foreign_cpu_s"] += load.seconds
        info[key]["timed_wall_s"] += load.wall
  return samples, info


def raw_matmul(m: int, k: int, n: int, repeats: int, idle: IdleGate | None = None) -> dict:
  """The platform's raw int8 speed: bare ``[m, k] x [k, n]`` products, jitted."""
  rng = np.random.default_rng(0)
  a8 = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
  b8 = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
  a32, b32 = a8.astype(jnp.float32), b8.astype(jnp.float32)
  dims = (((1,), (0,)), ((), ()))
  s8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.int32))
  f32 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims))
  ta, tb = torch.from_numpy(np.array(a32)), torch.from_numpy(np.array(b32))
  runs = {"jax_s8_s8_s32": (s8, (a8, b8), None), "jax_f32": (f32, (a32, b32), None),
          "torch_f32": (torch.mm, (ta, tb), None)}
  samples, _ = time_all(runs, repeats, 1, 3, idle)
  times = {key: 1e3 * float(np.median(s)) for key, s in samples.items()}
  return {"m": m, "k": k, "n": n, "ms": times,
          "gops": {key: 2 * m * k * n / (ms * 1e6) for key, ms in times.items()}}


def goal_checks(rows: dict, best: str) -> list[dict]:
  """The five goals for the int8 config ``best``: ``(goal, value, op, limit, detail)``."""
  def ms(key):
    return rows[key]["latency_ms"]
  sqnr, t_sqnr = float(rows[best]["sqnr_db"]), float(rows["torch_quantized"]["sqnr_db"])
  checks = [
      (f"{best} latency / torch quantized", ms(best) / ms("torch_quantized"), "<=",
       MAX_INT8_OVER_TORCH_QUANTIZED, f"{ms(best):.3f} vs {ms('torch_quantized'):.3f} ms"),
      (f"{best} latency / our float", ms(best) / ms("ours_float"), "<=",
       MAX_INT8_OVER_OUR_FLOAT, f"{ms(best):.3f} vs {ms('ours_float'):.3f} ms"),
      ("our float latency / flax's module", ms("ours_float") / ms("flax_mhdpa"), "<=",
       MAX_OUR_FLOAT_OVER_FLAX, f"{ms('ours_float'):.3f} vs {ms('flax_mhdpa'):.3f} ms"),
      (f"{best} SQNR - torch quantized SQNR (dB)", sqnr - t_sqnr, ">=", MIN_SQNR_MARGIN_DB,
       f"{sqnr:.2f} vs {t_sqnr:.2f} dB"),
      (f"{best} variable bytes / our float", rows[best]["bytes_over_float"], "<=",
       MAX_BYTES_RATIO,
       f"{rows[best]['variable_bytes']} vs {rows['ours_float']['variable_bytes']} B"),
  ]
  return [{"goal": goal, "value": value, "op": op, "limit": limit, "detail": detail,
           "met": bool(value <= limit if op == "<=" else value >= limit)}
          for goal, value, op, limit, detail in checks]


def bench_shape(shape, args, idle: IdleGate | None) -> dict:
  runs, reference, t_reference, sizes = build(shape)
  samples, info = time_all(runs, args.repeats, args.rounds, args.warmup, idle)
  wall = sum(i["timed_wall_s"] for i in info.values())
  foreign = sum(i["foreign_cpu_s"] for i in info.values()) / wall if wall else None
  rows = {}
  for key, (call, call_args, to_seq_first) in runs.items():
    out = to_seq_first(call(*call_args))
    ref = t_reference if key == "torch_quantized" else reference
    rows[key] = {
        "label": LABELS[key], "latency_ms": 1e3 * float(np.median(samples[key])),
        "min_ms": 1e3 * float(np.min(samples[key])),
        # "inf": bitwise the same output (JSON has no infinity).
        "sqnr_db": None if key == "ours_float" else finite_or_str(sqnr_db(ref, out)),
        "sqnr_reference": "torch float" if key == "torch_quantized" else "our float",
        "variable_bytes": sizes.get(key), **info[key],
    }
  for key, row in rows.items():
    row["over_torch_quantized"] = row["latency_ms"] / rows["torch_quantized"]["latency_ms"]
    row["over_our_float"] = row["latency_ms"] / rows["ours_float"]["latency_ms"]
    row["bytes_over_float"] = (None if row["variable_bytes"] is None
                               else row["variable_bytes"] / sizes["ours_float"])
  best = min(INT8_CONFIGS, key=lambda k: rows[k]["latency_ms"])
  all_met = [key for key in INT8_CONFIGS if all(g["met"] for g in goal_checks(rows, key))]
  return {"shape": dict(zip("EHLN", shape)), "foreign_load_cores": foreign,
          "blocks_redone": sum(i["blocks_redone"] for i in info.values()), "rows": rows,
          "best_int8": best, "goals": goal_checks(rows, best),
          "configs_meeting_all_goals": all_met}


def finite_or_str(x: float):
  return x if np.isfinite(x) else str(x)


def print_shape(result: dict, repeats: int, is_goal_shape: bool) -> None:
  s = result["shape"]
  load = result["foreign_load_cores"]
  load = "unknown" if load is None else f"{load:.2f} cores"
  print(f"\n(E, H, L, N) = ({s['E']}, {s['H']}, {s['L']}, {s['N']}), S = L, median of"
        f" {repeats} calls; other processes used {load} while timing"
        f" ({result['blocks_redone']} blocks redone)")
  print(f"{'':30s} {'ms':>8s} {'/torch q':>9s} {'/ours f':>8s} {'SQNR dB':>8s} {'bytes':>9s}")
  for row in result["rows"].values():
    sqnr = "ref" if row["sqnr_db"] is None else f"{float(row['sqnr_db']):.2f}"
    size = "" if row["variable_bytes"] is None else f"{row['variable_bytes']:9d}"
    print(f"{row['label']:30s} {row['latency_ms']:8.3f} {row['over_torch_quantized']:8.2f}x"
          f" {row['over_our_float']:7.2f}x {sqnr:>8s} {size}")
  print("(SQNR vs our calibrated float output, torch quantized's vs torch float. Input"
        " quantization is inside every timed int8 call: torch quantized's QuantStubs and"
        " DeQuantStub, and ours, which take and return float)")
  title = "goals" if is_goal_shape else "goals (checked at (512, 8, 128, 8); here for reference)"
  print(f"{title}, best int8 config = fastest = {result['best_int8']}:")
  for g in result["goals"]:
    print(f"  {g['goal']:52s} {g['value']:7.3f} {g['op']} {g['limit']:<5} ({g['detail']}):"
          f" {'met' if g['met'] else 'NOT met'}")
  print(f"  int8 configs meeting all five: {result['configs_meeting_all_goals'] or 'none'}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--rounds", type=int, default=3,
                      help="interleaved timing blocks per implementation")
  parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each block")
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  parser.add_argument("--idle-window", type=float, default=0.5,
                      help="before each block, wait until other processes were idle for this"
                           " many seconds (0: do not wait)")
  parser.add_argument("--max-foreign-load", type=float, default=0.1,
                      help="cores other processes may use while a block runs (else redo it)")
  parser.add_argument("--idle-budget", type=float, default=900.0,
                      help="total seconds to wait for an idle machine, then time regardless")
  parser.add_argument("--shapes", nargs="+", metavar="E,H,L,N",
                      help="shapes to run (default: 256,4,64,16 512,8,128,8 1024,16,256,2)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes and few repeats (smoke test)")
  parser.add_argument("--no-raw", action="store_true", help="skip the raw matmul timing")
  parser.add_argument("--json", default="bench_results/bench.json")
  args = parser.parse_args()
  if args.quick:
    args.repeats, args.rounds, args.warmup, args.idle_window = min(args.repeats, 3), 1, 1, 0
  if args.shapes:
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
  else:
    shapes = list(QUICK_SHAPES if args.quick else SHAPES)
  torch.set_num_threads(args.threads)

  load_start = os.getloadavg()
  print(f"backend {jax.default_backend()}, {os.cpu_count()} cores, torch threads"
        f" {torch.get_num_threads()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r},"
        f" load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
  print("calibration: torch's and our static modules observe the timed input once")
  idle = (IdleGate(args.idle_window, args.max_foreign_load, args.idle_budget)
          if args.idle_window else None)
  results, raw = [], []
  for shape in shapes:
    results.append(bench_shape(shape, args, idle))
    print_shape(results[-1], args.repeats, shape == GOAL_SHAPE)
  if not args.no_raw:
    print("\nraw matmul [N*L, E] x [E, E] (jitted dot_general; torch.mm), median ms (GOP/s):")
    for e, _, l, n in shapes:
      r = raw_matmul(n * l, e, e, args.repeats, idle)
      raw.append(r)
      cells = "  ".join(f"{k} {r['ms'][k]:.3f} ({r['gops'][k]:.0f})" for k in r["ms"])
      print(f"  {n * l}x{e}x{e}: {cells}")
  load_end = os.getloadavg()
  print(f"load average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}"
        " (includes this process's own 2 threads)")

  result = {
      "repeats": args.repeats, "rounds": args.rounds, "warmup": args.warmup,
      "quick": args.quick, "backend": jax.default_backend(), "machine": platform.machine(),
      "processor": platform.processor(), "cpu_count": os.cpu_count(),
      "torch_threads": torch.get_num_threads(), "torch_quantized_engine": "x86",
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
      "torch": torch.__version__, "loadavg_start": load_start, "loadavg_end": load_end,
      "idle_window_s": args.idle_window, "max_foreign_load_cores": args.max_foreign_load,
      "idle_waited_s": idle.waited if idle else 0.0,
      "calibration": "one pass over the benchmarked input (torch and ours)",
      "torch_quantized_includes_input_quantization": True,
      "goal_shape": dict(zip("EHLN", GOAL_SHAPE)), "shapes": results, "raw_matmul": raw,
  }
  path = pathlib.Path(args.json)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2, allow_nan=False))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
