"""qlora-lab memory: the table, the plot, config.json input, clear errors."""
import json

import pytest

from qlora_lab.cli import main


def test_65b_qlora_table(capsys):
    assert main(["memory", "--model", "65b", "--method", "qlora", "--seq-len", "512", "--r", "64"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "adapters", "gradients", "optimizer", "activations", "temporaries", "total", "48 GB"):
        assert word in out
    total = float(next(line for line in out.splitlines() if line.startswith("total")).split()[1])
    assert total < 48


def test_config_json_and_plot(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True)))
    out_png = tmp_path / "bar.png"
    assert main(["memory", "--model", str(cfg), "--method", "lora", "--plot", str(out_png)]) == 0
    assert out_png.stat().st_size > 1000
    assert "saved" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(capsys):
    assert main(["memory", "--model", "65b", "--seq-len", "-5"]) == 2
    assert "seq_len" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["memory", "--method", "prefix"])
    assert "method" in capsys.readouterr().err
