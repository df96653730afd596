"""The test stage lets go of its target model: the one-process pipeline never holds two target copies in predict."""

from __future__ import annotations

import gc
import weakref

from conftest import tiny_cli_args, write_two_choice_jsonl

from es_lightning import module as module_file
from es_lightning.pipeline import main


def test_predict_loads_its_target_after_the_test_stage_released_its_own(
    tmp_path, tiny_gpt2_dir, tiny_llama_dir, monkeypatch
):
    data = write_two_choice_jsonl(tmp_path / "two.jsonl", 24)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "what is the cat ?"}\n{"id": "b", "prompt": "where is the sun ?"}\n')
    loaded: list[weakref.ref] = []
    alive_at_each_load: list[int] = []  # target models of earlier stages still reachable when the next one loads
    real_load = module_file.load_model

    def spy(*args, **kwargs):
        alive_at_each_load.append(sum(ref() is not None for ref in loaded))
        target = real_load(*args, **kwargs)
        loaded.append(weakref.ref(target.model))
        return target

    monkeypatch.setattr(module_file, "load_model", spy)
    gc.disable()  # a copy held by a reference cycle stays resident until the collector happens to run: none here
    try:
        main(
            [
                *tiny_cli_args(tiny_gpt2_dir, tiny_llama_dir, data, tmp_path / "runs", tmp_path / "cache"),
                "--prompts",
                str(prompts),
                "--quiet",
            ]
        )
    finally:
        gc.enable()
    assert len(alive_at_each_load) == 2, alive_at_each_load  # test, then predict
    assert alive_at_each_load == [0, 0], "the test stage's target is still resident when predict loads its own"
