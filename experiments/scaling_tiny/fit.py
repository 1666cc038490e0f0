"""Fits the compute-optimal frontier of a finished scaling_tiny sweep and plots it.

  python experiments/scaling_tiny/fit.py --workdir=/tmp/scaling_tiny

Compute is C = 6*N*D (N: parameters without position embeddings, D: tokens seen). Every eval
point of every run is a (C, loss) sample. Following Hoffmann et al. (2022), approach 1:
  - the envelope: at each C (log grid), the lowest loss any run reached at that C, with each
    run's eval curve interpolated in log C; the run that gives it names N_opt(C), and
    D_opt = C / (6 N_opt);
  - power laws N_opt = k_N C^a and D_opt = k_D C^b by least squares in log-log space;
  - L(C) = A C^-alpha + E on the envelope (E by a grid search, A and alpha by log-linear fit).
Writes scaling.png, scaling.json and scaling.md (the table for the README) into the workdir.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

from fmjax import config_lib, models, report, sweep


def load_runs(root: str) -> list[dict]:
  """Each run's size N, tokens per step and its (C, eval loss) points."""
  runs = []
  for r in sweep.read_runs_file(root):
    config = config_lib.load_config(r["spec"], r["overrides"])
    n = models.param_count(models.abstract_model(config.model), exclude_positions=True)
    steps, losses = report.series(report.read_metrics(os.path.join(root, r["name"])), "eval/loss")
    if not steps:
      continue
    tokens = np.asarray(steps, float) * config.train.batch_size * config.data.seq_len
    runs.append({"name": r["name"], "size": r["entry"].get("config", ""), "n": n,
                 "steps": config.train.steps, "c": 6.0 * n * tokens, "loss": np.asarray(losses)})
  return runs


def envelope(runs: list[dict], points: int = 40) -> dict[str, np.ndarray]:
  """Lowest interpolated loss over runs at each C of a log grid, and which N reached it."""
  lo = min(r["c"][0] for r in runs)
  hi = max(r["c"][-1] for r in runs)
  grid = np.geomspace(lo, hi, points)
  best_l = np.full(points, np.inf)
  best_n = np.zeros(points)
  for r in runs:
    logc = np.log(r["c"])
    inside = (grid >= r["c"][0]) & (grid <= r["c"][-1])
    loss = np.interp(np.log(grid[inside]), logc, r["loss"])
    better = loss < best_l[inside]
    idx = np.flatnonzero(inside)[better]
    best_l[idx], best_n[idx] = loss[better], r["n"]
  ok = np.isfinite(best_l)
  return {"c": grid[ok], "loss": best_l[ok], "n": best_n[ok], "d": grid[ok] / (6 * best_n[ok])}


def power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """(k, a) of y = k x^a by least squares on logs."""
  a, logk = np.polyfit(np.log(x), np.log(y), 1)
  return float(math.exp(logk)), float(a)


def fit_loss(c: np.ndarray, loss: np.ndarray) -> dict[str, float]:
  """L(C) = A C^-alpha + E: E on a grid below min(L), A and alpha by a log-linear fit of L - E."""
  best = None
  for e in np.linspace(0.0, loss.min() * 0.999, 400):
    k, a = power_law(c, loss - e)
    resid = float(np.sum((k * c**a + e - loss) ** 2))
    if best is None or resid < best[0]:
      best = (resid, k, -a, e)
  _, a_coef, alpha, e = best
  return {"A": a_coef, "alpha": alpha, "E": float(e), "rmse": math.sqrt(best[0] / len(c))}


def plot(runs, env, loss_fit, n_fit, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  sizes = sorted({r["n"] for r in runs})
  colors = dict(zip(sizes, plt.cm.viridis(np.linspace(0.1, 0.85, len(sizes)))))
  for r in runs:
    ax1.plot(r["c"], r["loss"], color=colors[r["n"]], alpha=0.8, lw=1,
             label=f"N={r['n'] / 1e3:.0f}k" if r["steps"] == max(q["steps"] for q in runs if q["n"] == r["n"]) else None)
  ax1.plot(env["c"], env["loss"], "k--", lw=1.5, label="envelope")
  cs = np.geomspace(env["c"][0], env["c"][-1], 100)
  ax1.plot(cs, loss_fit["A"] * cs ** -loss_fit["alpha"] + loss_fit["E"], "r-", lw=1,
           label=f"fit {loss_fit['A']:.3g}·C^-{loss_fit['alpha']:.3f} + {loss_fit['E']:.2f}")
  ax1.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="eval loss", title="loss vs compute")
  ax1.legend(fontsize=8)
  ax1.grid(alpha=0.3, which="both")
  ax2.plot(env["c"], env["n"], "o", ms=3, label="N_opt (envelope)")
  ax2.plot(cs, n_fit[0] * cs ** n_fit[1], "r-", label=f"N_opt ∝ C^{n_fit[1]:.2f}")
  ax2.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="parameters N", title="compute-optimal size")
  ax2.legend(fontsize=8)
  ax2.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="the sweep root of scaling_tiny")
  p.add_argument("--allow_unfinished", action="store_true", help="fit runs that have not finished too")
  args = p.parse_args(argv)
  unfinished = [r["name"] for r in sweep.read_runs_file(args.workdir)
                if not os.path.exists(os.path.join(args.workdir, r["name"], sweep.DONE_MARKER))]
  if unfinished and not args.allow_unfinished:
    raise SystemExit(f"{len(unfinished)} run(s) of {args.workdir} have not finished ({', '.join(unfinished[:4])}"
                     f"{' ...' if len(unfinished) > 4 else ''}): rerun the sweep command to finish them, or pass "
                     "--allow_unfinished to fit what they logged")
  runs = load_runs(args.workdir)
  if len(runs) < 2:
    raise SystemExit(f"need at least 2 finished runs with eval losses in {args.workdir}; run the sweep first")
  env = envelope(runs)
  loss_fit = fit_loss(env["c"], env["loss"])
  n_fit = power_law(env["c"], env["n"])
  d_fit = power_law(env["c"], env["d"])
  mid = len(env["c"]) // 2
  result = {
      "runs": [{"name": r["name"], "n": r["n"], "tokens": float(r["c"][-1] / (6 * r["n"])),
                "c": float(r["c"][-1]), "final_eval_loss": float(r["loss"][-1])} for r in runs],
      "n_opt_exponent": n_fit[1], "d_opt_exponent": d_fit[1], "loss_fit": loss_fit,
      "tokens_per_param_at_mid_c": float(env["d"][mid] / env["n"][mid]), "mid_c": float(env["c"][mid]),
  }
  plot(runs, env, loss_fit, n_fit, os.path.join(args.workdir, "scaling.png"))
  with open(os.path.join(args.workdir, "scaling.json"), "w") as f:
    json.dump(result, f, indent=2)
  lines = ["| run | N (no pos. emb.) | tokens D | C = 6ND | final eval loss |", "|---|---|---|---|---|"]
  lines += [f"| {r['name']} | {r['n']:,} | {r['tokens']:,.0f} | {r['c']:.3g} | {r['final_eval_loss']:.4f} |"
            for r in result["runs"]]
  lines += ["", f"N_opt ∝ C^{n_fit[1]:.2f}, D_opt ∝ C^{d_fit[1]:.2f}, "
            f"{result['tokens_per_param_at_mid_c']:.1f} tokens/param at C = {result['mid_c']:.2g}; "
            f"L(C) = {loss_fit['A']:.3g}·C^-{loss_fit['alpha']:.3f} + {loss_fit['E']:.3f}"]
  with open(os.path.join(args.workdir, "scaling.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return result


if __name__ == "__main__":
  main()
