"""Cost of edge-level circuit discovery (hooked_vlm.circuits), against a plain forward, side by side.

    python benchmarks/circuits.py            # the mid-size models of run.py (a few minutes on 2 CPU cores)
    python benchmarks/circuits.py --quick    # small models, a smoke run (to results_circuits_quick.json)

For each family, on one object-removed-style pair (the photo, and the photo with a rectangle
painted over the cat; the answer teacher-forced and scored by its NLL), over the language
model's graph (MIB's setting): EAP-IG with 5 steps, EAP, evaluating one circuit (the top 5% of
edges, every other edge corrupted: the clean and corrupted reference runs and the edge-masked
forward) and a faithfulness curve at MIB's 10 sizes (per size: the reference runs are shared),
each as a ratio to one plain forward of the pair measured in the same run (`run.interleaved`:
rounds in shuffled order, medians). Targets (issue 17):
EAP-IG ≤ 25 forward-equivalents per pair, evaluating a circuit ≤ 4. Memory: the peak growth of
resident memory during each, in a fresh process (`memory.py`'s sampler), and what EAP-IG holds
by construction (the fp32 activation differences of every source, the score matrix).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from memory import _measure  # noqa: E402
from run import ANSWER, ASSETS, PROMPT, build, interleaved  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.circuits import (  # noqa: E402
    MIB_FRACTIONS, CircuitPair, Graph, edge_attribution, evaluate_circuit, faithfulness_curve, find_circuit, load_graph,
    save_graph,
)
from hooked_vlm.patching import answer_nll_metric  # noqa: E402

MODES = ("forward", "eap_ig", "evaluate")
TARGETS = {"eap_ig_forwards": 25.0, "evaluate_forwards": 4.0}


def make_pair(model, family: str) -> CircuitPair:
    image = Image.open(ASSETS / "chelsea.jpg").convert("RGB")
    removed = image.copy()
    w, h = image.size
    ImageDraw.Draw(removed).rectangle([0.15 * w, 0.2 * h, 0.6 * w, 0.85 * h], fill=(120, 110, 100))  # the cat, "removed"
    clean = model.prepare(image, PROMPT, answers=ANSWER[family])
    return CircuitPair(clean, model.prepare(removed, PROMPT, answers=ANSWER[family]), answer_nll_metric(clean))


def bench(family: str, path: Path, reps: int) -> dict:
    model = HookedVLM.from_pretrained(path)
    pair = make_pair(model, family)
    scores = edge_attribution(model, pair, method="EAP-IG", steps=5, progress=False)
    circuit = find_circuit(scores, fraction=0.05)
    save_graph(circuit, circuit_file(path))  # the circuit whose evaluation's memory is measured
    with torch.no_grad():
        forward = lambda: model(pair.clean)  # noqa: E731
        times = interleaved({
            "forward": forward,
            "eap_ig": lambda: edge_attribution(model, pair, method="EAP-IG", steps=5, progress=False),
            "eap": lambda: edge_attribution(model, pair, method="EAP", progress=False),
            "evaluate": lambda: evaluate_circuit(model, circuit, pair, n_bootstrap=0),
            "curve": lambda: faithfulness_curve(model, scores, pair, fractions=MIB_FRACTIONS),
        }, reps)  # fmt: skip
    graph = Graph.from_model(model)
    positions, d_model = pair.clean.input_ids.shape[1], model.cfg.d_model
    return {
        "sequence_length": positions,
        "edges": graph.n_edges,
        "forward_s": times["forward"],
        "eap_ig_forwards": times["eap_ig"] / times["forward"],
        "eap_forwards": times["eap"] / times["forward"],
        "evaluate_forwards": times["evaluate"] / times["forward"],
        # a curve shares the clean and corrupted runs: per size, one edge-masked forward
        "curve_forwards_per_size": times["curve"] / times["forward"] / len(MIB_FRACTIONS),
        "circuit_edges": circuit.n_edges_in_circuit,
        "circuit_faithfulness": evaluate_circuit(model, circuit, pair, n_bootstrap=0).faithfulness,
        # held by construction: Δ of every source (fp32, [pos, n_src, d_model]) and the score matrix
        "delta_store_mb": graph.n_src * positions * d_model * 4 / 2**20,
        "score_matrix_mb": graph.n_src * graph.n_dst * 4 / 2**20,
    } | peak_memory(family, path)


def peak_memory(family: str, path: Path) -> dict:
    """Peak resident-memory growth of each mode, each in a fresh process."""
    out = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--child", family, str(path), mode]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        out[f"peak_mb_{mode}"] = json.loads(result.stdout.strip().splitlines()[-1])[mode]
    return out


def _child(family: str, path: str, mode: str) -> None:
    import gc

    model = HookedVLM.from_pretrained(path)
    pair = make_pair(model, family)
    if mode == "evaluate":  # the timed circuit (top 5% of EAP-IG's edges), computed by the parent
        circuit = load_graph(circuit_file(Path(path)))
        run = lambda: evaluate_circuit(model, circuit, pair, n_bootstrap=0)  # noqa: E731
    elif mode == "eap_ig":
        run = lambda: edge_attribution(model, pair, method="EAP-IG", steps=5, progress=False)  # noqa: E731
    else:
        run = lambda: model(pair.clean)  # noqa: E731
    gc.collect()
    with torch.no_grad() if mode == "forward" else torch.enable_grad():
        print(json.dumps({mode: _measure(run)}))


def circuit_file(path: Path) -> Path:
    """Where `bench` leaves the circuit it times, for the memory child to evaluate the same one."""
    return path.with_name(path.name + "-circuit.pt")


def table(results: dict) -> str:
    families = list(results)
    rows = [
        ("sequence length (tokens)", "", "sequence_length"),
        ("language-model edges", "", "edges"),
        ("EAP-IG, 5 steps / forward", f"≤ {TARGETS['eap_ig_forwards']:g}", "eap_ig_forwards"),
        ("EAP / forward", "", "eap_forwards"),
        ("evaluate one circuit (5% of edges) / forward", f"≤ {TARGETS['evaluate_forwards']:g}", "evaluate_forwards"),
        ("faithfulness curve (MIB's 10 sizes) / forward, per size", "", "curve_forwards_per_size"),
        ("faithfulness of that circuit", "", "circuit_faithfulness"),
        ("peak MB: forward", "", "peak_mb_forward"),
        ("peak MB: EAP-IG", "", "peak_mb_eap_ig"),
        ("peak MB: evaluate one circuit", "", "peak_mb_evaluate"),
        ("MB held: activation differences (fp32)", "", "delta_store_mb"),
        ("MB held: score matrix (fp32)", "", "score_matrix_mb"),
    ]
    lines = ["| measure | target | " + " | ".join(families) + " |", "|---" * (2 + len(families)) + "|"]
    for label, target, key in rows:
        cells = []
        for family in families:
            value = results[family][key]
            ok = "" if key not in TARGETS else (" ✓" if value <= TARGETS[key] else " ✗")
            cells.append((f"{value:.3f}" if isinstance(value, float) else str(value)) + ok)
        lines.append(f"| {label} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small models: a smoke run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--families", nargs="+", choices=["llava", "internvl"], default=["llava", "internvl"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a loaded machine)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        _child(*args.child)
        return
    size = "quick" if args.quick else "mid"
    out = args.out or Path(__file__).parent / ("results_circuits_quick.json" if args.quick else "results_circuits.json")
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for family in args.families:
            path = build(family, size, Path(root))
            results[family] = bench(family, path, args.reps)
            print(family, json.dumps(results[family], indent=1), flush=True)
    meta = {"size": size, "torch": torch.__version__, "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
