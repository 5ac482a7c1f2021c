"""PNG plots of a benchmark result (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

COLORS = {"firebolt": "#d62728", "firebolt_nocache": "#ff9896", "prepend": "#1f77b4", "lfm2_vl": "#2ca02c",
          "lfm2": "#7f7f7f"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return str(path)


def _med(entry, key):
    v = entry.get(key)
    return v.get("median") if isinstance(v, dict) else v


def plot_results(result: dict, out_dir) -> list[str]:
    """Write the figures into out_dir; returns their paths."""
    plt = _plt()
    out_dir = Path(out_dir)
    paths = []
    variants = result["variants"]
    batches = sorted({int(b) for v in variants.values() for b in v["batches"]})
    b0 = str(batches[0])
    names = [n for n in variants if b0 in variants[n]["batches"]]
    title = f"{result['preset']} preset, {result['device']}, {result['dtype']}, batch {b0}"

    # 1. time to first token, split into stages
    fig, ax = plt.subplots(figsize=(7.5, 4))
    stages = [("preprocess_s", "pre-process", "#c7c7c7"), ("vision_s", "vision", "#9467bd"),
              ("fusion_s", "fusion", "#ff7f0e"), ("prefill_s", "prefill", "#17becf")]
    for i, n in enumerate(names):
        e = variants[n]["batches"][b0]
        bottom = 0.0
        split = all(_med(e, k) is not None for k, _, _ in stages)
        for k, label, c in stages:
            v = _med(e, k)
            if not split:
                continue
            ax.bar(i, v, bottom=bottom, color=c, label=label)
            bottom += v
        if not split:
            ax.bar(i, _med(e, "ttft_with_preprocess_s") or 0.0, color="#dddddd", hatch="//", label="total (not split)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("seconds (median)")
    ax.set_title("time to first token -- " + title, fontsize=9)
    paths.append(_save(fig, out_dir / "ttft_breakdown.png"))
    plt.close(fig)

    # 2. decode throughput vs the bandwidth bound, per batch size
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / max(len(batches), 1)
    all_names = list(variants)
    for j, b in enumerate(batches):
        for i, n in enumerate(all_names):
            e = variants[n]["batches"].get(str(b))
            if not e:
                continue
            v = _med(e, "decode_tok_s") or 0.0
            st = e.get("decode_tok_s") or {}
            lo, hi = st.get("min"), st.get("max")
            err = [[v - lo], [hi - v]] if lo is not None and hi is not None else None
            x = i + (j - (len(batches) - 1) / 2) * width
            ax.bar(x, v, width=width * 0.9, color=COLORS.get(n, "#555555"), alpha=1.0 if j == 0 else 0.6,
                   yerr=err, capsize=2)
            bound = e.get("bound_tok_s")
            if bound:
                ax.plot([x - width * 0.45, x + width * 0.45], [bound, bound], "k--", lw=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(all_names)), all_names, rotation=20)
    ax.set_ylabel("decode tokens/s (median; dashed: bandwidth bound)")
    ax.set_title(f"decoding throughput, batch sizes {batches} -- {result['preset']}, {result['device']}", fontsize=9)
    paths.append(_save(fig, out_dir / "decode_throughput.png"))
    plt.close(fig)

    # 3. end-to-end latency and peak memory
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, n in enumerate(names):
        e = variants[n]["batches"][b0]
        st = e.get("e2e_s") or {}
        v = st.get("median") or 0.0
        err = [[v - st["min"]], [st["max"] - v]] if st.get("min") is not None else None
        a1.bar(i, v, color=COLORS.get(n, "#555555"), yerr=err, capsize=3)
        a2.bar(i, _med(e, "peak_mem_mb") or 0.0, color=COLORS.get(n, "#555555"))
    for a in (a1, a2):
        a.set_xticks(range(len(names)), names, rotation=20)
    a1.set_ylabel("end-to-end seconds (median, min-max)")
    a1.set_title(f"{variants[names[0]]['batches'][b0].get('new_tokens')} new tokens (no-cache: fewer, see JSON)", fontsize=9)
    a2.set_ylabel("peak memory MB (%s)" % result.get("memory_method", ""))
    a2.set_title("peak memory during the runs (all models resident)", fontsize=9)
    paths.append(_save(fig, out_dir / "latency_memory.png"))
    plt.close(fig)

    # 4-5. scaling
    sc = result.get("scaling")
    if sc:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for n, rows in sc["prompt_length"]["designs"].items():
            x = [r["text_tokens"] for r in rows]
            a1.plot(x, [r["total_s"] for r in rows], "o-", color=COLORS.get(n), label=f"{n}: fusion + prefill")
            a1.plot(x, [r["fusion_s"] for r in rows], "s:", color=COLORS.get(n), label=f"{n}: fusion only")
        a1.set_xscale("log", base=2)
        a1.set_yscale("log")
        a1.set_xlabel("prompt text tokens T")
        a1.set_ylabel("seconds")
        a1.set_title("prefill vs prompt length", fontsize=9)
        a1.legend(fontsize=7)
        for n, rows in sc["grids"]["designs"].items():
            x = [r["grids"] for r in rows]
            a2.plot(x, [r["total_s"] for r in rows], "o-", color=COLORS.get(n), label=f"{n}: fusion + prefill")
            a2.plot(x, [r["fusion_s"] for r in rows], "s:", color=COLORS.get(n), label=f"{n}: fusion only")
        a2.set_yscale("log")
        a2.set_xlabel("grids G per image")
        a2.set_title(f"prefill vs grids (T = {sc['grids']['text_tokens']})", fontsize=9)
        a2.legend(fontsize=7)
        paths.append(_save(fig, out_dir / "prefill_scaling.png"))
        plt.close(fig)
    return paths
