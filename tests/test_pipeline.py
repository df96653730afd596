"""The main job (fit -> test -> predict) on tiny models, in-process."""

from pathlib import Path

from conftest import write_two_choice_jsonl
from es_lightning.pipeline import main

CONF = Path(__file__).parent / "conf" / "tiny.yaml"


def test_pipeline_runs_every_stage_and_prints_where_results_are(tmp_path, tiny_gpt2_dir, tiny_llama_dir, capsys):
    data = write_two_choice_jsonl(tmp_path / "two.jsonl", 24)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "what is the cat ?"}\n{"id": "b", "prompt": "where is the sun ?"}\n')
    args = ["--config", str(CONF), "--prompts", str(prompts), "--data.expert.name", str(tiny_gpt2_dir),
            "--data.target.name", str(tiny_llama_dir), "--data.data.path", str(data), "--data.cache_dir", str(tmp_path / "cache"),
            "--output_dir", str(tmp_path / "runs")]
    main(args)
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "default"
    for stage in ("1/3 fit", "2/3 test", "3/3 predict", "done in"):
        assert stage in out
    assert "| two | expertsteer |" in out  # the report table
    assert "[a] what is the cat ?" in out and "unsteered" in out and "expertsteer x0.5" in out
    for name in ("last.ckpt", "report/report.md", "predictions.jsonl", "bundles"):
        assert str(run / name) in out and (run / name).exists()
    # the same command again continues: nothing finished is computed twice
    main(args)
    out = capsys.readouterr().out
    assert "fit already complete" in out and "report already made from this checkpoint" in out
