"""``es-lightning-export``: one method's steering vectors in the formats other tools load.

    es-lightning-export gguf    checkpoints/default --method expertsteer -o expertsteer.gguf
    es-lightning-export lm-eval checkpoints/default --method expertsteer -o expertsteer.pt
    es-lightning-export hf      checkpoints/default --method expertsteer -o smollm2-expertsteer/

The coefficient defaults to the one the run's evaluation chose for the method (median over folds of
``<run>/report/report.json``); ``--coefficient`` overrides it. SIGTERM or SIGINT stops an export within seconds
(exit status 143 or 130) and leaves no partial output (:mod:`es_lightning.stopping`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from es_lightning.stopping import run_stoppable, stage

FORMATS = ("gguf", "lm-eval", "hf")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="es-lightning-export",
        description="Export a run's steering vectors for llama.cpp (gguf), lm-evaluation-harness (lm-eval) or as a "
        "transformers checkpoint with the steering folded into its weights (hf).",
    )
    parser.add_argument(
        "format",
        choices=FORMATS,
        help="gguf: llama.cpp control vector; lm-eval: steer file (.pt) "
        "for lm-eval's `steered` model; hf: folded checkpoint folder",
    )
    parser.add_argument("source", help="a run folder (with bundles/), a bundles/ folder or a bundle .safetensors file")
    parser.add_argument("-o", "--output", required=True, help="file (gguf, lm-eval) or folder (hf) to write")
    parser.add_argument(
        "--method", help="steering method (expertsteer, rfm_self, mean_difference, random); needed with a run folder"
    )
    parser.add_argument(
        "--coefficient",
        type=float,
        help="relative to each layer's mean hidden-state norm; default: the coefficient the run's evaluation chose",
    )
    parser.add_argument(
        "--report", help="report folder or report.json to take the coefficient from (default: <run>/report)"
    )
    parser.add_argument(
        "--model",
        help="lm-eval, hf: the target model (default: the bundle's own target); "
        "refused if it is not the model the bundle was made for",
    )
    parser.add_argument("--cache-dir", help="es-lightning cache folder for built-in models")
    parser.add_argument(
        "--block-path", help="dotted path of the decoder block list, for architectures es-lightning does not know"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="hf: dtype of the saved weights (default: the target's)",
    )
    parser.add_argument("--model-hint", help="gguf: controlvector.model_hint (default: the target's model_type)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def run(args: argparse.Namespace) -> str:
    """Export as ``args`` says; return the summary printed by :func:`main`."""
    from es_lightning.export.source import check_output, load_source, resolve_target

    check_output(args.output, args.overwrite, directory=args.format == "hf")
    source = load_source(args.source, args.method, args.coefficient, args.report)
    head = (
        f"{source.method} x {source.coefficient:g} "
        f"({'given' if source.coefficient_origin == 'given' else 'from ' + source.coefficient_origin}), "
        f"blocks {source.bundle.layers}, target {source.bundle.target.name}"
    )
    if args.format == "gguf":
        from es_lightning.export.gguf import export_gguf

        out = export_gguf(source, args.output, args.overwrite, args.model_hint)
        return (
            f"wrote {out}: llama.cpp control vector, {head}\n"
            f"  llama-completion -m MODEL.gguf -no-cnv -p PROMPT --control-vector-scaled {out}:1.0"
        )
    target = resolve_target(source.bundle, args.model, args.cache_dir)
    if args.format == "lm-eval":
        from es_lightning.export.lmeval import export_lm_eval

        out = export_lm_eval(source, args.output, target, args.overwrite, args.block_path)
        return (
            f"wrote {out}: lm-eval steer file, {head}\n"
            f'  lm_eval --model steered --model_args "pretrained={target.directory},steer_path={out}" '
            f"--tasks es_lightning_mc --include_path configs/lmeval --metadata data_files=DATA.jsonl"
        )
    from es_lightning.export.hf import export_hf

    out = export_hf(source, args.output, target, args.overwrite, args.dtype, args.block_path)
    return (
        f"wrote {out}: transformers checkpoint with the steering folded in, {head}\n"
        f"  vllm serve {out}    # or AutoModelForCausalLM.from_pretrained({str(out)!r})"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``es-lightning-export``; returns the exit status (errors print one line, status 2)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    def export() -> None:
        with stage(f"the {args.format} export", kept=lambda: f"{args.output} as it was (written whole or not at all)"):
            print(run(args))

    try:
        run_stoppable(export, "es-lightning-export", lambda: ["es-lightning-export", *argv])
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"es-lightning-export: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
