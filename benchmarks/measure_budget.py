"""What each steering coefficient does to the target's generations: the measurement behind evaluation.budget.

For a fitted run's bundles, every method x coefficient is measured the way ``test`` measures a fold's val questions:
mean KL(unsteered || steered) and CE increase on the target's own unsteered answers to ``--questions`` questions,
the share of empty answers and of repeated word 3-grams, and the generation accuracy (first metric). Beside them,
the demo prompts' answers (``configs/prompts/sample_prompts.jsonl``) show whether the text is still fluent. Nothing
is fitted here: the bundles are the run's; the questions are the data file's first ones. It asserts nothing.

    python benchmarks/measure_budget.py --run checkpoints/default --questions 40
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from es_lightning.data.examples import Question
from es_lightning.evaluation.answers import AnswerGenerator
from es_lightning.evaluation.config import GenerationEvaluation
from es_lightning.evaluation.damage import AnswerHealth, Damage
from es_lightning.models import load_model
from es_lightning.steering.bundle import SteeringBundle
from es_lightning.steering.hooks import SteeringVariant


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="checkpoints/default")
    parser.add_argument("--methods", nargs="+", default=["expertsteer", "mean_difference"])
    parser.add_argument("--data", default="../shared/data/truthfulqa_mc.jsonl")
    parser.add_argument("--questions", type=int, default=40, help="the data file's last N questions")
    parser.add_argument("--prompts", default="configs/prompts/sample_prompts.jsonl")
    parser.add_argument(
        "--coefficients", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4, 0.8, -0.1, -0.2, -0.4, -0.8]
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    bundles = {m: SteeringBundle.load(Path(args.run) / "bundles" / f"{m}.safetensors") for m in args.methods}
    target = load_model(next(iter(bundles.values())).target.name)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()][-args.questions :]
    demos = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines()]
    questions = [
        Question(r["id"], f"Question: {r['question']}\nAnswer:", r["choices"], r["answer"], r["id"]) for r in rows
    ]
    questions += [Question(f"demo{k}", p, ["a b c d", "e f g h"], 0, f"demo{k}") for k, p in enumerate(demos)]
    config = GenerationEvaluation(max_new_tokens=args.new_tokens)
    generator = AnswerGenerator(target.model, target.tokenizer, questions, config)
    variants = [SteeringVariant("none")] + [
        SteeringVariant(m, c, b.vectors, b.norms) for m, b in bundles.items() for c in args.coefficients
    ]
    measured = list(range(len(rows)))
    records = generator.answer(measured + list(range(len(rows), len(questions))), variants)
    metric = config.metrics[0]
    print(
        f"{target.name}: {len(rows)} questions (the data file's last), {len(demos)} demo prompts, "
        f"{args.new_tokens} new tokens, greedy, chat template: {generator.chat}"
    )
    print(f"\n| method | coefficient | KL | CE increase | empty | repeated 3-grams | {metric} | demo answers |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for variant, answers in zip(variants, records):
        scored, demo = answers[: len(rows)], answers[len(rows) :]
        damage = sum((a.damage for a in scored), Damage())
        health = sum((a.health for a in scored), AnswerHealth())
        accuracy = sum(a.correct[metric] for a in scored) / len(scored)
        shown = " / ".join(repr(a.text[:60]) for a in demo)
        print(
            f"| {variant.name} | {variant.coefficient:g} | {damage.kl or 0:.3f} | {damage.ce_increase or 0:.3f} | "
            f"{health.empty_share:.0%} | {health.repetition:.0%} | {accuracy:.0%} | {shown} |"
        )


if __name__ == "__main__":
    main()
