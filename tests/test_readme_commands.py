"""Every ``es-lightning`` and ``es-lightning-pipeline`` command the README documents, parsed out of README.md and run
in order on tiny models, so the two cannot drift. The commands run in a scratch checkout whose
``configs/default.yaml`` is the tiny config (tiny expert, tiny target, tiny questions at ``../shared/data``);
commands for GPUs or several processes (paper configs, DDP, torchrun, srun) are parsed by the CLI without running.
The export section's commands are run by ``tests/test_export_commands.py``."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_CONF, write_two_choice_jsonl

from es_lightning import cli, pipeline

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXPORT_HEADING = "## Export: lm-evaluation-harness, llama.cpp, vLLM"
PROGRAMS = ("es-lightning", "es-lightning-pipeline")


def _without_export_section(text: str) -> str:
    start = text.index(EXPORT_HEADING)
    end = text.find("\n## ", start + len(EXPORT_HEADING))
    return text[:start] + (text[end:] if end >= 0 else "")


def documented_commands(text: str) -> list[list[str]]:
    """The README's es-lightning command lines, in order of appearance: bash blocks (continuations joined,
    comments and shell prefixes like ``srun`` or ``python -m es_lightning.cli`` normalised) and inline code."""
    commands: list[tuple[int, str]] = []
    for block in re.finditer(r"```bash\n(.*?)```", text, re.DOTALL):
        body = block.group(1).replace("\\\n", " ")
        for line in body.splitlines():
            line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#!") else ""
            line = line.split("&&")[-1].strip()
            line = re.sub(r"^srun\s+", "", line)
            line = re.sub(r"^torchrun .*?-m es_lightning\.cli\s+", "es-lightning ", line)
            if line.split(" ", 1)[0] in PROGRAMS:
                commands.append((block.start(), line))
    for span in re.finditer(r"`(es-lightning(?:-pipeline)? [^`]+)`", text):
        commands.append((span.start(), " ".join(span.group(1).split())))
    return [
        shlex.split(line.replace("$CONFIG", "configs/paper/math_gsm8k_qwen_to_llama31.yaml"))
        for _, line in sorted(commands)
    ]


def runs_here(argv: list[str]) -> bool:
    """True for commands on the default config in one process; the others (GPUs, several processes, the real
    models and data of the other shipped configs) are parsed, not run."""
    text = " ".join(argv)
    return "configs/default.yaml" in text and "ddp" not in text and "num_nodes" not in text


def with_placeholders_filled(argv: list[str]) -> list[str]:
    """Stand-ins for the README's placeholders (``RULE``)."""
    return ["highest" if arg == "RULE" else arg for arg in argv]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, tiny_gpt2_dir, tiny_llama_dir):
    """A scratch checkout: configs/ (default.yaml made tiny), tiny questions at ../shared/data, prompts."""
    root = tmp_path_factory.mktemp("readme")
    work = root / "es-lightning"
    shutil.copytree(ROOT / "configs", work / "configs")
    (root / "shared" / "data").mkdir(parents=True)
    write_two_choice_jsonl(root / "shared" / "data" / "truthfulqa_mc.jsonl", 24)
    config = yaml.safe_load(TINY_CONF.read_text())
    config["data"]["expert"]["name"], config["data"]["target"]["name"] = str(tiny_gpt2_dir), str(tiny_llama_dir)
    config["data"]["data"]["path"] = "../shared/data/truthfulqa_mc.jsonl"
    config["data"]["cache_dir"] = str(root / "cache")
    config["data"]["predict_data"] = {"path": "prompts.jsonl", "prompt_field": "prompt"}
    config["model"]["evaluation"].update(random_draws=2, generation={"max_new_tokens": 3})  # cost only
    config["model"]["generation"]["max_new_tokens"] = 3
    (work / "configs" / "default.yaml").write_text(yaml.safe_dump(config))
    for name in ("prompts.jsonl", "my_prompts.jsonl"):
        (work / name).write_text('{"id": "a", "prompt": "what is the cat ?"}\n')
    return work


def test_the_readme_documents_commands_of_every_stage():
    commands = documented_commands(_without_export_section(README.read_text()))
    used = {(argv[0], next((a for a in argv[1:] if a in cli.SUBCOMMANDS), "")) for argv in commands}
    assert {("es-lightning", s) for s in ("fit", "validate", "test", "predict")} | {
        ("es-lightning-pipeline", "")
    } <= used


def test_every_documented_command_runs_on_tiny_models(checkout, monkeypatch, capsys):
    monkeypatch.chdir(checkout)
    commands = documented_commands(_without_export_section(README.read_text()))
    ran = parsed = 0
    for argv in map(with_placeholders_filled, commands):
        if "..." in argv:  # a fragment showing one flag (e.g. `es-lightning-pipeline --quiet ...`), not a command
            continue
        program, args = argv[0], argv[1:]
        if not runs_here(argv):  # LightningCLI prints the parsed config and exits 0
            stage_args = ["fit", *args] if program == "es-lightning-pipeline" else args
            with pytest.raises(SystemExit) as ended:
                cli.main([*stage_args, "--print_config"])
            assert ended.value.code in (0, None), argv
            parsed += 1
            continue
        if program == "es-lightning-pipeline":
            pipeline.main(args)
        else:
            if "fit" in args and "--ckpt_path" not in args and "--run_name" not in args:
                shutil.rmtree(checkout / "checkpoints" / "default", ignore_errors=True)  # the README starts afresh
            cli.main(args)
        ran += 1
    capsys.readouterr()
    assert ran >= 8 and parsed >= 4, (ran, parsed)
