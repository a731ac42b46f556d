"""The report of ``cprop bench``: figures per framework, the printed tables, the plot."""
from .measure import summarise
from .runners import PEERS, RUNNERS

# (header, width, alignment) of the printed tables; fixed widths so rows print as they come
TRAIN_COLUMNS = [("workload", 8, "l"), ("layers", 18, "l"), ("batch", 5, "r"), ("samples", 9, "r"),
                 ("framework", 13, "l"), ("samples/s", 11, "r"), ("spread", 6, "r"),
                 ("cprop/peer", 10, "r"), ("GFLOP/s", 7, "r"), ("% peak", 6, "r"), ("warm-up", 7, "r")]
INFER_COLUMNS = [("workload", 8, "l"), ("method", 17, "l"), ("samples/s", 11, "r"), ("spread", 6, "r"),
                 ("cprop/this", 10, "r"), ("GFLOP/s", 7, "r"), ("% peak", 6, "r")]


def format_row(columns, cells):
    """One table row: `cells` padded to the widths of `columns` ((header, width, "l" or "r"))."""
    return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                     for c, (_, w, a) in zip(cells, columns)).rstrip()


def format_header(columns):
    """The header line of a table and its rule of dashes."""
    return [format_row(columns, [h for h, _, _ in columns]),
            format_row(columns, ["-" * w for _, w, _ in columns])]


def _spread(figures):
    return f"{100 * figures['spread']:.0f}%" if len(figures["seconds"]) > 1 else "-"


def training_entry(workload, n_samples, results, peak):
    """The report of one workload's training: per framework its rounds, median, ratio and GFLOP/s."""
    entry = {"workload": workload.name, "layers": list(workload.sizes), "batch_size": workload.batch_size,
             "loss": workload.loss, "n_samples": n_samples, "flops_per_sample": workload.flops_per_sample,
             "frameworks": {}}
    cprop_seconds = results.get("cprop", {}).get("seconds")
    cprop_rate = summarise(cprop_seconds, n_samples)[0] if cprop_seconds else None
    for name, res in results.items():
        figures = {"seconds": res["seconds"], "warmup_seconds": res.get("warmup_seconds"),
                   "unavailable": res.get("unavailable"), "error": res["error"]}
        if res["seconds"]:
            rate, spread = summarise(res["seconds"], n_samples)
            gflops = rate * workload.flops_per_sample / 1e9
            figures.update(samples_per_second=[n_samples / s for s in res["seconds"]],
                           median_samples_per_second=rate, spread=spread, gflops=gflops,
                           percent_of_peak=100 * gflops / peak,
                           cprop_over_this=cprop_rate / rate if cprop_rate else None)
        entry["frameworks"][name] = figures
    return entry


def _training_lines(entry):
    lines = []
    for i, (name, fw) in enumerate(entry["frameworks"].items()):
        lead = [entry["workload"], "-".join(map(str, entry["layers"])), entry["batch_size"],
                f"{entry['n_samples']:,}"] if i == 0 else [""] * 4
        if not fw["seconds"]:
            lines.append(format_row(TRAIN_COLUMNS, lead + [name, "unavailable" if fw.get("unavailable")
                                                           else "failed"]))
            continue
        ratio, warmup = fw["cprop_over_this"], fw.get("warmup_seconds")
        lines.append(format_row(TRAIN_COLUMNS, lead + [
            name, f"{fw['median_samples_per_second']:,.0f}", _spread(fw),
            "" if name == "cprop" or ratio is None else f"{ratio:.2f}x",
            f"{fw['gflops']:.1f}", f"{fw['percent_of_peak']:.0f}%", "" if warmup is None else f"{warmup:.2f}s"]))
    return lines


def inference_entry(workload, n_samples, seconds, peak):
    """The report of one workload's inference: per method its rounds, median, GFLOP/s and % of `peak`."""
    entry = {"workload": workload.name, "n_samples": n_samples,
             "forward_flops_per_sample": workload.forward_flops_per_sample, "methods": {}}
    ref = summarise(seconds["cprop predict_raw"], n_samples)[0] if "cprop predict_raw" in seconds else None
    for label, secs in seconds.items():
        rate, spread = summarise(secs, n_samples)
        gflops = rate * workload.forward_flops_per_sample / 1e9
        entry["methods"][label] = {"seconds": secs, "median_samples_per_second": rate, "spread": spread,
                                   "gflops": gflops, "percent_of_peak": 100 * gflops / peak,
                                   "cprop_predict_raw_over_this": ref / rate if ref else None}
    return entry


def _inference_lines(entry):
    lines = []
    for i, (label, m) in enumerate(entry["methods"].items()):
        ratio = m["cprop_predict_raw_over_this"]
        lines.append(format_row(INFER_COLUMNS, [
            entry["workload"] if i == 0 else "", label, f"{m['median_samples_per_second']:,.0f}", _spread(m),
            "" if label == "cprop predict_raw" or ratio is None else f"{ratio:.2f}x", f"{m['gflops']:.1f}",
            f"{m['percent_of_peak']:.0f}%" if "percent_of_peak" in m else ""]))
    return lines


def format_report(report):
    """The printed form of a ``cprop bench`` report (as run() builds it, or as read back from --json)."""
    info, settings, gemm = report["machine"], report["settings"], report["gemm"]
    rounds, load = settings["rounds"], info["load_average_1min"]
    n_infer = report["inference"][0]["n_samples"] if report["inference"] else 0
    used = list(dict.fromkeys(["python", "numpy"] + [RUNNERS[p].package for p in settings["frameworks"]
                                                      if p in PEERS]))
    threads = f"{settings['threads']} thread{'s' * (settings['threads'] != 1)}"
    lines = [
        f"cprop {info['cprop']} ({info['cprop_simd']} build) bench: {info['cpu']}, {info['available_cores']} cores"
        + (f" (load average {load:.2f} at start)" if load is not None else "")
        + f"; {threads}, {settings['dtype']}, {rounds} round{'s' * (rounds != 1)}",
        f"GEMM peak {gemm['gflops']:.1f} GFLOP/s: median of {len(gemm['seconds'])} numpy {settings['dtype']} "
        f"{gemm['size']}x{gemm['size']} matmuls on {threads}, interleaved with the rounds",
        "versions: " + ", ".join(f"{k} {info[k]}" for k in used),
        "",
        f"Training: one epoch of SGD(lr={settings['lr']}, momentum={settings['momentum']}), median samples/s "
        "over rounds; spread = (max-min)/median;",
        "cprop/peer > 1 means cprop is faster; % peak = achieved GFLOP/s / GEMM peak;",
        "warm-up = the first, untimed epoch (compilation for torch-compile and jax)",
    ]
    lines += format_header(TRAIN_COLUMNS)
    lines += [line for entry in report["training"] for line in _training_lines(entry)]
    lines += ["", f"Inference: forward pass over {n_infer:,} samples, median samples/s; "
                  "cprop/this compares cprop predict_raw"]
    lines += format_header(INFER_COLUMNS)
    lines += [line for entry in report["inference"] for line in _inference_lines(entry)]
    unavailable = {}
    for entry in report["training"]:
        for name, fw in entry["frameworks"].items():
            if fw.get("unavailable"):
                unavailable.setdefault((name, fw["unavailable"]), []).append(entry["workload"])
            if fw["error"]:
                lines.append(f"error: {entry['workload']} / {name}: {fw['error']}")
    for (name, reason), workloads in unavailable.items():
        lines.append(f"unavailable: {name} ({', '.join(workloads)}): {reason}")
    return "\n".join(lines)


def _short(x):
    """1234 -> "1,234", 56789 -> "57k", 4355000 -> "4.4M"."""
    return f"{x / 1e6:.1f}M" if x >= 1e6 else f"{x / 1e3:.0f}k" if x >= 1e4 else f"{x:,.0f}"


def plot(report, path):
    """Bar chart of median training samples/s per workload and framework (log scale) to `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = report["settings"]["frameworks"]
    entries = report["training"]
    width = 0.8 / len(frameworks)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 1.6 * len(entries)), 4.5))
    for i, name in enumerate(frameworks):
        xs, heights = [], []
        for j, entry in enumerate(entries):
            fw = entry["frameworks"].get(name, {})
            if fw.get("median_samples_per_second"):
                xs.append(j + (i - (len(frameworks) - 1) / 2) * width)
                heights.append(fw["median_samples_per_second"])
        bars = ax.bar(xs, heights, width, label=name)
        for bar, h in zip(bars, heights):
            ax.annotate(_short(h), (bar.get_x() + bar.get_width() / 2, h),
                        ha="center", va="bottom", fontsize=7, rotation=90, xytext=(0, 2),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels([f"{e['workload']}\n{'-'.join(map(str, e['layers']))}\nbatch {e['batch_size']}"
                        for e in entries], fontsize=8)
    ax.set_ylabel("training samples/s (log scale)")
    settings, machine = report["settings"], report["machine"]
    ax.set_title(f"cprop bench: one training epoch, median of {settings['rounds']} "
                 f"round{'s' * (settings['rounds'] != 1)}\n{machine['cpu']}, {settings['threads']} "
                 f"threads, {settings['dtype']}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
