"""`hooked-vlm` (or `python -m hooked_vlm`): the demo, and each experiment on a model and a dataset.

examples:
    hooked-vlm demo --model toy-llava --out demo_output
    hooked-vlm evaluate --model toy-internvl --task list --n 100 --out results/evaluate
    hooked-vlm token-ablation --model toy-llava --n 100 --out results/ablation
    hooked-vlm attention-knockout --model toy-internvl --n 100 --out results/knockout
    hooked-vlm head-mediation --model toy-llava --n 20 --seed 1 --method attribution --out results/cma
    hooked-vlm cumulative-head-ablation --model toy-llava --n 50 --ranking results/cma --out results/cumulative
    hooked-vlm head-mediation --model llava-hf/llava-1.5-7b-hf --coco ann.json --images val2017/ \\
        --removed inpainted/ --dtype bfloat16 --device cuda --out results/cma-7b
    hooked-vlm token-ablation --model llava-hf/llava-1.5-7b-hf --coco ann.json --images val2017/ \\
        --mean imagenet_mean.pt --dtype bfloat16 --device cuda --out results/ablation-7b
    hooked-vlm parity --model llava-hf/llava-1.5-7b-hf --dtype float16 --device cuda
    hooked-vlm remove-objects --coco ann.json --images val2017/ --out removed/ --inpainter lama
    hooked-vlm control-set --model llava-hf/llava-1.5-7b-hf --model OpenGVLab/InternVL3_5-8B-HF --coco ann.json \\
        --images val2017/ --removed removed/ --out control.json
    hooked-vlm head-mediation --model llava-hf/llava-1.5-7b-hf --pairs control.json --out results/cma
    hooked-vlm mean-embedding --model llava-hf/llava-1.5-7b-hf --collection imagenet/val --out mean.pt
    hooked-vlm reproduce --model llava-hf/llava-1.5-7b-hf --model OpenGVLab/InternVL3_5-8B-HF --pairs control.json \\
        --coco ann.json --images val2017/ --removed removed/ --imagenet imagenet/val --out results/
    hooked-vlm edge-circuit --model toy-llava --n 8 --towers vision language --spans --out results/circuit

Data: the synthetic set (default; for a toy model, the distribution it was trained on, held out)
or COCO-style annotations (`--coco`, `--images`, optionally `--removed` for object-removed pairs),
or a control set's kept pairs (`--pairs control.json`, from `control-set`).
Each experiment writes `results.csv` (one row per query), `summary.csv` and `figure.png`.
`parity` exits with 1 when an activation or the greedy generation differs beyond tolerance.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from hooked_vlm import prompt_settings
from hooked_vlm.config import DTYPES
from hooked_vlm.data.commands import register as register_data_commands
from hooked_vlm.experiments import options
from hooked_vlm.experiments.options import SMALL_MODEL_LAYERS, sampling_options



def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help()
        return 2
    return args.run(args) or 0


def parser() -> argparse.ArgumentParser:
    summary, _, epilog = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog="hooked-vlm", description=summary, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="the whole library on a shipped toy model: report + figures")
    demo.add_argument("--model", default="toy-llava")
    demo.add_argument("--out", default="demo_output")
    demo.add_argument("--n", type=int, default=40, help="held-out images")
    demo.add_argument("--pairs", type=int, default=8, help="source/base pairs for head mediation")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    parity = sub.add_parser("parity", help="compare with the Hugging Face model, activation family by family (exit 1 if they differ)")
    parity.add_argument("--model", required=True)
    parity.add_argument("--dtype", choices=DTYPES, default="float32")
    parity.add_argument("--device", default="cpu")
    parity.add_argument("--tolerance", type=float, default=None, help="max difference relative to each activation's scale (default: per dtype)")
    parity.set_defaults(run=_parity)
    register_data_commands(sub)  # remove-objects, control-set, mean-embedding

    from hooked_vlm.viewer.command import add_view_command  # `hooked-vlm view`: attention over the image

    add_view_command(sub)
    from hooked_vlm.reproduce.command import register as register_reproduce  # `hooked-vlm reproduce`

    register_reproduce(sub)

    for name, (run, help_text, extra) in EXPERIMENTS.items():
        command = sub.add_parser(name, help=help_text, description=f"{help_text}. {DESCRIPTIONS.get(name, '')}".strip())
        _data_arguments(command)
        extra(command)
        command.set_defaults(run=run)
    return p


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a shipped toy model, a local directory or a hub id")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=50, help="synthetic images (ignored with --coco)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coco", help="COCO-style instance annotations (JSON)")
    p.add_argument("--images", help="the annotations' image folder")
    p.add_argument("--removed", help="folder of object-removed images ({ann_id}.png or {image_id}_{ann_id}.png, e.g. from remove-objects), for source/base pairs")
    p.add_argument("--pairs", help="a control-set manifest (hooked-vlm control-set): its kept annotations, in its order")
    sampling_options(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu", help="under a multi-process launch, 'cuda' is each process's own GPU")
    p.add_argument("--overwrite", action="store_true", help="clear the --out run and start again (default: resume it)")
    prompt_settings.add_arguments(p)  # --paper-settings, --image-mode, --max-tiles, --template


def _sampling(args) -> dict:
    return {"limit": args.limit, "sample": args.sample, "sample_seed": args.sample_seed}


def _answers(args) -> dict:
    return {"frame": args.frame, "max_new_tokens": args.max_new_tokens, "float_boxes": args.float_boxes}


# ---------------------------------------------------------------------------------- commands
def _demo(args) -> None:
    from hooked_vlm.demo import run_demo

    report = run_demo(args.model, args.out, n_items=args.n, n_pairs=args.pairs, seed=args.seed)
    print((Path(args.out) / "report.md").read_text())
    print(f"figures and tables written to {Path(args.out).resolve()} ({len(report['figures'])} figures)")


def _parity(args) -> int:
    from hooked_vlm.parity import check_parity

    report = check_parity(args.model, dtype=DTYPES[args.dtype], device=args.device, tolerance=args.tolerance)
    return 0 if report.ok else 1


def _experiment(fn: Callable[[Any, Any, argparse.Namespace, Any], pd.DataFrame], summarise: Callable, figure: str):
    """A command: run `fn` in the `--out` run directory (`hooked_vlm.runs`: resumed, shared by
    the processes of a launch), then, on the main process, write results.csv, `summarise` it to
    summary.csv and draw `plotting.<figure>`, each file atomically."""

    def run(args) -> None:
        from hooked_vlm import plotting, runs
        from hooked_vlm.model import HookedVLM

        out, run = Path(args.out), runs.Run.from_command_line(args, outputs=OUTPUTS, paths=PATH_OPTIONS)
        try:
            run.check_arguments()  # before loading a model
            model = HookedVLM.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=runs.process_device(args.device))
            model.use_settings(prompt_settings.from_arguments(model, args))
            results = fn(model, _dataset(args), args, run)
        except (runs.RunMismatch, runs.RunBusy) as error:
            raise SystemExit(f"hooked-vlm {args.command}: {error}") from None
        if not run.is_main:
            return
        runs.write_atomically(out / "results.csv", lambda path: results.to_csv(path, index=False))
        summary = summarise(results)
        runs.write_atomically(out / "summary.csv", summary.to_csv)
        print(summary.to_string())
        plotting.save_figure(getattr(plotting, figure)(results), out / "figure.png")
        print(f"written to {out.resolve()}")

    return run


OUTPUTS = ("results.csv", "summary.csv", "figure.png")  # what an experiment command writes in --out
PATH_OPTIONS = ("model", "coco", "images", "removed", "mean", "ranking")  # recorded as absolute paths


def _dataset(args) -> Any:
    if args.pairs:
        from hooked_vlm.data.control_set import control_set_dataset

        return control_set_dataset(args.pairs, coco=args.coco, images=args.images, removed=args.removed)
    if args.coco:
        from hooked_vlm.data.coco import load_coco, pair_with_removed

        if not args.images:
            raise SystemExit("--coco needs --images (the folder the annotations' file names refer to)")
        items = load_coco(args.coco, args.images)
        return pair_with_removed(items, args.removed) if args.removed else items
    from hooked_vlm.toy_models import toy_dataset

    return toy_dataset(args.model, args.n, seed=args.seed, split="test")


def _by_condition(results: pd.DataFrame) -> pd.DataFrame:
    """Per condition; seeded conditions (random, shuffle, extension, knockout control) as mean
    and sd over their seeds, as the paper reports them (§1.4.4, §1.5)."""
    from hooked_vlm.experiments import summarize

    return summarize(results, over_seeds="seed" in results and results["seed"].notna().any())


def _run_evaluate(model, data, args, run):
    from hooked_vlm.experiments import evaluate

    return evaluate(model, data, args.task, batch_size=args.batch_size, **_sampling(args), **_answers(args), match=args.match,
                    run=run)  # fmt: skip


def _run_token_ablation(model, data, args, run):
    from hooked_vlm.experiments import token_ablation

    return token_ablation(model, data, task=args.task, strategies=args.strategies, paddings=args.paddings,
                          fractions=args.fractions, seeds=args.seeds, fill=args.fill, mean=_ablation_mean(model, args),
                          views=args.views, ig_steps=args.ig_steps, ig_baseline=args.ig_baseline, ig_rank=args.ig_rank,
                          ig_reduce=args.ig_reduce, ig_target=args.ig_target, register_sd=args.register_sd,
                          batch_size=args.batch_size, **_sampling(args), **_answers(args), match=args.match, run=run)  # fmt: skip


def _ablation_mean(model, args):
    """The mean visual embedding: `--mean`; else, for synthetic data, the mean over images of the
    toy distribution's held-out "mean" split, as the demo does (saved to mean_embedding.pt, and
    read back when the run is resumed); else None, and `token_ablation` averages the dataset's
    own images, with a warning."""
    from hooked_vlm import interventions as iv
    from hooked_vlm.runs import MANIFEST, is_main_process, write_atomically
    from hooked_vlm.toy_models import MEAN_IMAGES, toy_mean_embedding

    if args.mean or args.coco or args.pairs or not (args.fill == "mean" or "ig" in args.strategies):
        return args.mean
    out = Path(args.out)
    if (out / "mean_embedding.pt").exists() and (out / MANIFEST).exists() and not args.overwrite:
        return iv.load_mean(out / "mean_embedding.pt", model)  # a resumed run ablates with the same vector
    mean = toy_mean_embedding(model, args.model, seed=args.seed)
    if is_main_process():
        write_atomically(out / "mean_embedding.pt", lambda path: iv.save_mean(mean, path))
        print(f"mean visual embedding: {mean.count} image tokens of {MEAN_IMAGES} images of the 'mean' split")
    return mean


def _run_token_shuffle(model, data, args, run):
    from hooked_vlm.experiments import token_shuffle

    return token_shuffle(model, data, task=args.task, modes=args.modes, seeds=args.seeds, scope=args.scope,
                         batch_size=args.batch_size, **_sampling(args), **_answers(args), match=args.match, run=run)  # fmt: skip


def _run_object_extension(model, data, args, run):
    from hooked_vlm.experiments import object_extension

    return object_extension(model, data, paddings=args.paddings, gt_scales=args.gt_scales, seeds=args.seeds,
                            views=args.views, scale_view=args.scale_view, batch_size=args.batch_size, **_sampling(args),
                            **_answers(args), run=run)  # fmt: skip


def _run_knockout(model, data, args, run):
    from hooked_vlm.experiments import attention_knockout
    from hooked_vlm.experiments.attention_knockout import layer_windows

    n_layers = model.cfg.text.n_layers
    if args.group_size is None:
        sizes = [4, "all"] if n_layers >= SMALL_MODEL_LAYERS else [1, "all"]
        if n_layers < SMALL_MODEL_LAYERS:
            print(f"note: the model has {n_layers} layers; knocking out windows of 1 layer and all (not 4), for a curve")
    else:
        sizes = [s if s == "all" else int(s) for s in args.group_size]
        if len(layer_windows(n_layers, sizes)) == 1:
            print(f"note: the model has {n_layers} layers; --group-size {' '.join(args.group_size)} gives one window (all)")
    return attention_knockout(model, data, task=args.task, group_size=sizes, paddings=args.paddings, seeds=args.seeds,
                              controls=args.controls, exclude_object=args.exclude_object, batch_size=args.batch_size,
                              **_sampling(args), **_answers(args), match=args.match, run=run)  # fmt: skip


def _run_mediation(model, data, args, run):
    from hooked_vlm.experiments import head_mediation

    return head_mediation(model, data, task=args.task, **_mediation_kwargs(args), batch_size=args.batch_size,
                          **_sampling(args), run=run)  # fmt: skip


def _mediation_kwargs(args) -> dict:
    return {"method": args.method, "target": args.target, "positions": args.positions, "token_filter": args.token_filter,
            "min_effect": args.min_effect, "frame": args.frame, "float_boxes": args.float_boxes,
            "max_new_tokens": args.mediation_max_new_tokens}  # fmt: skip


def _run_cumulative(model, data, args, run):
    from hooked_vlm.experiments import cumulative_head_ablation

    name, scores = _head_ranking(model, data, args, run)
    return cumulative_head_ablation(model, data, {name: scores}, task=args.task, fractions=args.fractions,
                                    low_importance_from=name, controls=args.controls, control_seed=args.sample_seed,
                                    value=args.value, batch_size=args.batch_size, **_sampling(args), **_answers(args),
                                    match=args.match, run=run)  # fmt: skip


def _head_ranking(model, data, args, run) -> tuple[str, torch.Tensor]:
    """(name, mean MF per head): read from `--ranking` (a `head-mediation` output folder, its
    results.csv or its summary.csv), or computed by head mediation on the same samples (a run of
    its own in mediation/, resumed like the rest; its table written to mediation.csv). Heads
    without an MF (NaN, an empty cell of summary.csv: not measured, e.g. the last layer's at the
    prompt positions) stay NaN, and the ranking leaves them out; a note says how many."""
    from hooked_vlm.experiments import head_mediation, mediation_map
    from hooked_vlm.runs import write_atomically

    if args.ranking:
        path = Path(args.ranking)
        table = pd.read_csv(path / "results.csv" if path.is_dir() else path)
        if "mf" in table:
            name, scores = str(table["task"].iloc[0]), mediation_map(table)
        else:
            name, scores = "mediation", torch.tensor(table.set_index("layer").to_numpy(dtype=float), dtype=torch.float32)
    else:
        name = "localization" if args.task == "localization" else "binary"
        table = head_mediation(model, data, task=name, **_mediation_kwargs(args), batch_size=args.batch_size,
                               **_sampling(args), run=run.child("mediation"))  # fmt: skip
        if run.is_main:
            write_atomically(Path(args.out) / "mediation.csv", lambda path: table.to_csv(path, index=False))
        scores = mediation_map(table)
    unmeasured = int(scores.isnan().sum())
    if unmeasured:
        print(f"note: {unmeasured} of {scores.numel()} heads have no MF (not measured); neither the ranking nor the "
              "low-importance control removes them")  # fmt: skip
    return name, scores


def _run_probe(model, data, args, run):
    from hooked_vlm.experiments import position_probe
    from hooked_vlm.runs import write_atomically
    from hooked_vlm.toy_models import toy_dataset

    if args.collection:
        from hooked_vlm.data.commands import probe_collections

        train, test = probe_collections(args)
    elif args.coco or args.pairs:
        train, test = _probe_split(list(itertools.islice(data, args.limit)), args.seed)
    else:
        train = list(itertools.islice(data, args.limit))
        test = toy_dataset(args.model, max(len(train) // 4, 4), seed=args.seed + 1, split="probe-test")
    results = position_probe(model, train, test, epochs=args.epochs, tokens_per_image=args.tokens_per_image, lr=args.lr,
                             batch_size=args.batch_size, seed=args.seed, run=run)  # fmt: skip
    if run.is_main:
        provenance = json.dumps(results.attrs["provenance"], indent=1)
        write_atomically(Path(args.out) / "provenance.json", lambda path: path.write_text(provenance))
    return results


def _probe_split(items: list, seed: int) -> tuple[list, list]:
    """COCO items split by image, shuffled with `seed`, a fifth of the images held out: the
    probe reads images only, so a test image must not be a training image under another object."""
    by_image: dict[int, Any] = {}
    for item in items:
        by_image.setdefault(getattr(item, "item", item).image_id, item)  # ObjectRemovedPair wraps its item
    images = list(by_image.values())
    if len(images) < 2:
        raise SystemExit(f"position-probe needs at least 2 distinct images to hold one out, got {len(images)}")
    random.Random(seed).shuffle(images)
    n_test = max(len(images) // 5, 1)
    return images[n_test:], images[:n_test]


def _run_edge_circuit(args) -> None:
    """Edge scores (results.csv), faithfulness curves (summary.csv), the chosen circuit
    (circuit.pt) and its figures (figure.png: the circuit; heads.png; faithfulness.png; spans.png).
    A run in --out (`hooked_vlm.runs`): the edge scores per pair, then the faithfulness per pair in
    its `faithfulness/` child run, each resumed and shared by the processes of a launch."""
    from hooked_vlm import plotting, runs
    from hooked_vlm.circuits import find_circuit, save_graph
    from hooked_vlm.experiments import circuit_faithfulness, edge_circuit
    from hooked_vlm.experiments.edge_circuit import graph_from_table
    from hooked_vlm.model import HookedVLM

    out, run = Path(args.out), runs.Run.from_command_line(args, outputs=CIRCUIT_OUTPUTS, paths=PATH_OPTIONS)
    try:
        run.check_arguments()  # before loading a model
        model = HookedVLM.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=runs.process_device(args.device))
        model.use_settings(prompt_settings.from_arguments(model, args))
        data = _dataset(args)
        edges = edge_circuit(model, data, task=args.task, method=args.method, steps=args.steps, towers=args.towers, kv=args.kv,
                             spans=args.spans, target=args.target, aggregation=args.aggregation, run=run, **_sampling(args))  # fmt: skip
        graph = graph_from_table(model, edges)
        curves = circuit_faithfulness(model, data, graph, fractions=args.fractions, task=args.task, target=args.target,
                                      run=run.child("faithfulness"), **_sampling(args))  # fmt: skip
    except (runs.RunMismatch, runs.RunBusy) as error:
        raise SystemExit(f"hooked-vlm {args.command}: {error}") from None
    if not run.is_main:
        return
    runs.write_atomically(out / "results.csv", lambda path: edges.to_csv(path, index=False))
    runs.write_atomically(out / "summary.csv", lambda path: curves.to_csv(path, index=False))
    print(curves.to_string(index=False))
    circuit = find_circuit(graph, fraction=args.fraction)
    save_graph(circuit, out / "circuit.pt")
    figures = {"figure.png": plotting.circuit_graph(circuit), "heads.png": plotting.node_score_maps(graph),
               "faithfulness.png": plotting.faithfulness_figure(curves)}  # fmt: skip
    if graph.spans is not None:
        figures["spans.png"] = plotting.span_flow(graph)
    for name, fig in figures.items():
        plotting.save_figure(fig, out / name)
    print(f"{circuit.n_edges_in_circuit} of {graph.n_edges} edges kept at fraction {args.fraction}; written to {out.resolve()}")


CIRCUIT_OUTPUTS = ("results.csv", "summary.csv", "circuit.pt", "figure.png", "heads.png", "faithfulness.png", "spans.png")


def _extras_edge_circuit(p):
    p.add_argument("--task", choices=("localization", "binary"), default="localization")
    p.add_argument("--method", choices=["EAP-IG", "EAP", "clean-corrupted", "exact"], default="EAP-IG")
    p.add_argument("--steps", type=int, default=None, help="EAP-IG interpolation steps (default 5)")
    p.add_argument("--towers", nargs="+", choices=["vision", "language"], default=["language"])
    p.add_argument("--kv", choices=["ungrouped", "grouped"], default="ungrouped", help="grouped-query key/value destinations")
    p.add_argument("--spans", action="store_true", help="score edges per span (object, image, question, answer, prefix)")
    p.add_argument("--target", choices=["src_greedy", "gt"], default="src_greedy")
    p.add_argument("--aggregation", choices=["mean", "mean_abs"], default="mean", help="mean_abs: each pair's |score| averaged")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
                   help="circuit sizes of the faithfulness curves (MIB's by default)")  # fmt: skip
    p.add_argument("--fraction", type=float, default=0.05, help="the size of the circuit drawn and saved")


# ---------------------------------------------------------------------------------- summaries
def _mediation_summary(results: pd.DataFrame) -> pd.DataFrame:
    from hooked_vlm.experiments import mediation_map

    return pd.DataFrame(mediation_map(results).numpy()).rename_axis("layer")


def _cumulative_summary(results: pd.DataFrame) -> pd.DataFrame:
    from hooked_vlm.experiments import normalised_auc, summarize

    summary = summarize(results, by=["ranking", "fraction", "n_heads_removed"])
    fractions = set(results["fraction"])
    if 0 in fractions and len(fractions) > 1:  # the AUC is relative to the unablated score
        summary["normalised_auc"] = summary.index.get_level_values("ranking").map(normalised_auc(results))
    return summary


def _probe_summary(results: pd.DataFrame) -> pd.DataFrame:
    return results.groupby(["section", "layer"], sort=False)["accuracy"].mean().to_frame()


EXPERIMENTS: dict[str, tuple[Callable, str, Callable]] = {
    "evaluate": (_experiment(_run_evaluate, _by_condition, "evaluate_figure"), "localization / list / yes-no classification accuracy", options.evaluate_options),
    "token-ablation": (_experiment(_run_token_ablation, _by_condition, "token_ablation_figure"), "ablate object, random, register or IG tokens", options.token_ablation_options),
    "token-shuffle": (_experiment(_run_token_shuffle, _by_condition, "token_shuffle_figure"), "shuffle image tokens (all, or the object's)", options.token_shuffle_options),
    "object-extension": (_experiment(_run_object_extension, _by_condition, "object_extension_figure"), "extend objects with copies of their tokens", options.object_extension_options),
    "attention-knockout": (_experiment(_run_knockout, _by_condition, "attention_knockout_figure"), "block attention to the object by layer group", options.knockout_options),
    "head-mediation": (_experiment(_run_mediation, _mediation_summary, "head_mediation_figure"), "mediation fraction of every head", options.mediation_options),
    "cumulative-head-ablation": (_experiment(_run_cumulative, _cumulative_summary, "cumulative_head_ablation_figure"), "accuracy as the top-ranked heads are removed", options.cumulative_options),
    "position-probe": (_experiment(_run_probe, _probe_summary, "position_probe_figure"), "linear row/column probes per layer", options.probe_options),
    "edge-circuit": (_run_edge_circuit, "edge-level circuit (EAP-IG) and its faithfulness curve", _extras_edge_circuit),
}  # fmt: skip
DESCRIPTIONS = {
    "cumulative-head-ablation": "Heads are ranked by mean mediation fraction (localization MF for --task localization, "
    "yes/no MF for list and binary): read from --ranking, or computed by head mediation (--method, --target) on the "
    "same samples and written to mediation.csv; a ranking measured on the evaluated samples themselves is optimistic. "
    "The low-importance control removes the heads of smallest |MF|. Heads without an MF (not measured: with the "
    "paper's prompt positions, the last layer's for localization) are never removed. summary.csv adds each "
    "ranking's normalised AUC.",
    "position-probe": "Images: with --collection (e.g. ImageNet), --n-train of them to train on and --n-test others "
    "(or of --test-collection) to score on, as the paper (50,000 / 10,000). Else --limit caps the samples read; "
    "synthetic data: the probes train on them and are scored on a quarter as many images of another split; COCO: a "
    "seeded fifth of their images is held out for scoring. The probes train as the images stream past (nothing is "
    "stored), so each epoch reads the training images again. provenance.json records the model and the images.",
    "attention-knockout": "Windows: contiguous groups of --group-size layers, and 'all'.",
    "edge-circuit": "Object-removed pairs (the twin composited onto the original), the answer's NLL as metric; writes "
    "results.csv (every edge's score), summary.csv (faithfulness curves with MIB's CPR and CMD), circuit.pt and figures.",
}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
